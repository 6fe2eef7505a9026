"""The store: everything unionimg owns on a host, and how it is written safely.

Layout (format 2)::

    STORE/                    0700
      store.json              {"format": 2}
      locks/                  flock files: store.lock, base-NAME.lock, instance-VM.lock
      tmp/PID.START.RAND/     staging; a dead owner's staging is unmounted and removed
      bases/NAME/
        base.json             name, created
        history/              Mercurial repository, one changeset per generation
        generations/N/        immutable once renamed into place:
          base.img            raw ext4 labeled BASE (0600): the whole tree (a full generation)
          layer.img           or (a delta generation) only its changes from its parent, in
                              overlayfs upper format, labeled L + 15 hex of its diff_id;
                              the generation's tree is the chain down to a full one
          manifest.sqlite     every path's type/mode/owner/xattrs/sha256 (indexed lookups)
          generation.json     number, created, size, hg node, kernel; kind, parent, layer
          vmlinuz             the generation's kernel, when it has one
        deltas/B0-B1.json     reconcile's base delta, computed once per pair of generations
        checks/N.json         the consistency checks' result on generation N alone
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
      layers/sha256/HEX/      a layer (diff_id HEX): layer.json, layer.img, blob.tar.zst
      layers/pins/            flock-held pins: a layer a running command will reference
      downloads/              blobs being pulled (resumed from here), swept under the pull lock
      systems/NAME/           a node of the system tree: system.json (deployed.json on a host)
      hosts/                  the store's SSH key; hosts/NAME/: host.json, known_hosts
      snapshots/              VM snapshots: chunks/AB/HEX, vms/VM/ID.json (docs/snapshots.md)
      migrate/                a migration receiver's object cache and indexes (docs/migrate.md)
      placement/applied.json  the placement last applied to hosts (docs/placement.md)

Objects appear only by ``rename(2)`` of a fully built staging directory, so a crash at any
point leaves either the old state or the new one, never half an object. Each JSON file is a
typed record of :mod:`unionimg.store.records` or a ``*_records`` module beside it (its
fields, its name), read and written with :func:`read_record` and :func:`write_record`
(atomically).
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
from typing import Any, TypeVar

from unionimg.errors import Conflict, UsageError
from unionimg.fs.mounts import unmount_tree
from unionimg.store.records import DamagedRecord, Record, RecordError, StoreMeta

R = TypeVar("R", bound=Record)

log = logging.getLogger(__name__)
DEFAULT_STORE = "/var/lib/unionimg"
FORMAT = 2
#: Format 2 added delta generations and the layer store (issue 13), which an older unionimg
#: would misread (a generation without base.img). A format-1 store is a valid format-2 store:
#: it is upgraded (the number only) the first time this unionimg opens it, so from then on an
#: older unionimg refuses it in one line instead of failing on what it does not know.
UPGRADES_FROM = (1,)


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


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_record(path: Path, record: Record) -> None:
    """``record`` as ``path`` (indented JSON, keys sorted), written atomically."""
    write_json(path, record.to_json())


def read_record(path: Path, kind: type[R]) -> R:
    """The record of type ``kind`` in ``path``; :class:`DamagedRecord` naming the file and
    the field when it is not what unionimg writes there. A missing file raises
    :class:`FileNotFoundError`, as ``open`` does."""
    try:
        data = read_json(path)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise DamagedRecord(_damaged(path, kind, f"it is not JSON ({exc})")) from None
    try:
        return kind.from_json(data)
    except RecordError as exc:
        raise DamagedRecord(_damaged(path, kind, str(exc))) from None


def _damaged(path: Path, kind: type[Record], why: str) -> str:
    return (
        f"{kind.WHAT} {path} is damaged: {why}; unionimg never writes it so (edited by "
        "hand, or by another unionimg version?): restore it from a backup"
    )


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
        return (self.root / StoreMeta.FILE).is_file()

    def init(self) -> None:
        """Create the store if needed (0700) and sweep staging left by dead processes."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"store path {self.root} exists and is not a directory")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in (self.bases_dir, self.instances_dir, self.tmp_dir, self.run_dir, self.locks_dir):
            sub.mkdir(mode=0o700, exist_ok=True)
        if not self.exists():
            write_record(self.root / StoreMeta.FILE, StoreMeta(FORMAT, now_iso()))
        else:
            meta = read_record(self.root / StoreMeta.FILE, StoreMeta)
            fmt = meta.format
            if fmt in UPGRADES_FROM:
                write_record(self.root / StoreMeta.FILE, meta.replace(format=FORMAT))
                log.info("store %s upgraded from format %d to %d", self.root, fmt, FORMAT)
            elif fmt != FORMAT:
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
