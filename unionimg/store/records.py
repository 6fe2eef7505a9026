"""Typed records: every JSON file unionimg writes, its name and its fields, in one place.

Each record is a frozen ``msgspec.Struct`` (see :class:`Record`) with ``to_json()`` (the
JSON value written, keys and key order exactly as every earlier version wrote them) and
``from_json()`` (a classmethod that checks the value's shape and raises
:class:`RecordError` naming the first field that is missing or of the wrong type). A record
file has its name once, as ``FILE``; reading and writing go through
:func:`unionimg.store.layout.read_record` and :func:`~unionimg.store.layout.write_record`,
which turn a :class:`RecordError` into one :class:`DamagedRecord` line naming the file.
``Any`` stops here: it is the type of a ``json.loads`` result and of what ``to_json`` gives
``json.dumps`` (:data:`JsonObject`).

Reading is as lenient as the code before these types was, and no more: a field every
version wrote is required, one added later (or always read with a default) keeps that
default, keys a record does not know are ignored (a newer unionimg may add some).

The records live in several modules, so a command loads only the records it uses: this one
(the store, bases, instances, layers, conflicts), :mod:`unionimg.store.reconcile_records`
(reconcile's own files: held resolutions, ownership proposals, the undo record, reports,
check baselines), :mod:`unionimg.store.fleet_records` (systems, deployments, hosts) and one
per later domain (migrate, placement, snapshot), each built on :class:`Record` and
:class:`Fields`.

In the store (trusted; see ``unionimg/store/layout.py`` for where each file lives):

=====================  ==========================  ===========================================
file                   record                      written by
=====================  ==========================  ===========================================
store.json             :class:`StoreMeta`          ``Store.init``
bases/B/base.json      :class:`BaseMeta`           ``base create``
generation.json        :class:`GenerationMeta`     ``base create/update``
instance.json          :class:`Instance`           ``instance create``, reconcile, switch,
                                                   ``instance snapshot``
layer.json             :class:`LayerMeta`          ``instance snapshot``, base layers, layer
                                                   imports (``layers/sha256/HEX/``)
mount.json             :class:`MountRecord`        ``mount`` (removed by ``umount``)
u-checked.json         :class:`UCheckStamp`        U check (e2fsck) or a clean unmount
conflicts.json         :class:`Conflicts`          reconcile, ``resolve``, ``--undo``
proposal-owners        :class:`OwnerChanges`       reconcile, in a conflict's directory (read
                                                   by ``resolve --take proposal``)
reconcile-journal.json :class:`ReconcileJournal`   reconcile, between swap and commit
last-reconcile.json    :class:`LastReconcile`      reconcile (read by ``--undo``)
reports/reconcile-*    :class:`ReconcileReport`    reconcile (of :class:`InstanceReport`)
bases/B/checks/N.json  :class:`CheckBaseline`      reconcile: the consistency checks on
                                                   generation N alone (``reconcile.checks``)
systems/S/system.json  :class:`SystemMeta`         ``system create/snapshot``; a deploy on a
                                                   host (also a system node's config blob)
systems/S/deployed.json :class:`Deployment`        ``system materialize`` on a host
hosts/H/host.json      :class:`HostMeta`           ``host add``
/var/cache/unionimg/*  :class:`ProbeCache`         the KVM and UML probes
=====================  ==========================  ===========================================

Written into a U image (guest data: unionimg writes them, the guest may change them, so
if code ever reads them back it must treat a :class:`RecordError` as refused guest data):
``.unionimg/base.json`` (:class:`BaseRef`) and ``.unionimg/resolutions.jsonl``
(:class:`Resolution`, one line per resolve), both as :func:`compact` JSON.

Not here: ``running.json`` and ``crashed.json`` (:mod:`unionimg.layers.running` with the
drivers' ``Running`` record), ``deltas/B0-B1.json`` and the sidecar ``manifest.jsonl``
(:mod:`unionimg.entries`, a list of ``Change``/``Entry``).
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Self, TypeVar

import msgspec

from unionimg.errors import EXIT_INTERNAL, UnionimgError

JsonObject = dict[str, Any]
"""A JSON object as ``json.loads`` gives it or ``json.dumps`` takes it: the JSON edge."""


class RecordError(ValueError):
    """A JSON value that is not the record it should be: which field, and what is wrong
    (the reader adds which file)."""


class DamagedRecord(UnionimgError):
    """A record file in the store does not read as the record unionimg wrote there (edited
    by hand, damaged on disk, or written by another version of unionimg)."""

    exit_code = EXIT_INTERNAL


class _Missing(enum.Enum):
    MISSING = 0


MISSING = _Missing.MISSING
R = TypeVar("R", bound="Record")


def _kind(value: object) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # not from json.loads: a caller's bug


class Fields:
    """One JSON object read field by field: a missing or ill-typed field raises
    :class:`RecordError` naming it. A ``default`` makes a field optional."""

    __slots__ = ("_data",)

    def __init__(self, data: object) -> None:
        if not isinstance(data, dict):
            raise RecordError(f"it holds {_kind(data)}, not a JSON object")
        self._data: dict[str, object] = data

    def _bad(self, key: str, value: object, expected: str) -> RecordError:
        if value is MISSING:
            return RecordError(f"field '{key}' is missing")
        return RecordError(f"field '{key}' is {_kind(value)}, not {expected}")

    def text(self, key: str, default: str | _Missing = MISSING) -> str:
        value = self._data.get(key, MISSING)
        if type(value) is str:
            return value
        if value is MISSING and not isinstance(default, _Missing):
            return default
        raise self._bad(key, value, "a string")

    def maybe_text(self, key: str, default: str | _Missing | None = MISSING) -> str | None:
        value = self._data.get(key, MISSING)
        if value is None or type(value) is str:
            return value
        if value is MISSING and not isinstance(default, _Missing):
            return default
        raise self._bad(key, value, "a string or null")

    def integer(self, key: str, default: int | _Missing = MISSING) -> int:
        value = self._data.get(key, MISSING)
        if type(value) is int:  # not a bool
            return value
        if value is MISSING and not isinstance(default, _Missing):
            return default
        raise self._bad(key, value, "an integer")

    def maybe_integer(self, key: str, default: int | _Missing | None = MISSING) -> int | None:
        value = self._data.get(key, MISSING)
        if value is None or type(value) is int:
            return value
        if value is MISSING and not isinstance(default, _Missing):
            return default
        raise self._bad(key, value, "an integer or null")

    def flag(self, key: str, default: bool | _Missing = MISSING) -> bool:
        value = self._data.get(key, MISSING)
        if type(value) is bool:
            return value
        if value is MISSING and not isinstance(default, _Missing):
            return default
        raise self._bad(key, value, "a boolean")

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._data.get(key, MISSING)
        if not isinstance(value, list):
            raise self._bad(key, value, "a list of strings")
        for i, item in enumerate(value):
            if type(item) is not str:
                raise RecordError(f"field '{key}'[{i}] is {_kind(item)}, not a string")
        return tuple(value)

    def maybe_texts(self, key: str) -> tuple[str, ...] | None:
        """A list of strings, or None when the field is null or missing."""
        if self._data.get(key) is None:
            return None
        return self.texts(key)

    def mapping(self, key: str) -> dict[str, object]:
        value = self._data.get(key, MISSING)
        if isinstance(value, dict):
            return value
        raise self._bad(key, value, "an object")

    def records(
        self, key: str, kind: type[R], default: tuple[R, ...] | _Missing = MISSING
    ) -> tuple[R, ...]:
        value = self._data.get(key, MISSING)
        if value is MISSING and not isinstance(default, _Missing):
            return default
        return record_list(value, kind, key)


def record_list(value: object, kind: type[R], where: str) -> tuple[R, ...]:
    if not isinstance(value, list):
        raise RecordError(f"{_where(where)} is {_kind(value)}, not a list")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(kind.from_json(item))
        except RecordError as exc:
            raise RecordError(f"{where}[{i}]: {exc}") from None
    return tuple(out)


def _where(key: str) -> str:
    return f"field '{key}'" if key else "it"


class Record(msgspec.Struct, frozen=True):
    """What every record has: ``to_json`` and a validating ``from_json``; ``WHAT`` names
    the kind of record in messages, ``FILE`` the file it lives in (when it has one name).

    A record is a frozen ``msgspec.Struct``: its fields are declared as a dataclass's would
    be (a subclass adds them; keyword construction; :meth:`replace` makes a changed copy),
    and equality, hash and repr come from msgspec. A Struct class is made in C (about 50 us,
    against 0.75 ms for a frozen dataclass, whose methods are generated and compiled as it
    is made): every short command pays for its records at import (``instance create``,
    timed by bench/provision.py, loads about fifteen). ``WHAT``/``FILE`` are plain class
    attributes (msgspec would take an annotated one for a field)."""

    WHAT = ""
    FILE = ""

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (what ``dataclasses.replace`` is to a
        dataclass)."""
        return msgspec.structs.replace(self, **changes)

    def to_json(self) -> Any:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: object) -> Self:
        raise NotImplementedError


def compact(record: Record) -> str:
    """One line of JSON (keys sorted, newline-terminated): how records go into a U image."""
    return json.dumps(record.to_json(), sort_keys=True) + "\n"


# -- the store and its bases ---------------------------------------------------------------
class StoreMeta(Record, frozen=True):
    WHAT = "store record"
    FILE = "store.json"

    format: int
    created: str = ""  # only ``format`` is read before the format is known to be ours

    def to_json(self) -> JsonObject:
        return {"format": self.format, "created": self.created}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(format=f.integer("format"), created=f.text("created", ""))


class BaseMeta(Record, frozen=True):
    WHAT = "base record"
    FILE = "base.json"

    name: str
    created: str

    def to_json(self) -> JsonObject:
        return {"name": self.name, "created": self.created}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(name=f.text("name"), created=f.text("created"))


class GenerationMeta(Record, frozen=True):
    """What ``generation.json`` says of a generation (its directory says the rest)."""

    WHAT = "generation record"
    FILE = "generation.json"

    number: int
    created: str
    size: int
    hg_node: str
    kernel: str | None  # the kernel's version, when the generation has one
    files: int
    source: str = ""
    # a delta generation (issue 13) stores only its changes from generation ``parent`` (an
    # overlayfs upper layer, ``layer.img``); a full one (every generation made before) its
    # whole tree (``base.img``). ``layer``: the diff_id of the generation's layer, once known.
    kind: str = "full"  # full | delta
    parent: int | None = None  # the generation a delta lies over
    layer: str | None = None  # sha256:HEX

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "number": self.number,
            "created": self.created,
            "size": self.size,
            "hg_node": self.hg_node,
            "kernel": self.kernel,
            "files": self.files,
            "source": self.source,
        }
        if self.kind != "full" or self.parent is not None or self.layer is not None:
            out.update(kind=self.kind, parent=self.parent, layer=self.layer)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        kind = f.text("kind", "full")
        if kind not in ("full", "delta"):
            raise RecordError(f"field 'kind' is {kind!r}, not 'full' or 'delta'")
        parent = f.maybe_integer("parent", None)
        if kind == "delta" and parent is None:
            raise RecordError("field 'parent' is missing: a delta generation names its parent")
        return cls(
            number=f.integer("number"),
            created=f.text("created"),
            size=f.integer("size"),
            hg_node=f.text("hg_node"),
            kernel=f.maybe_text("kernel", None),
            files=f.integer("files"),
            source=f.text("source", ""),
            kind=kind,
            parent=parent,
            layer=f.maybe_text("layer", None),
        )


# -- instances -------------------------------------------------------------------------------
class Instance(Record, frozen=True):
    """An instance (VM): its base generation, MAC, hypervisor and resources."""

    WHAT = "instance record"
    FILE = "instance.json"

    name: str
    base: str
    generation: int
    mac: str
    hypervisor: str
    size: int
    memory: int
    vcpus: int
    created: str
    nic_name: str = "eth0"
    # the snapshot layers between the base generation and U, top to bottom (diff_ids
    # sha256:HEX; see unionimg.layers.layerstore); empty: U lies right on the generation
    layers: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "name": self.name,
            "base": self.base,
            "generation": self.generation,
            "mac": self.mac,
            "hypervisor": self.hypervisor,
            "size": self.size,
            "memory": self.memory,
            "vcpus": self.vcpus,
            "created": self.created,
            "nic_name": self.nic_name,
        }
        if self.layers:
            out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            name=f.text("name"),
            base=f.text("base"),
            generation=f.integer("generation"),
            mac=f.text("mac"),
            hypervisor=f.text("hypervisor"),
            size=f.integer("size"),
            memory=f.integer("memory"),
            vcpus=f.integer("vcpus"),
            created=f.text("created"),
            nic_name=f.text("nic_name", "eth0"),
            layers=f.maybe_texts("layers") or (),
        )


class MountRecord(Record, frozen=True):
    """The host-side union of an instance, present while it is mounted."""

    WHAT = "mount record"
    FILE = "mount.json"

    target: str  # the union's mount point
    readonly: bool
    driver: str  # the overlay implementation used (kernel, fuse-overlayfs)
    lower: str  # mount point of the base generation
    u: str  # mount point of the U image
    base: str
    generation: int
    mounted: str
    u_checked: bool = False  # U was checked when mounted: a clean umount may vouch for it

    def to_json(self) -> JsonObject:
        return {
            "target": self.target,
            "readonly": self.readonly,
            "driver": self.driver,
            "lower": self.lower,
            "u": self.u,
            "base": self.base,
            "generation": self.generation,
            "u_checked": self.u_checked,
            "mounted": self.mounted,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            target=f.text("target"),
            readonly=f.flag("readonly", False),
            driver=f.text("driver"),
            lower=f.text("lower"),
            u=f.text("u"),
            base=f.text("base"),
            generation=f.integer("generation"),
            mounted=f.text("mounted"),
            u_checked=f.flag("u_checked", False),
        )


class UCheckStamp(Record, frozen=True):
    """A U image the host vouched for (e2fsck, or a clean unmount after its own writes):
    the image's identity then. An image still identical needs no e2fsck before a mount."""

    WHAT = "U check stamp"
    FILE = "u-checked.json"

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    how: str  # "e2fsck", "fsck", "unmounted", ...
    when: str

    def matches(self, st: os.stat_result) -> bool:
        """Whether the image, as ``os.stat`` says it is now, is the one stamped."""
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.ino == st.st_ino
            and self.dev == st.st_dev
        )

    def to_json(self) -> JsonObject:
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "ino": self.ino,
            "dev": self.dev,
            "how": self.how,
            "when": self.when,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            size=f.integer("size"),
            mtime_ns=f.integer("mtime_ns"),
            ctime_ns=f.integer("ctime_ns"),
            ino=f.integer("ino"),
            dev=f.integer("dev"),
            how=f.text("how"),
            when=f.text("when"),
        )


# -- reconcile: conflicts, journal, undo record ------------------------------------------------
class ConflictRecord(Record, frozen=True):
    """A conflict reconcile set aside: its versions are files in ``dir`` (``files``)."""

    WHAT = "conflict"

    path: str
    reason: str
    generation: int  # the generation the reconcile went to
    dir: str
    files: tuple[str, ...]
    case: int | None = None  # the case of the reconcile table (docs/design.md)
    # policy ``fail`` held the instance on its generation: the reconcile to ``generation``
    # waits for this path (a resolve is applied by that reconcile); only written when true
    held: bool = False
    # the live file holds the ``proposal`` while pending (dpkg's status): ``resolve --take
    # local`` writes ``local`` back; only written when true
    live: bool = False

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "path": self.path,
            "reason": self.reason,
            "case": self.case,
            "generation": self.generation,
            "dir": self.dir,
            "files": list(self.files),
        }
        if self.held:
            out["held"] = True
        if self.live:
            out["live"] = True
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            path=f.text("path"),
            reason=f.text("reason"),
            generation=f.integer("generation"),
            dir=f.text("dir"),
            files=f.texts("files"),
            case=f.maybe_integer("case", None),
            held=f.flag("held", False),
            live=f.flag("live", False),
        )


class Conflicts(Record, frozen=True):
    """An instance's unresolved conflicts (a JSON list), sorted by path when written."""

    WHAT = "conflict list"
    FILE = "conflicts.json"

    items: tuple[ConflictRecord, ...] = ()

    def to_json(self) -> list[JsonObject]:
        return [c.to_json() for c in self.items]

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls(record_list(data, ConflictRecord, ""))


class ReconcileJournal(Record, frozen=True):
    """Written just before the atomic swap of an instance's upper layer, removed once the
    post-reconcile changeset is on disk: a run that finds it rolls forward or back."""

    WHAT = "reconcile journal"
    FILE = "reconcile-journal.json"

    phase: str  # "swap" ("staging" from versions that journaled before it)
    from_generation: int
    to_generation: int
    pre_node: str | None  # U's changeset before the reconcile
    started: str
    new_ino: int | None = None  # inode of upper.new: after the swap it is upper's
    commit_paths: tuple[str, ...] | None = None  # what the post-commit looks at (None: all)
    conflicts: tuple[ConflictRecord, ...] = ()  # set aside by this run
    conflicts_before: tuple[ConflictRecord, ...] = ()  # conflicts.json before it

    def to_json(self) -> JsonObject:
        return {
            "phase": self.phase,
            "from": self.from_generation,
            "to": self.to_generation,
            "pre_node": self.pre_node,
            "new_ino": self.new_ino,
            "commit_paths": None if self.commit_paths is None else list(self.commit_paths),
            "conflicts": [c.to_json() for c in self.conflicts],
            "conflicts_before": [c.to_json() for c in self.conflicts_before],
            "started": self.started,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            phase=f.text("phase"),
            from_generation=f.integer("from"),
            to_generation=f.integer("to"),
            pre_node=f.maybe_text("pre_node"),
            started=f.text("started"),
            new_ino=f.maybe_integer("new_ino", None),
            commit_paths=f.maybe_texts("commit_paths"),
            conflicts=f.records("conflicts", ConflictRecord, ()),
            conflicts_before=f.records("conflicts_before", ConflictRecord, ()),
        )


# -- layers (issue 13) -------------------------------------------------------------------------
class LayerMeta(Record, frozen=True):
    """``layers/sha256/HEX/layer.json``: one immutable layer of the image tree (see
    :mod:`unionimg.layers.layerstore`). Digests are ``sha256:HEX``; ``blob_digest`` is empty
    until the layer's blob was first made (a base generation adopted without one)."""

    WHAT = "layer record"
    FILE = "layer.json"

    diff_id: str  # sha256 of the canonical uncompressed tar
    blob_digest: str  # sha256 of the zstd blob ("" while not made yet)
    blob_size: int
    tar_size: int
    parent: str | None  # the parent layer's diff_id; None for a root (a whole tree)
    kind: str  # base | snapshot | delta
    created: str
    label: str  # the ext4 label of layer.img: L + 15 hex digits, or BASE for a whole base
    image_size: int  # bytes layer.img occupies on disk
    entries: int  # entries in its tar
    origin: str = ""  # what made it, said for people ("instance vm1", "base deb generation 2")
    base: str | None = None  # the base, when a base generation made it or lies under it
    generation: int | None = None
    instance: str | None = None  # the instance it was snapshotted from
    message: str = ""

    def to_json(self) -> JsonObject:
        return {
            "diff_id": self.diff_id,
            "blob_digest": self.blob_digest,
            "blob_size": self.blob_size,
            "tar_size": self.tar_size,
            "parent": self.parent,
            "kind": self.kind,
            "created": self.created,
            "label": self.label,
            "image_size": self.image_size,
            "entries": self.entries,
            "origin": self.origin,
            "base": self.base,
            "generation": self.generation,
            "instance": self.instance,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        kind = f.text("kind")
        if kind not in ("base", "snapshot", "delta"):
            raise RecordError(f"field 'kind' is {kind!r}, not base, snapshot or delta")
        return cls(
            diff_id=f.text("diff_id"),
            blob_digest=f.text("blob_digest"),
            blob_size=f.integer("blob_size"),
            tar_size=f.integer("tar_size"),
            parent=f.maybe_text("parent"),
            kind=kind,
            created=f.text("created"),
            label=f.text("label"),
            image_size=f.integer("image_size"),
            entries=f.integer("entries"),
            origin=f.text("origin", ""),
            base=f.maybe_text("base", None),
            generation=f.maybe_integer("generation", None),
            instance=f.maybe_text("instance", None),
            message=f.text("message", ""),
        )


# -- written into U (guest data once written) ------------------------------------------------
class BaseRef(Record, frozen=True):
    """U's ``.unionimg/base.json``, committed with every changeset: which instance, on which
    base generation."""

    WHAT = "base reference"
    FILE = "base.json"

    instance: str
    base: str
    generation: int

    def to_json(self) -> JsonObject:
        return {"instance": self.instance, "base": self.base, "generation": self.generation}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            instance=f.text("instance"), base=f.text("base"), generation=f.integer("generation")
        )


class Resolution(Record, frozen=True):
    """One line of U's ``.unionimg/resolutions.jsonl``: how a conflict was resolved."""

    WHAT = "resolution"
    FILE = "resolutions.jsonl"

    path: str
    took: str  # local | base | merged | "file F"
    generation: int
    resolved: str

    def to_json(self) -> JsonObject:
        return {
            "path": self.path,
            "took": self.took,
            "generation": self.generation,
            "resolved": self.resolved,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            path=f.text("path"),
            took=f.text("took"),
            generation=f.integer("generation"),
            resolved=f.text("resolved"),
        )


# -- host probe caches -----------------------------------------------------------------------
class ProbeCache(Record, frozen=True):
    """A probe's answers by the digest of what decides them (see :mod:`.probecache`)."""

    WHAT = "probe cache"

    version: int
    entries: Mapping[str, object] = msgspec.field(default_factory=dict)

    def to_json(self) -> JsonObject:
        return {"version": self.version, "entries": dict(self.entries)}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(version=f.integer("version"), entries=f.mapping("entries"))


def sorted_conflicts(items: Sequence[ConflictRecord]) -> Conflicts:
    """``items`` by path, one per path (a later one replaces an earlier)."""
    by_path = {c.path: c for c in items}
    return Conflicts(tuple(by_path[p] for p in sorted(by_path)))
