"""VIC's extraconfig codec: dataclasses with vic tags <-> flat guestinfo key/value maps."""
from .codec import DecodeError, calculate_key, calculate_keys, decode, encode, encode_into
from .gotime import GoTime
from .keys import ROOT
from .schema import untagged, vic

__all__ = ["DecodeError", "GoTime", "ROOT", "calculate_key", "calculate_keys", "decode",
           "encode", "encode_into", "untagged", "vic"]
