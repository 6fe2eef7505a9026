"""An instance's local changes, read from its upper directory (cost ∝ the upper layer)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from unionimg.entries import DIR, FILE, WHITEOUT, Entry, outside_roots, sidecar_text
from unionimg.errors import StoreFull, ToolFailed, UnionimgError
from unionimg.faults import checkpoint
from unionimg.fs import fsops
from unionimg.fs.manifest import scan_tree
from unionimg.fs.mounts import find_mount
from unionimg.fs.space import (
    SPACE_MARGIN,
    WriteWatch,
    free_space,
    mount_point,
    require_space,
    write_failure,
)
from unionimg.layers import history
from unionimg.layers.base import generations, get_generation
from unionimg.layers.chainview import chain_lookup
from unionimg.layers.instance import Instance, base_ref, durable, load, u_layer
from unionimg.layers.ucheck import forget, sync_image
from unionimg.names import human_size
from unionimg.store.layout import Store
from unionimg.store.records import BaseRef, JsonObject, compact

logger = logging.getLogger(__name__)

# What a commit adds to U per file beyond its content (its revlog's inode, directory entry
# and the journal blocks of that metadata) and per path (its sidecar line, committed too,
# and its line in the manifest revision); what U keeps free beyond an estimate.
HG_FILE_OVERHEAD = 8 << 10
HG_PATH_OVERHEAD = 512
U_MARGIN = 2 << 20
HG_MAX_FILE = 2 << 30  # Mercurial stores no file this large, so it adds nothing to U


class Lookup(Protocol):
    def get(self, path: str) -> Entry | None: ...


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        return {k: sorted(v, key=os.fsencode) for k, v in self.__dict__.items()}


def classify(upper: Iterable[Entry], base: Lookup) -> Changes:
    """Sort the upper layer's entries against the base generation. Pure."""
    out = Changes()
    for e in upper:
        if e.path == "/":
            continue
        b = base.get(e.path)
        if e.kind == WHITEOUT:
            out.deleted.append(e.path)
            continue
        if e.redirect or e.metacopy:
            out.special.append(e.path)
        if e.kind == DIR:
            if e.opaque:
                out.opaque.append(e.path)
            if b is None:
                out.added.append(e.path)
            elif b.kind != DIR:
                out.modified.append(e.path)
            elif not e.same_meta(b):
                out.metadata.append(e.path)
            continue
        if e.link is not None or e.kind in ("sock", "chr", "blk", "fifo"):
            out.special.append(e.path)
        if b is None:
            out.added.append(e.path)
        elif not e.same_content(b):
            out.modified.append(e.path)
        elif not e.same_meta(b):
            out.metadata.append(e.path)
        else:
            out.identical.append(e.path)
    return out


def scan_upper(u_root: Path, *, hash_files: bool = True, digests: bool = True) -> list[Entry]:
    """The upper layer's entries; those Mercurial cannot hold (see
    :func:`entries.hg_unfit`) carry ``outside`` and, with ``digests``, their digest."""
    return scan_tree(u_root / "upper", hash_files=hash_files, hg_prefix="upper", digests=digests)


def _hashed_like_base(upper: Path, entries: list[Entry], base: Lookup) -> list[Entry]:
    """``entries`` with the sha256 of each regular file whose base counterpart is a file of
    the same size: the only ones whose content needs reading to compare (a size that
    differs already says "modified"). So a guest's huge sparse file costs nothing here."""
    out = []
    for e in entries:
        if e.kind == FILE and e.sha256 is None:
            b = base.get(e.path)
            if b is not None and b.kind == FILE and b.size == e.size:
                e = replace(e, sha256=fsops.sha256_of(upper, e.path))
        out.append(e)
    return out


def status(store: Store, name: str) -> JsonObject:
    """The VM's local changes: its upper layer against what lies under it — its base
    generation, or with snapshot layers the top layer's view of its chain
    (:mod:`.chainview`: each layer mounted and scanned, its files read only where a
    changed file of the same size needs comparing)."""
    inst = load(store, name)
    gen = get_generation(store, inst.base, inst.generation)
    latest = generations(store, inst.base)[-1].number
    with (
        u_layer(store, name, write=False) as u,
        gen.manifest() as m,
        chain_lookup(store, m, inst.layers) as below,
    ):
        entries = scan_upper(u, hash_files=False, digests=False)
        changes = classify(_hashed_like_base(u / "upper", entries, below), below)
    return {
        "name": name,
        "base": inst.base,
        "generation": inst.generation,
        "latest_generation": latest,
        "newer_generation": latest > inst.generation,
        **changes.to_json(),
    }


def commit(store: Store, name: str, message: str | None) -> str | None:
    """Commit the upper layer; the changeset is reported only once it is on disk: U is
    synced (every write-back error since the commit began is caught) and a fresh Mercurial
    process finds the changeset. Space is checked first on U and on the store."""
    inst = load(store, name)
    what = f"commit {name}"
    with (
        store.lock(f"instance-{name}", purpose=f"commit {name}"),
        u_layer(store, name, write=True) as u,
        WriteWatch(u) as watch,
    ):
        check_u_writable(store, u, name, what)
        entries = scan_upper(u, hash_files=False)
        require_u_space(store, u, name, commit_estimate(u, entries), what)
        checkpoint("commit:checked")
        try:
            node = commit_u(u, inst, message, entries)
            sync_image(watch, store.root, name, what)
        except (OSError, ToolFailed) as exc:
            raise blame_space(exc, store, u, name, what) from exc
        if node is not None:
            history.verify_node(u, node)
        durable(u)
        return node


# -- space and durability of writes into U ---------------------------------------------------
def commit_estimate(u: Path, entries: Iterable[Entry], extra_files: Iterable[int] = ()) -> int:
    """About how many bytes committing the upper layer adds to U (and so, U being sparse, to
    the store): every regular file changed since Mercurial last wrote its dirstate (by its
    ctime; content stored compressed, at worst raw), ``extra_files`` (sizes of files the
    caller is about to write), and per path its sidecar and manifest lines."""
    try:
        since = os.lstat(u / ".hg" / "dirstate").st_mtime - 2
    except OSError:
        since = float("-inf")  # never committed: everything is new
    upper = os.fsencode(u / "upper")
    total = 0
    for e in entries:
        total += HG_PATH_OVERHEAD
        if e.kind != FILE or e.size >= HG_MAX_FILE or e.outside is not None:
            continue  # out of Mercurial: nothing goes into U for it
        try:
            st = os.lstat(upper + os.fsencode(e.path))
        except OSError:
            continue
        if st.st_ctime >= since:
            total += _file_cost(e.size)
    return total + sum(_file_cost(n) for n in extra_files if n < HG_MAX_FILE)


def _file_cost(size: int) -> int:
    return (size + 64 + 4095) // 4096 * 4096 + HG_FILE_OVERHEAD


def require_u_space(
    store: Store, u: Path, name: str, needed: int, what: str, *, store_extra: int = 0
) -> None:
    """Room for ``needed`` more bytes in U's own filesystem and for ``needed`` +
    ``store_extra`` in the store's (U is a sparse file there: its growth is the store's;
    ``store_extra``: what the caller writes into the store itself); :class:`StoreFull`
    otherwise."""
    require_space(
        u,
        needed,
        what,
        margin=U_MARGIN,
        hint=f"the U image of {name} is full: remove files in the VM, then retry",
    )
    require_space(store.root, needed + store_extra, what)


def check_u_writable(store: Store, u: Path, name: str, what: str) -> None:
    """Refuse a U whose filesystem went read-only (its journal aborted after a write error,
    e.g. the store filled up while the union was mounted): what was written there since is
    lost, and writing more would report changes that never reach the disk."""
    entry = find_mount(u)
    opts = set(entry.options.split(",")) if entry is not None else set()
    if not os.statvfs(u).f_flag & os.ST_RDONLY and not opts & {"ro", "emergency_ro"}:
        return
    free = free_space(store.root)
    said = (
        f"the U image of {name} went read-only after a write error (its recent writes are "
        f"lost); umount it, free space, and retry to {what}"
    )
    if free < SPACE_MARGIN:
        raise StoreFull(f"store full: {human_size(free)} free on {mount_point(store.root)}; {said}")
    raise ToolFailed(said)


def blame_space(
    exc: OSError | UnionimgError, store: Store, u: Path, name: str, what: str
) -> BaseException:
    """The error to report for a write into U that failed: :class:`StoreFull` when U or the
    store ran out of space (hg says 'No space left on device', 'Input/output error' or
    'Read-only file system' after U's journal aborted), else ``exc`` itself. U may then
    have lost writes: it is checked (e2fsck) before its next mount."""
    if isinstance(exc, StoreFull):
        return exc
    full: StoreFull | None = None
    if isinstance(exc, OSError):  # its file names the filesystem that is full: U's or the store's
        full = write_failure(exc, exc.filename or u, what, store_path=store.root)
    elif "No space left on device" in exc.message and (u_free := free_space(u)) < U_MARGIN:
        full = StoreFull(
            f"store full: {human_size(u_free)} free on {u} (the U image of {name}); "
            f"{what} failed ({exc.message}); remove files in the VM, then retry"
        )
    elif free_space(store.root) < SPACE_MARGIN and any(
        s in exc.message for s in ("No space left", "Input/output error", "Read-only file system")
    ):
        full = write_failure(OSError(errno.EIO, "I/O error"), u, what, store_path=store.root)
    if full is None:
        return exc
    try:
        forget(store, name)
    except OSError as err:
        logger.warning("cannot drop the check stamp of %s: %s", name, err)
    return full


def write_history_sidecar(u: Path, inst: Instance, entries: list[Entry] | None = None) -> list[str]:
    """The sidecar of the upper layer (``entries``: a fresh scan of it by
    :func:`scan_upper`, if the caller has one) and the base generation it sits on, and
    U's ``.hgignore``, ready to commit. Returns the paths (relative to U's root) to keep
    out of Mercurial (pass them to :meth:`history.Repo.commit_all`): what it cannot hold
    is recorded in the sidecar by size and digest instead, and never blocks a commit."""
    if entries is None:
        # the sidecar leaves content to Mercurial: hash nothing but what it cannot hold
        entries = scan_upper(u, hash_files=False)
    history.write_sidecar(
        u,
        sidecar_text(entries),
        {BaseRef.FILE: compact(base_ref(inst))},
    )
    outside = ["upper" + ("" if p == "/" else p) for p in outside_roots(entries)]
    outside += history.volatile_roots(e.path for e in entries)  # forgotten if tracked before
    # unionimg's own file: a guest's version could read host files (include:), hide the
    # upper layer or stall Mercurial on a pathological pattern
    fsops.write_beneath(u, ".hgignore", history.hgignore_text().encode())
    return outside


def commit_u(
    u: Path, inst: Instance, message: str | None, entries: list[Entry] | None = None
) -> str | None:
    """Record the upper layer (files in hg, the rest in the sidecar) as one changeset.
    ``entries``: a fresh unhashed scan of it, if the caller has one."""
    outside = write_history_sidecar(u, inst, entries)
    msg = message or f"local changes of {inst.name} on {inst.base} generation {inst.generation}"
    with history.open_repo(u, guest=inst.name) as repo:
        return repo.commit_all(msg, outside=outside)


def log(store: Store, name: str) -> list[history.Changeset]:
    load(store, name)
    with u_layer(store, name, write=False) as u, history.open_repo(u, guest=name) as repo:
        return repo.log()
