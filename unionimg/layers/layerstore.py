"""The host's layer cache: immutable, content-addressed layers with a parent.

On disk (inside the store; everything below appears by ``rename(2)`` of a built staging
directory, so a crash leaves a layer whole or absent)::

    STORE/layers/sha256/HEX/       HEX = the diff_id's 64 hex digits
        layer.json                 :class:`~unionimg.store.records.LayerMeta`
        layer.img                  read-only raw ext4 of the layer's tree in overlayfs format
                                   (label L + 15 hex digits; BASE for a whole base adopted
                                   from a generation, then a hard link to its base.img)
        blob.tar.zst               the layer's transport blob (see :mod:`.layer`), when kept

What is kept and what it costs: a layer made from a tree (:func:`put_tree`: snapshots,
deltas) or imported from a blob (:func:`import_blob`) keeps its blob beside its image: the
blob was made (or fetched) anyway to know the layer's digests, it is what a push or a
deploy sends, and it is small (the zstd of the layer's changed bytes; a snapshot after an
``apt-get install`` costs a few MiB twice: image and blob). When the size of the layer's
tar and its number of entries are known (a snapshot's own tar; a pulled layer's record
claims them), the blob is extracted straight into a new, empty image made here by
``mke2fs`` and loop-mounted in the staging directory, synced to the disk as it is written
(:func:`_image_at`): the disk writes the layer while its blob is still being read. Else, or
when that image is too small for the real tar, the blob is extracted onto a tmpfs when
memory allows (:func:`_scratch`; on disk otherwise) and ``mke2fs -d`` copies the tree into
the image. Either way the blob's digest and its tar's are checked in that one read, before
the layer appears. Layers of one pull can be built at once and appear bottom to
top (:func:`stage_blob`, :class:`StagedLayer`). A base generation adopted as a layer
(:func:`adopt_image`) shares its image: a hard link to the generation's ``base.img``; its
blob is made then, from the image (one read of the tree, checked against the diff_id), so a
push or a deploy only sends it (the Debian fixture: a 147 MB blob, ~3 s once, at adoption,
instead of in the first deploy). Delete it to get the space back: :func:`blob_path` makes
it again, byte for byte the same, when it is asked for.

References (what :func:`remove` and ``layer gc`` keep): a layer is referenced by its child
layers (their ``parent``), by each instance whose chain holds it (``Instance.layers``), by a
base generation that names it (its ``layer``) or lies under a layer (``base``/``generation``
of a layer kept for a base), by any JSON record under ``STORE/systems/`` that names its
diff_id, by a live pin of a running command (:class:`Pins`: a snapshot between making its
layer and naming it in the instance record), and by what a function in :data:`REFERRERS`
says (other modules register theirs).

For base generations (:mod:`unionimg.layers.base`): a delta generation's layer is made with
``put_tree(store, upper, parent=<diff_id of its parent generation's layer>, kind="delta",
origin=Origin(text, base=NAME, generation=N))`` (its ``layer.img`` may be hard-linked into the
generation's directory); a full generation is adopted with ``adopt_image(store, base.img,
diff_id=tree_digest(<its mounted tree>).diff_id, label="BASE", kind="base", parent=None, ...)``
(the digest of the image's own tree, ``lost+found`` included, so :func:`blob_path` makes the
same tar from it). Do not make a layer's image with ``make_ext4`` alone: ``mke2fs -d`` adds
``lost+found`` and stamps the root, so its tree would no longer be the layer's
(:func:`_same_root`). :func:`find_base_layer` finds the layer kept for a generation.

Lookups accept ``sha256:HEX``, ``HEX``, a unique prefix of at least 4 hex digits (with or
without ``sha256:``), or the image label ``L`` + 15 hex digits.
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
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from unionimg.entries import Entry
from unionimg.errors import Conflict, NotFound, StoreFull, ToolFailed, UsageError
from unionimg.faults import checkpoint
from unionimg.fs.follow import Growing
from unionimg.fs.image import BLOCK, default_size, disk_usage, make_ext4
from unionimg.fs.manifest import Manifest, write_manifest
from unionimg.fs.mounts import mount_image, mount_new_image, require_root, unmount_tree
from unionimg.fs.pagecache import Recycler
from unionimg.fs.space import WriteWatch, free_space, require_space
from unionimg.layers.layer import (
    BlobDamaged,
    BlobInfo,
    ByteSource,
    LayerRefused,
    digest_hex,
    file_digest,
    read_blob,
    scan_order,
    write_blob,
)
from unionimg.runner import run
from unionimg.store.layout import Store, fsync_dir, now_iso, read_record, write_record
from unionimg.store.records import Instance, LayerMeta

log = logging.getLogger(__name__)

LAYERS = Path("layers") / "sha256"
IMAGE = "layer.img"
#: a whole base layer's manifest (:func:`.manifest.write_manifest`, no info), recorded as its
#: verified blob was extracted (:func:`.layer.read_blob`): :func:`tree_manifest`
MANIFEST = "manifest.sqlite"
BLOB = "blob.tar.zst"
LOCK = "layers"
MAX_CHAIN = 64
#: ``fn(store)`` → (diff_id, who) pairs: what else keeps layers (systems, deploys)
REFERRERS: list[Callable[[Store], Iterable[tuple[str, str]]]] = []


@dataclass(frozen=True)
class Layer:
    meta: LayerMeta
    dir: Path

    @property
    def diff_id(self) -> str:
        return self.meta.diff_id

    @property
    def hex(self) -> str:
        return digest_hex(self.meta.diff_id)

    @property
    def short(self) -> str:
        """The first 12 hex digits: how people see a layer."""
        return self.hex[:12]

    @property
    def image(self) -> Path:
        return self.dir / IMAGE

    @property
    def blob(self) -> Path:
        """Where the blob is kept (it may be absent: see :func:`blob_path`)."""
        return self.dir / BLOB

    @property
    def parent(self) -> str | None:
        return self.meta.parent

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.meta.to_json())
        out["image"] = str(self.image)
        out["blob"] = str(self.blob) if self.blob.is_file() else None
        return out


def label_of(diff_id: str) -> str:
    """``L`` + the first 15 hex digits of ``diff_id`` (an ext4 label holds 16 characters)."""
    return "L" + digest_hex(diff_id)[:15]


def layers_dir(store: Store) -> Path:
    return store.root / LAYERS


def layer_dir(store: Store, diff_id: str) -> Path:
    return layers_dir(store) / digest_hex(diff_id)


def has(store: Store, diff_id: str) -> bool:
    """Whether the layer ``diff_id`` (``sha256:HEX``) is in the store."""
    try:
        return (layer_dir(store, diff_id) / LayerMeta.FILE).is_file()
    except ValueError:
        return False


def _load(path: Path) -> Layer:
    meta = read_record(path / LayerMeta.FILE, LayerMeta)
    return Layer(meta, path)


def _layer_paths(store: Store) -> list[Path]:
    """The directories of the layers in the store (each with its record)."""
    root = layers_dir(store)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if (p / LayerMeta.FILE).is_file()]


def count(store: Store) -> int:
    """How many layers the store holds (no record read)."""
    return len(_layer_paths(store))


def list_layers(store: Store) -> list[Layer]:
    """Every layer in the store, oldest first (then by digest)."""
    out = [_load(p) for p in _layer_paths(store)]
    return sorted(out, key=lambda la: (la.meta.created, la.hex))


def get(store: Store, ref: str) -> Layer:
    """The layer ``ref`` names (see the module's docstring), or :class:`NotFound`/
    :class:`UsageError` (an ambiguous prefix) in one line."""
    text = ref.strip()
    if len(text) == 16 and text[0] == "L":
        text = text[1:]
    text = text.removeprefix("sha256:").lower()
    if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
        raise UsageError(
            f"'{ref}' is not a layer reference; give its digest (sha256:HEX), at least 4 of "
            "its hex digits, or its label (L + 15 hex digits): see 'unionimg layer list'"
        )
    if len(text) == 64:
        path = layers_dir(store) / text
        if (path / LayerMeta.FILE).is_file():
            return _load(path)
        raise NotFound(f"layer sha256:{text} is not in this store; see 'unionimg layer list'")
    root = layers_dir(store)
    found = (
        sorted(
            p for p in root.iterdir() if p.name.startswith(text) and (p / LayerMeta.FILE).is_file()
        )
        if root.is_dir()
        else []
    )
    if not found:
        raise NotFound(f"no layer starts with {text}; see 'unionimg layer list'")
    if len(found) > 1:
        raise UsageError(
            f"{text} names {len(found)} layers ({', '.join(p.name[:12] for p in found[:4])}"
            f"{', ...' if len(found) > 4 else ''}); give more of its digits"
        )
    return _load(found[0])


def chain(store: Store, top: str) -> list[Layer]:
    """The layer ``top`` (a diff_id or any reference) and its ancestors, top to bottom."""
    out = [get(store, top)]
    seen = {out[0].diff_id}
    while (parent := out[-1].parent) is not None:
        if not has(store, parent):
            raise NotFound(
                f"layer {out[-1].short} names parent {parent}, which is not in this store; "
                "pull or import the parent first"
            )
        layer = _load(layer_dir(store, parent))
        if layer.diff_id in seen or len(out) >= MAX_CHAIN:
            raise NotFound(
                f"layer {out[-1].short}'s chain of parents loops or is longer than "
                f"{MAX_CHAIN}; the store was changed by hand? restore it from a backup"
            )
        seen.add(layer.diff_id)
        out.append(layer)
    return out


def find_base_layer(store: Store, base: str, generation: int) -> Layer | None:
    """The layer kept for base ``base`` generation ``generation`` (kind base or delta), if
    one is in the store."""
    for layer in list_layers(store):
        m = layer.meta
        if m.kind in ("base", "delta") and m.base == base and m.generation == generation:
            return layer
    return None


# -- pins: layers a command is about to reference ------------------------------------------------
class Pins:
    """Layers a running command is about to reference (a snapshot between making its layer
    and naming it in the instance record; a VM being made from a layer): ``gc`` and
    :func:`remove` keep them. Each pin is a file ``layers/pins/PID.RANDOM`` holding a diff_id,
    share-locked (flock) while its command runs: a pin whose lock can be taken exclusively
    belongs to a dead command and is swept by :func:`references`."""

    def __init__(self, store: Store) -> None:
        self.dir = layers_dir(store).parent / "pins"
        self._held: list[tuple[Path, int]] = []

    def add(self, diff_id: str) -> None:
        digest_hex(diff_id)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.dir / f"{os.getpid()}.{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, diff_id.encode())
        self._held.append((path, fd))

    def close(self) -> None:
        for path, fd in self._held:
            path.unlink(missing_ok=True)
            os.close(fd)
        self._held.clear()

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pinned(store: Store) -> Iterator[tuple[str, str]]:
    """(diff_id, who) of every live pin; dead commands' pins removed."""
    pins = layers_dir(store).parent / "pins"
    if not pins.is_dir():
        return
    for path in sorted(pins.iterdir()):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its command runs
                text = os.pread(fd, 80, 0).decode(errors="replace")
                yield text, f"a command in progress (pid {path.name.split('.')[0]})"
                continue
            path.unlink(missing_ok=True)  # its command is gone
        finally:
            os.close(fd)


# -- making layers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Origin:
    """What made a layer, for its record."""

    text: str = ""
    base: str | None = None
    generation: int | None = None
    instance: str | None = None
    message: str = ""


def _check_kind(parent: str | None, kind: str) -> None:
    if kind == "base" and parent is not None:
        raise UsageError("a base layer is a whole tree: it has no parent")
    if kind != "base" and parent is None:
        raise UsageError(f"a {kind} layer lies over a parent layer: name it")


def _check_parent(store: Store, parent: str | None, kind: str) -> None:
    _check_kind(parent, kind)
    if parent is not None and not has(store, parent):
        raise NotFound(
            f"parent layer {parent} is not in this store; pull or import it first "
            "(see 'unionimg layer list')"
        )


def put_tree(
    store: Store,
    tree: Path,
    *,
    parent: str | None,
    kind: str,
    origin: Origin,
    exclude: frozenset[bytes] = frozenset(),
    pins: Pins | None = None,
    max_bytes: int | None = None,
) -> tuple[Layer, bool]:
    """The tree ``tree`` (overlayfs format; but the relative paths in ``exclude``) as a layer
    over ``parent``; (the layer, whether it is new). A layer with the same diff_id already
    here is returned as it is (the same content with the same parent is the same layer; the
    same content over another parent is refused: a diff_id names one layer). Cost: one read
    of the tree (tar, sha256, zstd), one write of the blob, one extraction and one ``mke2fs
    -d`` of it: O(size of the tree). ``pins``: the layer is pinned there before it appears
    (see :class:`Pins`), so no gc removes it before the caller references it."""
    require_root("making a layer")
    _check_parent(store, parent, kind)
    with store.staging("layer") as stage:
        blob = stage / BLOB
        with open(blob, "wb") as out:
            info = write_blob(tree, out, kind=kind, exclude=exclude, max_bytes=max_bytes)
        if pins is not None:
            pins.add(info.diff_id)
        existing = _same(store, info.diff_id, parent)
        if existing is not None:
            return existing, False
        build, meta = _import_build(
            store, stage, blob, info, parent=parent, kind=kind, origin=origin,
            hint=(info.tar_size, info.entries),
        )  # fmt: skip
        return _publish(store, build, meta), True


def import_blob(
    store: Store,
    blob_path: Path,
    expected_diff_id: str,
    parent: str | None,
    *,
    kind: str,
    expected_blob_digest: str | None = None,
    origin: Origin | None = None,
    hint: tuple[int, int] | None = None,
) -> tuple[Layer, bool]:
    """A verified blob (from a registry, another host) as a layer over ``parent``; (the
    layer, whether it is new): :func:`stage_blob` then :meth:`StagedLayer.publish`. The
    blob's digest (when given) and the uncompressed diff_id are checked in the one read that
    extracts it (:func:`.layer.read_blob`), the tar parsed defensively, and only a layer that
    passed both appears; on any failure nothing is left in the store (exit 8, one line).
    The blob file is copied (or hard-linked, same file system) into the layer. ``hint``:
    (tar bytes, tar entries) the layer's record claims (see :func:`_import_build`)."""
    require_root("importing a layer")
    _check_parent(store, parent, kind)
    staged = stage_blob(
        store, blob_path, expected_diff_id, parent, kind=kind,
        expected_blob_digest=expected_blob_digest, origin=origin, hint=hint,
    )  # fmt: skip
    return staged.publish()


class StagedLayer:
    """A layer built from a blob in a private staging directory (its image made, both
    digests checked), not yet in the layer cache: :meth:`publish` renames it into place
    once its parent is there (so layers of one chain can be built at once, and appear
    bottom to top), :meth:`discard` removes it. Either ends it."""

    def __init__(
        self,
        store: Store,
        stack: contextlib.ExitStack,
        build: Path | None,
        meta: LayerMeta | None,
        existing: Layer | None,
    ) -> None:
        self._store = store
        self._stack = stack
        self._build = build
        self.meta = meta
        self._existing = existing

    def publish(self) -> tuple[Layer, bool]:
        """The layer in the cache; (it, whether it is new). Its parent must be there by now
        (else NotFound, nothing added); a layer of the same diff_id that appeared meanwhile
        is returned as it is (over another parent: Conflict)."""
        try:
            if self._existing is not None:
                return self._existing, False
            assert self._build is not None and self.meta is not None
            _check_parent(self._store, self.meta.parent, self.meta.kind)
            existing = _same(self._store, self.meta.diff_id, self.meta.parent)
            if existing is not None:
                return existing, False
            return _publish(self._store, self._build, self.meta), True
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove what was built (nothing of it was ever in the cache)."""
        self._stack.close()


def stage_blob(
    store: Store,
    blob_path: Path,
    expected_diff_id: str,
    parent: str | None,
    *,
    kind: str,
    expected_blob_digest: str | None = None,
    origin: Origin | None = None,
    follow: Growing | None = None,
    hint: tuple[int, int] | None = None,
) -> StagedLayer:
    """Build the layer of blob ``blob_path`` over ``parent`` in a staging directory, checked
    as :func:`import_blob` checks it, without adding it to the cache: the parent need not be
    here yet (:meth:`StagedLayer.publish` requires it). Safe to run in several threads at
    once (each its own staging directory and scratch tmpfs). A layer the cache holds already
    is not built again. On failure nothing is left (exit 8, one line).

    ``follow``: the blob is still arriving; it is extracted as its bytes are written
    (:mod:`unionimg.fs.follow`), and the complete file (``follow.wait()``, verified by the
    fetch) taken into the layer once the extraction read it to its end. A fetch that
    starts over beneath the extraction raises :class:`~unionimg.fs.follow.Restarted`, one
    that fails :class:`~unionimg.fs.follow.Abandoned` (the caller has the fetch's error).
    ``hint``: (tar bytes, tar entries) the layer's record claims: the blob is then extracted
    straight into the layer's image (:func:`_import_build`)."""
    require_root("importing a layer")
    try:
        digest_hex(expected_diff_id)
    except ValueError:
        raise UsageError(f"'{expected_diff_id}' is not a sha256 digest (sha256:HEX)") from None
    _check_kind(parent, kind)
    stack = contextlib.ExitStack()
    try:
        existing = _same(store, expected_diff_id, parent)
        if existing is not None:
            return StagedLayer(store, stack, None, None, existing)
        stage = stack.enter_context(store.staging("import"))
        blob = stage / BLOB

        def take_blob() -> None:  # the verified file into the staging directory
            src = follow.wait() if follow is not None else blob_path
            try:
                os.link(src, blob)
            except OSError:
                shutil.copyfile(src, blob)

        if follow is None:
            take_blob()
        size = follow.size if follow is not None else blob.stat().st_size
        info = BlobInfo(expected_diff_id, expected_blob_digest or "", size, 0, 0)
        build, meta = _import_build(
            store, stage, blob, info, parent=parent, kind=kind, origin=origin or Origin(),
            opener=follow.reader if follow is not None else None,
            arrived=take_blob if follow is not None else None, hint=hint,
        )  # fmt: skip
        return StagedLayer(store, stack, build, meta, None)
    except BaseException:
        stack.close()
        raise


def _same(store: Store, diff_id: str, parent: str | None) -> Layer | None:
    if not has(store, diff_id):
        return None
    layer = _load(layer_dir(store, diff_id))
    if layer.parent != parent:
        raise Conflict(
            f"layer {layer.short} is already here over parent {layer.parent or 'none'}, not "
            f"{parent or 'none'}: one content, one layer; see 'unionimg layer show {layer.short}'"
        )
    return layer


def _import_build(
    store: Store,
    stage: Path,
    blob: Path,
    info: BlobInfo,
    *,
    parent: str | None,
    kind: str,
    origin: Origin,
    opener: Callable[[], ByteSource] | None = None,
    arrived: Callable[[], None] | None = None,
    hint: tuple[int, int] | None = None,
) -> tuple[Path, LayerMeta]:
    """Build the layer directory in ``stage`` from ``blob`` (extracted, its diff_id checked
    against ``info.diff_id`` and, when ``info.blob_digest`` is set, the blob against it, in
    the same read); the directory and its record, for :func:`_publish`. ``opener``: read
    the blob from there (it is arriving); ``arrived()`` then puts the complete file at
    ``blob``, once the extraction is done.

    ``hint``: (tar bytes, tar entries) the layer's record says it has. With one, the blob
    is extracted straight into a new image of that room mounted on ``tree``
    (:func:`_image_at`), its blocks written to the disk while the blob is still being read;
    else — or when that image turns out too small, the hint was wrong, or it cannot be
    mounted here — into a tmpfs (:func:`_scratch`) or onto the disk, then ``mke2fs -d``."""
    tree = stage / "tree"
    tree.mkdir(mode=0o755)
    require_space(store.root, info.blob_size * 4, f"make layer {digest_hex(info.diff_id)[:12]}")
    expect = info.blob_digest or None
    # a root base layer is a whole base: labelled BASE, as an adopted generation's is, so a
    # host can make it a base generation by hard link (what a deploy does; systems.py)
    whole = kind == "base" and parent is None
    label = "BASE" if whole else label_of(info.diff_id)

    def extract(recycle: Recycler | None = None) -> tuple[BlobInfo, list[Entry] | None]:
        # a whole base's manifest, made in the same read (a base generation made from the
        # layer uses it instead of scanning its tree again: :func:`tree_manifest`)
        entries: list[Entry] | None = [] if whole else None
        got = read_blob(
            blob, tree, kind=kind, expected_diff_id=info.diff_id,
            expected_blob_digest=expect, manifest=entries, opener=opener,
            uncached=recycle is not None, recycle=recycle,
        )  # fmt: skip
        return got, entries or None

    build = stage / "layer"
    build.mkdir(mode=0o700)
    made: tuple[BlobInfo, list[Entry] | None] | None = None
    geometry = _direct_geometry(store, hint)
    if geometry is not None:
        try:
            with _image_at(build / IMAGE, label, geometry, tree) as recycle:
                made = extract(recycle)  # the big files' data around the page cache
        except BlobDamaged:
            raise
        except (LayerRefused, StoreFull, ToolFailed, UsageError, OSError) as exc:
            # (also after a whole extraction: the image's last sync lost a write)
            log.info("layer %s built the other way: %s", digest_hex(info.diff_id)[:12], exc)
            (build / IMAGE).unlink(missing_ok=True)
            made = None
    if made is None:
        with _scratch(tree) as in_memory:
            try:
                made = extract()
            except BlobDamaged:
                raise
            except (LayerRefused, StoreFull):
                if not in_memory:
                    raise
                # too large for the memory it may use, or an xattr tmpfs lacks: on disk
                # instead (a hostile tar is refused there again, the same way)
                unmount_tree(tree)
                shutil.rmtree(tree)
                tree.mkdir(mode=0o755)
                made = extract()
            _image_of_tree(build / IMAGE, tree, label)
    if arrived is not None:
        arrived()
    got, entries = made
    return build, _finish(build, blob, got, label, parent=parent, kind=kind, origin=origin,
                          entries=entries)  # fmt: skip


#: how often a layer's image is synced to the disk while its blob is extracted into it
FLUSH_EVERY = 0.25


def _direct_geometry(store: Store, hint: tuple[int, int] | None) -> tuple[int, int] | None:
    """(image size, inodes) for extracting a layer of ``hint`` = (tar bytes, tar entries)
    straight into its image; None without a hint, or one no tar can have (each entry takes a
    512-byte header), or one the store has no room for (the other way then says so). A
    hint from a registry is a claim only: an image too small for the real tar fills up and
    the layer is built the other way; the digests decide what the layer is."""
    if hint is None:
        return None
    tar_size, count = hint
    if count <= 0 or tar_size < count * 512:
        return None
    used = tar_size + count * BLOCK  # each entry's data rounded up to a block, or a directory
    if used > free_space(store.root):
        return None
    return default_size(used, count), count


@contextlib.contextmanager
def _image_at(image: Path, label: str, geometry: tuple[int, int], tree: Path) -> Iterator[Recycler]:
    """A new, empty ext4 image (``mke2fs``, no ``lost+found``) mounted read-write on
    ``tree`` (``nosuid,nodev,noexec``) while the context lasts, and synced every
    :data:`FLUSH_EVERY` seconds meanwhile, so the disk writes the layer's blocks while its
    blob is still being extracted (the Debian base layer, 595 MB of tar: 3.4 s this way
    against 6.1-8.0 s onto a tmpfs then ``mke2fs -d``, ``bench/layer_import.py``; syncing
    every 0.1-0.25 s beat every 1 s and only at the end). The image is made here, by
    ``mke2fs``: the host kernel mounts no file system it did not make; the extraction
    writes into it through the VFS as it writes into a tmpfs, the data of its big files
    with O_DIRECT (the caller's ``read_blob(uncached=True)``: no page-cache page for bytes
    the host will not read back), and the files it says it wrote through the page cache
    (the :class:`~unionimg.fs.pagecache.Recycler` yielded) dropped from it after each sync,
    so the pages are used again instead of new ones taken. On a normal exit: synced (a
    write the disk lost raises OSError), unmounted, fsynced; on any exit unmounted (the
    caller removes the image)."""
    size, inodes = geometry
    make_ext4(image, label, None, size, inodes=inodes)
    mount_new_image(image, tree)
    try:
        (tree / "lost+found").rmdir()
        with WriteWatch(tree) as watch:
            checkpoint("layer-import:image-mounted")
            failed: list[OSError] = []
            stop = threading.Event()
            recycle = Recycler()

            def flush() -> None:
                while not stop.wait(FLUSH_EVERY):
                    written = recycle.take()
                    try:
                        watch.sync()
                    except OSError as exc:  # said at the end: the flusher only stops
                        failed.append(exc)
                        return
                    recycle.drop(written)  # on the disk now: their pages can go

            flusher = threading.Thread(target=flush, name="unionimg-flush", daemon=True)
            flusher.start()
            try:
                yield recycle
            finally:
                stop.set()
                flusher.join()
            if failed:
                raise failed[0]
            watch.sync()
    finally:
        unmount_tree(tree)
    with open(image, "rb") as fh:
        os.fsync(fh.fileno())


#: the share of the memory available that extracting one layer may take (:func:`_scratch`)
SCRATCH_SHARE = 4
SCRATCH_MIN = 256 << 20


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextlib.contextmanager
def _scratch(tree: Path) -> Iterator[bool]:
    """Where a blob is extracted before ``mke2fs -d`` copies it into the layer's image: a
    tmpfs mounted on ``tree`` (up to a quarter of the memory available; yields True), so
    the extracted files are never written to disk and go at once when it is unmounted —
    on disk, extracting the Debian base and removing its 10k files again took 11.5 s + 11.2 s
    of a 26.6 s import, ``mke2fs`` 3 s. With less memory, or no tmpfs, ``tree`` itself
    (False). Unmounted on the way out; the caller removes ``tree``."""
    limit = _available_memory() // SCRATCH_SHARE
    mounted = False
    if limit >= SCRATCH_MIN:
        opts = f"size={limit},mode=0755,nosuid,nodev,noexec"
        res = run(["mount", "-t", "tmpfs", "-o", opts, "unionimg-scratch", str(tree)], check=False)
        mounted = res.returncode == 0
        if not mounted:
            log.info("no tmpfs for a layer's extraction (%s): on disk", res.stderr.strip())
    try:
        yield mounted
    finally:
        if mounted:
            unmount_tree(tree)


def _image_of_tree(image: Path, tree: Path, label: str) -> None:
    """The layer's image made from its extracted ``tree`` by ``mke2fs -d``."""
    used, inodes = _usage(tree)
    make_ext4(image, label, tree, default_size(used, inodes), inodes=inodes)
    _same_root(image, tree)


def _finish(
    build: Path,
    blob: Path,
    got: BlobInfo,
    label: str,
    *,
    parent: str | None,
    kind: str,
    origin: Origin,
    entries: list[Entry] | None,
) -> LayerMeta:
    """The layer directory ``build`` (its image made) completed: the blob moved in, the
    manifest ``entries`` (the tree's, as the extraction recorded it) kept as
    :data:`MANIFEST`, its record written; not yet in place. Its record."""
    if entries:
        write_manifest(entries, build / MANIFEST)
    os.rename(blob, build / BLOB)
    meta = LayerMeta(
        diff_id=got.diff_id,
        blob_digest=got.blob_digest,
        blob_size=got.blob_size,
        tar_size=got.tar_size,
        parent=parent,
        kind=kind,
        created=now_iso(),
        label=label,
        image_size=disk_usage(build / IMAGE),
        entries=got.entries,
        origin=origin.text,
        base=origin.base,
        generation=origin.generation,
        instance=origin.instance,
        message=origin.message,
    )
    os.chmod(build / IMAGE, 0o400)
    write_record(build / LayerMeta.FILE, meta)
    return meta


def tree_manifest(layer: Layer) -> list[Entry] | None:
    """The manifest entries of whole base layer ``layer``'s tree as its extraction recorded
    them (:data:`MANIFEST`), in the order :func:`.manifest.scan_tree` gives them; None when
    it has none (a layer made or adopted here, a delta, one pulled by an older unionimg, or
    a tree the extraction does not record): the caller scans the image instead."""
    path = layer.dir / MANIFEST
    if layer.meta.kind != "base" or layer.meta.parent is not None or not path.is_file():
        return None
    with Manifest(path) as m:
        entries = list(m)
    return sorted(entries, key=lambda e: scan_order(e.path))


def _same_root(image: Path, tree: Path) -> None:
    """Make the image's root what the tree's root is: ``mke2fs -d`` adds ``lost+found`` and
    stamps the root with the time it ran; the layer's tar made again from the image must be
    the one it was made from, byte for byte (so the image is the layer, :func:`blob_path`)."""
    st = os.lstat(tree)
    cmds = [
        f"sif / mode 0{stat.S_IFDIR | stat.S_IMODE(st.st_mode):o}",
        f"sif / uid {st.st_uid}",
        f"sif / gid {st.st_gid}",
        f"sif / mtime @{int(st.st_mtime)}",
    ]
    if not (tree / "lost+found").exists():
        cmds.insert(0, "rmdir lost+found")
    out = run(
        ["debugfs", "-w", "-f", "-", str(image)],
        input="\n".join(cmds) + "\n",
        what=f"setting the root of {image.name}",
    )
    bad = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if bad:
        raise ToolFailed(f"debugfs failed on {image.name}: {bad[-1]}")


def _publish(store: Store, build: Path, meta: LayerMeta) -> Layer:
    final = layer_dir(store, meta.diff_id)
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with store.lock(LOCK, purpose=f"add layer {final.name[:12]}"):
        try:
            os.rename(build, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return _load(final)  # another process made it meanwhile: the same content
        fsync_dir(final.parent)
    return _load(final)


def _usage(tree: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inodes) of an extracted tree: the size of its image."""
    used = 4096
    inodes = 1
    for top, dirs, files in os.walk(tree):
        inodes += len(dirs) + len(files)
        used += 4096 * len(dirs)
        for name in files:
            st = os.lstat(os.path.join(top, name))
            used += (st.st_size + 4095) // 4096 * 4096 if st.st_nlink == 1 else st.st_size
    return used, inodes


def adopt_image(
    store: Store,
    image: Path,
    *,
    diff_id: str,
    tar_size: int,
    entries: int,
    parent: str | None,
    kind: str,
    label: str,
    origin: Origin,
    blob: Path | None = None,
) -> Layer:
    """An image made elsewhere in the store (a base generation's ``base.img`` or
    ``layer.img``, whose diff_id the caller computed with :func:`tree_digest`) as a layer:
    hard-linked, no copy. ``blob``: its blob, when the caller has one (moved in); else it is
    made from the image now (one read of its tree, its tar checked to be ``diff_id``)."""
    require_root("adopting a layer")
    _check_parent(store, parent, kind)
    existing = _same(store, diff_id, parent)
    if existing is not None:
        return existing
    with store.staging("adopt") as stage:
        build = stage / "layer"
        build.mkdir(mode=0o700)
        try:
            os.link(image, build / IMAGE)
        except OSError:
            shutil.copyfile(image, build / IMAGE)
        if blob is not None:
            os.rename(blob, build / BLOB)
            blob_digest, blob_size = file_digest(build / BLOB), (build / BLOB).stat().st_size
        else:
            blob_digest, blob_size = _blob_of_image(stage, image, build / BLOB, diff_id, kind)
        meta = LayerMeta(
            diff_id=diff_id,
            blob_digest=blob_digest,
            blob_size=blob_size,
            tar_size=tar_size,
            parent=parent,
            kind=kind,
            created=now_iso(),
            label=label,
            image_size=0,  # shared with the generation: costs nothing more
            entries=entries,
            origin=origin.text,
            base=origin.base,
            generation=origin.generation,
            instance=origin.instance,
            message=origin.message,
        )
        write_record(build / LayerMeta.FILE, meta)
        return _publish(store, build, meta)


def _blob_of_image(
    stage: Path, image: Path, blob: Path, diff_id: str, kind: str
) -> tuple[str, int]:
    """The blob of the layer image ``image`` written to ``blob`` (its tree mounted read-only
    in ``stage``), its tar checked to be layer ``diff_id``; (its digest, its size). Made
    when the layer is made, so a push only sends it (:func:`blob_path`)."""
    mnt = stage / "mnt"
    mount_image(image, mnt, readonly=True, exclusive=False, guest=kind == "snapshot")
    try:
        with open(blob, "wb") as out:
            info = write_blob(mnt, out, kind=kind)
    finally:
        unmount_tree(mnt)
    if info.diff_id != diff_id:
        raise LayerRefused(
            f"image {image.name} gives a tar of digest {info.diff_id}, not the layer "
            f"{diff_id} it is adopted as: it was changed meanwhile; retry"
        )
    os.chmod(blob, 0o400)
    return info.blob_digest, info.blob_size


def tree_digest(tree: Path, *, kind: str, exclude: frozenset[bytes] = frozenset()) -> BlobInfo:
    """The diff_id of ``tree``'s layer (its blob not made: ``blob_digest`` empty): one read of
    the tree and a sha256 of its tar (a 700 MiB base: a few seconds)."""
    return write_blob(tree, None, kind=kind, exclude=exclude)


@contextlib.contextmanager
def mounted(store: Store, layer: Layer, where: Path) -> Iterator[Path]:
    """The layer's tree (overlayfs format), read-only, at ``where`` while the context lasts.
    Snapshot layers are guest data: mounted ``nosuid,nodev,noexec``."""
    mount_image(
        layer.image, where, readonly=True, exclusive=False, guest=layer.meta.kind == "snapshot"
    )
    try:
        yield where
    finally:
        unmount_tree(where)


def blob_path(store: Store, layer: Layer) -> Path:
    """The layer's blob file, made from its image when it is not kept (then checked against
    the recorded digests and kept). A caller must not change the file."""
    if layer.blob.is_file():
        return layer.blob
    require_root("making a layer's blob")
    with store.staging("blob") as stage:
        tmp = stage / BLOB
        with mounted(store, layer, stage / "mnt") as tree, open(tmp, "wb") as out:
            info = write_blob(tree, out, kind=layer.meta.kind)
        if info.diff_id != layer.diff_id:
            raise LayerRefused(
                f"layer {layer.short}'s image gives a tar of digest {info.diff_id}, not its "
                "own: the image was changed; restore the store from a backup"
            )
        if layer.meta.blob_digest and info.blob_digest != layer.meta.blob_digest:
            raise LayerRefused(
                f"layer {layer.short}'s blob made again has digest {info.blob_digest}, not "
                f"the recorded {layer.meta.blob_digest} (another zstd?); it cannot be pushed "
                "as the same blob"
            )
        with store.lock(LOCK, purpose=f"keep blob of {layer.short}"):
            os.chmod(tmp, 0o400)
            os.rename(tmp, layer.blob)
            if not layer.meta.blob_digest:
                meta = layer.meta.replace(blob_digest=info.blob_digest, blob_size=info.blob_size)
                write_record(layer.dir / LayerMeta.FILE, meta)
    return layer.blob


# -- references and removal --------------------------------------------------------------------
def _instances(store: Store) -> list[Instance]:
    out: list[Instance] = []
    if not store.instances_dir.is_dir():
        return out
    for d in sorted(store.instances_dir.iterdir()):
        if (d / Instance.FILE).is_file():
            with contextlib.suppress(Exception):
                out.append(read_record(d / Instance.FILE, Instance))
    return out


def _generation_layers(store: Store) -> Iterator[tuple[str, str]]:
    if not store.bases_dir.is_dir():
        return
    for gfile in sorted(store.bases_dir.glob("*/generations/*/generation.json")):
        try:
            data = json.loads(gfile.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("layer"), str):
            base, number = gfile.parent.parent.parent.name, gfile.parent.name
            yield data["layer"], f"base {base} generation {number}"


def _system_refs(store: Store, known: set[str]) -> Iterator[tuple[str, str]]:
    root = store.root / "systems"
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for diff_id in known:
            if diff_id in text:
                yield diff_id, f"system record {path.relative_to(store.root)}"


def references(store: Store) -> dict[str, list[str]]:
    """Every layer's referrers (``diff_id`` → who), for :func:`remove` and gc."""
    layers = list_layers(store)
    known = {la.diff_id for la in layers}
    refs: dict[str, list[str]] = {la.diff_id: [] for la in layers}

    def add(diff_id: str, who: str) -> None:
        refs.setdefault(diff_id, []).append(who)

    for la in layers:
        if la.parent is not None:
            add(la.parent, f"layer {la.short}")
    for inst in _instances(store):
        for diff_id in inst.layers:
            add(diff_id, f"instance {inst.name}")
        gen_layer = next(
            (
                la
                for la in layers
                if la.meta.base == inst.base
                and la.meta.generation == inst.generation
                and la.meta.kind in ("base", "delta")
            ),
            None,
        )
        if gen_layer is not None:
            add(gen_layer.diff_id, f"instance {inst.name}")
    for diff_id, who in _generation_layers(store):
        add(diff_id, who)
    for la in layers:  # a base generation still in the store keeps the layer kept for it
        m = la.meta
        if m.kind in ("base", "delta") and m.base is not None and m.generation is not None:
            gdir = store.base_dir(m.base) / "generations" / str(m.generation)
            if gdir.is_dir():
                add(la.diff_id, f"base {m.base} generation {m.generation}")
    for diff_id, who in _system_refs(store, known):
        add(diff_id, who)
    for diff_id, who in _pinned(store):
        add(diff_id, who)
    for fn in REFERRERS:
        for diff_id, who in fn(store):
            add(diff_id, who)
    return {k: sorted(set(v)) for k, v in refs.items()}


def remove(store: Store, layer: Layer) -> None:
    """Remove ``layer`` unless something references it (:class:`Conflict` naming it)."""
    with store.lock(LOCK, purpose=f"remove layer {layer.short}"):
        who = references(store).get(layer.diff_id, [])
        if who:
            raise Conflict(
                f"layer {layer.short} is used by {', '.join(who[:3])}"
                f"{' and more' if len(who) > 3 else ''}; remove those first"
            )
        _drop(store, layer)


def _drop(store: Store, layer: Layer) -> None:
    with store.staging("gone") as stage:
        os.rename(layer.dir, stage / layer.hex)  # gone at once; the files go with stage


def gc(store: Store, *, dry_run: bool = False) -> list[Layer]:
    """Remove every layer nothing references (repeatedly: a removed child may free its
    parent); the layers removed (or that would be, with ``dry_run``)."""
    gone: list[Layer] = []
    with store.lock(LOCK, purpose="layer gc"):
        while True:
            refs = references(store)
            dropped = {la.diff_id for la in gone}
            if dry_run:  # what goes frees its parents too
                for la in gone:
                    if la.parent is not None:
                        refs[la.parent] = [
                            w for w in refs.get(la.parent, []) if w != f"layer {la.short}"
                        ]
            free = [
                la
                for la in list_layers(store)
                if la.diff_id not in dropped and not refs.get(la.diff_id)
            ]
            if not free:
                return gone
            for la in free:
                if not dry_run:
                    _drop(store, la)
                gone.append(la)
