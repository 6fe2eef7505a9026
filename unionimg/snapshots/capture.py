"""One consistent point of a running guest, captured into files: its memory image (kvm) and a
copy of its U image, of one instant; and the way back (a memory image resumed through libvirt).

kvm (QEMU through libvirt), live (the default): a *live external snapshot*
(``virDomainSnapshotCreateXML`` with ``VIR_DOMAIN_SNAPSHOT_CREATE_LIVE``, no metadata kept):
libvirt writes the guest's memory and device state to a file while the guest runs (QEMU's
pre-copy migration to the file; the ``virDomainSave`` format, the QEMU process stays), pauses
it for the last pass, and in that pause switches U to a qcow2 overlay (an external disk
snapshot of the same instant; the overlay made beforehand by ``qemu-img`` and reused), then
resumes. U is then frozen at the memory's instant while the guest writes to the overlay: it
is copied (``cp --sparse=always --reflink=auto``) and the overlay merged back (active block
commit, pivot) and removed. A take killed before the merge leaves the guest on the overlay;
the next take merges it first. The pause is measured as libvirt sees the domain paused.
Measured (TCG, 2 shared cores): 0.18-0.31 s median on 128/256 MiB guests, against 0.32-0.75 s
for the paused take (``UNIONIMG_SNAPSHOT_MODE=paused``: the domain paused while its memory is
written and U copied; kept to measure against). ``virDomainSave`` + ``virDomainRestore`` would
stop and restart QEMU (pause ~1.5 s); migrating to a file through QMP needs libvirt's QEMU
passthrough, which taints the domain.

uml: User-Mode Linux cannot save its memory (it has no migration stream, and a UML guest's
memory is a host file mapped by many host processes): its snapshots hold U only. The guest's
file systems are synced first (mconsole ``sysrq s``; then the guest kernel's "Emergency Sync
complete" awaited on its console, and U's disk in its /proc/diskstats until the journal commit
the sync started has landed: see :class:`Settle`), the guest stopped (mconsole ``stop``:
it then serves only the mconsole) while U is copied, and let go (``go``).

A restore (kvm) is ``virDomainRestoreFlags`` of a memory image with the domain XML rendered
for *this* host (its store's paths; the ABI — devices, memory, CPU, MAC — must be the one
saved, which it is: the same instance record renders it), running at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionimg import poll
from unionimg.errors import Conflict, StoreFull, ToolFailed
from unionimg.faults import checkpoint
from unionimg.fs.space import free_space, full_message
from unionimg.hypervisors import Running
from unionimg.runner import run

#: below this much free space a libvirt save error is reported as a full store
_FULL_BELOW = 64 << 20
#: seconds for the overlay's merge back into U (it holds what the guest wrote during the copy)
COMMIT_TIMEOUT = 120.0


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


def _memory_snapshot_xml(
    domain_xml: str, memfile: Path, overlay: tuple[str, Path] | None = None
) -> str:
    """A ``<domainsnapshot>``: memory external to ``memfile``; with ``overlay`` = (target,
    file), that disk gets an external qcow2 overlay made at the same instant, every other
    disk ``snapshot='no'``."""
    root = ET.fromstring(domain_xml)
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = f"unionimg-{time.time_ns()}"
    ET.SubElement(snap, "memory", snapshot="external", file=str(memfile))
    disks = ET.SubElement(snap, "disks")
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        dev = str(target.get("dev"))
        if overlay is not None and dev == overlay[0]:
            el = ET.SubElement(disks, "disk", name=dev, snapshot="external", type="file")
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=str(overlay[1]))
        else:
            ET.SubElement(disks, "disk", name=dev, snapshot="no")
    return ET.tostring(snap, encoding="unicode")


def _disk_on(domain_xml: str, image: Path) -> str | None:
    """The target device (``vdb``) of the domain's disk whose source is ``image``."""
    want = os.path.realpath(image)
    for disk in ET.fromstring(domain_xml).iter("disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is None or target is None or not target.get("dev"):
            continue
        path = source.get("file") or source.get("dev") or ""
        if path and os.path.realpath(path) == want:
            return str(target.get("dev"))
    return None


def u_target(domain_xml: str, upper: Path) -> str:
    """The target device of the domain's U disk; ToolFailed if it has none on ``upper``."""
    target = _disk_on(domain_xml, upper)
    if target is None:
        raise ToolFailed(f"the domain has no disk on {upper}: cannot snapshot its U image")
    return target


class PauseWatch:
    """How long a domain was paused while a call ran, as libvirt saw it: its state asked
    every ``interval`` s from a thread on a connection of its own (the calling one is busy in
    libvirt). Sums the intervals seen paused; the resolution is about ``interval``."""

    def __init__(self, domain: str, interval: float = 0.005) -> None:
        self.domain, self.interval = domain, interval
        self.paused_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import libvirt

        from unionimg.hypervisors import kvm

        conn = kvm.connect()
        try:
            dom = conn.lookupByName(self.domain)
            last = time.monotonic()
            while not self._stop.is_set():
                try:
                    paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
                except libvirt.libvirtError:
                    paused = False
                now = time.monotonic()
                if paused:
                    self.paused_s += now - last
                last = now
                time.sleep(self.interval)
        finally:
            conn.close()

    def __enter__(self) -> PauseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _commit_back(dom: Any, target: str, overlay: Path, upper: Path) -> None:
    """Merge the overlay the snapshot put on top of U back into U (an active block commit,
    then pivot): the domain writes to U again, the overlay is removed."""
    import libvirt

    what = f"merge the snapshot overlay {overlay} back into {upper}"
    try:
        dom.blockCommit(target, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    except libvirt.libvirtError as exc:
        raise ToolFailed(f"libvirt could not {what}: {exc}") from exc

    def pivoted() -> bool:
        info = dom.blockJobInfo(target, 0)
        if info and info.get("end", 0) > 0 and info.get("cur") == info.get("end"):
            try:
                dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            except libvirt.libvirtError:
                return False  # not ready yet
            return True
        return False

    if not poll.until(pivoted, COMMIT_TIMEOUT, 0.05):
        with contextlib.suppress(libvirt.libvirtError):
            dom.blockJobAbort(target, 0)
        raise ToolFailed(
            f"libvirt could not {what} within {COMMIT_TIMEOUT:.0f} s; the guest still writes "
            "to the overlay: run `unionimg snapshot take` on the VM again (it merges the "
            "overlay first) before stopping it"
        )
    with contextlib.suppress(OSError):
        overlay.unlink()


def capture_kvm(rec: Running, upper: Path, stage: Path, *, live: bool | None = None) -> Captured:
    """Memory to ``stage/memory`` and U to ``stage/u.img``, of one instant; the guest runs on
    afterwards whatever fails.

    live (the default): libvirt's live external snapshot (``VIR_DOMAIN_SNAPSHOT_CREATE_LIVE``)
    writes the memory while the guest runs (QEMU's pre-copy to the file), pauses it for the
    last pass, and in that pause puts a qcow2 overlay on U (an external disk snapshot of the
    same instant), then resumes: U is frozen at the memory's instant while the guest writes to
    the overlay. U is copied, then the overlay merged back (active block commit + pivot).
    Not live (``UNIONIMG_SNAPSHOT_MODE=paused``, kept to measure against): the domain paused
    while its memory is written and U copied."""
    import libvirt

    from unionimg.hypervisors import kvm

    if live is None:
        live = os.environ.get("UNIONIMG_SNAPSHOT_MODE", "live") != "paused"
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
        dtype = ET.fromstring(xml).get("type") or "qemu"
        if live:
            pause = _capture_live(dom, rec.domain, xml, upper, memfile, disk, stage)
        else:
            pause = _capture_paused(dom, rec.domain, xml, upper, memfile, disk, stage)
    finally:
        conn.close()
    return Captured(memfile, disk, pause, dtype)


def _capture_live(
    dom: Any, name: str, xml: str, upper: Path, memfile: Path, disk: Path, stage: Path
) -> float:
    import libvirt

    # next to U: QEMU (libvirt-qemu) can reach U's directory, not necessarily the staging
    overlay = upper.with_name(f"{upper.name}.snapshot-overlay")
    left = _disk_on(xml, overlay)
    if left is not None:  # a take killed before its merge: the guest still writes there
        _commit_back(dom, left, overlay, upper)
        xml = dom.XMLDesc(0)
    target = u_target(xml, upper)
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()  # no disk uses it: a leftover file
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    )
    if os.environ.get("UNIONIMG_SNAPSHOT_OVERLAY", "made") == "made":
        # made before the pause, not by libvirt inside it (its format job would be paused time)
        try:
            run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(upper),
                 str(overlay)],
                what="making the snapshot overlay",
            )  # fmt: skip
        except ToolFailed:
            with contextlib.suppress(OSError):
                overlay.unlink()
            if free_space(overlay.parent) < _FULL_BELOW:
                raise StoreFull(full_message(overlay.parent, 0, f"snapshot {name}")) from None
            raise
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    with PauseWatch(name) as watch:
        try:
            dom.snapshotCreateXML(_memory_snapshot_xml(xml, memfile, (target, overlay)), flags)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
            with contextlib.suppress(OSError):
                overlay.unlink()
            raise _libvirt_error(exc, f"save the memory of {name}", stage) from exc
    checkpoint("snapshot-take:overlaid")  # a test kills the take here: the next one merges
    try:
        copy_u(upper, disk)  # frozen: the guest writes to the overlay
    finally:
        _commit_back(dom, target, overlay, upper)
    return watch.paused_s


def _capture_paused(
    dom: Any, name: str, xml: str, upper: Path, memfile: Path, disk: Path, stage: Path
) -> float:
    import libvirt

    t0 = time.monotonic()
    try:
        dom.suspend()
    except libvirt.libvirtError as exc:
        raise ToolFailed(f"libvirt could not pause domain {name}: {exc}") from exc
    try:
        try:
            dom.snapshotCreateXML(
                _memory_snapshot_xml(xml, memfile),
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
            )
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, f"save the memory of {name}", stage) from exc
        copy_u(upper, disk)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
    return time.monotonic() - t0


SYNC_TIMEOUT = 30.0  # seconds a UML guest gets to finish its sync and its journal commit
#: U is the guest's second ubd disk (``ubd1``): its name in the guest's /proc/diskstats
U_DISK = "ubdb"
#: what the guest kernel prints when the work queued by 'sysrq s' has run
SYNC_DONE = b"Emergency Sync complete"
#: U's disk is settled after this long (and this many answers) with nothing in flight and
#: its cache-flush count unchanged (data writes go on: a guest rewriting a file writes
#: every time, but only a journal commit flushes) ...
QUIET_S = 0.3
QUIET_SAMPLES = 4
#: ... or, on a guest whose commits never pause, once this many cache flushes completed
#: after the sync did: each commit flushes twice (before its commit block and, the ubd
#: disk having no FUA, after it), so the commit in flight and the one the sync asked for
#: have both landed
BUSY_FLUSHES = 4


@dataclass(frozen=True)
class DiskCounters:
    """What the settling reads of one line of the guest's /proc/diskstats: I/Os in flight
    and cache flushes completed (its data writes do not matter: they go on while a guest
    rewrites a file, and only a journal commit flushes)."""

    in_flight: int
    flushes: int


def disk_counters(diskstats: str, disk: str = U_DISK) -> DiskCounters:
    """The counters of ``disk`` in a /proc/diskstats text (kernel >= 5.5 has the flush
    fields); a text without them is a failed take, not a guess."""
    for line in diskstats.splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == disk:
            if len(f) < 20 or not all(x.isdigit() for x in f[3:20]):
                break
            return DiskCounters(int(f[11]), int(f[18]))
    raise ToolFailed(f"the UML guest's /proc/diskstats has no full line for {disk}")


class Settle:
    """Decides from U's disk counters, sampled after the guest's sync completed, when the
    journal commit the sync started has landed. 'sysrq s' runs ``sync_fs`` without waiting
    (ext4 starts its journal commit and returns), so "Emergency Sync complete" can precede
    the commit block by a few milliseconds (the one CI failure of this take copied U then).
    Pure: the caller feeds samples and the monotonic time."""

    def __init__(self, first: DiskCounters, now: float) -> None:
        self.first = first
        self.last = first
        self.since = now
        self.samples = 0

    def settled(self, c: DiskCounters, now: float) -> bool:
        if c.in_flight or c.flushes != self.last.flushes:
            self.since, self.samples = now, 0
        self.last = c
        self.samples += 1
        if c.in_flight:
            return False
        quiet = now - self.since >= QUIET_S and self.samples >= QUIET_SAMPLES
        return quiet or c.flushes - self.first.flushes >= BUSY_FLUSHES


class ConsoleWatch:
    """Finds a line the guest kernel prints in its console log after a point (only the new
    bytes are read, each once; the log is the guest's: only a fixed marker is looked for)."""

    def __init__(self, log: Path, marker: bytes) -> None:
        self.log = log
        self.marker = marker
        self.pos = log.stat().st_size if log.exists() else 0
        self.tail = b""

    def said(self) -> bool:
        try:
            with self.log.open("rb") as f:
                f.seek(self.pos)
                while chunk := f.read(1 << 16):
                    self.pos += len(chunk)
                    seen = self.tail + chunk
                    if self.marker in seen:
                        return True
                    self.tail = seen[-(len(self.marker) - 1) :]
        except FileNotFoundError:
            pass
        return False


def sync_uml(sock: Path, console: Path, pid: int) -> None:
    """The guest's file systems synced and U's journal committed: 'sysrq s', then its
    kernel's "Emergency Sync complete" on the console (data written back, commits started),
    then U's disk settled (:class:`Settle`). Either not seen in time is a failed take."""
    from unionimg.hypervisors import uml

    watch = ConsoleWatch(console, SYNC_DONE)
    uml.mconsole(sock, "sysrq s")
    if not poll.until(watch.said, SYNC_TIMEOUT, interval=0.05):
        raise ToolFailed(
            f"UML guest (pid {pid}) did not report its emergency sync complete within "
            f"{SYNC_TIMEOUT:.0f} s after 'sysrq s' (a guest kernel log level below 5 hides "
            "it: 'dmesg -n 7' in the guest); no snapshot taken"
        )

    def counters() -> DiskCounters:
        return disk_counters(uml.mconsole(sock, "proc diskstats"))

    settle = Settle(counters(), time.monotonic())
    if not poll.until(lambda: settle.settled(counters(), time.monotonic()), SYNC_TIMEOUT, 0.05):
        raise ToolFailed(
            f"UML guest (pid {pid}): its U disk ({U_DISK}) did not settle within "
            f"{SYNC_TIMEOUT:.0f} s after its sync; no snapshot taken"
        )


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
    sync_uml(sock, Path(rec.console), rec.pid)  # the guest runs on meanwhile
    t0 = time.monotonic()
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
