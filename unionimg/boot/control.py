"""Booting instances: specs, rendering, starting, stopping and switching hypervisors.

The same two raw images (the generation's BASE and the instance's U) serve every hypervisor;
what changes is only the rendered profile. Everything hypervisor-specific is asked of the
instance's driver (:func:`unionimg.hypervisors.get`); this module never compares hypervisor
names. Per boot:

* kernel and initramfs (:mod:`unionimg.boot.kernel`): the kind of kernel the driver boots
  (the base's or the host's, or the UML kernel :func:`unionimg.boot.umlprobe.select` finds
  booting here: Debian's ``/usr/bin/linux.uml``, else the project-built one; said on stderr),
  its initramfs cached in ``STORE/boot/``, followed by a small per-instance archive holding
  the NIC naming files rendered for the instance's MAC (the guest's /init installs them);
* the driver prepares (``kvm``: the libvirt domain type its probe picks, ``kvm`` where KVM
  really boots a guest, else ``qemu`` = TCG, said on stderr), its rendered files are written
  into the instance's run directory, and the driver starts the guest (``kvm``: defined and
  started through libvirt-python; ``uml``: ``linux.uml`` started and supervised by unionimg,
  its NIC on a tap with the MAC). ``xen`` and ``virtualbox`` render (``unionimg render``) but
  do not start here.

Every boot tells the truth. ``boot`` returns only when the guest reached its init on the
union root: the initramfs printed its readiness line (``unionimg-init: switching root ...``)
and no panic followed for :data:`SETTLE` s (an init that cannot be executed or exits at once
panics the kernel). A kernel panic, an initramfs error (a missing BASE or U disk, a failed
mount), a guest that stopped before the readiness line, or a crash the hypervisor reports
(libvirt: pvpanic + ``on_crash``; UML: its exit status) is GuestFailed (exit 9) with the cause
quoted from the console, and is recorded (``crashed.json`` in the instance's directory, see
:mod:`unionimg.layers.running`) so that ``instance show``, ``stop`` and ``console`` tell a
crashed guest from a stopped one until the next boot. The guest kernel always gets
``panic=-1`` (reset at once on a panic rather than hang).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from unionimg import hypervisors
from unionimg.boot.kernel import (
    BootKernel,
    choose,
    instance_initramfs,
    shared_initramfs,
    uml_kernel,
)
from unionimg.errors import (
    Conflict,
    GuestFailed,
    MissingCapability,
    NotFound,
    ToolFailed,
    UsageError,
)
from unionimg.fs.mounts import ensure_shared_root, loop_users
from unionimg.fs.space import require_space
from unionimg.hypervisors import Driver, Prepared, Running
from unionimg.hypervisors.profiles import render_net_naming
from unionimg.hypervisors.spec import BootSpec, instance_uuid
from unionimg.layers import layerstore
from unionimg.layers.base import chain_images, get_generation
from unionimg.layers.instance import (
    Instance,
    list_instances,
    load,
    mount_record,
    refuse_pending_migration,
    save,
    upper_image,
)
from unionimg.layers.running import (
    clear_crash,
    clear_running,
    console_log,
    console_verdict,
    last_crash,
    read_running,
    record_crash,
    running_on,
    workdir,
    write_running,
)
from unionimg.poll import until
from unionimg.store.layout import Store, write_atomic

__all__ = [
    "PANIC_ARGS",
    "boot",
    "console",
    "console_log",
    "forget",
    "last_failure",
    "launch",
    "make_spec",
    "render",
    "running_on",
    "stop",
    "switch",
    "uml_kernel",
    "wait_stopped",
    "workdir",
    "write_rendered",
]

log = logging.getLogger(__name__)


# -- rendered files ---------------------------------------------------------------------------
def write_rendered(files: Mapping[str, str], out: Path) -> list[Path]:
    """Write ``files`` (a driver's rendering: plain file name -> text) into directory ``out``
    (made if missing), each atomically (:func:`unionimg.store.layout.write_atomic`), mode
    0600 (``*.sh`` 0700). Returns the paths, sorted."""
    out = Path(out)
    for name in files:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"rendered file name {name!r} is not a plain file name")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in sorted(files.items()):
        target = out / name
        write_atomic(target, content.encode("utf-8"), mode=0o700 if name.endswith(".sh") else 0o600)
        written.append(target)
    return written


# -- specs --------------------------------------------------------------------------------------
def snapshot_layers(store: Store, inst: Instance) -> list[layerstore.Layer]:
    """The instance's own snapshot layers (``Instance.layers``), top to bottom, each checked
    to be in the store with its image and to lie on the next one; NotFound in one line
    otherwise (before anything starts). Their images' labels are the guest's business: it
    finds each by the label on the command line and fails naming the one it lacks."""
    out: list[layerstore.Layer] = []
    for diff_id in inst.layers:
        try:
            layer = layerstore.get(store, diff_id)
        except NotFound:
            raise NotFound(
                f"instance {inst.name}: layer {diff_id} of its chain is not in this store; "
                "pull or import it (see 'unionimg layer list')"
            ) from None
        if not layer.image.is_file():
            raise NotFound(
                f"instance {inst.name}: the image of its layer {layer.short} is missing "
                f"({layer.image}); the store was changed by hand? restore it from a backup"
            )
        if layer.meta.kind == "base":
            raise NotFound(
                f"instance {inst.name}: its chain names layer {layer.short}, a whole base, "
                "above its generation; the instance record was changed by hand?"
            )
        if out and out[-1].parent != layer.diff_id:
            raise NotFound(
                f"instance {inst.name}: its layer {out[-1].short} does not lie on the next one "
                f"of its chain ({layer.short}); the instance record was changed by hand?"
            )
        out.append(layer)
    return out


def make_spec(
    store: Store,
    inst: Instance,
    driver: Driver,
    kernel: BootKernel | None = None,
    *,
    out: Path,
    append: str = "",
) -> BootSpec:
    """Everything ``driver`` needs to boot ``inst``; builds the initramfs into ``out``.
    ``kernel``: the one :func:`unionimg.boot.kernel.choose` picks for the driver, by default.
    The image chain between U and BASE, top to bottom: the instance's snapshot layers
    (:func:`snapshot_layers`), then its generation's delta layers."""
    gen = get_generation(store, inst.base, inst.generation)
    if kernel is None:
        kernel = choose(gen, driver.capabilities.kernel)
    shared = shared_initramfs(store, gen, kernel)
    snapshots = snapshot_layers(store, inst)  # the VM's own layers, over its generation's
    deltas, bottom = chain_images(store, gen)  # a delta generation boots with its chain
    spec = BootSpec(
        name=inst.name,
        uuid=instance_uuid(inst.name),
        mac=inst.mac,
        nic_name=inst.nic_name,
        memory_mib=inst.memory,
        vcpus=inst.vcpus,
        base_image=bottom.image,  # the full image of the generation's chain (label BASE)
        upper_image=upper_image(store, inst.name),
        kernel=kernel.path,
        initrd=out / "initrd.img",
        cmdline=" ".join(
            p for p in (f"unionimg.layers.instance={inst.name}", PANIC_ARGS, append.strip()) if p
        ),
        console_log=out / "console.log",
        workdir=out,
        domain_type="qemu",  # kvm: its driver's probe decides at boot
        tap=driver.host_tap(inst.name),
        uml_transport=kernel.transport,
        layer_images=(*(la.image for la in snapshots), *(g.image for g in deltas)),
        layer_labels=(
            *(la.meta.label for la in snapshots),
            *(g.label for g in deltas),
        ),
    )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    with store.staging(f"spec-{inst.name}") as stage:
        instance_initramfs(shared, render_net_naming(spec), spec.initrd, stage)
    return spec


def render(store: Store, name: str, hypervisor: str | None, out: Path) -> list[Path]:
    """Write the profile of ``hypervisor`` (default: the instance's) into ``out``, with the
    initramfs and the guest's NIC naming files (``out/net/``). Returns the paths written."""
    inst = load(store, name)
    driver = hypervisors.get(hypervisor or inst.hypervisor)
    out = Path(os.path.abspath(out))
    spec = make_spec(store, inst, driver, out=out)
    prepared = driver.prepare(spec)
    written = [spec.initrd, *prepared.made, *write_rendered(prepared.files, out)]
    written += write_rendered(render_net_naming(spec), out / "net")
    return written


def _mac_in_use(store: Store, inst: Instance, driver: Driver) -> str | None:
    for other in list_instances(store):
        if other.name != inst.name and other.mac == inst.mac and running_on(store, other.name):
            return f"instance '{other.name}'"
    return driver.mac_user(inst.name, inst.mac)


# -- boot / stop / wait ---------------------------------------------------------------------------
#: ``boot`` without ``--wait`` waits this long for the guest to reach its init on the union root
READY_TIMEOUT = 120.0
#: after the readiness line, the guest must run (or have powered off) this long without a panic
#: for its base's init to count as running: switch_root's exec failing, or an init that dies at
#: once, panics the kernel within milliseconds of guest time (TCG included)
SETTLE = 1.0
#: a guest whose console shows a panic or an initramfs error gets this long to stop by itself
#: (pvpanic, panic=-1, the initramfs's power-off) before it is pulled
FAIL_GRACE = 15.0
#: always on the guest kernel's command line, before --append (the last value wins): reset at
#: once on a panic instead of hanging; the kvm profile ends the domain on that reset
#: (on_reboot=destroy) when pvpanic could not report it first
PANIC_ARGS = "panic=-1"


def _failed(name: str, reason: str, *, ready: bool = False) -> GuestFailed:
    what = "crashed" if ready else "failed to boot"
    return GuestFailed(f"instance '{name}' {what}: {reason}; see 'unionimg console {name}'")


def _crash_error(store: Store, name: str) -> GuestFailed | None:
    crash = last_crash(store, name)
    if crash is None:
        return None
    return _failed(name, crash.reason, ready=crash.ready)


def boot(
    store: Store,
    name: str,
    hypervisor: str | None = None,
    *,
    wait: bool = False,
    timeout: float = 300.0,
    append: str = "",
) -> dict[str, Any]:
    """Start the instance's guest and return once it reached its init on the union root (the
    initramfs's readiness line, then no panic for :data:`SETTLE` s), or with ``wait`` once it
    powered off too (``timeout`` bounds the whole). GuestFailed (exit 9) with the cause quoted
    from the console when it panics, misses a disk, its initramfs fails or it crashes; the
    crash is recorded for ``instance show``."""
    inst = load(store, name)
    refuse_pending_migration(store, name, "boot")  # the first thing to say
    driver = hypervisors.get(hypervisor or inst.hypervisor)
    hv = driver.name
    if not driver.capabilities.can_start:
        raise MissingCapability(
            f"{hv} cannot run on this host; render its configuration with "
            f"'unionimg render {name} --hypervisor {hv} --out DIR' and start it there"
        )
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} for instance {name}: give a number of seconds > 0")
    can, why = driver.can_boot_here()
    if not can:
        raise MissingCapability(f"instance {name} cannot boot under {hv} on this host: {why}")
    with store.lock(f"instance-{name}", wait=False, purpose=f"boot {name}"):
        refuse_pending_migration(store, name, "boot")  # its record may have appeared meanwhile
        current = running_on(store, name)
        if current:
            raise Conflict(
                f"instance '{name}' is already running under {current}; "
                f"'unionimg stop {name}' first"
            )
        rec = mount_record(store, name)
        if rec is not None:
            raise Conflict(
                f"instance '{name}' is mounted at {rec.target}; umount it before booting"
            )
        devices = loop_users(upper_image(store, name))
        if devices:
            raise Conflict(
                f"the U image of '{name}' is still attached to {', '.join(devices)} (a mount "
                "of it is pinned by another process); booting now would give it two writers, "
                "so wait for that process to end and retry"
            )
        user = _mac_in_use(store, inst, driver)
        if user:
            raise Conflict(
                f"MAC {inst.mac} of instance '{name}' is in use by running {user}; "
                "stop it or give this instance another MAC"
            )
        # the guest writes into U, a sparse file in the store: a full store would abort its
        # journal under the guest
        require_space(store.root, 0, f"boot {name}")
        wd = workdir(store, name)
        log_path = console_log(store, name)
        if log_path.exists():
            os.replace(log_path, log_path.with_name("console.log.1"))
        clear_crash(store, name)
        t0 = time.monotonic()
        out = _start(store, inst, driver, wd, append)
        out["overhead_s"] = round(time.monotonic() - t0, 3)
    limit = timeout if wait else READY_TIMEOUT
    deadline = t0 + limit
    out["ready_s"] = round(_await_ready(store, name, driver, deadline, limit) - t0, 3)
    if wait:
        poll = driver.capabilities.poll_interval
        out["stopped"] = wait_stopped(store, name, max(0.0, deadline - time.monotonic()), poll)
        out["elapsed_s"] = round(time.monotonic() - t0, 3)
    out["state"] = "running" if running_on(store, name) else "stopped"
    error = _crash_error(store, name)  # it crashed after it was found ready (or while waited for)
    if error is not None:
        raise error
    return out


def launch(
    driver: Driver, spec: BootSpec, record: Callable[[Running], None]
) -> tuple[Prepared, Running]:
    """Start ``spec``'s guest under ``driver``: its preparation for a boot, its rendered files
    written into ``spec.workdir``, the host's mounts made shared when the driver's guests get
    a copy of them, then the driver's start (``record`` gets the running record as soon as the
    driver can tell where its guest is)."""
    prepared = driver.prepare(spec, boot=True)
    write_rendered(prepared.files, spec.workdir)
    if driver.capabilities.private_mounts:
        ensure_shared_root()
    return prepared, driver.start(prepared, record)


def _start(store: Store, inst: Instance, driver: Driver, wd: Path, append: str) -> dict[str, Any]:
    """Kernel, initramfs and spec, then :func:`launch`; the running record is written as soon
    as the driver can tell where its guest is, and removed when the start fails."""
    gen = get_generation(store, inst.base, inst.generation)
    kernel = choose(gen, driver.capabilities.kernel)
    if kernel.note:
        log.warning("%s: %s", inst.name, kernel.note)
    spec = make_spec(store, inst, driver, kernel, out=wd, append=append)

    def record(rec: Running) -> None:
        write_running(store, inst.name, rec)

    try:
        prepared, rec = launch(driver, spec, record)
    except ToolFailed as exc:
        clear_running(store, inst.name)
        failure = console_verdict(spec.console_log).failure
        if failure is None:
            raise
        # the kernel ran and failed at once (e.g. a UML panic before its pid file)
        record_crash(
            store, inst.name, hypervisor=driver.name, reason=failure, console=str(spec.console_log)
        )
        raise _failed(inst.name, failure) from exc
    except BaseException:
        clear_running(store, inst.name)
        raise
    out: dict[str, Any] = {
        "name": inst.name,
        "hypervisor": driver.name,
        **prepared.facts,
        **kernel.facts,
        "console": str(spec.console_log),
    }
    if rec.pid is not None:
        out["pid"] = rec.pid
    if rec.tap:
        out["tap"] = rec.tap
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _await_ready(store: Store, name: str, driver: Driver, deadline: float, limit: float) -> float:
    """Wait until the guest reached its init on the union root; returns when (monotonic).
    GuestFailed if it failed first, or if ``deadline`` passes before (it keeps running)."""
    path = console_log(store, name)
    ready_at: float | None = None
    failed_at: float | None = None
    seen_size = _size(path)
    verdict = console_verdict(path)
    while True:
        size = _size(path)
        if size != seen_size:  # the console only grows: read it again only when it did
            verdict, seen_size = console_verdict(path), size
        if running_on(store, name) is None:  # gone: its crash was recorded, if it failed
            error = _crash_error(store, name)
            if error is not None:
                raise error
            return ready_at if ready_at is not None else time.monotonic()
        now = time.monotonic()
        if verdict.failure is not None:
            if failed_at is None:
                failed_at = now
            elif now - failed_at >= FAIL_GRACE:
                # a failed guest that neither reset nor powered off (e.g. a kernel without
                # pvpanic and panic=-1 overridden): pull it; running_on records the failure
                _hard_stop(store, name, driver)
                running_on(store, name)
                raise _failed(name, f"{verdict.failure} (it did not stop by itself: pulled)")
        elif verdict.ready:
            if ready_at is None:
                ready_at = now
            elif now - ready_at >= SETTLE:
                return ready_at
        if now >= deadline and failed_at is None:
            last = f" (last console line: '{verdict.last_line}')" if verdict.last_line else ""
            raise GuestFailed(
                f"instance '{name}' did not reach its init on the union root within "
                f"{limit:.0f} s{last}; it still runs: see 'unionimg console {name}', "
                f"stop it with 'unionimg stop {name} --force'"
            )
        time.sleep(driver.capabilities.poll_interval)


def _hard_stop(store: Store, name: str, driver: Driver) -> None:
    rec = read_running(store, name)
    if rec is not None:  # else it stopped meanwhile
        driver.stop(rec, force=True)


def wait_stopped(store: Store, name: str, timeout: float, poll: float = 0.2) -> bool:
    """Whether the instance's guest stopped within ``timeout`` s (looking every ``poll`` s)."""
    return until(lambda: running_on(store, name) is None, timeout, poll)


#: seconds ``stop`` waits for a clean shutdown before it pulls the plug
STOP_TIMEOUT = 30.0


def stop(
    store: Store,
    name: str,
    *,
    force: bool = False,
    timeout: float = STOP_TIMEOUT,
    notice: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Stop the running guest: a clean shutdown (kvm: the ACPI power button; uml: sync,
    remount read-only, halt through its mconsole) and, when it is not down after
    ``timeout`` s, a hard stop; with ``force`` a hard stop at once. ``notice(timeout)`` is
    called when the wait for a clean shutdown starts to take a while.

    Returns ``{"hypervisor", "how"}`` (how: clean | forced | hard) and ``"crash"`` when the
    console shows the guest had failed. Conflict if it is not running; GuestFailed (9) if it
    is not running because its last boot failed."""
    load(store, name)
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} for instance {name}: give a number of seconds > 0")
    rec = read_running(store, name) if running_on(store, name) is not None else None
    if rec is None:
        crash = last_crash(store, name)
        if crash is not None:
            raise GuestFailed(
                f"instance '{name}' is not running: it crashed ({crash.reason}); "
                f"see 'unionimg console {name}'"
            )
        raise Conflict(f"instance '{name}' is not running")
    # a guest gone after this was stopped, not crashed (unless its console shows a failure)
    rec = replace(rec, stopping=True)
    write_running(store, name, rec)
    how = hypervisors.get(rec.hypervisor).stop(rec, force=force, timeout=timeout, notice=notice)
    if not wait_stopped(store, name, 15.0):
        raise Conflict(f"instance '{name}' did not stop; try 'unionimg stop {name} --force'")
    out: dict[str, Any] = {"name": name, "hypervisor": rec.hypervisor, "how": how}
    crash = last_crash(store, name)
    if crash is not None:
        out["crash"] = crash.reason
    return out


def console(store: Store, name: str) -> str:
    load(store, name)
    path = console_log(store, name)
    if not path.is_file():
        raise NotFound(f"instance '{name}' has not been booted yet; no console log")
    return path.read_text(encoding="utf-8", errors="replace")


def last_failure(store: Store, name: str) -> str | None:
    """Why the instance's last boot failed, when it is not running and it did; else None."""
    if running_on(store, name) is not None:
        return None
    crash = last_crash(store, name)
    return None if crash is None else crash.reason


def switch(
    store: Store,
    name: str,
    to: str,
    *,
    boot_after: bool = False,
    wait: bool = False,
    timeout: float = 300.0,
    append: str = "",
    force: bool = False,
) -> dict[str, Any]:
    """Stop (if running), re-render for ``to``, record it, boot when asked. No disk copy.
    The hypervisor it leaves forgets the instance (kvm: its libvirt definition)."""
    inst = load(store, name)
    hypervisors.get(to)  # UsageError for a hypervisor no driver has, before anything changes
    t0 = time.monotonic()
    was = running_on(store, name)
    if was:
        stop(store, name, force=force)
    if inst.hypervisor != to:
        hypervisors.get(inst.hypervisor).forget(name)
        save(store, inst.replace(hypervisor=to))
    out: dict[str, Any] = {
        "name": name,
        "from": inst.hypervisor,
        "to": to,
        "stopped_first": bool(was),
    }
    if boot_after:
        out["boot"] = boot(store, name, to, wait=wait, timeout=timeout, append=append)
    else:
        out["rendered"] = [str(p) for p in render(store, name, to, workdir(store, name))]
    out["elapsed_s"] = round(time.monotonic() - t0, 3)
    return out


def forget(store: Store, name: str) -> None:
    """When an instance is removed: every hypervisor forgets it (kvm: its libvirt definition;
    never a running guest's)."""
    del store
    for hv in hypervisors.names():
        hypervisors.get(hv).forget(name)
