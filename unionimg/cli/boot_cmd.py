"""``unionimg render``, ``boot``, ``stop``, ``console``, ``switch``, ``uml-kernel``: instances
booted under a hypervisor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from unionimg.boot import control as boot_mod
from unionimg.boot import umlprobe
from unionimg.cli._common import SECONDS, Ctx, emit, exit_with, hv_option, json_option, pass_ctx
from unionimg.errors import EXIT_STILL_RUNNING, UsageError
from unionimg.layers import instance as inst_mod
from unionimg.names import HYPERVISORS, check_outside_store

DEFAULT_WAIT = 300.0


@click.command("render")
@click.argument("vm")
@hv_option
@click.option("--out", "out", type=click.Path(path_type=Path), required=True)
@pass_ctx
def render_cmd(c: Ctx, vm: str, hypervisor: str | None, out: Path) -> None:
    """Write VM's boot configuration for a hypervisor (and its initramfs) into OUT."""
    check_outside_store(out, c.store.root, "--out", may_hold_store=True)
    for path in boot_mod.render(c.store, vm, hypervisor, out):
        click.echo(str(path))


@click.command("boot")
@click.argument("vm")
@hv_option
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
    quoted from the console; 'instance show' then says 'crashed'.

    A VM with reconcile conflicts still pending boots, with a warning naming their count:
    each such path holds the VM's own version, as before the reconcile, so the VM is
    consistent with itself; refusing could block the boot that repairs it."""
    if timeout is not None and not wait:
        raise UsageError(f"--timeout needs --wait (boot {vm} --wait --timeout S)")
    warn_pending(c, vm)
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
        exit_with(EXIT_STILL_RUNNING)


def warn_pending(c: Ctx, vm: str) -> None:
    """One line on stderr when VM still has reconcile conflicts pending (it boots anyway)."""
    inst_mod.load(c.store, vm)  # the name checked; a missing VM fails as boot would
    count = inst_mod.pending_conflicts(c.store, vm)
    if count:
        click.echo(
            f"unionimg: warning: {vm} has {count} reconcile conflict(s) still pending; it "
            f"boots with its own version of those paths (list them: unionimg conflicts {vm})",
            err=True,
        )


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


@click.command("stop")
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


@click.command("uml-kernel")
@click.option("--reprobe", is_flag=True, help="Boot the candidates again instead of the cache.")
@json_option
def uml_kernel_cmd(reprobe: bool, as_json: bool) -> None:
    """Which User-Mode Linux kernel 'boot --hypervisor uml' uses on this host, and why."""
    data = umlprobe.select(refresh=reprobe).as_dict()

    def human(d: dict[str, str]) -> None:
        click.echo(f"UML kernel: {d['path']} ({d['release'] or 'unknown release'}, {d['source']})")
        click.echo(f"NIC transport: {d['transport']}; modules: {d['modules'] or 'none (built in)'}")
        click.echo(f"why: {d['why']}")

    emit(data, as_json, human)


@click.command("console")
@click.argument("vm")
@pass_ctx
def console_cmd(c: Ctx, vm: str) -> None:
    """The serial console log of VM's last boot (and, on stderr, why it crashed if it did)."""
    click.echo(boot_mod.console(c.store, vm), nl=False)
    failure = boot_mod.last_failure(c.store, vm)
    if failure is not None:
        click.echo(f"unionimg: {vm} crashed: {failure}", err=True)


@click.command("switch")
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
    With --boot, a guest that fails to boot exits 9 like 'boot'.

    With --boot, reconcile conflicts still pending are warned about as 'boot' does."""
    if wait and not boot_after:
        raise UsageError(f"--wait needs --boot (switch {vm} --to {to} --boot --wait)")
    if timeout is not None and not wait:
        raise UsageError(
            f"--timeout needs --wait (switch {vm} --to {to} --boot --wait --timeout S)"
        )
    if boot_after:
        warn_pending(c, vm)
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
        exit_with(EXIT_STILL_RUNNING)
