"""The content a store holds, by sha256: where a migration finds a file without receiving it.

Sources, in the order they are asked:

- **the object cache** ``STORE/migrate/objects/SHA256``: contents that arrived in a
  migration (verified before they were kept: a broken transfer's contents wait there for the
  rerun) and the contents of VMs that left this host (kept when they left, so their way back
  sends only what changed). Files are named by their hash and written only after it checked
  (as ``.SHA.PID.tmp`` until then: those of a writer that was killed are removed by the
  next receive, :func:`sweep_temporaries`). An object's mtime says when it was last
  **used**: set when it is written, and again (:func:`touch`) each time an offer or a
  receive finds it here (:func:`locate`) or a leaving VM's content is found here already
  (:func:`keep_file`); ``unionimg migrate gc`` (:mod:`.gc`) evicts the least recently used
  first. Writers into the cache and the gc take the store lock :data:`CACHE_LOCK`;
- **base generations**: each generation's manifest (``manifest.sqlite``: path → sha256, made
  by unionimg from the trusted base); content read from the generation's tree mounted
  read-only;
- **snapshot layers** of the layer cache: a layer's file hashes are computed once (its image
  mounted, scanned) and kept in ``STORE/migrate/layers/HEX.json`` (a layer never changes);
- **the upper layers of this store's stopped VMs**: hashed here (never taken from the VM's
  own sidecar: guest data), kept in ``STORE/migrate/vms/NAME.json`` with the U image's
  identity (inode, size, mtime) and computed again when it changed. A running or mounted
  VM is left out.

Every content taken from a source is hashed again while it is copied
(:func:`unionimg.migrate.tree.build`): a source that does not hold what its index says fails
the build in one line, never yields wrong bytes.

For a large content it lacks, a store also finds its **nearest versions** (:func:`nearest`,
chunked by :class:`Nearest` for :mod:`.cdc`): a broken transfer's **partial arrival** of it
(``STORE/migrate/partial/SHA``, :meth:`ObjectWriter.keep_partial`), the same guest path in
the copy of that VM kept when it left (``STORE/migrate/left/NAME.json``, :func:`keep_left`:
its large files' paths; their contents are in the object cache), in a base generation, or in
a stopped VM's upper layer.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from unionimg.errors import UnionimgError, UsageError
from unionimg.layers import base as base_mod
from unionimg.layers import instance as inst_mod
from unionimg.layers import layerstore
from unionimg.migrate import cdc
from unionimg.migrate.plan import Refused
from unionimg.migrate.tree import CHUNK, open_file, scan
from unionimg.store.layout import Store, fsync_dir, read_record, write_record
from unionimg.store.migrate_records import HashIndex, LeftManifest

_SHA_RE = re.compile(r"[0-9a-f]{64}")
CACHE_LOCK = "migrate-in"
"""The store lock of the object cache: a receive holds it throughout, a sender while it keeps
a leaving VM's contents, ``migrate gc`` while it removes."""


def migrate_dir(store: Store) -> Path:
    return store.root / "migrate"


def objects_dir(store: Store) -> Path:
    return migrate_dir(store) / "objects"


def object_path(store: Store, sha: str) -> Path:
    if not _SHA_RE.fullmatch(sha):
        raise UsageError(f"{sha[:80]!r} is not a sha256")
    return objects_dir(store) / sha


def has_object(store: Store, sha: str) -> bool:
    return object_path(store, sha).is_file()


def touch(store: Store, sha: str) -> None:
    """Mark object ``sha`` as used now (its mtime: what the gc's LRU order reads; atime is
    not kept reliably under relatime). A vanished object is left vanished."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(object_path(store, sha))


class ObjectWriter:
    """One content arriving: written to a temporary file of the cache, hashed, kept under
    its sha256 only when it matches and has exactly the announced size."""

    def __init__(self, store: Store, sha: str, size: int) -> None:
        self.final = object_path(store, sha)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{sha}.{os.getpid()}.tmp")
        self.fh: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 (closed in done/abort)
        self.hash = hashlib.sha256()
        self.sha = sha
        self.size = size
        self.got = 0

    def write(self, data: bytes) -> None:
        self.got += len(data)
        if self.got > self.size:
            self.abort()
            raise Refused(
                f"migration refused: content {self.sha[:16]}... is longer than its announced "
                f"{self.size} bytes; nothing was made"
            )
        self.hash.update(data)
        self.fh.write(data)

    def done(self) -> None:
        if self.got != self.size or self.hash.hexdigest() != self.sha:
            self.abort()
            raise Refused(
                f"migration refused: content {self.sha[:16]}... does not match its sha256 "
                f"(or its size {self.size}); nothing was made"
            )
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, 0o400)
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tmp.unlink(missing_ok=True)

    def keep_partial(self) -> bool:
        """The link broke inside this content: keep what arrived as its partial arrival
        (:func:`partial_path`), the nearest version a rerun chunks (:mod:`.cdc`: only the
        chunks it holds whole are used, each hashed again) unless an earlier one holds more;
        True when kept. Only for large contents: a small one is simply sent again."""
        with contextlib.suppress(OSError):
            self.fh.flush()
            os.fsync(self.fh.fileno())
        with contextlib.suppress(OSError):
            self.fh.close()
        if self.size < cdc.MIN_FILE or self.got < cdc.MIN_CHUNK:
            self.tmp.unlink(missing_ok=True)
            return False
        dest = partial_path(self.final.parent.parent, self.sha)
        try:
            if dest.stat().st_size >= self.got:  # an earlier run's, longer: it stays
                self.tmp.unlink(missing_ok=True)
                return False
        except FileNotFoundError:
            pass
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, dest)
            fsync_dir(dest.parent)
        except OSError:
            self.tmp.unlink(missing_ok=True)
            return False
        return True


def partial_path(mdir: Path, sha: str) -> Path:
    """``STORE/migrate/partial/SHA``: what arrived of content SHA before a link broke."""
    if not _SHA_RE.fullmatch(sha):
        raise UsageError(f"{sha[:80]!r} is not a sha256")
    return mdir / "partial" / sha


def drop_partial(store: Store, sha: str) -> None:
    """Content ``sha`` arrived whole: its partial arrival is no longer needed."""
    partial_path(migrate_dir(store), sha).unlink(missing_ok=True)


def left_path(store: Store, name: str) -> Path:
    return migrate_dir(store) / "left" / f"{name}.json"


def keep_left(store: Store, name: str, files: dict[str, str]) -> None:
    """Record the large files (guest path → sha256) of VM ``name`` as it leaves (their
    contents are kept in the cache): its way back chunks them as nearest versions."""
    path = left_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, LeftManifest(name, tuple(sorted(files.items()))))


def read_left(store: Store, name: str) -> dict[str, str]:
    try:
        rec = read_record(left_path(store, name), LeftManifest)
    except (OSError, UnionimgError):
        return {}
    return dict(rec.files) if rec.instance == name else {}


_TMP_RE = re.compile(r"\.[0-9a-f]{64}\.([0-9]{1,10})\.tmp")


def dead_temporaries(store: Store) -> list[Path]:
    """The temporary files (``.SHA.PID.tmp``) of the object cache whose writer is gone (a
    live one may still be writing; a PID taken again by another process keeps its file until
    a later look)."""
    try:
        names = sorted(os.listdir(objects_dir(store)))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _TMP_RE.fullmatch(name)
        if m is not None and not _alive(int(m.group(1))):
            out.append(objects_dir(store) / name)
    return out


def sweep_temporaries(store: Store) -> int:
    """Remove the temporary files that writers killed mid-content left in the object cache
    (:func:`dead_temporaries`). The number removed."""
    swept = 0
    for path in dead_temporaries(store):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            swept += 1
    return swept


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def keep_file(store: Store, src: BinaryIO, sha: str, size: int) -> bool:
    """Keep the content read from ``src`` in the cache (checked); False when it was there
    (then marked used: :func:`touch`). The caller holds :data:`CACHE_LOCK`."""
    if has_object(store, sha):
        touch(store, sha)
        return False
    w = ObjectWriter(store, sha, size)
    while chunk := src.read(CHUNK):
        w.write(chunk)
    w.done()
    return True


# -- where each content is ----------------------------------------------------------------------
@dataclass(frozen=True)
class Place:
    """Where a content lies: the cache, a base generation's tree, a snapshot layer's tree."""

    kind: str  # cache, base, layer, vm
    ref: str  # base NAME/N, a layer's diff_id, or a VM's name
    path: str  # its path in that tree ("" in the cache)

    @property
    def label(self) -> str:
        if self.kind == "cache":
            return "cache"
        if self.kind == "base":
            return f"base {self.ref} {self.path}"
        if self.kind == "vm":
            return f"vm {self.ref} /{self.path}"
        return f"layer {layerstore.label_of(self.ref)} /{self.path}"


def _layer_hashes(store: Store, layer: layerstore.Layer) -> dict[str, str]:
    """sha256 → a path of layer ``layer``'s tree (computed once, kept per layer)."""
    cache = migrate_dir(store) / "layers" / f"{layer.hex}.json"
    known = _read_index(cache, layer.diff_id)
    if known is not None:
        return known
    out: dict[str, str] = {}
    with (
        store.staging("migrate-layer") as stage,
        layerstore.mounted(store, layer, stage / "mnt") as tree,
    ):
        for e in scan(tree):
            if e.kind == "file" and e.sha256 is not None and not e.xattrs:
                out.setdefault(e.sha256, e.path)
    _write_index(cache, layer.diff_id, out)
    return out


def _vm_hashes(store: Store, name: str) -> dict[str, str] | None:
    """sha256 → a path (below U's root) of VM ``name``'s upper layer; None for a VM that
    runs or is mounted (its U is its own while it does)."""
    image = inst_mod.upper_image(store, name)
    try:
        st = image.stat()
    except OSError:
        return None
    stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache = migrate_dir(store) / "vms" / f"{name}.json"
    known = _read_index(cache, stamp)
    if known is not None:
        return known
    if inst_mod.state(store, name) != "stopped":
        return None
    out: dict[str, str] = {}
    with inst_mod.u_layer(store, name, write=False) as u:
        if (u / "upper").is_dir() and not (u / "upper").is_symlink():
            for e in scan(u / "upper"):
                if e.kind == "file" and e.sha256 is not None and not e.xattrs:
                    out.setdefault(e.sha256, f"upper/{e.path}")
    _write_index(cache, stamp, out)
    return out


def vm_contents(store: Store, name: str) -> set[str]:
    """The contents of VM ``name``'s upper layer (empty for a running or mounted VM)."""
    return set(_vm_hashes(store, name) or {})


def _read_index(path: Path, stamp: str) -> dict[str, str] | None:
    try:
        rec = read_record(path, HashIndex)
    except (OSError, UnionimgError):  # missing, or damaged: computed again
        return None
    return dict(rec.hashes) if rec.stamp == stamp else None


def _write_index(path: Path, stamp: str, hashes: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, HashIndex(stamp, tuple(sorted(hashes.items()))))


def locate(
    store: Store,
    wanted: set[str],
    *,
    with_layers: bool = True,
    with_cache: bool = True,
    skip_vms: frozenset[str] = frozenset(),
) -> dict[str, Place]:
    """Where this store holds each of the ``wanted`` contents (those it holds nowhere are
    absent from the result). Contents found in the object cache are marked used
    (:func:`touch`); ``with_cache=False`` looks only elsewhere (what the gc asks), and the
    VMs named in ``skip_vms`` are not looked in."""
    out: dict[str, Place] = {}
    for sha in wanted if with_cache else ():
        if has_object(store, sha):
            touch(store, sha)
            out[sha] = Place("cache", "", "")
    left = wanted - out.keys()
    for name in base_mod.list_bases(store):
        if not left:
            break
        for gen in base_mod.generations(store, name):
            with gen.manifest() as man:
                for e in man:
                    if e.kind == "file" and e.sha256 in left and not e.xattrs:
                        out[e.sha256] = Place("base", f"{name}/{gen.number}", e.path)
                        left.discard(e.sha256)
    if with_layers and left:
        for layer in layerstore.list_layers(store):
            if not left:
                break
            if layer.meta.kind != "snapshot":
                continue
            for sha, path in _layer_hashes(store, layer).items():
                if sha in left:
                    out[sha] = Place("layer", layer.diff_id, path)
                    left.discard(sha)
    if with_layers and left:
        for inst in inst_mod.list_instances(store):
            if not left:
                break
            if inst.name in skip_vms:
                continue
            for sha, path in (_vm_hashes(store, inst.name) or {}).items():
                if sha in left:
                    out[sha] = Place("vm", inst.name, path)
                    left.discard(sha)
    return out


class Sources:
    """Reads contents from their places while the context lasts (the trees they lie in
    mounted once each, read-only)."""

    def __init__(self, store: Store, places: dict[str, Place]) -> None:
        self.store = store
        self.places = places
        self.stack = contextlib.ExitStack()
        self.trees: dict[tuple[str, str], Path] = {}

    def __enter__(self) -> Sources:
        stage = self.stack.enter_context(self.store.staging("migrate-src"))
        for n, key in enumerate(sorted({(p.kind, p.ref) for p in self.places.values()})):
            kind, ref = key
            if kind == "base":
                name, _, number = ref.rpartition("/")
                gen = base_mod.get_generation(self.store, name, int(number))
                where = stage / f"t{n}"
                self.trees[key] = self.stack.enter_context(
                    base_mod.generation_tree(self.store, gen, where)
                )
            elif kind == "layer":
                layer = layerstore.get(self.store, ref)
                self.trees[key] = self.stack.enter_context(
                    layerstore.mounted(self.store, layer, stage / f"t{n}")
                )
            elif kind == "vm":  # its U read-only, as guest data (nosuid, nodev, noexec)
                self.trees[key] = self.stack.enter_context(
                    inst_mod.u_layer(self.store, ref, write=False)
                )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def open(self, sha: str) -> BinaryIO:
        """Content ``sha`` opened for reading (the caller closes it)."""
        place = self.places[sha]
        if place.kind == "cache":
            return open(object_path(self.store, sha), "rb")
        return open_file(self.trees[(place.kind, place.ref)], place.path.lstrip("/"))

    def read(self, sha: str) -> Iterator[bytes]:
        with self.open(sha) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk


# -- the nearest versions of large contents (content-defined chunks, :mod:`.cdc`) ----------------
@dataclass(frozen=True)
class Seed:
    """A nearest version of a content: another content of this store (``sha``, read where
    :func:`locate` finds it) or a partial arrival (``partial``)."""

    label: str
    sha: str | None = None
    partial: Path | None = None


def nearest(
    store: Store, name: str, base: str, generation: int, wanted: dict[str, set[str]]
) -> dict[str, list[Seed]]:
    """For each large content this store lacks (sha256 → its guest paths ``/P`` in the
    offer), its nearest versions here, at most :data:`.cdc.MAX_SEEDS`, in this order: its
    partial arrival (a broken transfer's), the same path in VM ``name``'s copy kept when it
    left (:func:`keep_left`), in base generation ``base``/``generation``, in the other base
    generations, in the upper layers of the stopped VMs here."""
    out: dict[str, list[Seed]] = {}
    if not wanted:
        return out
    left = read_left(store, name)
    by_path: list[tuple[str, dict[str, str]]] = []
    if left:
        by_path.append((f"kept copy of vm {name}", left))
    gens = []
    for bname in base_mod.list_bases(store):
        for gen in base_mod.generations(store, bname):
            gens.append(((bname, gen.number) != (base, generation), bname, gen))
    all_paths = set().union(*wanted.values())
    for _other, bname, gen in sorted(gens, key=lambda g: (g[0], g[1], -g[2].number)):
        files: dict[str, str] = {}
        with gen.manifest() as man:
            for path in all_paths:
                e = man.get(path)
                if e is not None and e.kind == "file" and e.sha256 and not e.xattrs:
                    files[path] = e.sha256
        if files:
            by_path.append((f"base {bname}/{gen.number} (same path)", files))
    for inst in inst_mod.list_instances(store):
        hashes = _vm_hashes(store, inst.name) or {}
        files = {
            "/" + p.removeprefix("upper/"): sha
            for sha, p in hashes.items()
            if p.startswith("upper/") and "/" + p.removeprefix("upper/") in all_paths
        }
        if files:
            by_path.append((f"vm {inst.name} (same path)", files))
    for sha, paths in wanted.items():
        seeds: list[Seed] = []
        part = partial_path(migrate_dir(store), sha)
        if part.is_file():
            seeds.append(Seed("partial arrival of an earlier, broken transfer", partial=part))
        taken = {sha}
        for label, files in by_path:
            for path in sorted(paths):
                s = files.get(path)
                if s is not None and s not in taken and len(seeds) < cdc.MAX_SEEDS:
                    taken.add(s)
                    seeds.append(Seed(label, sha=s))
        if seeds:
            out[sha] = seeds
    return out


class Nearest:
    """The nearest versions (:func:`nearest`) chunked (:func:`.cdc.cut`) and open for
    reading while the context lasts: per content, the list of chunk digests the answer
    names (its seeds' chunks one after another, at most :func:`.cdc.list_limit` of the
    content's size in ``sizes``: a far larger seed is left out) and each chunk's place; for
    the contents ``refine`` names (sha256 → regions of that list, :func:`.cdc.regions`),
    the fine chunks of those regions too (kept in memory: 2 MiB a region at most)."""

    def __init__(
        self,
        store: Store,
        seeds: dict[str, list[Seed]],
        sizes: dict[str, int] | None = None,
        refine: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.seeds = seeds
        self.sizes = sizes or {}
        self.refine = refine or {}
        self.fine: dict[str, list[bytes]] = {}
        # a fine chunk: (its region's first chunk, the region's chunk ends, offset, length)
        self.fine_where: dict[str, list[tuple[int, list[int], int, int]]] = {}
        self.stack = contextlib.ExitStack()
        self.have: dict[str, list[bytes]] = {}
        self.where: dict[str, list[tuple[BinaryIO, int, int]]] = {}
        self.labels: dict[str, str] = {}

    def __enter__(self) -> Nearest:
        if not self.seeds:
            return self
        shas = {s.sha for seeds in self.seeds.values() for s in seeds if s.sha is not None}
        places = locate(self.store, shas) if shas else {}
        src = self.stack.enter_context(Sources(self.store, places))
        cut: dict[str, tuple[BinaryIO, list[cdc.Chunk]]] = {}
        for sha, seeds in sorted(self.seeds.items()):
            have: list[bytes] = []
            where: list[tuple[BinaryIO, int, int]] = []
            labels = []
            largest = max(4 * self.sizes.get(sha, 0), 1 << 30)
            for seed in seeds:
                key = seed.sha or str(seed.partial)
                if key not in cut:
                    try:  # gone meanwhile (an offer takes no lock: a gc may run): skipped
                        if seed.sha is not None:
                            if seed.sha not in places:
                                continue
                            fh = self.stack.enter_context(src.open(seed.sha))
                        else:
                            assert seed.partial is not None
                            fh = self.stack.enter_context(open(seed.partial, "rb"))
                    except OSError:
                        continue
                    if os.fstat(fh.fileno()).st_size > largest:
                        continue  # far larger than the file: not read, not listed
                    cut[key] = (fh, list(cdc.cut(fh)))
                fh, chunks = cut[key]
                limit = cdc.list_limit(self.sizes.get(sha, 0))
                if len(have) + len(chunks) > limit:
                    continue  # the sender's bound (cdc.list_limit)
                labels.append(seed.label)
                for off, length, d in chunks:
                    have.append(d)
                    where.append((fh, off, length))
            if have:
                self.have[sha] = have
                self.where[sha] = where
                self.labels[sha] = "; ".join(labels)
                if sha in self.refine:
                    self._refine(sha, cdc.decode_regions(self.refine[sha], len(have)))
        return self

    def _refine(self, sha: str, ranges: list[tuple[int, int]]) -> None:
        """The fine chunks (:func:`.cdc.fine_chunker`) of the regions ``ranges`` of
        content ``sha``'s list (one region in memory at a time: at most MAX_REFINE chunks,
        2 MiB; what is kept is where each fine chunk lies)."""
        fine: list[bytes] = []
        where: list[tuple[int, list[int], int, int]] = []
        for a, b in ranges:
            region = bytearray()
            ends = []
            for i in range(a, b):
                region += self.read(sha, i)
                ends.append(len(region))
            for c in cdc.fine_chunker().cut_buf(bytes(region)):
                fine.append(cdc.digest(c.data))
                where.append((a, ends, c.offset, c.length))
        self.fine[sha] = fine
        self.fine_where[sha] = where

    def read_fine(self, sha: str, i: int) -> bytes:
        """Fine chunk ``i`` of content ``sha``'s nearest versions, read from the chunks it
        lies in (its digest is checked by the caller, :class:`.cdc.Rebuild`)."""
        a, ends, off, length = self.fine_where[sha][i]
        out = bytearray()
        k = bisect.bisect_right(ends, off)
        start = ends[k - 1] if k else 0
        while len(out) < length and k < len(ends):
            chunk = self.read(sha, a + k)
            out += chunk[max(0, off - start) : off + length - start]
            start = ends[k]
            k += 1
        return bytes(out)

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def read(self, sha: str, i: int) -> bytes:
        fh, off, length = self.where[sha][i]
        return os.pread(fh.fileno(), length, off)


def decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor()
