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
VMs it runs (``running_chains``: there for free, counted with its VMs). A layer is never
split (``split_parts = 1``; the servers file may not ask for splits): the cache keeps layers
whole, so a split plan could not be applied. A VM's ``image`` is
its U size, ``cpu`` its vCPUs, ``memory`` its memory.
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


@dataclass(frozen=True)
class StoreCluster:
    cluster: Cluster
    diff_id: Mapping[str, str]  # cluster layer name -> diff_id
    vms: Mapping[str, SystemVM]  # the system's VMs by name


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
    unknown = sorted(set(doc) - {"server", "placement"})
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r}; allowed: placement, server")
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
    for key in ("split_parts", "split_min"):
        if key in settings and not (key == "split_parts" and settings[key] == 1):
            raise UsageError(
                f"{source}: [placement] {key}: a host's layer cache keeps layers whole, so a "
                "plan from the store never splits a layer (docs/placement.md); remove it"
            )
    settings["split_parts"] = 1  # never split: 'apply placement' could not realize it
    settings["whole_chains"] = True
    settings["running_chains"] = True
    cluster = parse_doc(
        {"server": plain, "vm": vms, "layer": list(layers.values()), "placement": settings},
        source,
    )
    return StoreCluster(cluster, diff_ids, by_name)
