"""Booting instances: boot pieces, rendering, starting, stopping and switching hypervisors.

The same two raw images (the generation's BASE and the instance's U) serve every hypervisor;
what changes is only the rendered profile. Per boot:

* kernel: the base's own (kept with its generation), else the host's newest
  ``/boot/vmlinuz-*``; UML boots the kernel :func:`unionimg.boot.umlprobe.select` picks;
* initramfs: built by unionimg (:mod:`unionimg.boot.initramfs`) with the modules of that kernel
  (from the base image when the kernel is the base's) plus UML's, cached in ``STORE/boot/``;
  the UML kernel is the one :func:`unionimg.boot.umlprobe.select` finds booting on this host
  (Debian's ``/usr/bin/linux.uml``, else the project-built one; said on stderr),
  followed by a small per-instance archive holding the NIC naming files rendered from
  ``udev_rules/`` for the instance's MAC (the guest's /init installs them in /run);
* ``kvm``: a libvirt domain (type ``kvm`` where a probe shows KVM really boots a guest,
  else ``qemu`` = TCG; said on stderr) defined and started through libvirt-python;
  ``uml``: ``linux.uml`` started and supervised by unionimg, its NIC on a tap with the MAC;
  ``xen`` and ``virtualbox``: rendered (``unionimg render``), not startable on a host
  without them.

Every boot tells the truth. ``boot`` returns only when the guest reached its init on the
union root: the initramfs printed its readiness line (``unionimg-init: switching root ...``)
and no panic followed for :data:`SETTLE` s (an init that cannot be executed or exits at once
panics the kernel). A kernel panic, an initramfs error (a missing BASE or U disk, a failed
mount), a guest that stopped before the readiness line, or a crash the hypervisor reports
(libvirt: pvpanic + ``on_crash``; UML: its exit status) is GuestFailed (exit 9) with the cause
quoted from the console, and is recorded (``crashed.json`` in the instance's directory, see
:mod:`unionimg.boot.running`) so that ``instance show``, ``stop`` and ``console`` tell a
crashed guest from a stopped one until the next boot. The guest kernel always gets
``panic=-1`` (reset at once on a panic rather than hang).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from unionimg.boot.initramfs import (
    DEFAULT_MODULES,
    KernelModules,
    build_initramfs,
    guest_init_script,
    pack_cpio,
)
from unionimg.boot.running import (
    clear_crash,
    console_verdict,
    crash_record,
    record_crash,
    signal_name,
    stop_reason,
)
from unionimg.boot.umlprobe import UmlKernel
from unionimg.errors import (
    Conflict,
    GuestFailed,
    MissingCapability,
    NotFound,
    ToolFailed,
    UsageError,
)
from unionimg.fs.mounts import mount_image, umount
from unionimg.fs.space import require_space
from unionimg.hypervisors import profiles
from unionimg.hypervisors.spec import BootSpec, instance_uuid
from unionimg.layers.base import Generation, get_generation
from unionimg.layers.instance import Instance, list_instances, load, mount_record, save, upper_image
from unionimg.names import check_hypervisor
from unionimg.store.layout import Store, now_iso, read_json, write_json

log = logging.getLogger(__name__)
UML_MODULES = Path("/usr/lib/uml/modules")
STARTABLE = ("kvm", "uml")


# -- where things are -------------------------------------------------------------------------
def workdir(store: Store, name: str) -> Path:
    return store.run_dir / name / "guest"


def console_log(store: Store, name: str) -> Path:
    return workdir(store, name) / "console.log"


def _running_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / "running.json"


# -- kernel and initramfs ---------------------------------------------------------------------
def _host_kernel() -> tuple[Path, str]:
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    if not found:
        raise MissingCapability(
            "no guest kernel: the base has none and the host has no "
            "/boot/vmlinuz-* (install linux-image-amd64, or give "
            "'base create --kernel')"
        )
    path = Path(found[-1])
    return path, path.name[len("vmlinuz-") :]


def _dir_stamp(path: Path) -> str:
    dep = path / "modules.dep"
    st = dep.stat() if dep.exists() else path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _uml_modules() -> list[KernelModules]:
    if not UML_MODULES.is_dir():
        return []
    return [KernelModules(p.name, p) for p in sorted(UML_MODULES.iterdir()) if p.is_dir()]


def uml_kernel() -> UmlKernel:
    """The UML kernel that boots on this host, and why (probed once per host and kernel)."""
    from unionimg.boot import umlprobe

    return umlprobe.select()


def shared_initramfs(
    store: Store, gen: Generation, hypervisor: str, uml_chosen: UmlKernel | None = None
) -> tuple[Path, Path]:
    """(kernel, initramfs shared by every instance booting this kernel), built once."""
    if hypervisor == "uml":
        chosen = uml_chosen or uml_kernel()
        mods = chosen.modules_dir  # None for a kernel with everything built in
        kernel = chosen.path
        sources = (
            [] if mods is None else [("uml", KernelModules(chosen.release, mods), _dir_stamp(mods))]
        )
        base_modules = False
    elif gen.kernel_path is not None and gen.kernel:
        kernel = gen.kernel_path
        sources = [
            (
                "base",
                KernelModules(gen.kernel, Path("/lib/modules") / gen.kernel),
                f"{gen.base}:{gen.number}",
            )
        ]
        base_modules = True
    else:
        kernel, version = _host_kernel()
        host = KernelModules.in_root(version)
        if not host.modules_dir.is_dir():
            raise MissingCapability(f"the host has {kernel} but no {host.modules_dir}")
        sources = [("host", host, _dir_stamp(host.modules_dir))]
        base_modules = False
    if hypervisor != "uml":
        sources += [("uml", k, _dir_stamp(k.modules_dir)) for k in _uml_modules()]
    key = hashlib.sha256(
        json.dumps(
            [
                hashlib.sha256(guest_init_script()).hexdigest(),
                list(DEFAULT_MODULES),
                [(kind, k.version, stamp) for kind, k, stamp in sources],
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = store.root / "boot" / f"initrd-{key}.cpio.gz"
    if cache.is_file():
        return kernel, cache
    cache.parent.mkdir(mode=0o700, exist_ok=True)
    with store.staging("initramfs") as stage:
        kernels = [k for kind, k, _ in sources if kind != "base"]
        if base_modules:
            mnt = stage / "base"
            mount_image(gen.image, mnt, readonly=True, exclusive=False)
            try:
                in_base = KernelModules.in_root(gen.kernel or "", mnt)
                host = KernelModules.in_root(gen.kernel or "")
                if in_base.modules_dir.is_dir():
                    kernels.insert(0, in_base)
                elif host.modules_dir.is_dir():
                    kernels.insert(0, host)
                else:
                    raise MissingCapability(
                        f"base {gen.base} generation {gen.number} boots kernel {gen.kernel} but "
                        "neither the base nor the host has its modules (/lib/modules)"
                    )
                build_initramfs(stage / "initrd", kernels=kernels)
            finally:
                umount(mnt)
        else:
            build_initramfs(stage / "initrd", kernels=kernels)
        os.replace(stage / "initrd", cache)
    return kernel, cache


def instance_initramfs(shared: Path, net_files: dict[str, str], out: Path, stage: Path) -> Path:
    """The shared initramfs followed by a gzip'd cpio with ``/unionimg/net/*`` (the kernel
    unpacks concatenated archives in order)."""
    root = stage / "net-root"
    shutil.rmtree(root, ignore_errors=True)
    net = root / "unionimg" / "net"
    net.mkdir(parents=True)
    for name, text in net_files.items():
        (net / name).write_text(text, encoding="utf-8")
    names = ["unionimg", "unionimg/net", *(f"unionimg/net/{n}" for n in sorted(net_files))]
    pack_cpio(root, names, stage / "net.cpio")
    extra = gzip.compress((stage / "net.cpio").read_bytes(), mtime=0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(shared.read_bytes() + extra)
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    return out


# -- specs --------------------------------------------------------------------------------------
def make_spec(
    store: Store,
    inst: Instance,
    hypervisor: str,
    *,
    out: Path,
    append: str = "",
    domain_type: str = "qemu",
    uml: UmlKernel | None = None,
) -> BootSpec:
    """Everything a profile needs; builds the kernel/initramfs pieces into ``out``."""
    gen = get_generation(store, inst.base, inst.generation)
    if hypervisor == "uml" and uml is None:
        uml = uml_kernel()
    kernel, shared = shared_initramfs(store, gen, hypervisor, uml)
    spec = BootSpec(
        name=inst.name,
        uuid=instance_uuid(inst.name),
        mac=inst.mac,
        nic_name=inst.nic_name,
        memory_mib=inst.memory,
        vcpus=inst.vcpus,
        base_image=gen.image,
        upper_image=upper_image(store, inst.name),
        kernel=kernel,
        initrd=out / "initrd.img",
        cmdline=" ".join(
            p for p in (f"unionimg.layers.instance={inst.name}", PANIC_ARGS, append.strip()) if p
        ),
        console_log=out / "console.log",
        workdir=out,
        domain_type=domain_type,
        tap=_tap(inst.name) if hypervisor == "uml" else "",
        uml_transport=uml.transport if uml is not None else "tuntap",
    )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    with store.staging(f"spec-{inst.name}") as stage:
        instance_initramfs(shared, profiles.render_net_naming(spec), spec.initrd, stage)
    return spec


def _tap(name: str) -> str:
    from unionimg.hypervisors.uml import tap_name

    return tap_name(name)


def render(store: Store, name: str, hypervisor: str | None, out: Path) -> list[Path]:
    """Write the profile of ``hypervisor`` (default: the instance's) into ``out``."""
    inst = load(store, name)
    hv = check_hypervisor(hypervisor or inst.hypervisor)
    out = Path(os.path.abspath(out))
    spec = make_spec(store, inst, hv, out=out)
    written = [spec.initrd]
    if hv == "virtualbox":
        from unionimg.hypervisors.virtualbox import prepare

        written += prepare(spec)
    else:
        written += profiles.write_rendered(profiles.render(hv, spec), out)
    written += profiles.write_rendered(profiles.render_net_naming(spec), out / "net")
    return written


# -- running state ------------------------------------------------------------------------------
def _libvirt_conn(autostart: bool) -> Any:
    from unionimg.hypervisors import kvm

    if not autostart and "libvirtd" not in kvm.daemon_pids():
        return None
    return kvm.connect()


def running_on(store: Store, name: str) -> str | None:
    """The hypervisor the instance's guest runs on now, or None. A guest found gone has its
    record cleared and, when it failed, its crash recorded (:func:`_cleanup`)."""
    path = _running_path(store, name)
    if not path.is_file():
        return None
    rec = read_json(path)
    alive = False
    evidence: str | None = None
    if rec["hypervisor"] == "uml":
        from unionimg.hypervisors.uml import exit_status, is_running

        alive = is_running(int(rec["pid"]), umid=rec.get("umid"))
        code = None if alive else exit_status(int(rec["pid"]))
        if code is not None and code != 0:
            # known only to the process that started it (boot --wait, switch --boot --wait)
            evidence = (
                f"linux.uml was killed by {signal_name(-code)}"
                if code < 0
                else f"linux.uml exited with status {code}"
            )
    elif rec["hypervisor"] == "kvm":
        from unionimg.hypervisors import kvm

        conn = _libvirt_conn(autostart=False)
        if conn is not None:
            try:
                st, why = kvm.state_reason(conn, name)
            finally:
                conn.close()
            alive = st not in ("shutoff", "absent", "crashed")
            if st == "crashed" or why in ("crashed", "failed"):
                evidence = f"libvirt reports the domain {st}, reason {why}"
        else:
            # libvirtd is down but the QEMU it started may run on: ask /proc, not libvirt
            alive = kvm.qemu_running(name)
    if not alive:
        _cleanup(store, name, rec, evidence)
        return None
    return str(rec["hypervisor"])


def _cleanup(store: Store, name: str, rec: dict[str, Any], evidence: str | None = None) -> None:
    """The guest is gone: record why if it failed, then forget that it ran."""
    console = Path(rec.get("console") or console_log(store, name))
    verdict = console_verdict(console)
    reason = stop_reason(
        verdict,
        hypervisor_says=evidence,
        stop_requested=bool(rec.get("stopping")),
    )
    if reason is not None:
        record_crash(
            store,
            name,
            hypervisor=str(rec["hypervisor"]),
            reason=reason,
            console=str(console),
            ready=verdict.ready,
            evidence=evidence,
        )
    if rec.get("tap"):
        from unionimg.hypervisors.uml import remove_tap

        remove_tap(rec["tap"])
    _running_path(store, name).unlink(missing_ok=True)


def _mac_in_use(store: Store, inst: Instance, hypervisor: str) -> str | None:
    for other in list_instances(store):
        if other.name != inst.name and other.mac == inst.mac and running_on(store, other.name):
            return f"instance '{other.name}'"
    if hypervisor == "kvm":
        conn = _libvirt_conn(autostart=False)
        if conn is not None:
            try:
                for dom in conn.listAllDomains(1):  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
                    if dom.name() != inst.name and f"'{inst.mac}'" in dom.XMLDesc(0):
                        return f"libvirt domain '{dom.name()}'"
            finally:
                conn.close()
    return None


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
#: how often a waiting boot looks at the guest: UML guests are up in well under a second;
#: each look at a kvm guest is a libvirt round trip
POLL = {"uml": 0.05, "kvm": 0.2}
#: always on the guest kernel's command line, before --append (the last value wins): reset at
#: once on a panic instead of hanging; the kvm profile ends the domain on that reset
#: (on_reboot=destroy) when pvpanic could not report it first
PANIC_ARGS = "panic=-1"


def _failed(name: str, reason: str, *, ready: bool = False) -> GuestFailed:
    what = "crashed" if ready else "failed to boot"
    return GuestFailed(f"instance '{name}' {what}: {reason}; see 'unionimg console {name}'")


def _crash_error(store: Store, name: str) -> GuestFailed | None:
    crash = crash_record(store, name)
    if crash is None:
        return None
    return _failed(name, str(crash.get("reason")), ready=bool(crash.get("ready")))


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
    hv = check_hypervisor(hypervisor or inst.hypervisor)
    if hv not in STARTABLE:
        raise MissingCapability(
            f"{hv} cannot run on this host; render its configuration with "
            f"'unionimg render {name} --hypervisor {hv} --out DIR' and start it there"
        )
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} for instance {name}: give a number of seconds > 0")
    with store.lock(f"instance-{name}", wait=False, purpose=f"boot {name}"):
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
        from unionimg.fs.mounts import loop_users

        devices = loop_users(upper_image(store, name))
        if devices:
            raise Conflict(
                f"the U image of '{name}' is still attached to {', '.join(devices)} (a mount "
                "of it is pinned by another process); booting now would give it two writers, "
                "so wait for that process to end and retry"
            )
        user = _mac_in_use(store, inst, hv)
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
        if hv == "kvm":
            out = _boot_kvm(store, inst, wd, append)
        else:
            out = _boot_uml(store, inst, wd, append)
        out["overhead_s"] = round(time.monotonic() - t0, 3)
    limit = timeout if wait else READY_TIMEOUT
    deadline = t0 + limit
    out["ready_s"] = round(_await_ready(store, name, hv, deadline, limit) - t0, 3)
    if wait:
        out["stopped"] = wait_stopped(store, name, max(0.0, deadline - time.monotonic()), hv)
        out["elapsed_s"] = round(time.monotonic() - t0, 3)
    out["state"] = "running" if running_on(store, name) else "stopped"
    error = _crash_error(store, name)  # it crashed after it was found ready (or while waited for)
    if error is not None:
        raise error
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _await_ready(store: Store, name: str, hv: str, deadline: float, limit: float) -> float:
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
        if running_on(store, name) is None:  # gone: _cleanup recorded a failure, if any
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
                # pvpanic and panic=-1 overridden): pull it; _cleanup records the failure
                _hard_stop(store, name, hv)
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
        time.sleep(POLL.get(hv, 0.2))


def _hard_stop(store: Store, name: str, hv: str) -> None:
    try:
        rec = read_json(_running_path(store, name))
    except FileNotFoundError:
        return  # it stopped meanwhile
    if hv == "kvm":
        from unionimg.hypervisors import kvm

        conn = kvm.connect()
        try:
            kvm.stop(conn, name, force=True)
        finally:
            conn.close()
    else:
        from unionimg.hypervisors import uml

        uml.stop(int(rec["pid"]), force=True, umid=rec.get("umid"))


def _boot_kvm(store: Store, inst: Instance, wd: Path, append: str) -> dict[str, Any]:
    from unionimg.hypervisors import kvm, kvmprobe

    gen = get_generation(store, inst.base, inst.generation)
    probe_kernel = gen.kernel_path or _host_kernel()[0]
    # a property of the host (cached per host kernel, QEMU and guest kernel), not of a store
    dtype, why = kvmprobe.domain_type(kvmprobe.PROBE_CACHE, probe_kernel)
    log.warning("%s: domain type %s (%s)", inst.name, dtype, why)
    spec = make_spec(store, inst, "kvm", out=wd, append=append, domain_type=dtype)
    files = profiles.render("kvm", spec)
    profiles.write_rendered(files, wd)
    from unionimg.fs.mounts import ensure_shared_root

    ensure_shared_root()
    conn = kvm.connect()
    try:
        dom = conn.lookupByName(inst.name) if inst.name in conn.listDefinedDomains() else None
        if dom is not None and dom.UUIDString() != spec.uuid:
            raise Conflict(
                f"libvirt already has a domain named '{inst.name}' that unionimg "
                "did not define; rename or undefine it"
            )
        write_json(
            _running_path(store, inst.name),
            {
                "hypervisor": "kvm",
                "domain": inst.name,
                "domain_type": dtype,
                "started": now_iso(),
                "console": str(spec.console_log),
            },
        )
        try:
            kvm.define_and_start(conn, files["domain.xml"])
        except BaseException:
            _running_path(store, inst.name).unlink(missing_ok=True)
            raise
    finally:
        conn.close()
    return {
        "name": inst.name,
        "hypervisor": "kvm",
        "domain_type": dtype,
        "why": why,
        "console": str(spec.console_log),
    }


def _boot_uml(store: Store, inst: Instance, wd: Path, append: str) -> dict[str, Any]:
    from unionimg.hypervisors import uml

    chosen = uml_kernel()
    log.warning("%s: UML kernel %s (%s)", inst.name, chosen.path, chosen.reason)
    spec = make_spec(store, inst, "uml", out=wd, append=append, uml=chosen)
    argv = profiles.uml_argv(spec)
    profiles.write_rendered(profiles.render("uml", spec), wd)
    Path(profiles.UML_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    uml.make_tap(spec.tap)
    try:
        pid = uml.start(argv, spec.console_log, wd)
    except ToolFailed as exc:
        uml.remove_tap(spec.tap)
        failure = console_verdict(spec.console_log).failure
        if failure is None:
            raise
        # the kernel ran and failed at once (a panic before its pid file): the guest failed
        record_crash(
            store, inst.name, hypervisor="uml", reason=failure, console=str(spec.console_log)
        )
        raise _failed(inst.name, failure) from exc
    except BaseException:
        uml.remove_tap(spec.tap)
        raise
    write_json(
        _running_path(store, inst.name),
        {
            "hypervisor": "uml",
            "pid": pid,
            "umid": uml.umid_of(argv),
            "tap": spec.tap,
            "started": now_iso(),
            "console": str(spec.console_log),
        },
    )
    return {
        "name": inst.name,
        "hypervisor": "uml",
        "pid": pid,
        "tap": spec.tap,
        "uml_kernel": chosen.as_dict(),
        "console": str(spec.console_log),
    }


def wait_stopped(store: Store, name: str, timeout: float, hv: str = "") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_on(store, name) is None:
            return True
        time.sleep(POLL.get(hv, 0.2))
    return False


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
    hv = running_on(store, name)
    if hv is None:
        crash = crash_record(store, name)
        if crash is not None:
            raise GuestFailed(
                f"instance '{name}' is not running: it crashed ({crash.get('reason')}); "
                f"see 'unionimg console {name}'"
            )
        raise Conflict(f"instance '{name}' is not running")
    path = _running_path(store, name)
    rec = read_json(path)
    # a guest gone after this was stopped, not crashed (unless its console shows a failure)
    write_json(path, {**rec, "stopping": True})
    if hv == "kvm":
        from unionimg.hypervisors import kvm

        conn = kvm.connect()
        try:
            how = kvm.stop(conn, name, force=force, timeout=timeout, notice=notice)
        finally:
            conn.close()
    else:
        from unionimg.hypervisors import uml

        how = uml.stop(int(rec["pid"]), force=force, timeout=timeout, umid=rec.get("umid"))
    if not wait_stopped(store, name, 15.0):
        raise Conflict(f"instance '{name}' did not stop; try 'unionimg stop {name} --force'")
    out: dict[str, Any] = {"name": name, "hypervisor": hv, "how": how}
    crash = crash_record(store, name)
    if crash is not None:
        out["crash"] = crash.get("reason")
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
    crash = crash_record(store, name)
    return None if crash is None else str(crash.get("reason"))


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
    """Stop (if running), re-render for ``to``, record it, boot when asked. No disk copy."""
    inst = load(store, name)
    check_hypervisor(to)
    t0 = time.monotonic()
    was = running_on(store, name)
    if was:
        stop(store, name, force=force)
    if inst.hypervisor == "kvm" and to != "kvm":
        _undefine(name)
    if inst.hypervisor != to:
        save(store, replace(inst, hypervisor=to))
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


def _undefine(name: str) -> None:
    from unionimg.hypervisors import kvm

    conn = _libvirt_conn(autostart=False)
    if conn is None:
        return
    try:
        if name in conn.listDefinedDomains():
            dom = conn.lookupByName(name)
            if dom.UUIDString() == instance_uuid(name):
                kvm.undefine(conn, name)
    finally:
        conn.close()


def forget(store: Store, name: str) -> None:
    """When an instance is removed: its libvirt definition goes too (never a running one)."""
    _undefine(name)
