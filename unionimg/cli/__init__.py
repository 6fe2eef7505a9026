"""The ``unionimg`` command line (click). Errors a user can cause are one line + exit code.

One module per command group, each with its commands, options and help; a group's module is
imported only when one of its commands runs (``unionimg --help`` imports none of them):

    _common          the context (store, --debug), top-level options, JSON output, parameter
                     types, errors turned into one line and an exit code
    base_cmd         base create, update, list, show, log, diff, gc, remove
    instance_cmd     instance create, list, show, remove
    union_cmd        mount, umount, fsck
    history_cmd      status, commit, log
    reconcile_cmd    reconcile, conflicts, resolve
    boot_cmd         render, boot, stop, console, switch, uml-kernel
    timer_cmd        timer install, remove
    registry_cmd     registry serve, stop; push LAYER|SYSTEM, pull REF
    host_cmd         host add, key, list, cache, remove
    layer_cmd        layer list, show, tree, gc
    system_cmd       system create, snapshot, tree, show, push (materialize: run by deploy)
    deploy_cmd       deploy, redeploy
    snapshot_cmd     snapshot take, list, rm, prune, gc, push, schedule; restore
    migrate_cmd      migrate VM --to HOST (migrate-in offer, push: run by migrate)
    placement_cmd    plan placement, simulate failure, apply placement, recover

A new command: write it in its group's module and name it in :data:`COMMANDS` with the first
paragraph of its help (``tests/test_cli_help.py`` checks that the two agree).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import click

from unionimg.cli._common import UnionimgGroup, debug_option, start, store_option
from unionimg.errors import EXIT_CODES


class Lazy(NamedTuple):
    """Where a top-level command lives (``module:attribute``) and the first paragraph of
    its help, which is all ``unionimg --help`` shows of it."""

    target: str
    help: str


COMMANDS: dict[str, Lazy] = {
    "base": Lazy(
        "unionimg.cli.base_cmd:base",
        "Bases: named OS images with numbered, immutable generations.",
    ),
    "instance": Lazy(
        "unionimg.cli.instance_cmd:instance",
        "Instances (VMs): a base generation plus a writable U image.",
    ),
    "layer": Lazy(
        "unionimg.cli.layer_cmd:layer",
        "The image tree: immutable, content-addressed layers, each over a parent.",
    ),
    "mount": Lazy(
        "unionimg.cli.union_cmd:mount_cmd",
        "Mount the union of VM's base generation and its U layer at DIRECTORY.",
    ),
    "umount": Lazy(
        "unionimg.cli.union_cmd:umount_cmd",
        "Unmount a union mounted with 'unionimg mount'.",
    ),
    "fsck": Lazy(
        "unionimg.cli.union_cmd:fsck_cmd",
        "Check VM's U image (e2fsck -f -n, then its layout), or repair it with --repair.",
    ),
    "status": Lazy(
        "unionimg.cli.history_cmd:status_cmd",
        "VM's local changes against its base generation, read from its upper layer.",
    ),
    "commit": Lazy(
        "unionimg.cli.history_cmd:commit_cmd",
        "Record VM's current local changes in its Mercurial history.",
    ),
    "log": Lazy("unionimg.cli.history_cmd:log_cmd", "VM's Mercurial history."),
    "reconcile": Lazy(
        "unionimg.cli.reconcile_cmd:reconcile_cmd",
        "Merge base updates into instances' upper layers (exit 0 clean, 1 conflicts, 10 an "
        "instance failed, 7 only space was lacking: free it and rerun).",
    ),
    "conflicts": Lazy(
        "unionimg.cli.reconcile_cmd:conflicts_cmd",
        "Conflicts a reconcile left for VM, with where their versions are kept.",
    ),
    "resolve": Lazy(
        "unionimg.cli.reconcile_cmd:resolve_cmd",
        "Settle one conflict of VM; recorded in its history.",
    ),
    "render": Lazy(
        "unionimg.cli.boot_cmd:render_cmd",
        "Write VM's boot configuration for a hypervisor (and its initramfs) into OUT.",
    ),
    "boot": Lazy(
        "unionimg.cli.boot_cmd:boot_cmd",
        "Boot VM's BASE + U images under a hypervisor (kvm and uml run here).",
    ),
    "stop": Lazy(
        "unionimg.cli.boot_cmd:stop_cmd",
        "Stop a running VM: a clean shutdown, a hard stop after --timeout (or at once with "
        "--force). Exits 9 if the VM is not running because its last boot crashed.",
    ),
    "uml-kernel": Lazy(
        "unionimg.cli.boot_cmd:uml_kernel_cmd",
        "Which User-Mode Linux kernel 'boot --hypervisor uml' uses on this host, and why.",
    ),
    "console": Lazy(
        "unionimg.cli.boot_cmd:console_cmd",
        "The serial console log of VM's last boot (and, on stderr, why it crashed if it did).",
    ),
    "switch": Lazy(
        "unionimg.cli.boot_cmd:switch_cmd",
        "Move VM to another hypervisor: stop, re-render, record, boot if asked. No disk copy. "
        "With --boot, a guest that fails to boot exits 9 like 'boot'.",
    ),
    "system": Lazy(
        "unionimg.cli.system_cmd:system",
        "Systems: named sets of VMs, each node of the system tree a snapshot of all of them.",
    ),
    "deploy": Lazy(
        "unionimg.cli.deploy_cmd:deploy_cmd",
        "Deploy system node SYSTEM to hosts: push it to the registry, each host pulls only the "
        "layers it lacks and makes the VMs (MACs kept); --boot boots them.",
    ),
    "redeploy": Lazy(
        "unionimg.cli.deploy_cmd:redeploy_cmd",
        "Deploy another node SYSTEM of the system tree where an earlier deploy made its VMs: "
        "the hosts pull only the layers they lack and replace those VMs (stopped ones).",
    ),
    "migrate": Lazy(
        "unionimg.cli.migrate_cmd:migrate_cmd",
        "Move stopped VM to HOST, sending only the content HOST has nowhere (its base "
        "generations, layers, earlier transfers): the host verifies every file by hash and "
        "makes the VM (same MAC); only then is it removed here.",
    ),
    "migrate-in": Lazy(
        "unionimg.cli.migrate_cmd:migrate_receive",
        "What 'migrate' runs on the receiving host over SSH (not for use by hand).",
    ),
    "host": Lazy(
        "unionimg.cli.host_cmd:host",
        "Hosts: other machines running unionimg, reached over SSH, to deploy systems to.",
    ),
    "push": Lazy(
        "unionimg.cli.registry_cmd:push_cmd",
        "Push layer or system node NAME to a registry: a layer with its chain of parents, a "
        "system node with its ancestors and every layer its VMs need; blobs the registry holds "
        "are not sent again.",
    ),
    "pull": Lazy(
        "unionimg.cli.registry_cmd:pull_cmd",
        "Pull image-tree node REF and its chain into this store's layer cache, fetching only "
        "the layers it lacks (each blob's sha256 checked on arrival; a broken pull resumes).",
    ),
    "registry": Lazy(
        "unionimg.cli.registry_cmd:registry",
        "An OCI registry for layers and systems (Debian's docker-registry, unionimg's config).",
    ),
    "snapshot": Lazy(
        "unionimg.cli.snapshot_cmd:snapshot",
        "VM snapshots: memory and disk state as shared chunks, repeated, copied off the host.",
    ),
    "restore": Lazy(
        "unionimg.cli.snapshot_cmd:restore_cmd",
        "Bring VM back from a snapshot: U rebuilt from its chunks and, for a memory snapshot, "
        "the guest resumed where it was.",
    ),
    "plan": Lazy(
        "unionimg.cli.placement_cmd:plan_group",
        "Plan where things go (placement of spare layers).",
    ),
    "simulate": Lazy(
        "unionimg.cli.placement_cmd:simulate_group",
        "Simulate events against a plan.",
    ),
    "apply": Lazy(
        "unionimg.cli.placement_cmd:apply_group",
        "Make a plan real on the hosts (placement of spare layers).",
    ),
    "recover": Lazy(
        "unionimg.cli.placement_cmd:recover_cmd",
        "Make VM on HOST from the layers the applied placement keeps there (nothing sent when "
        "the plan says so), boot it with --boot, then plan and apply again without the failed "
        "server.",
    ),
    "timer": Lazy(
        "unionimg.cli.timer_cmd:timer",
        "Run 'reconcile --all' unattended (systemd timer, or cron where systemd does not run).",
    ),
}


def load(name: str, lazy: Lazy) -> click.Command:
    """Import the module of one lazily named command and return the command."""
    module, _, attr = lazy.target.partition(":")
    cmd = getattr(importlib.import_module(module), attr)
    if not isinstance(cmd, click.Command) or cmd.name != name:
        raise TypeError(f"{lazy.target} is not the click command {name!r}")
    return cmd


class LazyGroup(UnionimgGroup):
    """A group whose commands are named in a map and imported when one is run (click's
    lazy-loading pattern). Its help lists them from the map without importing any."""

    def __init__(self, *args: Any, lazy: Mapping[str, Lazy], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(load(cmd_name, self.lazy[cmd_name]), cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and args[0] not in self.lazy:
            # an unknown name: click suggests a close one ("Did you mean 'instance'?") from
            # the commands loaded so far, so load them all (only on this error path)
            for name in self.lazy:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)

    def _summary(self, name: str) -> click.Command:
        if name in self.commands:
            return self.commands[name]
        return click.Command(name, help=self.lazy[name].help)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own layout (Group.format_commands), fed with stand-ins that carry the
        # help of the map: the same short help, cut the same way, no command module imported
        commands = [(name, self._summary(name)) for name in self.list_commands(ctx)]
        commands = [(name, cmd) for name, cmd in commands if not cmd.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in commands])


class MainGroup(LazyGroup):
    """The ``unionimg`` group: its help ends with the exit codes, from unionimg.errors."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Exit codes"):
            formatter.write_dl([(str(code), meaning) for code, meaning in EXIT_CODES])


@click.group(cls=MainGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@store_option
@debug_option
@click.version_option(package_name="unionimg")
@click.pass_context
def main(ctx: click.Context, store_path: str, debug: bool) -> None:
    """Shared read-only BASE images, one small writable U image per VM, reconciled with
    Mercurial; the same images boot under KVM, Xen, VirtualBox and User-Mode Linux."""
    start(ctx, store_path, debug)
