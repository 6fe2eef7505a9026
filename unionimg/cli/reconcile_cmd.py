"""``unionimg reconcile``, ``conflicts``, ``resolve``: base updates merged into instances."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from unionimg.cli._common import (
    ASCII_INT,
    Ctx,
    emit,
    exit_with,
    full_disk,
    json_option,
    json_text,
    pass_ctx,
)
from unionimg.display import shown
from unionimg.errors import UsageError
from unionimg.layers import instance as inst_mod
from unionimg.reconcile import apply as rec
from unionimg.reconcile.checks import NOT_NEEDED
from unionimg.reconcile.policy import Policy, load_policy
from unionimg.reconcile.structured import RENUMBERED
from unionimg.store.layout import Store


@click.command("reconcile")
@click.argument("vms", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every instance in the store.")
@click.option("--to-generation", type=ASCII_INT, default=None, help="Default: the base's latest.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan that apply would execute (the consistency checks are not run).",
)
@click.option(
    "--no-checks",
    is_flag=True,
    help="Swap without the consistency checks of the staged result (dpkg --audit, apt-get "
    "check, pwck/grpck -r, dpkg --verify): for a host without those programs.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML policy: per-glob merge | keep-local | take-base | fail.",
)
@click.option(
    "--jobs",
    type=ASCII_INT,
    default=lambda: min((os.cpu_count() or 1) + 1, 8),
    show_default="one more than the CPUs, at most 8",
    help="Instances reconciled in parallel (each also waits on disk flushes, so one more "
    "than the CPUs keeps them busy).",
)
@click.option(
    "--undo",
    is_flag=True,
    help="Restore VM's upper layer and generation to before its last reconcile (refused, "
    "naming what changed, if VM changed since; exit 3 if that generation is gone).",
)
@json_option
@pass_ctx
def reconcile_cmd(
    c: Ctx,
    vms: tuple[str, ...],
    all_: bool,
    to_generation: int | None,
    dry_run: bool,
    no_checks: bool,
    policy_file: Path | None,
    jobs: int,
    undo: bool,
    as_json: bool,
) -> None:
    """Merge base updates into instances' upper layers (exit 0 clean, 1 conflicts, 10 an
    instance failed, 7 only space was lacking: free it and rerun).

    Conflicts of earlier runs still pending are counted on each instance's line. A path
    policy 'fail' stops at holds the instance whole on its generation and is recorded as
    a held conflict: 'resolve' settles it for the next reconcile."""
    if undo:
        if len(vms) != 1 or all_:
            raise UsageError("--undo takes exactly one VM")
        out = rec.undo(c.store, vms[0])
        emit(
            out, as_json, lambda d: click.echo(f"{d['name']}: back to generation {d['generation']}")
        )
        return
    if bool(vms) == all_:
        raise UsageError("name instances to reconcile, or give --all")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    policy = load_policy(policy_file)
    names = [i.name for i in inst_mod.list_instances(c.store)] if all_ else list(vms)
    for n in names:
        inst_mod.load(c.store, n)
    reports = _run_reconcile(
        c.store, names, policy, dry_run, to_generation, jobs, as_json, checks=not no_checks
    )
    unsaved = None
    try:
        rec.save_report(c.store, reports, dry_run=dry_run)
    except OSError as exc:  # what was reconciled stands; the report alone is missing
        unsaved = full_disk(exc, c)
        if unsaved is None:
            raise
    if as_json:
        click.echo(json_text({"dry_run": dry_run, "instances": [r.to_json() for r in reports]}))
    if unsaved is not None:
        raise unsaved
    code = rec.exit_code(reports)
    if code:
        exit_with(code)


def _run_reconcile(
    store: Store,
    names: list[str],
    policy: Policy,
    dry_run: bool,
    to_generation: int | None,
    jobs: int,
    as_json: bool,
    *,
    checks: bool = True,
) -> list[rec.InstanceReport]:
    def line(r: rec.InstanceReport) -> str:
        verb = "would " if dry_run else ""
        if r.status == "error":  # a failed consistency check: one more line per check
            first, *more = (r.error or "").split("\n")
            return f"{r.name}: error: {shown(first, backslash=False)}" + "".join(
                f"\n{shown(m, backslash=False)}" for m in more
            )
        new = [x for x in r.conflicts if not x.pending]
        earlier = len(r.conflicts) - len(new)
        pending = (
            f"; {earlier} conflict(s) still pending (see 'unionimg conflicts {r.name}')"
            if earlier
            else ""
        )
        if r.from_generation == r.to_generation and not r.actions:
            return f"{r.name}: generation {r.to_generation}, nothing to do{pending}"
        changed = sum(1 for a in r.actions if a.action in ("drop", "write", "set-meta"))
        # case 16: base changes an opaque directory of the VM keeps hiding (issue 12, item 6)
        hidden = [a for a in r.actions if a.case == 16 and a.action == "report"]
        hides = f", {len(hidden)} opaque director(ies) hiding base changes" if hidden else ""
        # the VM's system accounts the user databases' merge renumbered (issue 12, item 3):
        # the same moves are said by each of the four files; passwd's line says it once
        moved = sorted(
            (a for a in r.actions if a.case == 5 and RENUMBERED in a.reason),
            key=lambda a: a.path != "/etc/passwd",
        )[:1]
        return (
            f"{r.name}: generation {r.from_generation} -> {r.to_generation}: {verb}change "
            f"{changed} path(s), {len(new)} conflict(s){hides}{pending}"
            + "".join(
                f"\n  conflict {shown(x.path)}: {shown(x.reason, backslash=False)}" for x in new
            )
            + "".join(
                f"\n  hidden {shown(a.path)}: {shown(a.reason, backslash=False)}" for a in hidden
            )
            + "".join(f"\n  {shown(a.path)}: {shown(a.reason, backslash=False)}" for a in moved)
            # packages both sides changed that the newer version settled (issue 12, item 2)
            + "".join(
                f"\n  package {shown(line, backslash=False)}"
                for a in r.actions
                for line in a.packages
            )
            + (f"\n  checks: {r.checks}" if r.checks and r.checks != NOT_NEEDED else "")
        )

    if sys.stderr.isatty() and not as_json:
        # deferred on purpose: rich.progress takes ~60 ms to import and only a terminal
        # gets the progress bar (scripts, the timer and --json never need it)
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("reconciling", total=len(names))

            def tick(r: rec.InstanceReport) -> None:
                bar.advance(task)
                bar.console.print(line(r), markup=False, highlight=False)

            return rec.Reconciler(
                store,
                policy,
                dry_run=dry_run,
                to_generation=to_generation,
                progress=tick,
                checks=checks,
            ).run(names, jobs)

    def echo(r: rec.InstanceReport) -> None:
        if not as_json:
            click.echo(line(r))

    return rec.Reconciler(
        store, policy, dry_run=dry_run, to_generation=to_generation, progress=echo, checks=checks
    ).run(names, jobs)


@click.command("conflicts")
@click.argument("vm")
@json_option
@pass_ctx
def conflicts_cmd(c: Ctx, vm: str, as_json: bool) -> None:
    """Conflicts a reconcile left for VM, with where their versions are kept."""
    rows = rec.list_conflicts(c.store, vm)

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo(f"{vm}: no conflicts")
        for r in rows:
            click.echo(
                f"{shown(r['path'])}\t{shown(r['reason'], backslash=False)}\t{shown(r['dir'])}"
            )

    emit(rows, as_json, human)


@click.command("resolve")
@click.argument("vm")
@click.argument("path", required=False)
@click.option(
    "--take",
    type=click.Choice(["local", "base", "merged", "proposal"]),
    default=None,
    help="proposal: a user database conflict's renumbering, with its chowns.",
)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path),
    default=None,
    help="Use this file's content for PATH.",
)
@click.option(
    "--package",
    default=None,
    help="A package conflict of dpkg's status (NAME or NAME:ARCH) instead of a PATH: "
    "--take base|local applies its paragraph, info files and files together.",
)
@pass_ctx
def resolve_cmd(
    c: Ctx, vm: str, path: str | None, take: str | None, file: Path | None, package: str | None
) -> None:
    """Settle one conflict of VM; recorded in its history.

    A conflict policy 'fail' held (the VM stayed on its generation) is settled by the next
    reconcile to that generation: --take base/local decide the path there, --take
    merged/--file write it now and keep it. A package both sides changed is settled whole
    with --package (--take base of the status file or of the package's files is refused
    while it is pending: it would leave the package half one side's, half the other's)."""
    if package is not None:
        if path is not None or file is not None or take not in ("base", "local"):
            raise UsageError("--package takes no PATH and no --file, and --take base or local")
        out = rec.resolve_package(c.store, vm, package, take=take)
        click.echo(f"resolved package {shown(out['package'])} in {vm}: took {shown(out['took'])}")
        for kept in out["kept_conffiles"]:
            click.echo(f"  kept the VM's edited conffile {shown(kept)} (as dpkg keeps it)")
        if out["pending_packages"]:
            click.echo(f"  still pending: {', '.join(shown(p) for p in out['pending_packages'])}")
        return
    if path is None:
        raise UsageError("give the PATH of a conflict, or --package NAME")
    out = rec.resolve(c.store, vm, path, take=take, file=file)
    click.echo(f"resolved {shown(out['path'])} in {out['name']}: took {shown(out['took'])}")
    if "applied_by" in out:  # a conflict policy 'fail' held: the VM is still on its generation
        click.echo(f"  (held by policy fail: applied by '{out['applied_by']}')")
