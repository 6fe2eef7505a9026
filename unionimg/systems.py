"""Systems: the system tree. A system node names VMs and, for each, the image-tree node it
boots (its top layer) and what makes it the same machine everywhere (MAC, NIC name,
hypervisor, resources).

On disk::

    STORE/systems/NAME/system.json     a SystemMeta record (immutable once made)
    STORE/systems/NAME/deployed.json   on a host: node NAME was materialized here (Deployment)

``system create NAME --instance VM...`` snapshots every VM (``instance snapshot``: its upper
layer frozen into a new layer on its chain; a VM whose upper layer holds nothing keeps its
layer) and records the root node; ``system snapshot NAME --as CHILD`` does the same for the
VMs of NAME and records CHILD with parent NAME. A node appears only when every VM was
snapshotted (a VM that fails stops the command; the VMs snapshotted before it keep their new
layers, which are whole image-tree nodes of their own, and no system node names them).

Deploying (:mod:`unionimg.deploy` on the controller, :func:`materialize` on the host): the
node's manifest is pushed to a registry (:func:`push`: each VM's chain as image-tree nodes,
then the system node whose config blob is this record's JSON and whose ``layers`` are every
blob its VMs need); the host pulls what it lacks (every VM's missing blobs fetched and checked
before any layer is imported: a bad blob leaves its layer cache as it was), makes the base
generations it lacks from their layers (the controller's numbers and digests, a delta chain
whole: :func:`unionimg.layers.base.generation_from_layer`) and makes the VMs
(:func:`materialize`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unionimg.boot import control
from unionimg.errors import Conflict, NotFound, ToolFailed, UsageError
from unionimg.fs.mounts import mount_image, umount
from unionimg.fs.space import require_space
from unionimg.layers import base as base_mod
from unionimg.layers import instance as inst_mod
from unionimg.layers import layerstore
from unionimg.layers import snapshot as snap_mod
from unionimg.names import check_hypervisor, check_name, check_nic_name, parse_mac
from unionimg.registry import hostcache, transfer
from unionimg.registry.client import Registry
from unionimg.registry.manifests import (
    ANN_DIFF_ID,
    ARTIFACT_SYSTEM,
    LAYER_REPO,
    SYSTEM_REPO,
    Descriptor,
    Manifest,
    check_tag,
    digest_of,
    layer_tag,
    parse_manifest,
    system_manifest,
)
from unionimg.registry.transfer import push_blob
from unionimg.store.fleet_records import Deployment, SystemMeta, SystemVM
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.records import LayerMeta, RecordError

MAX_VMS = 256
_HEX = frozenset("0123456789abcdef")


def systems_dir(store: Store) -> Path:
    return store.root / "systems"


def node_dir(store: Store, name: str) -> Path:
    return systems_dir(store) / check_name(name, "system")


def exists(store: Store, name: str) -> bool:
    return (node_dir(store, name) / SystemMeta.FILE).is_file()


def get(store: Store, name: str) -> SystemMeta:
    try:
        return read_record(node_dir(store, name) / SystemMeta.FILE, SystemMeta)
    except FileNotFoundError:
        raise NotFound(f"no system named {name!r}; 'unionimg system tree' shows them") from None


def list_systems(store: Store) -> list[SystemMeta]:
    d = systems_dir(store)
    if not d.is_dir():
        return []
    return [
        read_record(sub / SystemMeta.FILE, SystemMeta)
        for sub in sorted(d.iterdir())
        if (sub / SystemMeta.FILE).is_file()
    ]


def check_diff_id(value: str, what: str) -> str:
    if not (
        isinstance(value, str)
        and value.startswith("sha256:")
        and len(value) == 71
        and set(value[7:]) <= _HEX
    ):
        raise UsageError(f"{what} {str(value)[:80]!r} is not a layer digest (sha256: + 64 hex)")
    return value


def check_record(meta: SystemMeta, where: str) -> SystemMeta:
    """A system record that came from elsewhere (a registry): every name, MAC, digest and
    number checked as the commands check what users type; one line naming ``where``."""
    try:
        check_name(meta.name, "system")
        if meta.parent is not None:
            check_name(meta.parent, "parent system")
        if not 0 < len(meta.vms) <= MAX_VMS:
            raise UsageError(f"a system has 1 to {MAX_VMS} VMs, not {len(meta.vms)}")
        seen: set[str] = set()
        macs: set[str] = set()
        for vm in meta.vms:
            check_name(vm.name, "instance")
            if vm.name in seen:
                raise UsageError(f"VM {vm.name} is named twice")
            seen.add(vm.name)
            check_diff_id(vm.layer, f"layer of VM {vm.name}")
            mac = parse_mac(vm.mac, of=f" of VM {vm.name}")
            if mac in macs:
                raise UsageError(f"MAC {mac} is given to two VMs")
            macs.add(mac)
            check_hypervisor(vm.hypervisor)
            check_nic_name(vm.nic_name, of=f" of VM {vm.name}")
            if not (32 <= vm.memory <= 1 << 22 and 1 <= vm.vcpus <= 256 and vm.size > 0):
                raise UsageError(f"VM {vm.name}'s memory, vcpus or size is out of range")
    except UsageError as exc:
        raise ToolFailed(f"system {where} refused: {exc.message}") from None
    return meta


def record_json(meta: SystemMeta) -> bytes:
    """The canonical bytes of a node's record: its config blob in a registry."""
    return json.dumps(meta.to_json(), sort_keys=True, separators=(",", ":")).encode()


def parse_record(data: bytes, where: str) -> SystemMeta:
    try:
        meta = SystemMeta.from_json(json.loads(data))
    except (ValueError, RecordError) as exc:
        raise ToolFailed(f"system {where} refused: its record is not one ({exc})") from None
    return check_record(meta, where)


# -- the tree ------------------------------------------------------------------------------
@dataclass
class Node:
    meta: SystemMeta
    children: list[Node] = field(default_factory=list)


def tree(store: Store, root: str | None = None) -> list[Node]:
    """The system tree (roots first, children by creation), or the subtree under ``root``."""
    metas = list_systems(store)
    nodes = {m.name: Node(m) for m in metas}
    roots: list[Node] = []
    for m in sorted(metas, key=lambda m: (m.created, m.name)):
        parent = nodes.get(m.parent) if m.parent is not None else None
        (parent.children if parent is not None else roots).append(nodes[m.name])
    if root is not None:
        get(store, root)
        return [nodes[root]]
    return roots


def ancestry(store: Store, name: str) -> list[SystemMeta]:
    """``name`` and its parents, root last (bounded: a cycle is a damaged store)."""
    out = [get(store, name)]
    while out[-1].parent is not None:
        if len(out) > 4096 or any(m.name == out[-1].parent for m in out):
            raise ToolFailed(f"system {name}'s parents form a loop; the store is damaged")
        out.append(get(store, out[-1].parent))
    return out


def changed_vms(store: Store, meta: SystemMeta) -> list[str]:
    """The VMs of ``meta`` whose layer differs from the parent node's (all for a root)."""
    if meta.parent is None:
        return [vm.name for vm in meta.vms]
    parent = {vm.name: vm.layer for vm in get(store, meta.parent).vms}
    return [vm.name for vm in meta.vms if parent.get(vm.name) != vm.layer]


def describe(store: Store, name: str) -> dict[str, Any]:
    meta = get(store, name)
    out: dict[str, Any] = meta.to_json()
    out["changed"] = changed_vms(store, meta)
    out["children"] = sorted(m.name for m in list_systems(store) if m.parent == name)
    dep = deployment(store, name)
    out["deployed"] = dep.to_json() if dep is not None else None
    return out


def deployment(store: Store, name: str) -> Deployment | None:
    path = node_dir(store, name) / Deployment.FILE
    try:
        return read_record(path, Deployment)
    except FileNotFoundError:
        return None


def deployments(store: Store) -> list[Deployment]:
    d = systems_dir(store)
    if not d.is_dir():
        return []
    return [
        read_record(sub / Deployment.FILE, Deployment)
        for sub in sorted(d.iterdir())
        if (sub / Deployment.FILE).is_file()
    ]


def write_node(store: Store, meta: SystemMeta) -> None:
    """Publish node ``meta`` (refused if its name exists): built in staging, renamed."""
    final = node_dir(store, meta.name)
    systems_dir(store).mkdir(mode=0o700, exist_ok=True)
    with store.staging(f"system-{meta.name}") as stage:
        build = stage / meta.name
        build.mkdir(mode=0o700)
        write_record(build / SystemMeta.FILE, meta)
        if final.exists():
            raise Conflict(f"system {meta.name} exists; pick another name")
        os.rename(build, final)


def _walk(nodes: Sequence[Node]) -> Iterator[Node]:
    for n in nodes:
        yield n
        yield from _walk(n.children)


# -- pushing a node to a registry --------------------------------------------------------------
@dataclass
class PushOutcome:
    registry: str
    repo: str
    system: str
    manifest: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # system name -> manifest digest
    bytes_sent: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "repo": self.repo,
            "system": self.system,
            "manifest": self.manifest,
            "nodes": self.nodes,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 3),
        }


def push(store: Store, reg: Registry, name: str, *, repo: str = SYSTEM_REPO) -> PushOutcome:
    """Push system node ``name`` and its ancestors (root first: a node's manifest names its
    parent's digest): each VM's chain as image-tree nodes in ``LAYER_REPO`` (blobs the
    registry holds are not sent), the blobs mounted into ``repo`` (no bytes), the record as
    the config blob, the manifest tagged with the node's name."""
    start = time.monotonic()
    before = reg.counters.bytes_up
    out = PushOutcome(reg.url, repo, name)
    parent: str | None = None
    chains: dict[str, list[transfer.LocalLayer]] = {}
    pushed: set[str] = set()
    for node in reversed(ancestry(store, name)):
        blobs: list[Descriptor] = []
        for vm in node.vms:
            if vm.layer not in chains:
                chains[vm.layer] = hostcache.local_chain(store, vm.layer)
            blobs.extend(layer.descriptor() for layer in chains[vm.layer])
        config = record_json(node)
        manifest = system_manifest(
            config, blobs, title=node.name, parent=parent, created=node.created
        )
        if reg.manifest_digest(repo, digest_of(manifest)) is None:
            # new to the registry (one it holds has its blobs too: a registry accepts a
            # manifest only when it holds every blob it names): its chains, blobs in ``repo``
            for vm in node.vms:
                if vm.layer in pushed:
                    continue
                chain = chains[vm.layer]
                transfer.push_layers(reg, LAYER_REPO, chain)
                for layer in chain:
                    push_blob(reg, repo, layer.blob, layer.blob_digest, lambda: [LAYER_REPO])
                pushed.add(vm.layer)
            reg.push_bytes(repo, config)
        # tagged either way (no write when the tag already names it): it names this node
        parent = reg.put_manifest(repo, check_tag(node.name), manifest)
        out.nodes[node.name] = parent
    out.manifest = parent or ""
    out.bytes_sent = reg.counters.bytes_up - before
    out.seconds = time.monotonic() - start
    return out


def fetch_node(reg: Registry, ref: str, *, repo: str = SYSTEM_REPO) -> tuple[Manifest, SystemMeta]:
    """System node ``ref`` (its name = tag, or its manifest digest) from a registry, checked:
    a system manifest, its record valid, every VM's layer among the node's blobs."""
    data, digest = reg.get_manifest(repo, ref)
    where = f"{repo}@{digest}"
    man = parse_manifest(data, where=where, expect=ARTIFACT_SYSTEM)
    meta = parse_record(reg.get_small_blob(repo, man.config.digest, MAX_RECORD), where)
    have = set(man.diff_ids())
    for vm in meta.vms:
        if vm.layer not in have:
            raise ToolFailed(
                f"system {where} refused: VM {vm.name}'s layer {vm.layer[:19]} is not among "
                "the node's blobs (push the system again)"
            )
    return man, meta


# -- materializing a node on a host ----------------------------------------------------------
DEPLOY_LOCK = "deploy"
MAX_RECORD = 1 << 20
U_OVERHEAD = 4 << 20  # what mke2fs writes into a fresh sparse U (see instance.create)


SECONDS = (
    "seconds",
    "pull_seconds",
    "fetch_seconds",
    "import_seconds",
    "base_seconds",
    "vm_seconds",
)
"""The time fields of a :class:`Materialized` report."""


@dataclass
class Materialized:
    system: str
    manifest: str
    registry: str
    vms: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # every layer the node needs
    cache_hits: int = 0  # of those, the ones the host held before
    cached_before: int = 0  # layers of any node the host's cache held before
    imported: list[str] = field(default_factory=list)
    bytes_pulled: int = 0
    bytes_resumed: int = 0
    booted: list[str] = field(default_factory=list)
    generations_made: list[str] = field(default_factory=list)  # BASE/N made from layers
    seconds: float = 0.0
    pull_seconds: float = 0.0  # fetch_seconds + import_seconds
    fetch_seconds: float = 0.0  # the network: manifests, configs, blobs checked on arrival
    import_seconds: float = 0.0  # building the layers after the last blob arrived (they are
    # extracted while their blobs arrive: what the builds took beyond the transfer)
    base_seconds: float = 0.0  # making the base generations the host lacked
    vm_seconds: float = 0.0  # making the VMs (fresh U images, identity)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        for key in SECONDS:
            out[key] = round(getattr(self, key), 3)
        return out


Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase ``pull`` (bytes), ``vm`` (VMs made), ``boot``."""


def materialize(
    store: Store,
    url: str,
    ref: str,
    *,
    repo: str = SYSTEM_REPO,
    replace: bool = False,
    boot: bool = False,
    progress: Progress | None = None,
) -> Materialized:
    """Make system node ``ref`` of the registry at ``url`` real on this host: pull the layers
    this store lacks, then make each VM (its chain, a fresh U, its MAC), and boot them with
    ``boot``. One deploy at a time per store (the ``deploy`` lock: a second is a Conflict).
    Everything is checked before anything changes: the node, VM names and MACs taken here
    (only ``replace`` may replace VMs an earlier deploy made, and only stopped ones), the
    space the missing layers and the U images need. The pull takes every VM's chain at once
    (:func:`hostcache.pull_nodes`): every missing blob is fetched and checked before the
    first is imported, so a tampered, truncated or missing blob of any VM leaves the layer
    cache as it was (the verified blobs stay in ``downloads/``, and the next deploy fetches
    only the rest). A failure while making the VMs removes the ones made and puts replaced
    ones back."""
    start = time.monotonic()
    note: Progress = progress or (lambda _phase, _done, _total: None)
    with store.lock(DEPLOY_LOCK, wait=False, purpose=f"deploy {ref}"), Registry(url) as reg:
        man, meta = fetch_node(reg, ref, repo=repo)
        out = Materialized(meta.name, man.digest, reg.url, vms=[vm.name for vm in meta.vms])
        replaced = _check_names(store, meta, replace)
        out.cached_before = layerstore.count(store)
        out.layers = list(dict.fromkeys(man.diff_ids()))
        # the registry's layer.json of each layer this host lacks, asked once
        remote = {d: _remote_meta(reg, d) for d in out.layers if not layerstore.has(store, d)}
        missing = [d for d in man.layers if d.annotations[ANN_DIFF_ID] in remote]
        bases = _check_bases(store, man, remote)
        out.cache_hits = len(out.layers) - len(remote)
        needed = sum(_layer_needs(remote, d) for d in missing) + sum(
            U_OVERHEAD + vm.size // 65536 for vm in meta.vms
        )
        require_space(store.root, needed, f"deploy system {meta.name} (its missing layers)")
        total = sum(d.size for d in missing)
        pulled = [0]

        def on_bytes(n: int) -> None:
            pulled[0] += n
            note("pull", pulled[0], total)

        note("pull", 0, total)
        # every VM's chain at once: all missing blobs fetched and checked before the first
        # import, so a bad blob of any VM leaves the layer cache as it was
        tops = [layer_tag(top) for top in dict.fromkeys(vm.layer for vm in meta.vms)]
        # the store's empty Mercurial repository, which the base generations and the VMs
        # made below copy: made (once per store, an 'hg init') while the layers arrive
        template = threading.Thread(
            target=base_mod.hg_template, args=(store,), name="unionimg-hg-template", daemon=True
        )
        template.start()
        try:
            report = hostcache.pull_nodes(store, reg, tops, on_bytes=on_bytes)
        finally:
            template.join()  # a failure of its own is raised where it is used
        out.imported = report.imported
        out.bytes_pulled = report.bytes_pulled
        out.bytes_resumed = report.bytes_resumed
        out.pull_seconds = report.seconds
        out.fetch_seconds = report.fetch_seconds
        out.import_seconds = report.import_seconds
        t_base = time.monotonic()
        _install_bases(store, bases)
        out.generations_made = [f"{n.base}/{n.generation}" for n in bases]
        out.base_seconds = time.monotonic() - t_base
        t_vms = time.monotonic()
        _make_vms(store, meta, replaced, note)
        out.vm_seconds = time.monotonic() - t_vms
        out.created = [vm.name for vm in meta.vms if vm.name not in replaced]
        out.replaced = list(replaced)
        _record_deployment(store, meta, man.digest)
    if boot:
        for i, vm in enumerate(meta.vms):
            note("boot", i, len(meta.vms))
            control.boot(store, vm.name)
            out.booted.append(vm.name)
        note("boot", len(meta.vms), len(meta.vms))
    out.seconds = time.monotonic() - start
    return out


def _remote_meta(reg: Registry, diff_id: str) -> LayerMeta | None:
    """The layer.json of layer ``diff_id``'s image-tree node in the registry (None when it
    is missing or damaged: the pull itself refuses those, in one line)."""
    try:
        node = transfer.fetch_node(reg, LAYER_REPO, layer_tag(diff_id))
        data = reg.get_small_blob(LAYER_REPO, node.config.digest, MAX_RECORD)
        lm = LayerMeta.from_json(json.loads(data))
    except (ValueError, RecordError, NotFound, ToolFailed):
        return None
    return lm if lm.diff_id == diff_id else None


def _layer_needs(remote: dict[str, LayerMeta | None], desc: Descriptor) -> int:
    """Bytes a missing layer needs here: its blob while it arrives, its image, its tar
    while it is extracted (the image-tree node's layer.json, in ``remote``, says the
    sizes)."""
    lm = remote.get(desc.annotations[ANN_DIFF_ID])
    if lm is None:
        return 3 * desc.size
    return desc.size + max(lm.image_size, 0) + max(lm.tar_size, 0)


@dataclass(frozen=True)
class _BaseNeed:
    """A base generation the node's chains lie on that this host lacks: made here from its
    pulled layer (:func:`unionimg.layers.base.generation_from_layer`), over generation
    ``parent`` for a delta."""

    base: str
    generation: int
    diff_id: str
    parent: int | None


def _check_bases(
    store: Store, man: Manifest, remote: dict[str, LayerMeta | None]
) -> list[_BaseNeed]:
    """The base generations under the node's layers (kinds base and delta): each one this
    host has must hold the very same tree (a generation of the same name and number with
    another tree is a Conflict: VMs would boot on the wrong base); each one it lacks is made
    here from its layer, with the controller's number, so a VM's base and generation mean the
    same on both sides — every generation of a delta chain, reusing the ones the host has.
    Checked before anything is pulled; the generations to make, bottom first. ``remote``:
    the registry's layer.json of each layer this host lacks (and only of those)."""
    metas: dict[str, LayerMeta] = {}
    for diff_id in dict.fromkeys(man.diff_ids()):
        lm = remote[diff_id] if diff_id in remote else layerstore.get(store, diff_id).meta
        if lm is None or lm.kind == "snapshot":
            continue
        if lm.base is None or lm.generation is None or lm.generation < 1:
            raise ToolFailed(f"layer {diff_id[:19]} is a {lm.kind} layer naming no base; refused")
        check_name(lm.base, "base")
        metas[diff_id] = lm
    named: dict[tuple[str, int], str] = {}
    needs: list[_BaseNeed] = []
    for diff_id, lm in metas.items():
        assert lm.base is not None and lm.generation is not None
        key = (lm.base, lm.generation)
        if named.setdefault(key, diff_id) != diff_id:
            raise ToolFailed(
                f"the system names two trees as base {lm.base} generation {lm.generation} "
                f"({named[key][:19]}, {diff_id[:19]}); refused, nothing was changed"
            )
        try:
            gen: base_mod.Generation | None = base_mod.get_generation(store, *key)
        except NotFound:
            gen = None
        if gen is not None:
            if _generation_digest(store, gen) != diff_id:
                raise Conflict(
                    f"base {lm.base} generation {lm.generation} of this host holds another "
                    f"tree than the system's ({diff_id[:19]}); nothing was changed: rename "
                    "the host's base or deploy elsewhere"
                )
            continue
        parent = None
        if lm.kind == "delta":
            below = metas.get(lm.parent or "")
            if (
                below is None
                or below.base != lm.base
                or below.generation is None
                or below.generation >= lm.generation
            ):
                raise ToolFailed(
                    f"layer {diff_id[:19]} (base {lm.base} generation {lm.generation}) is a "
                    "delta whose parent is no earlier generation of that base among the "
                    "system's layers; refused, nothing was changed"
                )
            parent = below.generation
        elif lm.kind != "base" or lm.parent is not None:
            raise ToolFailed(f"layer {diff_id[:19]} is a {lm.kind} layer; refused")
        needs.append(_BaseNeed(lm.base, lm.generation, diff_id, parent))
    return sorted(needs, key=lambda n: (n.base, n.generation))


def _generation_digest(store: Store, gen: base_mod.Generation) -> str:
    """The diff_id of this host's generation ``gen``, read from its own image (never from a
    layer record naming it: a pulled layer names a base and generation too)."""
    if gen.layer is not None:  # a delta, or a generation a deploy made from its layer
        return gen.layer
    with store.staging("gen-digest") as stage:
        mnt = stage / "gen"
        mount_image(gen.image, mnt, readonly=True, exclusive=False)
        try:
            return layerstore.tree_digest(mnt, kind="base").diff_id
        finally:
            umount(mnt)


def _install_bases(store: Store, needs: Sequence[_BaseNeed]) -> None:
    """Make each needed generation here from its pulled layer, bottom first (a delta's
    parent exists when it is made): no ``base create``, no copy (see
    :func:`unionimg.layers.base.generation_from_layer`). Done under the deploy lock, before
    any VM uses them; a generation made stays if a later step fails (it is whole, and the
    next deploy reuses it)."""
    for need in needs:
        layer = layerstore.get(store, need.diff_id)
        parent = (
            None if need.parent is None else base_mod.get_generation(store, need.base, need.parent)
        )
        base_mod.generation_from_layer(store, need.base, need.generation, layer, parent=parent)


def _check_names(store: Store, meta: SystemMeta, replace: bool) -> list[str]:
    """The VMs of ``meta`` that exist here (to be replaced); a Conflict when one may not be."""
    owned = {vm: dep.system for dep in deployments(store) for vm in dep.vms}
    existing = {i.name: i for i in inst_mod.list_instances(store)}
    replaced = []
    for vm in meta.vms:
        if vm.name not in existing:
            continue
        if vm.name not in owned:
            raise Conflict(
                f"instance {vm.name} exists on this host and was not made by a deploy; nothing "
                f"was changed: remove or rename it, or deploy system {meta.name} elsewhere"
            )
        if not replace:
            raise Conflict(
                f"instance {vm.name} exists on this host (deployed with system "
                f"{owned[vm.name]}); nothing was changed: use 'redeploy' to replace it"
            )
        st = inst_mod.state(store, vm.name)
        if st != "stopped":
            raise Conflict(
                f"instance {vm.name} is {st} on this host; nothing was changed: stop it first"
            )
        replaced.append(vm.name)
    macs = {i.mac: n for n, i in existing.items() if n not in replaced}
    for vm in meta.vms:
        mac = parse_mac(vm.mac)
        if mac in macs:
            raise Conflict(
                f"MAC {mac} of VM {vm.name} is used by instance {macs[mac]} on this host; "
                "nothing was changed"
            )
    local = node_dir(store, meta.name) / SystemMeta.FILE
    if local.is_file() and read_record(local, SystemMeta) != meta:
        raise Conflict(
            f"this host has a system named {meta.name} other than the one deployed; nothing "
            "was changed"
        )
    return replaced


#: VMs made at once by a deploy: each is mostly waits for its own programs (``mke2fs -d``
#: of its U, ``ssh-keygen``), so a few overlap well on two cores
VM_WORKERS = 3


def _make_vms(store: Store, meta: SystemMeta, replaced: list[str], note: Progress) -> None:
    """Make the node's VMs (:data:`VM_WORKERS` at once), the ones they replace moved aside
    first; a failure removes the VMs made and puts the replaced ones back."""
    for name in replaced:
        control.forget(store, name)
    made: list[str] = []
    lock = threading.Lock()
    total = len(meta.vms)

    def make(vm: SystemVM) -> None:
        snap_mod.create_from(
            store,
            vm.name,
            vm.layer,
            mac=vm.mac,
            hypervisor=vm.hypervisor,
            size=vm.size,
            memory=vm.memory,
            vcpus=vm.vcpus,
            nic_name=vm.nic_name,
        )
        with lock:
            made.append(vm.name)
            note("vm", len(made), total)

    with store.staging(f"deploy-{meta.name}") as old:
        moved: list[str] = []
        try:
            for name in replaced:
                os.rename(store.instance_dir(name), old / name)
                moved.append(name)
            note("vm", 0, total)
            pool = ThreadPoolExecutor(max_workers=VM_WORKERS, thread_name_prefix="unionimg-vm")
            try:
                futures = [pool.submit(make, vm) for vm in meta.vms]
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # the first failure stops what has not started; the rest end first
                pool.shutdown(wait=True, cancel_futures=True)
            for fut in futures:
                if not fut.cancelled():
                    fut.result()  # the first failure raised
        except BaseException:
            for name in made:
                shutil.rmtree(store.instance_dir(name), ignore_errors=True)
            for name in moved:
                os.rename(old / name, store.instance_dir(name))
            raise


def _record_deployment(store: Store, meta: SystemMeta, digest: str) -> None:
    names = {vm.name for vm in meta.vms}
    for dep in deployments(store):
        rest = tuple(v for v in dep.vms if v not in names)
        path = node_dir(store, dep.system) / Deployment.FILE
        if not rest:
            path.unlink()
        elif rest != dep.vms:
            write_record(path, Deployment(dep.system, dep.digest, rest, dep.deployed))
    if not exists(store, meta.name):
        write_node(store, meta)
    write_record(
        node_dir(store, meta.name) / Deployment.FILE,
        Deployment(meta.name, digest, tuple(vm.name for vm in meta.vms), now_iso()),
    )


# -- making nodes ------------------------------------------------------------------------------
def _freeze(store: Store, vm: str, message: str) -> SystemVM:
    """Snapshot ``vm`` (its upper layer becomes a layer; nothing changed: it keeps its top
    layer) and say it as a system VM: its top layer, MAC, resources."""
    snap_mod.snapshot(store, vm, message)
    inst = inst_mod.load(store, vm)
    return SystemVM(
        name=inst.name,
        layer=snap_mod.node(store, inst).diff_id,
        mac=inst.mac,
        hypervisor=inst.hypervisor,
        memory=inst.memory,
        vcpus=inst.vcpus,
        size=inst.size,
        nic_name=inst.nic_name,
    )


def _new_node(
    store: Store, name: str, parent: str | None, vms: Sequence[str], message: str
) -> SystemMeta:
    check_name(name, "system")
    if not vms:
        raise UsageError(f"system {name} needs at least one VM (--instance VM)")
    if len(vms) > MAX_VMS:
        raise UsageError(f"a system has at most {MAX_VMS} VMs, not {len(vms)}")
    dup = sorted({v for v in vms if list(vms).count(v) > 1})
    if dup:
        raise UsageError(f"VM {dup[0]} is named twice; name each VM of system {name} once")
    with store.lock("systems", wait=False, purpose=f"system node {name}"):
        if exists(store, name):
            raise Conflict(f"system {name} exists; pick another name")
        for vm in vms:
            inst_mod.load(store, vm)  # every VM exists before any is snapshotted
        frozen = tuple(_freeze(store, vm, message or f"system {name}") for vm in vms)
        meta = SystemMeta(name, parent, now_iso(), message, frozen)
        write_node(store, meta)
    return meta


def create(store: Store, name: str, vms: Sequence[str], message: str = "") -> SystemMeta:
    """``system create NAME --instance VM...``: a root node of the system tree."""
    return _new_node(store, name, None, vms, message)


def snapshot(store: Store, name: str, child: str, message: str = "") -> SystemMeta:
    """``system snapshot NAME --as CHILD``: every VM of NAME snapshotted, CHILD points at
    each VM's new layer (or its old one, when it changed nothing)."""
    node = get(store, name)
    return _new_node(store, child, name, [vm.name for vm in node.vms], message)
