"""The consistency checks before the swap on the real Debian fixture (issue 12, item 1).

Three VMs of one base (the Debian fixture), changed through ``unionimg mount`` with the
host's tools, then one base update (a system user, ``base update --run``):

* ``broken``: its dpkg database says it installed ``uimg-local`` (list and md5sums present,
  so ``dpkg --audit`` has nothing to say) which depends on ``uimg-missing``, installed
  nowhere: ``apt-get check`` says so, the VM stays whole on generation 1 with apt's words;
* ``good``: a login user made with Debian's ``useradd --root -m``: the user databases are in
  its layer, so the checks run, and pass (the base's own ``pwck -r`` problems do not
  count): it reconciles;
* ``plain``: an edited ``/etc/motd`` only: no program runs ("checks: not needed").

The cost of the checks per VM is printed (``-s``): the time in the ``checks`` note of the
report.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, need, need_programs, need_root
from unionimg.fs.manifest import scan_tree
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.reconcile.checks import NOT_NEEDED

LOCAL = (
    "Package: uimg-local\nStatus: install ok installed\nPriority: optional\nSection: misc\n"
    "Maintainer: unionimg tests <tests@example.org>\nArchitecture: all\nVersion: 1.0\n"
    "Depends: uimg-missing (>= 2)\nDescription: a package whose dependency is nowhere\n"
)


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, Any]
    code: int
    output: str
    before: list[Any]  # the broken VM's union before reconcile


def union_state(cli: Cli, vm: str, mnt: Path) -> list[Any]:
    """The union of ``vm`` as its guest would see it: every entry (type, mode, owner, size,
    target) and the content of dpkg's status and the user databases."""
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        entries = scan_tree(mnt, hash_files=False, digests=False)
        sums = [
            hashlib.sha256((mnt / p).read_bytes()).hexdigest()
            for p in ("var/lib/dpkg/status", "etc/passwd", "etc/group", "etc/shadow")
        ]
        return [entries, sums]
    finally:
        cli.ok("umount", str(mnt))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need_root()
    need_programs("dpkg", "apt-get", "pwck", "grpck", "useradd", "setpriv", "unshare", "chroot")
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("checks")
    cli = Cli(tmp / "store")
    try:
        rootfs = build("debian")
        cli.ok("base", "create", "deb", "--from-dir", str(rootfs))
        for vm in ("broken", "good", "plain"):
            cli.ok("instance", "create", vm, "--base", "deb")
            mnt = tmp / f"mnt-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt))
            try:
                if vm == "broken":
                    info = mnt / "var/lib/dpkg/info"
                    (info / "uimg-local.list").write_text("/.\n/usr\n/usr/share\n")
                    (info / "uimg-local.md5sums").write_text("")
                    status = mnt / "var/lib/dpkg/status"
                    status.write_text(status.read_text() + "\n" + LOCAL)
                elif vm == "good":
                    done = subprocess.run(
                        ["useradd", "--root", str(mnt), "-m", "-s", "/bin/bash", "bob"],
                        capture_output=True, text=True, timeout=120, check=False,
                    )  # fmt: skip
                    assert done.returncode == 0, done.stderr
                else:
                    (mnt / "etc/motd").write_text("the plain VM\n")
            finally:
                cli.ok("umount", str(mnt))
        cli.ok(
            "base", "update", "deb", "--run",
            "useradd --system --home-dir /nonexistent --no-create-home svcd",
        )  # fmt: skip
        before = union_state(cli, "broken", tmp / "look")
        res = cli("reconcile", "--all", "--json", "--jobs", "1")
        report = {i["name"]: i for i in json.loads(res.output)["instances"]}
        text = cli("reconcile", "broken")  # the same refusal again, as text
        yield World(cli, tmp, report, res.exit_code, text.output, before)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


@pytest.mark.slow
def test_inconsistent_vm_stays_whole_with_apts_words(world: World) -> None:
    assert world.code == 10  # an instance failed
    r = world.report["broken"]
    assert (r["status"], r["applied"], r["to_generation"]) == ("error", False, 2)
    assert r["error"].startswith(
        "the staged result fails the consistency checks; the instance stays on generation 1"
    )
    assert "uimg-local : Depends: uimg-missing (>= 2) but it is not installable" in r["error"]
    assert "apt-get check: " in r["error"] and "dpkg --audit" not in r["error"], r["error"]
    assert r["checks"].startswith("failed (dpkg --audit, apt-get check, pwck -r, grpck -r")
    show = json.loads(world.cli.ok("instance", "show", "broken", "--json").output)
    assert show["generation"] == 1
    assert union_state(world.cli, "broken", world.tmp / "look") == world.before
    lines = world.output.splitlines()
    assert lines[0].startswith("broken: error: the staged result fails the consistency checks")
    assert lines[1].startswith("  apt-get check: ") and "uimg-missing" in lines[1]
    print(f"\nbroken: checks {r['checks']}")


@pytest.mark.slow
def test_consistent_vm_with_user_data_is_checked_and_reconciles(world: World) -> None:
    r = world.report["good"]
    assert (r["status"], r["applied"]) == ("clean", True), r
    assert r["checks"].startswith("passed (dpkg --audit, apt-get check, pwck -r, grpck -r;")
    assert json.loads(world.cli.ok("instance", "show", "good", "--json").output)["generation"] == 2
    mnt = world.tmp / "good-after"
    mnt.mkdir()
    world.cli.ok("mount", "good", str(mnt), "--readonly")
    try:
        passwd = (mnt / "etc/passwd").read_text()
        assert "\nsvcd:" in passwd and "\nbob:" in passwd
    finally:
        world.cli.ok("umount", str(mnt))
    print(f"\ngood: checks {r['checks']}")


@pytest.mark.slow
def test_file_only_vm_runs_no_check(world: World) -> None:
    r = world.report["plain"]
    assert (r["status"], r["applied"], r["checks"]) == ("clean", True, NOT_NEEDED), r
