"""User databases merged by name on the real Debian fixture (issue 12, item 3).

Two VMs add a login user with Debian's ``useradd --root`` on their mounted union (the union
is mounted ``noexec``: the host's shadow tools, Debian 12 as the fixture, chroot themselves):
``clean`` with UID 1001, ``clash`` with the first free UID (1000). The base then adds a system
user and the login user ``deploy`` with UID 1000 (``base update --run``, the base's own
useradd). After ``reconcile --all``:

* clean: passwd, group, shadow, gshadow hold both sides' users; ``pwck -r`` and ``grpck -r``
  (``--root`` of the read-only mounted result) find nothing the base itself does not have
  (Debian's minbase has system users whose home does not exist: pwck exits 2 on it alone);
  the two subuid ranges useradd gave alice and deploy (both the first free range) are a
  conflict proposing a new range;
* clash: ``/etc/passwd`` is a conflict whose reason and ``proposal`` renumber alice, with her
  files to chown; while it is pending the live passwd, group, shadow and gshadow hold both
  sides' entries except B1's deploy (whose UID/GID alice keeps): the base's svcd is there, and
  ``pwck -r``/``grpck -r`` find nothing the base lacks; ``resolve --take proposal`` then
  renumbers alice and chowns her files;
* back (the same clash): ``resolve --take local`` on the four files writes the VM's own
  files back over the live ones.
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

from tests.conftest import Cli, need, need_programs, need_root
from unionimg.fs.mounts import mountinfo, unmount_tree

VMS = {"clean": ["-u", "1001"], "clash": [], "back": []}  # back: clash, resolved --take local
BASE_RUN = (
    "useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "
    "svcd && "
    "useradd -m -u 1000 -s /bin/bash deploy"
)
POLICY = (  # lastlog/faillog, which useradd writes on both sides: volatile (item 5's domain)
    '[[rule]]\nglob = "/var/log/**"\naction = "keep-local"\n'
)


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, Any]  # per instance name
    code: int
    before: dict[str, dict[str, bytes]]  # the VMs' user files before reconcile
    baseline: tuple[set[str], set[str]]  # what pwck/grpck say of the base fixture itself


def shadow_tool(root: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's ``tool`` (useradd, pwck, grpck) on the tree at ``root`` (``--root``)."""
    return subprocess.run(
        [tool, "--root", str(root), *args], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def problems(root: Path) -> tuple[set[str], set[str]]:
    """What ``pwck -r`` and ``grpck -r`` report on the tree at ``root`` (read-only)."""
    out = []
    for tool in ("pwck", "grpck"):
        done = shadow_tool(root, tool, "-r")
        lines = {x for x in (done.stdout + done.stderr).splitlines() if x.strip()}
        lines.discard(f"{tool}: no changes")
        assert done.returncode in (0, 2) and bool(lines) == (done.returncode == 2), done
        out.append(lines)
    return out[0], out[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need_root()
    need_programs("useradd", "pwck", "grpck")
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("userdb")
    cli = Cli(tmp / "store")
    try:
        rootfs = build("debian")
        baseline = problems(rootfs)  # the base's own (read-only: the fixture is shared)
        cli.ok("base", "create", "deb", "--from-dir", str(rootfs))
        before: dict[str, dict[str, bytes]] = {}
        for vm, args in VMS.items():
            cli.ok("instance", "create", vm, "--base", "deb")
            mnt = tmp / f"mnt-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt))
            try:
                done = shadow_tool(mnt, "useradd", "-m", "-s", "/bin/bash", *args, "alice")
                assert done.returncode == 0, done.stderr
                before[vm] = {
                    name: (mnt / "etc" / name).read_bytes()
                    for name in ("passwd", "group", "shadow", "gshadow", "subuid", "passwd-")
                }
            finally:
                cli.ok("umount", str(mnt))
        cli.ok("base", "update", "deb", "--run", BASE_RUN)
        policy = tmp / "policy.toml"
        policy.write_text(POLICY)
        res = cli("reconcile", "--all", "--json", "--policy", str(policy))
        report = {i["name"]: i for i in json.loads(res.output)["instances"]}
        yield World(cli, tmp, report, res.exit_code, before, baseline)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def action(world: World, vm: str, path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [a for a in world.report[vm]["actions"] if a["path"] == path]
    assert len(found) == 1, (path, world.report[vm]["actions"])
    return found[0]


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
@pytest.mark.parametrize("result", ["clean"], indirect=True)
def test_clean_vm_has_both_sides_users_and_passes_pwck(world: World, result: Path) -> None:
    for path in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"):
        a = action(world, "clean", path)
        assert (a["case"], a["action"]) == (5, "write"), a
        assert "merged by name" in a["reason"]
    passwd = (result / "etc/passwd").read_text()
    names = [line.split(":")[0] for line in passwd.splitlines()]
    assert names[-3:] == ["svcd", "deploy", "alice"]  # B1's order, then the VM's addition
    assert "alice:x:1001:1001:" in passwd and "deploy:x:1000:1000:" in passwd
    assert "\nalice:" in (result / "etc/shadow").read_text()
    assert "\ndeploy:" in (result / "etc/gshadow").read_text()
    pw, gr = problems(result)
    assert pw <= world.baseline[0] and gr <= world.baseline[1], (pw, gr, world.baseline)
    # the tools' backup stays the VM's own
    assert (result / "etc/passwd-").read_bytes() == world.before["clean"]["passwd-"]
    # useradd gave alice and deploy the same first subuid range: a conflict with a proposal
    sub = action(world, "clean", "/etc/subuid")
    assert sub["action"] == "conflict"
    assert "alice: range 100000+65536 overlaps deploy's in B1" in sub["reason"]
    assert "proposal: alice subuid range 100000+65536 → 165536" in sub["reason"]
    assert (result / "etc/subuid").read_bytes() == world.before["clean"]["subuid"]


@pytest.mark.slow
@pytest.mark.parametrize("result", ["clash"], indirect=True)
def test_uid_collision_is_a_conflict_with_a_proposal(world: World, result: Path) -> None:
    assert world.code == 1  # conflicts pending
    a = action(world, "clash", "/etc/passwd")
    assert (a["case"], a["action"]) == (6, "conflict")
    assert "alice: uid 1000 is also deploy's in B1" in a["reason"]
    assert "proposal: alice uid 1000 → 1001" in a["reason"]
    assert "of the VM's files to chown" in a["reason"]
    assert action(world, "clash", "/etc/group")["action"] == "conflict"
    assert "follows /etc/passwd" in action(world, "clash", "/etc/shadow")["reason"]
    # live while pending: both sides' entries but deploy's (its UID and GID stay alice's),
    # consistent across the four files: B1's system user svcd is there, alice keeps 1000
    live = {n: (result / "etc" / n).read_text() for n in ("passwd", "group", "shadow", "gshadow")}
    for name, text in live.items():
        names = [line.split(":")[0] for line in text.splitlines()]
        assert "svcd" in names and "alice" in names and "deploy" not in names, (name, text)
        assert "deploy" not in text, name  # nor as a member of a group
    assert "\nalice:x:1000:1000:" in live["passwd"] and "\nalice:x:1000:" in live["group"]
    for name in ("passwd", "group", "shadow", "gshadow"):  # live, committed, conflict pending
        assert action(world, "clash", f"/etc/{name}")["action"] == "conflict", name
    pw, gr = problems(result)
    assert pw <= world.baseline[0] and gr <= world.baseline[1], (pw, gr, world.baseline)
    # the VM's subuid stays: deploy's range (which overlaps alice's) is left out of it
    assert (result / "etc/subuid").read_bytes() == world.before["clash"]["subuid"]
    # the proposal set aside in the store: passwd with alice renumbered, her files listed
    listed = json.loads(world.cli.ok("conflicts", "clash", "--json").output)
    rec = next(c for c in listed if c["path"] == "/etc/passwd")
    aside = Path(rec["dir"])
    proposal = (aside / "proposal").read_text()
    assert "\nalice:x:1001:1001:" in proposal and "\ndeploy:x:1000:1000:" in proposal
    assert "\nsvcd:" in proposal
    owners = json.loads((aside / "proposal-owners").read_text())
    paths = {o["path"] for o in owners}
    assert "/home/alice" in paths and all(o["old"] == 1000 for o in owners)
    assert b"<<<<<<<" not in (result / "etc/passwd").read_bytes()


@pytest.mark.slow
def test_resolve_takes_the_proposal_and_chowns_the_vms_files(world: World) -> None:
    """After the clash test: the proposals applied with resolve, the followers merged."""
    cli = world.cli
    listed = json.loads(cli.ok("conflicts", "clash", "--json").output)
    assert {c["path"] for c in listed} >= {"/etc/passwd", "/etc/group", "/etc/shadow"}
    took = {}
    for path in ("/etc/group", "/etc/passwd", "/etc/subuid", "/etc/subgid"):
        took[path] = cli.ok("resolve", "clash", path, "--take", "proposal").output
    for path in ("/etc/shadow", "/etc/gshadow"):  # followers: their merge, now consistent
        cli.ok("resolve", "clash", path, "--take", "merged")
    assert "took proposal (" in took["/etc/passwd"] and "file(s) chowned" in took["/etc/passwd"]
    left = {c["path"] for c in json.loads(cli.ok("conflicts", "clash", "--json").output)}
    assert not left & {"/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"}
    mnt = world.tmp / "resolved-clash"
    mnt.mkdir()
    cli.ok("mount", "clash", str(mnt), "--readonly")
    try:
        passwd = (mnt / "etc/passwd").read_text()
        assert "\nalice:x:1001:1001:" in passwd and "\ndeploy:x:1000:1000:" in passwd
        assert "\nsvcd:" in passwd
        home = mnt / "home/alice"
        assert (home.stat().st_uid, home.stat().st_gid) == (1001, 1001)
        assert all(p.lstat().st_uid == 1001 for p in home.iterdir())
        deploy = (mnt / "home/deploy").stat()  # the base's: its own user's again
        assert (deploy.st_uid, deploy.st_gid) == (1000, 1000)
        pw, gr = problems(mnt)
        assert pw <= world.baseline[0] and gr <= world.baseline[1], (pw, gr)
    finally:
        cli.ok("umount", str(mnt))


@pytest.mark.slow
def test_resolve_take_local_writes_the_vms_own_files_back(world: World) -> None:
    cli = world.cli
    assert action(world, "back", "/etc/passwd")["action"] == "conflict"
    listed = json.loads(cli.ok("conflicts", "back", "--json").output)
    assert {c["path"] for c in listed} >= {"/etc/passwd", "/etc/group", "/etc/shadow"}
    names = ("passwd", "group", "shadow", "gshadow")
    for name in names:
        cli.ok("resolve", "back", f"/etc/{name}", "--take", "local")
    mnt = world.tmp / "resolved-back"
    mnt.mkdir()
    cli.ok("mount", "back", str(mnt), "--readonly")
    try:
        for name in names:
            assert (mnt / "etc" / name).read_bytes() == world.before["back"][name], name
        pw, gr = problems(mnt)
        assert pw <= world.baseline[0] and gr <= world.baseline[1], (pw, gr)
    finally:
        cli.ok("umount", str(mnt))
