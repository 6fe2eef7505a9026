"""The exact planner (pure): the placement as a CP-SAT model (OR-tools), solved within a time
limit; optimal when the solver proves it, else its best plan with the proven bound.

Variables: ``x[p,s]`` part p has a copy on server s; ``y[f,v,t]`` when f fails, its VM v
recovers on t; ``m[f,t,p]`` part p is sent to t at f's failure (some VM recovering on t needs
it and t lacks it). Constraints: every part stored; (a) each part of a VM's chain has a copy
off the VM's server; each VM of a failed server gets one target; (b) per failure and target,
the recovered VMs' CPU, memory, disk I/O and network I/O within what the target has left, and
its disk holding its own VMs, its stored parts, the recovered images (and the sent parts when
they are kept); at rest, the stored parts fit. (c) gathering is not a rule here: the objective
(transfer) rewards it. Objective: the worst failure's transfer (or the total), then the total,
then the bytes stored (fewest copies), as one weighted sum while it fits in 63 bits.

Sizes are counted in a unit: the greatest common divisor of the sizes, or MiB (sizes rounded
up, capacities down: a plan is never looser than the bytes) when that is smaller.
"""

from __future__ import annotations

import math
import time
from typing import Any

from unionimg.placement.model import RESOURCES, Cluster, Infeasible, Plan

MIB = 1 << 20
_LIMIT = 1 << 62
BUILD_SHARE = 0.8  # building the model may take this share of the time limit, no more


def _unit(c: Cluster) -> int:
    sizes = [p.size for p in c.parts()] + [v.image for v in c.vms]
    g = 0
    for n in sizes:
        g = math.gcd(g, n)
    return g if g >= MIB else MIB


def _up(n: int, u: int) -> int:
    return -(-n // u)


def _res(value: float, up: bool) -> int:
    scaled = value * 1000
    return math.ceil(scaled - 1e-6) if up else math.floor(scaled + 1e-6)


def targets_for(c: Cluster, limit: int | None, hint: Plan | None) -> dict[str, list[str]]:
    """Each VM's candidate targets: every other server, or (``limit``) its hinted targets and
    the servers with most CPU left, to keep a large model small."""
    out: dict[str, list[str]] = {}
    order = sorted(c.servers, key=lambda s: -(c.headroom(s.name, "cpu") or 1e18))
    for v in c.vms:
        others = [s.name for s in order if s.name != v.server]
        if limit is None or limit >= len(others):
            out[v.name] = others
            continue
        hinted = (
            [hint.recovery[v.server][v.name]]
            if hint and v.name in hint.recovery.get(v.server, {})
            else []
        )
        out[v.name] = list(dict.fromkeys(hinted + others))[:limit]
    return out


def model_size(c: Cluster, limit: int | None = None) -> int:
    """The number of variables :func:`solve` would make (the switch to the heuristic uses it)."""
    n = len(c.parts()) * len(c.servers)
    k = len(c.servers) - 1 if limit is None else min(limit, len(c.servers) - 1)
    for f in c.servers:
        vms = c.vms_on(f.name)
        need = {p.name for v in vms for p in c.chain_parts(v.name)}
        n += len(vms) * k + len(need) * min(len(c.servers) - 1, k * max(1, len(vms)))
    return n


def solve(
    c: Cluster,
    objective: str = "worst",
    time_limit: float = 30.0,
    hint: Plan | None = None,
    max_targets: int | None = None,
    workers: int = 2,
    relax: frozenset[str] = frozenset(),
) -> Plan:
    """The best plan CP-SAT finds within ``time_limit`` seconds, building the model included
    (a build past :data:`BUILD_SHARE` of it stops with status "unknown"). ``relax`` drops constraint
    families ("disk", a resource) — used only to name the binding one of an infeasible model."""
    t0 = time.monotonic()  # the limit covers it all: importing, building, searching
    # deferred on purpose: ortools takes ~0.5 s to import (protobuf, numpy); only the exact
    # planner needs it, never `plan placement --method heuristic` nor the rest of the CLI
    from ortools.sat.python import cp_model

    u = _unit(c)
    m = cp_model.CpModel()
    names = [s.name for s in c.servers]
    parts = c.parts()
    size = {p.name: _up(p.size, u) for p in parts}
    x = {(p.name, s): m.new_bool_var(f"x[{p.name},{s}]") for p in parts for s in names}
    for p in parts:
        m.add_bool_or([x[p.name, s] for s in names])
    done: set[tuple[str, str]] = set()
    for v in c.vms:  # (a)
        for p in c.chain_parts(v.name):
            if (p.name, v.server) not in done:
                done.add((p.name, v.server))
                m.add_bool_or([x[p.name, s] for s in names if s != v.server])
    if c.whole_chains:  # a server keeping a layer keeps its parents
        for la in c.layers:
            if la.parent is not None:
                for pt in c.parts_of[la.name]:
                    for pp in c.parts_of[la.parent]:
                        for s in names:
                            m.add_implication(x[pt.name, s], x[pp.name, s])
    for s in names:  # what a server holds for its own VMs is there (counted as theirs)
        for p_name in c.held(s):
            m.add(x[p_name, s] == 1)
    stored = {
        s: sum(size[p.name] * x[p.name, s] for p in parts if p.name not in c.held(s)) for s in names
    }
    running = {s: _up(c.running_image(s), u) for s in names}
    disk = {s: c.server(s).disk // u for s in names}
    if "disk" not in relax:
        for s in names:
            m.add(stored[s] + running[s] <= disk[s])
    tg = targets_for(c, max_targets, hint)
    y: dict[tuple[str, str, str], Any] = {}
    moved: dict[str, Any] = {}
    send: dict[tuple[str, str, str], Any] = {}
    for f in names:
        if time.monotonic() - t0 > time_limit * BUILD_SHARE:
            return _no_time(objective, time_limit, time.monotonic() - t0, "building the model")
        vms = c.vms_on(f)
        for v in vms:
            for t in tg[v.name]:
                y[f, v.name, t] = m.new_bool_var(f"y[{f},{v.name},{t}]")
            m.add_exactly_one([y[f, v.name, t] for t in tg[v.name]])
        f_total = []
        for t in names:
            here = [v for v in vms if t in tg[v.name]]
            if t == f or not here:
                continue
            for r in RESOURCES:
                left = c.headroom(t, r)
                if left is None or r in relax:
                    continue
                used = [(_res(v.needs.get(r, 0.0), True), y[f, v.name, t]) for v in here]
                if any(k for k, _ in used):
                    m.add(sum(k * var for k, var in used) <= _res(left, False))
            need: dict[str, list[Any]] = {}
            for v in here:
                for p in c.chain_parts(v.name):
                    need.setdefault(p.name, []).append(y[f, v.name, t])
            sent = []
            for p_name, ys in need.items():
                s_var = m.new_bool_var(f"m[{f},{t},{p_name}]")
                send[f, t, p_name] = s_var
                for yv in ys:
                    m.add(s_var >= yv - x[p_name, t])
                sent.append(size[p_name] * s_var)
            images = sum(_up(v.image, u) * y[f, v.name, t] for v in here)
            if "disk" not in relax:
                kept = sum(sent) if c.transfer_kept else 0
                m.add(stored[t] + running[t] + images + kept <= disk[t])
            f_total += sent
        moved[f] = sum(f_total)
    ub_t = sum(size.values()) * len(names)  # no failure sends more than every part to each
    ub_s = sum(size.values()) * len(names)
    worst = m.new_int_var(0, ub_t, "worst")
    for f in names:
        m.add(worst >= moved[f])
    total = sum(moved.values())
    primary = worst if objective == "worst" else total
    w_total = ub_t * len(names) + 1
    if objective == "worst" and (ub_t + 1) * w_total * (ub_s + 1) < _LIMIT:
        m.minimize(worst * w_total * (ub_s + 1) + total * (ub_s + 1) + sum(stored.values()))
        scale = w_total * (ub_s + 1)
    elif (ub_t * len(names) + 1) * (ub_s + 1) < _LIMIT:
        m.minimize(
            primary * (ub_s + 1) + (total if objective == "worst" else 0) + sum(stored.values())
        )
        scale = ub_s + 1
    else:
        m.minimize(primary)
        scale = 1
    if hint is not None:
        for (p_name, s), var in x.items():
            m.add_hint(var, s in hint.stores.get(p_name, frozenset()))
        for (f, v_name, t), var in y.items():
            m.add_hint(var, hint.recovery.get(f, {}).get(v_name) == t)
    # the limit covers the whole solve: what building took is taken off the search's time,
    # and a margin is kept for CP-SAT's own start and stop and reading the plan back
    left = time_limit - (time.monotonic() - t0)
    search = left - max(0.05 * time_limit, 0.05)
    if search < 0.05:
        return _no_time(objective, time_limit, time.monotonic() - t0, "building the model")
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = search
    solver.parameters.num_workers = workers
    status = solver.solve(m)
    seconds = time.monotonic() - t0
    if status == cp_model.INFEASIBLE:
        raise Infeasible(_binding(c, objective, relax, max_targets))
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        note = f"CP-SAT found no plan within the {time_limit:g} s limit ({seconds:.1f} s)"
        return Plan("exact", objective, {}, {}, (note,), "unknown", None, seconds)
    stores = {p.name: frozenset(s for s in names if solver.value(x[p.name, s])) for p in parts}
    recovery: dict[str, dict[str, str]] = {f: {} for f in names}
    for (f, v_name, t), var in y.items():
        if solver.value(var):
            recovery[f][v_name] = t
    bound = int(solver.best_objective_bound) // scale * u
    state = "optimal" if status == cp_model.OPTIMAL else "feasible"
    limited = f", targets limited to {max_targets} per VM" if max_targets else ""
    why = (
        f"CP-SAT minimized the recovery transfer "
        f"({'of the worst single failure' if objective == 'worst' else 'summed over failures'}):"
        f" {state} in "
        f"{seconds:.1f} s (unit {u} bytes{limited})",
    )
    return Plan("exact", objective, stores, recovery, why, state, bound, seconds)


def _no_time(objective: str, time_limit: float, seconds: float, what: str) -> Plan:
    why = f"CP-SAT: {what} took {seconds:.1f} s of the {time_limit:g} s limit; no search"
    return Plan("exact", objective, {}, {}, (why,), "unknown", None, seconds)


def _binding(c: Cluster, objective: str, relax: frozenset[str], limit: int | None) -> str:
    """Which constraint family makes the model infeasible: the first whose removal alone
    makes it feasible (small models only: each try is a solve)."""
    if relax:
        return "infeasible"
    for family in ("disk", *RESOURCES):
        try:
            plan = solve(c, objective, 10.0, None, limit, relax=frozenset({family}))
        except Infeasible:
            continue
        if plan.status in ("optimal", "feasible"):
            what = "disk (the stored layers, the VM images and the recovered ones)"
            return (
                f"infeasible: no placement keeps every VM recoverable after any single "
                f"server failure; {family if family != 'disk' else what} is the binding "
                "constraint (the model is feasible without it)"
            )
    return (
        "infeasible: no placement keeps every VM recoverable after any single server "
        "failure, even with any one of disk, cpu, memory, disk_io, net_io relaxed"
    )
