"""``unionimg snapshot ...`` and ``unionimg restore``: repeated, differential snapshots of a
running VM (memory + U), copied to other hosts, restored there (issue 16;
:mod:`unionimg.snapshots`). Not ``instance snapshot``, which freezes U into a layer."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from unionimg import hosts
from unionimg.cli._common import ASCII_INT, Ctx, emit, json_option, pass_ctx
from unionimg.display import shown
from unionimg.errors import UsageError
from unionimg.snapshots import core, policy, remote, schedule


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _duration(value: str | None, what: str) -> float | None:
    return None if value is None else policy.parse_duration(value, what)


@click.group()
def snapshot() -> None:
    """VM snapshots: memory and disk state as shared chunks, repeated, copied off the host."""


@snapshot.command("take")
@click.argument("vm")
@click.option("--keep", type=ASCII_INT, default=None, help="Then keep only the N newest.")
@click.option("--older-than", default=None, help="Then remove snapshots older than this (30m, 7d).")
@click.option("--to", "to", default=None, help="Then copy it to this host (see 'host add').")
@json_option
@pass_ctx
def take_cmd(
    c: Ctx, vm: str, keep: int | None, older_than: str | None, to: str | None, as_json: bool
) -> None:
    """Snapshot VM now: a kvm guest's memory and U image at one point (paused briefly, then
    running on); a uml guest's U only, its file systems synced (UML cannot save memory); a
    VM that does not run, its U. Only chunks the store lacks are written."""
    age = _duration(older_than, "--older-than")
    taken = core.take(c.store, vm, keep=keep, older_than=age)
    out = taken.to_json()
    if to is not None:
        out["push"] = remote.push(c.store, vm, to, taken.record.id)

    def human(o: dict[str, Any]) -> None:
        click.echo(
            f"snapshot {o['id']} of {vm} ({o['kind']}): {_human_bytes(o['data_bytes'])} of data, "
            f"{_human_bytes(o['new_bytes'])} new in the store, guest paused {o['pause_s']:.2f} s"
        )
        if o["removed"]:
            click.echo(f"removed snapshots {', '.join(map(str, o['removed']))}")
        if "push" in o:
            p = o["push"]
            click.echo(
                f"copied to {p['host']}: {p['chunks_sent']} of {p['chunks']} chunks "
                f"({_human_bytes(p['bytes_sent'])})"
            )

    emit(out, as_json, human)


@snapshot.command("list")
@click.argument("vm", required=False)
@json_option
@pass_ctx
def list_cmd(c: Ctx, vm: str | None, as_json: bool) -> None:
    """List the snapshots of VM (of every VM without it): data, new bytes, pause."""
    vms = [vm] if vm else core.all_vms(c.store)
    rows = [core.describe(s) for name in vms for s in core.list_snapshots(c.store, name)]

    def human(rows: list[dict[str, Any]]) -> None:
        click.echo("VM\tID\tCREATED\tKIND\tDATA\tNEW\tPAUSE")
        for r in rows:
            click.echo(
                f"{r['vm']}\t{r['id']}\t{r['created']}\t{r['kind']}\t"
                f"{_human_bytes(r['data_bytes'])}\t{_human_bytes(r['new_bytes'])}\t"
                f"{r['pause_s']:.2f}s"
            )

    emit(rows, as_json, human)


@snapshot.command("rm")
@click.argument("vm")
@click.argument("ids", nargs=-1, type=ASCII_INT, required=True)
@pass_ctx
def rm_cmd(c: Ctx, vm: str, ids: tuple[int, ...]) -> None:
    """Remove snapshots IDS of VM, then the chunks no snapshot names any more."""
    done = core.remove(c.store, vm, list(ids))
    click.echo(f"removed snapshots {', '.join(map(str, done))} of {vm}")


@snapshot.command("prune")
@click.argument("vm")
@click.option("--keep", type=ASCII_INT, default=None, help="Keep the N newest.")
@click.option("--older-than", default=None, help="Remove those older than this (30m, 7d).")
@pass_ctx
def prune_cmd(c: Ctx, vm: str, keep: int | None, older_than: str | None) -> None:
    """Retention: remove VM's snapshots beyond --keep N or older than --older-than (never
    the newest), then the chunks no snapshot names."""
    if keep is None and older_than is None:
        raise UsageError("give --keep N and/or --older-than DURATION")
    if keep is not None and keep < 1:
        raise UsageError(f"--keep {keep}: keep at least 1")
    done = core.prune(c.store, vm, keep=keep, older_than=_duration(older_than, "--older-than"))
    click.echo(f"removed snapshots {', '.join(map(str, done)) or 'none'} of {vm}")


@snapshot.command("gc")
@pass_ctx
def gc_cmd(c: Ctx) -> None:
    """Remove the chunks no snapshot names (rm and prune do this themselves)."""
    count, size = core.gc(c.store)
    click.echo(f"removed {count} chunks ({_human_bytes(size)})")


@snapshot.command("push")
@click.argument("vm")
@click.option("--to", "to", required=True, help="The host (see 'host add').")
@click.option("--at", "at", type=ASCII_INT, default=None, help="Snapshot ID (default: latest).")
@json_option
@pass_ctx
def push_cmd(c: Ctx, vm: str, to: str, at: int | None, as_json: bool) -> None:
    """Copy a snapshot of VM to host TO: only the chunks it lacks, each checked there."""
    out = remote.push(c.store, vm, to, at)

    def human(p: dict[str, Any]) -> None:
        click.echo(
            f"copied snapshot {p['id']} of {vm} to {p['host']}: {p['chunks_sent']} of "
            f"{p['chunks']} chunks ({_human_bytes(p['bytes_sent'])})"
        )

    emit(out, as_json, human)


@snapshot.command("schedule")
@click.argument("vm")
@click.option(
    "--min", "low", default=policy.DEFAULT_MIN, show_default=True, help="Interval when idle."
)
@click.option(
    "--max", "high", default=policy.DEFAULT_MAX, show_default=True, help="Interval when busy."
)
@click.option("--to", "to", default=None, help="Copy each snapshot to this host.")
@click.option("--keep", type=ASCII_INT, default=None, help="Keep only the N newest.")
@click.option("--count", type=ASCII_INT, default=None, help="Stop after N snapshots.")
@click.option("--for", "duration", default=None, help="Stop after this long (e.g. 1h).")
@pass_ctx
def schedule_cmd(
    c: Ctx,
    vm: str,
    low: str,
    high: str,
    to: str | None,
    keep: int | None,
    count: int | None,
    duration: str | None,
) -> None:
    """Snapshot VM again and again: the interval follows the guest's CPU load between --min
    (idle) and --max (busy). One schedule per VM; each round is logged in the store
    (snapshots/vms/VM/schedule.log)."""
    lo = policy.parse_duration(low, "--min")
    hi = policy.parse_duration(high, "--max")
    if keep is not None and keep < 1:
        raise UsageError(f"--keep {keep}: keep at least 1")
    if count is not None and count < 1:
        raise UsageError(f"--count {count}: give at least 1")
    schedule.run(
        c.store,
        vm,
        low=lo,
        high=hi,
        to=to,
        keep=keep,
        count=count,
        duration=_duration(duration, "--for"),
        say=lambda line: click.echo(shown(line)),
    )


@snapshot.command("missing", hidden=True)
@pass_ctx
def missing_cmd(c: Ctx) -> None:
    """Plumbing for 'push': read chunk digests on stdin, print those this store lacks."""
    for d in remote.missing_here(c.store, sys.stdin.read(64 << 20).splitlines()):
        click.echo(d)


@snapshot.command("receive", hidden=True)
@click.argument("vm")
@pass_ctx
def receive_cmd(c: Ctx, vm: str) -> None:
    """Plumbing for 'push': read chunks and a snapshot record of VM on stdin."""
    out = remote.receive(c.store, vm)
    click.echo(f"received snapshot {out['id']} of {vm} ({out['chunks_received']} chunks)")


@click.command("restore")
@click.argument("vm")
@click.option("--at", "at", type=ASCII_INT, default=None, help="Snapshot ID (default: latest).")
@click.option("--on", "on", default=None, help="Restore on this host (its copy of the snapshot).")
@json_option
@pass_ctx
def restore_cmd(c: Ctx, vm: str, at: int | None, on: str | None, as_json: bool) -> None:
    """Bring VM back from a snapshot: U rebuilt from its chunks and, for a memory snapshot,
    the guest resumed where it was.

    With --on, on that host: the snapshot pushed there ('snapshot push', 'take --to'), its
    base generation there (deploy it first); the VM is made there if the host lacks it."""
    if on is not None:
        args = ["restore", vm] + (["--at", str(at)] if at is not None else [])
        out = hosts.get(c.store, on).run_json(args, timeout=600, what="restore")
        if not isinstance(out, dict):
            raise UsageError(f"host {on}: restore printed no JSON object")
        out["host"] = on
        if as_json:
            click.echo(json.dumps(out, indent=2, sort_keys=True))
            return
    else:
        out = core.restore(c.store, vm, at)

    def human(o: dict[str, Any]) -> None:
        where = f" on {o['host']}" if "host" in o else ""
        state = "running" if o.get("state") == "running" else "stopped (U restored)"
        click.echo(
            f"restored {vm} from snapshot {o.get('id')}{where} in {o.get('seconds')} s: {state}"
        )

    emit(out, as_json, human)
