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
   restore faster than the cold boot.
3. **guest slowdown**: the guest's CPU-bound counter (a shell loop beside the load, so the
   guest is busy) in iterations per second with no schedule, then with
   ``snapshot schedule`` at the adaptive default (``--min 30s --max 10m``), and at fixed
   30 s and 5 min (``--min = --max``), each for ``--slowdown-window`` s. Goal: < 5 % at the
   default schedule.

Run as root (the full run takes tens of minutes on 2 shared cores)::

    .venv/bin/python bench/snapshots.py            # 256 MiB and 1 GiB guests
    .venv/bin/python bench/snapshots.py --quick    # one 128 MiB guest, short windows, the
                                                   # schedules scaled to 5 s / 60 s (~6 min)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vm_fixtures import build  # noqa: E402

UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
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


def sh(*args: str, timeout: float = 1800) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


class Uimg:
    def __init__(self, store: Path) -> None:
        self.store = store

    def __call__(self, *args: str, timeout: float = 1800) -> str:
        return sh(str(UNIONIMG), "--store", str(self.store), *args, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json"))


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


def rate(u: Uimg, vm: str, seconds: float) -> float:
    """The guest's counter: iterations per second over ``seconds``."""
    a, t0 = spins(u, vm), time.monotonic()
    time.sleep(seconds)
    b, t1 = spins(u, vm), time.monotonic()
    return (b - a) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small guest, short windows")
    ap.add_argument("--memory", type=int, nargs="*", help="guest sizes, MiB")
    ap.add_argument("--fill", type=int, default=None, help="working set, %% of guest memory")
    ap.add_argument("--dirty-mb", type=int, default=1, help="MiB/s of memory rewritten")
    ap.add_argument("--disk-kb", type=int, default=64, help="KiB/s written to disk")
    ap.add_argument("--window", type=float, default=None, help="seconds between snapshots")
    ap.add_argument("--slowdown-window", type=float, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the store (printed)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the guest on a kill
    sizes = args.memory or ([128] if args.quick else [256, 1024])
    fill_pct = args.fill or (25 if args.quick else 50)  # a 128 MiB guest OOMs at 50 %
    window = args.window or (10.0 if args.quick else 30.0)
    slow_window = args.slowdown_window or (40.0 if args.quick else 600.0)
    schedules = (
        [("adaptive 5s-60s", "5s", "60s"), ("fixed 5s", "5s", "5s"), ("fixed 60s", "60s", "60s")]
        if args.quick
        else [("adaptive 30s-10m", "30s", "10m"), ("fixed 30s", "30s", "30s"),
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
            # slowdown of the load under schedules
            # the machine is shared: each schedule is compared with the rate measured just
            # before it, alone
            for label, lo, hi in schedules:
                base_rate = rate(u, vm, slow_window / 2)
                row[f"spin_per_s alone before {label}"] = round(base_rate, 3)
                proc = subprocess.Popen(
                    [str(UNIONIMG), "--store", str(u.store), "snapshot", "schedule", vm,
                     "--min", lo, "--max", hi, "--keep", "2", "--for", f"{slow_window:.0f}s"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                sched_rate = rate(u, vm, slow_window)
                out, _err = proc.communicate(timeout=slow_window + 600)
                row[f"spin_per_s {label}"] = round(sched_rate, 3)
                row[f"slowdown {label}"] = round(1 - sched_rate / base_rate, 3)
                row[f"snapshots {label}"] = len(out.strip().splitlines())
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
