"""A VM's system user clashing with the base's new one, renumbered by reconcile (issue 12).

On the tiny fixture, with the host's ``useradd --system`` (no ``login.defs`` in the tree:
system IDs count down from 999) on both sides: each VM's own "package" makes the system
user and group ``foo`` (999) and ``/var/lib/foo`` owned by it; the base then gets its own new
system user and group ``svcd`` (999 again) and ``/var/lib/svcd`` owned by it. After
``reconcile``:

* ``on`` (the shipped policy): reconciled clean, nothing pending; passwd and group hold both
  users with distinct IDs (svcd keeps 999, foo a free system ID), the VM's files belong to
  foo, the base's to svcd, ``pwck -r``/``grpck -r`` find nothing the base lacks, and the
  report names the renumbering and the files chowned (that the chowns go to copies, not to
  the live layer's shared inodes: ``tests/test_userdb_auto.py``).
* ``off`` (a policy rule for ``/etc/passwd/renumber-system-ids`` other than ``merge``): the
  clash stays a conflict with its proposal, as before this change.
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

from tests.conftest import Cli, need_programs
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.reconcile.structured import RENUMBER_SYSTEM, RENUMBERED

SYSTEM_USER = ["--system", "--user-group", "--no-create-home", "--shell", "/bin/false"]


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, dict[str, Any]]
    codes: dict[str, int]
    baseline: tuple[set[str], set[str]]
    text: str  # the text output of a third VM's reconcile, without --json


def tool(root: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [name, "--root", str(root), *args], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def problems(root: Path) -> tuple[set[str], set[str]]:
    out = []
    for name in ("pwck", "grpck"):
        done = tool(root, name, "-r")
        lines = {x for x in (done.stdout + done.stderr).splitlines() if x.strip()}
        lines.discard(f"{name}: no changes")
        assert done.returncode in (0, 2), done
        out.append(lines)
    return out[0], out[1]


def ids(root: Path, db: str, name: str) -> list[str]:
    found = [
        ln.split(":") for ln in (root / "etc" / db).read_text().splitlines()
        if ln.startswith(name + ":")
    ]  # fmt: skip
    assert len(found) == 1, (db, name, found)
    return found[0]


def add_system_user(root: Path, name: str) -> tuple[int, int]:
    """``useradd --system NAME`` and ``/var/lib/NAME/state`` owned by it, as a package does."""
    done = tool(root, "useradd", *SYSTEM_USER, "--home-dir", f"/var/lib/{name}", name)
    assert done.returncode == 0, done.stderr
    uid, gid = int(ids(root, "passwd", name)[2]), int(ids(root, "group", name)[2])
    home = root / "var/lib" / name
    home.mkdir(parents=True)
    (home / "state").write_text(f"{name}'s\n")
    for p in (home, home / "state"):
        os.chown(p, uid, gid)
    return uid, gid


def copy(src: Path, dst: Path) -> None:
    """The shared fixture tree copied as it is (device nodes as nodes, not read)."""
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True, timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need_programs("useradd", "pwck", "grpck")
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("userdb-auto")
    cli = Cli(tmp / "store")
    try:
        fixture = build("tiny")
        base0, base1 = tmp / "b0", tmp / "b1"
        copy(fixture, base0)
        baseline = problems(base0)
        cli.ok("base", "create", "tiny", "--from-dir", str(base0))
        for vm in ("on", "off", "text"):
            cli.ok("instance", "create", vm, "--base", "tiny")
            mnt = tmp / f"mnt-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt))
            try:
                assert add_system_user(mnt, "foo") == (999, 999)
            finally:
                cli.ok("umount", str(mnt))
        copy(fixture, base1)
        assert add_system_user(base1, "svcd") == (999, 999)  # the same IDs as the VMs' foo
        cli.ok("base", "update", "tiny", "--from-dir", str(base1))
        off = tmp / "off.toml"
        off.write_text(f'[[rule]]\nglob = "{RENUMBER_SYSTEM}"\naction = "keep-local"\n')
        report, codes = {}, {}
        for vm, args in (("on", []), ("off", ["--policy", str(off)])):
            res = cli("reconcile", vm, "--json", *args)
            report[vm] = json.loads(res.output)["instances"][0]
            codes[vm] = res.exit_code
        text = cli.ok("reconcile", "text").output
        yield World(cli, tmp, report, codes, baseline, text)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


@pytest.fixture
def result(world: World, request: pytest.FixtureRequest) -> Iterator[Path]:
    vm = request.param
    mnt = world.tmp / f"after-{vm}"
    mnt.mkdir(exist_ok=True)
    world.cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        yield mnt
    finally:
        world.cli.ok("umount", str(mnt))


def action(world: World, vm: str, path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [a for a in world.report[vm]["actions"] if a["path"] == path]
    assert len(found) == 1, (path, world.report[vm]["actions"])
    return found[0]


def test_text_output_names_the_renumbering(world: World) -> None:
    lines = world.text.splitlines()
    assert lines[0].startswith("text: generation 1 -> 2:") and "0 conflict(s)" in lines[0]
    moved = [ln for ln in lines if RENUMBERED in ln]
    assert len(moved) == 1 and moved[0].startswith("  /etc/passwd: passwd merged by name"), lines
    assert "foo uid 999 →" in moved[0] and "foo gid 999 →" in moved[0], moved


@pytest.mark.parametrize("result", ["on"], indirect=True)
def test_system_user_clash_renumbered_and_consistent(world: World, result: Path) -> None:
    report = world.report["on"]
    assert world.codes["on"] == 0 and report["status"] == "clean", report
    assert report["conflicts"] == [] and report["applied"]
    assert json.loads(world.cli.ok("conflicts", "on", "--json").output) == []  # none pending
    # both users, distinct IDs: the base's keeps 999, the VM's a free system ID
    svcd, foo = ids(result, "passwd", "svcd"), ids(result, "passwd", "foo")
    assert svcd[2:4] == ["999", "999"]
    uid, gid = int(foo[2]), int(foo[3])
    assert 100 <= uid < 999 and 100 <= gid < 999
    assert ids(result, "group", "svcd")[2] == "999" and ids(result, "group", "foo")[2] == str(gid)
    assert "foo:" in (result / "etc/shadow").read_text()
    assert "svcd:" in (result / "etc/shadow").read_text()
    for db in ("passwd", "group"):  # no ID given twice
        numbers = [ln.split(":")[2] for ln in (result / "etc" / db).read_text().splitlines()]
        assert len(numbers) == len(set(numbers)), db
    # the VM's files are foo's, the base's svcd's
    for p in ("var/lib/foo", "var/lib/foo/state"):
        st = os.lstat(result / p)
        assert (st.st_uid, st.st_gid) == (uid, gid), p
    for p in ("var/lib/svcd", "var/lib/svcd/state"):
        st = os.lstat(result / p)
        assert (st.st_uid, st.st_gid) == (999, 999), p
    pw, gr = problems(result)
    assert pw <= world.baseline[0] and gr <= world.baseline[1], (pw, gr, world.baseline)
    # the report names the renumbering and the files chowned
    passwd = action(world, "on", "/etc/passwd")
    assert (passwd["case"], passwd["action"]) == (5, "write"), passwd
    assert f"foo uid 999 → {uid}" in passwd["reason"], passwd
    assert f"foo gid 999 → {gid}" in passwd["reason"], passwd
    assert passwd["reason"].endswith("uid of 2 of the VM's files changed to match"), passwd
    state = action(world, "on", "/var/lib/foo/state")
    assert state["action"] == "set-meta" and f"owner uid 999 → {uid}" in state["reason"]


@pytest.mark.parametrize("result", ["off"], indirect=True)
def test_setting_off_keeps_the_clash_a_conflict(world: World, result: Path) -> None:
    assert world.codes["off"] == 1, world.report["off"]
    passwd = action(world, "off", "/etc/passwd")
    assert passwd["action"] == "conflict"
    assert "foo: uid 999 is also svcd's in B1" in passwd["reason"]
    assert "the policy turns it off" in passwd["reason"]
    st = os.lstat(result / "var/lib/foo/state")
    assert (st.st_uid, st.st_gid) == (999, 999)  # the VM's entry keeps the ID while pending
    assert ids(result, "passwd", "foo")[2] == "999"
