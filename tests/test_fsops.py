"""fsops on a hardlink copy: changing the copy never changes the tree it was copied from."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

from unionimg import fsops
from unionimg.manifest import stat_entry

from .conftest import need_root


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_ino)
    return out


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
