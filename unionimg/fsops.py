"""File operations inside an upper tree, confined to it.

Every path is walked component by component with ``O_NOFOLLOW`` from the tree's root, so a
symlink a guest planted in its upper layer can never make the host read or write outside it.
Files are replaced by writing a new inode and renaming it over the old name, never by
writing in place: a tree that shares inodes with another (a hardlink copy) stays untouched,
and a reader never sees half a file. For durability, callers :func:`syncfs` once before they
make a tree live, instead of an fsync per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from .manifest import DIR, FILE, SYMLINK, Entry

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KEEP_XATTRS = ("trusted.overlay.", "user.overlay.")


def _parts(path: str) -> list[bytes]:
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise ValueError(f"path {path!r} is not normalised")
    return parts


@contextlib.contextmanager
def parent_fd(root: Path, path: str, *, create: bool = False) -> Iterator[tuple[int, bytes]]:
    """(fd of the parent directory of ``path`` inside ``root``, the last component)."""
    parts = _parts(path)
    if not parts:
        raise ValueError("the root itself has no parent")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(comp, 0o755, dir_fd=fd)
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd, parts[-1]
    finally:
        os.close(fd)


def read_file(root: Path, path: str) -> bytes:
    with parent_fd(root, path) as (dfd, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as fh:
            return fh.read()


def sha256_of(root: Path, path: str) -> str:
    """The sha256 (hex) of the regular file ``path`` inside ``root``, opened without
    following a symlink anywhere on the way (the tree is the guest's)."""
    with parent_fd(root, path) as (dfd, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()


@contextlib.contextmanager
def _xattr_path(dfd: int, name: bytes) -> Iterator[str]:
    """A path for xattr calls on ``name`` in directory ``dfd`` (they take no dir_fd): its
    O_PATH descriptor under /proc/self/fd, never following a symlink."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _overlay_xattrs(dfd: int, name: bytes) -> dict[str, bytes]:
    """overlay's own xattrs of ``name`` (kept when the entry is replaced by a fresh copy)."""
    with _xattr_path(dfd, name) as proc:
        try:
            names = os.listxattr(proc)
        except OSError:  # a symlink through O_PATH: Linux keeps no user xattrs there
            return {}
        return {n: os.getxattr(proc, n) for n in names if n.startswith(_KEEP_XATTRS)}


def _set_xattrs(target: bytes, entry: Entry, dfd: int | None) -> None:
    """Make the user-visible xattrs exactly ``entry.xattrs`` (overlay's own are kept)."""
    if dfd is not None:
        with _xattr_path(dfd, target) as proc:
            _set_xattrs(os.fsencode(proc), entry, None)
        return
    if entry.kind == SYMLINK:
        return  # Linux keeps no user xattrs on symlinks; security.* stays as the kernel set it
    want = {name: bytes.fromhex(value) for name, value in entry.xattrs}
    for name in os.listxattr(target):
        if name.startswith(_KEEP_XATTRS):
            continue
        if name not in want:
            os.removexattr(target, name)
    for name, value in want.items():
        os.setxattr(target, name, value)


def set_meta(root: Path, path: str, entry: Entry) -> None:
    """Give an existing entry ``entry``'s owner, mode and xattrs: in place for directories
    (a hardlink copy has its own), by a fresh copy renamed over it for everything else
    (its inode may be shared with another tree, which must not change)."""
    with parent_fd(root, path) as (dfd, name):
        st = os.lstat(name, dir_fd=dfd)
        kept = {} if stat.S_ISDIR(st.st_mode) else _overlay_xattrs(dfd, name)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
            _write_new(dfd, name, replace(entry, kind=FILE), data, keep=kept)
        elif stat.S_ISLNK(st.st_mode):
            target = os.fsdecode(os.readlink(name, dir_fd=dfd))
            _write_new(dfd, name, replace(entry, kind=SYMLINK, target=target), None, keep=kept)
        elif stat.S_ISDIR(st.st_mode):
            os.chown(name, entry.uid, entry.gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(name, entry.mode, dir_fd=dfd)
            _set_xattrs(name, entry, dfd)
        else:  # device node, whiteout, fifo: a new node of the same kind
            _write_new(
                dfd, name, entry, None, node=(stat.S_IFMT(st.st_mode), st.st_rdev), keep=kept
            )


def _write_new(
    dfd: int,
    name: bytes,
    entry: Entry,
    data: bytes | None,
    *,
    node: tuple[int, int] | None = None,
    keep: dict[str, bytes] | None = None,
) -> None:
    """Create ``entry`` under a temporary name, then rename it over ``name``. ``node``
    (file type bits, rdev) makes a device node, whiteout or fifo instead; ``keep``: overlay
    xattrs the replaced entry carried."""
    tmp = b".unionimg-" + secrets.token_hex(6).encode()
    try:
        if node is not None:
            os.mknod(tmp, node[0] | entry.mode, node[1], dir_fd=dfd)
            os.chown(tmp, entry.uid, entry.gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(tmp, entry.mode, dir_fd=dfd)
        elif entry.kind == FILE:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
            with os.fdopen(fd, "wb") as fh:
                fh.write(data or b"")
            os.chown(tmp, entry.uid, entry.gid, dir_fd=dfd)
            os.chmod(tmp, entry.mode, dir_fd=dfd)
        elif entry.kind == SYMLINK:
            os.symlink(entry.target or "", tmp, dir_fd=dfd)
            os.chown(tmp, entry.uid, entry.gid, dir_fd=dfd, follow_symlinks=False)
        else:
            raise ValueError(f"cannot write an entry of kind {entry.kind}")
        if node is None:
            _set_xattrs(tmp, entry, dfd)
        if keep:
            with _xattr_path(dfd, tmp) as proc:
                for xname, value in keep.items():
                    os.setxattr(proc, xname, value)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def write_entry(root: Path, path: str, entry: Entry, data: bytes | None) -> None:
    """Replace (or create) ``path`` by a regular file or symlink as ``entry`` says; a
    directory entry only gets its metadata (created if missing)."""
    with parent_fd(root, path, create=True) as (dfd, name):
        if entry.kind == DIR:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, entry.mode, dir_fd=dfd)
        else:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                    raise IsADirectoryError(f"{path} is a directory in the upper layer")
            _write_new(dfd, name, entry, data)
            return
    set_meta(root, path, entry)


def remove_entry(root: Path, path: str) -> None:
    """Remove a file, symlink, whiteout or EMPTY directory (missing is fine: reruns)."""
    with parent_fd(root, path) as (dfd, name):
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)


def link_copy(src: Path, dst: Path) -> None:
    """A copy of the tree ``src`` at ``dst`` whose non-directories are hardlinks (cheap:
    O(entries), no data copied); directories get their owner, mode and every xattr,
    overlay's opaque markers included."""

    def copy_dir_meta(s: str, d: str) -> None:
        st = os.lstat(s)
        os.chown(d, st.st_uid, st.st_gid)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(s):
            os.setxattr(d, name, os.getxattr(s, name))

    os.mkdir(dst, 0o755)
    copy_dir_meta(str(src), str(dst))
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dst if rel == "." else dst / rel
        for d in dirnames:
            s = os.path.join(dirpath, d)
            if os.path.islink(s):
                os.link(s, out / d, follow_symlinks=False)
                continue
            os.mkdir(out / d, 0o700)
            copy_dir_meta(s, str(out / d))
        for f in filenames:
            os.link(os.path.join(dirpath, f), out / f, follow_symlinks=False)
    # os.walk lists symlinks to directories among dirnames and does not descend: handled


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of an fsync per file:
    callers build a tree, sync once, then make it live with one atomic rename)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (renameat2 RENAME_EXCHANGE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    res = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 exchange failed: {os.strerror(err)}", str(a))


def remove_tree(path: Path) -> None:
    """rm -r without following symlinks (a tree of an upper layer: whiteouts and all)."""
    import shutil

    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path)
