"""Leaf value texts as Go's strconv writes and reads them
(vmware/vic pkg/vsphere/extraconfig/encode.go toString, decode.go fromString)."""
from __future__ import annotations

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

TRUE_WORDS = frozenset(("1", "t", "T", "TRUE", "true", "True"))


def format_bool(value: bool) -> str:
    return "true" if value else "false"


def parse_bool(text: str) -> bool:
    """strconv.ParseBool; anything it rejects reads as false, as in the reference."""
    return text in TRUE_WORDS


def format_int(value: int) -> str:
    return str(int(value))


def ascii_digits(text: str) -> bool:
    """One or more ASCII digits and nothing else (`[0-9]+`)."""
    return text.isdigit() and text.isascii()


def parse_int(text: str) -> int:
    """strconv.ParseInt(text, 10, 64); an error reads as 0, as in the reference."""
    if not is_int(text):
        return 0
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else 0


def is_int(text: str) -> bool:
    """Whether strconv.Atoi / ParseInt would accept the text (sign, ASCII digits)."""
    return len(text) <= 24 and ascii_digits(text[1:] if text[:1] in ("+", "-") else text)


def parse_uint(text: str) -> int:
    if len(text) > 24 or not ascii_digits(text[1:] if text[:1] == "+" else text):
        return 0
    value = int(text)
    return value if value < (1 << 64) else 0


def format_float(value: float) -> str:
    """strconv.FormatFloat(v, 'E', -1, 64): shortest round-trip mantissa, capital E."""
    import math   # floats are rare in a config: not loaded before the first
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0E+00"
    from decimal import Decimal
    _, digits, exponent = Decimal(repr(abs(value))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exp10 = exponent + len(digits) - 1
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    return f"{sign}{mantissa}E{'+' if exp10 >= 0 else '-'}{abs(exp10):02d}"


def widen_float32(value: float) -> float:
    """A float32 value as Go widens it to float64 before formatting."""
    import math
    import struct
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _is_float_text(text: str) -> bool:
    r"""Whether `text` is `[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)`
    (letters in any case): what ParseFloat takes and float() agrees with. Checked with str
    methods: re is not loaded when the agent reads its config (a float field is there)."""
    body = text[1:] if text[:1] in ("+", "-") else text
    lower = body.lower()
    if lower in ("inf", "infinity", "nan"):
        return True
    mantissa, e, exponent = lower.partition("e")
    if e:
        exponent = exponent[1:] if exponent[:1] in ("+", "-") else exponent
        if not ascii_digits(exponent):
            return False
    whole, _, fraction = mantissa.partition(".")
    return bool(whole or fraction) and (not whole or ascii_digits(whole)) \
        and (not fraction or ascii_digits(fraction))


def parse_float(text: str) -> float:
    """strconv.ParseFloat(text, 64); an error (including overflow) reads as 0."""
    if len(text) > 1100 or not _is_float_text(text):
        return 0.0
    value = float(text)
    import math
    if math.isinf(value) and "inf" not in text.lower():
        return 0.0
    return value


# binascii (a C extension: loading it costs PID 1's boot ~0.2 ms) is loaded at the first
# []byte value (the agent's usual config has none), once: an import statement per value
# would cost an encode of many IP addresses more than the base64.
binascii = None


def _load_binascii() -> None:
    global binascii
    import binascii


def format_bytes(value: bytes) -> str:
    if binascii is None:
        _load_binascii()
    return binascii.b2a_base64(value, newline=False).decode("ascii")     # base64.b64encode


def parse_bytes(text: str) -> bytes | None:
    """Standard base64 with padding (Go also skips CR and LF); None when invalid."""
    if "\r" in text or "\n" in text:
        text = text.replace("\r", "").replace("\n", "")
    if len(text) % 4:
        return None
    if binascii is None:
        _load_binascii()
    try:
        # what base64.b64decode(validate=True) does, without its wrapping; a str that is
        # not ASCII raises ValueError
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
