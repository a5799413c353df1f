"""Go's time.Time as the wire sees it: an instant with nanoseconds and a named zone.

`format()` is Go 1.8's `Time.String()` (never the Go >= 1.9 ` m=` suffix); `parse()`
is Go's `time.Parse("2006-01-02 15:04:05.999999999 -0700 MST", text)`, returning
None where Go returns an error (the decoder then stores the zero time, as Go does).
"""
from __future__ import annotations

import time

from .record import record
from .scalars import ascii_digits

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
    """The RFC 3339 pattern, compiled at its first use (the JSON form's times)."""
    if not _PATTERNS:
        import re
        _PATTERNS.update(
            rfc3339=re.compile(
                r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                r"(?:(Z|z)|([+-])(\d{2}):(\d{2}))\Z"))
    return _PATTERNS


def _digits(text: str, least: int, most: int) -> bool:
    return least <= len(text) <= most and ascii_digits(text)


def _layout_fields(text: str) -> tuple | None:
    """Go's String() layout, `YYYY-MM-DD h:MM:SS[.fraction] +hhmm ZONE`, split into (year,
    month, day, hour, minute, second, fraction or "", sign, offset hours, offset minutes,
    zone) texts, or None; the zone is the rest, whatever it holds. Read with str methods,
    not re: a VM restarted with its last run's exit records reads times at boot, and re
    would cost that boot more than the whole config step."""
    date, _, rest = text.partition(" ")
    clock, _, rest = rest.partition(" ")
    offset, space, zone = rest.partition(" ")
    if not space or len(date) != 10 or date[4] != "-" or date[7] != "-":
        return None
    y, mo, d = date[:4], date[5:7], date[8:]
    hms, dot, fraction = clock.partition(".")
    h, _, ms = hms.partition(":")
    mi, colon, sec = ms.partition(":")
    if not (colon and _digits(y, 4, 4) and _digits(mo, 2, 2) and _digits(d, 2, 2)
            and _digits(h, 1, 2) and _digits(mi, 2, 2) and _digits(sec, 2, 2)
            and (not dot or _digits(fraction, 1, 9))):
        return None
    sign, oh, om = offset[:1], offset[1:3], offset[3:]
    if len(offset) != 5 or sign not in ("+", "-") or not (_digits(oh, 2, 2)
                                                         and _digits(om, 2, 2)):
        return None
    return y, mo, d, h, mi, sec, fraction, sign, oh, om, zone


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
    if name.startswith("GMT"):      # GMT, or GMT with a sign and one or two digits
        rest = name[3:]
        return not rest or (rest[0] in "+-" and _digits(rest[1:], 1, 2))
    if not (3 <= len(name) <= 5 and name.isascii() and name.isalpha() and name.isupper()):
        return False
    return len(name) == 3 or name[-1] == "T"


def _days_in(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def _check_fields(y: int, mo: int, d: int, h: int, mi: int, s: int) -> bool:
    return 1 <= mo <= 12 and 1 <= d <= _days_in(y, mo) and h < 24 and mi < 60 and s < 60


def parse_go(text: str) -> GoTime | None:
    fields = _layout_fields(text)
    if fields is None:
        return None
    y, mo, d, h, mi, s = (int(f) for f in fields[:6])
    if not _check_fields(y, mo, d, h, mi, s):
        return None
    fraction, sign_text, offset_h, offset_m, zone = fields[6:]
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    wall = _days_from_civil(y, mo, d) * _DAY + h * 3600 + mi * 60 + s
    if zone.startswith("UTC"):
        if zone != "UTC":
            return None                   # Go: "extra text" after the zone
        return GoTime(wall, nanos, 0, "UTC")
    sign = -1 if sign_text == "-" else 1
    offset = sign * (int(offset_h) * 3600 + int(offset_m) * 60)
    if zone == sign_text + offset_h + offset_m:
        # Deviation: Go's String() writes an unnamed zone as its offset, which Go's own
        # parser rejects (reading back the zero time); we read it back as written.
        return GoTime(wall - offset, nanos, offset, "")
    if not _zone_ok(zone):
        return None
    return GoTime(wall - offset, nanos, offset, zone)
