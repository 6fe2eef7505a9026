"""Booting instances: boot pieces, rendering, starting, stopping and switching hypervisors.

The same two raw images (the generation's BASE and the instance's U) serve every hypervisor;
what changes is only the rendered profile. Per boot:

* kernel: the base's own (kept with its generation), else the host's newest
  ``/boot/vmlinuz-*``; UML boots ``/usr/bin/linux.uml``;
* initramfs: built by unionimg (:mod:`unionimg.initramfs`) with the modules of that kernel
  (from the base image when the kernel is the base's) plus UML's, cached in ``STORE/boot/``,
  followed by a small per-instance archive holding the NIC naming files rendered from
  ``udev_rules/`` for the instance's MAC (the guest's /init installs them in /run);
* ``kvm``: a libvirt domain (type ``kvm`` where a probe shows KVM really boots a guest,
  else ``qemu`` = TCG; said on stderr) defined and started through libvirt-python;
  ``uml``: ``linux.uml`` started and supervised by unionimg, its NIC on a tap with the MAC;
  ``xen`` and ``virtualbox``: rendered (``unionimg render``), not startable on a host
  without them.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import profiles
from .base import Generation, get_generation
from .bootspec import BootSpec, instance_uuid
from .errors import Conflict, MissingCapability, NotFound
from .initramfs import (
    DEFAULT_MODULES,
    KernelModules,
    build_initramfs,
    guest_init_script,
    pack_cpio,
)
from .instance import Instance, list_instances, load, mount_record, save, upper_image
from .mounts import mount_image, umount
from .names import check_hypervisor
from .store import Store, now_iso, read_json, write_json

log = logging.getLogger(__name__)
UML_KERNEL = Path("/usr/bin/linux.uml")
UML_MODULES = Path("/usr/lib/uml/modules")
STARTABLE = ("kvm", "uml")
KVM_PROBE_CACHE = Path("/var/cache/unionimg/kvm-probe.json")


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


def shared_initramfs(store: Store, gen: Generation, hypervisor: str) -> tuple[Path, Path]:
    """(kernel, initramfs shared by every instance booting this kernel), built once."""
    uml = _uml_modules()
    if hypervisor == "uml":
        if not UML_KERNEL.exists():
            raise MissingCapability(f"{UML_KERNEL} is missing; install user-mode-linux")
        kernel, sources = UML_KERNEL, [("uml", k, _dir_stamp(k.modules_dir)) for k in uml]
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
        sources += [("uml", k, _dir_stamp(k.modules_dir)) for k in uml]
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
) -> BootSpec:
    """Everything a profile needs; builds the kernel/initramfs pieces into ``out``."""
    gen = get_generation(store, inst.base, inst.generation)
    kernel, shared = shared_initramfs(store, gen, hypervisor)
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
        cmdline=" ".join(p for p in (f"unionimg.instance={inst.name}", append.strip()) if p),
        console_log=out / "console.log",
        workdir=out,
        domain_type=domain_type,
        tap=_tap(inst.name) if hypervisor == "uml" else "",
    )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    with store.staging(f"spec-{inst.name}") as stage:
        instance_initramfs(shared, profiles.render_net_naming(spec), spec.initrd, stage)
    return spec


def _tap(name: str) -> str:
    from .uml_driver import tap_name

    return tap_name(name)


def render(store: Store, name: str, hypervisor: str | None, out: Path) -> list[Path]:
    """Write the profile of ``hypervisor`` (default: the instance's) into ``out``."""
    inst = load(store, name)
    hv = check_hypervisor(hypervisor or inst.hypervisor)
    out = Path(os.path.abspath(out))
    spec = make_spec(store, inst, hv, out=out)
    written = [spec.initrd]
    if hv == "virtualbox":
        from .vbox import prepare

        written += prepare(spec)
    else:
        written += profiles.write_rendered(profiles.render(hv, spec), out)
    written += profiles.write_rendered(profiles.render_net_naming(spec), out / "net")
    return written


# -- running state ------------------------------------------------------------------------------
def _libvirt_conn(autostart: bool) -> Any:
    from . import libvirt_driver

    if not autostart and "libvirtd" not in libvirt_driver.daemon_pids():
        return None
    return libvirt_driver.connect()


def running_on(store: Store, name: str) -> str | None:
    """The hypervisor the instance's guest runs on now, or None (stale records are cleared)."""
    path = _running_path(store, name)
    if not path.is_file():
        return None
    rec = read_json(path)
    alive = False
    if rec["hypervisor"] == "uml":
        from .uml_driver import is_running

        alive = is_running(int(rec["pid"]), umid=rec.get("umid"))
    elif rec["hypervisor"] == "kvm":
        from . import libvirt_driver

        conn = _libvirt_conn(autostart=False)
        if conn is not None:
            try:
                alive = libvirt_driver.state(conn, name) not in ("shutoff", "absent", "crashed")
            finally:
                conn.close()
    if not alive:
        _cleanup(store, name, rec)
        return None
    return str(rec["hypervisor"])


def _cleanup(store: Store, name: str, rec: dict[str, Any]) -> None:
    if rec.get("tap"):
        from .uml_driver import remove_tap

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
def boot(
    store: Store,
    name: str,
    hypervisor: str | None = None,
    *,
    wait: bool = False,
    timeout: float = 300.0,
    append: str = "",
) -> dict[str, Any]:
    inst = load(store, name)
    hv = check_hypervisor(hypervisor or inst.hypervisor)
    if hv not in STARTABLE:
        raise MissingCapability(
            f"{hv} cannot run on this host; render its configuration with "
            f"'unionimg render {name} --hypervisor {hv} --out DIR' and start it there"
        )
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
                f"instance '{name}' is mounted at {rec['target']}; umount it before booting"
            )
        from .mounts import loop_users

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
        wd = workdir(store, name)
        log_path = console_log(store, name)
        if log_path.exists():
            os.replace(log_path, log_path.with_name("console.log.1"))
        t0 = time.monotonic()
        if hv == "kvm":
            out = _boot_kvm(store, inst, wd, append)
        else:
            out = _boot_uml(store, inst, wd, append)
        out["overhead_s"] = round(time.monotonic() - t0, 3)
    if wait:
        out["stopped"] = wait_stopped(store, name, timeout)
        out["elapsed_s"] = round(time.monotonic() - t0, 3)
    return out


def _boot_kvm(store: Store, inst: Instance, wd: Path, append: str) -> dict[str, Any]:
    from . import kvmprobe, libvirt_driver

    gen = get_generation(store, inst.base, inst.generation)
    probe_kernel = gen.kernel_path or _host_kernel()[0]
    # a property of the host (cached per host kernel, QEMU and guest kernel), not of a store
    dtype, why = kvmprobe.domain_type(KVM_PROBE_CACHE, probe_kernel)
    log.warning("%s: domain type %s (%s)", inst.name, dtype, why)
    spec = make_spec(store, inst, "kvm", out=wd, append=append, domain_type=dtype)
    files = profiles.render("kvm", spec)
    profiles.write_rendered(files, wd)
    from .mounts import ensure_shared_root

    ensure_shared_root()
    conn = libvirt_driver.connect()
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
            libvirt_driver.define_and_start(conn, files["domain.xml"])
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
    from . import uml_driver

    spec = make_spec(store, inst, "uml", out=wd, append=append)
    argv = profiles.uml_argv(spec)
    profiles.write_rendered(profiles.render("uml", spec), wd)
    Path(profiles.UML_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    uml_driver.make_tap(spec.tap)
    try:
        pid = uml_driver.start(argv, spec.console_log, wd)
    except BaseException:
        uml_driver.remove_tap(spec.tap)
        raise
    write_json(
        _running_path(store, inst.name),
        {
            "hypervisor": "uml",
            "pid": pid,
            "umid": uml_driver.umid_of(argv),
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
        "console": str(spec.console_log),
    }


def wait_stopped(store: Store, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_on(store, name) is None:
            return True
        time.sleep(0.2)
    return False


def stop(store: Store, name: str, *, force: bool = False, timeout: float = 60.0) -> str:
    load(store, name)
    hv = running_on(store, name)
    if hv is None:
        raise Conflict(f"instance '{name}' is not running")
    rec = read_json(_running_path(store, name))
    if hv == "kvm":
        from . import libvirt_driver

        conn = libvirt_driver.connect()
        try:
            libvirt_driver.stop(conn, name, force=force, timeout=timeout)
        finally:
            conn.close()
    else:
        from . import uml_driver

        uml_driver.stop(int(rec["pid"]), force=force, timeout=timeout, umid=rec.get("umid"))
    if not wait_stopped(store, name, 15.0):
        raise Conflict(f"instance '{name}' did not stop; try 'unionimg stop {name} --force'")
    return hv


def console(store: Store, name: str) -> str:
    load(store, name)
    path = console_log(store, name)
    if not path.is_file():
        raise NotFound(f"instance '{name}' has not been booted yet; no console log")
    return path.read_text(encoding="utf-8", errors="replace")


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
    from . import libvirt_driver

    conn = _libvirt_conn(autostart=False)
    if conn is None:
        return
    try:
        if name in conn.listDefinedDomains():
            dom = conn.lookupByName(name)
            if dom.UUIDString() == instance_uuid(name):
                libvirt_driver.undefine(conn, name)
    finally:
        conn.close()


def forget(store: Store, name: str) -> None:
    """When an instance is removed: its libvirt definition goes too (never a running one)."""
    _undefine(name)
