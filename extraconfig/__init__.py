"""VIC's extraconfig codec: records and dataclasses with vic tags <-> flat guestinfo
key/value maps.

The names below are loaded when first used, so that importing one submodule
(`extraconfig.keys`, say) does not load the codec too.
"""
_EXPORTS = {
    "DecodeBudget": "codec", "DecodeBudgetError": "codec", "DecodeError": "codec",
    "calculate_key": "codec", "calculate_keys": "codec", "decode": "codec", "encode": "codec",
    "encode_into": "codec", "prepare": "codec", "read_map_names": "codec",
    "GoTime": "gotime", "ROOT": "keys", "untagged": "schema", "vic": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
