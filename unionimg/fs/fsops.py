"""File operations inside an upper tree, confined to it.

Every path is walked component by component with ``O_NOFOLLOW`` from the tree's root, so a
symlink a guest planted in its upper layer can never make the host read or write outside it.
Paths beneath a U root (``upper``, ``work``, ``.hg``, the sidecars) are resolved with
:func:`open_beneath`: ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`` where the kernel has it, else the same walk with
``O_NOFOLLOW`` and a device check on every component.
Files are replaced by writing a new inode and renaming it over the old name, never by
writing in place: a tree that shares inodes with another (a hardlink copy) stays untouched,
and a reader never sees half a file. For durability, callers :func:`syncfs` once before they
make a tree live, instead of an fsync per file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from unionimg.entries import DIR, FILE, SYMLINK, Entry
from unionimg.errors import GuestDataRefused
from unionimg.fs.manifest import stat_entry

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
    overlay's opaque markers included. By directory descriptors: any depth (a guest may
    nest thousands of directories, far past PATH_MAX), a bounded number of them open."""

    def copy_dir_meta(sfd: int, dfd: int) -> None:
        st = os.fstat(sfd)
        os.fchown(dfd, st.st_uid, st.st_gid)
        os.fchmod(dfd, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(sfd):
            os.setxattr(dfd, name, os.getxattr(sfd, name))

    def fill(sfd: int, dfd: int) -> list[str]:
        """Link every non-directory of ``sfd`` into ``dfd``; make (and return) its
        subdirectories."""
        copy_dir_meta(sfd, dfd)
        subdirs = []
        with os.scandir(sfd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    os.mkdir(entry.name, 0o700, dir_fd=dfd)
                    subdirs.append(entry.name)
                else:  # symlinks (also to directories), files, nodes, whiteouts
                    os.link(
                        entry.name,
                        entry.name,
                        src_dir_fd=sfd,
                        dst_dir_fd=dfd,
                        follow_symlinks=False,
                    )
        return subdirs[::-1]

    os.mkdir(dst, 0o755)
    frames: list[list[Any]] = []  # [src fd | None, dst fd | None, subdirectories left]
    try:
        sfd = os.open(src, _DIR_FLAGS)
        frames.append([sfd, None, []])
        frames[-1][1] = os.open(dst, _DIR_FLAGS)
        frames[-1][2] = fill(frames[-1][0], frames[-1][1])
        while frames:
            frame = frames[-1]
            if not frame[2]:
                frames.pop()
                if frames and frames[-1][0] is None:  # came back up past the kept fds
                    frames[-1][0] = os.open("..", _DIR_FLAGS, dir_fd=frame[0])
                    frames[-1][1] = os.open("..", _DIR_FLAGS, dir_fd=frame[1])
                os.close(frame[0])
                os.close(frame[1])
                continue
            name = frame[2].pop()
            child: list[Any] = [os.open(name, _DIR_FLAGS, dir_fd=frame[0]), None, []]
            frames.append(child)
            child[1] = os.open(name, _DIR_FLAGS, dir_fd=frame[1])
            if len(frames) > _FDS_KEPT:
                os.close(frame[0])
                os.close(frame[1])
                frame[0] = frame[1] = None
            child[2] = fill(child[0], child[1])
    finally:
        for frame in frames:
            for fd in frame[:2]:
                if fd is not None:
                    os.close(fd)


_FDS_KEPT = 32  # directory descriptors kept open on the way down a deep tree


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of an fsync per file:
    callers build a tree, sync once, then make it live with one atomic rename)."""
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
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    res = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 exchange failed: {os.strerror(err)}", str(a))


def remove_tree(path: Path) -> None:
    """rm -r without following symlinks (a tree of an upper layer: whiteouts and all). By
    directory descriptors, iterative: any depth, a bounded number of them open."""
    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)
        return
    if not path.is_dir():
        path.unlink()
        return
    parent = os.open(path.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    frames: list[list[Any]] = [[parent, None, []]]  # [fd | None, name in parent, dirs left]

    def clear(fd: int) -> list[str]:
        """Unlink every non-directory of ``fd``; return its subdirectories."""
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
        return subdirs

    try:
        frames.append([os.open(path.name, _DIR_FLAGS, dir_fd=parent), path.name, []])
        frames[-1][2] = clear(frames[-1][0])
        while len(frames) > 1:
            frame = frames[-1]
            if frame[2]:
                name = frame[2].pop()
                frames.append([os.open(name, _DIR_FLAGS, dir_fd=frame[0]), name, []])
                if len(frames) > _FDS_KEPT:
                    os.close(frame[0])
                    frame[0] = None
                frames[-1][2] = clear(frames[-1][0])
                continue
            frames.pop()
            up = frames[-1]
            if up[0] is None:  # came back up past the kept fds
                up[0] = os.open("..", _DIR_FLAGS, dir_fd=frame[0])
            os.close(frame[0])
            frame[0] = None
            os.rmdir(frame[1], dir_fd=up[0])
    finally:
        for frame in frames:
            if frame[0] is not None:
                os.close(frame[0])


# -- resolving beneath a guest-written root, never through a symlink ------------------------
_SYS_OPENAT2 = 437  # x86_64 and every other Linux architecture (the unified syscall table)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _Openat2:
    """``openat2(2)`` through ``syscall(2)`` (Python has no wrapper); ``usable`` turns False
    the first time the kernel says it lacks the call (ENOSYS), and the O_NOFOLLOW walk
    takes over."""

    def __init__(self) -> None:
        self.usable = True
        self._syscall = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.syscall
            fn.restype = ctypes.c_long
            fn.argtypes = [
                ctypes.c_long,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.POINTER(_OpenHow),
                ctypes.c_size_t,
            ]
            self._syscall = fn
        except (OSError, AttributeError):
            self.usable = False

    def __call__(self, dirfd: int, path: bytes, flags: int, mode: int) -> int | None:
        """The new fd, or None when the kernel has no openat2."""
        if not self.usable or self._syscall is None:
            return None
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE)
        fd = int(self._syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            self.usable = False
            return None
        raise OSError(err, os.strerror(err), os.fsdecode(path))


openat2 = _Openat2()


class UnsafePath(GuestDataRefused):
    """A path beneath a guest-written root is a symlink, crosses a mount, or is not the kind
    of object it must be. ``rel`` is the path relative to that root."""

    def __init__(self, rel: str, why: str) -> None:
        super().__init__(f"{rel} {why}")
        self.rel = rel
        self.why = why


def _why(err: int) -> str:
    if err == errno.ELOOP:
        return "is a symlink (or lies under one); unionimg never follows links in guest data"
    if err == errno.EXDEV:
        return "leaves the file system it must be on"
    if err == errno.ENOTDIR:
        return "lies under something that is not a directory"
    return os.strerror(err).lower()


def _walk_nofollow(dirfd: int, parts: list[bytes], flags: int, mode: int) -> int:
    """What openat2 does, by hand: every component opened with O_NOFOLLOW (O_PATH, so
    nothing is read), a symlink refused (ELOOP), a change of device refused (EXDEV)."""
    dev = os.fstat(dirfd).st_dev
    fd = os.dup(dirfd)
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(nfd)
            os.close(fd)
            fd = nfd
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(comp))
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(comp))
            if st.st_dev != dev:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fsdecode(comp))
        last = parts[-1]
        if not flags & os.O_CREAT or not flags & os.O_EXCL:
            # the last component: a symlink or another device is refused before it is used
            try:
                pfd = os.open(last, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
            else:
                try:
                    st = os.fstat(pfd)
                finally:
                    os.close(pfd)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(last))
                if st.st_dev != dev:
                    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fsdecode(last))
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def open_beneath(dirfd: int, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open ``rel`` beneath the directory ``dirfd`` without following any symlink, without
    leaving it (no ``..``, no absolute path) and without crossing a mount. Raises
    :class:`OSError` (ELOOP for a symlink, EXDEV for a mount crossing, ENOENT, ...)."""
    parts = _parts(rel)
    if not parts:
        return os.dup(dirfd)
    fd = openat2(dirfd, b"/".join(parts), flags, mode)
    if fd is not None:
        return fd
    return _walk_nofollow(dirfd, parts, flags, mode)


@contextlib.contextmanager
def opened_root(root: Path) -> Iterator[int]:
    """An fd of the directory ``root`` (a trusted path: a mount point in the store)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_beneath(root: Path, rel: str) -> os.stat_result | None:
    """The stat of ``rel`` beneath ``root`` (None when it does not exist); a symlink on the
    way or at the end raises :class:`UnsafePath`."""
    with opened_root(root) as rfd:
        try:
            fd = open_beneath(rfd, rel, os.O_PATH)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnsafePath(rel, _why(exc.errno or 0)) from exc
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)


def _open_parent(rfd: int, rel: str) -> tuple[int, bytes]:
    """(fd of the parent of ``rel`` beneath ``rfd``, created if missing; last component)."""
    parts = _parts(rel)
    if not parts:
        raise ValueError("the root itself has no parent")
    fd = os.dup(rfd)
    try:
        for comp in parts[:-1]:
            try:
                nfd = open_beneath(fd, os.fsdecode(comp), os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(comp, 0o755, dir_fd=fd)
                nfd = open_beneath(fd, os.fsdecode(comp), os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def write_beneath(root: Path, rel: str, data: bytes, *, append: bool = False) -> None:
    """Write (replace, or with ``append`` append to) the regular file ``rel`` beneath
    ``root``, missing directories created, no symlink followed anywhere: a replaced file is
    written under a temporary name and renamed over ``rel``; an existing ``rel`` that is
    not a regular file (a symlink, a fifo, ...) is refused with :class:`UnsafePath`."""
    with opened_root(root) as rfd:
        try:
            dfd, name = _open_parent(rfd, rel)
        except OSError as exc:
            raise UnsafePath(rel, _why(exc.errno or 0)) from exc
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                why = _why(errno.ELOOP) if stat.S_ISLNK(st.st_mode) else "is not a regular file"
                raise UnsafePath(rel, why)
            if append:
                # O_NONBLOCK: a fifo put there meanwhile must not hang the host (checked below)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                try:
                    fd = open_beneath(dfd, os.fsdecode(name), flags, 0o644)
                except OSError as exc:
                    raise UnsafePath(rel, _why(exc.errno or 0)) from exc
                with os.fdopen(fd, "ab") as fh:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise UnsafePath(rel, "is not a regular file")
                    fh.write(data)
                return
            tmp = b".unionimg-" + secrets.token_hex(6).encode()
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(dfd)


def check_tree_plain(
    root: Path, rel: str, allowed_links: Mapping[str, bytes | None] | None = None
) -> int:
    """Walk the directory ``rel`` beneath ``root`` (say, a Mercurial repository) and refuse
    (:class:`UnsafePath`) any symlink, device node, fifo or socket in it, and anything on
    another device: afterwards a program may use it by path (as long as nobody else can
    write it: the caller holds the file system exclusively). Returns the entries seen.
    ``allowed_links``: symlinks (relative to ``root``) tolerated with exactly that target
    (``None``: any target — for links that are only ever read with ``readlink``).
    A sparse regular file is refused too (a reader that takes a file whole, as Mercurial
    does its dirstate, would take the host's memory).

    Iterative (a guest may nest directories thousands deep) and by path below the checked
    top: nothing but the host writes the tree while it is checked and used."""
    top_st = lstat_beneath(root, rel)
    if top_st is None:
        return 0
    if not stat.S_ISDIR(top_st.st_mode):
        raise UnsafePath(rel, "is not a directory")
    base = os.fsencode(root)
    stack = [os.fsencode(rel).strip(b"/")]
    seen = 0
    while stack:
        cur = stack.pop()
        try:
            with os.scandir(base + b"/" + cur) as it:
                entries = list(it)
        except OSError as exc:
            raise UnsafePath(os.fsdecode(cur), _why(exc.errno or 0)) from exc
        for entry in entries:
            seen += 1
            sub = cur + b"/" + entry.name
            try:
                if entry.is_symlink():
                    links = allowed_links or {}
                    name = os.fsdecode(sub)
                    if name in links:
                        want = links[name]
                        if want is None or os.readlink(entry.path) == want:
                            continue
                    raise UnsafePath(os.fsdecode(sub), _why(errno.ELOOP))
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise UnsafePath(os.fsdecode(sub), _why(exc.errno or 0)) from exc
            if st.st_dev != top_st.st_dev:
                raise UnsafePath(os.fsdecode(sub), _why(errno.EXDEV))
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)
            elif not stat.S_ISREG(st.st_mode):
                raise UnsafePath(os.fsdecode(sub), "is a device node, fifo or socket")
            elif st.st_size > 4 * st.st_blocks * 512 + (1 << 20):  # (4x: fs compression)
                raise UnsafePath(os.fsdecode(sub), f"is a sparse file of {st.st_size} bytes")
    return seen


def entry_at(root: Path, path: str) -> Entry | None:
    """The :class:`Entry` of ``path`` inside the tree ``root`` (an upper layer), or None if
    it is not there — also when a symlink lies on the way (its target is not in the tree)."""
    try:
        with parent_fd(root, path) as (dfd, name):
            st = os.lstat(name, dir_fd=dfd)
            return stat_entry(f"/proc/self/fd/{dfd}/{os.fsdecode(name)}", path, st)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def clear_opaque(root: Path, path: str) -> None:
    """Remove overlay's opaque marker (``trusted.overlay.opaque``) of the directory ``path``
    in the tree ``root`` (none there is fine), no symlink followed."""
    with parent_fd(root, path) as (dfd, name), _xattr_path(dfd, name) as proc:
        try:
            value = os.getxattr(proc, "trusted.overlay.opaque")
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return
            raise
        if value == b"y":
            os.removexattr(proc, "trusted.overlay.opaque")


def opaque_above(root: Path, path: str) -> bool:
    """Whether a directory above ``path`` in the tree ``root`` is opaque (overlay's
    ``trusted.overlay.opaque``), the directories opened without following a symlink."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for comp in _parts(path)[:-1]:
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = nfd
            try:
                if os.getxattr(fd, "trusted.overlay.opaque") == b"y":
                    return True
            except OSError:
                continue
        return False
    finally:
        os.close(fd)
