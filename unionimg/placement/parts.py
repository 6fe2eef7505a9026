"""Split layers made real: a plan that gives a host part k of n of a layer (the seed's b0/0)
has it keep only that byte range of the layer's blob, in ``STORE/placement/parts/HEX/S-E``
(bytes S to E, exclusive, of blob ``sha256:HEX``; written to a temporary name, fsynced,
renamed). Part k of n of a blob of B bytes is bytes ``k*B//n`` to ``(k+1)*B//n``.

The controller computes each part's sha256 from the whole blob it has and records them
(``STORE/placement/parts.json``, beside the placement record); a host checks a part as it
arrives (:func:`keep_here`), and before it uses one (:func:`assemble_here`): ``recover``
fetches the ranges the host lacks from the registry (HTTP Range), concatenates all of them in
order, checks the whole blob's digest and leaves it as a verified download
(``STORE/downloads/HEX.blob``) that the ``pull`` which follows imports as it imports any
pulled blob. A held part whose bytes do not match the record is refused in one line.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionimg.errors import ToolFailed, UsageError
from unionimg.layers import layerstore
from unionimg.registry import hostcache
from unionimg.registry.client import Registry
from unionimg.registry.manifests import LAYER_REPO
from unionimg.store.layout import Store, fsync_dir, read_json, write_json

PARTS_DIR = ("placement", "parts")
RECORD = "parts.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobPart:
    """Bytes ``start`` to ``end`` (exclusive) of blob ``blob`` (of layer ``diff_id``), part
    ``index`` of ``count``, whose sha256 is ``sha256``."""

    diff_id: str
    blob: str
    blob_size: int
    index: int
    count: int
    start: int
    end: int
    sha256: str

    @property
    def size(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "diff_id": self.diff_id,
            "blob": self.blob,
            "blob_size": self.blob_size,
            "index": self.index,
            "count": self.count,
            "start": self.start,
            "end": self.end,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], what: str) -> BlobPart:
        try:
            part = cls(
                str(d["diff_id"]),
                str(d["blob"]),
                int(d["blob_size"]),
                int(d["index"]),
                int(d["count"]),
                int(d["start"]),
                int(d["end"]),
                str(d["sha256"]),
            )
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{what}: a blob part is damaged ({str(d)[:80]})") from None
        hexes = [part.blob.removeprefix("sha256:"), part.sha256.removeprefix("sha256:")]
        if not all(len(h) == 64 and all(ch in "0123456789abcdef" for ch in h) for h in hexes):
            raise UsageError(f"{what}: a blob part names no sha256 digest")
        if not 0 <= part.start < part.end <= part.blob_size or not 0 <= part.index < part.count:
            raise UsageError(f"{what}: blob part {part.start}-{part.end} is out of its blob")
        return part


def ranges(size: int, count: int) -> list[tuple[int, int]]:
    """Part k of ``count`` of ``size`` bytes: bytes k*size//count to (k+1)*size//count."""
    return [(k * size // count, (k + 1) * size // count) for k in range(count)]


def blob_parts(store: Store, diff_id: str, count: int) -> list[BlobPart]:
    """Layer ``diff_id``'s blob in ``count`` parts, each's sha256 computed from the blob."""
    layer = layerstore.get(store, diff_id)
    path = layerstore.blob_path(store, layer)
    meta = layerstore.get(store, diff_id).meta
    out: list[BlobPart] = []
    with path.open("rb") as fh:
        for k, (start, end) in enumerate(ranges(meta.blob_size, count)):
            fh.seek(start)
            h, left = hashlib.sha256(), end - start
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise ToolFailed(f"layer {layer.short}'s blob is shorter than recorded")
                h.update(chunk)
                left -= len(chunk)
            out.append(
                BlobPart(
                    diff_id,
                    meta.blob_digest,
                    meta.blob_size,
                    k,
                    count,
                    start,
                    end,
                    "sha256:" + h.hexdigest(),
                )
            )
    return out


# -- the record -----------------------------------------------------------------------------
def record_path(store: Store) -> Path:
    return store.root / "placement" / RECORD


def write(store: Store, layers: Mapping[str, Sequence[BlobPart]], hosts: Mapping[str, Any]) -> None:
    """The split layers' parts (by diff_id) and which parts each host keeps (indexes)."""
    record_path(store).parent.mkdir(mode=0o700, exist_ok=True)
    write_json(
        record_path(store),
        {
            "layers": {d: [p.to_json() for p in ps] for d, ps in layers.items()},
            "hosts": {h: {d: list(ix) for d, ix in v.items()} for h, v in hosts.items()},
        },
    )


def read(store: Store) -> tuple[dict[str, list[BlobPart]], dict[str, dict[str, list[int]]]]:
    """The record :func:`write` made (empty when no placement split a layer)."""
    path = record_path(store)
    if not path.exists():
        return {}, {}
    doc = read_json(path)
    what = str(path)
    if not isinstance(doc, dict):
        raise UsageError(f"{what}: damaged; apply the placement again")
    layers = {str(d): [BlobPart.from_json(p, what) for p in ps] for d, ps in doc["layers"].items()}
    hosts = {
        str(h): {str(d): [int(i) for i in ix] for d, ix in v.items()}
        for h, v in doc["hosts"].items()
    }
    return layers, hosts


# -- the host's side ------------------------------------------------------------------------
def part_path(store: Store, part: BlobPart) -> Path:
    return store.root.joinpath(
        *PARTS_DIR, part.blob.removeprefix("sha256:"), f"{part.start}-{part.end}"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _fetch(store: Store, reg: Registry, part: BlobPart, dest: Path) -> int:
    """Part ``part`` from the registry into ``dest`` (a temporary name beside it, checked,
    renamed); the bytes fetched."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        got = reg.fetch_range(LAYER_REPO, part.blob, part.start, part.end, tmp)
        if got != part.sha256:
            raise ToolFailed(
                f"bytes {part.start}-{part.end} of blob {part.blob} from the registry have "
                f"digest {got}, the placement recorded {part.sha256}: refused"
            )
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return part.size


def keep_here(store: Store, wanted: Sequence[BlobPart], url: str | None) -> dict[str, Any]:
    """On a host: every part of ``wanted`` kept in the parts area (a part there already and
    matching its digest stays; a missing or damaged one is fetched from registry ``url``)."""
    todo = [p for p in wanted if not _matches(part_path(store, p), p.sha256)]
    fetched = 0
    if todo:
        if url is None:
            raise UsageError("keeping blob parts: give --registry")
        with Registry(url) as reg:
            for part in todo:
                fetched += _fetch(store, reg, part, part_path(store, part))
    return {"parts": len(wanted), "bytes_fetched": fetched}


def _matches(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path) == sha256


def prune_here(store: Store, wanted: Sequence[BlobPart]) -> dict[str, Any]:
    """On a host: the parts in the parts area that ``wanted`` does not list removed."""
    keep = {part_path(store, p) for p in wanted}
    top = store.root.joinpath(*PARTS_DIR)
    removed, freed = [], 0
    if top.is_dir():
        for folder in sorted(top.iterdir()):
            for f in sorted(folder.iterdir()):
                if f not in keep:
                    freed += f.stat().st_size
                    f.unlink()
                    removed.append(f"{folder.name[:12]}/{f.name}")
            if not any(folder.iterdir()):
                folder.rmdir()
    return {"parts_removed": removed, "part_bytes_freed": freed}


def held_here(store: Store) -> int:
    """Bytes in this host's parts area."""
    top = store.root.joinpath(*PARTS_DIR)
    return sum(f.stat().st_size for f in top.rglob("*") if f.is_file()) if top.is_dir() else 0


def assemble_here(store: Store, parts: Sequence[BlobPart], url: str) -> dict[str, Any]:
    """On the recovering host: the whole blob of a split layer from its ``parts`` (all of
    them, in order): those held here checked against their recorded digest (a mismatch is
    refused, nothing made), the rest fetched from registry ``url`` by range; concatenated,
    the whole blob's digest checked, then left as a verified download for the ``pull`` that
    imports it. Returns the bytes fetched."""
    ordered = sorted(parts, key=lambda p: p.index)
    if not ordered or [p.index for p in ordered] != list(range(ordered[0].count)):
        raise UsageError("assembling a blob: give all of its parts")
    blob = ordered[0].blob
    if (
        ordered[0].start != 0
        or ordered[-1].end != ordered[0].blob_size
        or any(a.end != b.start for a, b in itertools.pairwise(ordered))
    ):
        raise UsageError(f"assembling blob {blob}: its parts do not cover it in order")
    held = {p.index: part_path(store, p) for p in ordered if part_path(store, p).is_file()}
    for p in ordered:
        if p.index in held and _sha256(held[p.index]) != p.sha256:
            raise ToolFailed(
                f"part {p.index + 1} of {p.count} of blob {blob} on this host (bytes {p.start}-"
                f"{p.end}) has digest {_sha256(held[p.index])}, the placement recorded "
                f"{p.sha256}: damaged or tampered, refused (nothing imported)"
            )
    folder = hostcache.download_dir(store)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = folder / (blob.removeprefix("sha256:") + ".blob")
    tmp = folder / f".{dest.name}.assembling"
    fetched = 0
    try:
        with Registry(url) as reg, tmp.open("wb") as out:
            h = hashlib.sha256()
            for p in ordered:
                src = held.get(p.index)
                if src is None:
                    src = folder / f".{dest.name}.{p.start}-{p.end}.range"
                    try:
                        fetched += _fetch(store, reg, p, src)
                        _append(src, out, h)
                    finally:
                        src.unlink(missing_ok=True)
                else:
                    _append(src, out, h)
            out.flush()
            os.fsync(out.fileno())
        if "sha256:" + h.hexdigest() != blob:
            raise ToolFailed(
                f"blob {blob} made from its parts has digest sha256:{h.hexdigest()}: refused, "
                "nothing imported"
            )
        os.replace(tmp, dest)
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return {"blob": blob, "parts_held": len(held), "bytes_fetched": fetched}


def _append(src: Path, out: Any, h: Any) -> None:
    with src.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            out.write(chunk)
            h.update(chunk)
