"""``unionimg timer ...``: 'reconcile --all' run unattended."""

from __future__ import annotations

from pathlib import Path

import click

from unionimg import timer as timer_mod
from unionimg.cli._common import Ctx, pass_ctx


@click.group()
def timer() -> None:
    """Run 'reconcile --all' unattended (systemd timer, or cron where systemd does not run)."""


@timer.command("install")
@click.option("--every", default="15m", show_default=True, help="15m, 2h, 1d ...")
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Install below this directory (for an image being prepared).",
)
@pass_ctx
def timer_install(c: Ctx, every: str, root: Path) -> None:
    """Install the schedule (replaces an earlier one)."""
    for path in timer_mod.install(every, c.store.root, root):
        click.echo(f"wrote {path}")


@timer.command("remove")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@pass_ctx
def timer_remove(c: Ctx, root: Path) -> None:
    """Remove the schedule."""
    removed = timer_mod.remove(root)
    click.echo("\n".join(f"removed {p}" for p in removed) or "no schedule installed")
