"""Terminal queries in output: sequences a terminal answers by typing into its input.

Replayed output must not make the terminal answer: the answers (a cursor position, device
attributes, colours) would reach the session as typed input, long after the program that
asked has gone. `QueryFilter` removes the queries from a byte stream, sans-IO, holding back
a sequence cut at the end of one chunk until the next.

Removed: ENQ (answerback) and DECID (`ESC Z`); in CSI, device attributes (`c`, `> c`,
`= c`), status reports (`n`, `? n`), DECRQM (`$ p`), DECREQTPARM (`x`), DECRQPSR (`$ w`),
DECRQTSR (`$ u`), DECRQCRA (`* y`), XTVERSION (`> q`), the kitty keyboard query (`? u`),
XTQMODKEYS (`? m`), XTSMGRAPHICS (`? S`) and the window reports of `t` (11, 13-16, 18-21);
OSC with a `?` field (colours, palette, clipboard read); DCS `$q` (DECRQSS) and `+q`
(XTGETTCAP). Everything else passes as it came.
"""
from __future__ import annotations

ESC = 0x1B
ENQ = 0x05
BEL = 0x07
MAX_HELD = 4096           # a sequence longer than this is no query: let it through
_REPORTING_WINDOW_OPS = {"11", "13", "14", "15", "16", "18", "19", "20", "21"}


def _is_csi_query(params: bytes, intermediates: bytes, final: int) -> bool:
    prefix = params[:1] if params[:1] in (b">", b"=", b"?", b"<") else b""
    numbers = params[len(prefix):]
    final_char = chr(final)
    if intermediates == b"$":
        return final_char in "pwu"
    if intermediates == b"*":
        return final_char == "y"
    if intermediates:
        return False
    if final_char == "c":
        return prefix in (b"", b">", b"=")
    if final_char == "n":
        return prefix in (b"", b"?")
    if final_char == "x":
        return prefix == b"" and numbers in (b"", b"0", b"1")
    if final_char == "q":
        return prefix == b">"
    if final_char in "umS":
        return prefix == b"?"
    if final_char == "t":
        return prefix == b"" and numbers.split(b";")[0].decode() in _REPORTING_WINDOW_OPS
    return False


class QueryFilter:
    """feed(bytes) -> the same bytes without terminal queries; flush() -> what is held."""

    def __init__(self) -> None:
        self._held = b""
        self.removed = 0          # how many queries were taken out

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        self._held = b""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            byte = data[i]
            if byte == ENQ:
                self.removed += 1
                i += 1
                continue
            if byte != ESC:
                j = data.find(b"\x1b", i)
                k = data.find(b"\x05", i)
                stop = min(x for x in (j, k, n) if x >= 0)
                out += data[i:stop]
                i = stop
                continue
            end, query = self._sequence(data, i)
            if end is None:                       # cut short: wait for the rest
                if n - i > MAX_HELD:
                    out += data[i:i + 1]          # not a query anyone answers: pass it on
                    i += 1
                    continue
                self._held = data[i:]
                break
            if query:
                self.removed += 1
            else:
                out += data[i:end]
            i = end
        return bytes(out)

    @staticmethod
    def _sequence(data: bytes, start: int) -> tuple[int | None, bool]:
        """(end of the escape sequence at `start`, is it a query); end None: incomplete."""
        n = len(data)
        if start + 1 >= n:
            return None, False
        kind = data[start + 1]
        if kind == ord("Z"):                      # DECID
            return start + 2, True
        if kind == ord("["):                      # CSI params intermediates final
            i = start + 2
            p0 = i
            while i < n and 0x30 <= data[i] <= 0x3F:
                i += 1
            p1 = i
            while i < n and 0x20 <= data[i] <= 0x2F:
                i += 1
            if i >= n:
                return None, False
            final = data[i]
            if not 0x40 <= final <= 0x7E:         # malformed: leave it to the terminal
                return i, False
            return i + 1, _is_csi_query(data[p0:p1], data[p1:i], final)
        if kind in (ord("]"), ord("P")):          # OSC / DCS string up to BEL or ST
            i = start + 2
            while i < n:
                if data[i] == BEL and kind == ord("]"):
                    body, end = data[start + 2:i], i + 1
                    break
                if data[i] == ESC:
                    if i + 1 >= n:
                        return None, False
                    if data[i + 1] == ord("\\"):
                        body, end = data[start + 2:i], i + 2
                        break
                    return i, False               # cut by another sequence: not a query
                i += 1
            else:
                return None, False
            if kind == ord("]"):
                return end, b"?" in body.split(b";")[1:]
            stripped = body.lstrip(b"0123456789;")
            return end, stripped[:2] in (b"$q", b"+q")
        return start + 1, False                   # other escapes: pass the ESC on
