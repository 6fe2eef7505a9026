"""``unionimg status``, ``commit``, ``log``: an instance's local changes and their history."""

from __future__ import annotations

from typing import Any

import click

from unionimg.cli._common import Ctx, emit, json_option, pass_ctx, print_log
from unionimg.display import shown
from unionimg.layers import status as status_mod


@click.command("status")
@click.argument("vm")
@json_option
@pass_ctx
def status_cmd(c: Ctx, vm: str, as_json: bool) -> None:
    """VM's local changes against its base generation, read from its upper layer."""
    data = status_mod.status(c.store, vm)

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"{d['name']}: base {d['base']} generation {d['generation']}"
            + (
                f" (generation {d['latest_generation']} is available)"
                if d["newer_generation"]
                else ""
            )
        )
        for key, mark in (
            ("added", "A"),
            ("modified", "M"),
            ("deleted", "D"),
            ("metadata", "m"),
            ("opaque", "O"),
            ("identical", "="),
            ("special", "!"),
        ):
            for p in d[key]:
                click.echo(f"{mark} {shown(p)}")  # a guest's name: one visible line

    emit(data, as_json, human)


@click.command("commit")
@click.argument("vm")
@click.option("-m", "--message", default=None)
@pass_ctx
def commit_cmd(c: Ctx, vm: str, message: str | None) -> None:
    """Record VM's current local changes in its Mercurial history."""
    node = status_mod.commit(c.store, vm, message)
    click.echo(f"committed {node[:12]}" if node else "nothing changed")


@click.command("log")
@click.argument("vm")
@json_option
@pass_ctx
def log_cmd(c: Ctx, vm: str, as_json: bool) -> None:
    """VM's Mercurial history."""
    print_log(status_mod.log(c.store, vm), as_json)
