"""fsops on a hardlink copy: changing the copy never changes the tree it was copied from."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from unionimg.fs import fsops
from unionimg.fs.manifest import stat_entry

from .conftest import need_root


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_ino)
    return out


@pytest.mark.usefixtures("root")
def test_set_meta_replaces_shared_inodes(tmp_path: Path) -> None:
    need_root()
    src = tmp_path / "upper"
    (src / "d").mkdir(parents=True)
    (src / "d" / "file").write_bytes(b"data\n")
    os.symlink("file", src / "d" / "link")
    os.mknod(src / "d" / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mkfifo(src / "d" / "fifo", 0o644)
    os.setxattr(src / "d" / "file", "trusted.overlay.test", b"kept")
    before = _snapshot(src)
    new = tmp_path / "upper.new"
    fsops.link_copy(src, new)

    for name in ("file", "link", "wh", "fifo"):
        real = new / "d" / name
        entry = stat_entry(str(real), f"/d/{name}", hash_files=False)
        mode = 0o640 if entry.kind != "symlink" else entry.mode
        fsops.set_meta(new, f"/d/{name}", replace(entry, uid=4321, gid=4321, mode=mode))
        after = os.lstat(real)
        assert (after.st_uid, after.st_gid) == (4321, 4321), name
        if entry.kind != "symlink":
            assert stat.S_IMODE(after.st_mode) == 0o640, name
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(os.lstat(src / "d" / name).st_mode)
        assert after.st_ino != os.lstat(src / "d" / name).st_ino, name

    assert _snapshot(src) == before  # the source tree: not one owner, mode or inode changed
    assert (new / "d" / "file").read_bytes() == b"data\n"
    assert os.readlink(new / "d" / "link") == "file"
    assert os.lstat(new / "d" / "wh").st_rdev == os.makedev(0, 0)
    assert os.getxattr(new / "d" / "file", "trusted.overlay.test") == b"kept"


@pytest.mark.usefixtures("root")
def test_lookups_in_an_upper_layer_never_follow_its_symlinks(tmp_path: Path) -> None:
    """resolve's lookups (entry_at, opaque_above) through a guest's symlinked directory see
    nothing of the host directory it points at."""
    need_root()  # trusted.* xattrs
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "shadow").write_text("secret\n")
    os.setxattr(host / "etc", "trusted.overlay.opaque", b"y")
    upper = tmp_path / "upper"
    upper.mkdir()
    os.symlink(host, upper / "link")
    (upper / "real" / "sub").mkdir(parents=True)
    (upper / "real" / "sub" / "f").write_text("mine\n")
    os.setxattr(upper / "real", "trusted.overlay.opaque", b"y")
    assert fsops.entry_at(upper, "/link/etc/shadow") is None
    assert fsops.opaque_above(upper, "/link/etc/shadow") is False
    entry = fsops.entry_at(upper, "/real/sub/f")
    assert entry is not None and entry.kind == "file" and entry.size == 5
    link = fsops.entry_at(upper, "/link")
    assert link is not None and link.kind == "symlink" and link.target == str(host)
    assert fsops.opaque_above(upper, "/real/sub/f") is True
    assert fsops.entry_at(upper, "/missing/x") is None


def test_open_beneath_both_ways(tmp_path: Path) -> None:
    """openat2 and the O_NOFOLLOW walk refuse the same things: symlinks anywhere, '..',
    absolute paths, mount crossings; they open plain paths."""
    root = tmp_path / "u"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_text("x")
    os.symlink("e", root / "d" / "ln")
    os.symlink("/etc", root / "abs")
    saved = fsops.openat2.usable
    try:
        for use in (True, False):
            fsops.openat2.usable = use
            with fsops.opened_root(root) as rfd:
                fd = fsops.open_beneath(rfd, "d/e/f", os.O_RDONLY)
                assert os.read(fd, 10) == b"x"
                os.close(fd)
                for bad in ("d/ln/f", "d/ln", "abs/passwd", "abs"):
                    with pytest.raises(OSError) as info:
                        os.close(fsops.open_beneath(rfd, bad, os.O_RDONLY))
                    assert info.value.errno == errno.ELOOP, (use, bad)
                for bad in ("../u/d", "d/../d"):
                    with pytest.raises(ValueError):
                        fsops.open_beneath(rfd, bad, os.O_RDONLY)
    finally:
        fsops.openat2.usable = saved


@pytest.mark.usefixtures("root")
def test_open_beneath_refuses_a_mount_crossing(tmp_path: Path) -> None:
    need_root()
    root = tmp_path / "u"
    (root / "m").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "m")], check=True)
    saved = fsops.openat2.usable
    try:
        (root / "m" / "f").write_text("x")
        for use in (True, False):
            fsops.openat2.usable = use
            with fsops.opened_root(root) as rfd, pytest.raises(OSError) as info:
                os.close(fsops.open_beneath(rfd, "m/f", os.O_RDONLY))
            assert info.value.errno == errno.EXDEV, use
    finally:
        fsops.openat2.usable = saved
        subprocess.run(["umount", str(root / "m")], check=True)


def test_check_tree_plain_deep_and_hostile(tmp_path: Path) -> None:
    """A guest's .hg nested 3000 deep is walked without recursion; a symlink or fifo at the
    bottom is found; Mercurial's own checklink link is tolerated with its own target only."""
    root = tmp_path / "u"
    deep = root / ".hg"
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:  # by fd: the path would exceed PATH_MAX
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.symlink("/etc/passwd", "evil", dir_fd=fd)
    finally:
        os.close(fd)
    try:
        with pytest.raises(fsops.UnsafePath):
            fsops.check_tree_plain(root, ".hg")  # the symlink, or a path too long: refused
    finally:  # rm handles any depth; pytest's own clean-up (shutil.rmtree) would recurse
        subprocess.run(["rm", "-rf", str(root)], check=True)
    shallow = tmp_path / "v"
    (shallow / ".hg" / "wcache").mkdir(parents=True)
    (shallow / ".hg" / "store" / "data").mkdir(parents=True)
    (shallow / ".hg" / "store" / "data" / "a.i").write_bytes(b"\0")
    os.symlink("checklink-target", shallow / ".hg" / "wcache" / "checklink")
    allowed = {".hg/wcache/checklink": b"checklink-target"}
    assert fsops.check_tree_plain(shallow, ".hg", allowed) == 5
    with pytest.raises(fsops.UnsafePath):
        fsops.check_tree_plain(shallow, ".hg")
    os.unlink(shallow / ".hg" / "wcache" / "checklink")
    os.symlink("/etc/passwd", shallow / ".hg" / "wcache" / "checklink")
    with pytest.raises(fsops.UnsafePath):
        fsops.check_tree_plain(shallow, ".hg", allowed)
    os.unlink(shallow / ".hg" / "wcache" / "checklink")
    os.mkfifo(shallow / ".hg" / "store" / "data" / "b.i")
    with pytest.raises(fsops.UnsafePath, match="fifo"):
        fsops.check_tree_plain(shallow, ".hg", allowed)
