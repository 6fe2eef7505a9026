"""A hostile guest's U image, planted the way a guest would (its own ext4, written through
a plain loop mount): the host follows no link it planted, gets no setuid or device from it,
mounts no damaged file system, and never mounts a union over the store.

Every planted link points at a canary file and a canary directory OUTSIDE the store; after
every command they must be byte-identical (content, listing, modes, mtimes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, need_programs
from unionimg.fs import fsops
from unionimg.fs.mounts import find_mount, loop_users, mountinfo
from unionimg.layers import ucheck

pytestmark = pytest.mark.usefixtures("root")


# -- helpers ------------------------------------------------------------------------------------
def image(cli: Cli, vm: str) -> Path:
    return cli.store / "instances" / vm / "upper.img"


@contextlib.contextmanager
def guest_view(img: Path, where: Path) -> Iterator[Path]:
    """U mounted as the guest's kernel would: plain rw (suid, dev, exec allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def snapshot(path: Path) -> Any:
    """Everything that must not change: content, listing, mode, owner, mtime (ns)."""
    st = os.lstat(path)
    meta = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        return (meta, {n: snapshot(path / n) for n in sorted(os.listdir(path))})
    if stat.S_ISREG(st.st_mode):
        return (meta, path.read_bytes())
    return (meta, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)


class Canaries:
    def __init__(self, top: Path) -> None:
        self.file = top / "canary.txt"
        self.file.write_text("host file: must never change\n")
        self.dir = top / "canary-dir"
        # what overlay's set-up would clean in a work dir, and what hg would read
        for sub in ("work", "index", "store", "keep"):
            (self.dir / sub).mkdir(parents=True)
            (self.dir / sub / "precious").write_text(f"host data in {sub}\n")
        (self.dir / "requires").write_text("host file\n")
        (self.dir / "manifest.jsonl").write_text("host file\n")
        self.before = self.state()

    def state(self) -> Any:
        return (snapshot(self.file), snapshot(self.dir))

    def check(self, after: str) -> None:
        assert self.state() == self.before, f"a host canary changed after {after}"


@pytest.fixture
def world(cli: Cli, src_tree: Path, tmp_path: Path) -> Iterator[tuple[Cli, Canaries]]:
    """A base with two generations, vm1 on generation 1 (so reconcile really works on U)."""
    cli.ok("base", "create", "os", "--from-dir", str(src_tree))
    patch = tmp_path / "patch"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc" / "hostname").write_text("generation 2\n")
    cli.ok("base", "update", "os", "--apply-dir", str(patch))
    cli.ok("instance", "create", "vm1", "--base", "os", "--generation", "1")
    canaries = tmp_path / "outside"
    canaries.mkdir()
    yield cli, Canaries(canaries)


def plant_link(cli: Cli, tmp_path: Path, rel: str, target: Path, vm: str = "vm1") -> None:
    """Replace U's ``rel`` by a symlink to ``target`` (as a guest can: it owns the image)."""
    with guest_view(image(cli, vm), tmp_path / "guest") as g:
        victim = g / rel
        if victim.is_dir() and not victim.is_symlink():
            shutil.rmtree(victim)
        elif victim.exists() or victim.is_symlink():
            victim.unlink()
        victim.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, victim)


def store_files(cli: Cli) -> dict[str, Any]:
    """The store's metadata (images excluded: a check may replay a journal)."""
    out = {}
    for p in sorted((cli.store / "instances").rglob("*")):
        if p.is_file() and p.suffix != ".img" and p.name != ucheck.STAMP:
            out[str(p)] = p.read_bytes()
    return out


def refused_line(res: Any, vm: str, rel: str) -> None:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert f"'{vm}'" in lines[0] and rel in lines[0], res.output
    assert "Traceback" not in res.output


# -- item 3: nothing at or below U's root is followed as a symlink -------------------------------
LINKS = [
    ("upper", "dir"),
    ("work", "dir"),
    (".hg", "dir"),
    (".unionimg", "dir"),
    (".unionimg/manifest.jsonl", "file"),
    (".unionimg/base.json", "file"),
    (".hgignore", "file"),
    (".hg/store/00changelog.i", "file"),  # hg appends to revlogs: it would write the target
    (".hg/requires", "file"),
]


@pytest.mark.parametrize(("rel", "kind"), LINKS, ids=[r for r, _ in LINKS])
def test_planted_link_is_never_followed(
    world: tuple[Cli, Canaries], tmp_path: Path, rel: str, kind: str
) -> None:
    cli, canary = world
    plant_link(cli, tmp_path, rel, canary.dir if kind == "dir" else canary.file)
    before = store_files(cli)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (
        ("mount", "vm1", str(mnt)),
        ("mount", "vm1", str(mnt), "--readonly"),
        ("status", "vm1"),
        ("commit", "vm1", "-m", "x"),
        ("log", "vm1"),
        ("fsck", "vm1"),
    ):
        res = cli.fails(*args, code=8)
        refused_line(res, "vm1", rel)
        canary.check(" ".join(args))
        assert find_mount(mnt) is None and not loop_users(image(cli, "vm1"))
    res = cli("reconcile", "vm1")
    assert res.exit_code == 10, res.output
    refused_line(res, "vm1", rel)
    canary.check("reconcile")
    res = cli.fails("umount", str(mnt), code=3)  # nothing of the VM is mounted
    canary.check("umount")
    assert store_files(cli) == before, "a refused command changed the store"
    assert json.loads(cli.ok("instance", "show", "vm1", "--json").output)["generation"] == 1


def test_sharedpath_and_fifo_in_hg_refused(world: tuple[Cli, Canaries], tmp_path: Path) -> None:
    cli, canary = world
    other = cli.store / "bases" / "os" / "history"
    with guest_view(image(cli, "vm1"), tmp_path / "guest") as g:
        (g / ".hg" / "sharedpath").write_text(str(other / ".hg"))
    res = cli.fails("commit", "vm1", code=8)
    refused_line(res, "vm1", ".hg/sharedpath")
    with guest_view(image(cli, "vm1"), tmp_path / "guest") as g:
        (g / ".hg" / "sharedpath").unlink()
        os.mkfifo(g / ".hg" / "dirstate")  # would hang the host's hg
    res = cli.fails("status", "vm1", code=8)
    refused_line(res, "vm1", ".hg/dirstate")
    canary.check("sharedpath/fifo")


def test_hgignore_include_refused(world: tuple[Cli, Canaries], tmp_path: Path) -> None:
    cli, canary = world
    with guest_view(image(cli, "vm1"), tmp_path / "guest") as g:
        text = (g / ".hgignore").read_text()
        (g / ".hgignore").write_text(text + f"subinclude:{canary.file}\n")
    refused_line(cli.fails("commit", "vm1", code=8), "vm1", ".hgignore")


def test_reconcile_all_goes_on_when_one_vm_is_refused(
    world: tuple[Cli, Canaries], tmp_path: Path
) -> None:
    cli, canary = world
    cli.ok("instance", "create", "vm2", "--base", "os", "--generation", "1")
    cli.ok("instance", "create", "vm3", "--base", "os", "--generation", "1")
    plant_link(cli, tmp_path, "upper", canary.dir)
    damage(image(cli, "vm3"))
    res = cli("reconcile", "--all", "--json")
    assert res.exit_code == 10, res.output
    reports = {r["name"]: r for r in json.loads(res.output)["instances"]}
    assert reports["vm2"]["status"] == "clean" and reports["vm2"]["to_generation"] == 2
    assert "upper" in reports["vm1"]["error"] and "'vm1'" in reports["vm1"]["error"]
    assert "damaged" in reports["vm3"]["error"] and "fsck vm3 --repair" in reports["vm3"]["error"]
    gens = {
        n: json.loads(cli.ok("instance", "show", n, "--json").output)["generation"] for n in reports
    }
    assert gens == {"vm1": 1, "vm2": 2, "vm3": 1}
    canary.check("reconcile --all")


def test_sidecar_writes_refuse_links_even_without_the_mount_check(tmp_path: Path) -> None:
    """fsops.write_beneath on its own (openat2 and the O_NOFOLLOW fallback)."""
    canary = tmp_path / "canary"
    canary.write_text("keep\n")
    root = tmp_path / "u"
    (root / ".unionimg").mkdir(parents=True)
    os.symlink(canary, root / ".unionimg" / "manifest.jsonl")
    os.symlink(tmp_path, root / "linkdir")
    for use_openat2 in (True, False):
        saved = fsops.openat2.usable
        fsops.openat2.usable = use_openat2
        try:
            with pytest.raises(fsops.UnsafePath):
                fsops.write_beneath(root, ".unionimg/manifest.jsonl", b"evil")
            with pytest.raises(fsops.UnsafePath):
                fsops.write_beneath(root, ".unionimg/manifest.jsonl", b"evil", append=True)
            with pytest.raises(fsops.UnsafePath):
                fsops.write_beneath(root, "linkdir/canary", b"evil")
            assert fsops.lstat_beneath(root, "missing/x") is None
            with pytest.raises(fsops.UnsafePath):
                fsops.lstat_beneath(root, "linkdir/canary")
            fsops.write_beneath(root, ".unionimg/base.json", b"{}\n")
            fsops.write_beneath(root, ".unionimg/r.jsonl", b"a\n", append=True)
            fsops.write_beneath(root, ".unionimg/r.jsonl", b"b\n", append=True)
            assert (root / ".unionimg/r.jsonl").read_bytes() == b"a\nb\n"
            (root / ".unionimg/r.jsonl").unlink()
        finally:
            fsops.openat2.usable = saved
    assert canary.read_text() == "keep\n"
    assert fsops.openat2.usable, "this kernel (>= 5.6) has openat2: the fast path must work"


# -- item 4: nosuid, nodev, noexec; e2fsck before mounting; errors=remount-ro --------------------
@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="unionimg-hostile-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for m in sorted((e.target for e in mountinfo() if e.target.startswith(str(path))), key=len)[
            ::-1
        ]:
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def test_setuid_and_device_nodes_give_nothing(world: tuple[Cli, Canaries], open_dir: Path) -> None:
    need_programs("setpriv")
    cli, _ = world
    img = image(cli, "vm1")
    with guest_view(img, open_dir / "guest") as g:
        os.chmod(g, 0o755)
        (g / "upper/usr/bin").mkdir(parents=True, exist_ok=True)
        (g / "upper/dev").mkdir(exist_ok=True)
        shutil.copy2("/usr/bin/id", g / "upper/usr/bin/suid-id")
        os.chown(g / "upper/usr/bin/suid-id", 0, 0)
        os.chmod(g / "upper/usr/bin/suid-id", 0o4755)
        loop = loop_users(img)[0]  # the host's raw loop device under this very image
        rdev = os.stat(loop).st_rdev
        os.mknod(g / "upper/dev/evil", stat.S_IFBLK | 0o666, rdev)
        # the control: where suid and devices are honoured, the plant works
        ctl = as_nobody(str(g / "upper/usr/bin/suid-id"), "-u")
        assert ctl.stdout.strip() == "0", f"control: setuid not honoured here? {ctl}"
        os.close(os.open(g / "upper/dev/evil", os.O_RDONLY))
    mnt = open_dir / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        for where in (mnt, cli.store / "run" / "vm1" / "u"):
            opts = set(find_mount(where).options.split(","))  # type: ignore[union-attr]
            assert {"nosuid", "nodev", "noexec"} <= opts, (where, opts)
        assert "errors=remount-ro" in find_mount(cli.store / "run/vm1/u").options  # type: ignore[union-attr]
        res = as_nobody(str(mnt / "usr/bin/suid-id"), "-u")
        assert res.stdout.strip() != "0", f"euid 0 from the union: {res}"
        assert res.returncode != 0 and "Permission denied" in res.stderr  # noexec
        # nodev: not even root opens the guest's device node through the union
        with pytest.raises(PermissionError):
            os.open(mnt / "dev/evil", os.O_RDONLY)
        res = as_nobody("dd", f"if={mnt}/dev/evil", "of=/dev/null", "count=1")
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
    finally:
        cli.ok("umount", str(mnt))


def damage(img: Path) -> None:
    """What a guest can do to its own ext4: a directory's link count and an inode's extra
    size set to nonsense (the issue's crafted image: 'bad extra_isize')."""
    need_programs("debugfs", "e2fsck")
    for req in ("sif /upper links_count 7", "sif /work extra_isize 3"):
        subprocess.run(["debugfs", "-w", "-R", req, str(img)], check=True, capture_output=True)
    res = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True, check=False)
    assert res.returncode == 4 and "extra size" in res.stdout, res.stdout


def test_damaged_u_refused_then_repaired(world: tuple[Cli, Canaries], tmp_path: Path) -> None:
    cli, _ = world
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))  # checked and vouched for on the way
    cli.ok("umount", str(mnt))
    damage(image(cli, "vm1"))  # the guest ran since: the image changed
    before = store_files(cli)
    for args in (("mount", "vm1", str(mnt)), ("status", "vm1"), ("commit", "vm1"), ("fsck", "vm1")):
        res = cli.fails(*args, code=8)
        assert "'vm1'" in res.output and "damaged" in res.output, res.output
        assert "unionimg fsck vm1 --repair" in res.output, res.output
    assert not loop_users(image(cli, "vm1"))
    assert store_files(cli) == before
    out = cli.ok("fsck", "vm1", "--repair").output
    assert "repaired" in out
    cli.ok("mount", "vm1", str(mnt))
    try:
        assert (mnt / "etc/hostname").read_text() == "base\n"
    finally:
        cli.ok("umount", str(mnt))
    assert "clean" in cli.ok("fsck", "vm1").output
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(image(cli, "vm1"))], capture_output=True, check=False
    )
    assert fsck.returncode == 0


def test_superblock_errors_panic_overridden(world: tuple[Cli, Canaries], tmp_path: Path) -> None:
    need_programs("tune2fs")
    cli, _ = world
    subprocess.run(
        ["tune2fs", "-e", "panic", str(image(cli, "vm1"))], check=True, capture_output=True
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        entry = find_mount(cli.store / "run/vm1/u")
        assert entry is not None and "errors=remount-ro" in entry.options.split(","), entry
    finally:
        cli.ok("umount", str(mnt))


def test_fast_path_and_journal_replay(
    world: tuple[Cli, Canaries], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli, _ = world
    runs: list[tuple[str, ...]] = []
    real = ucheck.e2fsck

    def counting(img: Path, *args: str) -> Any:
        runs.append(args)
        return real(img, *args)

    monkeypatch.setattr(ucheck, "e2fsck", counting)
    cli.ok("status", "vm1")
    assert runs == [("-f", "-n")], "a never-checked image is checked"
    cli.ok("status", "vm1")
    cli.ok("commit", "vm1")
    assert len(runs) == 1, "unchanged since the host's own check and clean unmounts: fast path"
    img = image(cli, "vm1")
    # a guest killed mid-write: the image as it was with its journal not yet checkpointed
    crashed = tmp_path / "crashed.img"
    with guest_view(img, tmp_path / "guest") as g:
        (g / "upper/etc").mkdir(parents=True, exist_ok=True)
        (g / "upper/etc/written-by-guest").write_text("journaled\n")
        subprocess.run(["sync", "-f", str(g / "upper/etc/written-by-guest")], check=True)
        subprocess.run(["cp", "--sparse=always", str(img), str(crashed)], check=True)
    assert ucheck.needs_recovery(crashed)
    os.replace(crashed, img)
    runs.clear()
    out = json.loads(cli.ok("status", "vm1", "--json").output)
    assert runs == [("-E", "journal_only", "-p"), ("-f", "-n")]
    assert "/etc/written-by-guest" in out["added"]
    assert not ucheck.needs_recovery(img)


# -- item 7: mount targets ------------------------------------------------------------------------
def test_mount_targets_outside_the_store_and_empty(
    world: tuple[Cli, Canaries], tmp_path: Path
) -> None:
    cli, _ = world
    inst_dir = cli.store / "instances" / "vm1"
    before = store_files(cli)
    res = cli.fails("mount", "vm1", str(inst_dir), code=2)
    assert "inside the store" in res.output
    res = cli.fails("mount", "vm1", str(inst_dir), "--allow-non-empty", code=2)
    assert "inside the store" in res.output
    os.symlink(inst_dir, tmp_path / "sneaky")  # resolved: still inside the store
    res = cli.fails("mount", "vm1", str(tmp_path / "sneaky"), code=2)
    assert "inside the store" in res.output
    empty_inside = cli.store / "run" / "empty"
    empty_inside.mkdir()
    cli.fails("mount", "vm1", str(empty_inside), code=2)
    empty_inside.rmdir()
    res = cli.fails("mount", "vm1", str(tmp_path), "--allow-non-empty", code=2)
    assert "holds the store" in res.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("admin's file\n")
    res = cli.fails("mount", "vm1", str(full), code=2)
    assert "not empty" in res.output and "--allow-non-empty" in res.output
    assert store_files(cli) == before and not loop_users(image(cli, "vm1"))
    assert json.loads(cli.ok("instance", "show", "vm1", "--json").output)["state"] == "stopped"
    cli.ok("mount", "vm1", str(full), "--allow-non-empty")
    try:
        assert not (full / "mine").exists() and (full / "etc/hostname").exists()
    finally:
        cli.ok("umount", str(full))
    assert (full / "mine").read_text() == "admin's file\n"
