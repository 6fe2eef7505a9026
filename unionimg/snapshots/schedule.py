"""``snapshot schedule``: the seed's loop, long-running — measure the guest's CPU load, set
the interval (:func:`unionimg.snapshots.policy.interval`), wait, take a snapshot (and push
it to a host), again.

One schedule per VM: the store lock ``snapshot-schedule-VM`` is held for the whole run, so a
second one is refused naming the holder. Every round is one line in
``snapshots/vms/VM/schedule.log`` (and on stdout): time, load, the interval waited, the
snapshot taken, its new bytes and pause, what the push sent. A round that fails (the guest
stopped, a host down) is logged and the loop goes on with the next round, except when the
VM is gone. ``--count N`` / ``--for DURATION`` bound a run (tests, benchmarks); without them
it runs until killed (run it under the service manager, like the reconcile timer's
command).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from unionimg.errors import NotFound, UnionimgError
from unionimg.layers.instance import load
from unionimg.layers.running import read_running, running_on
from unionimg.snapshots import capture, core, policy, remote
from unionimg.store.layout import Store, now_iso


def _cpu(store: Store, vm: str) -> float | None:
    if not running_on(store, vm):
        return None
    rec = read_running(store, vm)
    if rec is None:
        return None
    try:
        return capture.cpu_seconds(rec)
    except UnionimgError:
        return None


def run(
    store: Store,
    vm: str,
    *,
    low: float,
    high: float,
    to: str | None = None,
    keep: int | None = None,
    count: int | None = None,
    duration: float | None = None,
    say: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Run the schedule; the rounds done (bounded by ``count`` and ``duration``)."""
    policy.check_bounds(low, high)
    inst = load(store, vm)
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()
    log_path = core.vm_dir(store, vm) / "schedule.log"
    with store.lock(f"snapshot-schedule-{vm}", wait=False, purpose=f"snapshot schedule {vm}"):
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        wait = low
        while count is None or len(rounds) < count:
            if duration is not None and time.monotonic() - started + wait > duration:
                break
            cpu0, t0 = _cpu(store, vm), time.monotonic()
            sleep(wait)
            cpu1, t1 = _cpu(store, vm), time.monotonic()
            cpu_load = 0.0
            if cpu0 is not None and cpu1 is not None:
                cpu_load = policy.load(cpu1 - cpu0, t1 - t0, inst.vcpus)
            row: dict[str, Any] = {"at": now_iso(), "load": round(cpu_load, 3), "waited_s": wait}
            try:
                taken = core.take(store, vm, keep=keep)
                row |= {
                    "id": taken.record.id,
                    "kind": taken.record.kind,
                    "new_bytes": taken.record.new_bytes,
                    "pause_s": taken.record.pause_ms / 1000,
                }
                if to is not None:
                    pushed = remote.push(store, vm, to, taken.record.id)
                    row |= {"host": to, "bytes_sent": pushed["bytes_sent"]}
            except NotFound:
                raise
            except UnionimgError as exc:
                row["error"] = str(exc)
            wait = policy.interval(cpu_load, low, high)
            row["next_s"] = round(wait, 1)
            rounds.append(row)
            line = " ".join(f"{k}={v}" for k, v in row.items())
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            say(line)
    return rounds
