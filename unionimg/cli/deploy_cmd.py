"""``unionimg deploy`` and ``redeploy``: a system node onto hosts through a registry."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click

from unionimg import deploy as deploy_mod
from unionimg.cli._common import Ctx, exit_with, json_option, json_text, pass_ctx
from unionimg.display import shown
from unionimg.names import human_size


def _options(f: Callable[..., None]) -> Callable[..., None]:
    f = json_option(f)
    f = click.option("--boot", is_flag=True, help="Boot the VMs once made on each host.")(f)
    f = click.option(
        "--host-registry",
        default=None,
        help="The registry's URL as the hosts reach it (default: --registry).",
    )(f)
    f = click.option("--registry", "url", required=True, help="The registry, http://HOST:PORT.")(f)
    f = click.option(
        "--host", "host_names", multiple=True, required=True, help="A host (repeat it)."
    )(f)
    return click.argument("system")(f)


@contextlib.contextmanager
def _bars(enabled: bool) -> Iterator[deploy_mod.Watcher | None]:
    """One rich progress bar per host on a terminal's stderr; nothing otherwise."""
    if not enabled:
        yield None
        return
    # deferred on purpose: rich.progress takes ~60 ms to import and only a terminal needs it
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:

        def watch(host: str, phase: str, done: int, total: int) -> None:
            if phase == "alive":  # the host's heartbeat: nothing to show
                return
            if host not in tasks:
                tasks[host] = bar.add_task(host, total=None, amount="")
            amount = (
                f"{human_size(done)} / {human_size(total)}"
                if phase == "pull"
                else (f"{done} / {total}" if phase in ("vm", "boot") else "")
            )
            bar.update(
                tasks[host], description=f"{shown(host)}: {phase}", completed=done,
                total=total or None, amount=amount,
            )  # fmt: skip

        yield watch


def _run(c: Ctx, system: str, host_names: tuple[str, ...], url: str, host_registry: str | None,
         boot: bool, as_json: bool, replace: bool) -> None:  # fmt: skip
    with _bars(sys.stderr.isatty() and not as_json) as watch:
        report = deploy_mod.deploy(
            c.store, system, list(host_names), url, host_registry=host_registry,
            replace=replace, boot=boot, watch=watch,
        )  # fmt: skip
    if as_json:
        click.echo(json_text(report.to_json(), sort_keys=True))
    else:
        for h in report.hosts:
            if not h.ok:
                continue
            d = h.to_json()  # what the host said: counted and escaped, never printed raw
            click.echo(
                f"{h.host}: system {system} {'re' if replace else ''}deployed: "
                f"{len(d['vms'])} VM(s), {len(d['imported'])} layer(s) pulled "
                f"({d['bytes_pulled']} bytes), {d['cache_hits']} of {d['layers']} cached"
                + (f", booted {shown(', '.join(map(str, d['booted'])))}" if d["booted"] else "")
                + f", {d['seconds']} s"
            )
    failed = report.failed()
    for h in failed:
        click.echo(f"unionimg: error: {shown(h.error, backslash=False)}", err=True)
    if failed:
        exit_with(failed[0].exit_code)


@click.command("deploy")
@_options
@pass_ctx
def deploy_cmd(c: Ctx, system: str, host_names: tuple[str, ...], url: str,
               host_registry: str | None, boot: bool, as_json: bool) -> None:  # fmt: skip
    """Deploy system node SYSTEM to hosts: push it to the registry, each host pulls only the
    layers it lacks and makes the VMs (MACs kept); --boot boots them."""
    _run(c, system, host_names, url, host_registry, boot, as_json, replace=False)


@click.command("redeploy")
@_options
@pass_ctx
def redeploy_cmd(c: Ctx, system: str, host_names: tuple[str, ...], url: str,
                 host_registry: str | None, boot: bool, as_json: bool) -> None:  # fmt: skip
    """Deploy another node SYSTEM of the system tree where an earlier deploy made its VMs:
    the hosts pull only the layers they lack and replace those VMs (stopped ones)."""
    _run(c, system, host_names, url, host_registry, boot, as_json, replace=True)
