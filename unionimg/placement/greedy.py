"""Greedy planners (pure): the seed's four filters, the conventional "balance free space"
baseline, and the fast heuristic for clusters too large for the exact solver; plus the
recovery assignment they share (which server takes each VM of a failed one).

Each returns a :class:`~unionimg.placement.model.Plan` whose ``reasons`` say, one line per
decision, which rule chose it; :func:`~unionimg.placement.model.evaluate` does the counting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from unionimg.placement.model import (
    RESOURCES,
    Cluster,
    Evaluation,
    Infeasible,
    NoPlanFound,
    Plan,
    evaluate,
    explain,
    gib,
    stored_bytes,
    with_held,
)


# -- shared bookkeeping ---------------------------------------------------------------------
@dataclass
class _State:
    """Stores as they are being decided, with per-server stored bytes kept current."""

    c: Cluster
    stores: dict[str, set[str]] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stored = {s.name: 0 for s in self.c.servers}
        for s in self.c.servers:  # what each server holds for its own VMs, at no cost
            for p in self.c.held(s.name):
                self.stores.setdefault(p, set()).add(s.name)
        self.room = {s.name: s.disk - self.c.running_image(s.name) for s in self.c.servers}
        self.size = {p.name: p.size for p in self.c.parts()}
        self.layer_of = {p.name: p.layer for p in self.c.parts()}

    def put(self, part: str, server: str) -> None:
        if server not in self.stores.setdefault(part, set()):
            self.stores[part].add(server)
            self.stored[server] += self.size[part]
            if self.c.whole_chains:  # its parents come along (a layer cache keeps chains)
                parent = self.c.layer(self.layer_of[part]).parent
                for pp in self.c.parts_of[parent] if parent is not None else ():
                    self.put(pp.name, server)

    def cost(self, part: str, server: str) -> int:
        """Bytes storing ``part`` on ``server`` adds (with its missing parents)."""
        if server in self.stores.get(part, ()):
            return 0
        n = self.size[part]
        parent = self.c.layer(self.layer_of[part]).parent if self.c.whole_chains else None
        while parent is not None:
            n += sum(
                pp.size
                for pp in self.c.parts_of[parent]
                if server not in self.stores.get(pp.name, ())
            )
            parent = self.c.layer(parent).parent
        return n

    def free(self, server: str) -> int:
        return self.room[server] - self.stored[server]

    def frozen(self) -> dict[str, frozenset[str]]:
        return {p: frozenset(s) for p, s in self.stores.items()}


def _fits(c: Cluster, target: str, vms: Iterable[str]) -> str:
    """The first resource (cpu, memory, disk_io, net_io) these VMs together exceed on
    ``target`` beside its own VMs, or "" when they fit."""
    vs = [c.vm(v) for v in vms]
    for r in RESOURCES:
        left = c.headroom(target, r)
        if left is not None and sum(v.needs.get(r, 0.0) for v in vs) > left + 1e-9:
            return r
    return ""


def recover(
    c: Cluster,
    stores: Mapping[str, frozenset[str] | set[str]],
    failed: str,
    prefer: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Which server takes each VM of ``failed``: biggest chains first, each to the server
    that fits it (resources and disk, with what is sent to it) and lacks the fewest bytes of
    its chain (ties: the preferred home, then most CPU left). One reason line per VM."""
    stored = stored_bytes(c, {p: frozenset(s) for p, s in stores.items()})
    size = {p.name: p.size for p in c.parts()}
    taken: dict[str, list[str]] = {s.name: [] for s in c.servers}
    missing: dict[str, set[str]] = {s.name: set() for s in c.servers}
    image: dict[str, int] = {s.name: 0 for s in c.servers}
    out: dict[str, str] = {}
    why: list[str] = []
    vms = sorted(c.vms_on(failed), key=lambda v: -sum(p.size for p in c.chain_parts(v.name)))
    for v in vms:
        best: tuple[tuple[int, int, float], str, int, str] | None = None
        for s in c.servers:
            t = s.name
            if t == failed:
                continue
            if _fits(c, t, [*taken[t], v.name]):
                continue
            lack = {p.name for p in c.chain_parts(v.name) if t not in stores.get(p.name, ())}
            add = sum(size[p] for p in lack - missing[t])
            sent = sum(size[p] for p in missing[t]) + add if c.transfer_kept else 0
            disk = c.running_image(t) + stored[t] + sent + image[t] + v.image
            if disk > s.disk:
                continue
            home = 0 if prefer is not None and prefer.get(v.name) == t else 1
            key = (add, home, -(c.headroom(t, "cpu") or 0.0))
            if best is None or key < best[0]:
                best = (key, t, add, "")
        if best is None:
            reason = next(
                (
                    r
                    for s in c.servers
                    if s.name != failed
                    for r in [_fits(c, s.name, [*taken[s.name], v.name]) or "disk"]
                ),
                "disk",
            )
            why.append(f"{failed} fails: VM {v.name} fits no server ({reason} is short)")
            continue
        _, t, add, _ = best
        taken[t].append(v.name)
        image[t] += v.image
        missing[t] |= {p.name for p in c.chain_parts(v.name) if t not in stores.get(p.name, ())}
        out[v.name] = t
        why.append(
            f"{failed} fails: VM {v.name} -> {t}: it fits there and lacks "
            + (f"{gib(add)} of its chain" if add else "nothing of its chain")
        )
    return out, why


def _recoveries(
    c: Cluster,
    stores: Mapping[str, frozenset[str] | set[str]],
    prefer: Mapping[str, str] | None = None,
) -> tuple[dict[str, dict[str, str]], list[str]]:
    rec: dict[str, dict[str, str]] = {}
    why: list[str] = []
    for f in c.servers:
        rec[f.name], w = recover(c, stores, f.name, prefer)
        why += w
    return rec, why


def _candidates(c: Cluster, layer: str) -> tuple[list[str], bool]:
    """Rule (a): servers running no VM that needs the layer; all of them (and two copies)
    when every server runs one."""
    running = {c.vm(v).server for v in c.needers(layer)}
    cand = [s.name for s in c.servers if s.name not in running]
    return (cand, False) if cand else ([s.name for s in c.servers], True)


def _reserve(c: Cluster, x: str) -> int:
    """The largest sum of images of one other server's VMs that ``x``'s resources can take
    (biggest images first)."""
    worst = 0
    for f in c.servers:
        if f.name == x:
            continue
        took: list[str] = []
        for v in sorted(c.vms_on(f.name), key=lambda v: -v.image):
            if not _fits(c, x, [*took, v.name]):
                took.append(v.name)
        worst = max(worst, sum(c.vm(v).image for v in took))
    return worst


# -- the conventional baseline ----------------------------------------------------------------
def conventional(c: Cluster) -> Plan:
    """Each layer whole on the server with the most free disk among those running no VM that
    needs it (two copies where every server runs one): free space kept even, nothing else
    known. Recovery afterwards: each VM to the server that lacks least of its chain."""
    t0 = time.monotonic()
    st = _State(c)
    reserve = {s.name: _reserve(c, s.name) for s in c.servers}
    for la in c.layers:
        cand, twice = _candidates(c, la.name)
        # "at least the VMs still start at recovery": keep room for the images a server's
        # resources let it take; the rest of the disk is balanced
        fit = [s for s in cand if st.free(s) - la.size >= reserve[s]] or cand
        order = sorted(fit, key=lambda s: -st.free(s))
        chosen = order[: 2 if twice else 1]
        for s in chosen:
            for p in c.parts_of[la.name]:
                st.put(p.name, s)
        st.reasons.append(
            f"{la.name} -> {', '.join(chosen)}: most free disk among servers running none of "
            f"its VMs ({gib(st.free(chosen[0]) + la.size)} free before)"
        )
    rec, why = _recoveries(c, st.stores)
    return Plan(
        "conventional",
        "none",
        st.frozen(),
        rec,
        tuple(st.reasons + why),
        "heuristic",
        None,
        time.monotonic() - t0,
    )


# -- the seed's method --------------------------------------------------------------------
def seed(c: Cluster) -> Plan:
    """The seed's filters, layer by layer in registration order (the file's order):
    (a) servers running no VM that needs the layer (all, with two copies, if none);
    (b) of those, servers that can still take, at any other server's failure, the VMs whose
        data they hold (their recovery home) with this layer stored; if disk is short for
        every one, the layer is split into its parts over several candidates;
    (c) of those, the server already home to most of the layer's VMs (gather shared data),
        then the one with most free disk."""
    t0 = time.monotonic()
    st = _State(c)
    home: dict[str, str] = {}

    homed: dict[str, dict[str, list[str]]] = {s.name: {} for s in c.servers}  # x -> f -> VMs

    def set_home(v: str, x: str) -> None:
        home[v] = x
        homed[x].setdefault(c.vm(v).server, []).append(v)

    def takes(x: str, extra: int, new: Iterable[str]) -> str:
        """'' if x can hold ``extra`` more bytes and be home to ``new`` VMs too, else why not."""
        groups = {f: list(vs) for f, vs in homed[x].items()}
        for v in new:
            if v not in home:
                groups.setdefault(c.vm(v).server, []).append(v)
        worst_image = 0
        for f, group in groups.items():
            if f == x:
                continue
            short = _fits(c, x, group)
            if short:
                return short
            worst_image = max(worst_image, sum(c.vm(v).image for v in group))
        return "disk" if st.free(x) - extra - worst_image < 0 else ""

    for la in c.layers:
        needers = c.needers(la.name)
        cand, twice = _candidates(c, la.name)
        homeless = [v for v in needers if v not in home]
        if not needers:
            s = max(cand, key=st.free)
            for p in c.parts_of[la.name]:
                st.put(p.name, s)
            st.reasons.append(f"{la.name} -> {s}: no VM needs it; most free disk")
            continue
        ok = [x for x in cand if not takes(x, la.size, homeless)]
        if ok:
            gathered = {x: sum(1 for v in needers if home.get(v) == x) for x in ok}
            ok.sort(key=lambda x: (-gathered[x], -st.free(x)))
            chosen = ok[: 2 if twice else 1]
            for x in chosen:
                for p in c.parts_of[la.name]:
                    st.put(p.name, x)
            for v in homeless:
                set_home(v, chosen[0])
            why = (
                f"(c) home of {gathered[chosen[0]]} of its VMs"
                if gathered[chosen[0]]
                else "(c) most free disk"
            )
            st.reasons.append(
                f"{la.name} -> {', '.join(chosen)}: (a) runs none of its VMs"
                + (" (every server runs one: two copies)" if twice else "")
                + f"; (b) can still take their recovery; {why}"
            )
            continue
        blocked = {x: takes(x, la.size, homeless) for x in cand}
        parts = c.parts_of[la.name]
        if len(parts) > 1:
            # split: each part to another candidate, each taking the homeless VMs it can
            holders: list[str] = []
            for x in sorted(cand, key=lambda s: -st.free(s)):
                if len(holders) == len(parts):
                    break
                if takes(x, parts[len(holders)].size, []):
                    continue
                mine = [v for v in homeless if v not in home]
                for v in mine:
                    if v not in home and not takes(x, parts[len(holders)].size, [v]):
                        set_home(v, x)
                holders.append(x)
            if len(holders) == len(parts):
                for p, x in zip(parts, holders, strict=True):
                    st.put(p.name, x)
                for v in homeless:
                    if v not in home:
                        set_home(v, holders[0])
                st.reasons.append(
                    f"{la.name} split into {len(parts)} parts on {', '.join(holders)}: (b) no "
                    "candidate can hold it whole and take all its VMs at a failure "
                    f"({', '.join(sorted(set(blocked.values())))} short)"
                )
                continue
        # nothing passes (b): the seed calls this unstorable; we keep it where most disk is free
        x = max(cand, key=st.free)
        for p in parts:
            st.put(p.name, x)
        for v in homeless:
            set_home(v, x)
        st.reasons.append(
            f"{la.name} -> {x}: no candidate passes (b) ({', '.join(sorted(set(blocked.values())))}"
            " short); kept where most disk is free"
        )
    rec, why2 = _recoveries(c, st.stores, home)
    return Plan(
        "seed",
        "none",
        st.frozen(),
        rec,
        tuple(st.reasons + why2),
        "heuristic",
        None,
        time.monotonic() - t0,
    )


# -- the heuristic for large clusters ---------------------------------------------------------
LOCAL_SEARCH_MAX = 20_000  # parts x servers^2 up to which the heuristic also improves its plan
LOCAL_SEARCH_SECONDS = 5.0  # the local search's time budget (repair or improvement)


def rank(ev: Evaluation, objective: str = "worst") -> tuple[int, int, int]:
    """How good an evaluated plan is, lower better: (worst, total, bytes stored) for the
    ``worst`` objective, (total, worst, bytes stored) for ``total``."""
    if objective == "total":
        return (ev.total, ev.worst, sum(ev.stored.values()))
    return (ev.worst, ev.total, sum(ev.stored.values()))


def heuristic(c: Cluster, objective: str = "worst") -> Plan:
    """The best of four :func:`heuristic_pass` variants (rule-(a) copies placed first or
    last; chains copied to recovery targets or sent at recovery), by :func:`rank` for
    ``objective`` (worst: worst-case transfer, then total, then bytes stored; total: the
    total first). When none finds a plan, or on a small cluster (parts x servers^2 <=
    :data:`LOCAL_SEARCH_MAX`) whose best plan still sends bytes, :func:`local_search`
    repairs or improves it within :data:`LOCAL_SEARCH_SECONDS`. The plan's reasons: which
    of them gave it, then :func:`~unionimg.placement.model.explain` of the plan (one line
    per layer or part and per recovery, naming the rule). :class:`NoPlanFound` only when
    the local search too ends with a rule broken."""
    t0 = time.monotonic()
    best: tuple[tuple[int, int, int], Plan, str] | None = None
    last: Infeasible | None = None
    for first in (False, True):
        for copy in (True, False):
            try:
                p = heuristic_pass(c, copy=copy, a_first=first)
            except Infeasible as exc:
                last = exc
                continue
            ev = evaluate(c, p)
            if not ev.ok:
                continue
            key = rank(ev, objective)
            if best is None or key < best[0]:
                why = (
                    f"heuristic: best of 4 passes by the {objective} transfer (rule-(a) copies "
                    f"{'first' if first else 'last'}, chains "
                    f"{'copied to' if copy else 'sent to'} recovery targets)"
                )
                best = (key, p, why)
    small = len(c.parts()) * len(c.servers) ** 2 <= LOCAL_SEARCH_MAX
    if best is None or (small and best[0][0] > 0):
        # no pass found a plan (their disk reserve is greedy), or a small cluster where a
        # local search is cheap: repair / improve by moving copies (bounded in time)
        start = best[1].stores if best is not None else None
        try:
            q = local_search(c, start, LOCAL_SEARCH_SECONDS, objective)
        except Infeasible as exc:
            last = exc
        else:
            key = rank(evaluate(c, q), objective)
            if best is None or key < best[0]:
                best = (key, q, q.reasons[0])
    if best is None:
        assert last is not None
        raise last
    _, p, why = best
    out = Plan("heuristic", objective, p.stores, p.recovery, (), "heuristic", None, 0.0)
    return Plan(
        "heuristic",
        objective,
        p.stores,
        p.recovery,
        (why, *explain(c, out, evaluate(c, out))),
        "heuristic",
        None,
        time.monotonic() - t0,
    )


def heuristic_pass(c: Cluster, copy: bool = True, a_first: bool = True) -> Plan:
    """Recovery homes first, data second: for each failure, the failed server's VMs go (big
    chains first) to the server that already holds most of their chain and can take them;
    their chain is then copied there if disk allows (zero transfer for them), else left where it
    is (moved at recovery). Finally every part gets a copy off each server running a VM that
    needs it (rule a). One pass, no search: O(VMs x servers x chain length)."""
    t0 = time.monotonic()
    st = _State(c)
    res_used: dict[tuple[str, str], dict[str, float]] = {}  # (failed, target) -> resource sums
    img_used: dict[tuple[str, str], int] = {}  # (failed, target) -> recovered images + moved
    worst_extra: dict[str, int] = {s.name: 0 for s in c.servers}
    rec: dict[str, dict[str, str]] = {s.name: {} for s in c.servers}
    headroom = {(s.name, r): c.headroom(s.name, r) for s in c.servers for r in RESOURCES}
    running = {s.name: c.running_image(s.name) for s in c.servers}
    disk = {s.name: s.disk for s in c.servers}
    chain = {v.name: c.chain_parts(v.name) for v in c.vms}
    homes: dict[str, str] = {}
    # first the one copy rule (a) needs of every part, off the servers running its VMs, on
    # the server with most free disk (largest parts first): the storage no plan can avoid
    # is placed before copies for zero transfer take the disk
    for la in sorted(c.layers, key=lambda la: -la.size) if a_first else ():
        cand, twice = _candidates(c, la.name)
        for p in c.parts_of[la.name]:
            for t in sorted(cand, key=lambda s: -st.free(s))[: 2 if twice else 1]:
                if st.free(t) >= st.cost(p.name, t):
                    st.put(p.name, t)
                    st.reasons.append(
                        f"{p.name} -> {t}: (a) runs none of its VMs; most free disk"
                        + (" (every server runs one: two copies)" if twice else "")
                    )
    for f in c.servers:
        vms = sorted(c.vms_on(f.name), key=lambda v: -sum(p.size for p in chain[v.name]))
        for v in vms:
            # each target that can take v: by copying v's missing parts there now (moves
            # nothing at recovery) or, if disk is short for that, by sending them then
            best: tuple[tuple[int, int, int], str, bool] | None = None
            for s in c.servers:
                t = s.name
                if t == f.name:
                    continue
                used = res_used.get((f.name, t), {})
                if any(
                    headroom[t, r] is not None
                    and used.get(r, 0.0) + v.needs.get(r, 0.0) > (headroom[t, r] or 0.0) + 1e-9
                    for r in RESOURCES
                ):
                    continue
                lack = sum(p.size for p in chain[v.name] if t not in st.stores.get(p.name, ()))
                room = disk[t] - running[t] - st.stored[t]
                extra = img_used.get((f.name, t), 0) + v.image
                if copy and room - lack >= max(worst_extra[t], extra):
                    key = (0, lack, -room)
                elif room >= max(worst_extra[t], extra + (lack if c.transfer_kept else 0)):
                    key = (lack, lack, -room)
                else:
                    continue
                if best is None or key < best[0]:
                    best = (key, t, key[0] == 0)
            if best is None:
                raise NoPlanFound(
                    f"no plan found: when server {f.name} fails, VM {v.name} fits no other "
                    "server (the heuristic found no resources or disk left for it); try "
                    "--method exact"
                )
            _, t, copy = best
            used = res_used.setdefault((f.name, t), {})
            for r in RESOURCES:
                used[r] = used.get(r, 0.0) + v.needs.get(r, 0.0)
            rec[f.name][v.name] = t
            homes.setdefault(v.name, t)
            lacking = [p for p in chain[v.name] if t not in st.stores.get(p.name, ())]
            need = sum(p.size for p in lacking)
            extra = img_used.get((f.name, t), 0) + v.image
            if copy:
                for p in lacking:
                    st.put(p.name, t)
                img_used[f.name, t] = extra
                worst_extra[t] = max(worst_extra[t], extra)
                st.reasons.append(
                    f"{f.name} fails: VM {v.name} -> {t}: fewest bytes to add and room for "
                    f"them; {len(lacking)} part(s) copied there so it moves nothing"
                )
            else:
                kept = need if c.transfer_kept else 0
                img_used[f.name, t] = extra + kept
                worst_extra[t] = max(worst_extra[t], extra + kept)
                st.reasons.append(
                    f"{f.name} fails: VM {v.name} -> {t}: no server has disk to hold its chain "
                    f"beforehand; the least ({gib(need)}) moves at recovery"
                )
    # rule (a): a copy of every needed part off each server running a VM that needs it
    for v in c.vms:
        for p in chain[v.name]:
            if st.stores.get(p.name, set()) - {v.server}:
                continue
            t = max(
                (s.name for s in c.servers if s.name != v.server),
                key=lambda s: disk[s] - running[s] - st.stored[s] - worst_extra[s],
            )
            if disk[t] - running[t] - st.stored[t] - worst_extra[t] < st.cost(p.name, t):
                raise NoPlanFound(
                    f"no plan found: the heuristic left no server besides {v.server} disk "
                    f"for part {p.name} of VM {v.name}'s chain; try --method exact"
                )
            st.put(p.name, t)
            st.reasons.append(
                f"{p.name} -> {t}: (a) its only copy was on {v.server}, VM "
                f"{v.name}'s server; most free disk"
            )
    for la in c.layers:  # layers no VM needs: once, where most disk is free
        for p in c.parts_of[la.name]:
            if p.name not in st.stores:
                t = max((s.name for s in c.servers), key=lambda s: st.free(s) - worst_extra[s])
                if st.free(t) - worst_extra[t] < st.cost(p.name, t):
                    raise NoPlanFound(
                        f"no plan found: the heuristic left no server disk for part {p.name} "
                        "(no VM needs it); try --method exact"
                    )
                st.put(p.name, t)
                st.reasons.append(f"{p.name} -> {t}: no VM needs it; most free disk")
    # the recovery is the homes chosen above: the copies added since only lower its transfer
    return Plan(
        "heuristic",
        "worst",
        st.frozen(),
        rec,
        tuple(st.reasons),
        "heuristic",
        None,
        time.monotonic() - t0,
    )


# -- repair and improvement: a local search over copies ----------------------------------------
def _score(
    c: Cluster, stores: Mapping[str, frozenset[str]], objective: str = "worst"
) -> tuple[tuple[int, int, int, int, int], dict[str, dict[str, str]]]:
    """(rules broken, bytes short, then :func:`rank` for ``objective``) of ``stores`` with
    the recovery :func:`recover` finds for them; lower is better."""
    rec, _ = _recoveries(c, stores)
    ev = evaluate(c, Plan("heuristic", "worst", stores, rec))
    bad = len(ev.violations) + sum(
        len(f.unplaced) + len(f.lost) + sum(1 for t in f.targets if t.over) for f in ev.failures
    )
    short = 0  # how far the unplaced VMs are from fitting: a slope for the search to follow
    if bad:
        full = with_held(c, stores)
        for f in ev.failures:
            for v in f.unplaced:
                need = c.chain_parts(v)
                gaps = [
                    c.running_image(t.name)
                    + ev.stored[t.name]
                    + c.vm(v).image
                    + (
                        sum(p.size for p in need if t.name not in full.get(p.name, ()))
                        if c.transfer_kept
                        else 0
                    )
                    + sum(c.vm(u).image for u, to in rec[f.server].items() if to == t.name)
                    - t.disk
                    for t in c.servers
                    if t.name != f.server and not _fits(c, t.name, [v])
                ]
                short += max(0, min(gaps, default=1 << 62))
    return (bad, short, *rank(ev, objective)), rec


def _first_broken(c: Cluster, stores: Mapping[str, frozenset[str]]) -> str:
    """The first rule ``stores`` breaks with the recovery :func:`recover` finds, in words."""
    rec, why = _recoveries(c, stores)
    ev = evaluate(c, Plan("heuristic", "worst", stores, rec))
    if ev.violations:
        return ev.violations[0]
    for line in why:
        if "fits no server" in line:
            return line
    for f in ev.failures:
        for t in f.targets:
            if t.over:
                return f"{f.server} fails: {', '.join(t.over)} short on {t.server}"
        if f.lost:
            return f"{f.server} fails: {f.lost[0]} lost"
    return "a failure not recoverable"


def _minimal(c: Cluster) -> dict[str, frozenset[str]]:
    """The fewest copies rule (a) allows, largest layers first, each on the candidate with
    the most free disk (what a server's own VMs leave): a start for the local search."""
    st = _State(c)
    for la in sorted(c.layers, key=lambda la: -la.size):
        cand, twice = _candidates(c, la.name)
        if not c.needers(la.name):
            cand, twice = [s.name for s in c.servers], False
        for p in c.parts_of[la.name]:
            if st.stores.get(p.name, set()) - {c.vm(v).server for v in c.needers(la.name)}:
                continue
            for t in sorted(cand, key=lambda s: -st.free(s))[: 2 if twice else 1]:
                st.put(p.name, t)
    return st.frozen()


def local_search(
    c: Cluster,
    start: Mapping[str, frozenset[str]] | None,
    seconds: float,
    objective: str = "worst",
) -> Plan:
    """Hill-climbing over where copies are: from ``start`` (or the fewest copies rule (a)
    allows), repeatedly take the first move that lowers (rules broken, bytes short, then
    :func:`rank` for ``objective``): drop a copy, add a copy (with its parents under
    ``whole_chains``), or move a copy to another server — moving data off servers whose
    disk breaks rule (b) at a failure, or onto a recovery target so nothing is sent.
    Recovery targets are re-chosen by :func:`recover` after every move. Stops at a local
    optimum or after ``seconds``; :class:`NoPlanFound` if the best it reaches still breaks
    a rule. Its reasons: how it ran, then :func:`~unionimg.placement.model.explain`."""
    t0 = time.monotonic()
    stores: dict[str, frozenset[str]] = dict(start) if start is not None else _minimal(c)
    held = {s.name: c.held(s.name) for s in c.servers}
    parts = sorted(c.parts(), key=lambda p: -p.size)
    layer_of = {p.name: p.layer for p in parts}
    servers = [s.name for s in c.servers]
    score, rec = _score(c, stores, objective)
    moves = 0

    def with_parents(st: dict[str, frozenset[str]], part: str, s: str) -> None:
        st[part] = st.get(part, frozenset()) | {s}
        parent = c.layer(layer_of[part]).parent if c.whole_chains else None
        while parent is not None:
            for pp in c.parts_of[parent]:
                st[pp.name] = st.get(pp.name, frozenset()) | {s}
            parent = c.layer(parent).parent

    def neighbours() -> Iterable[dict[str, frozenset[str]]]:
        for p in parts:
            where = stores.get(p.name, frozenset())
            for s in sorted(where):
                if p.name in held[s]:
                    continue  # held for the server's own VMs: not the plan's to move
                if len(where) > 1:
                    drop = dict(stores)
                    drop[p.name] = where - {s}
                    yield drop
                for t in servers:
                    if t not in where:
                        mv = dict(stores)
                        mv[p.name] = where - {s}
                        with_parents(mv, p.name, t)
                        yield mv
            for t in servers:
                if t not in where:
                    add = dict(stores)
                    with_parents(add, p.name, t)
                    yield add

    improved = True
    while improved and time.monotonic() - t0 < seconds:
        improved = False
        for cand in neighbours():
            if time.monotonic() - t0 >= seconds:
                break
            sc, r = _score(c, cand, objective)
            if sc < score:
                stores, score, rec, improved = cand, sc, r, True
                moves += 1
                break
    if score[0]:
        raise NoPlanFound(
            "no plan found: the heuristic found none (its passes and a local search of "
            f"{moves} moves still break {score[0]} rule(s), first: {_first_broken(c, stores)}); "
            "try --method exact"
        )
    plan = Plan("heuristic", objective, stores, rec, (), "heuristic", None, 0.0)
    head = (
        f"heuristic: local search over copies by the {objective} transfer ({moves} moves, "
        f"{time.monotonic() - t0:.2f} s) from "
        + ("the best pass's plan" if start is not None else "the fewest copies (a) allows")
    )
    return Plan(
        "heuristic",
        objective,
        stores,
        rec,
        (head, *explain(c, plan, evaluate(c, plan))),
        "heuristic",
        None,
        time.monotonic() - t0,
    )
