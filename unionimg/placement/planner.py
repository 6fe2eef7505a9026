"""Choosing a planner and explaining its plan (pure).

``auto`` solves exactly (CP-SAT) when the model has at most :data:`SWITCH` variables and
uses the heuristic beyond: the model grows as failures x targets x parts (every server can
fail, every other server can take a VM, every part of its chain can be sent there), so a
1,000-VM x 100-server cluster is millions of variables, which neither builds nor proves
anything within a CLI's time limit on a small machine (``bench/placement.py`` measures it),
while a few thousand variables (the seed's example: 240) solve to optimality in about a
second. The heuristic's plan is also the solver's starting hint; since CP-SAT counts in
rounded units and may stop at its time limit, both plans are evaluated in bytes and the better
by the objective kept, the reasons saying which. Every optimizing planner's plan (exact,
heuristic) is explained by :func:`~unionimg.placement.model.explain`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from unionimg.errors import UsageError
from unionimg.placement import exact, greedy
from unionimg.placement.model import (
    Cluster,
    Evaluation,
    FailureOutcome,
    Infeasible,
    NoPlanFound,
    Plan,
    evaluate,
    explain,
    gib,
)

METHODS = ("auto", "exact", "heuristic", "seed", "conventional")
OBJECTIVES = ("worst", "total")
SWITCH = 20_000  # variables of the CP-SAT model beyond which 'auto' uses the heuristic

_GREEDY: dict[str, Callable[[Cluster], Plan]] = {
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
    if method == "heuristic":
        return greedy.heuristic(c, objective)
    t0 = time.monotonic()
    size = exact.model_size(c)
    if method == "auto" and size > SWITCH:
        p = greedy.heuristic(c, objective)
        why = (
            f"auto: heuristic, the exact model would have {size:,} variables "
            f"(over {SWITCH:,}; docs/placement.md)"
        )
        return _with(p, (why, *p.reasons))
    try:
        hint: Plan | None = greedy.heuristic(c, objective)
    except Infeasible:
        hint = None  # the heuristic's own dead end; the solver may still find a plan
    p = exact.solve(c, objective, time_limit, hint)
    if p.status == "unknown":
        if hint is None:
            raise NoPlanFound(
                f"no plan found: CP-SAT found none in {time_limit:g} s and the heuristic "
                "none at all (neither proves there is none); raise --time-limit or the "
                "capacities"
            )
        why = f"exact: no plan within {time_limit:g} s; the heuristic's plan is kept"
        return _with(hint, (why, *hint.reasons))
    ev = evaluate(c, p)
    auto: tuple[str, ...] = (
        (f"auto: exact, the model has {size:,} variables (<= {SWITCH:,})",)
        if method == "auto"
        else ()
    )
    if hint is not None:
        # the heuristic's plan was the solver's hint, but CP-SAT counts in rounded units and
        # may stop at its time limit: the better of the two by the objective is kept
        hev = evaluate(c, hint)
        mine, theirs = greedy.rank(ev, objective), greedy.rank(hev, objective)
        if hev.ok and (not ev.ok or theirs < mine):
            why = (
                f"exact: CP-SAT's plan ({p.status}) has {objective} transfer "
                f"{gib(mine[0])}, the heuristic's {gib(theirs[0])}: the heuristic's plan is "
                "kept (the solver's bound still holds)"
            )
            return Plan(
                hint.method,
                objective,
                hint.stores,
                hint.recovery,
                (*p.reasons, *auto, why, *hint.reasons),
                "feasible",
                p.bound,
                time.monotonic() - t0,
            )
        auto += (
            f"exact: CP-SAT's plan kept, {objective} transfer {gib(mine[0])} against the "
            f"heuristic's {gib(theirs[0])}" + ("" if hev.ok else " (which breaks a rule)"),
        )
    return Plan(
        p.method,
        p.objective,
        p.stores,
        p.recovery,
        p.reasons + auto + explain(c, p, ev),
        p.status,
        p.bound,
        time.monotonic() - t0,
    )


def _with(p: Plan, reasons: tuple[str, ...]) -> Plan:
    return Plan(p.method, p.objective, p.stores, p.recovery, reasons, p.status, p.bound, p.seconds)


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
