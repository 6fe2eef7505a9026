"""The registry and a host's layer cache (:mod:`unionimg.layers.layerstore`) together.

:func:`push_layers` pushes a layer of the store with its whole chain (its blobs, its
layer.json records, one image-tree node per layer); :func:`pull_node` brings a node and the
layers of its chain the store lacks into the store (:func:`pull_nodes`: several nodes at
once, a system's VMs): every missing blob fetched and checked first (:mod:`.transfer`), then
each built with :func:`layerstore.stage_blob` (two at a time: a base layer's extraction and
``mke2fs`` beside its snapshots'), which checks the blob digest again and the uncompressed
diff_id in the one read that extracts it, and put into the cache bottom to top. A failure
leaves the layer cache as it was: nothing is imported before every blob arrived checked, a
layer built but not yet in place is discarded, and an import that fails removes the layers
imported before it (:func:`layerstore.remove`). The layer.json a registry
serves is read as a :class:`LayerMeta` record (a damaged one is refused) and only its
``kind`` and origin are taken: the parent is the layer below in the node's chain, the
digests are the node's.

Partial and verified downloads wait in ``STORE/downloads/`` (a broken pull resumes from
there, for 7 days: :func:`sweep_downloads`); one pull at a time per store (the ``pull``
lock: a second one is a Conflict, exit 4).
Before the first blob is fetched the store's file system must hold the missing blobs, their
images (about their tars' size, from their layer.json) and the largest tree extracted: else
"store full" (exit 7) and nothing fetched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from unionimg.errors import ToolFailed
from unionimg.fs.follow import Growing
from unionimg.fs.space import require_space
from unionimg.layers import layerstore
from unionimg.registry import transfer
from unionimg.registry.client import Registry
from unionimg.registry.manifests import LAYER_REPO
from unionimg.registry.transfer import LocalLayer, PullReport, PushReport
from unionimg.store.layout import Store
from unionimg.store.records import LayerMeta, RecordError

DOWNLOADS = "downloads"
PULL_LOCK = "pull"
KEEP_DOWNLOADS = 7 * 86400.0
"""Seconds a partial or verified download waits in ``downloads/`` for the pull to be retried."""


def download_dir(store: Store) -> Path:
    return store.root / DOWNLOADS


def local_chain(store: Store, ref: str) -> list[LocalLayer]:
    """Layer ``ref`` of the store and its ancestors as pushable layers, bottom to top (a
    layer whose blob is not kept gets it made now: root needed)."""
    out: list[LocalLayer] = []
    for layer in reversed(layerstore.chain(store, ref)):
        blob = layerstore.blob_path(store, layer)
        meta = layerstore.get(store, layer.diff_id).meta  # blob_path may have recorded it
        out.append(
            LocalLayer(
                diff_id=meta.diff_id,
                blob=blob,
                blob_digest=meta.blob_digest,
                blob_size=meta.blob_size,
                meta=(layer.dir / LayerMeta.FILE).read_bytes(),
                title=_title(meta),
                created=meta.created,
            )
        )
    return out


def _title(meta: LayerMeta) -> str:
    what = meta.origin or meta.kind
    return f"{what}: {meta.message}" if meta.message else what


def push_layers(store: Store, reg: Registry, ref: str, *, repo: str = LAYER_REPO) -> PushReport:
    """Push layer ``ref`` and its chain into ``repo`` (see :func:`transfer.push_layers`)."""
    return transfer.push_layers(reg, repo, local_chain(store, ref))


def _stager(store: Store) -> transfer.StageBlob:
    def stage_one(
        blob: Path,
        meta_bytes: bytes,
        diff_id: str,
        parent: str | None,
        blob_digest: str,
        /,
        *,
        follow: Growing | None = None,
    ) -> layerstore.StagedLayer:
        try:
            meta = LayerMeta.from_json(json.loads(meta_bytes))
        except (RecordError, ValueError) as exc:
            raise ToolFailed(
                f"the layer record of {diff_id} from the registry is damaged ({exc}); "
                "refused, push the layer again"
            ) from None
        if meta.parent != parent:
            raise ToolFailed(
                f"the layer record of {diff_id} from the registry names parent "
                f"{meta.parent or 'none'}, but its node lies over {parent or 'none'}; refused"
            )
        return layerstore.stage_blob(
            store,
            blob,
            diff_id,
            parent,
            kind=meta.kind,
            expected_blob_digest=blob_digest,
            origin=layerstore.Origin(
                text=meta.origin,
                base=meta.base,
                generation=meta.generation,
                instance=meta.instance,
                message=meta.message,
            ),
            follow=follow,
            hint=(meta.tar_size, meta.entries),
        )

    return stage_one


def pull_node(
    store: Store,
    reg: Registry,
    ref: str,
    *,
    repo: str = LAYER_REPO,
    on_bytes: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> PullReport:
    """Bring node ``ref`` of ``repo`` (a tag, a manifest digest, or a layer's diff_id) and
    its chain into the store, fetching only the blobs of layers the store lacks.
    ``on_plan(bytes to fetch)`` once those are known, ``on_bytes(n)`` as they arrive (for a
    progress bar)."""
    return pull_nodes(store, reg, [ref], repo=repo, on_bytes=on_bytes, on_plan=on_plan)


def pull_nodes(
    store: Store,
    reg: Registry,
    refs: Sequence[str],
    *,
    repo: str = LAYER_REPO,
    on_bytes: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> PullReport:
    """Bring nodes ``refs`` of ``repo`` and their chains into the store at once (a system's
    VMs: :func:`unionimg.systems.materialize`): every missing blob of every node is fetched
    and checked before the first layer is imported, and an import that fails removes the
    layers imported before it, so a failure leaves the layer cache as it was (verified
    downloads stay in ``downloads/`` for the next pull). Under the ``pull`` lock."""
    what = refs[0] if len(refs) == 1 else f"{len(refs)} nodes"
    with store.lock(PULL_LOCK, wait=False, purpose=f"pull {what}"):
        sweep_downloads(store)

        def before_fetch(blobs: int, metas: Sequence[bytes]) -> None:
            _check_space(store, blobs, metas)
            if on_plan is not None:
                on_plan(blobs)

        return transfer.pull_nodes(
            reg,
            repo,
            refs,
            have=lambda d: layerstore.has(store, d),
            stage_blob=_stager(store),
            download_dir=download_dir(store),
            on_bytes=on_bytes,
            check_space=before_fetch,
            undo=lambda d: layerstore.remove(store, layerstore.get(store, d)),
        )


def sweep_downloads(store: Store, *, max_age: float = KEEP_DOWNLOADS) -> list[Path]:
    """Remove what earlier pulls left in ``downloads/`` that no pull will want: a verified
    blob of a layer the store now holds, and anything older than ``max_age`` seconds (a
    pull that was never retried). Runs under the pull lock."""
    folder = download_dir(store)
    if not folder.is_dir():
        return []
    held = {la.meta.blob_digest for la in layerstore.list_layers(store)}
    now = time.time()
    removed = []
    for entry in folder.iterdir():
        name = entry.name.split(".", 1)[0]
        old = now - entry.lstat().st_mtime > max_age
        if old or (entry.name.endswith(".blob") and f"sha256:{name}" in held):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _check_space(store: Store, blobs: int, metas: Sequence[bytes]) -> None:
    """Room for the pull before a byte is fetched: the blobs, each layer's image (about its
    tar's size) and, for the largest, its tree extracted while its image is made."""
    tars = [_tar_size(m) for m in metas]
    need = blobs + sum(tars) + max(tars, default=0)
    require_space(store.root, need, f"pull {len(metas)} layer(s)")


def _tar_size(meta: bytes) -> int:
    try:
        size = json.loads(meta).get("tar_size", 0)
    except (ValueError, AttributeError):
        return 0  # refused at its import (read as a LayerMeta record)
    return size if type(size) is int and size > 0 else 0
