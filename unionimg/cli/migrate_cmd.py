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
from unionimg.migrate import pending, plan, receive, send
from unionimg.names import human_size


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
    click.echo(f"{verb}: {d['stream_bytes']} bytes in one zstd stream ({d['seconds']} s)")
    if not d["dry_run"] and d["receiver"]:
        r = d["receiver"]
        click.echo(
            f"host made instance {shown(r['instance'])} (MAC {shown(r['mac'])}, "
            f"{shown(r['hypervisor'])}): {r['files_verified']} files verified by hash; "
            f"removed here"
        )


@click.command("migrate")
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
@pass_ctx
def migrate_cmd(c: Ctx, vm: str, host: str, bandwidth: str | None, dry_run: bool, level: int,
                whole_layers: bool, hypervisor: str | None, as_json: bool) -> None:  # fmt: skip
    """Move stopped VM to HOST, sending only the content HOST has nowhere (its base
    generations, layers, earlier transfers): the host verifies every file by hash and makes
    the VM (same MAC); only then is it removed here.

    Files are matched by sha256 wherever the host holds them, whatever their path; the rest
    travels as one zstd stream. A broken transfer resumes when run again: the host keeps
    what arrived and checked. The VM's contents stay in this store's cache, so migrating it
    back sends only what changed meanwhile.
    """
    rate = plan.parse_rate(bandwidth) if bandwidth is not None else None
    with _bar(sys.stderr.isatty() and not as_json and not dry_run, f"{vm} -> {host}") as note:
        out = send.migrate(
            c.store, vm, host, rate=rate, dry_run=dry_run, hypervisor=hypervisor, level=level,
            progress=note, whole_layers=whole_layers,
        )  # fmt: skip
    emit(out.to_json(), as_json, _human)


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
