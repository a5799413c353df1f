"""Go's time.Time as the wire sees it: an instant with nanoseconds and a named zone."""
from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class GoTime:
    unix: int = -62135596800      # seconds since the epoch (default: Go's zero time)
    nanos: int = 0                # 0..999_999_999
    offset: int = 0               # seconds east of UTC
    zone: str = "UTC"             # the zone abbreviation; "" means unnamed

    @classmethod
    def now(cls) -> "GoTime":
        ns = time.time_ns()
        return cls(ns // 1_000_000_000, ns % 1_000_000_000, 0, "UTC")

    def is_zero(self) -> bool:
        return self.unix == -62135596800 and self.nanos == 0
