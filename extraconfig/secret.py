"""The `secret` scope: NaCl secretbox values keyed by `guestinfo.ovfEnv`, as
vmware/vic pkg/vsphere/extraconfig/secret.go.

PyNaCl is imported only when a secret value is actually sealed or opened. Base64 goes
through binascii (base64.b64decode(validate=True) is binascii's strict mode; the base64
module would load re on the agent's way to its primary).
"""
from __future__ import annotations

import binascii
import os

from .codec import DecodeError

OVF_ENV = "guestinfo.ovfEnv"
KEY_SIZE = 32
NONCE_SIZE = 24
ZERO_KEY = bytes(KEY_SIZE)


def is_secret_key(key: str) -> bool:
    return "@" in key and "secret" in key.split("@")[1:]


def key_from_text(text: str | None) -> bytes:
    """The key `guestinfo.ovfEnv` holds; the all-zero key when absent or malformed, as Go does."""
    if not text:
        return ZERO_KEY
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return ZERO_KEY
    return raw if len(raw) == KEY_SIZE else ZERO_KEY


def seal_value(key: bytes, plaintext: str, nonce: bytes | None = None) -> str:
    from nacl.secret import SecretBox
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    sealed = SecretBox(key).encrypt(plaintext.encode("utf-8", errors="surrogateescape"), nonce)
    return binascii.b2a_base64(bytes(sealed), newline=False).decode("ascii")


def open_value(key: bytes, value: str, name: str) -> str | None:
    """The plaintext of a sealed value; None when it is not base64 or fails authentication
    (the reference then leaves the field unset); DecodeError where the reference panics."""
    try:
        raw = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    if len(raw) < NONCE_SIZE:
        raise DecodeError(f"{name}: secret value shorter than its {NONCE_SIZE}-byte nonce")
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox
    try:
        plain = SecretBox(key).decrypt(raw[NONCE_SIZE:], raw[:NONCE_SIZE])
    except CryptoError:
        return None
    return plain.decode("utf-8", errors="surrogateescape")


class SecretKey:
    """32 random bytes (or given ones) with Source and Sink wrappers."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = os.urandom(KEY_SIZE) if key is None else bytes(key)
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"a secret key is {KEY_SIZE} bytes, not {len(self.key)}")

    def text(self) -> str:
        return binascii.b2a_base64(self.key, newline=False).decode("ascii")

    def sink(self, inner):
        """Writes `guestinfo.ovfEnv` now, then seals every `@secret` value passing through."""
        inner(OVF_ENV, self.text())

        def sink(key: str, value: str) -> None:
            inner(key, seal_value(self.key, value) if is_secret_key(key) else value)
        return sink


class SecretSource:
    """A source wrapper opening `@secret` values with the key read from `guestinfo.ovfEnv`."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.key = key_from_text(inner.get(OVF_ENV))

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self.inner.get(key)
        if value is None:
            return default
        if is_secret_key(key):
            opened = open_value(self.key, value, key)
            return default if opened is None else opened
        return value

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value
