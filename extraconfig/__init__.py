"""VIC's extraconfig codec: dataclasses with vic tags <-> flat guestinfo key/value maps."""
from .codec import (DecodeBudget, DecodeBudgetError, DecodeError, calculate_key, calculate_keys,
                    decode, encode, encode_into, prepare, read_map_names)
from .gotime import GoTime
from .keys import ROOT
from .schema import untagged, vic

__all__ = ["DecodeBudget", "DecodeBudgetError", "DecodeError", "GoTime", "ROOT", "calculate_key",
           "calculate_keys", "decode", "encode", "encode_into", "prepare", "read_map_names",
           "untagged", "vic"]
