"""Placement made real: ``apply placement`` copies each host's planned layers to it (pushed
to a registry, pulled by the host over SSH: only what it lacks), then removes from each host
the layers the previous placement kept there and this one does not (unless a VM of that host
uses them: :func:`drop_here`, run there as ``apply placement --here --drop``), and records the
placement. A layer the plan splits is kept as byte ranges of its blob on the hosts given
only some of its parts (:mod:`unionimg.placement.parts`: fetched by HTTP Range, checked
against the sha256 the controller computed, removed when no longer planned there);
``recover VM --on HOST`` makes the VM on HOST from the layers already there (its base
generations made from the cached layers, no ``base create``, a fresh U with the VM's MAC),
boots it if asked, and plans again without the failed server so that a second failure is
covered too (the seed's step 3.2(2)), applying that plan. The failed server's other VMs are
then pending (the servers file kept in the record lists them, with their failed server):
recovering one of them later takes that failed server, on any host.

The host side of ``recover`` is :func:`recover_here` (``unionimg recover VM --here``, run on
the host over SSH by the controller).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unionimg import hosts as hosts_mod
from unionimg.errors import Conflict, NotFound, UnionimgError, UsageError
from unionimg.layers import base as base_mod
from unionimg.layers import layerstore, snapshot
from unionimg.placement import parts as parts_mod
from unionimg.placement import planner
from unionimg.placement.fromstore import (
    Pending,
    StoreCluster,
    cluster_from_system,
    layer_name,
    pending_of,
)
from unionimg.placement.model import Cluster, Plan, evaluate
from unionimg.registry import hostcache
from unionimg.registry.client import Registry
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.placement_records import PlacedHost, PlacementApplied, PlannedRecovery

APPLY_TIMEOUT = 3600.0  # one host's pull of its planned layers


def record_path(store: Store) -> Path:
    return store.root / "placement" / PlacementApplied.FILE


def applied(store: Store) -> PlacementApplied:
    path = record_path(store)
    if not path.exists():
        raise NotFound("no placement was applied in this store; run 'unionimg apply placement'")
    return read_record(path, PlacementApplied)


@dataclass
class ApplyReport:
    system: str
    plan: dict[str, Any]
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"system": self.system, "plan": self.plan, "hosts": self.hosts}


def _kept(
    c: Cluster, p: Plan, sc: StoreCluster
) -> tuple[dict[str, list[str]], dict[str, dict[str, list[int]]]]:
    """Per server, the diff_ids the plan keeps there whole (all of a layer's parts: its layer
    cache holds it) and, per split layer of which it keeps only some parts, their indexes (its
    parts area holds those byte ranges of the blob)."""
    out: dict[str, list[str]] = {s.name: [] for s in c.servers}
    split: dict[str, dict[str, list[int]]] = {s.name: {} for s in c.servers}
    for la in c.layers:
        where = [p.stores.get(pt.name, frozenset()) for pt in c.parts_of[la.name]]
        for s in sorted(frozenset().union(*where)):
            have = [k for k, w in enumerate(where) if s in w]
            if c.running_chains and c.parts_of[la.name][0].name in c.held(s):
                have = list(range(len(where)))  # a VM of s uses it: in its cache, whole
            if len(have) == len(where):
                out[s].append(sc.diff_id[la.name])
            else:
                split[s][sc.diff_id[la.name]] = have
    return out, split


def _tops(store: Store, diff_ids: Sequence[str]) -> list[str]:
    """The layers of a closed set that are no other's parent: pulling them brings the rest."""
    parents = {layerstore.get(store, d).parent for d in diff_ids}
    return [d for d in diff_ids if d not in parents]


def apply(
    store: Store,
    system: str,
    servers_text: str,
    url: str,
    *,
    method: str = "auto",
    objective: str = "worst",
    time_limit: float = 30.0,
    source: str = "servers file",
    recovered: Sequence[str] = (),
) -> ApplyReport:
    """Plan system ``system`` over the servers (hosts) and copy each host's layers to it."""
    sc = cluster_from_system(store, system, servers_text, source)
    c = sc.cluster
    p = planner.plan(c, method, objective, time_limit)
    ev = evaluate(c, p)
    if not ev.ok:
        problem = ev.violations[0] if ev.violations else "a failure is not recoverable"
        raise Conflict(
            f"the {p.method} plan breaks the placement rules ({problem}); nothing was copied: "
            "plan with --method exact or heuristic"
        )
    kept, split = _kept(c, p, sc)
    hosts = {s: hosts_mod.get(store, s) for s in kept}  # every server a registered host
    report = ApplyReport(system, planner.summary(c, p, ev))
    tops = {s: _tops(store, d) for s, d in kept.items()}
    split_layers = sorted({d for per in split.values() for d in per})
    blob_parts = {
        d: parts_mod.blob_parts(store, d, len(c.parts_of[layer_name(d)])) for d in split_layers
    }
    with Registry(url) as reg:
        for top in dict.fromkeys([*(t for ts in tops.values() for t in ts), *split_layers]):
            hostcache.push_layers(store, reg, top)
    before = _previous(store)
    before_parts = parts_mod.read(store)[1]
    for s, host in hosts.items():
        pulled = 0
        for top in tops[s]:
            out = host.run_json(["pull", top, "--registry", url], timeout=APPLY_TIMEOUT)
            pulled += int(out.get("bytes_pulled", 0)) if isinstance(out, dict) else 0
        report.hosts[s] = {"layers": kept[s], "bytes_pulled": pulled}
        wanted = _wanted(blob_parts, split[s])
        if wanted:
            out = host.run_json(
                ["apply", "placement", "--here", "--parts", _parts_arg(wanted), "--registry", url],
                timeout=APPLY_TIMEOUT,
                what="fetching blob parts",
            )
            got = int(out.get("bytes_fetched", 0)) if isinstance(out, dict) else 0
            report.hosts[s]["bytes_pulled"] = pulled + got
        report.hosts[s]["parts"] = [
            f"{d[7:19]}/{k}" for d, ix in sorted(split[s].items()) for k in ix
        ]
        report.hosts[s]["part_bytes"] = sum(x.size for x in wanted)
    # then what the previous placement kept on a host and this one does not goes (the new
    # copies are in place first, so rule (a) holds throughout); a layer a VM of that host
    # uses stays (the host's own references decide)
    for s, host in hosts.items():
        gone = _children_first(store, [d for d in before.get(s, ()) if d not in kept[s]])
        dropped: dict[str, Any] = {"removed": [], "in_use": {}, "bytes_freed": 0}
        if gone:
            args = ["apply", "placement", "--here"]
            for d in gone:
                args += ["--drop", d]
            out = host.run_json(args, timeout=APPLY_TIMEOUT, what="removing layers")
            if isinstance(out, dict):
                dropped = {k: out.get(k, dropped[k]) for k in dropped}
        report.hosts[s].update(dropped)
        if before_parts.get(s) or split[s]:  # parts no longer planned here go too
            wanted = _wanted(blob_parts, split[s])
            args = ["apply", "placement", "--here", "--parts", _parts_arg(wanted), "--prune"]
            out = host.run_json(args, timeout=APPLY_TIMEOUT, what="removing blob parts")
            if isinstance(out, dict):
                report.hosts[s]["parts_removed"] = out.get("parts_removed", [])
    parts_mod.write(store, blob_parts, split)
    rec = PlacementApplied(
        system=system,
        registry=url,
        created=now_iso(),
        method=p.method,
        status=p.status,
        worst=ev.worst,
        total=ev.total,
        servers=servers_text,
        hosts=tuple(PlacedHost(s, tuple(d)) for s, d in kept.items()),
        recovery=tuple(
            PlannedRecovery(f.server, v, t.server, t.bytes)
            for f in ev.failures
            for t in f.targets
            for v in t.vms
        ),
        recovered=tuple(recovered),
    )
    path = record_path(store)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_record(path, rec)
    return report


def _wanted(
    blob_parts: Mapping[str, Sequence[parts_mod.BlobPart]], split: Mapping[str, Sequence[int]]
) -> list[parts_mod.BlobPart]:
    return [blob_parts[d][k] for d, ix in sorted(split.items()) for k in ix]


def _parts_arg(parts: Sequence[parts_mod.BlobPart]) -> str:
    return json.dumps([x.to_json() for x in parts], separators=(",", ":"), sort_keys=True)


def parts_from_arg(text: str) -> list[parts_mod.BlobPart]:
    """The ``--parts`` JSON the controller hands a host (a list of blob parts)."""
    try:
        rows = json.loads(text)
    except ValueError:
        raise UsageError("--parts: not JSON (it is given by the controller)") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError("--parts: a JSON list of blob parts")
    return [parts_mod.BlobPart.from_json(r, "--parts") for r in rows]


def _previous(store: Store) -> dict[str, tuple[str, ...]]:
    """Per host, the layers the placement applied before this one kept there (none when no
    placement was applied)."""
    if not record_path(store).exists():
        return {}
    return {h.host: h.layers for h in applied(store).hosts}


def _children_first(store: Store, diff_ids: Sequence[str]) -> list[str]:
    """``diff_ids`` ordered so a layer comes before its parent (deepest chains first): a
    child removed first frees its parent."""

    def depth(d: str) -> int:
        try:
            return len(layerstore.chain(store, d))
        except UnionimgError:
            return 0

    return sorted(diff_ids, key=lambda d: (-depth(d), d))


DIFF_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")


def drop_here(store: Store, diff_ids: Sequence[str]) -> dict[str, Any]:
    """On a host: remove layers ``diff_ids`` (in the order given: children first) from this
    store's layer cache, each unless something here uses it (an instance's chain, a base
    generation, a child layer still kept, a system node): those are kept and said why. A
    layer not here is skipped."""
    removed: list[str] = []
    in_use: dict[str, list[str]] = {}
    freed = 0
    for d in diff_ids:
        if not DIFF_ID_RE.fullmatch(d):
            raise UsageError(f"--drop {d!r}: not a layer's diff_id (sha256:<64 hex digits>)")
    for d in diff_ids:
        if not layerstore.has(store, d):
            continue
        layer = layerstore.get(store, d)
        try:
            layerstore.remove(store, layer)
        except Conflict:
            in_use[d] = layerstore.references(store).get(d, [])
            continue
        removed.append(d)
        freed += layer.meta.image_size + layer.meta.blob_size
    return {"removed": removed, "in_use": in_use, "bytes_freed": freed}


# -- recovery -------------------------------------------------------------------------------
def make_generations(store: Store, top: str) -> list[str]:
    """The base generations under layer ``top``'s chain that this store lacks, made from the
    layers in its cache (bottom first), as a deploy makes them; their names."""
    made: list[str] = []
    for layer in reversed(layerstore.chain(store, top)):
        m = layer.meta
        if m.kind == "snapshot":
            continue
        if m.base is None or m.generation is None:
            raise Conflict(f"layer {layer.short} is a {m.kind} layer naming no base; refused")
        try:
            base_mod.get_generation(store, m.base, m.generation)
            continue
        except NotFound:
            pass
        parent = None
        if m.kind == "delta":
            below = layerstore.get(store, m.parent or "").meta
            if below.base != m.base or below.generation is None:
                raise Conflict(f"delta layer {layer.short} lies on no generation of {m.base}")
            parent = base_mod.get_generation(store, m.base, below.generation)
        base_mod.generation_from_layer(store, m.base, m.generation, layer, parent=parent)
        made.append(f"{m.base}/{m.generation}")
    return made


def recover_here(
    store: Store, name: str, layer: str, vm: Mapping[str, Any], *, boot: bool = False
) -> dict[str, Any]:
    """On the recovering host: VM ``name`` made from layer ``layer`` (and its chain) already
    in this store's cache — nothing is fetched — and booted with ``boot``."""
    if not layerstore.has(store, layer):
        raise NotFound(f"layer {layer[:19]} is not in this host's cache; nothing was made")
    made = make_generations(store, layer)
    snapshot.create_from(store, name, layer, **vm)
    out: dict[str, Any] = {"vm": name, "generations_made": made, "booted": False}
    if boot:
        # deferred on purpose: the boot controller pulls the hypervisor drivers
        from unionimg.boot import control

        control.boot(store, name)
        out["booted"] = True
    return out


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise UsageError(f"servers file: cannot keep value {v!r}")


def servers_after(
    servers_text: str,
    failed: str,
    moved: Mapping[str, str],
    pending: Sequence[Pending] = (),
) -> str:
    """The servers file without server ``failed``, each VM of ``moved`` running on its new
    server, and ``pending`` (the failed servers' VMs not recovered yet) as its ``pending``
    entries."""
    import tomllib

    doc = tomllib.loads(servers_text)
    lines = ["server = ["]
    for s in doc.get("server", []):
        if s.get("name") == failed:
            continue
        s = dict(s)
        runs = [v for v in s.get("runs", []) if v not in moved]
        runs += [v for v, t in moved.items() if t == s.get("name")]
        s["runs"] = runs
        lines.append("  { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in s.items()) + " },")
    lines.append("]")
    if pending:
        lines.append("pending = [")
        for pe in pending:
            row = {"vm": pe.vm, "failed": pe.failed, "target": pe.target, "bytes": pe.bytes}
            lines.append(
                "  { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in row.items()) + " },"
            )
        lines.append("]")
    if "placement" in doc:
        lines.append("[placement]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in doc["placement"].items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RecoveryStep:
    """What ``recover VM --on HOST`` does to the record: the VM's failed server, what the
    plan said for it, and the servers file a re-plan starts from."""

    failed: str
    planned_target: str | None
    planned_bytes: int | None
    was_pending: bool  # a VM of a server that failed before, left by an earlier re-plan
    servers_after: str  # the VM on HOST, the failed server gone, the VMs still pending


def recovery_step(rec: PlacementApplied, vm: str, host: str) -> RecoveryStep:
    """Which server of the applied placement VM ``vm`` recovers from when made on ``host``.

    A VM still pending recovery (its server failed and an earlier ``recover`` re-planned,
    assuming it runs on its planned target) recovers from that failed server: on its planned
    target or any other server, no healthy server dropped. Any other VM's server is taken as
    failed now: its other VMs become pending, assumed on their planned targets, and a VM
    already pending on that server moves on to this plan's target for it."""
    import tomllib

    doc = tomllib.loads(rec.servers)
    pending = pending_of(doc, "the applied placement")
    runs = {v: str(s.get("name")) for s in doc.get("server", []) for v in s.get("runs", [])}
    if host not in {h.host for h in rec.hosts}:
        raise NotFound(f"host {host} is not a server of the applied placement")
    if vm not in runs:
        raise NotFound(f"VM {vm} runs on no server of the applied placement")
    if vm in pending:
        pe = pending[vm]
        rest = [q for q in pending.values() if q.vm != vm]
        after = servers_after(rec.servers, pe.failed, {vm: host}, rest)
        return RecoveryStep(pe.failed, pe.target, pe.bytes, True, after)
    failed = runs[vm]
    if failed == host:
        if f"{vm}@{host}" in rec.recovered:
            raise UsageError(f"VM {vm} was already recovered on {host} (the placement record)")
        raise UsageError(f"VM {vm} ran on {host}; recover it on another server")
    planned = next((r for r in rec.recovery if r.vm == vm and r.failed == failed), None)
    others = {r.vm: r for r in rec.recovery if r.failed == failed and r.vm != vm}
    moved = {vm: host, **{v: r.target for v, r in others.items()}}
    rest = [
        Pending(q.vm, q.failed, others[q.vm].target, others[q.vm].bytes) if q.vm in others else q
        for q in pending.values()
    ]
    rest += [Pending(v, failed, r.target, r.bytes) for v, r in others.items() if v not in pending]
    return RecoveryStep(
        failed,
        planned.target if planned else None,
        planned.bytes if planned else None,
        False,
        servers_after(rec.servers, failed, moved, rest),
    )


def recover(
    store: Store,
    vm: str,
    host_name: str,
    *,
    boot: bool = False,
    replan: bool = True,
    method: str = "auto",
    time_limit: float = 30.0,
) -> dict[str, Any]:
    """VM ``vm`` (of the applied placement's system) made on ``host_name`` from the layers
    the placement keeps there (pulled first only if the host lacks some: the plan said so; a
    split layer's blob first made there from the parts it holds and the ranges it lacks,
    fetched by range, its digest checked: :func:`parts.assemble_here`);
    then, with ``replan``, the placement planned and applied again without the VM's failed
    server (the VM now runs on ``host_name``; the failed server's other VMs, pending, are
    assumed on their planned targets until recovered: :func:`recovery_step`)."""
    rec = applied(store)
    sc = cluster_from_system(store, rec.system, rec.servers, "the applied placement")
    if vm not in sc.vms:
        raise NotFound(f"VM {vm} is not in system {rec.system} of the applied placement")
    step = recovery_step(rec, vm, host_name)
    held = {h.host: set(h.layers) for h in rec.hosts}
    meta = sc.vms[vm]
    chain = [la.diff_id for la in layerstore.chain(store, meta.layer)]
    lacking = [d for d in chain if d not in held[host_name]]
    host = hosts_mod.get(store, host_name)
    pulled = 0
    # a lacking layer the placement split: its blob made on the host from the parts it
    # holds and the ranges it lacks (fetched by range), checked, then imported by the pull
    split_layers, split_held = parts_mod.read(store)
    assembled: list[dict[str, Any]] = []
    planned_range_bytes = 0
    for d in lacking:
        if d in split_layers:
            held_ix = set(split_held.get(host_name, {}).get(d, []))
            planned_range_bytes += sum(x.size for x in split_layers[d] if x.index not in held_ix)
            args = ["apply", "placement", "--here", "--assemble"]
            args += ["--parts", _parts_arg(split_layers[d]), "--registry", rec.registry]
            out = host.run_json(args, timeout=APPLY_TIMEOUT, what=f"assembling {d[:19]}")
            if isinstance(out, dict):
                assembled.append(out)
    ranges_fetched = sum(int(a.get("bytes_fetched", 0)) for a in assembled)
    if lacking:
        out = host.run_json(["pull", meta.layer, "--registry", rec.registry])
        pulled = int(out.get("bytes_pulled", 0)) if isinstance(out, dict) else 0
    args = [
        "recover", vm, "--here", "--layer", meta.layer, "--mac", meta.mac,
        "--hypervisor", meta.hypervisor, "--memory", str(meta.memory),
        "--vcpus", str(meta.vcpus), "--size", str(meta.size), "--nic-name", meta.nic_name,
    ]  # fmt: skip
    if boot:
        args.append("--boot")
    made = host.run_json(args, timeout=600.0, what=f"recovering {vm}")
    result: dict[str, Any] = {
        "vm": vm,
        "host": host_name,
        "failed": step.failed,
        "was_pending": step.was_pending,
        "planned_target": step.planned_target,
        "planned_bytes": step.planned_bytes,
        "layers_lacking": lacking,
        "bytes_pulled": pulled,
        "split_layers": [a.get("blob") for a in assembled],
        "range_bytes_fetched": ranges_fetched,
        "planned_range_bytes": planned_range_bytes,
        "made": made,
    }
    if replan:
        again = apply(
            store,
            rec.system,
            step.servers_after,
            rec.registry,
            method=method,
            time_limit=time_limit,
            source="the servers after the failure",
            recovered=(*rec.recovered, f"{vm}@{host_name}"),
        )
        result["replan"] = again.to_json()
    return result
