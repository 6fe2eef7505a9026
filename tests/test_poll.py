"""poll.until: bounded waits that ask at once, keep asking, and stop by themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator

from unionimg import poll


def test_true_at_once_does_not_sleep() -> None:
    calls: list[int] = []

    def ready() -> str:
        calls.append(1)
        return "ready"

    t0 = time.monotonic()
    assert poll.until(ready, timeout=60) == "ready"
    assert calls == [1] and time.monotonic() - t0 < 1.0


def test_keeps_asking_until_true() -> None:
    answers: Iterator[object] = iter([None, 0, "", [], "yes"])
    assert poll.until(lambda: next(answers), timeout=60, interval=0.001) == "yes"


def test_stops_at_the_deadline_with_the_last_answer() -> None:
    calls: list[float] = []

    def never() -> list[str]:
        calls.append(time.monotonic())
        return []

    t0 = time.monotonic()
    assert poll.until(never, timeout=0.05, interval=0.01) == []
    assert len(calls) >= 2  # at once, and again at the deadline
    assert calls[-1] - t0 >= 0.05  # the last ask is not before the deadline


def test_zero_timeout_asks_once() -> None:
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    assert poll.until(never, timeout=0) is False
    assert calls == [1]
