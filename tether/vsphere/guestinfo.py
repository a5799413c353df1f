"""A VM's extraConfig as the host side of guestinfo: what the port layer writes at creation,
and how it reads back what the guest wrote.

vSphere keeps extraConfig as a list of OptionValues. An empty value would delete its key,
so `""` is written as `<nil>` and read back as `""` (VIC's vmomi.OptionValueMap). When a key
appears more than once, the last one counts: vSphere replaces a key in place, the
simulator appends, and reading the list in order gives the same map for both.

Keys with the `secret` scope are sealed for vSphere as VIC's port layer did for its
appliance: a fresh key in `guestinfo.ovfEnv`, every `@secret` value a NaCl secretbox under
it (extraconfig.secret). The container config has no such keys today, so for it the
extraConfig is `tether config encode`'s output, key for key.
"""
from __future__ import annotations

from extraconfig.secret import SecretKey, is_secret_key
from extraconfig.transport import NIL


def extra_config_values(entries: dict[str, str], secret_key: SecretKey | None = None) -> dict[str, str]:
    """The values to write for encoded keys: `""` as `<nil>`, secret values sealed."""
    values = {key: (NIL if value == "" else value) for key, value in entries.items()}
    secret = sorted(key for key in values if is_secret_key(key))
    if secret:
        key = secret_key or SecretKey()
        sink = key.sink(values.__setitem__)      # writes guestinfo.ovfEnv first
        for name in secret:
            sink(name, entries[name])
    return values


def raw_map(options) -> dict[str, str]:
    """The extraConfig list as stored (values verbatim, `<nil>` included), last one winning."""
    out: dict[str, str] = {}
    for option in options or []:
        value = option.value
        out[option.key] = value if isinstance(value, str) else str(value)
    return out


def host_map(options) -> dict[str, str]:
    """The extraConfig as the port layer reads it: `<nil>` is the empty string."""
    return {key: ("" if value == NIL else value) for key, value in raw_map(options).items()}


def guestinfo_view(values: dict[str, str], written) -> dict[str, str]:
    """The container's keys in a host map: those the port layer wrote and the guestinfo ones
    (all the guest can write), without the VMX's own options vSphere keeps beside them."""
    return {key: value for key, value in values.items()
            if key in written or key.startswith("guestinfo.")}
