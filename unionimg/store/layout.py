"""The store: everything unionimg owns on a host, and how it is written safely.

Layout (format 1)::

    STORE/                    0700
      store.json              {"format": 1}
      locks/                  flock files: store.lock, base-NAME.lock, instance-VM.lock
      tmp/PID.START.RAND/     staging; a dead owner's staging is unmounted and removed
      bases/NAME/
        base.json             name, created
        history/              Mercurial repository, one changeset per generation
        generations/N/        immutable once renamed into place:
          base.img            raw ext4 labeled BASE (0600)
          manifest.sqlite     every path's type/mode/owner/xattrs/sha256 (indexed lookups)
          generation.json     number, created, size, hg node, kernel
          vmlinuz             the generation's kernel, when it has one
        deltas/B0-B1.json     reconcile's base delta, computed once per pair of generations
      instances/VM/
        instance.json         name, base, generation, mac, hypervisor, resources
        upper.img             sparse ext4 labeled U: upper/, work/, .hg (the VM's history)
        mount.json            present while the union is mounted
        running.json          present while its guest runs (hypervisor, pid or domain)
        conflicts.json, conflicts/KEY-G/   conflicts set aside by reconcile
        reconcile-journal.json, last-reconcile.json   apply journal, undo record
      boot/                   initramfs per kernel (shared by instances)
      templates/              hg-empty (copied into each new U), hg-anchor (starts hg servers)
      reports/                reconcile reports (last 50) and reconcile.log
      run/VM/                 mount points of the layers of a mounted union
      layers/ systems/ hosts/ snapshots/    reserved for later issues

Objects appear only by ``rename(2)`` of a fully built staging directory, so a crash at any
point leaves either the old state or the new one, never half an object.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unionimg.errors import Conflict, StoreFull, ToolFailed, UsageError

log = logging.getLogger(__name__)
DEFAULT_STORE = "/var/lib/unionimg"
FORMAT = 1
# Added to every estimate of the space an operation needs: ext4 metadata and journal blocks,
# Mercurial's own files, and the estimate's own error.
SPACE_MARGIN = 8 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may hold spaces, so split after ')'
    return stat.rsplit(")", 1)[1].split()[19]


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))

    # -- layout -------------------------------------------------------------------------
    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def base_dir(self, name: str) -> Path:
        return self.bases_dir / name

    def instance_dir(self, name: str) -> Path:
        return self.instances_dir / name

    def exists(self) -> bool:
        return (self.root / "store.json").is_file()

    def init(self) -> None:
        """Create the store if needed (0700) and sweep staging left by dead processes."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"store path {self.root} exists and is not a directory")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in (self.bases_dir, self.instances_dir, self.tmp_dir, self.run_dir, self.locks_dir):
            sub.mkdir(mode=0o700, exist_ok=True)
        if not self.exists():
            write_json(self.root / "store.json", {"format": FORMAT, "created": now_iso()})
        else:
            fmt = read_json(self.root / "store.json").get("format")
            if fmt != FORMAT:
                raise UsageError(
                    f"store {self.root} has format {fmt}, this unionimg reads {FORMAT}; "
                    "use the unionimg version that made it"
                )
        self.sweep_tmp()

    # -- staging ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A private directory under ``tmp/``; removed on exit unless renamed away.

        The name carries our pid and its start time so :meth:`sweep_tmp` can tell a dead
        owner's leftovers (after SIGKILL) from a live process's work.
        """
        start = _proc_start(os.getpid()) or "0"
        path = self.tmp_dir / f"{os.getpid()}.{start}.{label}.{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            if path.exists():
                self._remove_staging(path)

    def publish(self, final: Path, build: Callable[[Path], None]) -> Path:
        """Directory ``final`` (inside the store), made by ``build`` unless it exists: built
        in a staging directory and renamed into place, so threads and processes racing to
        make it all see one complete directory; a loser's copy goes with its staging."""
        if final.is_dir():
            return final
        with self.staging(final.name) as stage:
            build(stage / final.name)
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.rename(stage / final.name, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
            else:
                fsync_dir(final.parent)
        return final

    def sweep_tmp(self) -> list[Path]:
        removed: list[Path] = []
        if not self.tmp_dir.is_dir():
            return removed
        for entry in self.tmp_dir.iterdir():
            parts = entry.name.split(".")
            try:
                pid = int(parts[0])
            except ValueError:
                pid = -1
            if pid > 0 and len(parts) > 1 and _proc_start(pid) == parts[1]:
                continue  # owner alive
            self._remove_staging(entry)
            removed.append(entry)
        return removed

    def _remove_staging(self, path: Path) -> None:
        from unionimg.fs.mounts import unmount_tree

        unmount_tree(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=False)
        else:
            path.unlink(missing_ok=True)

    # -- locks --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, *, wait: bool = True, purpose: str = "") -> Iterator[None]:
        """An exclusive flock ``locks/NAME.lock``; the file says who holds it.

        With ``wait=False`` a held lock raises :class:`Conflict` naming the holder.
        """
        self.locks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.locks_dir / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if not wait:
                    raise Conflict(
                        f"{name} is locked by {holder}; wait for it to finish and retry"
                    ) from None
                log.warning("waiting for %s, held by %s", name, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} {purpose}".strip().encode(), 0)
            yield
        finally:
            os.close(fd)


# -- free space ---------------------------------------------------------------------------
# Every command that grows the store or an image first checks that the filesystem can hold
# it (an estimate + SPACE_MARGIN), so a full disk stops it before anything changed. U images
# are sparse files in the store: a write inside a mounted U allocates blocks of the store's
# filesystem, and when that allocation fails the U's ext4 journal aborts (EIO) and every
# later write to it is lost. Checks happen on both filesystems, and what is written into a
# U is made durable with :class:`WriteWatch` before anything reports it.


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the filesystem holding ``path`` (the nearest existing ancestor's)."""
    p = _existing(path)
    dev = os.stat(p).st_dev
    while p != p.parent and os.stat(p.parent).st_dev == dev:
        p = p.parent
    return str(p)


def free_space(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still allocate on ``path``'s filesystem (df's Avail)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _human(n: int) -> str:
    from unionimg.names import human_size

    return human_size(max(n, 0))


def full_message(
    path: str | os.PathLike[str], needed: int, what: str, *, hint: str | None = None
) -> str:
    """``store full: X free on FS, about Y needed to WHAT; HINT``."""
    mp = mount_point(path)
    return (
        f"store full: {_human(free_space(path))} free on {mp}, about {_human(needed)} needed "
        f"to {what}; {hint or f'free space on {mp} and retry'}"
    )


def require_space(
    path: str | os.PathLike[str],
    needed: int,
    what: str,
    *,
    margin: int = SPACE_MARGIN,
    inodes: int = 64,
    hint: str | None = None,
) -> None:
    """Raise :class:`StoreFull` unless ``path``'s filesystem has ``needed`` + ``margin``
    bytes (and ``inodes`` inodes) free. ``what`` completes "about Y needed to ..."."""
    want = max(needed, 0) + margin
    target = _existing(path)
    st = os.statvfs(target)
    if st.f_bavail * st.f_frsize < want:
        raise StoreFull(full_message(target, want, what, hint=hint))
    if st.f_files and st.f_favail < inodes:
        mp = mount_point(target)
        raise StoreFull(
            f"store full: {st.f_favail} free inodes on {mp}, about {inodes} needed to {what}; "
            f"{hint or f'free inodes on {mp} (remove files) and retry'}"
        )


def is_full_error(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT: the filesystem (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failure(
    exc: OSError, path: str | os.PathLike[str], what: str, *, store_path: Path | None = None
) -> StoreFull | None:
    """The :class:`StoreFull` a failed write stands for, or None if the disk is not full.

    ENOSPC/EDQUOT is one (``path``: where it was written); so is EIO from a U image while
    the store's filesystem (``store_path``) is (nearly) full: the loop device could not
    allocate the sparse image's blocks, the U's journal aborted, and its writes since the
    last sync are lost. The message says so: nobody needs the kernel log to understand it.
    """
    if is_full_error(exc):
        where = path
        why = exc.strerror or str(exc)
    elif (
        exc.errno in (errno.EIO, errno.EROFS)
        and store_path is not None
        and free_space(store_path) < SPACE_MARGIN
    ):
        where = store_path
        why = (
            "the U image could not grow, so its writes failed with an I/O error and were "
            "not recorded"
        )
    else:
        return None
    mp = mount_point(where)
    return StoreFull(
        f"store full: {_human(free_space(where))} free on {mp}; {what} failed ({why}); "
        f"free space on {mp} and retry"
    )


def sync_image(watch: WriteWatch, store_root: Path, owner: str, what: str) -> None:
    """Make what was written into the U image of ``owner`` durable (``watch`` was opened
    before the writes). A write-back error — EIO after U's journal aborted because the store
    could not hold the image's new blocks — raises instead of letting anything report
    writes that are lost."""
    try:
        watch.sync()
    except OSError as exc:
        from unionimg.layers.ucheck import forget

        try:
            forget(Store(store_root), owner)  # U lost writes: e2fsck before its next mount
        except OSError as err:
            log.warning("cannot drop the check stamp of %s: %s", owner, err)
        full = write_failure(exc, store_root, what, store_path=store_root)
        if full is not None:
            raise full from exc
        raise ToolFailed(
            f"writing the U image of {owner} failed ({exc.strerror or exc}) while trying to "
            f"{what}; nothing was recorded; check the disk holding {store_root}"
        ) from exc


def sync_store(watch: WriteWatch, what: str) -> None:
    """Make what was written into the store durable before it is published (``watch``
    opened on the store before the writes: Mercurial, for one, never fsyncs)."""
    try:
        watch.sync()
    except OSError as exc:
        full = write_failure(exc, watch.path, what)
        if full is not None:
            raise full from exc
        raise ToolFailed(
            f"writing the store failed while trying to {what} ({exc.strerror or exc}); "
            f"nothing was published; check the disk holding {mount_point(watch.path)}"
        ) from exc


def _syncfs(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


class WriteWatch:
    """Opened on a filesystem BEFORE writing to it; :meth:`sync` then flushes it and reports
    every write-back error since (the kernel samples the filesystem's error counter when the
    file is opened: ``syncfs`` on a descriptor opened later misses errors the flusher hit in
    between, and ``umount`` reports none at all)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.durable = False  # see instance.durable
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sync(self) -> None:
        """syncfs; OSError (EIO after a journal abort, ENOSPC) if any write was lost."""
        if self._fd is None:
            raise ValueError("WriteWatch is closed")
        try:
            _syncfs(self._fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriteWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
