"""A package both sides changed, on the real Debian fixture (issue 12, item 2): the newer
version wins where the losing side's copy is pristine, else a package conflict that
``resolve --package`` settles whole.

Local packages built by ``tests/debs.py`` (no network): ``uimg-p`` in versions 1.0, 2.0 and
3.0, each with ``/usr/share/uimg-p/VERSION``, a file only that version has
(``only-VERSION``) and the unchanged conffile ``/etc/uimg-p.conf``. B0 is the fixture
without it. Three VMs install it with the host's ``dpkg --root`` on their mounted union:

* ``newer``: 1.0; the base then installs 2.0 (``base update --run``, its own dpkg): after
  ``reconcile`` the VM has 2.0 whole (status, files, info; 1.0's own file gone as dpkg
  removes it on an upgrade), ``dpkg --verify`` clean, no conflict, the text output says
  ``package uimg-p: base 2.0 supersedes VM's 1.0 (taken)``;
* ``kept``: 3.0: the VM's newer version stays whole, reported ``kept (newer)`` with the
  file only the base's 2.0 has (it shows, owned by no package: named in the report);
* ``edited``: 1.0 with ``VERSION`` edited (not a conffile) and its conffile edited: a
  package conflict naming the edit; ``resolve --take base`` of the status file is refused
  naming ``--package``; ``resolve edited --package uimg-p --take base`` makes it 2.0 whole
  but for the edited conffile, which stays the VM's (as dpkg keeps a modified conffile),
  every conflict of the package settled, ``dpkg --verify`` clean but for that conffile.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import debs
from tests.conftest import Cli, need, need_programs, need_root
from unionimg.fs.mounts import mountinfo, unmount_tree

CONF = "/etc/uimg-p.conf"
STATUS = "/var/lib/dpkg/status"
EDITED_CONF = debs.conffile_text(1).replace(b"value02", b"edited")


def package(version: str) -> debs.Deb:
    return debs.Deb(
        "uimg-p",
        version,
        files={
            "/usr/share/uimg-p/VERSION": f"{version}\n".encode(),
            f"/usr/share/uimg-p/only-{version}": b"this version only\n",
        },
        conffiles={CONF: debs.conffile_text(1)},
    )


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, Any]
    text: str  # the text output of 'reconcile newer'


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dpkg", f"--root={root}", *args], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need_root()
    need_programs("dpkg", "dpkg-deb")
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("pkgconflict")
    built = {v: debs.build(package(v), tmp / "debs") for v in ("1.0", "2.0", "3.0")}
    cli = Cli(tmp / "store")
    try:
        cli.ok("base", "create", "deb", "--from-dir", str(build("debian")))
        for vm, version in (("newer", "1.0"), ("kept", "3.0"), ("edited", "1.0")):
            cli.ok("instance", "create", vm, "--base", "deb")
            mnt = tmp / f"mnt-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt))
            try:
                debs.install(mnt, built[version])
                if vm == "edited":
                    (mnt / "usr/share/uimg-p/VERSION").write_bytes(b"1.0 patched by hand\n")
                    (mnt / CONF.lstrip("/")).write_bytes(EDITED_CONF)
            finally:
                cli.ok("umount", str(mnt))
        cli.ok("base", "update", "deb", "--run", debs.install_command(built["2.0"]))
        text = cli.ok("reconcile", "newer").output
        res = cli("reconcile", "--all", "--json")
        assert res.exit_code == 1, res.output  # edited's package conflict
        report = {i["name"]: i for i in json.loads(res.output)["instances"]}
        yield World(cli, tmp, report, text)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def conflicts(world: World, vm: str) -> dict[str, str]:
    found = json.loads(world.cli.ok("conflicts", vm, "--json").output)
    return {c["path"]: c["reason"] for c in found}


def mounted(world: World, vm: str) -> Iterator[Path]:
    mnt = world.tmp / f"ro-{vm}"
    mnt.mkdir(exist_ok=True)
    world.cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        yield mnt
    finally:
        world.cli.ok("umount", str(mnt))


def installed(root: Path) -> str:
    listed = dpkg(root, "-l", "uimg-p")
    rows = [ln.split() for ln in listed.stdout.splitlines() if ln.startswith(("ii", "rc", "i"))]
    assert len(rows) == 1, listed
    return f"{rows[0][0]} {rows[0][2]}"


def consistent(root: Path, edited: str = "") -> None:
    """``dpkg --verify`` clean (but for the conffile ``edited``), ``--audit`` clean."""
    verify = dpkg(root, "--verify", "uimg-p")
    assert verify.stdout == (f"??5?????? c {edited}\n" if edited else ""), verify
    audit = dpkg(root, "--audit")
    assert (audit.returncode, audit.stdout) == (0, ""), audit


@pytest.mark.slow
def test_base_newer_version_replaces_the_vms_pristine_older_one_whole(world: World) -> None:
    assert "package uimg-p: base 2.0 supersedes VM's 1.0 (taken)" in world.text, world.text
    assert "0 conflict(s)" in world.text, world.text
    assert conflicts(world, "newer") == {}
    for root in mounted(world, "newer"):
        assert installed(root) == "ii 2.0"
        consistent(root)
        share = root / "usr/share/uimg-p"
        assert (share / "VERSION").read_bytes() == b"2.0\n"
        assert sorted(p.name for p in share.iterdir()) == ["VERSION", "only-2.0"]
        assert (root / CONF.lstrip("/")).read_bytes() == debs.conffile_text(1)


@pytest.mark.slow
def test_vms_newer_version_kept_whole(world: World) -> None:
    status = next(a for a in world.report["kept"]["actions"] if a["path"] == STATUS)
    assert status["packages"] == [
        "uimg-p: VM's 3.0 supersedes base 2.0 (kept (newer); 1 file(s) only the base's "
        "version has stay, unowned: /usr/share/uimg-p/only-2.0)"
    ], status
    assert conflicts(world, "kept") == {}
    assert world.report["kept"]["applied"], world.report["kept"]
    for root in mounted(world, "kept"):
        assert installed(root) == "ii 3.0"
        consistent(root)
        assert (root / "usr/share/uimg-p/VERSION").read_bytes() == b"3.0\n"


@pytest.mark.slow
def test_edited_package_conflict_then_resolved_whole_by_package(world: World) -> None:
    found = conflicts(world, "edited")
    reason = found[STATUS]
    assert "uimg-p:all (local 1.0, B1 2.0" in reason, reason
    assert "the VM changed /usr/share/uimg-p/VERSION of its version (md5sums)" in reason
    cli = world.cli
    refused = cli.fails("resolve", "edited", STATUS, "--take", "base")
    assert "--package uimg-p --take base|local" in refused.output, refused.output
    refused = cli.fails("resolve", "edited", "/usr/share/uimg-p/VERSION", "--take", "base")
    assert "--package" in refused.output
    for root in mounted(world, "edited"):  # nothing changed by the refusals
        assert installed(root) == "ii 1.0"
    out = cli.ok("resolve", "edited", "--package", "uimg-p", "--take", "base").output
    assert "resolved package uimg-p:all in edited: took base" in out, out
    assert f"kept the VM's edited conffile {CONF}" in out, out  # as dpkg keeps it
    assert conflicts(world, "edited") == {}  # the status and every path of the package
    for root in mounted(world, "edited"):
        assert installed(root) == "ii 2.0"
        consistent(root, edited=CONF)
        assert (root / CONF.lstrip("/")).read_bytes() == EDITED_CONF
        assert (root / "usr/share/uimg-p/VERSION").read_bytes() == b"2.0\n"
        assert not (root / "usr/share/uimg-p/only-1.0").exists()
