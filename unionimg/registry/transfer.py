"""Pushing image-tree nodes to a registry and pulling them into a host's layer cache.

:func:`push_layers` pushes a chain of layers (bottom to top), each as its blob plus an
image-tree node manifest tagged ``layer-<diff_id hex>``: a blob the repository holds is not
sent again (HEAD first), a blob another repository of the registry holds is mounted
(``?mount=&from=``: no bytes), only the rest is uploaded in chunks.

:func:`pull_node` brings one node into a host: the node's manifest says the chain's diff_ids;
the layers the host holds (``have``) cost nothing; for the missing ones it walks the parent
annotations up to the nodes it needs (each node's ``layers`` must be its parent's plus one,
and a parent the registry lacks is one line, nothing fetched), fetches every missing blob
first (resumable ``.partial`` files in ``download_dir``, each blob's sha256 checked on
arrival), and only when all arrived imports them bottom to top through ``import_blob`` (the
layer store checks the uncompressed diff_id). A failure leaves nothing imported; verified
blobs stay in ``download_dir`` for the next attempt.

Both take plain values (:class:`LocalLayer`, callables), so they run against any layer store;
:mod:`unionimg.registry.layerstore_glue` binds them to unionimg's own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unionimg.errors import NotFound, ToolFailed
from unionimg.registry.client import Registry
from unionimg.registry.manifests import (
    ARTIFACT_LAYER,
    MEDIA_LAYER_META,
    Descriptor,
    Manifest,
    check_repo,
    layer_blob,
    layer_manifest,
    layer_tag,
    parse_manifest,
)

MAX_MOUNT_CANDIDATES = 32
"""Repositories asked for a blob before it is uploaded (HEAD, ~1 ms each)."""
MAX_META = 1 << 20


@dataclass(frozen=True)
class LocalLayer:
    """One layer as the pusher sees it: its blob file and its layer.json bytes."""

    diff_id: str
    blob: Path
    blob_digest: str
    blob_size: int
    meta: bytes
    title: str
    created: str

    def descriptor(self) -> Descriptor:
        return layer_blob(self.blob_digest, self.blob_size, self.diff_id)


@dataclass
class PushReport:
    registry: str
    repo: str
    nodes: list[dict[str, str]] = field(default_factory=list)  # diff_id, tag, manifest digest
    blobs: dict[str, str] = field(default_factory=dict)  # blob digest -> present|mounted|uploaded
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def top(self) -> str:
        return self.nodes[-1]["manifest"]

    def to_json(self) -> dict[str, object]:
        return {
            "registry": self.registry,
            "repo": self.repo,
            "nodes": self.nodes,
            "blobs": self.blobs,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 3),
        }


def _mount_sources(reg: Registry, repo: str) -> list[str]:
    try:
        names = reg.catalog()
    except ToolFailed:
        return []
    return [n for n in names if n != repo][:MAX_MOUNT_CANDIDATES]


def push_blob(
    reg: Registry,
    repo: str,
    path: Path,
    digest: str,
    candidates: Callable[[], Sequence[str]] | None = None,
) -> str:
    """One blob into ``repo``: present, mounted from the first other repository of the
    registry that holds it (``candidates()``, default: the catalog), or uploaded."""
    if reg.blob_size(repo, digest) is not None:
        reg.counters.blobs_present += 1
        return "present"
    sources = _mount_sources(reg, repo) if candidates is None else list(candidates())
    holder = next((s for s in sources if s != repo and reg.blob_size(s, digest) is not None), None)
    return reg.push_blob(repo, path, digest, mount_from=(holder,) if holder else ())


def push_layers(
    reg: Registry, repo: str, chain: Sequence[LocalLayer], *, push_blobs: bool = True
) -> PushReport:
    """Push ``chain`` (bottom to top: a root layer first, each next one's parent before it)
    as image-tree nodes into ``repo``; returns what was sent. Every node of the chain gets
    its manifest and tag, so any of them can be pulled; nodes already there cost a HEAD."""
    check_repo(repo)
    start = time.monotonic()
    before = reg.counters.bytes_up
    report = PushReport(reg.url, repo)
    found: list[list[str]] = []

    def sources() -> list[str]:  # the catalog, asked once per push and only when needed
        if not found:
            found.append(_mount_sources(reg, repo))
        return found[0]

    parent: str | None = None
    descriptors: list[Descriptor] = []
    for layer in chain:
        desc = layer.descriptor()
        if push_blobs and layer.blob_digest not in report.blobs:
            outcome = push_blob(reg, repo, layer.blob, layer.blob_digest, sources)
            report.blobs[layer.blob_digest] = outcome
        descriptors.append(desc)
        reg.push_bytes(repo, layer.meta)
        manifest = layer_manifest(
            layer.meta, descriptors, title=layer.title, parent=parent, created=layer.created
        )
        tag = layer_tag(layer.diff_id)
        parent = reg.put_manifest(repo, tag, manifest)
        report.nodes.append({"diff_id": layer.diff_id, "tag": tag, "manifest": parent})
    report.bytes_sent = reg.counters.bytes_up - before
    report.seconds = time.monotonic() - start
    return report


@dataclass
class PullReport:
    registry: str
    repo: str
    ref: str
    manifest: str = ""
    layers: list[str] = field(default_factory=list)  # the chain's diff_ids, bottom to top
    cache_hits: int = 0
    imported: list[str] = field(default_factory=list)
    bytes_pulled: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "registry": self.registry,
            "repo": self.repo,
            "ref": self.ref,
            "manifest": self.manifest,
            "layers": self.layers,
            "cache_hits": self.cache_hits,
            "imported": self.imported,
            "bytes_pulled": self.bytes_pulled,
            "bytes_resumed": self.bytes_resumed,
            "seconds": round(self.seconds, 3),
        }


ImportBlob = Callable[[Path, bytes, str, "str | None", str], None]
"""``import_blob(verified blob file, layer.json bytes, diff_id, parent diff_id, blob
digest)``: put one layer into the host's store (its parent is already there, and is the
layer below it in the node's chain, whatever the layer.json says); the file may be consumed."""


def fetch_node(reg: Registry, repo: str, ref: str) -> Manifest:
    data, digest = reg.get_manifest(repo, ref)
    return parse_manifest(data, where=f"{repo}@{digest}", expect=ARTIFACT_LAYER)


def pull_node(
    reg: Registry,
    repo: str,
    ref: str,
    *,
    have: Callable[[str], bool],
    import_blob: ImportBlob,
    download_dir: Path,
    on_bytes: Callable[[int], None] | None = None,
    check_space: Callable[[int, Sequence[bytes]], None] | None = None,
) -> PullReport:
    """Bring image-tree node ``ref`` (a tag or manifest digest of ``repo``) and its chain into
    a host: ``have(diff_id)`` says what the host holds; missing blobs are fetched (checked),
    then imported bottom to top. Raises before importing anything if any blob or parent node
    is missing or damaged. ``check_space(bytes of the missing blobs, their layer.json)``
    runs before the first blob is fetched (raise StoreFull there: nothing fetched)."""
    check_repo(repo)
    start = time.monotonic()
    before, resumed_before = reg.counters.bytes_down, reg.counters.bytes_resumed
    report = PullReport(reg.url, repo, ref)
    top = fetch_node(reg, repo, ref)
    report.manifest = top.digest
    chain = top.diff_ids()
    report.layers = list(chain)
    missing = [i for i, d in enumerate(chain) if not have(d)]
    report.cache_hits = len(chain) - len(missing)
    if not missing:
        report.seconds = time.monotonic() - start
        return report
    # the layer.json of every missing layer: the config of its node, found by walking up
    metas: dict[int, bytes] = {}
    node, index = top, len(chain) - 1
    lowest = missing[0]
    while True:
        if index in missing:
            meta = reg.get_small_blob(repo, node.config.digest, MAX_META)
            _check_meta(meta, chain[index], repo, node.digest)
            metas[index] = meta
        if index == lowest:
            break
        if node.parent is None:
            raise ToolFailed(
                f"node {repo}@{node.digest} has {index + 1} layers but no parent node; "
                "refused (push its chain again)"
            )
        try:
            parent = fetch_node(reg, repo, node.parent)
        except NotFound:
            raise NotFound(
                f"node {repo}@{node.digest} names parent node {node.parent}, which registry "
                f"{reg.url} lacks; nothing was pulled (push the parent layer first)"
            ) from None
        if parent.layers != node.layers[:-1]:
            raise ToolFailed(
                f"node {repo}@{node.digest} does not extend its parent {node.parent} by one "
                "layer; refused, nothing was pulled"
            )
        node, index = parent, index - 1
    if check_space is not None:
        check_space(sum(top.layers[i].size for i in missing), [metas[i] for i in missing])
    # every missing blob first (checked on arrival), then the imports
    download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    files: dict[int, Path] = {}
    for i in missing:
        desc = top.layers[i]
        dest = download_dir / (desc.digest.removeprefix("sha256:") + ".blob")
        if not dest.exists():
            reg.fetch_blob(repo, desc.digest, desc.size, dest, on_bytes=on_bytes)
        files[i] = dest
    for i in missing:
        if have(chain[i]):  # another pull brought it meanwhile
            report.cache_hits += 1
        else:
            import_blob(
                files[i], metas[i], chain[i], chain[i - 1] if i else None, top.layers[i].digest
            )
            report.imported.append(chain[i])
        files[i].unlink(missing_ok=True)
    report.bytes_pulled = reg.counters.bytes_down - before
    report.bytes_resumed = reg.counters.bytes_resumed - resumed_before
    report.seconds = time.monotonic() - start
    return report


def _check_meta(meta: bytes, diff_id: str, repo: str, node: str) -> None:
    """The node's layer.json names the layer the node's top descriptor says."""
    try:
        obj = json.loads(meta)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("diff_id") != diff_id:
        raise ToolFailed(
            f"node {repo}@{node}: its config ({MEDIA_LAYER_META}) does not name layer "
            f"{diff_id}; refused, nothing was pulled"
        )
