"""The placement model (pure): a cluster read from TOML, validated, and the evaluation of any
plan against it. No files, no programs: the CLI reads the file and hands the text here.

A cluster is servers (disk and four resource capacities), the VMs running on them (each with
its needs and its top layer) and the layers (size, parent): a VM needs its top layer and every
parent of it, its *chain*. A layer at least ``split_min`` bytes large is modelled as
``split_parts`` equal parts (the seed's b0/0, b0/1), each stored on one or more servers; a
smaller layer is one part. Every rule a plan must keep is checked by :func:`evaluate`, which
all the planners share, so a planner's own bookkeeping is never trusted for the figures.

Recovery transfer of a failure: for each server that takes VMs of the failed one, the parts of
those VMs' chains it does not hold, each counted once per receiving server (bytes).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from unionimg.errors import UsageError

RESOURCES: Final = ("cpu", "memory", "disk_io", "net_io")
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE: Final = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTP]?)(?:i?B)?", re.I)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
MAX_BYTES: Final = 1 << 62


class Infeasible(UsageError):
    """No placement can keep the rules with these capacities (names the binding constraint):
    the cluster the user gave is not acceptable as it is (exit 2)."""


class NoPlanFound(Infeasible):
    """A planner found no plan but nothing proves there is none (the heuristic's dead end,
    the solver's time limit): "no plan found: ..." (exit 2, as Infeasible)."""


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    disk: int
    caps: Mapping[str, float | None]  # resource -> capacity (None: not limited)


@dataclass(frozen=True, slots=True)
class VM:
    name: str
    server: str
    layer: str  # the top layer
    image: int  # disk the VM takes on a server besides its layers
    needs: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    size: int
    parent: str | None


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # "b0" (whole) or "b0/0", "b0/1"
    layer: str
    size: int


@dataclass(frozen=True, slots=True)
class Cluster:
    servers: tuple[Server, ...]
    vms: tuple[VM, ...]
    layers: tuple[Layer, ...]  # in registration order (the file's order)
    split_parts: int = 2
    split_min: int = MAX_BYTES
    transfer_kept: bool = True  # parts sent at recovery stay on the receiving server's disk
    whole_chains: bool = False  # a server keeping a layer keeps its parents (a layer cache)
    running_chains: bool = False  # a server holds the chains of the VMs it runs (counted as theirs)
    # derived (filled by cluster()):
    parts_of: Mapping[str, tuple[Part, ...]] = field(default_factory=dict)
    chain: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # vm -> layers, root first
    index: Mapping[str, object] = field(default_factory=dict)  # name -> Server/VM/Layer

    def server(self, name: str) -> Server:
        s = self.index[f"s:{name}"]
        assert isinstance(s, Server)
        return s

    def vm(self, name: str) -> VM:
        v = self.index[f"v:{name}"]
        assert isinstance(v, VM)
        return v

    def layer(self, name: str) -> Layer:
        la = self.index[f"l:{name}"]
        assert isinstance(la, Layer)
        return la

    def vms_on(self, server: str) -> tuple[VM, ...]:
        on = self.index[f"on:{server}"]
        assert isinstance(on, tuple)
        return on

    def parts(self) -> tuple[Part, ...]:
        return tuple(p for la in self.layers for p in self.parts_of[la.name])

    def chain_parts(self, vm: str) -> tuple[Part, ...]:
        return tuple(p for la in self.chain[vm] for p in self.parts_of[la])

    def needers(self, layer: str) -> tuple[str, ...]:
        n = self.index[f"n:{layer}"]
        assert isinstance(n, tuple)
        return n

    def held(self, server: str) -> frozenset[str]:
        """The parts a server holds for the VMs it runs (with ``running_chains``): there at no
        cost to a plan, counted in :meth:`running_image`."""
        h = self.index.get(f"held:{server}", frozenset())
        assert isinstance(h, frozenset)
        return h

    def running_image(self, server: str) -> int:
        """Disk the server's own VMs take: their images (and their chains, when held)."""
        held = self.index.get(f"heldb:{server}", 0)
        assert isinstance(held, int)
        return sum(v.image for v in self.vms_on(server)) + held

    def headroom(self, server: str, resource: str) -> float | None:
        """What is left of a resource on a server with its own VMs running (None: no limit)."""
        cap = self.server(server).caps.get(resource)
        if cap is None:
            return None
        return cap - sum(v.needs.get(resource, 0.0) for v in self.vms_on(server))


# -- reading --------------------------------------------------------------------------------
def parse_bytes(value: object, what: str) -> int:
    """An integer (bytes) or text like ``40G``, ``1.5T`` (binary units)."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: {value!r} is not a size; give bytes or e.g. '40G'")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        n = math.floor(float(m.group("num")) * _UNITS[m.group("unit").upper()])
    elif isinstance(value, str) and value.strip().startswith("-"):
        raise UsageError(f"{what}: negative size {value!r}; sizes are 0 or more")
    else:
        raise UsageError(f"{what}: {value!r} is not a size; give bytes or e.g. '40G'")
    if n < 0:
        raise UsageError(f"{what}: negative size {value!r}; sizes are 0 or more")
    if n > MAX_BYTES:
        raise UsageError(f"{what}: {value!r} is too large (at most 4 EiB)")
    return n


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{what}: {value!r} is not a number")
    if value < 0:
        raise UsageError(f"{what}: negative value {value!r}; capacities and needs are 0 or more")
    return float(value)


def _resource(value: object, resource: str, what: str) -> float:
    # memory is a size like the disks; the others plain numbers in the file's own units
    return float(parse_bytes(value, what)) if resource == "memory" else _number(value, what)


def _name(table: Mapping[str, object], what: str) -> str:
    name = table.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(f"{what}: 'name' must be 1-128 letters, digits or ._:@/+- (got {name!r})")
    return name


def _tables(doc: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise UsageError(f"'{key}' must be an array of tables ([[{key}]])")
    return list(items)


def _known(table: Mapping[str, object], allowed: set[str], what: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise UsageError(f"{what}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def parse_cluster(text: str, source: str = "cluster") -> Cluster:
    """The cluster of a TOML text (format: docs/placement.md), validated; UsageError (exit 2)
    for bad input, :class:`Infeasible` (a UsageError: exit 2 too, its line starting
    "infeasible:") when capacities cannot hold it even at rest."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from None
    return parse_doc(doc, source)


def parse_doc(doc: Mapping[str, object], source: str = "cluster") -> Cluster:
    """:func:`parse_cluster` of a document already read (a mapping as TOML gives)."""
    _known(doc, {"placement", "server", "vm", "layer"}, source)
    settings = doc.get("placement", {})
    if not isinstance(settings, dict):
        raise UsageError(f"{source}: [placement] must be a table")
    _known(
        settings,
        {"split_parts", "split_min", "transfer_kept", "whole_chains", "running_chains"},
        f"{source} [placement]",
    )
    kept = settings.get("transfer_kept", True)
    whole = settings.get("whole_chains", False)
    held = settings.get("running_chains", False)
    if not all(isinstance(b, bool) for b in (kept, whole, held)):
        raise UsageError(f"{source}: transfer_kept, whole_chains, running_chains are true or false")
    parts = settings.get("split_parts", 2)
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= 8:
        raise UsageError(f"{source}: split_parts must be a whole number from 1 to 8")
    split_min = parse_bytes(settings.get("split_min", MAX_BYTES), f"{source}: split_min")

    servers: list[Server] = []
    for t in _tables(doc, "server"):
        what = f"{source}: server {t.get('name')!r}"
        _known(t, {"name", "disk", *RESOURCES}, what)
        if "disk" not in t:
            raise UsageError(f"{what}: 'disk' (its capacity) is missing")
        caps = {r: (_resource(t[r], r, f"{what} {r}") if r in t else None) for r in RESOURCES}
        servers.append(Server(_name(t, "server"), parse_bytes(t["disk"], f"{what} disk"), caps))
    layers: list[Layer] = []
    for t in _tables(doc, "layer"):
        what = f"{source}: layer {t.get('name')!r}"
        _known(t, {"name", "size", "parent"}, what)
        parent = t.get("parent")
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise UsageError(f"{what}: 'parent' must be a layer's name")
        layers.append(Layer(_name(t, "layer"), parse_bytes(t.get("size"), f"{what} size"), parent))
    vms: list[VM] = []
    for t in _tables(doc, "vm"):
        what = f"{source}: VM {t.get('name')!r}"
        _known(t, {"name", "server", "layer", "image", *RESOURCES}, what)
        for key in ("server", "layer"):
            if not isinstance(t.get(key), str):
                raise UsageError(f"{what}: '{key}' (a name) is missing")
        needs = {r: _resource(t[r], r, f"{what} {r}") for r in RESOURCES if r in t}
        vms.append(
            VM(
                _name(t, "vm"),
                str(t["server"]),
                str(t["layer"]),
                parse_bytes(t.get("image", 0), f"{what} image"),
                needs,
            )
        )
    return cluster(servers, vms, layers, parts, split_min, source, kept, whole, held)


def cluster(
    servers: Sequence[Server],
    vms: Sequence[VM],
    layers: Sequence[Layer],
    split_parts: int = 2,
    split_min: int = MAX_BYTES,
    source: str = "cluster",
    transfer_kept: bool = True,
    whole_chains: bool = False,
    running_chains: bool = False,
) -> Cluster:
    """A validated cluster with its derived tables (parts, chains)."""
    for kind, names in (
        ("server", [s.name for s in servers]),
        ("VM", [v.name for v in vms]),
        ("layer", [la.name for la in layers]),
    ):
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise UsageError(f"{source}: {kind} {n!r} is listed twice; names are unique")
            seen.add(n)
    if len(servers) < 2:
        raise UsageError(f"{source}: a cluster needs at least 2 servers to survive a failure")
    by_layer = {la.name: la for la in layers}
    server_names = {s.name for s in servers}
    for la in layers:
        if la.parent is not None and la.parent not in by_layer:
            raise UsageError(f"{source}: layer {la.name!r} has unknown parent {la.parent!r}")
    for la in layers:  # a cycle: walking up from a layer comes back to it
        seen_chain = [la.name]
        cur = la.parent
        while cur is not None:
            if cur in seen_chain:
                loop = " -> ".join([*seen_chain[seen_chain.index(cur) :], cur])
                raise UsageError(f"{source}: layers' parents form a cycle: {loop}")
            seen_chain.append(cur)
            cur = by_layer[cur].parent
    chains: dict[str, tuple[str, ...]] = {}
    for v in vms:
        if v.server not in server_names:
            raise UsageError(f"{source}: VM {v.name!r} runs on unknown server {v.server!r}")
        if v.layer not in by_layer:
            raise UsageError(f"{source}: VM {v.name!r} needs unknown layer {v.layer!r}")
        up: list[str] = []
        cur2: str | None = v.layer
        while cur2 is not None:
            up.append(cur2)
            cur2 = by_layer[cur2].parent
        chains[v.name] = tuple(reversed(up))
    parts_of: dict[str, tuple[Part, ...]] = {}
    for la in layers:
        k = split_parts if la.size >= split_min and la.size >= split_parts else 1
        if k == 1:
            parts_of[la.name] = (Part(la.name, la.name, la.size),)
        else:
            base = la.size // k
            sizes = [base] * (k - 1) + [la.size - base * (k - 1)]
            parts_of[la.name] = tuple(
                Part(f"{la.name}/{i}", la.name, sz) for i, sz in enumerate(sizes)
            )
    index: dict[str, object] = {}
    for s in servers:
        index[f"s:{s.name}"] = s
        index[f"on:{s.name}"] = tuple(v for v in vms if v.server == s.name)
    for v in vms:
        index[f"v:{v.name}"] = v
    needers: dict[str, list[str]] = {la.name: [] for la in layers}
    for v in vms:
        for name in chains[v.name]:
            needers[name].append(v.name)
    for la in layers:
        index[f"l:{la.name}"] = la
        index[f"n:{la.name}"] = tuple(needers[la.name])
    if running_chains:
        psize = {p.name: p.size for ps in parts_of.values() for p in ps}
        for srv in servers:
            held = frozenset(
                p.name
                for v in vms
                if v.server == srv.name
                for la in chains[v.name]
                for p in parts_of[la]
            )
            index[f"held:{srv.name}"] = held
            index[f"heldb:{srv.name}"] = sum(psize[p] for p in held)
    c = Cluster(
        tuple(servers),
        tuple(vms),
        tuple(layers),
        split_parts,
        split_min,
        transfer_kept,
        whole_chains,
        running_chains,
        parts_of,
        chains,
        index,
    )
    at_rest(c)
    return c


def at_rest(c: Cluster) -> None:
    """Infeasible when a server cannot even run its own VMs, a VM fits no other server, the
    disk cannot hold what rule (a) forces (:func:`_least_disk`), or a failed server's VMs
    need more of a resource than the other servers have left."""
    for s in c.servers:
        for r in RESOURCES:
            left = c.headroom(s.name, r)
            if left is not None and left < 0:
                raise Infeasible(
                    f"infeasible: server {s.name} runs VMs needing {r} "
                    f"{fmt(r, (s.caps[r] or 0.0) - left)} over its {fmt(r, s.caps[r] or 0.0)} "
                    f"({r} of {s.name} is the binding constraint); move VMs or raise it"
                )
        if c.running_image(s.name) > s.disk:
            raise Infeasible(
                f"infeasible: the VM images on server {s.name} need "
                f"{gib(c.running_image(s.name))} of its {gib(s.disk)} disk (binding: disk)"
            )
    for v in c.vms:
        for r in RESOURCES:
            need = v.needs.get(r, 0.0)
            room = [c.headroom(s.name, r) for s in c.servers if s.name != v.server]
            if need and all(h is not None and h < need for h in room):
                best = max(h for h in room if h is not None)
                raise Infeasible(
                    f"infeasible: VM {v.name} needs {r} {fmt(r, need)} and no other server "
                    f"has that much left (at most {fmt(r, best)}): {r} is the binding "
                    "constraint when its server fails"
                )
    _least_disk(c)
    for f in c.servers:  # the VMs of one failed server, all together, against the others
        for r in RESOURCES:
            need = sum(v.needs.get(r, 0.0) for v in c.vms_on(f.name))
            rooms = [c.headroom(s.name, r) for s in c.servers if s.name != f.name]
            if need and None not in rooms and sum(h or 0.0 for h in rooms) < need:
                raise Infeasible(
                    f"infeasible: when server {f.name} fails its VMs need {r} {fmt(r, need)} "
                    f"and the other servers have {fmt(r, sum(h or 0.0 for h in rooms))} left "
                    f"({r} is the binding constraint)"
                )


def _least_disk(c: Cluster) -> None:
    """Infeasible when the disk cannot hold what rule (a) forces, whatever the plan: in all,
    one copy of every part (two where every server runs a VM needing it; none beyond the
    held chains where servers running its VMs hold it for each other) against the servers'
    disk left beside their VMs; and per failed server f, its VMs' images with one copy off
    f of each part of their chains (rule (a): not held by another server) against the
    other servers' disk left."""
    free = {s.name: s.disk - c.running_image(s.name) for s in c.servers}
    runs: dict[str, set[str]] = {}  # part -> servers running a VM that needs it
    for v in c.vms:
        for p in c.chain_parts(v.name):
            runs.setdefault(p.name, set()).add(v.server)
    least = 0
    for p in c.parts():
        r = runs.get(p.name, set())
        if c.running_chains:
            copies = 0 if len(r) >= 2 else 1
        else:
            copies = 2 if len(r) == len(c.servers) else 1
        least += copies * p.size
    have = sum(free.values())
    if least > have:
        raise Infeasible(
            f"infeasible: the layers need at least {gib(least)} stored (a copy of each part, "
            "two where every server runs a VM needing it: rule (a)) and the servers have "
            f"{gib(have)} of disk left beside their VMs (disk is the binding constraint)"
        )
    for f in c.servers:
        vms = c.vms_on(f.name)
        if not vms:
            continue
        images = sum(v.image for v in vms)
        parts = {p.name: p.size for v in vms for p in c.chain_parts(v.name)}
        off = sum(n for name, n in parts.items() if not runs.get(name, set()) - {f.name})
        if not c.running_chains:
            off = sum(parts.values())
        room = sum(n for s, n in free.items() if s != f.name)
        if images + off > room:
            raise Infeasible(
                f"infeasible: when server {f.name} fails its VMs' images ({gib(images)}) and "
                f"a copy of their chains off {f.name} (rule (a), {gib(off)}) need "
                f"{gib(images + off)} of disk and the other servers have {gib(room)} left "
                "beside their VMs (disk is the binding constraint)"
            )


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n % (1 << 30) else f"{int(n) >> 30} GiB"


def fmt(resource: str, value: float) -> str:
    return gib(value) if resource == "memory" else f"{value:g}"


# -- plans and their evaluation ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Plan:
    """Where each part is stored (its copies) and, per failed server, where each of its VMs
    recovers; ``reasons`` one line per decision; the solver's bound when it has one."""

    method: str
    objective: str
    stores: Mapping[str, frozenset[str]]  # part name -> servers holding a copy
    recovery: Mapping[str, Mapping[str, str]]  # failed server -> VM -> target server
    reasons: tuple[str, ...] = ()
    status: str = "heuristic"  # optimal | feasible | heuristic | infeasible
    bound: int | None = None  # a proven lower bound of the objective (bytes), if any
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class TargetLoad:
    server: str
    vms: tuple[str, ...]
    missing: tuple[str, ...]  # parts sent to it
    bytes: int
    over: tuple[str, ...]  # resources over capacity ("" when it fits)


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    server: str
    targets: tuple[TargetLoad, ...]
    lost: tuple[str, ...]  # parts no surviving server holds
    unplaced: tuple[str, ...]  # VMs with no target

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.targets)

    @property
    def restartable(self) -> bool:
        return not self.lost and not self.unplaced and not any(t.over for t in self.targets)


@dataclass(frozen=True, slots=True)
class Evaluation:
    failures: tuple[FailureOutcome, ...]
    stored: Mapping[str, int]  # server -> bytes of parts stored
    violations: tuple[str, ...]  # rule (a) and at-rest disk

    @property
    def worst(self) -> int:
        return max((f.bytes for f in self.failures), default=0)

    @property
    def total(self) -> int:
        return sum(f.bytes for f in self.failures)

    @property
    def ok(self) -> bool:
        return not self.violations and all(f.restartable for f in self.failures)

    def failure(self, server: str) -> FailureOutcome:
        return next(f for f in self.failures if f.server == server)


def stored_bytes(c: Cluster, stores: Mapping[str, frozenset[str]]) -> dict[str, int]:
    size = {p.name: p.size for p in c.parts()}
    out = {s.name: 0 for s in c.servers}
    for part, where in stores.items():
        for s in where:
            if part not in c.held(s):  # held for its own VMs: counted in running_image
                out[s] += size[part]
    return out


def with_held(c: Cluster, stores: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """``stores`` with the parts each server holds for its own VMs (``running_chains``)."""
    out = dict(stores)
    if c.running_chains:
        for s in c.servers:
            for p in c.held(s.name):
                out[p] = out.get(p, frozenset()) | {s.name}
    return out


def load_of(
    c: Cluster,
    stores: Mapping[str, frozenset[str]],
    failed: str,
    target: str,
    vms: Sequence[str],
    stored: Mapping[str, int],
) -> TargetLoad:
    """What taking ``vms`` (of failed server ``failed``) does to ``target``."""
    need = {p.name: p.size for v in vms for p in c.chain_parts(v)}
    missing = tuple(sorted(p for p in need if target not in stores.get(p, frozenset())))
    moved = sum(need[p] for p in missing)
    over: list[str] = []
    for r in RESOURCES:
        left = c.headroom(target, r)
        if left is not None and sum(c.vm(v).needs.get(r, 0.0) for v in vms) > left + 1e-9:
            over.append(r)
    disk = (
        c.running_image(target)
        + stored[target]
        + (moved if c.transfer_kept else 0)
        + sum(c.vm(v).image for v in vms)
    )
    if disk > c.server(target).disk:
        over.append("disk")
    return TargetLoad(target, tuple(vms), missing, moved, tuple(over))


def evaluate(c: Cluster, plan: Plan) -> Evaluation:
    """Every rule checked and every failure's transfer counted, from the plan alone."""
    if c.running_chains:
        plan = Plan(
            plan.method,
            plan.objective,
            with_held(c, plan.stores),
            plan.recovery,
            plan.reasons,
            plan.status,
            plan.bound,
            plan.seconds,
        )
    stored = stored_bytes(c, plan.stores)
    violations: list[str] = []
    for s in c.servers:
        if c.running_image(s.name) + stored[s.name] > s.disk:
            violations.append(f"server {s.name}: stored layers exceed its disk")
    if c.whole_chains:  # a layer kept without its parent cannot be used (a layer cache)
        for la in c.layers:
            if la.parent is None:
                continue
            for pt in c.parts_of[la.name]:
                for pp in c.parts_of[la.parent]:
                    lacking = plan.stores.get(pt.name, frozenset()) - plan.stores.get(
                        pp.name, frozenset()
                    )
                    for where in sorted(lacking):
                        violations.append(
                            f"server {where} keeps {pt.name} without its parent {pp.name}"
                        )
    for v in c.vms:  # rule (a): a copy of each part off the VM's own server
        for p in c.chain_parts(v.name):
            if not plan.stores.get(p.name, frozenset()) - {v.server}:
                violations.append(f"part {p.name} needed by VM {v.name} is only on its server")
    failures: list[FailureOutcome] = []
    for f in c.servers:
        rec = plan.recovery.get(f.name, {})
        by_target: dict[str, list[str]] = {}
        unplaced: list[str] = []
        for v in c.vms_on(f.name):
            t = rec.get(v.name)
            if t is None or t == f.name:
                unplaced.append(v.name)
            else:
                by_target.setdefault(t, []).append(v.name)
        targets = tuple(
            load_of(c, plan.stores, f.name, t, vs, stored) for t, vs in sorted(by_target.items())
        )
        lost = sorted(
            {
                p
                for t in targets
                for p in t.missing
                if not plan.stores.get(p, frozenset()) - {f.name}
            }
        )
        failures.append(FailureOutcome(f.name, targets, tuple(lost), tuple(unplaced)))
    return Evaluation(tuple(failures), stored, tuple(violations))


def explain(c: Cluster, p: Plan, ev: Evaluation) -> tuple[str, ...]:
    """One line per stored layer (or part) and per VM's recovery target, read off the plan:
    which rule or which saving chose it. For plans whose choices carry no reasons of their
    own (the exact solver's, the heuristic's local search) and for the heuristic's passes
    alike, so every optimizing planner explains its plan the same way."""
    lines: list[str] = []
    # which VMs recover on each server, per failure: a layer kept there serves those of them
    # whose chain holds it
    on_target: dict[str, list[tuple[str, str]]] = {}  # target -> [(failed, VM)]
    for f, rec in sorted(p.recovery.items()):
        for v, to in rec.items():
            on_target.setdefault(to, []).append((f, v))
    for la in c.layers:
        parts = c.parts_of[la.name]
        groups = {p.stores.get(pt.name, frozenset()) for pt in parts}
        items = (
            [(la.name, parts[0].name)] if len(groups) == 1 else [(pt.name, pt.name) for pt in parts]
        )
        for shown_name, part in items:
            where = sorted(p.stores.get(part, frozenset()))
            runs = sorted({c.vm(v).server for v in c.needers(la.name)})
            users: list[str] = []
            for s in where:
                by_failure: dict[str, list[str]] = {}
                for f, v in on_target.get(s, ()):
                    if la.name in c.chain[v]:
                        by_failure.setdefault(f, []).append(v)
                users += [
                    f"{', '.join(sorted(vs))} on {s} when {f} fails"
                    for f, vs in sorted(by_failure.items())
                ]
            if not c.needers(la.name):
                kept = "kept once" if len(where) == 1 else f"kept on {len(where)} servers"
                lines.append(f"{shown_name} on {', '.join(where)}: no VM needs it; {kept}")
            elif users:
                rule = (
                    "every server runs one of its VMs: a copy besides each one's own (a)"
                    if len(runs) == len(c.servers)
                    else f"not only on {', '.join(runs)} where its VMs run (a)"
                )
                lines.append(
                    f"{shown_name} on {', '.join(where)}: {rule}; found in place by "
                    f"{'; '.join(users)} (objective)"
                )
            else:
                lines.append(
                    f"{shown_name} on {', '.join(where)}: the copy off {', '.join(runs)} where its"
                    " VMs run (a); the VMs recover elsewhere and get it sent"
                )
    for fo in ev.failures:
        for t in fo.targets:
            for v in t.vms:
                vm = c.vm(v)
                tight = min(
                    (
                        (r, (c.headroom(t.server, r) or 0.0))
                        for r in RESOURCES
                        if c.headroom(t.server, r) is not None and vm.needs.get(r)
                    ),
                    key=lambda rl: rl[1],
                    default=None,
                )
                res = (
                    f"{tight[0]} {fmt(tight[0], tight[1])} left there"
                    if tight
                    else "no resource limit there"
                )
                lacks = [pt.name for pt in c.chain_parts(v) if pt.name in t.missing]
                lines.append(
                    f"{fo.server} fails: VM {v} -> {t.server} ({res}; "
                    + (f"lacks {', '.join(lacks)})" if lacks else "holds its whole chain)")
                )
    return tuple(lines)
