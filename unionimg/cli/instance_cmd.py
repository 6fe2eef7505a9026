"""``unionimg instance ...``: instances (VMs), a base generation plus a writable U image."""

from __future__ import annotations

from typing import Any

import click

from unionimg import ops
from unionimg.cli._common import ASCII_INT, Ctx, emit, json_option, pass_ctx, size_type
from unionimg.display import shown
from unionimg.layers import instance as inst_mod
from unionimg.names import HYPERVISORS


@click.group()
def instance() -> None:
    """Instances (VMs): a base generation plus a writable U image."""


@instance.command("create")
@click.argument("vm")
@click.option("--base", "base_name", required=True)
@click.option("--generation", type=ASCII_INT, default=None, help="Default: the base's latest.")
@click.option(
    "--mac",
    default=None,
    help="Fixed unicast MAC, 52:54:00:12:34:56 (default: derived from the name).",
)
@click.option(
    "--hypervisor", default="kvm", show_default=True, help=f"One of {', '.join(HYPERVISORS)}."
)
@click.option("--size", default=None, help="U image size, sparse (default 4G, at most 8T).")
@click.option("--memory", type=ASCII_INT, default=512, show_default=True, help="MiB (32-4194304).")
@click.option("--vcpus", type=ASCII_INT, default=1, show_default=True, help="1-256.")
@click.option(
    "--nic-name",
    default="eth0",
    show_default=True,
    help="Name the guest gives the NIC with the instance's MAC: 1-15 letters, digits, "
    "'_', '.', '-'.",
)
@pass_ctx
def instance_create(
    c: Ctx,
    vm: str,
    base_name: str,
    generation: int | None,
    mac: str | None,
    hypervisor: str,
    size: str | None,
    memory: int,
    vcpus: int,
    nic_name: str,
) -> None:
    """Create instance VM on a base generation."""
    inst = inst_mod.create(
        c.store,
        vm,
        base_name,
        generation=generation,
        mac=mac,
        hypervisor=hypervisor,
        size=size_type(size, f" for instance {vm}"),
        memory=memory,
        vcpus=vcpus,
        nic_name=nic_name,
    )
    click.echo(
        f"created instance {inst.name} on {inst.base} generation {inst.generation} "
        f"(mac {inst.mac}, {inst.hypervisor})"
    )


@instance.command("list")
@json_option
@pass_ctx
def instance_list(c: Ctx, as_json: bool) -> None:
    """List instances (with the count of reconcile conflicts still pending, if any)."""
    rows = [inst_mod.describe(c.store, i) for i in inst_mod.list_instances(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            pending = r["pending_conflicts"]
            click.echo(
                f"{r['name']}\t{r['base']}:{r['generation']}\t{r['mac']}\t"
                f"{r['hypervisor']}\t{r['state']}"
                + (f"\t{pending} conflict(s) pending" if pending else "")
            )

    emit(rows, as_json, human)


@instance.command("show")
@click.argument("vm")
@json_option
@pass_ctx
def instance_show(c: Ctx, vm: str, as_json: bool) -> None:
    """Show one instance (pending_conflicts: reconcile conflicts not yet resolved, listed
    by 'unionimg conflicts VM')."""
    data = inst_mod.describe(c.store, inst_mod.load(c.store, vm))
    emit(
        data,
        as_json,
        lambda d: click.echo("\n".join(f"{k}: {shown(str(v))}" for k, v in sorted(d.items()))),
    )


@instance.command("remove")
@click.argument("vm")
@pass_ctx
def instance_remove(c: Ctx, vm: str) -> None:
    """Remove an instance that is neither mounted nor running (its U image is deleted)."""
    ops.remove_instance(c.store, vm)
    click.echo(f"removed instance {vm}")
