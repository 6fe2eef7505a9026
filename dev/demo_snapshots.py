"""Demo section of issue 16: differential snapshots of a running guest, restored with its
memory state. Run by ``dev/demo.py`` (``run(rootfs)``), or alone as root::

    .venv/bin/python -m dev.demo_snapshots   # uses the demo's tiny busybox tree

A busybox guest under QEMU TCG (through libvirt) counts on its console; ``snapshot take``
saves its memory and U as chunks; a second take of the same, nearly idle guest adds a small
fraction of the first; the guest is pulled (``stop --force``: the host "failed") and
``restore`` brings it back from the first snapshot: the counter continues from the
snapshot's value, not from 1. The demo fails if either does not hold. About a minute.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from dev.demo import STORE, cli, say

VM = "snapvm"
COUNTER = """#!/bin/sh
i=0
while :; do i=$((i+1)); echo "unionimg-guest: count $i"; sleep 0.2; done
"""
COUNT = re.compile(r"unionimg-guest: count (\d+)")


def _counts() -> list[int]:
    return [int(n) for n in COUNT.findall(cli("console", VM, quiet=True))]


def _wait(at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _counts()
        if seen and seen[-1] >= at_least:
            return seen[-1]
        time.sleep(0.5)
    print(f"demo: the guest's counter did not reach {at_least}", file=sys.stderr)
    raise SystemExit(1)


def _fail(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr)
    cli("stop", VM, "--force", ok=(0, 4, 9), quiet=True)
    raise SystemExit(1)


def run(rootfs: Path) -> None:
    say("snapshots (issue 16): a guest that counts on its console, under QEMU through libvirt")
    cli("base", "create", "snapbase", "--from-dir", str(rootfs))
    cli("instance", "create", VM, "--base", "snapbase", "--memory", "128", "--size", "256M")
    mnt = STORE / "mnt" / VM
    mnt.mkdir(parents=True, exist_ok=True)
    cli("mount", VM, str(mnt))
    hook = mnt / "etc" / "unionimg-boot.d" / "50-count"
    hook.write_text(COUNTER)
    hook.chmod(0o755)
    cli("umount", str(mnt))
    cli("boot", VM, "--hypervisor", "kvm")
    try:
        _wait(10)
        say("snapshot take: memory + U at one point, the guest paused briefly and running on")
        before = _counts()[-1]
        first = json.loads(cli("snapshot", "take", VM, "--json"))
        after = _counts()[-1]
        print(f"counter {before}..{after} around the take; guest paused {first['pause_s']} s")
        _wait(after + 15)
        say("a second snapshot of the same guest stores only what changed")
        second = json.loads(cli("snapshot", "take", VM, "--json"))
        cli("snapshot", "list", VM)
        if not second["new_bytes"] < first["new_bytes"] / 10:
            _fail("the second snapshot was not a small fraction of the first")
        failed_at = _wait(after + 30)
        say(f"the host 'fails' at count {failed_at}: the guest is pulled")
        cli("stop", VM, "--force")
        say("restore from snapshot 1: the counter continues from the snapshot, not from 1")
        cli("restore", VM, "--at", "1")
        _wait(1)
        seen = _counts()
        print(f"after the restore the console counts {seen[:3]}...")
        if not (before <= seen[0] - 1 <= after + 1 and seen[0] < failed_at):
            _fail(f"the counter did not continue from {before}..{after} (saw {seen[:3]})")
    finally:
        cli("stop", VM, "--force", ok=(0, 4, 9), quiet=True)


if __name__ == "__main__":
    from vm_fixtures import build

    run(build("tiny"))
