"""``unionimg migrate VM --to HOST``, and ``migrate-in offer|push`` (what migrate runs on
the receiving host over SSH)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from unionimg.cli._common import Ctx, emit, hv_option, json_option, json_text, pass_ctx
from unionimg.display import shown
from unionimg.migrate import gc as gc_mod
from unionimg.migrate import pending, plan, receive, send
from unionimg.names import human_size, parse_size


@contextlib.contextmanager
def _bar(enabled: bool, what: str) -> Iterator[Any]:
    """A rich progress bar (bytes, rate, ETA) on a terminal's stderr; nothing otherwise."""
    if not enabled:
        yield None
        return
    # deferred on purpose: rich.progress takes ~60 ms to import and only a terminal needs it
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[wire]}"),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(what, total=None, wire="")

        def note(done: int, total: int, wire: int) -> None:
            bar.update(task, completed=done, total=total or None, wire=f"wire {human_size(wire)}")

        yield note


REASONS = {
    "new": "sent (found nowhere there)",
    "cache": "found in its object cache (an earlier transfer, or the VM's earlier stay)",
    "base": "found in a base generation there",
    "layer": "found in a snapshot layer there",
    "vm": "found in the upper layer of a stopped VM there",
}


def _finished(d: dict[str, Any]) -> None:
    name, host = shown(d["instance"]), shown(d["host"])
    if d["dry_run"]:
        click.echo(
            f"host {host} holds instance {name} already (an earlier migration stopped before "
            f"removing it here): would send nothing, keep its contents and remove it here"
        )
        return
    click.echo(
        f"host {host} held instance {name} already (an earlier migration stopped before "
        f"removing it here): sent nothing; {d['kept_for_way_back']} content(s) kept for the "
        "way back; removed here"
    )


FILE_ROWS = 20
"""At most this many per-file lines (delta or chunks) in the text output; --json has all."""


def _file_rows(files: list[dict[str, Any]]) -> None:
    """One line per content sent as a delta or as chunks: its path, how and why, its bytes
    in the stream against its size; the largest first, cut at :data:`FILE_ROWS`."""
    rows = [f for f in files if f["method"] in ("delta", "chunks")]
    rows.sort(key=lambda f: (-f["size"], f["path"]))
    for f in rows[:FILE_ROWS]:
        click.echo(
            f"    {shown(f['path'], 80)}: {human_size(f['payload'])} for "
            f"{human_size(f['size'])}, {shown(f['why'], 120)}"
        )
    if len(rows) > FILE_ROWS:
        click.echo(f"    ... and {len(rows) - FILE_ROWS} more (--json lists them all)")


def _human(d: dict[str, Any]) -> None:
    if d["finished_earlier"]:
        _finished(d)
        return
    p = d["plan"]
    verb = "would send" if d["dry_run"] else "sent"
    click.echo(
        f"instance {shown(d['instance'])} -> host {shown(d['host'])}: {p['files']} files "
        f"({human_size(p['file_bytes'])}), {p['contents']} distinct contents"
    )
    for why, row in sorted(p["by_reason"].items()):
        label = REASONS.get(why, why)
        click.echo(f"  {row['contents']:6d} contents {human_size(row['bytes']):>10}  {label}")
        for place, at in sorted(p["found"].items()):
            if at["reason"] != why:
                continue
            if why == "cache":
                continue  # the cache has no paths: its line above says it all
            for key, words in (("same_path", "same path"), ("elsewhere", "other paths")):
                sub = at[key]
                if sub["contents"]:
                    click.echo(
                        f"  {sub['contents']:15d} {human_size(sub['bytes']):>10}    in "
                        f"{shown(place)}, {words}"
                    )
    if p["layers_sent"]:
        click.echo(
            f"  {len(p['layers_sent'])} chain layer(s) it lacks: "
            f"{human_size(p['layer_bytes_sent'])} of blobs"
        )
    if d["deltas"]:
        click.echo(f"  {d['deltas']} changed file(s) as deltas on the base's version")
    if d.get("chunked"):
        click.echo(
            f"  {d['chunked']} large file(s) as content-defined chunks against the host's "
            "nearest version"
        )
    _file_rows(d.get("files", []))
    click.echo(f"{verb}: {d['stream_bytes']} bytes in one zstd stream ({d['seconds']} s)")
    if not d["dry_run"] and d["receiver"]:
        r = d["receiver"]
        click.echo(
            f"host made instance {shown(r['instance'])} (MAC {shown(r['mac'])}, "
            f"{shown(r['hypervisor'])}): {r['files_verified']} files verified by hash; "
            f"removed here"
        )


class _MigrateGroup(click.Group):
    """``migrate VM --to HOST`` (the group's own callback, its parameters those of
    :data:`_VM_PARAMS`) and ``migrate gc``: a first argument naming no subcommand, or any
    ``--to``, is a VM to migrate (so a VM called ``gc`` still migrates with ``--to``)."""

    def _migrates_a_vm(self, args: list[str]) -> bool:
        to = any(a == "--to" or a.startswith("--to=") for a in args)
        return bool(args) and (to or args[0] not in self.commands)

    def _vm(self) -> click.Command:
        return click.Command(self.name, params=_vm_params(), callback=_migrate_vm)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not self._migrates_a_vm(args):
            return super().parse_args(ctx, args)
        ctx.meta["unionimg.migrate_vm"] = True
        ctx.allow_interspersed_args = True
        ctx.allow_extra_args = False
        return self._vm().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.meta.get("unionimg.migrate_vm"):
            return ctx.invoke(_migrate_vm, **ctx.params)
        return super().invoke(ctx)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        vm = self._vm()
        formatter.write_usage(ctx.command_path, " ".join(vm.collect_usage_pieces(ctx)))
        formatter.write_usage(ctx.command_path, "gc [OPTIONS]", prefix="   or: ")

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self._vm().format_options(ctx, formatter)
        self.format_commands(ctx, formatter)


def _vm_params() -> list[click.Parameter]:
    """The parameters of ``migrate VM --to HOST`` (made anew for each parse)."""

    @click.command()
    @click.argument("vm")
    @click.option("--to", "host", required=True, help="The host (see 'unionimg host list').")
    @click.option(
        "--bandwidth",
        default=None,
        help="Cap the stream's rate: 50mbit, 6M (bytes/s), 800k (default: no cap).",
    )
    @click.option("--dry-run", is_flag=True, help="Say what would be sent and why; send nothing.")
    @click.option(
        "--level",
        type=click.IntRange(1, 22),
        default=9,
        show_default=True,
        help="zstd level of the stream.",
    )
    @click.option(
        "--whole-layers",
        is_flag=True,
        help="Send chain layers the host lacks as their blobs, not by content.",
    )
    @hv_option
    @json_option
    def holder() -> None:
        """Only carries the parameters."""

    return holder.params


@pass_ctx
def _migrate_vm(c: Ctx, vm: str, host: str, bandwidth: str | None, dry_run: bool, level: int,
                whole_layers: bool, hypervisor: str | None, as_json: bool) -> None:  # fmt: skip
    rate = plan.parse_rate(bandwidth) if bandwidth is not None else None
    with _bar(sys.stderr.isatty() and not as_json and not dry_run, f"{vm} -> {host}") as note:
        out = send.migrate(
            c.store, vm, host, rate=rate, dry_run=dry_run, hypervisor=hypervisor, level=level,
            progress=note, whole_layers=whole_layers,
        )  # fmt: skip
    emit(out.to_json(), as_json, _human)


@click.group("migrate", cls=_MigrateGroup)
def migrate_cmd() -> None:
    """Move stopped VM to HOST, sending only the content HOST has nowhere (its base
    generations, layers, earlier transfers): the host verifies every file by hash and makes
    the VM (same MAC); only then is it removed here.

    Files are matched by sha256 wherever the host holds them, whatever their path; the rest
    travels as one zstd stream. A broken transfer resumes when run again: the host keeps
    what arrived and checked. The VM's contents stay in this store's cache, so migrating it
    back sends only what changed meanwhile.

    'migrate gc' bounds that cache (run it from cron or a systemd timer).
    """


GC_WHY = {
    "tmp": "temporary file(s) of writers that are gone",
    "offer": "offer(s) kept over a day, no stream followed",
    "vm-index": "hash index(es) of VMs no longer here",
    "layer-index": "hash index(es) of layers no longer here",
    "redundant": "object(s) held elsewhere here (a base, a layer, a stopped VM)",
    "lru": "object(s) least recently used, over --max-size",
}


def _gc_human(d: dict[str, Any]) -> None:
    verb = "would remove" if d["dry_run"] else "removed"
    for why, label in GC_WHY.items():
        row = d["by_reason"].get(why)
        if row:
            click.echo(f"{verb} {row['files']:6d} {human_size(row['bytes']):>10}  {label}")
    click.echo(
        f"object cache: {d['objects_before']} objects ({human_size(d['bytes_before'])}) -> "
        f"{d['objects_after']} ({human_size(d['bytes_after'])}); "
        f"{'would free' if d['dry_run'] else 'freed'} {d['bytes_freed']} bytes"
    )
    if d["still_over"]:
        click.echo(
            f"still over --max-size {human_size(d['max_size'])}: {d['protected']} object(s) "
            "are needed by a migration under way or broken, or by a VM being migrated away"
        )


def _max_size(text: str | None) -> int | None:
    if text is None:
        return None
    return 0 if text.strip("0") == "" and text else parse_size(text, "--max-size")


@migrate_cmd.command("gc")
@click.option(
    "--max-size",
    default=None,
    metavar="SIZE",
    help="Then evict the least recently used objects until the cache holds at most SIZE "
    "(4G, 500M; 0: every object not needed).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
@pass_ctx
def migrate_gc_cmd(c: Ctx, max_size: str | None, dry_run: bool, as_json: bool) -> None:
    """Bound this store's migration object cache (migrate/objects): remove the temporary files
    of dead writers, stale offers and hash indexes, objects whose content a base generation, a
    layer or a stopped VM here holds too, then, with --max-size, the least recently used
    objects until the cache fits.

    Contents that a migration under way or broken (a kept offer) or a VM being migrated away
    (its pending record) needs are never removed. Refused while a migration is being received
    here.
    """
    out = gc_mod.gc(c.store, max_size=_max_size(max_size), dry_run=dry_run)
    emit(out.to_json(), as_json, _gc_human)


@click.group("migrate-in")
def migrate_receive() -> None:
    """What 'migrate' runs on the receiving host over SSH (not for use by hand)."""


@migrate_receive.command("offer")
@hv_option
@pass_ctx
def receive_offer(c: Ctx, hypervisor: str | None) -> None:
    """Read a migration offer (zstd-compressed JSON) on stdin; print what this store lacks
    (JSON)."""
    offer = receive.read_offer(sys.stdin.buffer, c.store)
    click.echo(json_text(receive.answer(c.store, offer, hypervisor).to_json(), sort_keys=True))


@migrate_receive.command("status")
@click.argument("name")
@click.argument("mac")
@click.argument("digest")
@pass_ctx
def receive_status(c: Ctx, name: str, mac: str, digest: str) -> None:
    """Say (JSON) whether instance NAME with MAC, made from the offer DIGEST, is here."""
    click.echo(json_text(pending.status(c.store, name, mac, digest).to_json(), sort_keys=True))


@migrate_receive.command("push")
@hv_option
@json_option
@pass_ctx
def receive_push(c: Ctx, hypervisor: str | None, as_json: bool) -> None:
    """Read a migration stream on stdin, make the VM here; print what was done."""
    with os.fdopen(os.dup(0), "rb", buffering=0) as raw:
        done = receive.receive(c.store, raw, hypervisor)
    emit(
        done.to_json(),
        as_json,
        lambda d: click.echo(json.dumps(d, sort_keys=True)),
    )
