"""Pushing image-tree nodes to a registry and pulling them into a host's layer cache.

:func:`push_layers` pushes a chain of layers (bottom to top), each as its blob plus an
image-tree node manifest tagged ``layer-<diff_id hex>``: a blob the repository holds is not
sent again (HEAD first), a blob another repository of the registry holds is mounted
(``?mount=&from=``: no bytes), only the rest is uploaded in chunks.

:func:`pull_nodes` brings nodes into a host (:func:`pull_node`: one), in three steps. Plan
(:func:`plan_pull`): each node's manifest says its chain's diff_ids; the layers the host holds
(``have``) cost nothing; for the missing ones it walks the parent annotations up to the nodes
it needs (each node's ``layers`` must be its parent's plus one, and a parent the registry
lacks is one line, nothing fetched). Fetch: every missing blob of every node, each distinct
blob once, into resumable ``.partial`` files in ``download_dir``, each blob's sha256 checked
on arrival. Import, meanwhile (:func:`_fetch_while_staging`): the layers are built
:data:`IMPORT_WORKERS` at a time through ``stage_blob`` from each blob's bytes as they arrive
(:mod:`unionimg.fs.follow`) and put in place bottom to top only once every blob arrived
checked (the layer store checks the blob digest again and the uncompressed diff_id). An
import that fails has the ones before it undone. So a failure leaves the host's layers as
they were; verified blobs stay in ``download_dir`` for the next attempt. The report splits
the seconds: fetching (the network, until the last blob arrived) and importing (the host's
work beyond that).

Both take plain values (:class:`LocalLayer`, callables), so they run against any layer store;
:mod:`unionimg.registry.hostcache` binds them to unionimg's own.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from unionimg.errors import NotFound, ToolFailed, UnionimgError
from unionimg.fs.follow import Growing, Restarted
from unionimg.registry.client import Registry
from unionimg.registry.manifests import (
    ARTIFACT_LAYER,
    MEDIA_LAYER_META,
    Descriptor,
    Manifest,
    check_repo,
    is_digest,
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
    ref: str  # the node pulled (several: separated by spaces)
    manifest: str = ""  # its manifest digest (empty when several nodes were pulled at once)
    layers: list[str] = field(default_factory=list)  # the chains' diff_ids, bottom to top
    cache_hits: int = 0  # layers of ``layers`` the store held (or got meanwhile)
    imported: list[str] = field(default_factory=list)
    bytes_pulled: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0
    fetch_seconds: float = 0.0  # the network: manifests, configs, blobs (checked on arrival)
    import_seconds: float = 0.0  # the host: each verified blob extracted into its layer
    rebuilt: int = 0  # layers built again from the complete file (it started over under them)

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
            "fetch_seconds": round(self.fetch_seconds, 3),
            "import_seconds": round(self.import_seconds, 3),
            "rebuilt": self.rebuilt,
        }


class Staged(Protocol):
    """A layer built from a verified blob but not yet in the host's store."""

    def publish(self) -> object:
        """Put it into the store (its parent is there by then)."""

    def discard(self) -> None:
        """Remove it (a no-op once published)."""


class StageBlob(Protocol):
    """``stage_blob(blob file, layer.json bytes, diff_id, parent diff_id, blob digest)``:
    build the layer without putting it into the store (its parent may not be there yet, and
    is the layer below it in the node's chain, whatever the layer.json says); called from
    several threads at once. ``follow``: the blob is still arriving at that path: read it as
    it is written (:mod:`unionimg.fs.follow`), take the complete file once it is there."""

    def __call__(
        self,
        blob: Path,
        meta: bytes,
        diff_id: str,
        parent: str | None,
        digest: str,
        /,
        *,
        follow: Growing | None = None,
    ) -> Staged: ...


IMPORT_WORKERS = 2
"""Layers built at once in a pull (the blobs are independent: their extraction and
``mke2fs`` run side by side)."""
UndoImport = Callable[[str], None]
"""``undo(diff_id)``: remove a layer this pull imported (a later import failed)."""


def fetch_node(reg: Registry, repo: str, ref: str) -> Manifest:
    data, digest = reg.get_manifest(repo, ref)
    return parse_manifest(data, where=f"{repo}@{digest}", expect=ARTIFACT_LAYER)


@dataclass
class PullPlan:
    """What pulling one node needs, known from manifests and configs alone (no blob
    fetched): the node, the indexes of its chain's layers the host lacks (bottom to top) and
    their layer.json bytes."""

    ref: str
    top: Manifest
    missing: list[int] = field(default_factory=list)
    metas: dict[int, bytes] = field(default_factory=dict)

    @property
    def chain(self) -> tuple[str, ...]:
        return self.top.diff_ids()


def plan_pull(reg: Registry, repo: str, ref: str, *, have: Callable[[str], bool]) -> PullPlan:
    """The plan of pulling node ``ref`` (a tag, a manifest digest, or a layer's diff_id —
    ``sha256:HEX`` or the 64 hex digits alone, when no tag has that name: its node's tag
    ``layer-<hex>``): the manifests of the parent nodes are walked up to the
    lowest layer the host lacks (each must extend its parent by one layer; a parent the
    registry lacks is NotFound) and each missing layer's layer.json is fetched."""
    check_repo(repo)
    try:
        top = fetch_node(reg, repo, ref)
    except NotFound:
        if is_digest("sha256:" + ref):  # a diff_id's 64 hex digits, as a layer is shown
            ref = "sha256:" + ref
        if not ref.startswith("sha256:"):
            raise
        top = fetch_node(reg, repo, layer_tag(ref))  # a diff_id names its node by tag
    plan = PullPlan(ref, top)
    chain = top.diff_ids()
    plan.missing = [i for i, d in enumerate(chain) if not have(d)]
    if not plan.missing:
        return plan
    node, index = top, len(chain) - 1
    lowest = plan.missing[0]
    while True:
        if index in plan.missing:
            meta = reg.get_small_blob(repo, node.config.digest, MAX_META)
            _check_meta(meta, chain[index], repo, node.digest)
            plan.metas[index] = meta
        if index == lowest:
            return plan
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


def _wanted(
    plans: Sequence[PullPlan],
    download_dir: Path,
    check_space: Callable[[int, Sequence[bytes]], None] | None,
) -> dict[str, tuple[int, Path]]:
    """Blob digest -> (size, its file in ``download_dir``) of every blob the plans lack,
    each once, in chain order; ``check_space`` run, ``download_dir`` made."""
    wanted: dict[str, tuple[int, bytes]] = {}  # blob digest -> size, layer.json
    for plan in plans:
        for i in plan.missing:
            desc = plan.top.layers[i]
            wanted.setdefault(desc.digest, (desc.size, plan.metas[i]))
    if check_space is not None:
        check_space(sum(size for size, _ in wanted.values()), [m for _, m in wanted.values()])
    download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {
        digest: (size, download_dir / (digest.removeprefix("sha256:") + ".blob"))
        for digest, (size, _meta) in wanted.items()
    }


@dataclass(frozen=True)
class _Job:
    blob: Path
    meta: bytes
    diff_id: str
    parent: str | None
    digest: str


def _jobs(
    plans: Sequence[PullPlan], files: dict[str, Path], have: Callable[[str], bool]
) -> list[_Job]:
    """The layers to import, each chain bottom to top, each layer once (a parent before
    its children), the ones the store holds left out."""
    jobs: dict[str, _Job] = {}
    for plan in plans:
        chain = plan.chain
        for i in plan.missing:
            if chain[i] in jobs or have(chain[i]):
                continue
            desc = plan.top.layers[i]
            parent = chain[i - 1] if i else None
            jobs[chain[i]] = _Job(files[desc.digest], plan.metas[i], chain[i], parent, desc.digest)
    return list(jobs.values())


def _undo(imported: Sequence[str], undo: UndoImport | None) -> None:
    """Remove the layers a failed pull put in place, top first."""
    if undo is None:
        return
    for diff_id in reversed(imported):
        # the first error is the one to report; 'layer gc' removes what is left
        with contextlib.suppress(UnionimgError, OSError):
            undo(diff_id)


def _discard(futures: Sequence[Future[Staged]]) -> None:
    """Cancel the builds not started, discard the ones made (not yet in place)."""
    for fut in futures:
        fut.cancel()
    for fut in futures:
        if fut.cancelled():
            continue
        with contextlib.suppress(BaseException):
            fut.result().discard()  # ended already when it was published


def pull_nodes(
    reg: Registry,
    repo: str,
    refs: Sequence[str],
    *,
    have: Callable[[str], bool],
    stage_blob: StageBlob,
    download_dir: Path,
    on_bytes: Callable[[int], None] | None = None,
    check_space: Callable[[int, Sequence[bytes]], None] | None = None,
    undo: UndoImport | None = None,
) -> PullReport:
    """Bring image-tree nodes ``refs`` (tags, manifest digests or diff_ids of ``repo``)
    and their chains into a host: every node planned (:func:`plan_pull`), then every missing
    blob of every node fetched and checked while its layer is built, and only then the
    layers put in place (:func:`_fetch_while_staging`). So a missing parent node, or a blob
    that is tampered, truncated or missing, raises before anything is in place; an import
    that fails undoes the others (``undo``). ``have(diff_id)`` says what the host holds."""
    check_repo(repo)
    start = time.monotonic()
    before, resumed_before = reg.counters.bytes_down, reg.counters.bytes_resumed
    report = PullReport(reg.url, repo, " ".join(refs))
    plans = [plan_pull(reg, repo, ref, have=have) for ref in refs]
    if len(plans) == 1:
        report.manifest = plans[0].top.digest
    report.layers = list(dict.fromkeys(d for plan in plans for d in plan.chain))
    report.imported = _fetch_while_staging(
        reg, repo, plans, download_dir, have=have, stage_blob=stage_blob,
        on_bytes=on_bytes, check_space=check_space, undo=undo, report=report, start=start,
    )  # fmt: skip
    report.bytes_pulled = reg.counters.bytes_down - before
    report.bytes_resumed = reg.counters.bytes_resumed - resumed_before
    report.cache_hits = len(report.layers) - len(report.imported)
    report.seconds = time.monotonic() - start
    return report


def _fetch_while_staging(
    reg: Registry,
    repo: str,
    plans: Sequence[PullPlan],
    download_dir: Path,
    *,
    have: Callable[[str], bool],
    stage_blob: StageBlob,
    on_bytes: Callable[[int], None] | None,
    check_space: Callable[[int, Sequence[bytes]], None] | None,
    undo: UndoImport | None,
    report: PullReport,
    start: float,
    workers: int = IMPORT_WORKERS,
) -> list[str]:
    """Fetch the plans' missing blobs (in the order their layers are built) while
    ``workers`` threads build those layers from the bytes as they arrive (each blob's
    :class:`~unionimg.fs.follow.Growing`: a base layer's extraction runs during its own
    download instead of after it); then, only once every blob arrived and matched its
    digest, put the layers in place bottom to top. A fetch that fails stops the builds and
    discards them (nothing is put in place); a build whose blob the registry sent again from
    its start (a 200 to a resumed GET) is built again from the complete file. The report's
    ``fetch_seconds`` run until the last blob arrived, ``import_seconds`` from then on (what
    the builds took beyond the transfer; both from ``start``, the pull's). The imported
    diff_ids are returned; an import that fails undoes the ones before it (``undo``, top
    first), so the store holds what it held before; the verified files stay in
    ``download_dir`` (the next pull uses them), and are removed once every layer is in
    place. ``reg`` is asked only for blobs ``download_dir`` lacks."""
    wanted = _wanted(plans, download_dir, check_space)
    jobs = _jobs(plans, {d: path for d, (_size, path) in wanted.items()}, have)
    tails = {d: Growing(size) for d, (size, _path) in wanted.items()}
    order = list(dict.fromkeys([j.digest for j in jobs] + list(wanted)))
    imported: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        for digest in order:
            if wanted[digest][1].exists():  # verified by an earlier pull
                tails[digest].finish(wanted[digest][1])
        futures = [
            pool.submit(
                stage_blob, j.blob, j.meta, j.diff_id, j.parent, j.digest, follow=tails[j.digest]
            )
            for j in jobs
        ]
        try:
            for digest in order:
                size, dest = wanted[digest]
                if not tails[digest].finished:
                    reg.fetch_blob(
                        repo, digest, size, dest, on_bytes=on_bytes, follow=tails[digest]
                    )
            report.fetch_seconds = time.monotonic() - start
            t_import = time.monotonic()
            for job, fut in zip(jobs, futures, strict=True):
                try:
                    staged = fut.result()
                except Restarted:  # its bytes changed under it: built again from the file
                    staged = stage_blob(job.blob, job.meta, job.diff_id, job.parent, job.digest)
                    report.rebuilt += 1
                if have(job.diff_id):  # another pull brought it meanwhile
                    staged.discard()
                    continue
                staged.publish()
                imported.append(job.diff_id)
            report.import_seconds = time.monotonic() - t_import
        except BaseException:
            for tail in tails.values():
                tail.fail("the pull stopped")  # a build waiting for bytes ends now
            _discard(futures)
            _undo(imported, undo)
            raise
    for _size, path in wanted.values():
        path.unlink(missing_ok=True)
    return imported


def pull_node(
    reg: Registry,
    repo: str,
    ref: str,
    *,
    have: Callable[[str], bool],
    stage_blob: StageBlob,
    download_dir: Path,
    on_bytes: Callable[[int], None] | None = None,
    check_space: Callable[[int, Sequence[bytes]], None] | None = None,
    undo: UndoImport | None = None,
) -> PullReport:
    """Bring image-tree node ``ref`` and its chain into a host (:func:`pull_nodes` of one
    node): missing blobs fetched and checked, then put in place bottom to top; raises before
    anything is in place if any blob or parent node is missing or damaged."""
    return pull_nodes(
        reg, repo, [ref], have=have, stage_blob=stage_blob,
        download_dir=download_dir, on_bytes=on_bytes, check_space=check_space, undo=undo,
    )  # fmt: skip


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
