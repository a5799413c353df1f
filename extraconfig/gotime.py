"""Go's time.Time as the wire sees it: an instant with nanoseconds and a named zone.

`format()` is Go 1.8's `Time.String()` (never the Go >= 1.9 ` m=` suffix); `parse()`
is Go's `time.Parse("2006-01-02 15:04:05.999999999 -0700 MST", text)`, returning
None where Go returns an error (the decoder then stores the zero time, as Go does).
"""
from __future__ import annotations

import time

from .record import record

ZERO_UNIX = -62135596800          # 0001-01-01 00:00:00 UTC
_DAY = 86400


@record(frozen=True)
class GoTime:
    unix: int = ZERO_UNIX         # seconds since the epoch (default: Go's zero time)
    nanos: int = 0                # 0..999_999_999
    offset: int = 0               # seconds east of UTC
    zone: str = "UTC"             # the zone abbreviation; "" means unnamed

    @classmethod
    def now(cls) -> "GoTime":
        ns = time.time_ns()
        return cls(ns // 1_000_000_000, ns % 1_000_000_000, 0, "UTC")

    def is_zero(self) -> bool:
        return self.unix == ZERO_UNIX and self.nanos == 0

    def format(self) -> str:
        return format_go(self)

    @classmethod
    def parse(cls, text: str) -> "GoTime | None":
        return parse_go(text)

    def to_rfc3339(self) -> str:
        y, mo, d, h, mi, s = _civil(self.unix + self.offset)
        frac = f".{self.nanos:09d}".rstrip("0") if self.nanos else ""
        if self.offset == 0:
            tz = "Z"
        else:
            sign = "-" if self.offset < 0 else "+"
            m = abs(self.offset) // 60
            tz = f"{sign}{m // 60:02d}:{m % 60:02d}"
        return f"{_year(y)}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{tz}"

    @classmethod
    def from_rfc3339(cls, text: str, zone: str | None = None) -> "GoTime":
        """RFC 3339 text; the zone name is `zone` if given, else UTC for Z/+00:00, else unnamed."""
        m = _patterns()["rfc3339"].match(text)
        if not m:
            raise ValueError(f"not an RFC 3339 time: {text!r}")
        y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
        if not _check_fields(y, mo, d, h, mi, s):
            raise ValueError(f"time out of range: {text!r}")
        nanos = int((m.group(7) or "").ljust(9, "0")) if m.group(7) else 0
        if m.group(8):
            offset = 0
        else:
            sign = -1 if m.group(9) == "-" else 1
            offset = sign * (int(m.group(10)) * 3600 + int(m.group(11)) * 60)
        if zone is None:
            zone = "UTC" if offset == 0 else ""
        return cls(_days_from_civil(y, mo, d) * _DAY + h * 3600 + mi * 60 + s - offset,
                   nanos, offset, zone)


_PATTERNS: dict = {}


def _patterns() -> dict:
    """The text patterns, compiled at the first parse: the agent's boot reads no times,
    and re is not loaded before one is."""
    if not _PATTERNS:
        import re
        _PATTERNS.update(
            rfc3339=re.compile(
                r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                r"(?:(Z|z)|([+-])(\d{2}):(\d{2}))\Z"),
            layout=re.compile(
                r"(\d{4})-(\d{2})-(\d{2}) (\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))? ([+-])"
                r"(\d{2})(\d{2}) (.*)\Z", re.ASCII | re.DOTALL),
            gmt=re.compile(r"GMT(?:[+-]\d{1,2})?", re.ASCII),
            abbreviation=re.compile(r"[A-Z]{3,5}", re.ASCII))
    return _PATTERNS


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (any year)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil(seconds: int) -> tuple[int, int, int, int, int, int]:
    days, rem = divmod(seconds, _DAY)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y += m <= 2
    return y, m, d, rem // 3600, rem % 3600 // 60, rem % 60


def _year(y: int) -> str:
    return f"{y:04d}" if y >= 0 else f"-{-y:04d}"


def _offset_text(offset: int) -> str:
    sign = "-" if offset < 0 else "+"
    minutes = abs(offset) // 60
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def format_go(t: GoTime) -> str:
    y, mo, d, h, mi, s = _civil(t.unix + t.offset)
    frac = f".{t.nanos:09d}".rstrip("0") if t.nanos else ""
    off = _offset_text(t.offset)
    return f"{_year(y)}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}{frac} {off} {t.zone or off}"


def _zone_ok(name: str) -> bool:
    """Go 1.8's parseTimeZone, requiring the name to be the whole rest of the text."""
    if name in ("ChST", "MeST"):
        return True
    if name.startswith("GMT"):
        return _patterns()["gmt"].fullmatch(name) is not None
    if not _patterns()["abbreviation"].fullmatch(name):
        return False
    return len(name) == 3 or name[-1] == "T"


def _days_in(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def _check_fields(y: int, mo: int, d: int, h: int, mi: int, s: int) -> bool:
    return 1 <= mo <= 12 and 1 <= d <= _days_in(y, mo) and h < 24 and mi < 60 and s < 60


def parse_go(text: str) -> GoTime | None:
    m = _patterns()["layout"].match(text)
    if not m:
        return None
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    if not _check_fields(y, mo, d, h, mi, s):
        return None
    nanos = int(m.group(7).ljust(9, "0")) if m.group(7) else 0
    zone = m.group(11)
    wall = _days_from_civil(y, mo, d) * _DAY + h * 3600 + mi * 60 + s
    if zone.startswith("UTC"):
        if zone != "UTC":
            return None                   # Go: "extra text" after the zone
        return GoTime(wall, nanos, 0, "UTC")
    sign = -1 if m.group(8) == "-" else 1
    offset = sign * (int(m.group(9)) * 3600 + int(m.group(10)) * 60)
    if zone == m.group(8) + m.group(9) + m.group(10):
        # Deviation: Go's String() writes an unnamed zone as its offset, which Go's own
        # parser rejects (reading back the zero time); we read it back as written.
        return GoTime(wall - offset, nanos, offset, "")
    if not _zone_ok(zone):
        return None
    return GoTime(wall - offset, nanos, offset, zone)
