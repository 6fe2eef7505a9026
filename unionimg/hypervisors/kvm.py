"""The kvm driver: KVM/QEMU guests through libvirt (libvirt-python).

Its profile is one libvirt domain, ``domain.xml`` (``templates/kvm/domain.xml.j2``): type
``kvm``, or ``qemu`` (TCG) where the probe (:mod:`unionimg.hypervisors.kvmprobe`) shows KVM
does not really run a guest; direct kernel boot, BASE read-only and U read-write as raw virtio
disks, a user-mode NIC with the instance's MAC, the serial console written to a file,
pvpanic with ``on_crash=destroy``. The rest of this module talks to libvirtd: define, start,
watch, stop, undefine, with libvirt's errors turned into one line; :data:`DRIVER` puts it
behind the :class:`~unionimg.hypervisors.Driver` interface.

Facts this module builds on (measured on Debian 12, libvirt 9.0, no systemd):

- Without systemd nobody socket-activates libvirtd: :func:`connect` starts ``virtlogd -d``
  and ``libvirtd -d`` itself when no daemon answers, and waits for the socket. The daemons
  then outlive the CLI (as they would under systemd); stop them with their pid files
  (``/run/libvirtd.pid``, ``/run/virtlogd.pid``) if needed.
- QEMU runs as ``libvirt-qemu``. With ``dynamic_ownership`` libvirt chowns each image to that
  user while the guest runs and chowns read-write images back when it stops (also after
  ``destroy``). It does NOT chown back read-only disks (other guests may share them), so a
  BASE image attached without ``<seclabel model='dac' relabel='no'/>`` stays owned by
  ``libvirt-qemu`` — and writable by every QEMU of the host if its mode is 0644. Render that
  seclabel for BASE and keep BASE images root-owned and world-readable (0444): QEMU then opens
  them read-only as ``libvirt-qemu`` and BASE stays byte-identical and root's.
- Every directory above the images, kernel and initramfs must be searchable by
  ``libvirt-qemu`` (o+x), or QEMU fails with "Permission denied".
"""

from __future__ import annotations

import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import libvirt

from unionimg.errors import Conflict, MissingCapability, ToolFailed, UsageError
from unionimg.hypervisors import (
    Capabilities,
    Driver,
    Liveness,
    Prepared,
    Running,
    kvmprobe,
    now_iso,
)
from unionimg.hypervisors.profiles import check_paths, common, layer_disks, render_template
from unionimg.hypervisors.spec import BootSpec, instance_uuid
from unionimg.names import shown
from unionimg.poll import until
from unionimg.runner import run, which

log = logging.getLogger(__name__)

SYSTEM_URI = "qemu:///system"
START_TIMEOUT = 30.0
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
POLL = 0.2

_STATES: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",  # running, waiting on a resource
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

#: why a domain is shut off (virDomainShutoffReason)
_SHUTOFF_REASONS: dict[int, str] = {
    0: "unknown",
    1: "shutdown",
    2: "destroyed",
    3: "crashed",
    4: "migrated",
    5: "saved",
    6: "failed",
    7: "from-snapshot",
    8: "daemon",
}
#: why a domain is in state crashed (virDomainCrashedReason; on_crash=preserve)
_CRASHED_REASONS: dict[int, str] = {0: "unknown", 1: "panicked"}

_quiet = False


def _silence_default_handler() -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""
    global _quiet
    if not _quiet:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet = True


def _one_line(exc: libvirt.libvirtError) -> str:
    """libvirt's message on one line; QEMU's "Could not open 'X': why" when it is in there."""
    text = " ".join(str(exc.get_error_message() or exc).split())
    opened = re.search(r"Could not open '[^']*': [^.;{}]*", text)
    if opened:
        return opened.group(0).strip()
    return text if len(text) <= 400 else text[:397] + "..."


def _hint(message: str) -> str:
    if "Permission denied" in message:
        return (
            f"{message} (QEMU runs as libvirt-qemu: every directory above the images, kernel "
            "and initramfs must be searchable by it, e.g. chmod o+x DIR)"
        )
    return message


# --- the daemons -----------------------------------------------------------------------------


def _pid_of(pidfile: Path, comm: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and is ``comm``."""
    try:
        pid = int(pidfile.read_text().strip())
        state = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) S ...": comm may hold spaces, the state follows the last ')'
    name = state[state.find("(") + 1 : state.rfind(")")]
    if name != comm or state[state.rfind(")") + 2 :].startswith(("Z", "X")):
        return None
    return pid


def daemon_pids() -> dict[str, int]:
    """The running libvirt daemons started with ``-d`` (by us or anyone): name -> pid."""
    found = {}
    for name, pidfile in (("libvirtd", LIBVIRTD_PIDFILE), ("virtlogd", VIRTLOGD_PIDFILE)):
        pid = _pid_of(pidfile, name)
        if pid is not None:
            found[name] = pid
    return found


def _start_daemons() -> None:
    """Start virtlogd and libvirtd in the background unless they run (no systemd here)."""
    try:
        libvirtd = which("libvirtd")
        virtlogd = which("virtlogd")
    except MissingCapability as exc:
        raise MissingCapability(
            "libvirtd is not installed; apt-get install libvirt-daemon-system "
            "(or use a hypervisor that needs no daemon, e.g. uml)"
        ) from exc
    running = daemon_pids()
    for name, program in (("virtlogd", virtlogd), ("libvirtd", libvirtd)):
        if name in running:
            continue
        log.warning("%s is not running; starting '%s -d' (no systemd on this host)", name, name)
        # -d forks into the background and closes stdio, so run() returns at once; a second
        # starter racing us fails on the pid file lock, which is fine: one daemon runs.
        result = run([program, "-d"], check=False, cwd="/", timeout=60, what=f"starting {name}")
        if result.returncode != 0 and name not in daemon_pids():
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            raise ToolFailed(
                f"{name} -d failed: {lines[-1].strip() if lines else result.returncode}; "
                f"run '{name} -v' in a terminal to see why"
            )


def _autostart_allowed(uri: str) -> bool:
    return uri.split("?")[0] in (SYSTEM_URI, "qemu+unix:///system") and os.geteuid() == 0


def _systemd_host() -> bool:
    """systemd is the init: it owns the daemons (socket activation); do not start them."""
    return Path("/run/systemd/system").is_dir()


def connect(uri: str = SYSTEM_URI, *, start_timeout: float = START_TIMEOUT) -> libvirt.virConnect:
    """A libvirt connection to ``uri``; for ``qemu:///system`` as root on a host without
    systemd, virtlogd and libvirtd are started first if they do not run (nobody else would).

    Raises MissingCapability (libvirtd not installed, no permission) or ToolFailed.
    Returns a ``libvirt.virConnect``.
    """
    _silence_default_handler()
    autostart = _autostart_allowed(uri) and not _systemd_host()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        first = _one_line(exc)
    else:
        if autostart and "virtlogd" not in daemon_pids():
            _start_daemons()  # libvirtd alone cannot start a domain (its logs go via virtlogd)
        return conn
    if not autostart:
        if "Permission denied" in first or "authentication" in first.lower():
            raise MissingCapability(f"cannot connect to {uri}: {first}; run as root")
        system = uri.split("?")[0] in (SYSTEM_URI, "qemu+unix:///system")
        if system and _systemd_host():
            hint = "start it (systemctl start libvirtd)"
        elif system:
            hint = "run as root (libvirtd is then started) or start it as root (libvirtd -d)"
        else:
            hint = "check the URI"
        raise ToolFailed(f"cannot connect to libvirt at {uri}: {first}; {hint}")
    started = time.monotonic()
    _start_daemons()
    last = first
    while time.monotonic() - started < start_timeout:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            last = _one_line(exc)
            time.sleep(0.25)
            continue
        log.info("libvirtd answers at %s after %.1f s", uri, time.monotonic() - started)
        return conn
    raise ToolFailed(
        f"libvirtd started but {uri} did not answer within {start_timeout:.0f} s ({last}); "
        "see /var/log/libvirt/libvirtd.log or run 'libvirtd -v' in a terminal"
    )


# --- domains ---------------------------------------------------------------------------------


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise ToolFailed(f"libvirt could not look up instance {name}: {_one_line(exc)}") from exc


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UsageError(f"the domain XML is not well-formed: {exc}; re-render it") from exc


def domain_name(xml: str) -> str:
    """The ``<name>`` of a domain XML (UsageError if it has none)."""
    name = (_parse(xml).findtext("name") or "").strip()
    if not name:
        raise UsageError("the domain XML has no <name>; re-render it")
    return name


def _warn_relabelled_readonly_disks(root: ET.Element, name: str) -> None:
    if any(s.get("model") == "dac" and s.get("relabel") == "no" for s in root.findall("seclabel")):
        return  # the whole domain is exempt from relabelling (unionimg's profile does this)
    for disk in root.iter("disk"):
        if disk.find("readonly") is None:
            continue
        source = disk.find("source")
        if source is None:
            continue
        path = source.get("file") or source.get("dev") or "?"
        relabel_off = any(
            s.get("model") == "dac" and s.get("relabel") == "no" for s in source.iter("seclabel")
        )
        if not relabel_off:
            log.warning(
                "instance %s: read-only disk %s has no <seclabel model='dac' relabel='no'/>: "
                "libvirt will chown it to libvirt-qemu and leave it so",
                name,
                path,
            )


def _is_active(dom: libvirt.virDomain, name: str) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise ToolFailed(f"libvirt could not query instance {name}: {_one_line(exc)}") from exc


def define_and_start(conn: libvirt.virConnect, xml: str) -> None:
    """Define ``xml`` persistently (replacing the definition of a shut-off domain of that
    name) and start it. Conflict if that domain runs already."""
    root = _parse(xml)
    name = domain_name(xml)
    _warn_relabelled_readonly_disks(root, name)
    existing = _lookup(conn, name)
    if existing is not None:
        if _is_active(existing, name):
            raise Conflict(f"instance {name} is already running under libvirt; stop it first")
        wanted = (root.findtext("uuid") or "").strip().lower()
        if wanted and existing.UUIDString().lower() != wanted:
            # a stale definition with another uuid: defineXML would refuse to replace it
            undefine(conn, name)
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise ToolFailed(
            f"libvirt refused the definition of instance {name}: {_one_line(exc)}"
        ) from exc
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and _is_active(dom, name):
            raise Conflict(f"instance {name} is already running under libvirt") from exc
        raise ToolFailed(
            f"libvirt could not start instance {name}: {_hint(_one_line(exc))}"
        ) from exc


def state(conn: libvirt.virConnect, name: str) -> str:
    """``running`` | ``shutoff`` | ``absent`` | ``paused`` | ``shutting-down`` | ``crashed``
    | ``pmsuspended`` | ``nostate``."""
    return state_reason(conn, name)[0]


def state_reason(conn: libvirt.virConnect, name: str) -> tuple[str, str]:
    """(:func:`state`, why): for ``shutoff`` one of ``shutdown`` (the guest powered off),
    ``destroyed`` (pulled: a forced stop, or a reboot under on_reboot=destroy), ``crashed``
    (a panic the guest reported through pvpanic, with on_crash=destroy, or QEMU died),
    ``failed``...; for ``crashed`` (on_crash=preserve) ``panicked``; else ``""``."""
    dom = _lookup(conn, name)
    if dom is None:
        return "absent", ""
    try:
        code, reason = dom.state()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "absent", ""  # undefined meanwhile (a transient domain that stopped)
        raise ToolFailed(f"libvirt could not query instance {name}: {_one_line(exc)}") from exc
    text = _STATES.get(code, f"state-{code}")
    if code == libvirt.VIR_DOMAIN_SHUTOFF:
        return text, _SHUTOFF_REASONS.get(reason, f"reason-{reason}")
    if code == libvirt.VIR_DOMAIN_CRASHED:
        return text, _CRASHED_REASONS.get(reason, f"reason-{reason}")
    return text, ""


QEMU_RUN_DIR = Path("/run/libvirt/qemu")


def qemu_running(name: str) -> bool:
    """Whether the QEMU process libvirt started for domain ``name`` runs (read from its pid
    file and /proc, so it works while libvirtd is down)."""
    try:
        pid = int((QEMU_RUN_DIR / f"{name}.pid").read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return any(a.startswith(f"guest={name},".encode()) for a in args)


def wait_shutoff(conn: libvirt.virConnect, name: str, timeout: float) -> bool:
    """Wait until the domain is shut off (or gone); False if it still runs after ``timeout``."""
    return until(lambda: state(conn, name) in ("shutoff", "absent"), timeout, POLL)


def _destroy(conn: libvirt.virConnect, dom: libvirt.virDomain, name: str) -> None:
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if not _is_active(dom, name):
            return  # it stopped by itself meanwhile
        raise ToolFailed(f"libvirt could not destroy instance {name}: {_one_line(exc)}") from exc
    if not wait_shutoff(conn, name, 10.0):
        raise ToolFailed(f"instance {name} still runs 10 s after libvirt destroyed it")


def stop(
    conn: libvirt.virConnect,
    name: str,
    *,
    force: bool,
    timeout: float = 30.0,
    hard_after: bool = True,
    notice: Callable[[float], None] | None = None,
    notice_after: float = 3.0,
) -> str:
    """Shut the domain down: the ACPI power button, then wait up to ``timeout`` s; with
    ``force`` pull the plug (destroy) at once. A guest that ignores the power button (its OS
    does not handle ACPI) is destroyed when ``timeout`` runs out (``hard_after``; else
    ToolFailed naming ``--force``). ``notice(timeout)`` is called once when the guest still
    runs ``notice_after`` s after the button, so a caller can say it is waiting.

    Returns ``"clean"``, ``"forced"`` (``force``), ``"hard"`` (destroyed after the timeout)
    or ``"gone"`` (it was shut off or absent already)."""
    dom = _lookup(conn, name)
    if dom is None or not _is_active(dom, name):
        return "gone"
    if force:
        _destroy(conn, dom, name)
        return "forced"
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as exc:
        if not _is_active(dom, name):
            return "gone"  # it stopped by itself meanwhile
        raise ToolFailed(f"libvirt could not shut down instance {name}: {_one_line(exc)}") from exc
    first = min(notice_after, timeout) if notice is not None else timeout
    if wait_shutoff(conn, name, first):
        return "clean"
    if notice is not None and first < timeout:
        notice(timeout)
        if wait_shutoff(conn, name, timeout - first):
            return "clean"
    if not hard_after:
        raise ToolFailed(
            f"instance {name} did not shut down within {timeout:.0f} s of the ACPI power "
            f"button (does its OS handle it?); 'unionimg stop {name} --force' pulls the plug"
        )
    log.warning(
        "instance %s ignored the ACPI power button for %.0f s; pulling the plug (destroy)",
        name,
        timeout,
    )
    _destroy(conn, dom, name)
    return "hard"


def undefine(conn: libvirt.virConnect, name: str) -> None:
    """Remove the domain's definition (not its images). Quiet if it is absent; Conflict if
    it runs."""
    dom = _lookup(conn, name)
    if dom is None:
        return
    if _is_active(dom, name):
        raise Conflict(f"instance {name} is running under libvirt; stop it before undefining it")
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            # drivers without snapshots/NVRAM (the test driver) reject those flags
            if exc.get_error_code() not in (
                libvirt.VIR_ERR_INVALID_ARG,
                libvirt.VIR_ERR_NO_SUPPORT,
            ):
                raise
            dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise ToolFailed(f"libvirt could not undefine instance {name}: {_one_line(exc)}") from exc


# --- the driver ------------------------------------------------------------------------------

#: The console the kvm profile puts first on the kernel command line.
CONSOLE = "console=ttyS0"
#: What ``qemu:///system`` needs on this host to start a domain.
NEEDS = ("qemu-system-x86_64", "libvirtd", "virtlogd")


#: The most layers a chain may have under kvm: one virtio disk letter each, vdc to vdz (vda is
#: BASE, vdb U); letters past vdz would work in libvirt but are not worth the PCI slots.
MAX_LAYERS = 24


def render(spec: BootSpec) -> dict[str, str]:
    """``domain.xml`` of ``spec`` (type ``spec.domain_type``: kvm, or qemu for TCG)."""
    ctx = common(spec, CONSOLE)
    if spec.domain_type not in ("kvm", "qemu"):
        raise UsageError(
            f"instance {spec.name}: libvirt domain type '{shown(spec.domain_type)}' "
            "is not supported; use kvm, or qemu (TCG) where KVM does not work"
        )
    check_paths(spec, "emulator")
    layers = layer_disks(
        spec,
        MAX_LAYERS,
        "kvm",
        "virtio disks vda-vdz, two of them BASE and U",
        lambda i: "vd" + chr(ord("c") + i),
    )
    ctx |= {"domain_type": spec.domain_type, "emulator": str(spec.emulator), "layers": layers}
    return {"domain.xml": render_template("kvm/domain.xml.j2", ctx)}


def _connection_if_up() -> libvirt.virConnect | None:
    """A connection to ``qemu:///system`` when libvirtd runs, else None (never starts it:
    asking whether a guest runs must not start daemons)."""
    if "libvirtd" not in daemon_pids():
        return None
    return connect()


def _domain(rec: Running) -> str:
    if not rec.domain:
        raise Conflict(f"a kvm running record without its libvirt domain ({rec.console})")
    return rec.domain


class KvmDriver(Driver):
    name = "kvm"
    capabilities = Capabilities(
        can_start=True,
        can_snapshot=True,
        validated_by=("virt-xml-validate", "libvirt-test-driver"),
        kernel="guest",
        private_mounts=True,
        poll_interval=0.2,  # each look is a libvirt round trip
    )

    def can_boot_here(self) -> tuple[bool, str]:
        lacking = []
        for program in NEEDS:
            try:
                which(program)
            except MissingCapability:
                lacking.append(program)
        if lacking:
            return False, (
                f"{', '.join(lacking)} not installed (apt-get install qemu-system-x86 "
                "libvirt-daemon-system)"
            )
        if os.geteuid() != 0:
            return False, f"{SYSTEM_URI} needs root"
        return True, f"libvirt ({SYSTEM_URI}) starts QEMU; the domain type is probed at boot"

    def render(self, spec: BootSpec) -> dict[str, str]:
        return render(spec)

    def prepare(self, spec: BootSpec, *, boot: bool = False) -> Prepared:
        """With ``boot``: the domain type the KVM probe picks for ``spec.kernel`` (cached per
        host; said on stderr); else ``spec.domain_type`` as given."""
        if not boot:
            return Prepared(spec, render(spec))
        # a property of the host (cached per host kernel, QEMU and guest kernel)
        dtype, why = kvmprobe.domain_type(kvmprobe.PROBE_CACHE, spec.kernel)
        log.warning("%s: domain type %s (%s)", spec.name, dtype, why)
        spec = replace(spec, domain_type=dtype)
        return Prepared(spec, render(spec), facts={"domain_type": dtype, "why": why})

    def start(self, prepared: Prepared, record: Callable[[Running], None]) -> Running:
        spec = prepared.spec
        conn = connect()
        try:
            defined = spec.name in conn.listDefinedDomains()
            dom = conn.lookupByName(spec.name) if defined else None
            if dom is not None and dom.UUIDString() != spec.uuid:
                raise Conflict(
                    f"libvirt already has a domain named '{spec.name}' that unionimg "
                    "did not define; rename or undefine it"
                )
            rec = Running(
                hypervisor=self.name,
                started=now_iso(),
                console=str(spec.console_log),
                domain=spec.name,
                domain_type=spec.domain_type,
            )
            record(rec)  # before the domain exists: a crash of ours never hides a guest
            define_and_start(conn, prepared.files["domain.xml"])
        finally:
            conn.close()
        return rec

    def is_running(self, rec: Running) -> Liveness:
        domain = _domain(rec)
        conn = _connection_if_up()
        if conn is None:
            # libvirtd is down but the QEMU it started may run on: ask /proc, not libvirt
            return Liveness(qemu_running(domain))
        try:
            st, why = state_reason(conn, domain)
        finally:
            conn.close()
        if st not in ("shutoff", "absent", "crashed"):
            return Liveness(True)
        evidence = None
        if st == "crashed" or why in ("crashed", "failed"):
            evidence = f"libvirt reports the domain {st}, reason {why}"
        return Liveness(False, evidence)

    def stop(
        self,
        rec: Running,
        *,
        force: bool,
        timeout: float = 30.0,
        notice: Callable[[float], None] | None = None,
    ) -> str:
        conn = connect()
        try:
            return stop(conn, _domain(rec), force=force, timeout=timeout, notice=notice)
        finally:
            conn.close()

    def forget(self, instance: str) -> None:
        """Undefine the instance's libvirt domain if unionimg defined it (its UUID is the
        instance's) and it is shut off; nothing when libvirtd does not run."""
        conn = _connection_if_up()
        if conn is None:
            return
        try:
            if instance in conn.listDefinedDomains():
                dom = conn.lookupByName(instance)
                if dom.UUIDString() == instance_uuid(instance):
                    undefine(conn, instance)
        finally:
            conn.close()

    def mac_user(self, instance: str, mac: str) -> str | None:
        conn = _connection_if_up()
        if conn is None:
            return None
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if dom.name() != instance and f"'{mac}'" in dom.XMLDesc(0):
                    return f"libvirt domain '{dom.name()}'"
        finally:
            conn.close()
        return None


DRIVER = KvmDriver()
