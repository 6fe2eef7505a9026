"""A base generation's delta from its parent, as an overlayfs upper layer.

The plan (:func:`plan`) compares the new tree's scan with the parent generation's manifest
(both whole trees) and says what a layer over the parent's tree must hold for the overlay of
the two to show exactly the new tree:

* every path whose entry differs (type, content, mode, owner, xattrs: what manifests
  compare), with the directories above it (their metadata is the new tree's: overlayfs shows
  the topmost directory's);
* a whiteout (a 0:0 character device) for each deleted path whose parent directory stays;
  nothing below a deleted or replaced directory (the whiteout or the new entry hides it);
* an opaque directory (``trusted.overlay.opaque=y``) where the base replaced a directory:
  one that lost entries and keeps nothing of its parent's subtree unchanged. Its whole new
  subtree is in the delta anyway, so opacity costs nothing and spares the whiteouts.

:func:`write` copies the planned entries from the new tree into an empty directory (owners,
modes, xattrs, times, device numbers, hardlinks among the copied files), never following a
symlink; ``mke2fs -d`` then makes the layer image of it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unionimg.entries import DIR, FILE, Entry
from unionimg.fs.image import BLOCK
from unionimg.fs.manifest import Manifest

OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTRS = "trusted.overlay."


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _ancestors(path: str) -> Iterable[str]:
    while path != "/":
        path = _parent(path)
        yield path


@dataclass
class Plan:
    """What the delta layer holds: entries copied from the new tree (parents first),
    whiteouts (paths), opaque directories; its bytes and inodes as a full image counts them."""

    copies: list[Entry] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)
    opaque: set[str] = field(default_factory=set)
    changed: int = 0  # paths added, modified or deleted
    used: int = 0
    inodes: int = 0


def plan(entries: list[Entry], parent: Manifest) -> Plan:
    """The delta of ``entries`` (a whole tree, parents before children) over ``parent``."""
    old: dict[str, Entry] = {e.path: e for e in parent}
    new: dict[str, Entry] = {e.path: e for e in entries}
    changed = {e.path for e in entries if not e.same(old.get(e.path))}
    deleted = [p for p in old if p not in new]
    keeps_unchanged: set[str] = set()  # directories with an unchanged entry below them
    for e in entries:
        if e.path not in changed:
            for a in _ancestors(e.path):
                if a in keeps_unchanged:
                    break
                keeps_unchanged.add(a)
    lost_children: set[str] = set()
    for p in deleted:
        lost_children.add(_parent(p))
    opaque = {
        d
        for d in lost_children
        if d != "/"
        and d not in keeps_unchanged
        and (n := new.get(d)) is not None
        and n.kind == DIR
        and (o := old.get(d)) is not None
        and o.kind == DIR
    }
    whiteouts = []
    for p in deleted:
        up = _parent(p)
        above = new.get(up)
        if above is None or above.kind != DIR or old.get(up) is None:
            continue  # below a deleted or replaced directory: hidden by what replaced it
        if up in opaque or any(a in opaque for a in _ancestors(up)):
            continue
        whiteouts.append(p)
    wanted = set(changed) | opaque
    for p in list(wanted) + whiteouts:
        for a in _ancestors(p):
            if a in wanted:
                break
            wanted.add(a)
    wanted.add("/")
    out = Plan(opaque=opaque, whiteouts=sorted(whiteouts))
    out.copies = [e for e in entries if e.path in wanted]  # parents before children
    out.changed = len(changed) + len(deleted)
    for e in out.copies:
        out.used += (e.size + BLOCK - 1) // BLOCK * BLOCK if e.kind == FILE else BLOCK
    out.inodes = len(out.copies) + len(whiteouts)
    return out


def _copy_xattrs(src: bytes, dst: bytes) -> None:
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(_OVERLAY_XATTRS):
            continue  # the staging overlay's own marks, never the tree's
        value = os.getxattr(src, name, follow_symlinks=False)
        os.setxattr(dst, name, value, follow_symlinks=False)


def _copy_data(src: bytes, dst: bytes) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin).st_size
            done = 0
            while done < size:
                sent = os.sendfile(fout, fin, done, min(size - done, 1 << 30))
                if sent == 0:
                    break  # the file shrank meanwhile: the scan said what it holds
                done += sent
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def write(tree: Path, p: Plan, dest: Path) -> None:
    """Write the layer of plan ``p`` into ``dest`` (an existing empty directory), copying
    each entry from ``tree`` (the new generation's tree) with its metadata."""
    src_root, dst_root = os.fsencode(tree), os.fsencode(dest)
    copied: set[str] = set()
    dirs: list[tuple[bytes, os.stat_result]] = []
    for e in p.copies:
        rel = os.fsencode(e.path) if e.path != "/" else b""
        src, dst = src_root + rel, dst_root + rel
        st = os.lstat(src)
        linked = e.kind == FILE and e.link not in (None, e.path) and e.link in copied
        if stat.S_ISDIR(st.st_mode):
            if rel:
                os.mkdir(dst, 0o700)
            dirs.append((dst, st))  # its mode and times once its children are in
        elif linked:
            assert e.link is not None
            os.link(dst_root + os.fsencode(e.link), dst)
            copied.add(e.path)
            continue  # one inode: its metadata is already the group's
        elif stat.S_ISREG(st.st_mode):
            _copy_data(src, dst)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        else:  # character and block devices, FIFOs, sockets
            os.mknod(dst, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
        copied.add(e.path)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                os.chmod(dst, stat.S_IMODE(st.st_mode))
            _copy_xattrs(src, dst)  # after chown, which drops security.capability
            if e.path in p.opaque:
                os.setxattr(dst, OPAQUE_XATTR, b"y")
        if not stat.S_ISDIR(st.st_mode):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    for path in p.whiteouts:
        os.mknod(dst_root + os.fsencode(path), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for dst, st in reversed(dirs):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
