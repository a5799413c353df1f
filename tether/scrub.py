"""Secrets do not linger in guestinfo: once read, their keys are emptied.

Over the VMware backdoor any process in the guest, root or not, can `info-get` any
guestinfo key (`vmtoolsd --cmd "info-get guestinfo.vice./key"`). So after the agent has
read its config it overwrites, with empty values, the keys that hold secrets: the
executor `Key` (the attach key) and every secret-scope (`@secret`) key of the config,
ours included. An empty value reads as missing, for the guest and the host alike. A
config that does not decode still has its Key emptied (its key is fixed; the other
secret keys cannot be listed without the config).

On by default for the backdoor transport; the config's `scrub_secrets` turns it on or off
for any transport. A write the transport refuses is logged and the agent goes on.
Values are never logged, only key names.
"""
from __future__ import annotations

from tether.log import get_logger

log = get_logger("tether.scrub")


def should_scrub(config, transport) -> bool:
    if config.scrub_secrets is not None:
        return bool(config.scrub_secrets)
    return type(transport).__module__.startswith("extraconfig.backdoor")


def secret_keys(config) -> list[str]:
    """The guest-visible keys holding `config`'s secrets."""
    from extraconfig.secret import is_secret_key
    from tether.extension import encode_config
    keys = sorted(k for k in encode_config(config)
                  if is_secret_key(k) and k.startswith("guestinfo."))
    if config.key:
        keys.append(key_key())
    return keys


def key_key() -> str:
    """Where the executor's Key is, known without decoding a config."""
    from extraconfig.codec import calculate_key
    from tether.config import ExecutorConfig
    return calculate_key(ExecutorConfig(), "Key")


def scrub_secrets(transport, config, keys: list[str] | None = None) -> list[str]:
    """Overwrite the secret keys (`keys`, else those of `config`) with empty values;
    returns the keys emptied."""
    done = []
    for key in secret_keys(config) if keys is None else keys:
        try:
            transport.info_set(key, "")
        except Exception as err:   # noqa: BLE001 - a refused write must not stop the agent
            log.warning("guestinfo: could not empty the secret key %s: %s", key, err)
            continue
        done.append(key)
    if done:
        log.info("guestinfo: emptied %d secret key(s) after reading them: %s", len(done),
                 ", ".join(done))
    return done
