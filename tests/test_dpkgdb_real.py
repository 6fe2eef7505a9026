"""dpkg's database and conffiles reconciled on the real Debian fixture (issue 12, items 2, 4).

Local packages from ``tests/debs.py`` (no network). B0 is the fixture with ``uimg-up`` 1.0
(a conffile package) installed by the host's ``dpkg --root`` on an overlay of the fixture.
Three VMs install packages with the host's ``dpkg --root`` on their mounted union:

* ``db1``: ``uimg-a`` 1.0 (a plain package) and ``uimg-conf`` 1.0, its conffile edited on
  line 2 (no .deb kept);
* ``db2``: ``uimg-conf`` 1.0 (its .deb kept in the VM's apt cache), its conffile edited on
  lines 2 and 18.

The base then (``base update --run``, the base's own dpkg in its chroot) installs
``uimg-conf`` 1.0 and ``uimg-svc`` (``Depends: uimg-conf``, its postinst adds a system user)
and upgrades ``uimg-up`` to 2.0 (conffile changed), keeping no .deb in its apt cache
(generation 2); a second update edits line 18 of uimg-conf's conffile (generation 3). The
pristine conffile: db1 has no .deb anywhere, so it is generation 2's own copy (the generation
that installed it); db2 kept the .deb in its apt cache (read from the VM's, md5-checked).
After ``reconcile --all``:

* db1 (with ``uimg-a`` and ``uimg-conf`` and no apt cache): the host's ``dpkg --root`` on
  the mounted result lists both sides' packages,
  ``--audit`` is clean, ``--verify uimg-svc``/``uimg-up``/``uimg-a`` are clean, the system user
  is there; the conffile (no common ancestor: both sides added it) is merged against the
  pristine 1.0 conffile: the VM's line 2 and the base's line 18;
* db2: the same conffile conflicts on line 18 only (one narrow block, line 2 merged), the
  live file stays the VM's;
* db3 upgraded ``uimg-up`` to its own 1.5 where the base goes to 2.0, and edited a file of
  it (``NOTES``, no conffile: the newer version does not settle it): a package-level
  conflict naming both versions, pending; while it is, the live status is the proposal
  (never a half state): ``dpkg -l`` lists the base's new packages ``ii`` and uimg-up 1.5
  (its changed info files stay the VM's), ``--audit`` clean; resolved with the proposal;
* db4 installed ``uimg-x`` 1.0 and edited its conffile and its ``VERSION``; the base
  installed 1.0 (generation 2, .deb kept in its apt cache) and upgraded to 2.0 (generation
  3): a package conflict, and
  the conffile merged against 1.0's pristine copy from the base's cache (the VM's version,
  as on an upgrade): 2.0's line 10 and the VM's line 2; ``resolve --take local`` of its
  status writes the VM's own status back over the live proposal;
* db5 as db4 without the ``VERSION`` edit: the newer version wins (B1's 2.0 whole, the
  conffile merged the same way), nothing pending.
"""

from __future__ import annotations

import dataclasses
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

CONF = debs.CONFFILE
UP_CONF = "/etc/uimg-up.conf"
X_CONF = "/etc/uimg-x.conf"
PRISTINE = debs.conffile_text(1)


def edit(data: bytes, line: int, text: str) -> bytes:
    lines = data.splitlines(keepends=True)
    lines[line] = text.encode() + b"\n"
    return b"".join(lines)


VM_EDITS = {
    "db1": edit(PRISTINE, 2, "option02 = db1"),
    "db2": edit(edit(PRISTINE, 2, "option02 = db2"), 18, "option18 = db2"),
}
UP_LOCAL = dataclasses.replace(
    debs.conf_package(1, "uimg-up", UP_CONF),
    version="1.5",
    files={"/usr/share/uimg-up/VERSION": b"1.5\n", "/usr/share/uimg-up/NOTES": b"notes\n"},
)  # db3's own version of the package the base upgrades to 2.0 (db3 edits its NOTES)
X_VERSION = "/usr/share/uimg-x/VERSION"


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, Any]
    code: int
    output: str
    fixture: Path  # the Debian fixture's tree (read only)


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

    tmp = tmp_path_factory.mktemp("dpkgdb")
    out = tmp / "debs"
    conf1 = debs.build(debs.conf_package(1), out)
    up1 = debs.build(debs.conf_package(1, "uimg-up", UP_CONF), out)
    up2 = debs.build(debs.conf_package(2, "uimg-up", UP_CONF), out)
    svc = debs.build(debs.user_package(), out)
    plain = debs.build(debs.plain_package("uimg-a"), out)
    up15 = debs.build(UP_LOCAL, out)
    x1 = debs.build(debs.conf_package(1, "uimg-x", X_CONF), out)
    x2 = debs.build(debs.conf_package(2, "uimg-x", X_CONF), out)
    cli = Cli(tmp / "store")
    try:
        # B0: the fixture (shared, never written) with uimg-up 1.0, through an overlay
        rootfs = build("debian")
        for d in ("ov-upper", "ov-work", "b0"):
            (tmp / d).mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs},upperdir={tmp / 'ov-upper'},workdir={tmp / 'ov-work'}",
             str(tmp / "b0")],
            check=True, timeout=60,
        )  # fmt: skip
        debs.install(tmp / "b0", up1)
        cli.ok("base", "create", "deb", "--from-dir", str(tmp / "b0"))
        subprocess.run(["umount", str(tmp / "b0")], check=True, timeout=60)
        vms = {"db1": [plain, conf1], "db2": [conf1], "db3": [up15], "db4": [x1], "db5": [x1]}
        for vm, installs in vms.items():
            cache = vm == "db2"  # db1's pristine comes from generation 2, db2's from its cache
            cli.ok("instance", "create", vm, "--base", "deb")
            mnt = tmp / f"mnt-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt))
            try:
                debs.install(mnt, *installs, cache=cache)  # no maintainer scripts: noexec is fine
                if vm in VM_EDITS:
                    (mnt / CONF.lstrip("/")).write_bytes(VM_EDITS[vm])
                if vm in ("db4", "db5"):
                    (mnt / X_CONF.lstrip("/")).write_bytes(edit(PRISTINE, 2, f"option02 = {vm}"))
                if vm == "db4":  # a file of the package, not a conffile: no newer-version rule
                    (mnt / X_VERSION.lstrip("/")).write_bytes(b"1.0 edited\n")
                if vm == "db3":
                    (mnt / "usr/share/uimg-up/NOTES").write_bytes(b"edited\n")
            finally:
                cli.ok("umount", str(mnt))
        # generation 2 installs (apt's cache emptied after), generation 3 edits the conffile
        # (uimg-x 1.0's .deb stays in the base's apt cache), generation 3 upgrades uimg-x to 2.0
        gen2 = debs.install_command(conf1, svc, up2, cache=False, then=debs.install_command(x1))
        cli.ok("base", "update", "deb", "--run", gen2)
        sed = f"sed -i 's/^option18 = value18$/option18 = base/' {CONF}"
        cli.ok("base", "update", "deb", "--run", debs.install_command(x2, then=sed))
        res = cli("reconcile", "--all", "--json")
        report = {i["name"]: i for i in json.loads(res.output)["instances"]}
        yield World(cli, tmp, report, res.exit_code, res.output, rootfs)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def action(world: World, vm: str, path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [a for a in world.report[vm]["actions"] if a["path"] == path]
    assert len(found) == 1, (path, world.report[vm]["actions"])
    return found[0]


def conflicts(world: World, vm: str) -> dict[str, str]:
    return {
        a["path"]: a["reason"] for a in world.report[vm]["actions"] if a["action"] == "conflict"
    }


@pytest.fixture
def result(world: World, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The VM's union after reconcile, mounted read-only."""
    vm = request.param
    mnt = world.tmp / f"after-{vm}"
    mnt.mkdir(exist_ok=True)
    world.cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        yield mnt
    finally:
        world.cli.ok("umount", str(mnt))


@pytest.mark.slow
@pytest.mark.parametrize("result", ["db1"], indirect=True)
def test_both_sides_packages_and_a_consistent_database(world: World, result: Path) -> None:
    assert conflicts(world, "db1") == {}, world.output
    status = action(world, "db1", "/var/lib/dpkg/status")
    assert status["action"] == "write" and "merged per package" in status["reason"]
    listed = dpkg(result, "-l", "uimg-*")
    assert listed.returncode == 0, listed.stderr
    rows = {
        line.split()[1]: (line.split()[0], line.split()[2])
        for line in listed.stdout.splitlines()
        if line.startswith(("ii", "rc", "un", "iU", "iF"))
    }
    assert rows == {
        "uimg-a": ("ii", "1.0"),
        "uimg-conf": ("ii", "1.0"),
        "uimg-svc": ("ii", "1.0"),
        "uimg-up": ("ii", "2.0"),
        "uimg-x": ("ii", "2.0"),
    }, listed.stdout
    audit = dpkg(result, "--audit")
    assert (audit.returncode, audit.stdout, audit.stderr) == (0, "", ""), audit
    for package in ("uimg-svc", "uimg-up", "uimg-a"):
        verify = dpkg(result, "--verify", package)
        assert (verify.returncode, verify.stdout) == (0, ""), (package, verify)
    # every package: nothing beyond what dpkg says of the fixture itself (its excluded docs)
    # and the conffile db1 edited on purpose
    everything = set(dpkg(result, "--verify").stdout.splitlines())
    baseline = set(dpkg(world.fixture, "--verify").stdout.splitlines())
    assert everything - baseline == {f"??5?????? c {CONF}"}, everything - baseline
    assert (result / UP_CONF.lstrip("/")).read_bytes() == debs.conffile_text(2)
    assert f"\n{debs.SYSTEM_USER}:" in (result / "etc/passwd").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("result", ["db1"], indirect=True)
def test_conffile_both_added_merges_against_the_pristine_version(
    world: World, result: Path
) -> None:
    a = action(world, "db1", CONF)
    assert (a["case"], a["action"]) == (5, "write"), a
    assert "pristine conffile" in a["reason"], a["reason"]
    assert (result / CONF.lstrip("/")).read_bytes() == edit(VM_EDITS["db1"], 18, "option18 = base")
    verify = dpkg(result, "--verify", "uimg-conf")  # an edited conffile: only its md5 differs
    assert verify.stdout.split() == ["??5??????", "c", CONF], verify


@pytest.mark.slow
@pytest.mark.parametrize("result", ["db2"], indirect=True)
def test_conffile_overlap_conflicts_only_on_the_overlapping_line(
    world: World, result: Path
) -> None:
    assert world.code == 1
    assert set(conflicts(world, "db2")) == {CONF}, world.report["db2"]
    reason = conflicts(world, "db2")[CONF]
    assert "1 conflict block" in reason and "pristine conffile" in reason, reason
    assert (result / CONF.lstrip("/")).read_bytes() == VM_EDITS["db2"]  # the VM's stays live
    listed = json.loads(world.cli.ok("conflicts", "db2", "--json").output)
    aside = Path(next(c for c in listed if c["path"] == CONF)["dir"])
    merged = (aside / "merged").read_bytes()
    assert (aside / "pristine").read_bytes() == PRISTINE
    before, block = merged.split(b"<<<<<<<", 1)
    assert b"option02 = db2\n" in before  # the VM's non-overlapping edit merged, outside
    assert merged.count(b"<<<<<<<") == 1 and b"option02" not in block
    assert b"option18 = db2" in block and b"option18 = base" in block
    audit = dpkg(result, "--audit")
    assert (audit.returncode, audit.stdout) == (0, ""), audit


@pytest.mark.slow
@pytest.mark.parametrize("result", ["db3"], indirect=True)
def test_package_both_sides_changed_is_a_package_conflict_never_a_half_state(
    world: World, result: Path
) -> None:
    found = conflicts(world, "db3")
    status = found.pop("/var/lib/dpkg/status")
    assert "uimg-up:all (local 1.5, B1 2.0; not settled by the newer version: the VM " in status
    assert "changed /usr/share/uimg-up/NOTES of its version" in status, status
    assert "live until resolved: the proposal" in status, status
    md5sums = found.pop("/var/lib/dpkg/info/uimg-up.md5sums")
    assert "local 1.5, B1 2.0" in md5sums and "follows its paragraph" in md5sums
    assert set(found) == {"/usr/share/uimg-up/VERSION"}, found  # the package's own file
    assert world.report["db3"]["applied"] and "passed" in world.report["db3"]["checks"]
    # pending, yet no half state: every package the base added has its paragraph with its
    # files, the conflicting one is the VM's 1.5 with the VM's files and info
    listed = dpkg(result, "-l", "uimg-*")
    assert listed.returncode == 0, listed.stderr
    rows = {
        line.split()[1]: (line.split()[0], line.split()[2])
        for line in listed.stdout.splitlines()
        if line.startswith(("ii", "rc", "un", "iU", "iF"))
    }
    assert rows == {
        "uimg-conf": ("ii", "1.0"),
        "uimg-svc": ("ii", "1.0"),
        "uimg-up": ("ii", "1.5"),
        "uimg-x": ("ii", "2.0"),
    }, listed.stdout
    audit = dpkg(result, "--audit")
    assert (audit.returncode, audit.stdout) == (0, ""), audit
    # the base's, with their files (not uimg-conf: the base edits its conffile itself)
    for package in ("uimg-svc", "uimg-x"):
        verify = dpkg(result, "--verify", package)
        assert (verify.returncode, verify.stdout) == (0, ""), (package, verify)
    assert (result / "usr/share/uimg-up/VERSION").read_bytes() == b"1.5\n"
    rec = next(
        c for c in json.loads(world.cli.ok("conflicts", "db3", "--json").output)
        if c["path"] == "/var/lib/dpkg/status"
    )  # fmt: skip
    assert rec.get("live") is True, rec
    assert {"merged", "proposal", "local", "base-new"} <= set(rec["files"]), rec
    proposal = (Path(rec["dir"]) / "proposal").read_bytes()
    assert (result / "var/lib/dpkg/status").read_bytes() == proposal  # live: the proposal
    up = next(p for p in proposal.split(b"\n\n") if p.startswith(b"Package: uimg-up\n"))
    assert b"\nVersion: 1.5\n" in up  # the VM's version of the conflicting package
    assert b"Package: uimg-svc\n" in proposal  # the base's other packages
    local = (Path(rec["dir"]) / "local").read_bytes()
    assert b"Package: uimg-svc\n" not in local  # the VM's own status, as it was before


@pytest.mark.slow
def test_resolving_the_package_conflict_with_the_proposal_is_consistent(world: World) -> None:
    """After the db3 test: the status proposal and the VM's own files of uimg-up taken."""
    cli = world.cli
    took = cli.ok("resolve", "db3", "/var/lib/dpkg/status", "--take", "proposal").output
    assert "proposal" in took
    for path in ("/var/lib/dpkg/info/uimg-up.md5sums", "/usr/share/uimg-up/VERSION"):
        cli.ok("resolve", "db3", path, "--take", "local")
    assert json.loads(cli.ok("conflicts", "db3", "--json").output) == []
    mnt = world.tmp / "resolved-db3"
    mnt.mkdir()
    cli.ok("mount", "db3", str(mnt), "--readonly")
    try:
        listed = dpkg(mnt, "-l", "uimg-*").stdout
        rows = {ln.split()[1]: ln.split()[2] for ln in listed.splitlines() if ln.startswith("ii")}
        assert rows == {
            "uimg-conf": "1.0", "uimg-svc": "1.0", "uimg-up": "1.5", "uimg-x": "2.0"
        }, listed  # fmt: skip
        audit = dpkg(mnt, "--audit")
        assert (audit.returncode, audit.stdout) == (0, ""), audit
        verify = dpkg(mnt, "--verify", "uimg-svc")
        assert (verify.returncode, verify.stdout) == (0, ""), verify
    finally:
        cli.ok("umount", str(mnt))


@pytest.mark.slow
def test_conffile_of_the_vms_older_version_merges_against_its_pristine_from_the_base(
    world: World,
) -> None:
    a = action(world, "db4", X_CONF)
    assert (a["case"], a["action"]) == (5, "write"), a
    assert "uimg-x 1.0's pristine conffile, the VM's version" in a["reason"], a["reason"]
    found = conflicts(world, "db4")
    assert "uimg-x:all (local 1.0, B1 2.0" in found.pop("/var/lib/dpkg/status")
    assert set(found) <= {
        "/var/lib/dpkg/info/uimg-x.md5sums", "/usr/share/uimg-x/VERSION"
    }, found  # fmt: skip
    mnt = world.tmp / "after-db4"
    mnt.mkdir()
    world.cli.ok("mount", "db4", str(mnt), "--readonly")
    try:
        merged = (mnt / X_CONF.lstrip("/")).read_bytes()
        assert merged == edit(debs.conffile_text(2), 2, "option02 = db4"), merged
    finally:
        world.cli.ok("umount", str(mnt))


@pytest.mark.slow
def test_resolving_a_live_package_conflict_with_local_writes_the_vms_status_back(
    world: World,
) -> None:
    """db4's status conflict (uimg-x 1.0 vs 2.0) is live as its proposal; ``--take local``
    writes the VM's own status (as before the reconcile) back and settles the conflict."""
    cli = world.cli
    rec = next(
        c for c in json.loads(cli.ok("conflicts", "db4", "--json").output)
        if c["path"] == "/var/lib/dpkg/status"
    )  # fmt: skip
    assert rec.get("live") is True, rec
    aside = Path(rec["dir"])
    local, proposal = (aside / "local").read_bytes(), (aside / "proposal").read_bytes()
    assert local != proposal
    mnt = world.tmp / "local-db4"
    mnt.mkdir()

    def live() -> bytes:
        cli.ok("mount", "db4", str(mnt), "--readonly")
        try:
            return (mnt / "var/lib/dpkg/status").read_bytes()
        finally:
            cli.ok("umount", str(mnt))

    assert live() == proposal
    took = cli.ok("resolve", "db4", "/var/lib/dpkg/status", "--take", "local").output
    assert "took local" in took, took
    assert live() == local
    left = {c["path"] for c in json.loads(cli.ok("conflicts", "db4", "--json").output)}
    assert "/var/lib/dpkg/status" not in left, left


@pytest.mark.slow
def test_base_newer_version_taken_whole_with_the_vms_conffile_edit_merged(world: World) -> None:
    """db5 installed uimg-x 1.0 and edited only its conffile; the base went to 2.0: the
    newer version wins (the VM's copy is pristine but for the conffile), the conffile is
    merged against 1.0's pristine copy from the base, and nothing is left pending."""
    assert conflicts(world, "db5") == {}, world.report["db5"]
    status = action(world, "db5", "/var/lib/dpkg/status")
    assert status["packages"] == ["uimg-x: base 2.0 supersedes VM's 1.0 (taken)"], status
    assert action(world, "db5", X_VERSION)["action"] == "drop"
    mnt = world.tmp / "after-db5"
    mnt.mkdir()
    world.cli.ok("mount", "db5", str(mnt), "--readonly")
    try:
        merged = (mnt / X_CONF.lstrip("/")).read_bytes()
        assert merged == edit(debs.conffile_text(2), 2, "option02 = db5"), merged
        assert (mnt / X_VERSION.lstrip("/")).read_bytes() == b"2.0\n"
        verify = dpkg(mnt, "--verify", "uimg-x")  # the edited conffile alone
        assert verify.stdout.split() == ["??5??????", "c", X_CONF], verify
        listed = dpkg(mnt, "-l", "uimg-x").stdout
        assert any(ln.split()[:3] == ["ii", "uimg-x", "2.0"] for ln in listed.splitlines())
    finally:
        world.cli.ok("umount", str(mnt))
