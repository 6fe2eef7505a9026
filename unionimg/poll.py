"""The one way to wait for something unionimg cannot be told about: ask again until a deadline.

Every wait is bounded (a loop device released, an unmount no longer busy, a guest's console
line, a process gone). ``until(check, timeout, interval)`` asks ``check`` at once, then every
``interval`` seconds, and returns the first true result — or the last false one when
``timeout`` has passed (the caller says what that means). Pure apart from sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """A point ``timeout`` seconds from now on the monotonic clock."""

    def __init__(self, timeout: float) -> None:
        self.at = time.monotonic() + max(timeout, 0.0)

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def until(check: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """``check()``'s first truthy result, asked every ``interval`` s; after ``timeout`` s,
    its last (falsy) result. ``check`` runs at least once, and once more at the deadline."""
    deadline = Deadline(timeout)
    while True:
        result = check()
        if result or deadline.passed():
            return result
        time.sleep(min(interval, max(deadline.left(), 0.001)))
