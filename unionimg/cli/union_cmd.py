"""``unionimg mount``, ``umount``, ``fsck``: an instance's union on the host, its U image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from unionimg import ops
from unionimg.cli._common import Ctx, emit, json_option, pass_ctx
from unionimg.layers import union as union_mod


@click.command("mount")
@click.argument("vm")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--readonly", is_flag=True, help="Mount the union read-only.")
@click.option(
    "--driver",
    type=click.Choice(["auto", "overlay", "fuse-overlayfs"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--allow-non-empty",
    is_flag=True,
    help="Mount over a DIRECTORY that is not empty (its content is hidden meanwhile).",
)
@pass_ctx
def mount_cmd(
    c: Ctx, vm: str, directory: Path, readonly: bool, driver: str, allow_non_empty: bool
) -> None:
    """Mount the union of VM's base generation and its U layer at DIRECTORY.

    DIRECTORY must exist, lie outside the store and be empty (unless --allow-non-empty).
    The union is guest data: mounted nosuid,nodev,noexec; the U image is checked with
    e2fsck first unless unchanged since the host last checked or unmounted it."""
    rec = union_mod.mount(
        c.store,
        vm,
        directory,
        readonly=readonly,
        driver=driver,
        allow_non_empty=allow_non_empty,
    )
    click.echo(
        f"mounted {vm} at {rec['target']} ({rec['driver']}{', read-only' if readonly else ''})"
    )


@click.command("umount")
@click.argument("directory", type=click.Path(path_type=Path))
@pass_ctx
def umount_cmd(c: Ctx, directory: Path) -> None:
    """Unmount a union mounted with 'unionimg mount'."""
    name = union_mod.umount_union(c.store, directory)
    click.echo(f"unmounted {name} from {os.path.abspath(directory)}")


@click.command("fsck")
@click.argument("vm")
@click.option("--repair", is_flag=True, help="Repair the image (e2fsck -f -y).")
@json_option
@pass_ctx
def fsck_cmd(c: Ctx, vm: str, repair: bool, as_json: bool) -> None:
    """Check VM's U image (e2fsck -f -n, then its layout), or repair it with --repair.

    VM must be neither mounted nor running. Exit 0: clean (or repaired); 8: damaged, or
    something in it unionimg refuses to follow (a planted symlink: fix it by hand)."""
    data = ops.fsck_instance(c.store, vm, repair=repair)

    def human(d: dict[str, Any]) -> None:
        for line in d["found"]:
            click.echo(f"  {line}")
        verdict = "repaired" if d["repaired"] else "clean"
        click.echo(f"{d['name']}: U image {d['image']} {verdict}")

    emit(data, as_json, human)
