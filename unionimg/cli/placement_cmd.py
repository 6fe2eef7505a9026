"""``unionimg plan placement``, ``simulate failure``, ``apply placement`` and ``recover``:
where each layer is kept so a failed server's VMs recover elsewhere with no transfer
(docs/placement.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from unionimg.cli._common import json_option, json_text
from unionimg.display import shown
from unionimg.errors import NotFound, UsageError
from unionimg.placement import planner
from unionimg.placement.model import (
    Cluster,
    Evaluation,
    FailureOutcome,
    Plan,
    evaluate,
    gib,
    parse_cluster,
)


def read_cluster(path: str) -> Cluster:
    """The cluster file (TOML) named on the command line, validated."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"cluster file {shown(path)} does not exist; give a TOML file (docs/placement.md)"
        ) from None
    except OSError as exc:
        raise UsageError(f"cluster file {shown(path)} cannot be read: {exc.strerror}") from None
    if len(data) > 64 << 20:
        raise UsageError(f"cluster file {shown(path)} is over 64 MiB; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"cluster file {shown(path)} is not UTF-8 text") from None
    return parse_cluster(text, shown(path))


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = json_option(f)
    f = click.option(
        "--time-limit",
        type=click.FloatRange(0.1, 3600.0),
        default=30.0,
        show_default=True,
        help="Seconds the exact solver may take.",
    )(f)
    f = click.option(
        "--objective",
        type=click.Choice(planner.OBJECTIVES),
        default="worst",
        show_default=True,
        help="Minimize the worst single failure's transfer, or the total over all failures.",
    )(f)
    f = click.option(
        "--method",
        type=click.Choice(planner.METHODS),
        default="auto",
        show_default=True,
        help="exact (CP-SAT), heuristic, seed (the paper's filters), conventional "
        "(balance free space); auto: exact up to a model size.",
    )(f)
    return click.option(
        "--cluster",
        "cluster_file",
        required=True,
        metavar="FILE",
        help="The cluster: servers, VMs, layers (TOML).",
    )(f)


def _failure_lines(f: FailureOutcome) -> list[str]:
    out = []
    for t in f.targets:
        sent = f", sent {', '.join(t.missing)}" if t.missing else ""
        over = f"; OVER CAPACITY: {', '.join(t.over)}" if t.over else ""
        out.append(f"    {', '.join(t.vms)} -> {t.server}: {gib(t.bytes)}{sent}{over}")
    if f.unplaced:
        out.append(f"    no server can take {', '.join(f.unplaced)}")
    if f.lost:
        out.append(f"    lost (no surviving copy): {', '.join(f.lost)}")
    return out


def _print_plan(c: Cluster, p: Plan, ev: Evaluation) -> None:
    bound = f", bound {gib(p.bound)}" if p.bound is not None else ""
    click.echo(f"plan: {p.method} ({p.status}, {p.seconds:.2f} s), objective {p.objective}")
    click.echo(
        f"recovery transfer: worst {gib(ev.worst)}{bound}; total over failures "
        f"{gib(ev.total)}; every single failure recoverable: "
        f"{'yes' if ev.ok else 'NO'}"
    )
    for v in ev.violations:
        click.echo(f"  VIOLATION: {v}")
    click.echo("stored:")
    for la in c.layers:
        parts = c.parts_of[la.name]
        where = {pt.name: sorted(p.stores.get(pt.name, frozenset())) for pt in parts}
        if len({tuple(w) for w in where.values()}) == 1:
            click.echo(f"  {la.name} ({gib(la.size)}): {', '.join(where[parts[0].name])}")
        else:
            split = "; ".join(f"{n}: {', '.join(w)}" for n, w in where.items())
            click.echo(f"  {la.name} ({gib(la.size)}) split: {split}")
    click.echo("per server: " + ", ".join(f"{s} {gib(n)}" for s, n in ev.stored.items()))
    click.echo("failures:")
    for f in ev.failures:
        click.echo(
            f"  {f.server} fails: {gib(f.bytes)} moved, every VM restarts: "
            f"{'yes' if f.restartable else 'NO'}"
        )
        for line in _failure_lines(f):
            click.echo(line)
    click.echo("why:")
    for r in p.reasons:
        click.echo(f"  - {r}")


@click.group("plan")
def plan_group() -> None:
    """Plan where things go (placement of spare layers)."""


@plan_group.command("placement")
@_options
@click.option(
    "--compare",
    is_flag=True,
    help="Also show the seed's method and the conventional placement's figures.",
)
def plan_placement_cmd(
    cluster_file: str, method: str, objective: str, time_limit: float, as_json: bool, compare: bool
) -> None:
    """Where each layer (or part, or copy) is stored so that after any single server failure
    each of its VMs recovers on another server with the least transfer; each decision explained.
    """
    c = read_cluster(cluster_file)
    p = planner.plan(c, method, objective, time_limit)
    ev = evaluate(c, p)
    others = {}
    if compare:
        for m in ("seed", "conventional"):
            if m != method:
                q = planner.plan(c, m, objective, time_limit)
                others[m] = evaluate(c, q)
    if as_json:
        data = planner.summary(c, p, ev)
        data["compare"] = {
            m: {"worst_bytes": e.worst, "total_bytes": e.total, "ok": e.ok}
            for m, e in others.items()
        }
        click.echo(json_text(data, sort_keys=True))
        return
    _print_plan(c, p, ev)
    if others:
        click.echo("compare (worst / total recovery transfer):")
        for m, e in [(p.method, ev), *others.items()]:
            per = ", ".join(f"{f.server} {gib(f.bytes)}" for f in e.failures)
            click.echo(
                f"  {m}: {gib(e.worst)} / {gib(e.total)} ({per})"
                + ("" if e.ok else "; NOT every failure recoverable")
            )


@click.group("simulate")
def simulate_group() -> None:
    """Simulate events against a plan."""


@simulate_group.command("failure")
@click.argument("server")
@_options
def simulate_failure_cmd(
    server: str, cluster_file: str, method: str, objective: str, time_limit: float, as_json: bool
) -> None:
    """SERVER fails: which of its VMs restart where, what is sent over the network, and
    whether every VM can be restarted (resources), under the plan of --method."""
    c = read_cluster(cluster_file)
    if f"s:{server}" not in c.index:
        raise NotFound(
            f"server {shown(server)} is not in {shown(cluster_file)}; its servers: "
            + ", ".join(s.name for s in c.servers)
        )
    p = planner.plan(c, method, objective, time_limit)
    f = evaluate(c, p).failure(server)
    if as_json:
        data = {
            "server": server,
            "method": p.method,
            "status": p.status,
            **planner.failure_json(f),
            "vms": {v: t.server for t in f.targets for v in t.vms},
        }
        click.echo(json_text(data, sort_keys=True))
        return
    click.echo(f"{server} fails ({p.method} plan): {len(c.vms_on(server))} VM(s) to restart")
    for t in f.targets:
        for v in t.vms:
            lacks = [pt.name for pt in c.chain_parts(v) if pt.name in t.missing]
            click.echo(
                f"  {v} -> {t.server}"
                + (f" (needs {', '.join(lacks)} sent)" if lacks else " (its whole chain is there)")
            )
    for line in _failure_lines(f):
        click.echo(line)
    click.echo(f"bytes moved: {f.bytes} ({gib(f.bytes)})")
    click.echo(f"every VM restarts: {'yes' if f.restartable else 'NO'}")
