"""A minimal binding to libnftables (nftables' own library, libnftables(3)): run a batch of
commands in nftables' JSON form as one transaction, and read results back as JSON.

Why ctypes and not a Python package: Debian's python3-nftables is the same thin ctypes
wrapper, but it lives in the system Python's dist-packages (the venv cannot import it),
and its PyPI copies are unofficial re-uploads versioned apart from the library they load;
pyroute2's nftables module has neither the expressions (ct state, ports, ip6, redirect)
nor batch transactions. libnftables' C entry points used here are its stable public API.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Optional

LIBRARY = "libnftables.so.1"
_OUTPUT_JSON = 1 << 4          # NFT_CTX_OUTPUT_JSON


class NftError(Exception):
    """nftables refused a command; the message is its own error text."""


class Nft:
    """One libnftables context. Not thread-safe on its own: calls are serialised."""

    def __init__(self, library: str = LIBRARY):
        import ctypes
        try:
            lib = ctypes.CDLL(library, use_errno=True)
        except OSError as err:
            raise NftError(f"cannot load {library} ({err}); install libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)   # also selects JSON input parsing
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise NftError("cannot buffer libnftables output")
        self._lib, self._ctx = lib, ctx
        self._lock = threading.Lock()

    def run(self, commands: list[dict[str, Any]]) -> Optional[dict]:
        """Run `commands` (nftables JSON command objects) as one transaction: all of them
        take effect, or none. Returns the parsed JSON output, if any."""
        document = {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}
        return self._run(json.dumps(document))

    def run_text(self, text: str) -> Optional[dict]:
        """A command in nft's own syntax (e.g. `list table inet tether`), output as JSON."""
        return self._run(text)

    def _run(self, text: str) -> Optional[dict]:
        with self._lock:
            if self._ctx is None:
                raise NftError("the nftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            message = " ".join(line.strip() for line in err.decode(errors="replace").splitlines()
                               if line.strip() and not set(line.strip()) <= set("^~ "))
            raise NftError(message or f"nftables failed (code {rc})")
        out = out.decode(errors="replace").strip()
        return json.loads(out) if out else None

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> "Nft":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
