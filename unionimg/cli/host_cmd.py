"""``unionimg host ...``: hosts reached over SSH that run unionimg (deploy targets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from unionimg import hosts as hosts_mod
from unionimg.cli._common import ASCII_INT, Ctx, emit, json_option, pass_ctx
from unionimg.display import shown


@click.group()
def host() -> None:
    """Hosts: other machines running unionimg, reached over SSH, to deploy systems to."""


@host.command("add")
@click.argument("name")
@click.option(
    "--ssh", "ssh", required=True, help="USER@ADDRESS to log in as (e.g. root@192.0.2.7)."
)
@click.option("--store", "remote_store", required=True, help="The host's store (absolute path).")
@click.option("--port", type=ASCII_INT, default=22, show_default=True, help="SSH port.")
@click.option(
    "--unionimg",
    "program",
    default="unionimg",
    show_default=True,
    help="The unionimg program on the host (name on its PATH, or absolute path).",
)
@click.option(
    "--host-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file with the host's SSH public key (its ssh_host_*_key.pub): the host must show "
    "it. Without it, the keys the host shows now are trusted from here on.",
)
@pass_ctx
def host_add(
    c: Ctx,
    name: str,
    ssh: str,
    remote_store: str,
    port: int,
    program: str,
    host_key: Path | None,
) -> None:
    """Record host NAME: its SSH host key, and that unionimg runs there with the store's
    key (authorize the line 'unionimg host key' prints on the host first)."""
    meta, version = hosts_mod.add(
        c.store, name, ssh, remote_store, port=port, unionimg=program, host_key=host_key
    )
    click.echo(
        f"added host {meta.name}: {meta.user}@{meta.addr}:{meta.port}, store {meta.store} "
        f"({shown(version)})"
    )


@host.command("key")
@pass_ctx
def host_key_cmd(c: Ctx) -> None:
    """Print the store's SSH public key (made on first use): authorize it on each host."""
    click.echo(hosts_mod.public_key(c.store))


@host.command("list")
@json_option
@pass_ctx
def host_list(c: Ctx, as_json: bool) -> None:
    """List the recorded hosts."""
    rows = [m.to_json() for m in hosts_mod.list_hosts(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            click.echo(f"{r['name']}\t{r['user']}@{r['addr']}:{r['port']}\t{r['store']}")

    emit(rows, as_json, human)


@host.command("cache")
@click.argument("name")
@json_option
@pass_ctx
def host_cache(c: Ctx, name: str, as_json: bool) -> None:
    """The layers host NAME holds (asked over SSH: 'unionimg layer list' there)."""
    rows = hosts_mod.cache(hosts_mod.get(c.store, name))

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            click.echo(
                f"{r['diff_id'][7:19]}  {r['kind']:<8} {r['blob_size']:>12}  {shown(r['origin'])}"
            )

    emit(rows, as_json, human)


@host.command("remove")
@click.argument("name")
@pass_ctx
def host_remove(c: Ctx, name: str) -> None:
    """Forget host NAME (its record and recorded key; nothing on the host changes)."""
    hosts_mod.remove(c.store, name)
    click.echo(f"removed host {name}")
