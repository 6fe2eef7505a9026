"""The guest's early boot: module resolution, the archive, and real boots under QEMU and UML.

The boot tests make a tiny busybox base (BASE.img) and an empty upper image (U.img), boot them
with the initramfs and check from inside the guest (console markers) and from the host (the
file the guest wrote is in U's upper/, BASE is bit-for-bit unchanged, U is clean).

Missing root, QEMU, UML or kernels skip with the reason; with UNIONIMG_REQUIRE_REAL=1 they fail.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import chainlayers
from tests.conftest import need as require
from tests.conftest import need_programs as require_programs
from tests.conftest import need_uml_kernel, uml_nic_arg
from unionimg.boot.initramfs import (
    DEFAULT_MODULES,
    INIT_APPLETS,
    LOAD_LIST,
    InitramfsInfo,
    KernelModules,
    build_initramfs,
    decompressed_name,
    default_kernels,
    elf_is_static,
    guest_init_script,
    merge_load_order,
    parse_show_depends,
    resolve_modules,
    uml_kernels,
)
from unionimg.errors import MissingCapability, UsageError
from unionimg.fs.mounts import OVERLAY_OPTIONS
from unionimg.layers.running import analyse, console_lines
from unionimg.runner import run

BUSYBOX = Path("/bin/busybox")
QEMU_MAC = "52:54:00:12:34:56"
UML_MAC = "52:54:00:12:34:57"
GUEST_FILE = "guest-wrote.txt"
GUEST_TEXT = "written by the guest\n"
BOOT_TIMEOUT = 120.0


def qemu_guest_kernel() -> tuple[Path, str] | None:
    """The newest /boot/vmlinuz-VERSION whose modules are installed."""
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").is_file():
            return vmlinuz, version
    return None


# --- a reader for the archive (newc), to check exactly what went in ---------------------------


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def read_newc(blob: bytes) -> list[CpioEntry]:
    entries: list[CpioEntry] = []
    off = 0
    while True:
        header = blob[off : off + 110]
        assert header[:6] == b"070701", f"no newc header at offset {off}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, size, namesize = (
            fields[1],
            fields[2],
            fields[3],
            fields[5],
            fields[6],
            fields[11],
        )
        name = blob[off + 110 : off + 110 + namesize - 1].decode()
        off = _align4(off + 110 + namesize)
        data = blob[off : off + size]
        off = _align4(off + size)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, uid, gid, mtime, data))


def archive_entries(info: InitramfsInfo) -> dict[str, CpioEntry]:
    return {e.name: e for e in read_newc(gzip.decompress(info.path.read_bytes()))}


# --- pure parts ----------------------------------------------------------------------------

# As modprobe prints it: a doubled leading slash, a trailing blank, repeated dependencies.
SD_MOD_SHOW_DEPENDS = "".join(
    f"insmod //lib/modules/6.1.0-56-amd64/kernel/{rel} \n"
    for rel in (
        "crypto/crct10dif_common.ko",
        "lib/crc64.ko",
        "crypto/crct10dif_common.ko",
        "arch/x86/crypto/crct10dif-pclmul.ko",
        "lib/crc-t10dif.ko",
        "drivers/scsi/scsi_common.ko",
        "drivers/scsi/scsi_mod.ko",
        "drivers/scsi/sd_mod.ko",
    )
)


def test_parse_show_depends_keeps_order_and_normalizes_paths() -> None:
    text = (
        "insmod //lib/modules/V/kernel/a.ko \n"
        "insmod /lib/modules/V/kernel/b.ko.xz opt=1\n"
        "\n"
        "builtin ext4\n"
        "install /bin/true\n"
    )
    parsed = parse_show_depends(text)
    assert parsed.insmod == ("/lib/modules/V/kernel/a.ko", "/lib/modules/V/kernel/b.ko.xz")
    assert parsed.builtin == ("ext4",)
    assert parsed.other == ("install /bin/true",)


def test_merge_load_order_keeps_first_occurrence() -> None:
    sd_mod = parse_show_depends(SD_MOD_SHOW_DEPENDS).insmod
    ext4 = ("/m/crc16.ko", "/m/jbd2.ko", "/m/ext4.ko")
    scsi_again = ("/lib/modules/6.1.0-56-amd64/kernel/drivers/scsi/scsi_mod.ko",)
    merged = merge_load_order([sd_mod, ext4, scsi_again])
    names = [p.rsplit("/", 1)[1] for p in merged]
    assert names == [
        "crct10dif_common.ko",
        "crc64.ko",
        "crct10dif-pclmul.ko",
        "crc-t10dif.ko",
        "scsi_common.ko",
        "scsi_mod.ko",
        "sd_mod.ko",
        "crc16.ko",
        "jbd2.ko",
        "ext4.ko",
    ]


def test_decompressed_name() -> None:
    assert decompressed_name("kernel/fs/x.ko.xz") == "kernel/fs/x.ko"
    assert decompressed_name("kernel/fs/x.ko.zst") == "kernel/fs/x.ko"
    assert decompressed_name("kernel/fs/x.ko.gz") == "kernel/fs/x.ko"
    assert decompressed_name("kernel/fs/x.ko") == "kernel/fs/x.ko"


def test_elf_is_static(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    assert not elf_is_static(text)
    assert not elf_is_static(Path("/bin/ls"))  # dynamically linked on every Debian
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing (apt-get install busybox-static)")
    assert elf_is_static(BUSYBOX)


def test_guest_init_uses_the_host_overlay_options() -> None:
    script = guest_init_script().decode()
    match = re.search(r'^OVL_OPTS="([^"]*)"$', script, re.MULTILINE)
    assert match is not None
    assert match.group(1) == OVERLAY_OPTIONS == "redirect_dir=off,metacopy=off,index=off,xino=off"
    assert script.startswith("#!/bin/sh\n")


def test_guest_init_is_valid_busybox_sh(tmp_path: Path) -> None:
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing (apt-get install busybox-static)")
    script = tmp_path / "init"
    script.write_bytes(guest_init_script())
    run([str(BUSYBOX), "sh", "-n", str(script)])
    text = script.read_text()
    for applet in ("dd", "insmod", "switch_root", "poweroff", "mount", "sleep", "setsid"):
        assert re.search(rf"\b{applet}\b", text)
        assert applet in INIT_APPLETS


def test_build_rejects_a_dynamic_busybox(tmp_path: Path) -> None:
    with pytest.raises(MissingCapability, match="static"):
        build_initramfs(tmp_path / "i.gz", kernels=[], busybox=Path("/bin/ls"))
    assert not (tmp_path / "i.gz").exists()


def test_build_rejects_a_kernel_given_twice(tmp_path: Path) -> None:
    k = KernelModules("6.1.0-x", tmp_path)
    with pytest.raises(UsageError, match="twice"):
        build_initramfs(tmp_path / "i.gz", kernels=[k, k])


# --- the archive -----------------------------------------------------------------------------


def test_uml_has_ext4_built_in_and_no_pci_drivers() -> None:
    require_programs("modprobe")
    kernels = uml_kernels()
    require(kernels, "no UML modules in /usr/lib/uml/modules (apt-get install user-mode-linux)")
    resolved = resolve_modules(kernels[0], DEFAULT_MODULES)
    assert "ext4" in resolved.builtin
    assert {"xen-blkfront", "virtio_pci", "ahci"} <= set(resolved.missing)
    assert resolved.load[-1].endswith("overlayfs/overlay.ko")


def test_archive_content_order_and_determinism() -> None:
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing (apt-get install busybox-static)")
    require_programs("modprobe", "cpio")
    kernels = default_kernels()
    require(kernels, "no kernel modules in /lib/modules or /usr/lib/uml/modules")
    with tempfile.TemporaryDirectory(prefix="unionimg-test-") as tmp:
        started = time.monotonic()
        info = build_initramfs(Path(tmp) / "a" / "initrd.cpio.gz", kernels=kernels)
        seconds = time.monotonic() - started
        again = build_initramfs(Path(tmp) / "b" / "initrd.cpio.gz", kernels=kernels)
        print(f"initramfs: {info.size} bytes, {info.entries} entries, built in {seconds:.2f} s")
        assert info.sha256 == again.sha256
        assert seconds < 3.0
        assert [p.name for p in Path(tmp, "a").iterdir()] == ["initrd.cpio.gz"]

        entries = read_newc(gzip.decompress(info.path.read_bytes()))
        names = [e.name for e in entries]
        assert names == sorted(names, key=lambda n: n.split("/"))
        assert len(names) == info.entries
        for entry in entries:  # parents first, root-owned, fixed mtime
            parent = entry.name.rpartition("/")[0]
            assert not parent or names.index(parent) < names.index(entry.name)
            assert (entry.uid, entry.gid, entry.mtime) == (0, 0, 0)
        by_name = {e.name: e for e in entries}
        assert by_name["init"].data == guest_init_script()
        assert by_name["init"].mode == 0o100755
        assert by_name["bin/busybox"].data == BUSYBOX.read_bytes()
        assert by_name["bin/sh"].mode == 0o120777 and by_name["bin/sh"].data == b"busybox"
        for point in ("dev", "proc", "sys", "run", "newroot"):
            assert by_name[point].mode == 0o40755
        for mods in info.kernels:
            listed = by_name[f"lib/modules/{mods.version}/{LOAD_LIST}"].data.decode().split()
            assert tuple(listed) == mods.staged
            for rel in listed:
                module = by_name[f"lib/modules/{mods.version}/{rel}"]
                assert module.mode == 0o100644 and module.data[:4] == b"\x7fELF"
            if mods.load:
                assert mods.staged[-1].endswith("overlay.ko")  # overlay needs nothing after it


def test_compressed_modules_are_stored_decompressed(tmp_path: Path) -> None:
    """A base whose kernel ships .ko.xz / .ko.zst modules (a module root other than /)."""
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing (apt-get install busybox-static)")
    require_programs("modprobe", "depmod", "cpio", "zstd")
    found = qemu_guest_kernel()
    require(found, "no Debian kernel with modules in /boot and /lib/modules")
    assert found is not None
    version = found[1]
    src = Path("/lib/modules") / version / "kernel"
    overlay = (src / "fs/overlayfs/overlay.ko").read_bytes()
    crc16 = (src / "lib/crc16.ko").read_bytes()
    root = tmp_path / "baseroot"
    moddir = root / "lib/modules" / version / "kernel"
    (moddir / "fs").mkdir(parents=True)
    (moddir / "lib").mkdir(parents=True)
    (moddir / "fs/overlay.ko.xz").write_bytes(
        lzma.compress(overlay, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    )
    (moddir / "lib/crc16.ko").write_bytes(crc16)
    run(["zstd", "-q", "--rm", str(moddir / "lib/crc16.ko")])
    run(["depmod", "-b", str(root), version])

    kernel = KernelModules.in_root(version, root)
    info = build_initramfs(
        tmp_path / "initrd.gz", kernels=[kernel], modules=["crc16", "overlay", "nosuch"]
    )
    (mods,) = info.kernels
    assert mods.load == ("kernel/lib/crc16.ko.zst", "kernel/fs/overlay.ko.xz")
    assert mods.staged == ("kernel/lib/crc16.ko", "kernel/fs/overlay.ko")
    assert mods.missing == ("nosuch",)
    entries = archive_entries(info)
    assert entries[f"lib/modules/{version}/kernel/fs/overlay.ko"].data == overlay
    assert entries[f"lib/modules/{version}/kernel/lib/crc16.ko"].data == crc16


# --- real boots ----------------------------------------------------------------------------

GUEST_INIT = f"""#!/bin/busybox sh
B=/bin/busybox
echo "GUEST-OK kernel=$($B uname -r)"
for n in /sys/class/net/*; do echo "GUEST-NIC ${{n##*/}} $($B cat $n/address)"; done
$B grep -E ' / |unionimg' /proc/mounts | $B sed 's/^/GUEST-MOUNT /'
echo "written by the guest" > /{GUEST_FILE}
$B sync
# U clean on disk before the power goes (also shows the U mount is reachable in the guest)
$B mount -o remount,ro /run/unionimg/u && echo GUEST-U-CLEAN
echo GUEST-DONE
$B poweroff -f
"""

ALT_INIT = """#!/bin/busybox sh
echo "GUEST-ALT-INIT $*"
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Lab:
    dir: Path
    initrd: InitramfsInfo
    base: Path
    base_sha256: str
    udir: Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require(BUSYBOX.is_file(), f"{BUSYBOX} missing (apt-get install busybox-static)")
    require_programs("modprobe", "cpio", "mke2fs", "debugfs", "e2fsck")
    with tempfile.TemporaryDirectory(prefix="unionimg-boot-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc"):
            (rootfs / d).mkdir(parents=True)
        shutil.copyfile(BUSYBOX, rootfs / "bin/busybox")
        (rootfs / "bin/busybox").chmod(0o755)
        (rootfs / "bin/sh").symlink_to("busybox")
        for name, text in (("init", GUEST_INIT), ("alt-init", ALT_INIT)):
            (rootfs / "sbin" / name).write_text(text)
            (rootfs / "sbin" / name).chmod(0o755)
        base = work / "BASE.img"
        run(["mke2fs", "-q", "-t", "ext4", "-L", "BASE", "-d", str(rootfs), str(base), "64M"])
        udir = work / "udir"
        (udir / "upper").mkdir(parents=True)
        (udir / "work").mkdir()
        info = build_initramfs(work / "initrd.cpio.gz")
        print(f"initramfs: {info.size} bytes for kernels {[k.version for k in info.kernels]}")
        yield Lab(work, info, base, sha256(base), udir)


@pytest.fixture
def u_image(lab: Lab) -> Iterator[Path]:
    path = lab.dir / "U.img"
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "U", "-d", str(lab.udir), str(path), "64M"])
    yield path
    path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Boot:
    console: str
    seconds: float
    returncode: int | None  # None: killed on purpose (``stop_at``)


def boot(argv: list[str], *, env: dict[str, str] | None = None, stop_at: str = "") -> Boot:
    """Run a VM to its end with the console captured.

    With ``stop_at`` the VM's process group is killed as soon as the console shows that text
    (``returncode`` is then None); after BOOT_TIMEOUT it is killed and the test fails.
    """
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        returncode: int | None = None
        try:
            while (returncode := proc.poll()) is None:
                if stop_at and stop_at.encode() in os.pread(out.fileno(), 1 << 24, 0):
                    break
                if time.monotonic() - started > BOOT_TIMEOUT:
                    break
                time.sleep(0.05)
        finally:
            if returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - started
        out.seek(0)
        console = out.read().decode(errors="replace")
    if returncode is None and not (stop_at and stop_at in console):
        pytest.fail(f"{argv[0]} still running after {BOOT_TIMEOUT} s; console:\n{console[-4000:]}")
    return Boot(console, seconds, returncode)


def assert_uml_powered_off(result: Boot) -> None:
    """The guest's kernel finished its own halt and its UML process ended. It exits 0 then;
    but Debian's UML 6.1 is now and then killed by SIGABRT in its own exit path after the
    guest's halt line (its exit calls have closed the console, so it says nothing; CI saw it
    twice in some thousands of boots). The guest had finished by then, so that counts too,
    as unionimg's own verdict has it (``running.teardown_fault``): only SIGABRT, and only with
    the halt line last on the console."""
    if result.returncode == 0:
        return
    lines = console_lines(result.console.encode())
    verdict = analyse(lines, lines)
    assert result.returncode == -signal.SIGABRT and verdict.halted, (
        f"UML ended with {result.returncode}:\n{result.console[-4000:]}"
    )
    print(f"warning: UML was killed by SIGABRT after the guest halted ('{verdict.last_line}')")


def test_uml_powered_off_takes_sigabrt_only_after_the_halt_line() -> None:
    console = "GUEST-DONE\r\nreboot: System halted\n"
    assert_uml_powered_off(Boot(console, 1.0, 0))
    assert_uml_powered_off(Boot(console, 1.0, -signal.SIGABRT))
    for bad in (
        Boot(console, 1.0, -signal.SIGSEGV),
        Boot(console, 1.0, 1),
        Boot("GUEST-DONE\n", 1.0, -signal.SIGABRT),
        Boot(console + "userspace - child died\n", 1.0, -signal.SIGABRT),
    ):
        with pytest.raises(AssertionError):
            assert_uml_powered_off(bad)


def check_guest(result: Boot, lab: Lab, u_image: Path, *, version: str, mac: str) -> None:
    console = result.console
    tail = console[-4000:]
    assert "unionimg-init: error" not in console, tail
    assert f"GUEST-OK kernel={version}" in console, tail
    assert re.search(rf"^GUEST-NIC \S+ {re.escape(mac)}\s*$", console, re.MULTILINE), tail
    assert re.search(r"^GUEST-MOUNT \S+ /run/unionimg/base ext4 ro,", console, re.MULTILINE)
    assert re.search(r"^GUEST-MOUNT \S+ /run/unionimg/u ext4 rw,", console, re.MULTILINE)
    assert re.search(
        r"^GUEST-MOUNT overlay / overlay rw,.*lowerdir=/run/unionimg/base,"
        r"upperdir=/run/unionimg/u/upper,workdir=/run/unionimg/u/work",
        console,
        re.MULTILINE,
    ), tail
    assert "GUEST-U-CLEAN" in console and "GUEST-DONE" in console, tail
    # from the host: the write landed in U's upper/, U is clean, BASE untouched
    listing = run(["debugfs", "-R", "ls -l /upper", str(u_image)]).stdout
    assert GUEST_FILE in listing
    content = run(["debugfs", "-R", f"cat /upper/{GUEST_FILE}", str(u_image)]).stdout
    assert content == GUEST_TEXT
    run(["e2fsck", "-fn", str(u_image)], what="checking U after the guest powered off")
    assert sha256(lab.base) == lab.base_sha256


def uml_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HOME"] = str(home)
    env["TMPDIR"] = str(home)
    return env


def uml_argv(lab: Lab, home: Path, *disks_and_args: str) -> list[str]:
    return [
        str(need_uml_kernel().path),
        "mem=256M",
        f"initrd={lab.initrd.path}",
        "con=null",
        "con0=fd:0,fd:1",
        f"uml_dir={home}",
        f"umid=unionimg-test-{os.getpid()}",
        *disks_and_args,
    ]


def uml_version(lab: Lab) -> str:
    kernel = need_uml_kernel()  # Debian's, or the project-built one (everything built in)
    require(
        kernel.modules_dir is None or kernel.release in {k.version for k in lab.initrd.kernels},
        f"no modules for UML kernel {kernel.release} in /usr/lib/uml/modules",
    )
    return kernel.release


@pytest.mark.slow
def test_boot_qemu_tcg(lab: Lab, u_image: Path) -> None:
    require_programs("qemu-system-x86_64")
    found = qemu_guest_kernel()
    require(found, "no Debian kernel in /boot with modules in /lib/modules (linux-image-amd64)")
    assert found is not None
    vmlinuz, version = found
    assert version in {k.version for k in lab.initrd.kernels}
    result = boot(
        [
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(vmlinuz),
            "-initrd",
            str(lab.initrd.path),
            "-append",
            "console=ttyS0 panic=-1",
            "-drive",
            f"file={lab.base},format=raw,if=virtio,readonly=on",
            "-drive",
            f"file={u_image},format=raw,if=virtio",
            "-netdev",
            "user,id=n0",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={QEMU_MAC}",
        ]
    )
    print(f"QEMU-TCG boot to power-off: {result.seconds:.1f} s")
    assert result.returncode == 0, result.console[-4000:]
    check_guest(result, lab, u_image, version=version, mac=QEMU_MAC)


@pytest.mark.slow
@pytest.mark.root
def test_boot_uml_with_tap_nic(lab: Lab, u_image: Path) -> None:
    version = uml_version(lab)
    require(os.geteuid() == 0, "a tap device needs root")
    require_programs("ip")
    require(Path("/dev/net/tun").exists(), "/dev/net/tun missing")
    tap = f"uitap{os.getpid() % 100000}"
    run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    try:
        run(["ip", "link", "set", tap, "up"])
        with tempfile.TemporaryDirectory(prefix="unionimg-uml-") as home:
            result = boot(
                uml_argv(
                    lab,
                    Path(home),
                    f"ubd0r={lab.base}",
                    f"ubd1={u_image}",
                    uml_nic_arg(need_uml_kernel(), tap, UML_MAC),
                ),
                env=uml_env(Path(home)),
            )
    finally:
        run(["ip", "link", "del", tap], check=False)
    assert tap not in run(["ip", "-o", "link", "show"]).stdout
    print(f"UML boot to power-off: {result.seconds:.1f} s")
    assert_uml_powered_off(result)
    check_guest(result, lab, u_image, version=version, mac=UML_MAC)


@pytest.mark.slow
def test_uml_honours_init_on_the_kernel_command_line(lab: Lab, u_image: Path) -> None:
    uml_version(lab)
    with tempfile.TemporaryDirectory(prefix="unionimg-uml-") as home:
        result = boot(
            uml_argv(
                lab,
                Path(home),
                f"ubd0r={lab.base}",
                f"ubd1={u_image}",
                "init=/sbin/alt-init",
                "single",
            ),
            env=uml_env(Path(home)),
        )
    assert "unionimg-init: switching root" in result.console, result.console[-4000:]
    assert re.search(r"^GUEST-ALT-INIT single\s*$", result.console, re.MULTILINE)
    assert "GUEST-OK" not in result.console


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["poweroff", "debug-shell"])
def test_uml_without_u_says_why(lab: Lab, debug: bool) -> None:
    """No U disk: one clear error line, then power-off (or a shell with unionimg.debug)."""
    uml_version(lab)
    args = [f"ubd0r={lab.base}", "unionimg.timeout=1", *(["unionimg.debug"] if debug else [])]
    shell_banner = "built-in shell (ash)"
    with tempfile.TemporaryDirectory(prefix="unionimg-uml-") as home:
        result = boot(
            uml_argv(lab, Path(home), *args),
            env=uml_env(Path(home)),
            stop_at=shell_banner if debug else "",
        )
    console = result.console
    error = re.search(r"^unionimg-init: error: (.*)$", console, re.MULTILINE)
    assert error is not None, console[-4000:]
    # a built kernel may also list loop and nbd devices
    assert error.group(1).startswith("no disk with LABEL=U after 1 s (block devices: ")
    assert re.search(r"\(block devices: [^)]*\bubda ", error.group(1)), error.group(1)
    assert "GUEST-OK" not in console
    if debug:
        assert result.returncode is None  # a shell waits on the console
        assert "unionimg-init: unionimg.debug: starting a shell" in console
        assert shell_banner in console
    else:
        assert_uml_powered_off(result)
        assert "unionimg-init: powering off" in console
        assert shell_banner not in console
    assert result.seconds < 30
    assert sha256(lab.base) == lab.base_sha256


# --- a chain of layers (issue 13): unionimg.lowers= ------------------------------------------


@dataclass(frozen=True)
class ChainLab:
    base: Path
    base_sha256: str
    top: chainlayers.Layer  # XA
    mid: chainlayers.Layer  # A


@pytest.fixture(scope="module")
def chain_lab(lab: Lab) -> Iterator[ChainLab]:
    """The lab's base plus the chain's base files, and layers A and XA (root: whiteouts)."""
    require(os.geteuid() == 0, "whiteouts and trusted.overlay.* xattrs need root")
    work = lab.dir / "chain"
    rootfs = work / "rootfs"
    work.mkdir()
    run(["cp", "-a", str(lab.dir / "rootfs"), str(rootfs)])  # device nodes as nodes
    chainlayers.add_base_files(rootfs)
    base = work / "BASE.img"
    run(["mke2fs", "-q", "-t", "ext4", "-L", "BASE", "-d", str(rootfs), str(base), "64M"])
    top, mid = chainlayers.make_chain(work)
    yield ChainLab(base, sha256(base), top, mid)


def boot_chain_uml(lab: Lab, *args: str) -> Boot:
    uml_version(lab)
    with tempfile.TemporaryDirectory(prefix="unionimg-uml-") as home:
        return boot(uml_argv(lab, Path(home), *args), env=uml_env(Path(home)))


def chain_lines(console: str) -> list[str]:
    return [ln.strip() for ln in console.splitlines() if ln.startswith("unionimg-guest: chain")]


@pytest.mark.slow
def test_uml_boots_a_chain(lab: Lab, chain_lab: ChainLab, u_image: Path) -> None:
    """unionimg.lowers=XA,A,BASE: each layer found by label, mounted read-only, and the overlay
    stacked top to bottom: XA's file over A's and BASE's, XA's whiteout and opaque directory
    honoured, A's own file and BASE's seen."""
    top, mid = chain_lab.top, chain_lab.mid
    result = boot_chain_uml(
        lab,
        f"ubd0r={chain_lab.base}",
        f"ubd1={u_image}",
        f"ubd2r={top.image}",
        f"ubd3r={mid.image}",
        "init=/sbin/chain-init",
        chainlayers.lowers([top, mid]),
    )
    console = result.console
    assert "unionimg-init: error" not in console, console[-4000:]
    lines = chain_lines(console)
    for expected in chainlayers.EXPECTED:
        assert expected in lines, console[-4000:]
    assert f"unionimg-init: layer {top.label} is /dev/ubdc" in console
    assert f"unionimg-init: layer {mid.label} is /dev/ubdd" in console
    lowerdir = (
        f"lowerdir=/run/unionimg/layers/{top.label}:/run/unionimg/layers/{mid.label}:"
        "/run/unionimg/base,upperdir=/run/unionimg/u/upper"
    )
    assert any(lowerdir in ln for ln in lines if " chain root " in ln), lines
    assert re.search(
        r"^unionimg-init: switching root to the union of /dev/ubdc, /dev/ubdd, /dev/ubda and "
        r"/dev/ubdb, starting /sbin/chain-init",
        console,
        re.MULTILINE,
    ), console[-4000:]
    assert_uml_powered_off(result)
    # read-only all the way: BASE and the layers unchanged, U clean
    assert sha256(chain_lab.base) == chain_lab.base_sha256
    run(["e2fsck", "-fn", str(top.image)])
    run(["e2fsck", "-fn", str(u_image)])


@pytest.mark.slow
def test_a_hostile_disk_label_is_never_evaluated(
    lab: Lab, chain_lab: ChainLab, u_image: Path, tmp_path: Path
) -> None:
    """The initramfs reads every disk's label; a disk whose label is shell code shaped like a
    layer label (L + 15 characters) is matched, never evaluated: the chain boots as before."""
    top, mid = chain_lab.top, chain_lab.mid
    hostile = tmp_path / "hostile.img"
    label = "L`echo PWNED>&2`"  # an eval of it would print PWNED on the console
    assert len(label) == 16
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, str(hostile), "4M"])
    result = boot_chain_uml(
        lab,
        f"ubd0r={hostile}",  # first: the scan reads it before every other disk
        f"ubd1r={chain_lab.base}",
        f"ubd2={u_image}",
        f"ubd3r={top.image}",
        f"ubd4r={mid.image}",
        "init=/sbin/chain-init",
        chainlayers.lowers([top, mid]),
    )
    assert "PWNED" not in result.console, result.console[-4000:]
    assert "unionimg-init: error" not in result.console, result.console[-4000:]
    for expected in chainlayers.EXPECTED:
        assert expected in chain_lines(result.console)


@pytest.mark.slow
def test_uml_chain_with_a_layer_missing_says_which(
    lab: Lab, chain_lab: ChainLab, u_image: Path
) -> None:
    """A layer named on the command line but not attached: the same bounded wait as BASE and
    U, then one error line naming its label and what to attach, and power-off."""
    top, mid = chain_lab.top, chain_lab.mid
    result = boot_chain_uml(
        lab,
        f"ubd0r={chain_lab.base}",
        f"ubd1={u_image}",
        f"ubd2r={top.image}",
        "unionimg.timeout=1",
        "init=/sbin/chain-init",
        chainlayers.lowers([top, mid]),
    )
    error = re.search(r"^unionimg-init: error: (.*)$", result.console, re.MULTILINE)
    assert error is not None, result.console[-4000:]
    message = error.group(1).strip()
    assert message.startswith(f"no disk with LABEL={mid.label} after 1 s (block devices: ")
    assert message.endswith(
        f"attach the layer images of its chain ({mid.label}; unionimg layer show)"
    )
    assert top.label not in message
    assert "unionimg-init: powering off" in result.console
    assert "unionimg-guest: chain" not in result.console
    assert_uml_powered_off(result)
    assert result.seconds < 30


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lowers", "why"),
    [
        ("Lxyz,BASE", "'Lxyz' is not a layer label"),
        ("L0123456789ABCDE,BASE", "is not a layer label"),
        ("L0123456789abcde,L0123456789abcde,BASE", "layer L0123456789abcde is named twice"),
        ("L0123456789abcde", "the last (bottom) layer must be BASE"),
        ("BASE,L0123456789abcde", "BASE must be the last (bottom) layer"),
        ("U,BASE", "'U' is not a layer label"),
    ],
)
def test_uml_refuses_a_malformed_chain(lab: Lab, u_image: Path, lowers: str, why: str) -> None:
    """A malformed unionimg.lowers= fails before any disk is looked for, naming what is wrong
    (the labels become variable names and paths in the initramfs: only L + hex passes)."""
    result = boot_chain_uml(
        lab, f"ubd0r={lab.base}", f"ubd1={u_image}", f"unionimg.lowers={lowers}"
    )
    error = re.search(r"^unionimg-init: error: (.*)$", result.console, re.MULTILINE)
    assert error is not None, result.console[-4000:]
    assert error.group(1).startswith(f"unionimg.lowers={lowers}: ")
    assert why in error.group(1)
    assert "switching root" not in result.console
    assert_uml_powered_off(result)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
