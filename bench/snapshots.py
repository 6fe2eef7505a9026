"""Snapshot benchmark (issue 16): differential VM snapshots under QEMU TCG (through libvirt).

The busybox guest runs a load program (a boot hook in its own layer): it fills a tmpfs with
``--fill`` % of the guest's memory once, then every second rewrites ``--dirty-mb`` MiB of it
and ``--disk-kb`` KiB of a file on its disk (random bytes: incompressible, so stored bytes
are not flattered by compression), printing ``unionimg-guest: load N`` per round. Measured:

1. **stored vs dirtied**: snapshot, let the load run ``--window`` s, snapshot again: the
   second's new bytes in the store vs the distinct bytes the guest dirtied meanwhile
   (memory rewritten + disk written; the guest's own kernel and page-cache churn comes on
   top). Goal: within 2x.
2. **take and restore time vs memory size** (the paper's Fig. 4/5), per ``--memory`` size:
   the take (and how long the guest was paused), a restore after the guest is pulled, and
   the cold boot of the same VM to its init (the failover the paper times at 48 s). Goal:
   restore faster than the cold boot. Before them, ``--pause-reps`` takes of each way of
   taking (:data:`TAKE_MODES`: the live take, the live take with libvirt making the overlay,
   the paused take of before), in turn: the guest's pause of each (``--pause-only`` stops
   there).
3. **guest slowdown**: the guest's CPU-bound counter (a shell loop beside the load, so the
   guest is busy) in windows of ``--slowdown-window`` s, alone and with ``snapshot schedule``
   running, interleaved (``--reps`` pairs, the order alternating) for the adaptive default
   (``--min 30s --max 10m``) and fixed 30 s and 5 min (``--min = --max``). Per pair: the
   wall-clock slowdown (on a shared machine mostly the other tenants' load), the slowdown per
   second of vCPU time the guest had (host contention cancels out), the share of the window
   the guest was paused, and ``estimate`` = 1 - (1 - per vCPU s) x (1 - paused share): the
   slowdown on a host with a core free for the snapshot's own work. Median, min and max of
   each. Goal: < 5 % at the default schedule.
4. **per-take cost** (``--take-pairs``, before 3): pairs of ``--take-window`` s windows, one
   beginning with a ``snapshot take``, one without (the order alternating): a window with
   its take *is* a fixed schedule of that interval (30 s by default: the densest the
   default schedule ever takes), so its slowdown is measured directly, with many short pairs
   rather than a few long windows, so that the machine's noise averages out (its spread is
   printed). The lost counter seconds per take then give fixed 5 min and the adaptive default
   at the interval its policy sets for the measured load. ``--no-schedules`` skips 3.

Run as root (the full run takes tens of minutes on 2 shared cores)::

    .venv/bin/python bench/snapshots.py            # 256 MiB and 1 GiB guests
    .venv/bin/python bench/snapshots.py --quick    # one 128 MiB guest, short windows, the
                                                   # schedules scaled to 5 s / 60 s (~6 min)
    .venv/bin/python bench/snapshots.py --no-schedules   # 256 MiB and 1 GiB, per-take
                                                         # cost only (~35 min)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import UNIONIMG, Uimg  # noqa: E402
from unionimg.snapshots import policy  # noqa: E402
from vm_fixtures import build  # noqa: E402

LOAD = re.compile(r"unionimg-guest: load (\d+)")
SPIN = re.compile(r"unionimg-guest: spin (\d+)")

LOAD_HOOK = """#!/bin/sh
# the benchmark's load: a tmpfs working set, rewritten DIRTY MiB/s; DISK KiB/s to the disk
. /etc/bench-load.conf
mkdir -p /run/load /var/tmp
mount -t tmpfs -o size=95% tmpfs /run/load
dd if=/dev/urandom of=/run/load/set bs=1M count=$FILL 2>/dev/null
d=$DIRTY; [ "$d" -gt 0 ] || d=1
slots=$((FILL / d)); [ "$slots" -gt 0 ] || slots=1
# the guest's work: a CPU-bound counter whose rate shows how much snapshots slow it
( n=0; while :; do n=$((n+1)); [ $((n % 2000)) -ne 0 ] || echo "unionimg-guest: spin $n"; done ) &
i=0
while :; do
  start=$(date +%s)
  if [ "$DIRTY" -gt 0 ]; then
    dd if=/dev/urandom of=/run/load/set bs=1M count=$DIRTY seek=$(( (i % slots) * DIRTY )) \\
      conv=notrunc 2>/dev/null
  fi
  if [ "$DISK" -gt 0 ]; then
    dd if=/dev/urandom of=/var/tmp/disk bs=1k count=$DISK seek=$(( (i % 64) * DISK )) \\
      conv=notrunc 2>/dev/null
    sync
  fi
  echo "unionimg-guest: load $i"
  i=$((i+1))
  [ "$(date +%s)" -gt "$start" ] || sleep 1
done
"""


def rounds(u: Uimg, vm: str) -> list[int]:
    return [int(m) for m in LOAD.findall(u("console", vm))]


def wait_rounds(u: Uimg, vm: str, n: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = rounds(u, vm)
        if seen and seen[-1] >= n:
            return seen[-1]
        time.sleep(1)
    raise SystemExit(f"{vm}: the load did not reach round {n} in {timeout:.0f} s")


def make_vm(u: Uimg, vm: str, memory: int, conf: dict[str, int], tmp: Path) -> None:
    u("instance", "create", vm, "--base", "tiny", "--memory", str(memory), "--size", "1G")
    mnt = tmp / f"mnt-{vm}"
    mnt.mkdir()
    u("mount", vm, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/50-load"
        hook.write_text(LOAD_HOOK)
        hook.chmod(0o755)
        (mnt / "etc/bench-load.conf").write_text("".join(f"{k}={v}\n" for k, v in conf.items()))
    finally:
        u("umount", str(mnt))


def spins(u: Uimg, vm: str) -> int:
    found = SPIN.findall(u("console", vm)[-4000:])
    return int(found[-1]) if found else 0


def vcpu_seconds(u: Uimg, vm: str) -> float:
    """The CPU time the guest's vCPU threads have had (libvirt): what the guest ran, whatever
    else the host's cores did meanwhile."""
    import libvirt

    from unionimg.layers.running import read_running
    from unionimg.store.layout import Store

    rec = read_running(Store(u.store), vm)
    assert rec is not None and rec.domain, f"{vm} does not run under kvm"
    conn = libvirt.open("qemu:///system")
    try:
        return float(sum(v[2] for v in conn.lookupByName(rec.domain).vcpus()[0])) / 1e9
    finally:
        conn.close()


class Rate(NamedTuple):
    """The guest's counter over a window."""

    wall: float  # iterations per wall second
    per_vcpu_s: float  # per second of vCPU time the guest had (host contention cancels out)
    load: float  # the guest's CPU load meanwhile (as the schedule's policy measures it)


def rate(u: Uimg, vm: str, seconds: float, first: Callable[[], object] | None = None) -> Rate:
    """The guest's counter over ``seconds``; ``first`` (a snapshot take) runs at the start,
    inside the window."""
    a, c0, t0 = spins(u, vm), vcpu_seconds(u, vm), time.monotonic()
    if first is not None:
        first()
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    b, c1, t1 = spins(u, vm), vcpu_seconds(u, vm), time.monotonic()
    return Rate((b - a) / (t1 - t0), (b - a) / max(c1 - c0, 1e-9), policy.load(c1 - c0, t1 - t0, 1))


#: the ways of taking compared: the live take (the default), the live take with the overlay
#: made by libvirt inside the pause, and the paused take of before
TAKE_MODES = {
    "live": {},
    "live, overlay made by libvirt": {"UNIONIMG_SNAPSHOT_OVERLAY": "libvirt"},
    "paused": {"UNIONIMG_SNAPSHOT_MODE": "paused"},
}


def pause_compare(u: Uimg, vm: str, reps: int) -> dict[str, Any]:
    """Takes of each of :data:`TAKE_MODES` in turn (the order rotating), ``reps`` each: the
    guest's pause and the take's time."""
    got: dict[str, list[tuple[float, float]]] = {m: [] for m in TAKE_MODES}
    modes = list(TAKE_MODES)
    for i in range(reps):
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            t = u.json("snapshot", "take", vm, "--keep", "2", env=TAKE_MODES[mode])
            got[mode].append((t["pause_s"], t["seconds"]))
            time.sleep(2)
    return {
        mode: {
            "pause_s": [p for p, _ in rows],
            "pause_median_s": round(statistics.median(p for p, _ in rows), 3),
            "take_s": [round(s, 2) for _, s in rows],
        }
        for mode, rows in got.items()
    }


def schedule_window(u: Uimg, vm: str, lo: str, hi: str, window: float) -> tuple[Rate, list[float]]:
    """The counter's rates over ``window`` s with ``snapshot schedule`` running; the pause
    of each snapshot it took."""
    proc = subprocess.Popen(
        [str(UNIONIMG), "--store", str(u.store), "snapshot", "schedule", vm,
         "--min", lo, "--max", hi, "--keep", "2", "--for", f"{window:.0f}s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    got = rate(u, vm, window)
    out, _err = proc.communicate(timeout=window + 600)
    pauses = [float(m) for m in re.findall(r"pause_s=([0-9.]+)", out)]
    return got, pauses


def slowdown(u: Uimg, vm: str, lo: str, hi: str, window: float, reps: int) -> dict[str, Any]:
    """Interleaved windows, alone and with the schedule (order alternating), ``reps`` pairs.
    Per pair: the wall-clock slowdown (what a user sees, but on a shared machine mostly the
    other tenants' load), the slowdown per vCPU second (the guest's own work made slower:
    TCG's dirty tracking while memory is written), the share of the window the guest was
    paused, and their product — the slowdown on a host with a core free for the snapshot's
    own work (libvirt's write, chunking)."""
    rows: list[dict[str, float]] = []
    for i in range(reps):
        got: dict[str, Rate] = {}
        pauses: list[float] = []
        for what in ("alone", "sched") if i % 2 == 0 else ("sched", "alone"):
            if what == "alone":
                got["alone"] = rate(u, vm, window)
            else:
                got["sched"], pauses = schedule_window(u, vm, lo, hi, window)
        (wa, ca, _), (ws, cs, _) = got["alone"], got["sched"]
        pause_share = sum(pauses) / window
        per_cpu = 1 - cs / ca
        rows.append({
            "wall": round(1 - ws / wa, 3),
            "per_vcpu_s": round(per_cpu, 3),
            "pause_share": round(pause_share, 4),
            "estimate": round(1 - (1 - per_cpu) * (1 - pause_share), 3),
            "snapshots": len(pauses),
            "spin_per_s_alone": round(wa, 1),
            "spin_per_s_sched": round(ws, 1),
        })  # fmt: skip

    def spread(key: str) -> dict[str, float]:
        vals = [r[key] for r in rows]
        return {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals)}

    return {"pairs": rows, **{k: spread(k) for k in ("wall", "per_vcpu_s", "estimate")}}


def per_take(u: Uimg, vm: str, window: float, pairs: int) -> dict[str, Any]:
    """The cost of one snapshot to the guest, in seconds of its counter's progress: pairs of
    ``window``-s windows, one beginning with a ``snapshot take`` (the schedule's take), one
    without (the order alternating). A window with its take is exactly a fixed schedule of
    interval ``window``, so its slowdown is measured directly; a schedule of interval I
    costs the guest ``cost / I`` (cost = the lost counter seconds), which gives the adaptive
    default at the interval its policy sets for the load measured here, and fixed 5 min.
    Many short pairs, not a few long windows: the other tenants' noise averages out."""
    rows: list[dict[str, float]] = []
    alone: list[Rate] = []  # the windows without a take: the guest's load, and the noise
    pauses: list[float] = []

    def take() -> None:
        pauses.append(float(u.json("snapshot", "take", vm, "--keep", "2")["pause_s"]))

    for i in range(pairs):
        got: dict[str, Rate] = {}
        for what in ("alone", "take") if i % 2 == 0 else ("take", "alone"):
            got[what] = rate(u, vm, window, take if what == "take" else None)
        alone.append(got["alone"])
        (wa, ca, _), (wt, ct, _) = got["alone"], got["take"]
        rows.append({
            "wall": round(1 - wt / wa, 4), "per_vcpu_s": round(1 - ct / ca, 4),
            "pause_s": round(pauses[-1], 3),
        })  # fmt: skip
    wall = statistics.median(r["wall"] for r in rows)
    per_cpu = statistics.median(r["per_vcpu_s"] for r in rows)
    cost_s = max(wall, 0.0) * window  # counter seconds one take costs (wall clock)
    load_now = statistics.median(r.load for r in alone)
    lo = policy.parse_duration(policy.DEFAULT_MIN, "--min")
    hi = policy.parse_duration(policy.DEFAULT_MAX, "--max")
    adaptive = policy.interval(load_now, lo, hi)  # the default schedule at this load
    return {
        "window_s": window,
        "pairs": rows,
        "wall": {
            "median": round(wall, 4),
            "min": min(r["wall"] for r in rows),
            "max": max(r["wall"] for r in rows),
        },
        "per_vcpu_s_median": round(per_cpu, 4),
        "noise: spread of the windows without a take (stdev / mean)": round(
            statistics.pstdev(r.wall for r in alone) / statistics.mean(r.wall for r in alone), 4
        ),
        "cost_per_take_s": round(cost_s, 3),
        "guest_load": round(load_now, 3),
        # fixed 30 s is also the default's densest (an idle guest's) interval
        "slowdown fixed 30s (direct when window = 30)": round(cost_s / lo, 4),
        "slowdown fixed 5m": round(cost_s / 300.0, 4),
        f"slowdown default adaptive (interval {adaptive:.0f} s at this load)": round(
            cost_s / adaptive, 4
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small guest, short windows")
    ap.add_argument("--memory", type=int, nargs="*", help="guest sizes, MiB")
    ap.add_argument("--fill", type=int, default=None, help="working set, %% of guest memory")
    ap.add_argument("--dirty-mb", type=int, default=1, help="MiB/s of memory rewritten")
    ap.add_argument("--disk-kb", type=int, default=64, help="KiB/s written to disk")
    ap.add_argument("--window", type=float, default=None, help="seconds between snapshots")
    ap.add_argument("--slowdown-window", type=float, default=None)
    ap.add_argument("--reps", type=int, default=None, help="interleaved pairs per schedule")
    ap.add_argument("--pause-reps", type=int, default=3, help="takes per mode, live/paused")
    ap.add_argument("--pause-only", action="store_true", help="only live vs paused takes")
    ap.add_argument("--keep", action="store_true", help="keep the store (printed)")
    ap.add_argument(
        "--take-pairs",
        type=int,
        default=None,
        help="pairs of windows with and without one take (per-take cost)",
    )
    ap.add_argument(
        "--take-window",
        type=float,
        default=30.0,
        help="seconds per window of the per-take pairs (30: fixed 30 s)",
    )
    ap.add_argument(
        "--no-schedules",
        action="store_true",
        help="skip the long windows with 'snapshot schedule' running",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the guest on a kill
    sizes = args.memory or ([128] if args.quick else [256, 1024])
    fill_pct = args.fill or (25 if args.quick else 50)  # a 128 MiB guest OOMs at 50 %
    window = args.window or (10.0 if args.quick else 30.0)
    slow_window = args.slowdown_window or (30.0 if args.quick else 600.0)
    reps = args.reps or (2 if args.quick else 3)
    take_pairs = args.take_pairs or (4 if args.quick else 12)
    schedules = (
        [("adaptive 5s-60s", "5s", "60s"), ("fixed 5s", "5s", "5s"), ("fixed 60s", "60s", "60s")]
        if args.quick
        else [(f"adaptive {policy.DEFAULT_MIN}-{policy.DEFAULT_MAX}", policy.DEFAULT_MIN,
               policy.DEFAULT_MAX), ("fixed 30s", "30s", "30s"),
              ("fixed 5m", "5m", "5m")]
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-snap-"))
    tmp.chmod(0o711)
    u = Uimg(tmp / "store")
    results: dict[str, Any] = {"window_s": window, "dirty_mb_s": args.dirty_mb,
                               "disk_kb_s": args.disk_kb, "sizes": {}}  # fmt: skip
    try:
        u("base", "create", "tiny", "--from-dir", str(build("tiny")))
        for mem in sizes:
            vm = f"load{mem}"
            fill = mem * fill_pct // 100
            make_vm(u, vm, mem, {"FILL": fill, "DIRTY": args.dirty_mb, "DISK": args.disk_kb}, tmp)
            row: dict[str, Any] = {"fill_mib": fill}
            t0 = time.monotonic()
            u("boot", vm, "--hypervisor", "kvm", timeout=600)
            row["cold_boot_ready_s"] = round(time.monotonic() - t0, 2)
            wait_rounds(u, vm, 3)
            row["cold_boot_to_load_s"] = round(time.monotonic() - t0, 2)
            row["pause live vs paused"] = pause_compare(u, vm, args.pause_reps)
            if args.pause_only:
                u("stop", vm, "--force")
                results["sizes"][str(mem)] = row
                print(json.dumps({str(mem): row}, indent=2), flush=True)
                continue
            first = u.json("snapshot", "take", vm)
            r0 = rounds(u, vm)[-1]
            time.sleep(window)
            second = u.json("snapshot", "take", vm)
            r1 = rounds(u, vm)[-1]
            n = r1 - r0 + 1  # rounds that ran between the two takes (at most)
            dirtied = min(n * args.dirty_mb, fill) * (1 << 20) + min(n, 64) * args.disk_kb * 1024
            row |= {
                "first": {k: first[k] for k in ("data_bytes", "new_bytes", "pause_s", "seconds")},
                "second": {k: second[k] for k in ("data_bytes", "new_bytes", "pause_s", "seconds")},
                "rounds_between": n,
                "dirtied_bytes": dirtied,
                "stored_over_dirtied": round(second["new_bytes"] / max(dirtied, 1), 2),
            }
            # restore vs cold boot: the guest pulled, then back from the latest snapshot
            u("stop", vm, "--force")
            t0 = time.monotonic()
            u.json("restore", vm)
            row["restore_s"] = round(time.monotonic() - t0, 2)
            wait_rounds(u, vm, r1 + 1, timeout=120)
            row["restore_to_load_s"] = round(time.monotonic() - t0, 2)
            # the cost of one take to the guest's counter, in pairs of windows with and
            # without one (the machine may be shared: the spread is reported)
            row["per take"] = per_take(u, vm, args.take_window, take_pairs)
            print(json.dumps({str(mem): {"per take": row["per take"]}}, indent=2), flush=True)
            # and under each real schedule: interleaved windows alone and with it
            for label, lo, hi in [] if args.no_schedules else schedules:
                row[f"slowdown {label}"] = slowdown(u, vm, lo, hi, slow_window, reps)
            u("stop", vm, "--force")
            results["sizes"][str(mem)] = row
            print(json.dumps({str(mem): row}, indent=2), flush=True)
        print(json.dumps(results, indent=2))
    finally:
        for inst in json.loads(u("instance", "list", "--json")):
            subprocess.run([str(UNIONIMG), "--store", str(u.store), "stop", inst["name"],
                            "--force"], capture_output=True, check=False)  # fmt: skip
            subprocess.run([str(UNIONIMG), "--store", str(u.store), "instance", "remove",
                            inst["name"]], capture_output=True, check=False)  # fmt: skip
        if args.keep:
            print(f"store kept: {u.store}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
