"""``unionimg migrate gc``: bound the migration object cache (issue 14).

The object cache (``STORE/migrate/objects``, :mod:`.index`) grows with every content that
arrives in a migration and with every VM that leaves this store (kept for its way back).
The gc, under the cache's lock (:data:`.index.CACHE_LOCK`: a receive holds it throughout,
a sender while it keeps a leaving VM's contents; a gc that finds it held is refused in one
line, exit 4), removes in this order:

1. **temporary files** of writers that are gone (``.SHA.PID.tmp``,
   :func:`.index.dead_temporaries`);
2. **stale offers** (``migrate/offers/*.json`` over a day old: what a receive sweeps too)
   and **stale hash indexes**: ``migrate/vms/NAME.json`` of a VM no longer here,
   ``migrate/layers/HEX.json`` of a layer no longer in the layer cache; **partial
   arrivals** (``migrate/partial/SHA``, what a broken transfer left of a large content,
   :mod:`.cdc`) over a day old or whose content is in the cache whole; the **left
   manifests** (``migrate/left/NAME.json``, the large files of a VM that left) of a VM
   that is here again;
3. **redundant objects**: contents this store holds elsewhere too — in a base generation's
   manifest, a snapshot layer, or the upper layer of a stopped VM (looked up as a migration
   looks them up, :func:`.index.locate`; a running or mounted VM, and a VM with a pending
   migration record, which is leaving, do not count). A VM that later drops such a file
   only makes its way back send that content again: the cache is a cache;
4. with ``max_size``, while the cache's objects together hold more bytes than that, the
   **least recently used** objects: oldest mtime first (an object's mtime is when it was
   written or last found by an offer, a receive or a leaving VM: :func:`.index.touch`).

Never removed, whatever the bound: a content named by a kept offer (``migrate/offers/``: a
transfer under way or broken, whose rerun finds what arrived) and a content of the upper
layer of a VM that has a pending migration record here (:mod:`.pending`: the VM is leaving,
its way back will want them). A bound those alone exceed is reported (``still_over``), not
forced. ``dry_run`` removes nothing and reports the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unionimg.errors import UnionimgError
from unionimg.layers import instance as inst_mod
from unionimg.layers import layerstore
from unionimg.migrate import index, pending, plan
from unionimg.store.layout import Store, fsync_dir, read_record
from unionimg.store.migrate_records import MigrateOffer

OFFER_KEPT = 86400.0  # as long as a receive keeps an offer no stream followed
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Removed:
    """One file the gc removed (or, dry, would): what it is, its name, its bytes, why."""

    kind: str  # object, tmp, offer, vm-index, layer-index, left, partial
    name: str
    bytes: int
    why: str  # redundant (and where), lru, dead writer, stale

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "bytes": self.bytes, "why": self.why}


@dataclass
class Report:
    dry_run: bool
    max_size: int | None
    objects_before: int = 0
    bytes_before: int = 0
    objects_after: int = 0
    bytes_after: int = 0
    protected: int = 0  # objects a kept offer or a pending migration needs
    removed: list[Removed] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.removed)

    @property
    def still_over(self) -> bool:
        return self.max_size is not None and self.bytes_after > self.max_size

    def to_json(self) -> dict[str, Any]:
        by: dict[str, dict[str, int]] = {}
        for r in self.removed:
            key = r.why.split(":", 1)[0] if r.kind == "object" else r.kind
            row = by.setdefault(key, {"files": 0, "bytes": 0})
            row["files"] += 1
            row["bytes"] += r.bytes
        return {
            "dry_run": self.dry_run,
            "max_size": self.max_size,
            "objects_before": self.objects_before,
            "bytes_before": self.bytes_before,
            "objects_after": self.objects_after,
            "bytes_after": self.bytes_after,
            "protected": self.protected,
            "bytes_freed": self.bytes_freed,
            "still_over": self.still_over,
            "by_reason": by,
            "removed": [r.to_json() for r in self.removed],
        }


def _objects(store: Store) -> dict[str, os.stat_result]:
    """sha256 → stat of every object of the cache (temporary and foreign names left out)."""
    out: dict[str, os.stat_result] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(index.objects_dir(store)) as it:
        for ent in it:
            if _SHA_RE.fullmatch(ent.name) and ent.is_file(follow_symlinks=False):
                out[ent.name] = ent.stat(follow_symlinks=False)
    return out


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _kept_offers(store: Store, now: float) -> tuple[set[str], list[Path]]:
    """(contents the kept offers name, offers over a day old). An offer that cannot be read
    protects nothing and is left for the receive's own sweep."""
    needed: set[str] = set()
    stale: list[Path] = []
    d = index.migrate_dir(store) / "offers"
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            if now - path.stat().st_mtime > OFFER_KEPT:
                stale.append(path)
                continue
            offer = read_record(path, MigrateOffer)
        except (OSError, UnionimgError):
            continue
        needed |= set(plan.file_contents(offer.entries))
        for lt in offer.layer_trees:
            needed |= set(plan.file_contents(lt.entries))
        needed |= set(offer.bases)
    return needed, stale


def _leaving(store: Store) -> dict[str, set[str]]:
    """VM name → its upper layer's contents, for each VM here with a pending migration
    record (hashed as a migration would, :func:`.index.vm_contents`)."""
    out: dict[str, set[str]] = {}
    for inst in inst_mod.list_instances(store):
        if pending.read(store, inst.name) is not None:
            out[inst.name] = index.vm_contents(store, inst.name)
    return out


def _stale_indexes(store: Store) -> list[tuple[str, Path]]:
    """The hash indexes of VMs and layers this store no longer holds."""
    out: list[tuple[str, Path]] = []
    vms = index.migrate_dir(store) / "vms"
    if vms.is_dir():
        names = {i.name for i in inst_mod.list_instances(store)}
        out += [("vm-index", p) for p in sorted(vms.glob("*.json")) if p.stem not in names]
    layers = index.migrate_dir(store) / "layers"
    if layers.is_dir():
        hexes = {la.hex for la in layerstore.list_layers(store)}
        out += [("layer-index", p) for p in sorted(layers.glob("*.json")) if p.stem not in hexes]
    left = index.migrate_dir(store) / "left"
    if left.is_dir():
        here = {i.name for i in inst_mod.list_instances(store)}
        out += [("left", p) for p in sorted(left.glob("*.json")) if p.stem in here]
    return out


def _stale_partials(store: Store, now: float) -> list[Path]:
    """Partial arrivals over a day old, or whose content arrived whole since."""
    d = index.migrate_dir(store) / "partial"
    out = []
    for path in sorted(d.iterdir()) if d.is_dir() else []:
        try:
            old = now - path.stat().st_mtime > OFFER_KEPT
        except OSError:
            continue
        if old or not _SHA_RE.fullmatch(path.name) or index.has_object(store, path.name):
            out.append(path)
    return out


def gc(store: Store, *, max_size: int | None = None, dry_run: bool = False) -> Report:
    """Remove what the module docstring says, under the cache's lock; what was removed."""
    with store.lock(index.CACHE_LOCK, wait=False, purpose="migrate gc"):
        return _gc(store, max_size, dry_run)


def _gc(store: Store, max_size: int | None, dry_run: bool) -> Report:
    rep = Report(dry_run=dry_run, max_size=max_size)
    objs = _objects(store)
    rep.objects_before = len(objs)
    rep.bytes_before = sum(st.st_size for st in objs.values())
    gone: list[Path] = []

    def drop(kind: str, path: Path, size: int, why: str) -> None:
        rep.removed.append(Removed(kind, path.name, size, why))
        gone.append(path)

    for path in index.dead_temporaries(store):
        drop("tmp", path, _size(path), "its writer is gone")
    needed, stale_offers = _kept_offers(store, time.time())
    for path in stale_offers:
        drop("offer", path, _size(path), "over a day old, no stream followed")
    for kind, path in _stale_indexes(store):
        why = "its VM is here again" if kind == "left" else "its VM or layer is gone"
        drop(kind, path, _size(path), why)
    for path in _stale_partials(store, time.time()):
        drop("partial", path, _size(path), "over a day old, or the content arrived whole")
    leaving = _leaving(store)
    for hashes in leaving.values():
        needed |= hashes
    # a running or mounted VM's upper layer is its own (its guest may delete the file)
    busy = {
        i.name for i in inst_mod.list_instances(store) if inst_mod.state(store, i.name) != "stopped"
    }
    protected = needed & objs.keys()
    rep.protected = len(protected)

    left = dict(objs)
    candidates = set(objs) - protected
    places = index.locate(
        store, candidates, with_cache=False, skip_vms=frozenset(leaving.keys() | busy)
    )
    for sha in sorted(places):
        drop("object", index.object_path(store, sha), objs[sha].st_size, _held(places[sha]))
        del left[sha]
    total = sum(st.st_size for st in left.values())
    if max_size is not None and total > max_size:
        order = sorted((st.st_mtime_ns, sha) for sha, st in left.items() if sha not in protected)
        for _mtime, sha in order:
            if total <= max_size:
                break
            drop("object", index.object_path(store, sha), left[sha].st_size, "lru")
            total -= left.pop(sha).st_size
    rep.objects_after = len(left)
    rep.bytes_after = total
    if not dry_run:
        for path in gone:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for d in {p.parent for p in gone}:
            with contextlib.suppress(OSError):
                fsync_dir(d)
    return rep


def _held(place: index.Place) -> str:
    """Why an object is redundant: where else this store holds its content."""
    if place.kind == "base":
        return f"redundant: in base {place.ref}"
    if place.kind == "vm":
        return f"redundant: in vm {place.ref}"
    return f"redundant: in layer {layerstore.label_of(place.ref)}"
