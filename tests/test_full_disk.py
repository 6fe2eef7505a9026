"""Nothing is lost when space runs out.

Each test runs on a small ext4 filesystem loop-mounted under ``tmp_path`` and holding the
store, filled to the brim by a filler file. Every command that grows the store or an image
fails cleanly — exit 7 and one line "store full: X free on FS, about Y needed ..." when its
own check sees the lack of space first, or a clean one-line error when the space runs out in
the middle (the filler grown at a fault point, after the check passed), with nothing
reported that did not persist — the store is unchanged, and once the filler is removed a
rerun succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.conftest import REPO, Cli, loops_left
from unionimg.faults import fill
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.fs.space import WriteWatch
from unionimg.layers.instance import u_layer
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")
FS_SIZE = 128 << 20
CONF = "".join(f"option{i} = {i}\n" for i in range(30))
VM_CONF = CONF.replace("option0 = 0", "option0 = vm")


class Small:
    """A small ext4 filesystem (mounted at ``mnt``) holding the store, and its filler."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.store = mnt / "store"
        self.filler = mnt / "filler"
        self.cli = Cli(self.store)

    def fill(self, leave: int = 0) -> None:
        """Leave ``leave`` bytes free (0: not one block)."""
        if leave == 0:
            fill(str(self.filler))
            return
        st = os.statvfs(self.mnt)
        free = st.f_bavail * st.f_frsize
        assert free > leave, f"only {free} bytes free, cannot leave {leave}"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, os.fstat(fd).st_size, free - leave)
            os.fsync(fd)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        os.sync()

    def free_bytes(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize


def _mount_small(img: Path, mnt: Path) -> Small:
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    return Small(mnt)


def _release(tmp: Path, mnt: Path) -> None:
    """Unmount everything below ``tmp``; nothing may have stayed mounted or attached."""
    leaked = [m.target for m in mountinfo() if m.target.startswith(str(mnt) + "/")]
    unmount_tree(tmp)
    loops = loops_left(tmp)
    assert not leaked, f"test left mounts behind: {leaked}"
    assert not loops, f"test left loop devices attached: {loops}"


def _new_fs(img: Path) -> None:
    with open(img, "wb") as fh:
        fh.truncate(FS_SIZE)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", str(img)], check=True)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Small]:
    """An empty small filesystem for the store."""
    _new_fs(tmp_path / "fs.img")
    try:
        yield _mount_small(tmp_path / "fs.img", tmp_path / "fs")
    finally:
        _release(tmp_path, tmp_path / "fs")


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small filesystem image holding a store, built once: base b generations 1 and 2,
    instance vm1 (48 MiB U) on generation 1 with a committed change of /etc/hostname and
    an uncommitted change of /etc/app.conf's option0, which generation 2 changes too (a
    real conflict for reconcile)."""
    from tests.conftest import need_root

    need_root()
    tmp = tmp_path_factory.mktemp("golden")
    _new_fs(tmp / "fs.img")
    s = _mount_small(tmp / "fs.img", tmp / "fs")
    try:
        cli = s.cli
        cli.ok("base", "create", "b", "--from-dir", str(tree(tmp / "src")))
        cli.ok("instance", "create", "vm1", "--base", "b", "--size", "48M")
        put_upper(s.store, "vm1", "etc/hostname", b"vm1\n")
        cli.ok("commit", "vm1", "-m", "first")
        put_upper(s.store, "vm1", "etc/app.conf", VM_CONF.encode())
        cli.ok("base", "update", "b", "--from-dir", str(tree(tmp / "src2", 2)))
    finally:
        _release(tmp, tmp / "fs")
    yield tmp / "fs.img"


@pytest.fixture
def vm(golden: Path, tmp_path: Path) -> Iterator[Small]:
    """A copy of the golden store on a small filesystem of its own."""
    subprocess.run(["cp", "--sparse=always", str(golden), str(tmp_path / "fs.img")], check=True)
    try:
        yield _mount_small(tmp_path / "fs.img", tmp_path / "fs")
    finally:
        _release(tmp_path, tmp_path / "fs")


def tree(root: Path, version: int = 1) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    conf = CONF if version == 1 else CONF.replace("option0 = 0", "option0 = base")
    (root / "etc" / "app.conf").write_text(conf)
    (root / "etc" / "hostname").write_text("base\n")
    (root / "bin" / "tool").write_bytes(os.urandom(64 << 10))
    return root


def put_upper(store: Path, vm: str, rel: str, data: bytes) -> None:
    """A local change of the VM, as the guest's overlay leaves it (a file in upper/)."""
    with u_layer(Store(store), vm, write=True) as u:
        path = u / "upper" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_upper(store: Path, vm: str, rel: str) -> bytes | None:
    with u_layer(Store(store), vm, write=False) as u:
        path = u / "upper" / rel
        return path.read_bytes() if path.exists() else None


def snapshot(s: Small) -> dict[str, Any]:
    """What must not change when a command fails: every name in the store, the content of
    its metadata files, and every repository's history (VMs and bases)."""
    root = s.store
    names, meta = [], {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(top, name), root)
            if rel.startswith(("locks/", "templates", "run")) or name == "u-checked.json":
                # lock files say who held them; the empty repository instances start from
                # is made once, when first needed; run/ holds empty mount points made on
                # demand (the fixture checks nothing stays mounted); the e2fsck stamp is a
                # cache
                continue
            names.append(rel)
            if name.endswith((".json", ".jsonl")):
                meta[rel] = Path(top, name).read_bytes()
    out: dict[str, Any] = {"names": sorted(names), "meta": meta}
    cli = s.cli
    for inst in json.loads(cli.ok("instance", "list", "--json").output):
        log = json.loads(cli.ok("log", inst["name"], "--json").output)
        out[f"log {inst['name']}"] = [c["node"] for c in log]
    for b in json.loads(cli.ok("base", "list", "--json").output):
        bname = b["name"] if isinstance(b, dict) else b
        log = json.loads(cli.ok("base", "log", bname, "--json").output)
        out[f"base log {bname}"] = [c["node"] for c in log]
    return out


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """``a == b``, naming the differences."""
    for key in sorted(set(a) | set(b)):
        if key == "names":
            gone, new = set(a[key]) - set(b[key]), set(b[key]) - set(a[key])
            assert not gone and not new, f"store names: gone {sorted(gone)}, new {sorted(new)}"
        elif key == "meta":
            changed = {k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k)}
            assert not changed, f"metadata changed: {sorted(changed)}"
        else:
            assert a.get(key) == b.get(key), f"{key}: {a.get(key)} != {b.get(key)}"


def assert_full(res: Result, s: Small, *, needed: bool = True) -> str:
    """Exit 7, one line that says the store is full, where, and (``needed``) how much is
    needed: understandable without the kernel log."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 7, res.output
    assert len(lines) == 1, res.output
    line = lines[0]
    assert line.startswith("unionimg: error: store full: "), line
    # the store's filesystem is named: its mount point, not the U image's
    assert f" free on {s.mnt}, " in line or f" free on {s.mnt}; " in line, line
    if needed:
        assert " needed " in line and "about " in line, line
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert "--size" not in line, line  # a full disk is never blamed on the image size
    return line


def vm_log(s: Small, vm: str = "vm1") -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = json.loads(s.cli.ok("log", vm, "--json").output)
    return log


def hg_verify(s: Small, vm: str = "vm1") -> None:
    with u_layer(Store(s.store), vm, write=True) as u:  # hg verify takes the repository lock
        res = subprocess.run(
            [HG, "-R", str(u), "verify", "-q"], capture_output=True, text=True, check=False
        )
    assert res.returncode == 0, res.stdout + res.stderr


# -- bases and instances ------------------------------------------------------------------
def test_base_create_and_update(small: Small, tmp_path: Path, monkeypatch: Any) -> None:
    cli = small.cli
    src = tree(tmp_path / "src")
    (src / "big").write_bytes(os.urandom(6 << 20))
    cli.ok("base", "list")  # the store exists, empty
    before = snapshot(small)
    small.fill(leave=2 << 20)
    assert_full(cli("base", "create", "b", "--from-dir", str(src)), small)
    # the space runs out after the check passed: mke2fs meets the full disk
    small.free()
    monkeypatch.setenv("UNIONIMG_FILL_AT", "base-create:space-checked")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(small.filler))
    res = cli("base", "create", "b", "--from-dir", str(src))
    assert "make base.img" in assert_full(res, small)
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    small.free()
    same(before, snapshot(small))
    assert not list((small.store / "tmp").iterdir())
    cli.ok("base", "create", "b", "--from-dir", str(src))

    src2 = tree(tmp_path / "src2", 2)
    (src2 / "big2").write_bytes(os.urandom(6 << 20))
    before = snapshot(small)
    small.fill(leave=4 << 20)
    assert_full(cli("base", "update", "b", "--from-dir", str(src2)), small)
    small.free()
    monkeypatch.setenv("UNIONIMG_FILL_AT", "base-update:space-checked")
    res = cli("base", "update", "b", "--from-dir", str(src2))
    assert "make base.img" in assert_full(res, small)
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    small.free()
    same(before, snapshot(small))
    cli.ok("base", "update", "b", "--from-dir", str(src2))
    assert [
        g["number"] for g in json.loads(cli.ok("base", "show", "b", "--json").output)["generations"]
    ] == [1, 2]


def test_instance_create_and_mount(small: Small, tmp_path: Path, monkeypatch: Any) -> None:
    cli = small.cli
    cli.ok("base", "create", "b", "--from-dir", str(tree(tmp_path / "src")))
    before = snapshot(small)
    small.fill(leave=1 << 20)
    assert_full(cli("instance", "create", "vm1", "--base", "b", "--size", "1G"), small)
    small.free()
    # mke2fs meets the full disk after the check: the disk is blamed, not --size
    monkeypatch.setenv("UNIONIMG_FILL_AT", "instance-create:space-checked")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(small.filler))
    res = cli("instance", "create", "vm1", "--base", "b", "--size", "1G")
    assert "make upper.img" in assert_full(res, small, needed=False)
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    small.free()
    same(before, snapshot(small))
    cli.ok("instance", "create", "vm1", "--base", "b", "--size", "1G")

    target = tmp_path / "union"
    target.mkdir()
    before = snapshot(small)
    small.fill(leave=1 << 20)
    assert_full(cli("mount", "vm1", str(target)), small)
    assert not any(m.target == str(target) for m in mountinfo())
    small.free()
    same(before, snapshot(small))
    cli.ok("mount", "vm1", str(target))
    (target / "etc" / "new").write_text("written through the union\n")
    cli.ok("umount", str(target))
    assert read_upper(small.store, "vm1", "etc/new") == b"written through the union\n"


# -- commit -------------------------------------------------------------------------------
def test_commit_checks_space_first(vm: Small) -> None:
    cli = vm.cli
    put_upper(vm.store, "vm1", "srv/data.bin", os.urandom(6 << 20))
    before = snapshot(vm)
    vm.fill(leave=4 << 20)
    line = assert_full(cli("commit", "vm1", "-m", "data"), vm)
    assert "commit vm1" in line
    vm.free()
    same(before, snapshot(vm))
    assert cli.ok("commit", "vm1", "-m", "data").output.startswith("committed ")
    assert [c["message"] for c in vm_log(vm)] == ["data", "first"]
    hg_verify(vm)


def test_commit_space_runs_out_midway(vm: Small, monkeypatch: Any) -> None:
    """The bug: with the store full, hg's writes into U sat in the page cache, commit said
    'committed <node>' and exited 0, and the changeset was gone once U was unmounted."""
    cli = vm.cli
    put_upper(vm.store, "vm1", "srv/data.bin", os.urandom(4 << 20))
    before = snapshot(vm)
    monkeypatch.setenv("UNIONIMG_FILL_AT", "commit:checked")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(vm.filler))
    res = cli("commit", "vm1", "-m", "data")
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    assert "committed" not in res.output, res.output
    line = assert_full(res, vm, needed=False)
    assert "commit vm1 failed" in line and "not recorded" in line, line
    # U lost writes: its next mount checks it with e2fsck (no stamp vouches for it)
    assert not (vm.store / "instances" / "vm1" / "u-checked.json").exists()
    vm.free()
    # nothing was reported that did not persist: the history is what it was
    same(before, snapshot(vm))
    hg_verify(vm)
    out = cli.ok("commit", "vm1", "-m", "data").output
    node = out.split()[1]
    log = vm_log(vm)
    assert [c["message"] for c in log] == ["data", "first"]
    assert log[0]["node"].startswith(node)
    hg_verify(vm)


def test_commit_u_image_full(vm: Small) -> None:
    """U itself (not the store) cannot hold the commit: said so, naming U and the VM."""
    cli = vm.cli
    put_upper(vm.store, "vm1", "srv/big.bin", os.urandom(28 << 20))  # U is 48 MiB
    before = snapshot(vm)
    res = cli("commit", "vm1", "-m", "big")
    assert res.exit_code == 7, res.output
    line = res.output.strip()
    assert line.startswith("unionimg: error: store full: "), line
    assert f" free on {vm.store}/run/vm1/u, about " in line, line
    assert "the U image of vm1 is full" in line, line
    same(before, snapshot(vm))


def test_snapshot_space_runs_out_while_its_layer_is_written(vm: Small, monkeypatch: Any) -> None:
    """A layer is extracted straight into its new image, loop-mounted in staging; the store
    fills up meanwhile (the filler grown once the image is mounted), so the image's blocks
    cannot be written: the snapshot fails in one line, the store is as it was, nothing stays
    mounted or attached (the fixture checks), and with room again it succeeds."""
    cli = vm.cli
    put_upper(vm.store, "vm1", "srv/first", b"1\n")
    cli.ok("instance", "snapshot", "vm1")  # the generation's layer adopted, a first layer
    put_upper(vm.store, "vm1", "srv/data.bin", os.urandom(8 << 20))
    before = snapshot(vm)
    monkeypatch.setenv("UNIONIMG_FILL_AT", "layer-import:image-mounted")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(vm.filler))
    res = cli("instance", "snapshot", "vm1")
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    assert_full(res, vm, needed=False)
    same(before, snapshot(vm))
    vm.free()
    cli.ok("instance", "snapshot", "vm1")
    layers = json.loads(cli.ok("instance", "show", "vm1", "--json").output)["layers"]
    assert len(layers) == 2, layers
    assert read_upper(vm.store, "vm1", "srv/data.bin") is None  # frozen into the layer


# -- reconcile and resolve -------------------------------------------------------------------
def test_reconcile_checks_space_first(vm: Small) -> None:
    s = vm
    before = snapshot(s)
    s.fill(leave=1 << 20)
    res = s.cli("reconcile", "--all")
    assert res.exit_code == 7, res.output  # never 70
    assert_full(res, s)
    s.free()
    same(before, snapshot(s))
    assert s.cli("reconcile", "--all").exit_code == 1  # the real conflict
    assert json.loads(s.cli.ok("instance", "show", "vm1", "--json").output)["generation"] == 2


@pytest.mark.parametrize("point", ["pre-committed", "swapped"])
def test_reconcile_space_runs_out_midway(vm: Small, monkeypatch: Any, point: str) -> None:
    """Out of space after the local commit (before the swap is journaled), or right after
    the swap: the run fails with a "store full" line and no report of success; once space is
    freed a rerun finishes or restarts, and its result is that of an uninterrupted run."""
    s = vm
    upper_before = read_upper(s.store, "vm1", "etc/app.conf")
    monkeypatch.setenv("UNIONIMG_FILL_AT", f"reconcile:{point}")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(s.filler))
    res = s.cli("reconcile", "vm1")
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    assert res.exit_code == 7, res.output
    assert "internal error" not in res.output and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if "error" in ln]
    assert errors and all("store full: " in ln for ln in errors), res.output
    assert "conflict(s)" not in res.output  # nothing reported as done
    s.free()
    show = json.loads(s.cli.ok("instance", "show", "vm1", "--json").output)
    if point == "pre-committed":  # before the journal: the previous state, untouched
        assert show["generation"] == 1
        assert read_upper(s.store, "vm1", "etc/app.conf") == upper_before
        assert not (s.store / "instances" / "vm1" / "reconcile-journal.json").exists()
    hg_verify(s)
    assert s.cli("reconcile", "vm1").exit_code == 1
    assert json.loads(s.cli.ok("instance", "show", "vm1", "--json").output)["generation"] == 2
    conflicts = json.loads(s.cli.ok("conflicts", "vm1", "--json").output)
    assert [c["path"] for c in conflicts] == ["/etc/app.conf"]
    assert read_upper(s.store, "vm1", "etc/app.conf") == upper_before  # live file untouched
    last = json.loads((s.store / "instances" / "vm1" / "last-reconcile.json").read_text())
    assert last["post_node"] == vm_log(s)[0]["node"]  # the changeset it names exists
    hg_verify(s)


def test_resolve(vm: Small, monkeypatch: Any) -> None:
    s = vm
    assert s.cli("reconcile", "vm1").exit_code == 1
    mine = CONF.replace("option0 = 0", "option0 = both").encode() + os.urandom(3 << 20)
    resolution = s.mnt.parent / "resolution.conf"
    resolution.write_bytes(mine)
    before = snapshot(s)
    s.fill(leave=4 << 20)
    assert_full(s.cli("resolve", "vm1", "/etc/app.conf", "--file", str(resolution)), s)
    s.free()
    same(before, snapshot(s))
    monkeypatch.setenv("UNIONIMG_FILL_AT", "resolve:checked")
    monkeypatch.setenv("UNIONIMG_FILL_FILE", str(s.filler))
    res = s.cli("resolve", "vm1", "/etc/app.conf", "--file", str(resolution))
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    assert "resolved" not in res.output
    assert_full(res, s, needed=False)
    s.free()
    # the conflict is still pending and its versions still aside: the resolve can be rerun
    conflicts = json.loads(s.cli.ok("conflicts", "vm1", "--json").output)
    assert [c["path"] for c in conflicts] == ["/etc/app.conf"]
    assert Path(conflicts[0]["dir"]).is_dir()
    assert vm_log(s)[0]["node"] == before["log vm1"][0]
    hg_verify(s)
    s.cli.ok("resolve", "vm1", "/etc/app.conf", "--file", str(resolution))
    assert json.loads(s.cli.ok("conflicts", "vm1", "--json").output) == []
    assert read_upper(s.store, "vm1", "etc/app.conf") == mine
    assert vm_log(s)[0]["message"].startswith("resolve /etc/app.conf")
    hg_verify(s)


def test_fault_hook_fills_to_the_brim(small: Small) -> None:
    """The filler the tests rely on leaves not one block free."""
    fill(str(small.filler))
    assert small.free_bytes() < 4096
    with pytest.raises(OSError):
        (small.mnt / "x").write_bytes(b"y" * 8192)
    small.free()
    shutil.rmtree(small.mnt / "x", ignore_errors=True)


def test_write_watch_sees_what_a_later_descriptor_misses(small: Small) -> None:
    """Why writes into U are synced through a descriptor opened before them: once the store
    is full, writes inside a sparse image fail only at write-back (U's journal aborts), the
    kernel reports that once per open descriptor, and a descriptor opened after it was
    reported syncs "fine" (and umount reports nothing)."""
    img, mnt = small.mnt / "u.img", small.mnt.parent / "u"
    with open(img, "wb") as fh:
        fh.truncate(32 << 20)
    lazy = "lazy_itable_init=1,lazy_journal_init=1"  # sparse, like a U image
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", lazy, str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        with WriteWatch(mnt) as early:
            small.fill()
            (mnt / "data").write_bytes(os.urandom(2 << 20))  # into the page cache: "succeeds"
            with pytest.raises(OSError) as err:
                early.sync()
            assert err.value.errno in (errno.EIO, errno.ENOSPC), err.value
        with WriteWatch(mnt) as late:
            late.sync()  # the same lost writes, and a later descriptor never hears of them
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_reconcile_failing_while_staging_releases_u(
    vm: Small, monkeypatch: Any, tmp_path: Path
) -> None:
    """A step of the staging fails (here: making the VM's identity files): the run reports
    the error, and the VM's U is released at once — mounted again by the same process, not
    "still in use by an earlier mount" (the write watch's descriptor on U once pinned it; CI
    saw every later test of that VM fail)."""
    from unionimg.errors import ToolFailed
    from unionimg.layers import identity

    def broken(*_args: Any, **_kw: Any) -> list[str]:
        raise ToolFailed("identity files could not be made (the test's fault)")

    s = vm
    monkeypatch.setattr(identity, "ensure_staged", broken)
    res = s.cli("reconcile", "vm1")
    assert res.exit_code != 0 and "the test's fault" in res.output, res.output
    monkeypatch.undo()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    s.cli.ok("mount", "vm1", str(mnt), "--readonly")
    s.cli.ok("umount", str(mnt))
    assert s.cli("reconcile", "vm1").exit_code == 1  # the real conflict: it runs through
