"""VIC's extraconfig codec: dataclasses with vic tags <-> flat guestinfo key/value maps."""
