"""Records of a migration (issue 14): what the sender offers a receiving host (the VM, its
layer chain, the file manifest of its U), what the receiver answers (what it lacks, where it
found the rest) and what it says once the VM is made. They travel over SSH as JSON; the
receiver reads the sender's as input (validated field by field here, every path and size
checked again by :mod:`unionimg.migrate.plan`), the sender reads the receiver's the same way.
"""

from __future__ import annotations

from typing import Self

from unionimg.store.records import Fields, Instance, JsonObject, Record, RecordError

PROTOCOL = 1


class TreeEntry(Record, frozen=True):
    """One path of a tree sent by content: relative path (``os.fsdecode`` of its bytes),
    kind (file, dir, symlink, chr, blk, fifo, sock), full mode, owner, mtime, size, sha256
    of a file's content, a symlink's target, a device's number, every xattr (name → hex
    value, overlayfs' own included) and, for a second name of a hard-linked file, the
    first name (``link``)."""

    WHAT = "migration tree entry"

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    rdev: int | None = None
    xattrs: tuple[tuple[str, str], ...] = ()
    link: str | None = None

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "path": self.path,
            "kind": self.kind,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
        }
        if self.size:
            out["size"] = self.size
        for key in ("sha256", "target", "rdev", "link"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.xattrs:
            out["xattrs"] = dict(self.xattrs)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        xattrs: list[tuple[str, str]] = []
        raw = f.mapping("xattrs") if isinstance(data, dict) and "xattrs" in data else {}
        for name, value in raw.items():
            if type(value) is not str:
                raise RecordError(f"field 'xattrs'[{name!r}] is not a string")
            xattrs.append((name, value))
        return cls(
            path=f.text("path"),
            kind=f.text("kind"),
            mode=f.integer("mode"),
            uid=f.integer("uid"),
            gid=f.integer("gid"),
            mtime_ns=f.integer("mtime_ns"),
            size=f.integer("size", 0),
            sha256=f.maybe_text("sha256", None),
            target=f.maybe_text("target", None),
            rdev=f.maybe_integer("rdev", None),
            xattrs=tuple(sorted(xattrs)),
            link=f.maybe_text("link", None),
        )


class ChainLayer(Record, frozen=True):
    """One layer of the VM's image chain (top to bottom in an offer): its diff_id, kind,
    parent, and the size of its blob (what sending it whole costs)."""

    WHAT = "migration chain layer"

    diff_id: str
    kind: str
    parent: str | None
    blob_size: int
    base: str | None = None
    generation: int | None = None

    def to_json(self) -> JsonObject:
        return {
            "diff_id": self.diff_id,
            "kind": self.kind,
            "parent": self.parent,
            "blob_size": self.blob_size,
            "base": self.base,
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            diff_id=f.text("diff_id"),
            kind=f.text("kind"),
            parent=f.maybe_text("parent"),
            blob_size=f.integer("blob_size"),
            base=f.maybe_text("base", None),
            generation=f.maybe_integer("generation", None),
        )


class LayerTree(Record, frozen=True):
    """A chain layer the receiver lacks, offered by content: its tree's root (path ``.``)
    and entries, from which the receiver remakes the layer (and checks its diff_id)."""

    WHAT = "migration layer tree"

    diff_id: str
    root: TreeEntry
    entries: tuple[TreeEntry, ...]

    def to_json(self) -> JsonObject:
        return {
            "diff_id": self.diff_id,
            "root": self.root.to_json(),
            "entries": [e.to_json() for e in self.entries],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        try:
            root = TreeEntry.from_json(f.mapping("root"))
        except RecordError as exc:
            raise RecordError(f"root: {exc}") from None
        return cls(diff_id=f.text("diff_id"), root=root, entries=f.records("entries", TreeEntry))


class MigrateOffer(Record, frozen=True):
    """What the sender offers: the VM's instance record (the receiver keeps its MAC, U size,
    resources; ``hypervisor`` as asked), its chain (top to bottom: its snapshot layers, then
    the layers of its base generation), the manifest of its U image's tree, and the
    contents (sha256) its changed files' deltas would lie on (their base versions)."""

    WHAT = "migration offer"

    protocol: int
    instance: Instance
    chain: tuple[ChainLayer, ...]
    entries: tuple[TreeEntry, ...]
    sender: str = ""
    bases: tuple[str, ...] = ()  # contents a delta may lie on (the base's older versions)
    layer_trees: tuple[LayerTree, ...] = ()  # chain layers offered by content
    # content → the host's chunk ranges ("a-b,...") to cut finer (unionimg.migrate.cdc)
    refine: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "layer_trees": [t.to_json() for t in self.layer_trees],
            "protocol": self.protocol,
            "instance": self.instance.to_json(),
            "chain": [c.to_json() for c in self.chain],
            "entries": [e.to_json() for e in self.entries],
            "sender": self.sender,
            "bases": list(self.bases),
        }
        if self.refine:
            out["refine"] = dict(self.refine)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        inst = f.mapping("instance")
        try:
            instance = Instance.from_json(inst)
        except RecordError as exc:
            raise RecordError(f"instance: {exc}") from None
        return cls(
            protocol=f.integer("protocol"),
            instance=instance,
            chain=f.records("chain", ChainLayer),
            entries=f.records("entries", TreeEntry),
            sender=f.text("sender", ""),
            bases=f.maybe_texts("bases") or (),
            layer_trees=f.records("layer_trees", LayerTree, ()),
            refine=_text_map(data, "refine"),
        )


class MigrateAnswer(Record, frozen=True):
    """The receiver's answer to an offer: the chain layers it lacks, the file contents it
    has nowhere (sha256), and for each content it has, where (a short label: ``staged``,
    ``base NAME/N``, ``layer L...``); the base generation the VM will lie on there. For a
    large content it lacks but holds a nearest version of (``unionimg.migrate.cdc``):
    ``chunks`` (sha256 → base64 of the chunk digests of that version, one after another)
    and ``nearest`` (sha256 → what that version is, e.g. ``kept copy of vm web``); when the
    offer asked to look finer at some of those chunks (``refine``), ``fine`` (sha256 →
    base64 of the digests of their fine chunks)."""

    WHAT = "migration answer"

    layers_missing: tuple[str, ...]
    hashes_missing: tuple[str, ...]
    found: tuple[tuple[str, str], ...]
    base: str
    generation: int
    install_base: bool = False
    chunks: tuple[tuple[str, str], ...] = ()
    nearest: tuple[tuple[str, str], ...] = ()
    fine: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> JsonObject:
        return {
            "layers_missing": list(self.layers_missing),
            "hashes_missing": list(self.hashes_missing),
            "found": dict(self.found),
            "base": self.base,
            "generation": self.generation,
            "install_base": self.install_base,
            "chunks": dict(self.chunks),
            "nearest": dict(self.nearest),
            "fine": dict(self.fine),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        found = []
        for sha, where in f.mapping("found").items():
            if type(where) is not str:
                raise RecordError(f"field 'found'[{sha[:16]!r}] is not a string")
            found.append((sha, where))
        return cls(
            layers_missing=f.texts("layers_missing"),
            hashes_missing=f.texts("hashes_missing"),
            found=tuple(sorted(found)),
            base=f.text("base"),
            generation=f.integer("generation"),
            install_base=f.flag("install_base", False),
            chunks=_text_map(data, "chunks"),
            nearest=_text_map(data, "nearest"),
            fine=_text_map(data, "fine"),
        )


def _text_map(data: object, key: str) -> tuple[tuple[str, str], ...]:
    """An optional mapping of strings to strings (absent: empty), sorted."""
    if not isinstance(data, dict) or key not in data:
        return ()
    out = []
    for k, v in Fields(data).mapping(key).items():
        if type(v) is not str:
            raise RecordError(f"field {key!r}[{k[:16]!r}] is not a string")
        out.append((k, v))
    return tuple(sorted(out))


class MigrateDone(Record, frozen=True):
    """What the receiver says once the VM is made there: its name and MAC, how many files it
    verified by hash, what arrived (objects, layers, bytes) and what it took from its own
    content."""

    WHAT = "migration result"

    instance: str
    mac: str
    hypervisor: str
    files_verified: int
    objects_received: int
    layers_received: int
    bytes_received: int
    reused: int
    seconds: float

    def to_json(self) -> JsonObject:
        return {
            "instance": self.instance,
            "mac": self.mac,
            "hypervisor": self.hypervisor,
            "files_verified": self.files_verified,
            "objects_received": self.objects_received,
            "layers_received": self.layers_received,
            "bytes_received": self.bytes_received,
            "reused": self.reused,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        seconds = data.get("seconds", 0.0) if isinstance(data, dict) else 0.0
        return cls(
            instance=f.text("instance"),
            mac=f.text("mac"),
            hypervisor=f.text("hypervisor"),
            files_verified=f.integer("files_verified"),
            objects_received=f.integer("objects_received"),
            layers_received=f.integer("layers_received"),
            bytes_received=f.integer("bytes_received"),
            reused=f.integer("reused"),
            seconds=float(seconds) if type(seconds) in (int, float) else 0.0,
        )


class HashIndex(Record, frozen=True):
    """``migrate/layers/HEX.json``, ``migrate/vms/NAME.json``: where a snapshot layer's or a
    stopped VM's upper layer holds each content (sha256 → a path), computed by hashing its
    files; ``stamp`` names what it was computed from (a VM's U image: inode, size, mtime)."""

    WHAT = "content index"

    stamp: str
    hashes: tuple[tuple[str, str], ...]

    def to_json(self) -> JsonObject:
        return {"stamp": self.stamp, "hashes": dict(self.hashes)}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        out = []
        for sha, path in f.mapping("hashes").items():
            if type(path) is not str:
                raise RecordError(f"field 'hashes'[{sha[:16]!r}] is not a string")
            out.append((sha, path))
        return cls(stamp=f.text("stamp"), hashes=tuple(sorted(out)))


class LeftManifest(Record, frozen=True):
    """``migrate/left/NAME.json``: the large files of VM ``NAME``'s upper layer as it left
    this store (guest path → sha256; their contents kept in the object cache), where its
    way back finds the nearest version of a large file changed meanwhile."""

    WHAT = "left VM manifest"

    instance: str
    files: tuple[tuple[str, str], ...]

    def to_json(self) -> JsonObject:
        return {"instance": self.instance, "files": dict(self.files)}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(instance=f.text("instance"), files=_text_map(data, "files"))
