"""The driver internals that start real guests: libvirt (QEMU), the KVM probe, User-Mode
Linux. What every driver must do through the Driver interface (boot to the hand-over with its
MAC, stop, forget, render, validate) is tests/test_hypervisor_conformance.py, which reuses the
fixtures here (``lab``, ``conn``).

Real components throughout: the ``tiny`` fixture rootfs in an ext4 BASE image, an empty ext4
U image, the unionimg initramfs, libvirtd (started here if no daemon answers, and stopped
again afterwards), QEMU TCG, ``linux.uml`` with a tap NIC. The tiny guest's /sbin/init prints
``unionimg-guest: nic NAME mac MAC`` and ``unionimg-guest: boot N`` and powers off (or runs a
shell with ``unionimg.shell`` on its command line).

The domain XML and UML argv below are TEST FIXTURES written by hand: the functions tested here
take them as input; what the drivers render is tested in test_profiles.py and the suite.

Missing root, QEMU, UML, libvirtd or kernels skip with the reason; with
UNIONIMG_REQUIRE_REAL=1 they fail. Nothing is left behind: domains undefined, taps removed,
guest processes gone, temporary directories removed, daemons we started stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need as require
from tests.conftest import need_programs as require_programs
from tests.conftest import need_uml_kernel, uml_nic_arg
from unionimg.boot.initramfs import InitramfsInfo, build_initramfs
from unionimg.boot.umlprobe import UmlKernel
from unionimg.errors import Conflict, ToolFailed, UsageError
from unionimg.hypervisors import kvm, kvmprobe, uml
from unionimg.hypervisors.spec import instance_uuid
from unionimg.runner import run

REPO = Path(__file__).resolve().parent.parent
QEMU_MAC = "52:54:00:5a:00:01"
UML_MAC = "52:54:00:5a:00:02"
BOOT_TIMEOUT = 120.0
RUN_ID = f"{os.getpid()}"


def require_root(why: str) -> None:
    require(os.geteuid() == 0, f"{why} needs root")


def qemu_guest_kernel() -> Path | None:
    """The newest /boot/vmlinuz-VERSION whose modules are installed."""
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").is_file():
            return vmlinuz
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_text(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes().decode(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def console_text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def assert_guest_saw(console: str, mac: str, boot: int) -> None:
    tail = console[-3000:]
    assert re.search(rf"^unionimg-guest: nic \S+ mac {re.escape(mac)}\s*$", console, re.M), tail
    assert re.search(rf"^unionimg-guest: boot {boot}\s*$", console, re.M), tail


def uml_processes(umid: str) -> list[int]:
    """Live processes whose command line carries ``umid=UMID`` (UML guest and helpers)."""
    found = []
    marker = f"umid={umid}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if marker in args and stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


# --- the shared lab: BASE, initramfs ------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    dir: Path
    base: Path
    base_sha256: str
    udir: Path
    initrd: InitramfsInfo

    def new_u(self, name: str) -> Path:
        path = self.dir / name
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "U", "-d", str(self.udir), str(path), "64M"])
        return path


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require(Path("/bin/busybox").is_file(), "/bin/busybox missing (apt-get install busybox-static)")
    require_programs("modprobe", "cpio", "mke2fs", "debugfs", "e2fsck")
    from vm_fixtures import build

    rootfs = build("tiny")
    with tempfile.TemporaryDirectory(prefix="unionimg-drivers-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the images
        base = work / "BASE.img"
        run(["mke2fs", "-q", "-t", "ext4", "-L", "BASE", "-d", str(rootfs), str(base), "64M"])
        base.chmod(0o444)
        udir = work / "udir"
        (udir / "upper").mkdir(parents=True)
        (udir / "work").mkdir()
        info = build_initramfs(work / "initrd.cpio.gz")
        yield Lab(work, base, sha256(base), udir, info)


def check_images(lab: Lab, u_image: Path, *, boots: int | None) -> None:
    """From the host: BASE untouched and root's, U root's and clean, its boot count."""
    assert sha256(lab.base) == lab.base_sha256
    assert lab.base.stat().st_uid == 0, "BASE was left chowned"
    assert u_image.stat().st_uid == 0, "U was left chowned"
    run(["e2fsck", "-fn", str(u_image)], what="checking U after the guest stopped")
    if boots is not None:
        log = run(["debugfs", "-R", "cat /upper/var/log/boots", str(u_image)]).stdout
        assert len(log.splitlines()) == boots, log


# --- libvirt -----------------------------------------------------------------------------


def domain_xml(
    name: str, *, kernel: Path, lab: Lab, u_image: Path, console: Path, cmdline: str = ""
) -> str:
    """TEST FIXTURE: a minimal type='qemu' domain booting the union (not profiles' output)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{instance_uuid(name)}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{lab.initrd.path}</initrd>
    <cmdline>console=ttyS0 panic=-1 {cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{lab.base}'><seclabel model='dac' relabel='no'/></source>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{u_image}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='{QEMU_MAC}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def conn(root: None) -> Iterator[Any]:
    require_root("libvirt's qemu:///system")
    require_programs("libvirtd", "virtlogd", "virt-admin", "qemu-system-x86_64")
    before = kvm.daemon_pids()
    started = time.monotonic()
    connection = kvm.connect()
    seconds = time.monotonic() - started
    ours = {n: p for n, p in kvm.daemon_pids().items() if before.get(n) != p}
    print(f"libvirt answered after {seconds:.1f} s (daemons started here: {sorted(ours)})")
    try:
        yield connection
    finally:
        active = [d.name() for d in connection.listAllDomains(1)]  # 1: active domains
        connection.close()
        # Leave the host as we found it: stop the daemons we started, unless somebody else
        # (another test session) uses them meanwhile.
        clients = run(["virt-admin", "client-list", "libvirtd"], check=False).stdout
        in_use = bool(active) or any(ln.strip()[:1].isdigit() for ln in clients.splitlines()[2:])
        if ours and in_use:
            print(f"leaving the libvirt daemons we started running: in use ({active})")
        elif ours:
            for name in ("libvirtd", "virtlogd"):
                if name in ours:
                    os.kill(ours[name], signal.SIGTERM)
            deadline = time.monotonic() + 30
            while set(kvm.daemon_pids()) & set(ours) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not set(kvm.daemon_pids()) & set(ours), "our daemon survived"


@pytest.fixture
def domains(conn: Any) -> Iterator[list[str]]:
    """Names of domains a test defines; all destroyed and undefined afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        kvm.stop(conn, name, force=True)
        kvm.undefine(conn, name)
        assert kvm.state(conn, name) == "absent"
        Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)  # libvirt's own log


def guest_kernel() -> Path:
    kernel = qemu_guest_kernel()
    require(kernel, "no Debian kernel in /boot with modules in /lib/modules (linux-image-amd64)")
    assert kernel is not None
    return kernel


@pytest.mark.slow
@pytest.mark.root
def test_libvirt_conflict_and_forced_stop(lab: Lab, conn: Any, domains: list[str]) -> None:
    kernel = guest_kernel()
    name = f"uitest-{RUN_ID}-shell"
    domains.append(name)
    u_image = lab.new_u("U-libvirt-shell.img")
    console = lab.dir / "libvirt-shell.log"
    xml = domain_xml(
        name, kernel=kernel, lab=lab, u_image=u_image, console=console, cmdline="unionimg.shell"
    )
    kvm.define_and_start(conn, xml)
    assert wait_for_text(console, "unionimg-guest: shell", BOOT_TIMEOUT), console_text(console)
    assert kvm.state(conn, name) == "running"
    with pytest.raises(Conflict, match=f"instance {name} is already running under libvirt"):
        kvm.define_and_start(conn, xml)
    with pytest.raises(Conflict, match="stop it before undefining"):
        kvm.undefine(conn, name)
    # the tiny guest has no ACPI handler: the power button is ignored; without the hard
    # fallback a clear error names --force
    with pytest.raises(ToolFailed, match=r"did not shut down within 2 s.*--force"):
        kvm.stop(conn, name, force=False, timeout=2, hard_after=False)
    assert kvm.wait_shutoff(conn, name, 0.5) is False
    started = time.monotonic()
    assert kvm.stop(conn, name, force=True) == "forced"
    print(f"libvirt destroy: {time.monotonic() - started:.2f} s")
    assert kvm.state_reason(conn, name) == ("shutoff", "destroyed")
    assert sha256(lab.base) == lab.base_sha256
    assert u_image.stat().st_uid == 0 and lab.base.stat().st_uid == 0
    # shut off: starting again is allowed (the definition is replaced, even with a new uuid)
    kvm.define_and_start(conn, xml.replace(instance_uuid(name), instance_uuid("x")))
    assert kvm.state(conn, name) == "running"
    # by default a guest that ignores the power button is destroyed when the timeout runs out
    notices: list[float] = []
    started = time.monotonic()
    how = kvm.stop(conn, name, force=False, timeout=3, notice=notices.append, notice_after=1)
    assert how == "hard" and notices == [3]
    assert 3 <= time.monotonic() - started < 15
    assert kvm.state(conn, name) == "shutoff"
    kvm.undefine(conn, name)
    assert kvm.state(conn, name) == "absent"


def test_libvirt_rejects_bad_xml_in_one_line() -> None:
    conn = kvm.connect("test:///default")
    try:
        with pytest.raises(UsageError, match="not well-formed"):
            kvm.define_and_start(conn, "<domain")
        with pytest.raises(UsageError, match="no <name>"):
            kvm.define_and_start(conn, "<domain type='test'/>")
        with pytest.raises(ToolFailed) as info:
            kvm.define_and_start(
                conn, "<domain type='test'><name>x</name><memory>1</memory></domain>"
            )
        assert "\n" not in info.value.message and "instance x" in info.value.message
    finally:
        conn.close()


# --- the KVM probe -----------------------------------------------------------------------


@pytest.mark.slow
def test_kvm_probe_answers_consistently_and_caches(tmp_path: Path) -> None:
    require_programs("qemu-system-x86_64")
    kernel = guest_kernel()
    cache = tmp_path / "kvm-probe.json"
    started = time.monotonic()
    ok, reason = kvmprobe.kvm_works(cache, kernel, timeout=10)
    first = time.monotonic() - started
    print(f"KVM probe: {ok} in {first:.1f} s: {reason}")
    assert isinstance(ok, bool) and reason
    if not Path("/dev/kvm").exists():
        assert not ok and "/dev/kvm is absent" in reason
        assert not cache.exists()
    elif ok:
        assert "runs a guest kernel" in reason
    else:
        assert "does not boot under it" in reason and "using QEMU TCG" in reason
    assert kvmprobe.domain_type(cache, kernel) == ("kvm" if ok else "qemu", reason)
    if not Path("/dev/kvm").exists():
        return
    stamp = cache.stat().st_mtime_ns
    entries = json.loads(cache.read_text())["entries"]
    (entry,) = entries.values()
    assert entry["ok"] is ok and entry["reason"] == reason
    assert entry["key"]["host_kernel"] == os.uname().release
    assert entry["key"]["guest_kernel"] == str(kernel.resolve())
    started = time.monotonic()
    assert kvmprobe.kvm_works(cache, kernel, timeout=10) == (ok, reason)
    second = time.monotonic() - started
    print(f"KVM probe, cached: {second:.2f} s")
    assert second < 2.0 and cache.stat().st_mtime_ns == stamp  # no boot, no rewrite


@pytest.mark.slow
def test_probe_recognises_a_kernel_that_runs_and_a_qemu_that_fails() -> None:
    """The probe's own judgement, checked where the answer is known: TCG always runs the
    kernel; a QEMU that cannot start says why."""
    require_programs("qemu-system-x86_64")
    kernel = guest_kernel()
    good = kvmprobe.boot_probe(kernel, accel="tcg", timeout=90)
    print(f"TCG probe: {good}")
    assert good.ok, good.detail
    bad = kvmprobe.boot_probe(kernel, accel="no-such-accel", timeout=30)
    assert not bad.ok and bad.detail.startswith("QEMU failed:"), bad
    assert "no-such-accel" in bad.detail and bad.seconds < 10


# --- User-Mode Linux ---------------------------------------------------------------------


@pytest.fixture
def uml_ready(lab: Lab) -> UmlKernel:
    """The UML kernel that boots here; a packaged one needs its modules in the initramfs, a
    project-built one has everything built in."""
    kernel = need_uml_kernel()
    require(
        kernel.modules_dir is None or kernel.release in {k.version for k in lab.initrd.kernels},
        f"no modules for UML kernel {kernel.release} in /usr/lib/uml/modules",
    )
    return kernel


def uml_argv(lab: Lab, u_image: Path, umid: str, *extra: str) -> list[str]:
    """TEST FIXTURE: a UML command line booting the union (not profiles' output)."""
    return [
        str(need_uml_kernel().path),
        "mem=256M",
        f"ubd0r={lab.base}",
        f"ubd1={u_image}",
        f"initrd={lab.initrd.path}",
        "con=null",
        "con0=fd:0,fd:1",
        f"umid={umid}",
        *extra,
    ]


START_ELSEWHERE = """
import json, sys
from pathlib import Path
from unionimg.hypervisors import uml
print(uml.start(json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
"""


def start_from_another_process(argv: list[str], console: Path, workdir: Path) -> int:
    """Start the guest the way a CLI invocation does: from a process that exits at once, so
    the guest is not the test's child."""
    out = subprocess.run(
        [sys.executable, "-c", START_ELSEWHERE, json.dumps(argv), str(console), str(workdir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.root
def test_uml_started_elsewhere_is_waited_for(lab: Lab, uml_ready: UmlKernel) -> None:
    """A later CLI invocation is not the guest's parent: wait() polls /proc until the guest
    and its helpers are gone. (The conformance suite boots UML from this process.)"""
    require_root("a tap device")
    require_programs("ip")
    require(Path("/dev/net/tun").exists(), "/dev/net/tun missing")
    umid = f"uitest-{RUN_ID}-tap"
    tap = uml.tap_name(umid)
    assert re.fullmatch(r"ui[0-9a-f]{8}", tap) and tap == uml.tap_name(umid)
    u_image = lab.new_u("U-uml.img")
    workdir = lab.dir / "uml-tap"
    console = workdir / "console.log"
    argv = uml_argv(lab, u_image, umid, uml_nic_arg(uml_ready, tap, UML_MAC))
    uml.make_tap(tap)
    try:
        uml.make_tap(tap)  # idempotent
        flags = int(Path(f"/sys/class/net/{tap}/flags").read_text(), 16)
        assert flags & 0x1, "tap is not up"
        started = time.monotonic()
        pid = start_from_another_process(argv, console, workdir)
        assert uml.exit_status(pid) is None  # not our child: no status known here
        assert uml.wait(pid, BOOT_TIMEOUT, umid=umid), console_text(console)[-3000:]
        print(f"UML start (another process) to power-off: {time.monotonic() - started:.1f} s")
        assert_guest_saw(console_text(console), UML_MAC, boot=1)
        assert not uml_processes(umid) and not uml.group_members(pid)
    finally:
        uml.remove_tap(tap)
    assert not uml.tap_exists(tap)
    uml.remove_tap(tap)  # idempotent
    check_images(lab, u_image, boots=1)


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["clean", "force"])
def test_uml_stop_leaves_nothing_behind(lab: Lab, uml_ready: UmlKernel, force: bool) -> None:
    umid = f"uitest-{RUN_ID}-{'force' if force else 'clean'}"
    u_image = lab.new_u(f"U-uml-{umid}.img")
    workdir = lab.dir / umid
    console = workdir / "console.log"
    argv = uml_argv(lab, u_image, umid, "unionimg.shell")
    pid = uml.start(argv, console, workdir)
    try:
        assert wait_for_text(console, "unionimg-guest: shell", 60), console_text(console)[-3000:]
        assert uml.is_running(pid, umid=umid)
        assert not uml.is_running(pid, umid="some-other-guest")  # pid-reuse guard
        assert not uml.is_running(pid, "qemu-system")
        # UML's helpers are in its process group (6.1's share its command line; 7.x execs a
        # stub per address space)
        assert len(uml.group_members(pid)) > 1
        with pytest.raises(Conflict, match="already running"):
            uml.start(argv, console, workdir)
        assert uml.wait(pid, 0.3, umid=umid) is False
        started = time.monotonic()
        uml.stop(pid, force=force, timeout=20, umid=umid)
        print(f"UML stop (force={force}): {time.monotonic() - started:.2f} s")
    finally:
        if uml.is_running(pid, umid=umid):
            os.killpg(pid, signal.SIGKILL)
    assert not uml.is_running(pid)
    assert not uml_processes(umid), "UML processes left behind"
    assert not uml.group_members(pid)
    uml.stop(pid, force=True, umid=umid)  # not running: nothing to do
    if not force:
        # The clean path went through the mconsole (not SIGTERM), and the guest was halted
        # once its writable disk was clean on disk; it may be halted before it logs
        # "Emergency Remount complete", which comes after its last, non-ubd filesystem.
        assert "Emergency Remount R/O" in console_text(console)
        assert uml.ext4_clean(u_image) is True, "U left needing journal recovery"
        check_images(lab, u_image, boots=1)
    assert sha256(lab.base) == lab.base_sha256


def test_tap_names_are_checked() -> None:
    assert len(uml.tap_name("x" * 64)) <= 15
    assert uml.tap_name("a") != uml.tap_name("b")
    for bad in ("", "a" * 16, "a/b", "a b"):
        with pytest.raises(UsageError, match="bad tap device name"):
            uml.make_tap(bad)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
