"""``unionimg instance ...``: instances (VMs), a base generation plus a writable U image."""

from __future__ import annotations

from typing import Any

import click

from unionimg.cli._common import ASCII_INT, Ctx, emit, json_option, pass_ctx, size_type
from unionimg.display import shown
from unionimg.errors import UsageError
from unionimg.layers import instance as inst_mod
from unionimg.names import HYPERVISORS, human_size


@click.group()
def instance() -> None:
    """Instances (VMs): a base generation plus a writable U image."""


@instance.command("create")
@click.argument("vm")
@click.option("--base", "base_name", default=None, help="The base (or give --from).")
@click.option("--generation", type=ASCII_INT, default=None, help="Default: the base's latest.")
@click.option(
    "--from",
    "from_layer",
    default=None,
    metavar="LAYER",
    help="Make the VM on this node of the image tree (a layer: its base generation and the "
    "snapshot layers under it), instead of --base.",
)
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
    base_name: str | None,
    generation: int | None,
    from_layer: str | None,
    mac: str | None,
    hypervisor: str,
    size: str | None,
    memory: int,
    vcpus: int,
    nic_name: str,
) -> None:
    """Create instance VM on a base generation (or on a layer, with --from)."""
    common: dict[str, Any] = {
        "mac": mac,
        "hypervisor": hypervisor,
        "size": size_type(size, f" for instance {vm}"),
        "memory": memory,
        "vcpus": vcpus,
        "nic_name": nic_name,
    }
    if from_layer is not None:
        if base_name is not None or generation is not None:
            raise UsageError("give either --from LAYER or --base [--generation], not both")
        # deferred on purpose: the layer cache (zstandard, the layer records) is not paid by
        # a plain 'instance create' (bench/provision.py times it per instance)
        from unionimg.layers import snapshot

        inst = snapshot.create_from(c.store, vm, from_layer, **common)
    elif base_name is None:
        raise UsageError("give --base NAME (or --from LAYER) for the new instance")
    else:
        inst = inst_mod.create(c.store, vm, base_name, generation=generation, **common)
    on = (
        f" and {len(inst.layers)} snapshot layer(s), top {inst.layers[0][7:19]}"
        if inst.layers
        else ""
    )
    click.echo(
        f"created instance {inst.name} on {inst.base} generation {inst.generation}{on} "
        f"(mac {inst.mac}, {inst.hypervisor})"
    )


@instance.command("snapshot")
@click.argument("vm")
@click.option("-m", "--message", default=None, help="What the snapshot holds (one line).")
@json_option
@pass_ctx
def instance_snapshot(c: Ctx, vm: str, message: str | None, as_json: bool) -> None:
    """Freeze VM's upper layer into a new layer over its image node; VM goes on with a fresh,
    empty upper layer on top (its history and identity kept). VM must be stopped."""
    # deferred on purpose: see instance_create (not paid by a plain create)
    from unionimg.layers import snapshot

    res = snapshot.snapshot(c.store, vm, message)

    def human(_: Any) -> None:
        if res.layer is None:
            click.echo(f"{vm}: nothing changed over {res.parent[7:19]}; no new layer")
            return
        m = res.layer.meta
        how = "finished an interrupted snapshot:" if res.finished else "snapshot"
        click.echo(
            f"{vm}: {how} {res.layer.short} ({m.label}, {m.entries} entries, blob "
            f"{human_size(m.blob_size)}, image {human_size(m.image_size)}) over "
            f"{res.parent[7:19]} in {res.seconds:.1f} s; {vm} goes on with a fresh upper "
            f"layer (U {human_size(res.u_before)} -> {human_size(res.u_after)})"
        )

    emit(res.to_json(), as_json, human)


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
    # deferred on purpose: removal's checks (bases, deltas, layers) are not paid by create
    from unionimg import ops

    ops.remove_instance(c.store, vm)
    click.echo(f"removed instance {vm}")
