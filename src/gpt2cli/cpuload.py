"""How many CPU cores other processes leave to this one, sampled from /proc/stat (Linux).

A decode step is ~50 short parallel regions. When another process keeps a core busy, a
thread of ours waits for the scheduler inside every region (a barrier waits for its slowest
thread), and 2 threads end up far slower than 1 (docs/performance.md). The kernels therefore
ask ``LoadWatch.threads(wanted)`` how many threads to use: all of them while the other
processes leave the cores free, fewer while they do not. Stdlib only; where /proc/stat cannot
be read the answer is always ``wanted``.
"""

from __future__ import annotations

import math
import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_SLACK = 0.3
"""Cores other processes may use before we give up a thread (a shell, a light daemon)."""


def _read_cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks, all ticks) over every CPU since boot, or None where unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 8 or fields[0] != b"cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq = (int(v) for v in fields[1:8])
    steal = int(fields[8]) if len(fields) > 8 else 0  # time the hypervisor ran someone else
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own_ticks() -> float:
    t = os.times()
    return (t.user + t.system) * CLK_TCK


class LoadWatch:
    """Samples the machine's load at most every ``interval`` seconds (cost: one small read)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self._last: tuple[float, int, int, float] | None = None  # (when, busy, total, own)
        self.others = 0.0  # cores other processes used over the last interval

    def sample(self) -> None:
        """Update ``others`` if the interval has passed (the first call only takes a reading)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return
        ticks = _read_cpu_ticks()
        if ticks is None:
            return
        own = _own_ticks()
        if self._last is not None:
            _, busy0, total0, own0 = self._last
            d_total = ticks[1] - total0
            if d_total > 0:
                others_ticks = max(0.0, (ticks[0] - busy0) - (own - own0))
                self.others = min(float(self.cores), others_ticks / d_total * self.cores)
        self._last = (now, ticks[0], ticks[1], own)

    def threads(self, wanted: int) -> int:
        """How many of ``wanted`` threads to use now: fewer while other processes hold cores."""
        self.sample()
        free = self.cores - self.others
        if free >= wanted - BUSY_SLACK:
            return wanted
        return max(1, min(wanted, math.floor(free + BUSY_SLACK)))
