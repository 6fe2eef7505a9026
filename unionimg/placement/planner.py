"""Choosing a planner and explaining its plan (pure).

``auto`` solves exactly (CP-SAT) when the model has at most :data:`SWITCH` variables and
uses the heuristic beyond: the model grows as failures x targets x parts (every server can
fail, every other server can take a VM, every part of its chain can be sent there), so a
1,000-VM x 100-server cluster is millions of variables, which neither builds nor proves
anything within a CLI's time limit on a small machine (``bench/placement.py`` measures it),
while a few thousand variables (the seed's example: 240) solve to optimality in about a
second. The heuristic's plan is also the solver's starting hint, so the exact answer is
never worse than the heuristic's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from unionimg.errors import UsageError
from unionimg.placement import exact, greedy
from unionimg.placement.model import (
    RESOURCES,
    Cluster,
    Evaluation,
    FailureOutcome,
    Infeasible,
    Plan,
    evaluate,
    fmt,
    gib,
)

METHODS = ("auto", "exact", "heuristic", "seed", "conventional")
OBJECTIVES = ("worst", "total")
SWITCH = 20_000  # variables of the CP-SAT model beyond which 'auto' uses the heuristic

_GREEDY: dict[str, Callable[[Cluster], Plan]] = {
    "heuristic": greedy.heuristic,
    "seed": greedy.seed,
    "conventional": greedy.conventional,
}


def plan(
    c: Cluster, method: str = "auto", objective: str = "worst", time_limit: float = 30.0
) -> Plan:
    """A plan by ``method``, its reasons one line per decision."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; give one of {', '.join(METHODS)}")
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; give worst or total")
    if method in _GREEDY:
        return _GREEDY[method](c)
    t0 = time.monotonic()
    size = exact.model_size(c)
    if method == "auto" and size > SWITCH:
        p = greedy.heuristic(c)
        why = (
            f"auto: heuristic, the exact model would have {size:,} variables "
            f"(over {SWITCH:,}; docs/placement.md)"
        )
        return _with(p, (why, *p.reasons))
    try:
        hint: Plan | None = greedy.heuristic(c)
    except Infeasible:
        hint = None  # the heuristic's own dead end; the solver may still find a plan
    p = exact.solve(c, objective, time_limit, hint)
    if p.status == "unknown":
        if hint is None:
            raise Infeasible(
                f"infeasible: CP-SAT found no plan in {time_limit:g} s and the heuristic "
                "none at all; raise --time-limit or the capacities"
            )
        why = f"exact: no plan within {time_limit:g} s; the heuristic's plan is kept"
        return _with(hint, (why, *hint.reasons))
    ev = evaluate(c, p)
    head = p.reasons + (
        (f"auto: exact, the model has {size:,} variables (<= {SWITCH:,})",)
        if method == "auto"
        else ()
    )
    return Plan(
        p.method,
        p.objective,
        p.stores,
        p.recovery,
        head + explain(c, p, ev),
        p.status,
        p.bound,
        time.monotonic() - t0,
    )


def _with(p: Plan, reasons: tuple[str, ...]) -> Plan:
    return Plan(p.method, p.objective, p.stores, p.recovery, reasons, p.status, p.bound, p.seconds)


def explain(c: Cluster, p: Plan, ev: Evaluation) -> tuple[str, ...]:
    """One line per stored layer (or part) and per VM's recovery target: which rule or which
    saving chose it, read off the plan (for the solver, whose choices carry no reasons)."""
    lines: list[str] = []
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
            for f, rec in p.recovery.items():
                for s in where:
                    vs = sorted(v for v, t in rec.items() if t == s and la.name in c.chain[v])
                    if vs:
                        users.append(f"{', '.join(vs)} on {s} when {f} fails")
            if not c.needers(la.name):
                lines.append(f"{shown_name} on {', '.join(where)}: no VM needs it; kept once")
            elif users:
                lines.append(
                    f"{shown_name} on {', '.join(where)}: not only on {', '.join(runs)} where its "
                    f"VMs run (a); found in place by {'; '.join(users)} (objective)"
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


def summary(c: Cluster, p: Plan, ev: Evaluation) -> dict[str, object]:
    """The plan as JSON: stores, per failure the targets and bytes, the figures."""
    return {
        "method": p.method,
        "objective": p.objective,
        "status": p.status,
        "bound": p.bound,
        "seconds": round(p.seconds, 3),
        "worst_bytes": ev.worst,
        "total_bytes": ev.total,
        "stored_bytes": dict(ev.stored),
        "ok": ev.ok,
        "violations": list(ev.violations),
        "stores": {part: sorted(s) for part, s in sorted(p.stores.items())},
        "failures": {f.server: failure_json(f) for f in ev.failures},
        "reasons": list(p.reasons),
    }


def failure_json(f: FailureOutcome) -> dict[str, object]:
    return {
        "bytes": f.bytes,
        "restartable": f.restartable,
        "lost": list(f.lost),
        "unplaced": list(f.unplaced),
        "targets": [
            {
                "server": t.server,
                "vms": list(t.vms),
                "sent": list(t.missing),
                "bytes": t.bytes,
                "over": list(t.over),
            }
            for t in f.targets
        ],
    }


__all__ = ["METHODS", "OBJECTIVES", "SWITCH", "explain", "gib", "plan", "summary"]
