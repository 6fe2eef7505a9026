"""Snapshots on the Debian fixture (issue 16; the project's rule: every capability on Debian):
a systemd-booted Debian guest under QEMU TCG runs a counter service printing to the console;
``snapshot take`` saves its memory and U; a second take adds a small fraction; the guest is
pulled and ``restore`` resumes it: the counter (and systemd with it) continues from the
snapshot's value. Gated like the other Debian tests (UNIONIMG_TEST_DEBIAN=1 or
UNIONIMG_REQUIRE_REAL=1): minutes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_REAL, Cli, need
from tests.test_boot_real import need_guests
from tests.test_snapshots_real import counts, searchable, wait_count
from unionimg.fs.mounts import unmount_tree

pytestmark = pytest.mark.usefixtures("root")

COUNTER = """#!/bin/sh
i=0
while :; do i=$((i+1)); echo "unionimg-guest: count $i" >/dev/console; sleep 0.5; done
"""
UNIT = """[Unit]
Description=unionimg snapshot test counter

[Service]
ExecStart=/usr/local/bin/snapcounter

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1" or REQUIRE_REAL,
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    need_guests()
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("snapdeb")
    searchable(tmp)
    cli = Cli(tmp / "store")
    try:
        cli.ok("base", "create", "deb", "--from-dir", str(build("debian")))
        yield cli
    finally:
        for inst in json.loads(cli.ok("instance", "list", "--json").output):
            cli("stop", inst["name"], "--force")
            cli("instance", "remove", inst["name"])
        unmount_tree(tmp)


def test_debian_guest_resumes_from_its_memory(deb: Cli, tmp_path: Path) -> None:
    cli = deb
    cli.ok("instance", "create", "d1", "--base", "deb", "--memory", "384", "--size", "1G")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "d1", str(mnt))
    try:
        prog = mnt / "usr/local/bin/snapcounter"
        prog.parent.mkdir(parents=True, exist_ok=True)
        prog.write_text(COUNTER)
        prog.chmod(0o755)
        unit = mnt / "etc/systemd/system/snapcounter.service"
        unit.write_text(UNIT)
        wants = mnt / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "snapcounter.service").symlink_to("/etc/systemd/system/snapcounter.service")
    finally:
        cli.ok("umount", str(mnt))
    t0 = time.monotonic()
    cli.ok("boot", "d1", "--hypervisor", "kvm")
    wait_count(cli, "d1", 5, timeout=600)
    cold = time.monotonic() - t0
    before = counts(cli, "d1")[-1]
    first = json.loads(cli.ok("snapshot", "take", "d1", "--json").output)
    after = counts(cli, "d1")[-1]
    assert first["kind"] == "memory+disk" and first["pause_s"] < 10, first
    wait_count(cli, "d1", after + 4, timeout=120)
    second = json.loads(cli.ok("snapshot", "take", "d1", "--json").output)
    assert second["new_bytes"] < first["new_bytes"] / 5, (first, second)
    failed_at = wait_count(cli, "d1", after + 20, timeout=180)
    cli.ok("stop", "d1", "--force")
    t0 = time.monotonic()
    out = json.loads(cli.ok("restore", "d1", "--at", "1", "--json").output)
    assert out["state"] == "running"
    wait_count(cli, "d1", 1, timeout=120)
    restored = time.monotonic() - t0
    seen = counts(cli, "d1")
    assert before <= seen[0] - 1 <= after + 1 and seen[0] < failed_at, (before, after, seen[:5])
    wait_count(cli, "d1", seen[0] + 3, timeout=120)
    print(
        f"debian guest: cold boot to its counter {cold:.1f} s, restore to its counter "
        f"{restored:.1f} s; snapshot 1 {first['new_bytes']} new bytes ({first['seconds']} s, "
        f"paused {first['pause_s']} s), snapshot 2 {second['new_bytes']} new bytes"
    )
    assert restored < cold
    cli.ok("stop", "d1", "--force")
