"""``unionimg plan placement``, ``simulate failure``, ``apply placement`` and ``recover``:
where each layer is kept so a failed server's VMs recover elsewhere with no transfer
(docs/placement.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from unionimg.cli._common import ASCII_INT, Ctx, json_option, json_text, pass_ctx
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
    return parse_cluster(_read_text(path, "cluster file"), shown(path))


def _solver_options(
    f: Callable[..., Any], *, method_help: str, objective_help: str
) -> Callable[..., Any]:
    """--method, --objective, --time-limit: how a command plans (plan and apply alike)."""
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
        help=objective_help,
    )(f)
    return click.option(
        "--method",
        type=click.Choice(planner.METHODS),
        default="auto",
        show_default=True,
        help=method_help,
    )(f)


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = _solver_options(
        json_option(f),
        method_help="exact (CP-SAT), heuristic, seed (the paper's filters), conventional "
        "(balance free space); auto: exact up to a model size.",
        objective_help="Minimize the worst single failure's transfer, or the total over all "
        "failures.",
    )
    f = click.option(
        "--servers",
        "servers_file",
        default=None,
        metavar="FILE",
        help="With --from-store: the servers (hosts), their capacities and VMs (TOML).",
    )(f)
    f = click.option(
        "--from-store",
        "system",
        default=None,
        metavar="SYSTEM",
        help="Take the VMs and layers from system node SYSTEM of this store.",
    )(f)
    return click.option(
        "--cluster",
        "cluster_file",
        default=None,
        metavar="FILE",
        help="The cluster: servers, VMs, layers (TOML).",
    )(f)


def _read_text(path: str, what: str) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"{what} {shown(path)} does not exist; give a TOML file (docs/placement.md)"
        ) from None
    except OSError as exc:
        raise UsageError(f"{what} {shown(path)} cannot be read: {exc.strerror}") from None
    if len(data) > 64 << 20:
        raise UsageError(f"{what} {shown(path)} is over 64 MiB; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {shown(path)} is not UTF-8 text") from None


def _cluster(
    c: Ctx, cluster_file: str | None, system: str | None, servers_file: str | None
) -> Cluster:
    """The cluster of --cluster FILE, or of --from-store SYSTEM --servers FILE."""
    if (cluster_file is None) == (system is None):
        raise UsageError("give --cluster FILE, or --from-store SYSTEM with --servers FILE")
    if cluster_file is not None:
        if servers_file is not None:
            raise UsageError("--servers goes with --from-store, not --cluster")
        return read_cluster(cluster_file)
    if servers_file is None:
        raise UsageError("--from-store SYSTEM needs --servers FILE (docs/placement.md)")
    # deferred on purpose: the store side (systems, the layer cache) only for --from-store
    from unionimg.placement.fromstore import cluster_from_system

    assert system is not None
    text = _read_text(servers_file, "servers file")
    return cluster_from_system(c.store, system, text, shown(servers_file)).cluster


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
@pass_ctx
def plan_placement_cmd(
    c_: Ctx,
    cluster_file: str | None,
    system: str | None,
    servers_file: str | None,
    method: str,
    objective: str,
    time_limit: float,
    as_json: bool,
    compare: bool,
) -> None:
    """Where each layer (or part, or copy) is stored so that after any single server failure
    each of its VMs recovers on another server with the least transfer; each decision explained.
    """
    c = _cluster(c_, cluster_file, system, servers_file)
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
@pass_ctx
def simulate_failure_cmd(
    c_: Ctx,
    server: str,
    cluster_file: str | None,
    system: str | None,
    servers_file: str | None,
    method: str,
    objective: str,
    time_limit: float,
    as_json: bool,
) -> None:
    """SERVER fails: which of its VMs restart where, what is sent over the network, and
    whether every VM can be restarted (resources), under the plan of --method."""
    c = _cluster(c_, cluster_file, system, servers_file)
    if f"s:{server}" not in c.index:
        raise NotFound(
            f"server {shown(server)} is not in the cluster; its servers: "
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


@click.group("apply")
def apply_group() -> None:
    """Make a plan real on the hosts (placement of spare layers)."""


@apply_group.command("placement")
@click.option(
    "--from-store",
    "system",
    default=None,
    metavar="SYSTEM",
    help="The system node whose VMs' layers are placed (required).",
)
@click.option(
    "--servers",
    "servers_file",
    default=None,
    metavar="FILE",
    help="The servers (hosts of 'host add'), capacities and VMs (TOML) (required).",
)
@click.option(
    "--registry",
    "url",
    default=None,
    metavar="URL",
    help="The registry the hosts pull from, http://HOST:PORT (required).",
)
@functools.partial(
    _solver_options,
    method_help="The planner (as for 'plan placement').",
    objective_help="worst or total recovery transfer.",
)
@click.option("--here", is_flag=True, hidden=True)
@click.option("--drop", "drops", multiple=True, hidden=True)
@click.option("--parts", "parts_json", default=None, hidden=True)
@click.option("--prune", is_flag=True, hidden=True)
@click.option("--assemble", is_flag=True, hidden=True)
@json_option
@pass_ctx
def apply_placement_cmd(
    c: Ctx,
    system: str | None,
    servers_file: str | None,
    url: str | None,
    method: str,
    objective: str,
    time_limit: float,
    here: bool,
    drops: tuple[str, ...],
    parts_json: str | None,
    prune: bool,
    assemble: bool,
    as_json: bool,
) -> None:
    """Plan where system SYSTEM's layers are kept on the hosts and copy them there (each host
    pulls only what it lacks from the registry); layers the previous placement kept on a host
    and this one does not are then removed there, unless a VM of that host uses them. The
    placement is recorded for 'recover'."""
    # deferred on purpose: the store, hosts and registry side only for this command
    from unionimg.placement import apply as apply_mod
    from unionimg.placement import parts as parts_mod

    if here:  # the host's side, run by the controller's 'apply placement' over SSH
        if parts_json is not None:  # blob parts (split layers): keep, prune or assemble
            wanted = apply_mod.parts_from_arg(parts_json)
            if assemble:
                if url is None:
                    raise UsageError("apply placement --here --assemble: give --registry")
                out = parts_mod.assemble_here(c.store, wanted, url)
            elif prune:
                out = parts_mod.prune_here(c.store, wanted)
            else:
                out = parts_mod.keep_here(c.store, wanted, url)
            click.echo(json_text(out, sort_keys=True))
            return
        click.echo(json_text(apply_mod.drop_here(c.store, drops), sort_keys=True))
        return
    for value, option in (
        (system, "--from-store"),
        (servers_file, "--servers"),
        (url, "--registry"),
    ):
        if value is None:
            raise UsageError(f"apply placement: give {option} (see --help)")
    assert system is not None and servers_file is not None and url is not None
    text = _read_text(servers_file, "servers file")
    report = apply_mod.apply(
        c.store,
        system,
        text,
        url,
        method=method,
        objective=objective,
        time_limit=time_limit,
        source=shown(servers_file),
    )
    if as_json:
        click.echo(json_text(report.to_json(), sort_keys=True))
        return
    plan = report.plan
    click.echo(
        f"placement of system {system}: {plan['method']} ({plan['status']}), worst "
        f"recovery transfer {gib(int(str(plan['worst_bytes'])))}"
    )
    for h, d in report.hosts.items():
        click.echo(f"  {h}: {_host_line(d)}")


@click.command("recover")
@click.argument("vm")
@click.option(
    "--on",
    "host",
    default=None,
    metavar="HOST",
    help="The host to make VM on (from the layers the placement keeps there).",
)
@click.option("--boot", is_flag=True, help="Boot the VM once made.")
@click.option(
    "--no-replan",
    is_flag=True,
    help="Do not plan and apply the placement again without the failed server.",
)
@click.option("--here", is_flag=True, hidden=True)
@click.option("--layer", default=None, hidden=True)
@click.option("--mac", default=None, hidden=True)
@click.option("--hypervisor", default=None, hidden=True)
@click.option("--memory", type=ASCII_INT, default=None, hidden=True)
@click.option("--vcpus", type=ASCII_INT, default=None, hidden=True)
@click.option("--size", type=ASCII_INT, default=None, hidden=True)
@click.option("--nic-name", default="eth0", hidden=True)
@json_option
@pass_ctx
def recover_cmd(
    c: Ctx,
    vm: str,
    host: str | None,
    boot: bool,
    no_replan: bool,
    here: bool,
    layer: str | None,
    mac: str | None,
    hypervisor: str | None,
    memory: int | None,
    vcpus: int | None,
    size: int | None,
    nic_name: str,
    as_json: bool,
) -> None:
    """Make VM on HOST from the layers the applied placement keeps there (nothing sent when the
    plan says so), boot it with --boot, then plan and apply again without the failed server."""
    # deferred on purpose: the store, hosts, layer cache and boot side only for this command
    from unionimg.placement import apply as apply_mod

    if here:  # the host's side, run by the controller's 'recover' over SSH
        if layer is None or mac is None or hypervisor is None:
            raise UsageError("recover --here is run by 'recover VM --on HOST', not by hand")
        kw = {
            "mac": mac,
            "hypervisor": hypervisor,
            "memory": memory,
            "vcpus": vcpus,
            "size": size,
            "nic_name": nic_name,
        }
        out = apply_mod.recover_here(c.store, vm, layer, kw, boot=boot)
        click.echo(json_text(out, sort_keys=True))
        return
    if host is None:
        raise UsageError("give --on HOST: the host to recover VM on")
    res = apply_mod.recover(c.store, vm, host, boot=boot, replan=not no_replan)
    if as_json:
        click.echo(json_text(res, sort_keys=True))
        return
    click.echo(
        f"{vm} (its server {res['failed']} failed"
        + ("; pending since an earlier re-plan" if res.get("was_pending") else "")
        + f") made on {host}: "
        f"{len(res['layers_lacking'])} layer(s) lacking there, {res['bytes_pulled']} "
        f"bytes pulled (the plan: {res['planned_bytes']} bytes on {res['planned_target']})"
        + (", booted" if res["made"].get("booted") else "")
    )
    if "replan" in res:
        plan = res["replan"]["plan"]
        click.echo(
            f"placed again without {res['failed']}: {plan['method']}, worst recovery "
            f"transfer {gib(int(plan['worst_bytes']))}"
        )
        for h, d in res["replan"]["hosts"].items():
            click.echo(f"  {h}: {_host_line(d)}")


def _host_line(d: dict[str, Any]) -> str:
    line = f"{len(d['layers'])} layer(s) kept, {d['bytes_pulled']} bytes pulled"
    if d.get("removed"):
        line += f", {len(d['removed'])} removed ({d['bytes_freed']} bytes freed)"
    if d.get("in_use"):
        line += f", {len(d['in_use'])} no longer planned but in use there (kept)"
    return line
