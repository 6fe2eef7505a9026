"""The ``unionimg`` command line (click). Errors a user can cause are one line + exit code."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from unionimg.display import shown
from unionimg.errors import UnionimgError, UsageError
from unionimg import ops
from unionimg.layers import base as base_mod
from unionimg.layers import instance as inst_mod
from unionimg.layers import status as status_mod
from unionimg.layers import union as union_mod
from unionimg.names import (
    HYPERVISORS,
    check_outside_store,
    human_size,
    parse_int,
    parse_seconds,
    parse_size,
)
from unionimg.store.layout import DEFAULT_STORE, Store

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, store_path: str, debug: bool) -> None:
        self.store_path = store_path
        self.debug = debug
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_path)
            self._store.init()
        return self._store


pass_ctx = click.make_pass_decorator(Ctx)


def json_text(data: Any, **kw: Any) -> str:
    """JSON for output: UTF-8 as it is; a byte that was no UTF-8 in a guest's file name
    (a lone surrogate from os.fsdecode) as its ``\\udcXX`` escape, still valid JSON."""
    text = json.dumps(data, indent=2, ensure_ascii=False, **kw)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json_text(data, sort_keys=True))
    else:
        human(data)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def size_type(value: str | None, of: str = "") -> int | None:
    return None if value is None else parse_size(value, "--size", of)


class AsciiInt(click.ParamType[int]):
    """A whole number in ASCII digits (click's INT takes ``int()``'s Unicode digits and
    ``1_000``); refused as one ``unionimg: error:`` line, exit 2. Bounds: the commands."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        what = param.opts[0] if param is not None and param.opts else "number"
        return parse_int(str(value), what)


ASCII_INT = AsciiInt()


class Seconds(click.ParamType[float]):
    """Seconds in ASCII digits, optional fraction, at most 31 days (click's FLOAT takes
    ``nan``, ``inf``, negatives and Unicode digits)."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int):
            return float(value)
        what = param.opts[0] if param is not None and param.opts else "seconds"
        return parse_seconds(str(value), what)


SECONDS = Seconds()


class UnionimgGroup(click.Group):
    """Turns UnionimgError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnionimgError as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.debug:
                raise
            # one line whatever the message quotes (guest file names): controls escaped
            click.echo(f"unionimg: error: {shown(exc.message, backslash=False)}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("unionimg: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # the reader went away (`unionimg instance list | head`): stop quietly, like cat
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(141)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as exc:
            obj = ctx.find_object(Ctx)
            full = _full_disk(exc, obj)
            if full is None or (obj is not None and obj.debug):
                raise
            click.echo(f"unionimg: error: {shown(full.message, backslash=False)}", err=True)
            ctx.exit(full.exit_code)
        except Exception as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.debug:
                raise
            click.echo(
                f"unionimg: internal error: {type(exc).__name__}: "
                f"{shown(str(exc), backslash=False)} "
                "(rerun with --debug for the traceback)",
                err=True,
            )
            ctx.exit(70)


def _full_disk(exc: OSError, obj: Ctx | None) -> UnionimgError | None:
    """A write that failed for lack of space, anywhere a check did not foresee it: said as
    "store full" (exit 7), never as an internal error."""
    from unionimg.fs.space import write_failure

    where = exc.filename or (obj.store_path if obj is not None else ".")
    store_root = Path(obj.store_path) if obj is not None else None
    return write_failure(exc, str(where), "writing " + str(where), store_path=store_root)


@click.group(cls=UnionimgGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store_path",
    envvar="UNIONIMG_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    help="Store directory (also UNIONIMG_STORE).",
)
@click.option("--debug", is_flag=True, help="Log every program run; show tracebacks.")
@click.version_option(package_name="unionimg")
@click.pass_context
def main(ctx: click.Context, store_path: str, debug: bool) -> None:
    """Shared read-only BASE images, one small writable U image per VM, reconciled with
    Mercurial; the same images boot under KVM, Xen, VirtualBox and User-Mode Linux."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="unionimg: %(message)s"
    )
    ctx.obj = Ctx(store_path, debug)


# -- base ---------------------------------------------------------------------------------
@main.group()
def base() -> None:
    """Bases: named OS images with numbered, immutable generations."""


def _print_generation(g: base_mod.Generation, verb: str) -> None:
    click.echo(
        f"{verb} base {g.base} generation {g.number}: {g.image} "
        f"({human_size(g.size)}, {g.files} paths, hg {g.node[:12]})"
    )


@base.command("create")
@click.argument("name")
@click.option(
    "--from-dir",
    "from_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory holding exactly the OS tree.",
)
@click.option(
    "--size", default=None, help="Image size (e.g. 2G, at most 8T); default fits the tree."
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    default=None,
    help="x86 bzImage (vmlinuz) to boot this base with (default: the tree's /boot/vmlinuz-*).",
)
@pass_ctx
def base_create(c: Ctx, name: str, from_dir: Path, size: str | None, kernel: Path | None) -> None:
    """Create base NAME, generation 1, from DIR (owners, modes, xattrs, devices kept)."""
    g = base_mod.create(
        c.store, name, from_dir, size=size_type(size, f" for base {name}"), kernel=kernel
    )
    _print_generation(g, "created")


@base.command("update")
@click.argument("name")
@click.option(
    "--from-dir",
    "from_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The new generation is exactly this directory.",
)
@click.option(
    "--apply-dir",
    "apply_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="This directory's files laid over the latest generation.",
)
@click.option(
    "--run",
    "command",
    default=None,
    help="Run this with the base's /bin/sh -c, chrooted in a copy of the latest.",
)
@click.option("--size", default=None, help="Image size (at most 8T); default fits the tree.")
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    default=None,
    help="x86 bzImage (vmlinuz) to boot this generation with (default: the tree's, else "
    "the previous generation's).",
)
@pass_ctx
def base_update(
    c: Ctx,
    name: str,
    from_dir: Path | None,
    apply_dir: Path | None,
    command: str | None,
    size: str | None,
    kernel: Path | None,
) -> None:
    """Make generation N+1 of NAME; existing generations are never modified."""
    g = base_mod.update(
        c.store,
        name,
        from_dir=from_dir,
        apply_dir=apply_dir,
        command=command,
        size=size_type(size, f" for base {name}"),
        kernel=kernel,
    )
    _print_generation(g, "made")


@base.command("list")
@json_option
@pass_ctx
def base_list(c: Ctx, as_json: bool) -> None:
    """List bases and their latest generation."""
    rows = [base_mod.show(c.store, n) for n in base_mod.list_bases(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            click.echo(f"{r['name']}\tlatest {r['latest']}\t{len(r['generations'])} generation(s)")

    emit(rows, as_json, human)


@base.command("show")
@click.argument("name")
@json_option
@pass_ctx
def base_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show a base and its generations."""
    data = base_mod.show(c.store, name)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"base {d['name']} (latest generation {d['latest']})")
        for g in d["generations"]:
            click.echo(
                f"  {g['number']}\t{g['created']}\t{human_size(g['size'])}\t"
                f"{g['files']} paths\t{g['image']}"
            )

    emit(data, as_json, human)


@base.command("log")
@click.argument("name")
@json_option
@pass_ctx
def base_log(c: Ctx, name: str, as_json: bool) -> None:
    """The base's Mercurial history: one changeset per generation."""
    _print_log(base_mod.log(c.store, name), as_json)


def _print_log(csets: list[Any], as_json: bool) -> None:
    def human(rows: list[Any]) -> None:
        for cs in rows:
            click.echo(f"{cs.rev}:{cs.node[:12]}  {cs.date}  {shown(cs.desc)}")

    if as_json:
        click.echo(json_text([cs.to_json() for cs in csets]))
    else:
        human(csets)


@base.command("diff")
@click.argument("name")
@click.option(
    "--from", "from_gen", type=ASCII_INT, default=None, help="Generation (default: to-1)."
)
@click.option("--to", "to_gen", type=ASCII_INT, default=None, help="Generation (default: latest).")
@json_option
@pass_ctx
def base_diff(c: Ctx, name: str, from_gen: int | None, to_gen: int | None, as_json: bool) -> None:
    """Paths added, modified and deleted between two generations."""
    data = base_mod.diff(c.store, name, from_gen, to_gen)

    def human(d: dict[str, Any]) -> None:
        meta = set(d["metadata_only"])
        for key, mark in (("added", "A"), ("modified", "M"), ("deleted", "D")):
            for p in d[key]:
                click.echo(f"{'m' if p in meta else mark} {p}")

    emit(data, as_json, human)


@base.command("gc")
@click.argument("name", required=False)
@json_option
@pass_ctx
def base_gc(c: Ctx, name: str | None, as_json: bool) -> None:
    """Remove generations that are not the latest and that no instance uses."""
    removed = ops.gc_bases(c.store, name)
    emit(
        [{"base": b, "generation": g} for b, g in removed],
        as_json,
        lambda rows: click.echo(
            "\n".join(f"removed {r['base']} generation {r['generation']}" for r in rows)
            or "nothing to remove"
        ),
    )


@base.command("remove")
@click.argument("name")
@pass_ctx
def base_remove(c: Ctx, name: str) -> None:
    """Remove a base no instance uses (all generations and history)."""
    ops.remove_base(c.store, name)
    click.echo(f"removed base {name}")


# -- instance -----------------------------------------------------------------------------
@main.group()
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
    """List instances."""
    rows = [inst_mod.describe(c.store, i) for i in inst_mod.list_instances(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            click.echo(
                f"{r['name']}\t{r['base']}:{r['generation']}\t{r['mac']}\t"
                f"{r['hypervisor']}\t{r['state']}"
            )

    emit(rows, as_json, human)


@instance.command("show")
@click.argument("vm")
@json_option
@pass_ctx
def instance_show(c: Ctx, vm: str, as_json: bool) -> None:
    """Show one instance."""
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


# -- union, status, history ---------------------------------------------------------------
@main.command("mount")
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


@main.command("umount")
@click.argument("directory", type=click.Path(path_type=Path))
@pass_ctx
def umount_cmd(c: Ctx, directory: Path) -> None:
    """Unmount a union mounted with 'unionimg mount'."""
    name = union_mod.umount_union(c.store, directory)
    click.echo(f"unmounted {name} from {os.path.abspath(directory)}")


@main.command("fsck")
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


@main.command("status")
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


@main.command("commit")
@click.argument("vm")
@click.option("-m", "--message", default=None)
@pass_ctx
def commit_cmd(c: Ctx, vm: str, message: str | None) -> None:
    """Record VM's current local changes in its Mercurial history."""
    node = status_mod.commit(c.store, vm, message)
    click.echo(f"committed {node[:12]}" if node else "nothing changed")


@main.command("log")
@click.argument("vm")
@json_option
@pass_ctx
def log_cmd(c: Ctx, vm: str, as_json: bool) -> None:
    """VM's Mercurial history."""
    _print_log(status_mod.log(c.store, vm), as_json)


# -- reconcile ------------------------------------------------------------------------------
@main.command("reconcile")
@click.argument("vms", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every instance in the store.")
@click.option("--to-generation", type=ASCII_INT, default=None, help="Default: the base's latest.")
@click.option("--dry-run", is_flag=True, help="Print the plan that apply would execute.")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML policy: per-glob merge | keep-local | take-base | fail.",
)
@click.option(
    "--jobs",
    type=ASCII_INT,
    default=lambda: min((os.cpu_count() or 1) + 1, 8),
    show_default="one more than the CPUs, at most 8",
    help="Instances reconciled in parallel (each also waits on disk flushes, so one more "
    "than the CPUs keeps them busy).",
)
@click.option(
    "--undo",
    is_flag=True,
    help="Restore VM's upper layer and generation to before its last reconcile.",
)
@json_option
@pass_ctx
def reconcile_cmd(
    c: Ctx,
    vms: tuple[str, ...],
    all_: bool,
    to_generation: int | None,
    dry_run: bool,
    policy_file: Path | None,
    jobs: int,
    undo: bool,
    as_json: bool,
) -> None:
    """Merge base updates into instances' upper layers (exit 0 clean, 1 conflicts, 10 an
    instance failed, 7 only space was lacking: free it and rerun)."""
    from unionimg.reconcile import apply as rec
    from unionimg.reconcile.policy import load_policy

    if undo:
        if len(vms) != 1 or all_:
            raise UsageError("--undo takes exactly one VM")
        out = rec.undo(c.store, vms[0])
        emit(
            out, as_json, lambda d: click.echo(f"{d['name']}: back to generation {d['generation']}")
        )
        return
    if bool(vms) == all_:
        raise UsageError("name instances to reconcile, or give --all")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    policy = load_policy(policy_file)
    names = [i.name for i in inst_mod.list_instances(c.store)] if all_ else list(vms)
    for n in names:
        inst_mod.load(c.store, n)
    reports = _run_reconcile(c.store, names, policy, dry_run, to_generation, jobs, as_json)
    unsaved = None
    try:
        rec.save_report(c.store, reports, dry_run=dry_run)
    except OSError as exc:  # what was reconciled stands; the report alone is missing
        unsaved = _full_disk(exc, c)
        if unsaved is None:
            raise
    if as_json:
        click.echo(json_text({"dry_run": dry_run, "instances": [r.to_json() for r in reports]}))
    if unsaved is not None:
        raise unsaved
    code = rec.exit_code(reports)
    if code:
        sys.exit(code)


def _run_reconcile(
    store: Store,
    names: list[str],
    policy: Any,
    dry_run: bool,
    to_generation: int | None,
    jobs: int,
    as_json: bool,
) -> list[Any]:
    from unionimg.reconcile import apply as rec

    def line(r: rec.InstanceReport) -> str:
        verb = "would " if dry_run else ""
        if r.status == "error":
            return f"{r.name}: error: {shown(r.error or '', backslash=False)}"
        if r.from_generation == r.to_generation and not r.actions:
            return f"{r.name}: generation {r.to_generation}, nothing to do"
        changed = sum(1 for a in r.actions if a["action"] in ("drop", "write", "set-meta"))
        return (
            f"{r.name}: generation {r.from_generation} -> {r.to_generation}: {verb}change "
            f"{changed} path(s), {len(r.conflicts)} conflict(s)"
            + "".join(
                f"\n  conflict {shown(x['path'])}: {shown(x['reason'], backslash=False)}"
                for x in r.conflicts
            )
        )

    if sys.stderr.isatty() and not as_json:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("reconciling", total=len(names))

            def tick(r: rec.InstanceReport) -> None:
                bar.advance(task)
                bar.console.print(line(r), markup=False, highlight=False)

            return rec.Reconciler(
                store, policy, dry_run=dry_run, to_generation=to_generation, progress=tick
            ).run(names, jobs)

    def echo(r: rec.InstanceReport) -> None:
        if not as_json:
            click.echo(line(r))

    return rec.Reconciler(
        store, policy, dry_run=dry_run, to_generation=to_generation, progress=echo
    ).run(names, jobs)


@main.command("conflicts")
@click.argument("vm")
@json_option
@pass_ctx
def conflicts_cmd(c: Ctx, vm: str, as_json: bool) -> None:
    """Conflicts a reconcile left for VM, with where their versions are kept."""
    from unionimg.reconcile import apply as rec

    rows = rec.list_conflicts(c.store, vm)

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo(f"{vm}: no conflicts")
        for r in rows:
            click.echo(
                f"{shown(r['path'])}\t{shown(r['reason'], backslash=False)}\t{shown(r['dir'])}"
            )

    emit(rows, as_json, human)


@main.command("resolve")
@click.argument("vm")
@click.argument("path")
@click.option("--take", type=click.Choice(["local", "base", "merged"]), default=None)
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path),
    default=None,
    help="Use this file's content for PATH.",
)
@pass_ctx
def resolve_cmd(c: Ctx, vm: str, path: str, take: str | None, file: Path | None) -> None:
    """Settle one conflict of VM; recorded in its history."""
    from unionimg.reconcile import apply as rec

    out = rec.resolve(c.store, vm, path, take=take, file=file)
    click.echo(f"resolved {shown(out['path'])} in {out['name']}: took {shown(out['took'])}")


# -- booting ------------------------------------------------------------------------------
def _hv_option(f: Any) -> Any:
    return click.option(
        "--hypervisor",
        default=None,
        help=f"One of {', '.join(HYPERVISORS)} (default: the instance's).",
    )(f)


@main.command("render")
@click.argument("vm")
@_hv_option
@click.option("--out", "out", type=click.Path(path_type=Path), required=True)
@pass_ctx
def render_cmd(c: Ctx, vm: str, hypervisor: str | None, out: Path) -> None:
    """Write VM's boot configuration for a hypervisor (and its initramfs) into OUT."""
    from unionimg.boot import control as boot_mod

    check_outside_store(out, c.store.root, "--out", may_hold_store=True)
    for path in boot_mod.render(c.store, vm, hypervisor, out):
        click.echo(str(path))


@main.command("boot")
@click.argument("vm")
@_hv_option
@click.option(
    "--wait", is_flag=True, help="Return when the guest powers off (default: once its init runs)."
)
@click.option(
    "--timeout",
    type=SECONDS,
    default=None,
    help="With --wait: seconds to wait (default 300); exit 1 when it runs out while the "
    "guest runs on.",
)
@click.option("--append", default="", help="Extra kernel command line arguments.")
@json_option
@pass_ctx
def boot_cmd(
    c: Ctx,
    vm: str,
    hypervisor: str | None,
    wait: bool,
    timeout: float | None,
    append: str,
    as_json: bool,
) -> None:
    """Boot VM's BASE + U images under a hypervisor (kvm and uml run here).

    Returns once the guest's init runs on the union root (with --wait: once it powered off).
    A kernel panic, a missing disk, an initramfs error or a crash exits 9 with the cause
    quoted from the console; 'instance show' then says 'crashed'."""
    from unionimg.boot import control as boot_mod

    if timeout is not None and not wait:
        raise UsageError(f"--timeout needs --wait (boot {vm} --wait --timeout S)")
    out = boot_mod.boot(
        c.store,
        vm,
        hypervisor,
        wait=wait,
        timeout=DEFAULT_WAIT if timeout is None else timeout,
        append=append,
    )
    _print_boot(out, as_json)
    if wait and not out.get("stopped"):
        click.echo(f"unionimg: error: {vm} still runs after {out['elapsed_s']:.0f} s", err=True)
        sys.exit(1)


DEFAULT_WAIT = 300.0


def _print_boot(out: dict[str, Any], as_json: bool) -> None:
    def human(d: dict[str, Any]) -> None:
        how = d["hypervisor"] + (
            f" (libvirt domain type {d['domain_type']}: {d['why']})" if d.get("domain_type") else ""
        )
        if d.get("uml_kernel"):
            k = d["uml_kernel"]
            how += f" (kernel {k['path']}, {k['release'] or 'unknown release'}: {k['why']})"
        click.echo(
            f"booted {d['name']} under {how} in {d['overhead_s']:.2f} s; its init runs on the "
            f"union root after {d['ready_s']:.1f} s; console: {d['console']}"
        )
        if "stopped" in d:
            click.echo(
                f"{d['name']} "
                + ("powered off" if d["stopped"] else "still runs")
                + f" after {d['elapsed_s']:.1f} s"
            )

    emit(out, as_json, human)


@main.command("stop")
@click.argument("vm")
@click.option("--force", is_flag=True, help="Pull the plug at once instead of a clean shutdown.")
@click.option(
    "--timeout",
    type=SECONDS,
    default=30.0,
    show_default=True,
    help="Seconds to wait for a clean shutdown before pulling the plug.",
)
@pass_ctx
def stop_cmd(c: Ctx, vm: str, force: bool, timeout: float) -> None:
    """Stop a running VM: a clean shutdown, a hard stop after --timeout (or at once with
    --force). Exits 9 if the VM is not running because its last boot crashed."""
    from unionimg.boot import control as boot_mod

    def notice(limit: float) -> None:
        click.echo(
            f"unionimg: waiting up to {limit:.0f} s for {vm} to shut down cleanly, then pulling "
            "the plug (--force does that at once)",
            err=True,
        )

    out = boot_mod.stop(c.store, vm, force=force, timeout=timeout, notice=notice)
    how = {
        "clean": "clean shutdown",
        "forced": "forced",
        "hard": f"no clean shutdown within {timeout:.0f} s: pulled the plug",
        "gone": "it stopped by itself",
    }.get(out["how"], out["how"])
    click.echo(f"stopped {vm} ({out['hypervisor']}, {how})")
    if out.get("crash"):
        click.echo(f"unionimg: warning: {vm} had crashed: {out['crash']}", err=True)


@main.command("uml-kernel")
@click.option("--reprobe", is_flag=True, help="Boot the candidates again instead of the cache.")
@json_option
def uml_kernel_cmd(reprobe: bool, as_json: bool) -> None:
    """Which User-Mode Linux kernel 'boot --hypervisor uml' uses on this host, and why."""
    from unionimg.boot import umlprobe

    data = umlprobe.select(refresh=reprobe).as_dict()

    def human(d: dict[str, str]) -> None:
        click.echo(f"UML kernel: {d['path']} ({d['release'] or 'unknown release'}, {d['source']})")
        click.echo(f"NIC transport: {d['transport']}; modules: {d['modules'] or 'none (built in)'}")
        click.echo(f"why: {d['why']}")

    emit(data, as_json, human)


@main.command("console")
@click.argument("vm")
@pass_ctx
def console_cmd(c: Ctx, vm: str) -> None:
    """The serial console log of VM's last boot (and, on stderr, why it crashed if it did)."""
    from unionimg.boot import control as boot_mod

    click.echo(boot_mod.console(c.store, vm), nl=False)
    failure = boot_mod.last_failure(c.store, vm)
    if failure is not None:
        click.echo(f"unionimg: {vm} crashed: {failure}", err=True)


@main.command("switch")
@click.argument("vm")
@click.option("--to", "to", required=True, help=f"One of {', '.join(HYPERVISORS)}.")
@click.option("--boot", "boot_after", is_flag=True, help="Boot it on the new hypervisor.")
@click.option("--wait", is_flag=True, help="With --boot: return when the guest powers off.")
@click.option("--timeout", type=SECONDS, default=None, help="With --wait: seconds (default 300).")
@click.option("--append", default="", help="Extra kernel command line arguments.")
@click.option("--force", is_flag=True, help="Pull the plug if the VM runs (no clean shutdown).")
@json_option
@pass_ctx
def switch_cmd(
    c: Ctx,
    vm: str,
    to: str,
    boot_after: bool,
    wait: bool,
    timeout: float | None,
    append: str,
    force: bool,
    as_json: bool,
) -> None:
    """Move VM to another hypervisor: stop, re-render, record, boot if asked. No disk copy.
    With --boot, a guest that fails to boot exits 9 like 'boot'."""
    from unionimg.boot import control as boot_mod

    if wait and not boot_after:
        raise UsageError(f"--wait needs --boot (switch {vm} --to {to} --boot --wait)")
    if timeout is not None and not wait:
        raise UsageError(
            f"--timeout needs --wait (switch {vm} --to {to} --boot --wait --timeout S)"
        )
    out = boot_mod.switch(
        c.store,
        vm,
        to,
        boot_after=boot_after,
        wait=wait,
        timeout=DEFAULT_WAIT if timeout is None else timeout,
        append=append,
        force=force,
    )

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"switched {d['name']} from {d['from']} to {d['to']} in "
            f"{d['elapsed_s']:.2f} s (no disk copied)"
        )
        if "boot" in d:
            _print_boot(d["boot"], False)

    emit(out, as_json, human)
    if wait and boot_after and not out["boot"].get("stopped"):
        sys.exit(1)


# -- timer --------------------------------------------------------------------------------
@main.group()
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
    from unionimg import timer as timer_mod

    for path in timer_mod.install(every, c.store.root, root):
        click.echo(f"wrote {path}")


@timer.command("remove")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@pass_ctx
def timer_remove(c: Ctx, root: Path) -> None:
    """Remove the schedule."""
    from unionimg import timer as timer_mod

    removed = timer_mod.remove(root)
    click.echo("\n".join(f"removed {p}" for p in removed) or "no schedule installed")


if __name__ == "__main__":
    sys.exit(main())
