"""Progress for long work (a bar on a terminal, nothing extra in logs: journald gets lines), and
the forms counts, sizes and times take in what narfs prints."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm


class Progress:
    """Counts bytes (or items) done; draws only when stderr is a terminal."""

    def __init__(self, total: int, what: str, unit: str = "B") -> None:
        self.bar: tqdm | None = None
        self.lock = threading.Lock()  # worker threads advance it, each with its own path
        if sys.stderr.isatty() and total > 0:
            self.bar = tqdm(total=total, desc=what, unit=unit, unit_scale=True,
                            unit_divisor=1024 if unit == "B" else 1000, leave=False,
                            file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int, label: str = "") -> None:
        if self.bar is not None:
            with self.lock:
                if label:
                    self.bar.set_postfix_str(label[:40], refresh=False)
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plural(n: int, noun: str, nouns: str = "") -> str:
    """"1 path", "2 paths": a count with its noun (`nouns` when the plural is not noun + s)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def when(t: float | None) -> str:
    """A moment as the commands print it (local time, to the minute); `-` for none."""
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def ago(t: float, now: float | None = None) -> str:
    s = max(0.0, (now or time.time()) - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"
