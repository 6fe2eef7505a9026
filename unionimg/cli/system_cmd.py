"""``unionimg system ...``: the system tree (multi-VM systems whose VMs point at layers)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import click

from unionimg import systems
from unionimg.cli._common import Ctx, emit, json_option, json_text, pass_ctx
from unionimg.display import shown
from unionimg.errors import UsageError
from unionimg.registry.client import Registry
from unionimg.registry.manifests import SYSTEM_REPO
from unionimg.store.fleet_records import SystemMeta

PROGRESS_PREFIX = "unionimg-progress "


@click.group()
def system() -> None:
    """Systems: named sets of VMs, each node of the system tree a snapshot of all of them."""


def _line(meta: SystemMeta) -> str:
    return f"system {meta.name}: " + ", ".join(
        f"{vm.name} -> {vm.layer.removeprefix('sha256:')[:12]}" for vm in meta.vms
    )


@system.command("create")
@click.argument("name")
@click.option(
    "--instance", "vms", multiple=True, required=True, help="A VM of the system (repeat it)."
)
@click.option("-m", "--message", default="", help="Said in the node and its VMs' layers.")
@pass_ctx
def system_create(c: Ctx, name: str, vms: tuple[str, ...], message: str) -> None:
    """Create system NAME, a root of the system tree: every VM given is snapshotted (a VM
    that changed nothing keeps its layer) and the node points at each VM's layer."""
    click.echo(_line(systems.create(c.store, name, vms, message)))


@system.command("snapshot")
@click.argument("name")
@click.option("--as", "child", required=True, help="The new node's name.")
@click.option("-m", "--message", default="", help="Said in the node and its VMs' layers.")
@pass_ctx
def system_snapshot(c: Ctx, name: str, child: str, message: str) -> None:
    """Snapshot every VM of system NAME into a child node CHILD (a VM that changed nothing
    keeps its layer)."""
    meta = systems.snapshot(c.store, name, child, message)
    changed = systems.changed_vms(c.store, meta)
    click.echo(_line(meta) + f" (parent {name}; changed: {', '.join(changed) or 'none'})")


@system.command("tree")
@click.argument("name", required=False)
@json_option
@pass_ctx
def system_tree(c: Ctx, name: str | None, as_json: bool) -> None:
    """The system tree (or the subtree under NAME): each node, its VMs and their layers,
    the VMs a node changed marked '*'."""
    roots = systems.tree(c.store, name)

    def as_data(node: systems.Node) -> dict[str, Any]:
        return {
            "name": node.meta.name,
            "created": node.meta.created,
            "message": node.meta.message,
            "vms": {vm.name: vm.layer for vm in node.meta.vms},
            "changed": systems.changed_vms(c.store, node.meta),
            "children": [as_data(ch) for ch in node.children],
        }

    if as_json:
        click.echo(json_text([as_data(r) for r in roots], sort_keys=True))
        return
    # deferred on purpose: rich's tree is only needed for this drawing
    from rich.console import Console
    from rich.tree import Tree

    def label(node: systems.Node) -> str:
        changed = set(systems.changed_vms(c.store, node.meta))
        vms = "  ".join(
            f"{shown(vm.name)}{'*' if vm.name in changed else ''}:"
            f"{vm.layer.removeprefix('sha256:')[:12]}"
            for vm in node.meta.vms
        )
        msg = f"  {shown(node.meta.message)}" if node.meta.message else ""
        return f"{shown(node.meta.name)}  [{vms}]{msg}"

    def grow(tree: Tree, node: systems.Node) -> None:
        for ch in node.children:
            grow(tree.add(label(ch), highlight=False), ch)

    console = Console(highlight=False, markup=False, width=200, soft_wrap=True)
    for r in roots:
        top = Tree(label(r), highlight=False)
        grow(top, r)
        console.print(top)


@system.command("show")
@click.argument("name")
@json_option
@pass_ctx
def system_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show system node NAME: its parent, VMs (layer, MAC, hypervisor, resources), the VMs
    it changed, its children, where it is deployed (on a host)."""
    data = systems.describe(c.store, name)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"system {d['name']} (parent {d['parent'] or 'none'}, created {d['created']})")
        if d["message"]:
            click.echo(f"  message: {shown(d['message'])}")
        for vm in d["vms"]:
            mark = "*" if vm["name"] in d["changed"] else " "
            click.echo(
                f" {mark}{vm['name']}\t{vm['layer']}\t{vm['mac']}\t{vm['hypervisor']}\t"
                f"{vm['memory']} MiB\t{vm['vcpus']} vcpu"
            )
        if d["children"]:
            click.echo(f"  children: {', '.join(d['children'])}")

    emit(data, as_json, human)


@system.command("push")
@click.argument("name")
@click.option("--registry", "url", required=True, help="The registry, http://HOST:PORT.")
@json_option
@pass_ctx
def system_push(c: Ctx, name: str, url: str, as_json: bool) -> None:
    """Push system node NAME (and its ancestors, and every layer its VMs need) to a
    registry as OCI manifests tagged with the node's name ('unionimg push NAME' does the
    same)."""
    with Registry(url) as reg:
        out = systems.push(c.store, reg, name)

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"pushed system {name} to {d['registry']}/{d['repo']}:{name} as {d['manifest']} "
            f"({d['bytes_sent']} bytes sent, {d['seconds']} s)"
        )

    emit(out.to_json(), as_json, human)


HEARTBEAT = 5.0


def _heartbeat() -> None:
    """Say 'alive' on stderr every HEARTBEAT seconds (more often would keep sshd from ever
    probing a silent client: its ClientAlive check runs only when nothing else happens). When
    that fails, the controller's SSH session is gone (its link lost, its process killed): end
    this process as a signal would, so no orphaned deploy goes on pulling and making VMs
    nobody waits for (the store is crash-safe: locks are released, staging is swept, a
    partial blob stays for the next pull)."""
    while True:
        time.sleep(HEARTBEAT)
        try:
            sys.stderr.write(PROGRESS_PREFIX + '{"phase": "alive", "done": 0, "total": 0}\n')
            sys.stderr.flush()
        except (OSError, ValueError):
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _progress_printer(enabled: bool) -> systems.Progress | None:
    if not enabled:
        return None
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()
    last_at = [0.0]
    last_phase = [""]

    def note(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase == last_phase[0] and done < total and now - last_at[0] < 0.2:
            return
        last_at[0], last_phase[0] = now, phase
        line = json.dumps({"phase": phase, "done": done, "total": total})
        sys.stderr.write(PROGRESS_PREFIX + line + "\n")
        sys.stderr.flush()

    return note


#: longest line read as the node on stdin: a manifest digest is 71 characters
MAX_REF_LINE = 256


def _ref_from_stdin() -> str:
    line = sys.stdin.buffer.readline(MAX_REF_LINE)
    ref = line.decode("ascii", errors="replace").strip()
    if not ref:
        raise UsageError(
            "no system node came on stdin (the deploy that started this ended before its "
            "push did); nothing was done"
        )
    return ref


@system.command("materialize", hidden=True)
@click.argument("ref")
@click.option("--registry", "url", required=True, help="The registry, http://HOST:PORT.")
@click.option("--repo", default=SYSTEM_REPO, show_default=True, help="Its repository.")
@click.option("--replace", is_flag=True, help="Replace VMs an earlier deploy made (stopped).")
@click.option("--boot", is_flag=True, help="Boot the VMs once made.")
@click.option(
    "--progress",
    is_flag=True,
    help="Progress as JSON lines on stderr, and a heartbeat: when stderr is gone (the SSH "
    "session of the deploy that runs it), the command ends.",
)
@json_option
@pass_ctx
def system_materialize(
    c: Ctx, ref: str, url: str, repo: str, replace: bool, boot: bool, progress: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Make system node REF of a registry real in this store (what 'deploy' runs on a host):
    pull the layers this store lacks, make the VMs, boot them with --boot. REF '-': say
    'ready' (with --progress) and read REF as one line from stdin (the deploy pushes the
    node meanwhile); end-of-file instead ends the command with nothing done."""
    note = _progress_printer(progress)
    if ref == "-":
        if note is not None:
            note("ready", 0, 0)
        ref = _ref_from_stdin()
    out = systems.materialize(
        c.store, url, ref, repo=repo, replace=replace, boot=boot, progress=note
    )

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"system {d['system']}: {len(d['vms'])} VM(s) made, {len(d['imported'])} layer(s) "
            f"pulled ({d['bytes_pulled']} bytes), {d['cache_hits']} cached, {d['seconds']} s"
        )

    emit(out.to_json(), as_json, human)
