"""cpuload.LoadWatch: the share of the cores other processes use, and the threads it leaves us."""

from __future__ import annotations

import pytest

from gpt2cli import cpuload


def _feed(monkeypatch: pytest.MonkeyPatch, readings: list[tuple[int, int, float]]) -> None:
    """Successive (busy ticks, all ticks, own ticks) readings, one per sample."""
    it = iter(readings)
    current: list[tuple[int, int, float]] = []

    def ticks() -> tuple[int, int]:
        current[:] = [next(it)]
        return current[0][0], current[0][1]

    monkeypatch.setattr(cpuload, "_read_cpu_ticks", ticks)
    monkeypatch.setattr(cpuload, "_own_ticks", lambda: current[0][2])


@pytest.mark.parametrize(
    ("others_busy", "expected"),
    [
        (0, 2),  # idle machine: every thread
        (20, 2),  # others use 0.2 of a core: within the slack
        (100, 1),  # one core kept busy by another process: one thread
        (200, 1),  # both cores busy: still one
    ],
)
def test_threads_follow_what_other_processes_use(monkeypatch, others_busy: int, expected: int) -> None:
    watch = cpuload.LoadWatch(interval=0.0)
    watch.cores = 2
    # 100 ticks of wall time on 2 cores = 200 ticks; we used 80 of them ourselves
    _feed(monkeypatch, [(1000, 5000, 300.0), (1000 + 80 + others_busy, 5200, 380.0)])
    watch.sample()
    watch.sample()
    watch.interval = 3600.0  # no further readings
    assert watch.threads(2) == expected
    assert watch.others == pytest.approx(others_busy / 100)
    assert watch.threads(1) == 1


def test_without_proc_stat_every_thread_is_used(monkeypatch) -> None:
    monkeypatch.setattr(cpuload, "_read_cpu_ticks", lambda: None)
    watch = cpuload.LoadWatch(interval=0.0)
    watch.cores = 4
    assert watch.threads(4) == 4


def test_the_machine_is_read_at_most_once_per_interval(monkeypatch) -> None:
    reads: list[int] = []
    monkeypatch.setattr(cpuload, "_read_cpu_ticks", lambda: reads.append(1) or (0, 0))
    monkeypatch.setattr(cpuload, "_own_ticks", lambda: 0.0)
    watch = cpuload.LoadWatch(interval=3600.0)
    for _ in range(5):
        watch.threads(2)
    assert len(reads) == 1


def test_real_proc_stat_is_parsed() -> None:
    ticks = cpuload._read_cpu_ticks()
    if ticks is None:
        pytest.skip("no /proc/stat here")
    busy, total = ticks
    assert 0 <= busy <= total
