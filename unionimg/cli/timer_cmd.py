"""``unionimg timer ...``: 'reconcile --all' run unattended."""

from __future__ import annotations

from pathlib import Path

import click

from unionimg import timer as timer_mod
from unionimg.cli._common import Ctx, exit_with, pass_ctx


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
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML reconcile policy the scheduled runs use (checked now; its absolute path "
    "is recorded). Default: the shipped rules alone.",
)
@pass_ctx
def timer_install(c: Ctx, every: str, root: Path, policy_file: Path | None) -> None:
    """Install the schedule (replaces an earlier one).

    The schedule runs 'unionimg timer run' (reconcile --all --json). Each run's output goes
    to STORE/reports/timer.log, rotated past 1 MiB (timer.log.1 is the newest old log, 5
    are kept; reports/reconcile.log alike)."""
    for path in timer_mod.install(every, c.store.root, root, policy_file):
        click.echo(f"wrote {path}")


@timer.command("run")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML reconcile policy (as for reconcile).",
)
@pass_ctx
def timer_run(c: Ctx, policy_file: Path | None) -> None:
    """What the schedule runs: 'reconcile --all --json', logged (exit code: reconcile's).

    Each run's output goes to STORE/reports/timer.log, rotated past 1 MiB (timer.log.1 is
    the newest old log, 5 are kept; reports/reconcile.log alike)."""
    code = timer_mod.run_logged(c.store.root, policy_file)
    if code:
        exit_with(code)


@timer.command("remove")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@pass_ctx
def timer_remove(c: Ctx, root: Path) -> None:
    """Remove the schedule."""
    removed = timer_mod.remove(root)
    click.echo("\n".join(f"removed {p}" for p in removed) or "no schedule installed")
