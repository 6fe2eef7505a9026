"""A cluster taken from the store: the VMs of a system node (their chains of layers, their
resources) placed on the servers of a small servers file (hosts of ``host add``, their
capacities, which VMs each runs). Reads the store; the planning stays in the pure modules.

The servers file (TOML)::

    server = [
      { name = "h1", disk = "4G", cpu = 4, memory = "4G", runs = ["web", "db"] },
      { name = "h2", disk = "4G", cpu = 4, memory = "4G", runs = ["dns"] },
      { name = "h3", disk = "4G", cpu = 4, memory = "4G" },
    ]

Layers are named by the first 12 hex digits of their diff_id; a layer's size is what a host's
layer cache keeps of it (its image and its blob). A host keeps a layer with its parents (the
layer cache holds chains): the cluster has ``whole_chains``; a host holds the chains of the
VMs it runs (``running_chains``: there for free, counted with its VMs). A layer is not
split unless the servers file's ``[placement]`` asks (``split_parts``, 1 to
:data:`MAX_SPLIT`, and ``split_min``): a host then keeps part k of n of a layer as that byte
range of its blob (:mod:`unionimg.placement.parts`), not in its layer cache. A VM's ``image`` is
its U size, ``cpu`` its vCPUs, ``memory`` its memory.

``pending`` (written by ``recover`` when it re-plans after a failure, kept in the placement
record's copy of the file) lists the failed server's VMs not recovered yet: each runs, in the
file, on its planned target, and its failed server is no server of the file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from unionimg import systems
from unionimg.errors import UsageError
from unionimg.layers import layerstore
from unionimg.placement.model import Cluster, parse_doc
from unionimg.store.fleet_records import SystemVM
from unionimg.store.layout import Store

MAX_SPLIT = 8  # parts a layer's blob may be split into (byte ranges kept on the hosts)


@dataclass(frozen=True)
class StoreCluster:
    cluster: Cluster
    diff_id: Mapping[str, str]  # cluster layer name -> diff_id
    vms: Mapping[str, SystemVM]  # the system's VMs by name


@dataclass(frozen=True)
class Pending:
    """A VM of failed server ``failed`` not recovered yet: the re-plan that followed another
    VM's recovery assumed it runs on ``target`` (the plan had ``bytes`` sent there)."""

    vm: str
    failed: str
    target: str
    bytes: int


def pending_of(doc: Mapping[str, object], source: str = "servers file") -> dict[str, Pending]:
    """The servers file's ``pending`` entries (written by ``recover`` when it re-plans), by
    VM: ``pending = [{ vm = "db", failed = "h1", target = "h2", bytes = 0 }]``."""
    rows = doc.get("pending", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{source}: 'pending' must be an array of tables")
    out: dict[str, Pending] = {}
    for r in rows:
        if set(r) != {"vm", "failed", "target", "bytes"} or not all(
            isinstance(r[k], str) and r[k] for k in ("vm", "failed", "target")
        ):
            raise UsageError(
                f"{source}: a 'pending' entry has vm, failed, target (names) and bytes, no more"
            )
        n = r["bytes"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UsageError(f"{source}: pending VM {r['vm']!r}: bytes is a whole number >= 0")
        if r["vm"] in out:
            raise UsageError(f"{source}: VM {r['vm']!r} is pending twice")
        out[r["vm"]] = Pending(r["vm"], r["failed"], r["target"], n)
    return out


def layer_name(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")[:12]


def cluster_from_system(
    store: Store, system: str, servers_text: str, source: str = "servers file"
) -> StoreCluster:
    meta = systems.get(store, system)
    try:
        doc = tomllib.loads(servers_text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"server", "placement", "pending"})
    if unknown:
        raise UsageError(
            f"{source}: unknown key {unknown[0]!r}; allowed: pending, placement, server"
        )
    servers = doc.get("server", [])
    if not isinstance(servers, list) or not all(isinstance(s, dict) for s in servers):
        raise UsageError(f"{source}: 'server' must be an array of tables")
    runs: dict[str, str] = {}
    plain: list[dict[str, object]] = []
    for s in servers:
        names = s.get("runs", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{source}: server {s.get('name')!r}: 'runs' is a list of VM names")
        for n in names:
            if n in runs:
                raise UsageError(f"{source}: VM {n!r} runs on both {runs[n]} and {s.get('name')}")
            runs[n] = str(s.get("name"))
        plain.append({k: v for k, v in s.items() if k != "runs"})
    by_name = {vm.name: vm for vm in meta.vms}
    for n in runs:
        if n not in by_name:
            raise UsageError(f"{source}: VM {n!r} is not in system {system}")
    missing = sorted(set(by_name) - set(runs))
    if missing:
        raise UsageError(f"{source}: VM {missing[0]!r} of system {system} runs on no server")
    server_names = {str(s.get("name")) for s in servers}
    for p in pending_of(doc, source).values():
        if runs.get(p.vm) != p.target or p.failed in server_names:
            raise UsageError(
                f"{source}: pending VM {p.vm!r} must run on its planned target {p.target!r} "
                f"and its failed server {p.failed!r} be no server of the file"
            )
    layers: dict[str, dict[str, object]] = {}
    diff_ids: dict[str, str] = {}
    vms: list[dict[str, object]] = []
    for vm in meta.vms:
        chain = layerstore.chain(store, vm.layer)  # top to bottom
        for la in reversed(chain):
            name = layer_name(la.diff_id)
            diff_ids[name] = la.diff_id
            if name not in layers:
                entry: dict[str, object] = {
                    "name": name,
                    "size": max(la.meta.image_size, 0) + max(la.meta.blob_size, 0),
                }
                if la.parent is not None:
                    entry["parent"] = layer_name(la.parent)
                layers[name] = entry
        vms.append(
            {
                "name": vm.name,
                "server": runs[vm.name],
                "layer": layer_name(vm.layer),
                "image": vm.size,
                "cpu": vm.vcpus,
                "memory": vm.memory << 20,
            }
        )
    settings = dict(doc.get("placement", {}))
    parts = settings.setdefault("split_parts", 1)  # no splits unless the file asks
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= MAX_SPLIT:
        raise UsageError(
            f"{source}: [placement] split_parts must be a whole number 1 to {MAX_SPLIT}"
        )
    settings["whole_chains"] = True
    settings["running_chains"] = True
    cluster = parse_doc(
        {"server": plain, "vm": vms, "layer": list(layers.values()), "placement": settings},
        source,
    )
    return StoreCluster(cluster, diff_ids, by_name)
