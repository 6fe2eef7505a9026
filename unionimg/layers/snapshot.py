"""Snapshots: a VM's upper layer frozen into an immutable layer; VMs made from any layer.

A VM's image is a chain: its base generation at the bottom (a full generation, or a delta
one over its parents), then the snapshot layers of ``Instance.layers`` (top to bottom), then
its U. Its **image node** is the top of that chain below U: its top snapshot layer, or, with
none, the layer of its base generation (:func:`unionimg.layers.base.generation_layer`).

``instance snapshot VM`` (:func:`snapshot`) freezes U's ``upper/`` into a new layer whose
parent is the VM's image node, and the VM goes on with a fresh, empty upper layer on top of it:

- **The parent of a snapshot on a base generation** is that generation's layer (kind
  ``base``, or ``delta`` over its own parent generation's): a chain must be content-addressed
  down to its root so a host can pull it and check every part. A full generation made before
  issue 13 gets its layer on the first snapshot over it: one read of its tree for the
  diff_id (a few seconds for the 694 MiB Debian fixture), paid once per generation, its image
  hard-linked (no copy). Every later snapshot costs only its own changes.
- **Cost**: O(N) for N bytes changed in the upper layer, never O(base): one read of the
  upper layer (canonical tar, sha256, zstd into the blob), one extraction of the blob and one
  ``mke2fs -d`` of it (the layer's image), one Mercurial commit of it, and removing it from U
  (``fstrim`` then gives U's freed blocks back to the store: U is a sparse file).
  Measured on the Debian fixture (``bench/snapshot.py``, 2 loaded cores): after ``apt-get
  install nginx`` (163 MiB of tar) 15.5 s, a 52.9 MiB blob; after a config edit 2.3 s; the
  587 MiB base is never read (its layer was adopted once, 7.1 s).
- **Identity stays with the VM**: the per-VM identity paths of
  :data:`unionimg.layers.identity.RULES` (machine-id, SSH host keys, random seeds) are left
  out of the layer and kept in the fresh upper layer, so a layer is as free of identity as a
  base generation: a VM made from it (``instance create --from``) gets its own, and a layer
  pushed to a registry carries no private host key.
- **History**: U's ``.hg`` stays (the VM keeps its history), with two changesets: ``snapshot
  L<15 hex>: MSG`` records the upper layer as it was frozen, then ``snapshot L<15 hex>: the
  upper layer starts again`` records the fresh upper layer.
- **Nothing changed** (the upper layer holds nothing but the VM's identity): no new layer,
  no commit, said so. A snapshot interrupted after the instance record named the new layer
  is finished by the next one.
- The VM must be stopped and not mounted, with no unfinished reconcile; the saved upper layer
  of its last reconcile (for ``reconcile --undo``) is dropped: a snapshot ends that undo.

Crash safety: the layer appears whole or not at all (:mod:`.layerstore`); the instance
record names it before the upper layer is emptied, and the fresh upper layer replaces the old
one by ``renameat2(RENAME_EXCHANGE)`` (the VM's union shows the same tree at every step:
the frozen layer holds what the old upper layer held).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from unionimg.entries import DIR, Entry
from unionimg.errors import Conflict, MissingCapability, NotFound, UsageError
from unionimg.faults import checkpoint
from unionimg.fs import fsops
from unionimg.fs.image import disk_usage, usage_of
from unionimg.fs.mounts import mount_image
from unionimg.fs.space import WriteWatch, require_space
from unionimg.layers import history, identity, layerstore
from unionimg.layers.base import Generation, generation_layer, get_generation, unmount_layers
from unionimg.layers.instance import (
    create,
    durable,
    list_instances,
    load,
    mount_record,
    save,
    u_layer,
    upper_image,
)
from unionimg.layers.layer import LayerRefused
from unionimg.layers.layerstore import Layer, Origin
from unionimg.layers.running import running_on
from unionimg.layers.status import (
    blame_space,
    check_u_writable,
    commit_estimate,
    require_u_space,
    scan_upper,
    write_history_sidecar,
)
from unionimg.layers.ucheck import sync_image
from unionimg.names import human_size
from unionimg.runner import run, which
from unionimg.store.layout import Store
from unionimg.store.records import Instance, JsonObject, ReconcileJournal

log = logging.getLogger(__name__)
MAX_MESSAGE = 1000
#: a snapshot reads at most this many times the U image's size of file bytes: more can only
#: be sparse files (a guest's ``truncate -s 16T``), whose zeros would be read and hashed whole
SPARSE_FACTOR = 16


# -- chains --------------------------------------------------------------------------------------
def instance_layers(store: Store, inst: Instance) -> list[Layer]:
    """The instance's snapshot layers (``Instance.layers``), top to bottom, each in the store
    and lying on the next (:class:`NotFound` in one line otherwise)."""
    out: list[Layer] = []
    for diff_id in inst.layers:
        try:
            layer = layerstore.get(store, diff_id)
        except (NotFound, UsageError):
            raise NotFound(
                f"instance '{inst.name}': layer {diff_id} of its chain is not in this store; "
                "restore it (see 'unionimg layer list')"
            ) from None
        if out and out[-1].parent != layer.diff_id:
            raise NotFound(
                f"instance '{inst.name}': its layer {out[-1].short} does not lie on "
                f"{layer.short}, the next of its chain; the instance record was changed by hand?"
            )
        out.append(layer)
    return out


def mount_layers(store: Store, inst: Instance, where: Path) -> list[Path]:
    """Mount the instance's snapshot layers read-only below ``where`` (``where/0`` the top),
    as guest data (``nosuid,nodev,noexec``): the lower directories above its generation's,
    top to bottom. Undone by :func:`unionimg.layers.base.unmount_layers` (``where``)."""
    out: list[Path] = []
    try:
        for i, layer in enumerate(instance_layers(store, inst)):
            mount_image(layer.image, where / str(i), readonly=True, exclusive=False, guest=True)
            out.append(where / str(i))
    except BaseException:
        unmount_layers(where)
        raise
    return out


def node(store: Store, inst: Instance) -> Layer:
    """The VM's image node: its top snapshot layer, else its base generation's layer."""
    if inst.layers:
        return instance_layers(store, inst)[0]
    return generation_layer(store, get_generation(store, inst.base, inst.generation))


def generation_below(store: Store, layer_chain: list[Layer]) -> tuple[Generation, list[Layer]]:
    """(the base generation a chain lies on, the snapshot layers above it, top to bottom):
    the first layer of the chain a base generation of this store was made as."""
    for i, layer in enumerate(layer_chain):
        m = layer.meta
        if m.kind in ("base", "delta") and m.base is not None and m.generation is not None:
            try:
                gen = get_generation(store, m.base, m.generation)
            except NotFound:
                break
            if generation_layer(store, gen).diff_id != layer.diff_id:
                break
            above = layer_chain[:i]
            if any(la.meta.kind != "snapshot" for la in above):
                raise UsageError(
                    f"layer {layer_chain[0].short}'s chain holds a {above[-1].meta.kind} layer "
                    "above its base generation; only snapshot layers may lie there"
                )
            return gen, above
    top = layer_chain[0]
    raise NotFound(
        f"layer {top.short} does not lie on a base generation of this store; create or "
        "pull its base first (see 'unionimg layer tree')"
    )


# -- identity kept out of layers -----------------------------------------------------------------
def identity_paths(upper: Path) -> list[bytes]:
    """The per-VM identity entries (:data:`identity.RULES`) in the upper layer ``upper``,
    relative (bytes), found without following a symlink (a symlinked directory on the way
    holds none of them)."""
    out: list[bytes] = []
    for rule in identity.RULES:
        directory, glob = rule.pattern.rsplit("/", 1)
        try:
            with fsops.parent_fd(upper, directory.lstrip("/") + "/x") as (dfd, _):
                names = sorted(os.listdir(dfd))
                for name in names:
                    if fnmatch.fnmatchcase(name, glob):
                        st = os.lstat(name, dir_fd=dfd)
                        if not stat.S_ISDIR(st.st_mode):
                            out.append(os.fsencode(directory.lstrip("/") + "/" + name))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
    return sorted(set(out))


def _changed(entries: list[Entry], keep: list[bytes]) -> list[Entry]:
    """The upper layer's entries a snapshot freezes: all but the root, the identity entries
    ``keep`` (and anything below them) and the directories that only lead to them (the
    fresh upper layer has them again, with their owners and modes)."""
    held = set(keep)
    leading = {k.rsplit(b"/", i)[0] for k in keep for i in range(1, k.count(b"/") + 1)}
    out = []
    for e in entries:
        rel = os.fsencode(e.path[1:])
        if not rel or rel in held or (rel in leading and e.kind == DIR):
            continue
        if any(rel.startswith(k + b"/") for k in keep):
            continue
        out.append(e)
    return out


def _allocated(tree: Path) -> int:
    """Bytes the files below ``tree`` occupy on disk (sparse files: what they hold)."""
    total = 0
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def _fresh_upper(u: Path, keep: list[bytes]) -> Path:
    """``u/upper.new``: an empty upper layer with the root's metadata and hard links of the
    ``keep`` entries (their directories made with the old ones' owners and modes)."""
    old, new = u / "upper", u / "upper.new"
    if os.path.lexists(new):
        fsops.remove_tree(new)
    st = os.lstat(old)
    os.mkdir(new, 0o700)
    _same_meta(new, st)
    bold, bnew = os.fsencode(old), os.fsencode(new)
    for rel in keep:
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            d = b"/".join(parts[:i])
            if not os.path.lexists(os.path.join(bnew, d)):
                dst = os.lstat(os.path.join(bold, d))
                if not stat.S_ISDIR(dst.st_mode):  # found through real directories only
                    raise OSError(errno.ENOTDIR, "not a directory", os.fsdecode(d))
                os.mkdir(os.path.join(bnew, d), 0o700)
                _same_meta(Path(os.fsdecode(os.path.join(bnew, d))), dst)
        os.link(os.path.join(bold, rel), os.path.join(bnew, rel), follow_symlinks=False)
    return new


def _same_meta(path: Path, st: os.stat_result) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


# -- snapshot ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """What ``instance snapshot`` did."""

    name: str
    layer: Layer | None  # the new (or finished) layer; None when nothing changed
    new: bool
    parent: str  # the VM's image node before
    seconds: float
    u_before: int  # bytes the U image occupied before and after
    u_after: int
    nodes: tuple[str | None, ...] = ()  # the history changesets recorded
    finished: bool = False  # an interrupted snapshot finished (no new layer made now)

    def to_json(self) -> JsonObject:
        m = self.layer.meta if self.layer is not None else None
        return {
            "name": self.name,
            "layer": m.diff_id if m else None,
            "label": m.label if m else None,
            "new": self.new,
            "finished_interrupted": self.finished,
            "parent": self.parent,
            "blob_size": m.blob_size if m else 0,
            "tar_size": m.tar_size if m else 0,
            "image_size": m.image_size if m else 0,
            "entries": m.entries if m else 0,
            "seconds": round(self.seconds, 3),
            "u_disk_usage_before": self.u_before,
            "u_disk_usage_after": self.u_after,
            "history": [n for n in self.nodes if n],
        }


def _check_message(message: str | None) -> str:
    text = (message or "").strip()
    if len(text) > MAX_MESSAGE or any(ord(c) < 32 and c not in "\t" for c in text):
        raise UsageError(
            f"the snapshot message must be one line of at most {MAX_MESSAGE} characters"
        )
    return text


def snapshot(store: Store, name: str, message: str | None = None) -> Snapshot:
    """Freeze instance ``name``'s upper layer into a new layer (see the module docstring)."""
    text = _check_message(message)
    start = time.monotonic()
    inst = load(store, name)
    with store.lock(f"instance-{name}", wait=False, purpose=f"snapshot {name}"):
        inst = load(store, name)
        if running_on(store, name):
            raise Conflict(f"instance '{name}' is running; stop it before a snapshot")
        rec = mount_record(store, name)
        if rec is not None:
            raise Conflict(
                f"instance '{name}' is mounted at {rec.target}; run 'unionimg umount "
                f"{rec.target}' before a snapshot"
            )
        if (store.instance_dir(name) / ReconcileJournal.FILE).is_file():
            raise Conflict(
                f"instance '{name}' has an interrupted reconcile; run 'unionimg reconcile "
                f"{name}' to finish it before a snapshot"
            )
        top = node(store, inst)
        before = disk_usage(upper_image(store, name))
        what = f"snapshot {name}"
        with (
            contextlib.ExitStack() as stack,
            u_layer(store, name, write=True) as u,
            WriteWatch(u) as watch,
        ):
            check_u_writable(store, u, name, what)
            upper = u / "upper"
            stale = u / "upper.new"  # a snapshot killed after its swap left the old upper
            if os.path.lexists(stale):  # (no reconcile journal: nothing else needs it)
                fsops.remove_tree(stale)
            keep = identity_paths(upper)
            entries = scan_upper(u, hash_files=False)
            changed = _changed(entries, keep)
            if not changed:
                return Snapshot(
                    name, None, False, top.diff_id, time.monotonic() - start, before, before
                )
            apparent, _count = usage_of(entries)
            if apparent > SPARSE_FACTOR * inst.size:  # before a byte is read
                raise LayerRefused(
                    f"instance '{name}': its upper layer holds {human_size(apparent)} of files "
                    f"(sparse files count whole), more than a snapshot reads "
                    f"({SPARSE_FACTOR} times its U size); remove or shrink its largest sparse "
                    "files, then retry; nothing was changed"
                )
            # the blob and the image in the store (at most about twice the blocks the changes
            # hold: zeros become holes again), the history commit in U (and so in the store)
            require_space(store.root, 2 * _allocated(upper) + (16 << 20), what)
            require_u_space(store, u, name, commit_estimate(u, entries), what)
            origin = Origin(
                text=f"instance {name}" + (f": {text}" if text else ""),
                base=inst.base,
                generation=inst.generation,
                instance=name,
                message=text,
            )
            finished = False
            pins = stack.enter_context(layerstore.Pins(store))  # no gc before save()
            try:
                layer, new = layerstore.put_tree(
                    store,
                    upper,
                    parent=top.diff_id,
                    kind="snapshot",
                    origin=origin,
                    exclude=frozenset(keep),
                    pins=pins,
                    max_bytes=SPARSE_FACTOR * inst.size,
                )
            except LayerRefused as exc:  # what the guest put in its upper layer
                raise LayerRefused(
                    f"instance '{name}': {exc.message} (in the guest, or through 'unionimg "
                    f"mount {name} DIR'); nothing was changed"
                ) from None
            except Conflict:
                # the upper layer is the VM's top layer already: a snapshot interrupted after
                # the instance record named it. Finish it.
                again = layerstore.tree_digest(upper, kind="snapshot", exclude=frozenset(keep))
                if not inst.layers or again.diff_id != inst.layers[0]:
                    raise
                layer, new, finished = top, False, True
            checkpoint("snapshot:layer-made")
            label = layer.meta.label
            nodes: list[str | None] = []
            try:
                # one Mercurial command server for both changesets (each start costs ~0.5 s)
                with history.open_repo(u, guest=name) as repo:
                    if not finished:
                        outside = write_history_sidecar(u, inst, entries)
                        msg = f"snapshot {label}" + (f": {text}" if text else "")
                        nodes.append(repo.commit_all(msg, outside=outside))
                        checkpoint("snapshot:committed")
                        inst = inst.replace(layers=(layer.diff_id, *inst.layers))
                        save(store, inst)  # from here the VM's chain holds the layer
                        checkpoint("snapshot:saved")
                    fresh = _fresh_upper(u, keep)
                    fsops.syncfs(u)
                    fsops.exchange(upper, fresh)  # fresh is now the frozen upper layer
                    checkpoint("snapshot:swapped")
                    fsops.remove_tree(fresh)
                    prev = u / "upper.prev"
                    if prev.is_dir() and not prev.is_symlink():  # reconcile --undo's saved layer
                        fsops.remove_tree(prev)
                    outside = write_history_sidecar(u, inst)
                    msg = f"snapshot {label}: the upper layer starts again"
                    nodes.append(repo.commit_all(msg, outside=outside))
                sync_image(watch, store.root, name, what)
            except OSError as exc:
                raise blame_space(exc, store, u, name, what) from exc
            durable(u)
            _trim(u)
        after = disk_usage(upper_image(store, name))
        return Snapshot(
            name, layer, new, top.diff_id, time.monotonic() - start, before, after,
            tuple(nodes), finished,
        )  # fmt: skip


def _trim(u: Path) -> None:
    """Give the blocks U freed back to the store (U is a sparse file: ``fstrim`` on its loop
    device punches holes). Best effort: a store on a file system without hole punching keeps
    them allocated (U reuses them)."""
    try:
        which("fstrim")
    except MissingCapability:  # no fstrim: nothing to give back
        return
    res = run(["fstrim", str(u)], check=False)
    if res.returncode != 0:
        log.info("fstrim %s: %s", u, res.stderr.strip())


# -- VMs made from a layer -----------------------------------------------------------------------
def create_from(store: Store, name: str, ref: str, **kwargs: object) -> Instance:
    """A new VM whose image is layer ``ref``'s chain: its base generation and the snapshot
    layers above it; a fresh U with its own identity (``kwargs``: what ``instance create``
    takes besides the base: mac, hypervisor, size, memory, vcpus, nic_name)."""
    layer = layerstore.get(store, ref)
    with layerstore.Pins(store) as pins:  # no gc of the chain before the VM names it
        pins.add(layer.diff_id)
        chain = layerstore.chain(store, layer.diff_id)
        gen, above = generation_below(store, chain)
        return create(
            store,
            name,
            gen.base,
            generation=gen.number,
            layers=tuple(la.diff_id for la in above),
            **kwargs,  # type: ignore[arg-type]
        )


# -- reconcile ---------------------------------------------------------------------------------
def refuse_reconcile(store: Store, inst: Instance, to_generation: int | None) -> None:
    """Reconcile cannot merge a base update under snapshot layers (out of issue 13's scope):
    one line for a VM with snapshot layers whose base generation would change."""
    if not inst.layers:
        return
    target = get_generation(store, inst.base, to_generation).number
    if target == inst.generation:
        return
    top = layerstore.label_of(inst.layers[0])
    raise Conflict(
        f"instance '{inst.name}' lies on snapshot layers ({top} and {len(inst.layers) - 1} "
        f"more) over base '{inst.base}' generation {inst.generation}; reconcile cannot merge "
        f"generation {target} under them: make a new VM on generation {target} instead, or "
        f"leave '{inst.name}' where it is"
    )


# -- who uses which layer ------------------------------------------------------------------------
def users(store: Store) -> dict[str, list[str]]:
    """diff_id → the instances whose image node it is (their top layer, or their
    generation's layer), for ``layer tree``."""
    out: dict[str, list[str]] = {}
    for inst in list_instances(store):
        with contextlib.suppress(NotFound):
            if inst.layers:
                out.setdefault(inst.layers[0], []).append(inst.name)
                continue
            found = layerstore.find_base_layer(store, inst.base, inst.generation)
            if found is not None:
                out.setdefault(found.diff_id, []).append(inst.name)
    return out
