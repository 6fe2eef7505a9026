"""The demo's migration section (issue 14): a VM moved to a host over SSH, sending only the
content the host has nowhere, then back after a small change.

``run(rootfs)`` (wired into ``dev/demo.py`` by the lead): its own base from the demo's tiny
busybox tree; host ``laptop`` a network namespace with its own sshd and store, holding the
same base; the way back through a second namespace host whose sshd serves this store.
Prints what it does, raises (SystemExit) on any failure; about 30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dev.demo import STORE, STORE_DIR, UNIONIMG, cli, say


def _fail(why: str) -> None:
    print(f"demo: {why}", file=sys.stderr)
    raise SystemExit(1)


def _host_cli(store: Path, *args: str) -> str:
    print(f"$ unionimg --store {store} {' '.join(args)}", flush=True)
    res = subprocess.run(
        [UNIONIMG, "--store", str(store), *args], capture_output=True, text=True, check=False
    )
    print((res.stdout + res.stderr).rstrip(), flush=True)
    if res.returncode != 0:
        _fail(f"'unionimg {' '.join(args)}' on {store} exited {res.returncode}")
    return res.stdout


def _write(store: Path | None, vm: str, files: dict[str, bytes]) -> None:
    mnt = STORE / "mnt" / f"mig-{vm}"
    mnt.mkdir(parents=True, exist_ok=True)
    run = cli if store is None else (lambda *a: _host_cli(store, *a))
    run("mount", vm, str(mnt))
    try:
        for rel, data in files.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(data)
    finally:
        run("umount", str(mnt))


def run(rootfs: Path) -> None:
    from vm_fixtures.nethosts import Lab

    say("migrate: a VM of its own base, with 1 MB of data and an edited binary")
    cli("base", "create", "mig", "--from-dir", str(rootfs))
    cli("instance", "create", "mover", "--base", "mig", "--mac", "52:54:00:14:de:01",
        "--hypervisor", "uml", "--size", "64M")  # fmt: skip
    busybox = (rootfs / "bin" / "busybox").read_bytes() + os.urandom(4096)  # still runs
    _write(None, "mover", {
        "srv/data.bin": os.urandom(1 << 20), "bin/busybox": bytes(busybox),
        "etc/motd": b"the mover\n",
    })  # fmt: skip

    lab = Lab(STORE / "lab-migrate")
    try:
        laptop = lab.add_host("laptop")
        say("host 'laptop': a namespace with its own sshd and store, holding the same base")
        _host_cli(laptop.store, "instance", "list")
        subprocess.run(["cp", "-a", str(STORE_DIR / "bases" / "mig"),
                        str(laptop.store / "bases" / "mig")], check=True)  # fmt: skip
        laptop.authorize(cli("host", "key", quiet=True).strip())
        cli("host", "add", "laptop", "--ssh", f"root@{laptop.addr}", "--store",
            str(laptop.store), "--unionimg", UNIONIMG, "--host-key",
            str(laptop.host_key_pub))  # fmt: skip

        say("--dry-run: what would be sent, and why (found in the base, or new)")
        cli("migrate", "mover", "--to", "laptop", "--dry-run")
        say("migrate: the laptop verifies every file by hash and makes the VM; then it leaves")
        before = laptop.counters()["rx_bytes"]
        out = json.loads(cli("migrate", "mover", "--to", "laptop", "--json"))
        wire = laptop.counters()["rx_bytes"] - before
        held, deltas = out["plan"]["file_bytes"], out["deltas"]
        print(f"bytes received by the laptop: {wire:,} (its upper layer holds {held:,}; "
              f"changed files sent as deltas: {deltas})")  # fmt: skip
        if not (1 << 20) <= wire < (1 << 20) + 300_000:
            _fail(f"the migration sent {wire} bytes, not about the 1 MB the laptop lacked")
        there = json.loads(_host_cli(laptop.store, "instance", "show", "mover", "--json"))
        if there["mac"] != "52:54:00:14:de:01":
            _fail("the VM did not keep its MAC")
        if "mover" in cli("instance", "list", quiet=True):
            _fail("the VM is still here")

        say("the way back, after a small change on the laptop: only the change travels")
        back = lab.add_host("back")
        back.store = STORE_DIR
        back.authorize(_host_cli(laptop.store, "host", "key").strip())
        _host_cli(laptop.store, "host", "add", "home", "--ssh", f"root@{back.addr}",
                  "--store", str(STORE_DIR), "--unionimg", UNIONIMG, "--host-key",
                  str(back.host_key_pub))  # fmt: skip
        _write(laptop.store, "mover", {"etc/motd": b"edited on the laptop\n"})
        before = back.counters()["rx_bytes"]
        _host_cli(laptop.store, "migrate", "mover", "--to", "home")
        wire = back.counters()["rx_bytes"] - before
        print(f"bytes received on the way back: {wire:,}")
        if wire > 100_000:
            _fail(f"the way back sent {wire} bytes; the 1 MB file should have stayed here")
        cli("instance", "show", "mover")
    finally:
        lab.close()
