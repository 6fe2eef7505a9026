"""Pure: the adaptive schedule's interval, durations as typed, retention choices.

The seed's loop (measure the guest's CPU load, set the interval, wait, snapshot): a guest
that is idle is snapshotted often (``--min``), a busy one rarely (``--max``), linearly in
between, so that the pause a snapshot costs falls where it hurts least. Load is the share of
one vCPU the guest used since the last look (``cpu seconds / wall seconds / vcpus``), so it
lies in [0, 1] whatever the VM's size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from unionimg.errors import UsageError

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)?")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MAX_DURATION = 366 * 86400.0
#: ``snapshot schedule``'s bounds when none are given: an idle guest every 30 s, a busy one
#: every 10 minutes
DEFAULT_MIN = "30s"
DEFAULT_MAX = "10m"


def parse_duration(text: str, what: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d`` or plain seconds; UsageError naming ``what``."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise UsageError(
            f"{what} {text[:40]!r} is not a duration; write a number with s, m, h or d, e.g. "
            "30s or 10m"
        )
    value = float(m.group(1)) * _UNIT[m.group(2)]
    if not 0 < value <= MAX_DURATION:
        raise UsageError(f"{what} {text[:40]!r} must be more than 0 and at most 366 days")
    return value


def load(cpu_delta: float, wall_delta: float, vcpus: int) -> float:
    """The guest's CPU load in [0, 1] over a period."""
    if wall_delta <= 0 or vcpus <= 0:
        return 0.0
    return min(1.0, max(0.0, cpu_delta / wall_delta / vcpus))


def interval(load_now: float, low: float, high: float) -> float:
    """The wait before the next snapshot: ``low`` for an idle guest, ``high`` for a busy
    one, linear in the load between them."""
    share = min(1.0, max(0.0, load_now))
    return low + (high - low) * share


def check_bounds(low: float, high: float) -> None:
    if low > high:
        raise UsageError(f"--min {low:g} s is more than --max {high:g} s; give min <= max")


def to_remove(
    ids_created: Sequence[tuple[int, float]], keep: int | None, older_than: float | None, now: float
) -> list[int]:
    """Which snapshots retention removes: beyond the ``keep`` newest, and those older than
    ``older_than`` seconds — but never the newest one. ``ids_created``: (id, epoch seconds)."""
    ordered = sorted(ids_created)
    if not ordered:
        return []
    newest = ordered[-1][0]
    out = set()
    if keep is not None:
        out |= {i for i, _ in ordered[: max(0, len(ordered) - keep)]}
    if older_than is not None:
        out |= {i for i, t in ordered if now - t > older_than}
    out.discard(newest)
    return sorted(out)
