"""One consistent point of a running guest, captured into files: its memory image (kvm) and a
copy of its U image, taken while the guest is paused; and the way back (a memory image
resumed through libvirt).

kvm (QEMU through libvirt): the domain is paused (``virDomainSuspend``: QEMU stops the vCPUs
and drains and flushes its block devices, so U on the host is what the guest's disk holds),
its memory and device state are written by libvirt to a file as an *external memory-only
snapshot* (``virDomainSnapshotCreateXML`` with ``<memory snapshot='external'>``, every disk
``snapshot='no'``, no metadata kept): the same file format as ``virDomainSave`` (libvirt's
header, the domain XML, QEMU's migration stream), but the QEMU process stays — a paused
domain stays paused. U is copied (``cp --sparse=always --reflink=auto``) and the domain is
resumed. Measured (busybox guest, 128 MiB, TCG): 0.28 s for the memory file, the guest
paused about 0.4 s in all. ``virDomainSave`` + ``virDomainRestore`` would stop and restart
QEMU (pause ~1.5 s); migrating to a file through QMP needs libvirt's QEMU passthrough,
which taints the domain.

uml: User-Mode Linux cannot save its memory (it has no migration stream, and a UML guest's
memory is a host file mapped by many host processes): its snapshots hold U only. The guest's
file systems are synced first (mconsole ``sysrq s``), the guest stopped (mconsole ``stop``:
it then serves only the mconsole) while U is copied, and let go (``go``).

A restore (kvm) is ``virDomainRestoreFlags`` of a memory image with the domain XML rendered
for *this* host (its store's paths; the ABI — devices, memory, CPU, MAC — must be the one
saved, which it is: the same instance record renders it), running at once.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from unionimg.errors import Conflict, StoreFull, ToolFailed
from unionimg.fs.space import free_space, full_message
from unionimg.hypervisors import Running
from unionimg.runner import run

#: below this much free space a libvirt save error is reported as a full store
_FULL_BELOW = 64 << 20


@dataclass(frozen=True)
class Captured:
    memory: Path | None  # the memory image (kvm), None for disk only
    disk: Path
    pause_s: float
    domain_type: str


def copy_u(src: Path, dst: Path) -> None:
    """A sparse (or reflinked) copy of a U image."""
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], what="copying U")


def _libvirt_error(exc: Exception, what: str, where: Path) -> Exception:
    text = " ".join(str(exc).split())[:300]
    if "No space left" in text or free_space(where) < _FULL_BELOW:
        return StoreFull(full_message(where, 0, what))
    return ToolFailed(f"libvirt could not {what}: {text}")


def _memory_snapshot_xml(domain_xml: str, memfile: Path) -> str:
    root = ET.fromstring(domain_xml)
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = f"unionimg-{time.time_ns()}"
    ET.SubElement(snap, "memory", snapshot="external", file=str(memfile))
    disks = ET.SubElement(snap, "disks")
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            ET.SubElement(disks, "disk", name=str(target.get("dev")), snapshot="no")
    return ET.tostring(snap, encoding="unicode")


def capture_kvm(rec: Running, upper: Path, stage: Path) -> Captured:
    """Pause the domain, save its memory to ``stage/memory``, copy U to ``stage/u.img``,
    resume. The guest runs on afterwards whatever fails."""
    import libvirt

    from unionimg.hypervisors import kvm

    if not rec.domain:
        raise Conflict(f"a kvm running record without its domain ({rec.console})")
    memfile, disk = stage / "memory", stage / "u.img"
    conn = kvm.connect()
    try:
        try:
            dom = conn.lookupByName(rec.domain)
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as exc:
            raise ToolFailed(f"libvirt does not know domain {rec.domain}: {exc}") from exc
        t0 = time.monotonic()
        try:
            dom.suspend()
        except libvirt.libvirtError as exc:
            raise ToolFailed(f"libvirt could not pause domain {rec.domain}: {exc}") from exc
        try:
            try:
                dom.snapshotCreateXML(
                    _memory_snapshot_xml(xml, memfile),
                    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
                )
            except libvirt.libvirtError as exc:
                raise _libvirt_error(exc, f"save the memory of {rec.domain}", stage) from exc
            copy_u(upper, disk)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
        pause = time.monotonic() - t0
        dtype = ET.fromstring(xml).get("type") or "qemu"
    finally:
        conn.close()
    return Captured(memfile, disk, pause, dtype)


def capture_uml(rec: Running, upper: Path, stage: Path) -> Captured:
    """Sync the guest's file systems, stop it, copy U, let it go (no memory: UML has none
    to save)."""
    from unionimg.hypervisors import uml

    if rec.pid is None:
        raise Conflict(f"a uml running record without its pid ({rec.console})")
    sock = uml.mconsole_socket(rec.pid)
    if sock is None:
        raise ToolFailed(f"UML pid {rec.pid} has no mconsole; cannot sync its file systems")
    disk = stage / "u.img"
    t0 = time.monotonic()
    uml.mconsole(sock, "sysrq s")
    uml.mconsole(sock, "stop")
    try:
        copy_u(upper, disk)
    finally:
        with contextlib.suppress(ToolFailed):
            uml.mconsole(sock, "go")
    return Captured(None, disk, time.monotonic() - t0, "")


def cpu_seconds(rec: Running) -> float:
    """The CPU time the guest has used so far (kvm: libvirt's domain cpu time; uml: the
    user and system time of every process of its group)."""
    if rec.domain:
        from unionimg.hypervisors import kvm

        conn = kvm.connect()
        try:
            return float(conn.lookupByName(rec.domain).info()[4]) / 1e9
        finally:
            conn.close()
    if rec.pid is not None:
        import os

        from unionimg.hypervisors import uml

        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [rec.pid, *uml.group_members(rec.pid)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total
    return 0.0


def append_console(domain_xml: str) -> str:
    """The domain XML with its serial console file opened for appending (QEMU truncates it
    otherwise: the restored guest's output follows the lines written before it)."""
    root = ET.fromstring(domain_xml)
    for serial in root.iter("serial"):
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None:
            source.set("append", "on")
    return ET.tostring(root, encoding="unicode")


def resume_kvm(memfile: Path, domain_xml: str) -> None:
    """Start the guest from memory image ``memfile`` with ``domain_xml`` (this host's
    paths), running."""
    import libvirt

    from unionimg.hypervisors import kvm

    conn = kvm.connect()
    try:
        conn.restoreFlags(str(memfile), domain_xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    except libvirt.libvirtError as exc:
        text = " ".join(str(exc).split())[:300]
        raise ToolFailed(
            f"libvirt could not resume the guest from its memory image: {text}"
        ) from exc
    finally:
        conn.close()
