"""The virtualbox driver: renders a VirtualBox VM and makes its boot disk; it does not start
guests (VirtualBox is not installed here).

Its profile is ``create-vm.sh`` (VBoxManage commands) and the VMDK descriptors ``boot.vmdk``,
``base.vmdk``, ``upper.vmdk`` (and ``layerN.vmdk`` per layer of the VM's chain, N = 0 for the
top one, immutable like BASE) that point at raw images in place (``templates/virtualbox/``).

VirtualBox cannot boot a kernel directly, so the virtualbox profile adds a small third disk,
``boot.img``: an MBR (SYSLINUX's ``mbr.bin``) and one active FAT16 partition at 1 MiB holding
SYSLINUX (``ldlinux.sys``/``ldlinux.c32``), ``syslinux.cfg``, the kernel and the initramfs.
It is made without mounting anything: ``mkfs.fat --offset`` formats the partition inside the
image file, ``mcopy`` (mtools) copies the files in, ``syslinux --offset --install`` writes the
boot sector (through mtools). The partition table is written here (16 bytes, no fdisk).

The guest finds BASE and U by label, so the boot disk being the first disk changes nothing.
VirtualBox attaches hard disks only through a disk format it knows, so the boot disk is
attached through ``boot.vmdk`` like the two images.

Needs the Debian packages syslinux, syslinux-common, mtools and dosfstools.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import tempfile
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from unionimg.errors import MissingCapability, NotFound, ToolFailed, UsageError
from unionimg.hypervisors import Capabilities, Driver, Prepared
from unionimg.hypervisors.profiles import common, kernel_cmdline, layer_disks, render_template
from unionimg.hypervisors.spec import BootSpec
from unionimg.names import parse_mac
from unionimg.runner import run

log = logging.getLogger(__name__)

SECTOR: Final = 512
#: File name, in ``spec.workdir``, of the boot disk (:func:`make_boot_disk`).
VBOX_BOOT_IMAGE: Final = "boot.img"
#: The console the profile puts first on the kernel command line (UART 1).
CONSOLE: Final = "console=ttyS0"
#: The three disks: role -> VMDK descriptor in ``spec.workdir``.
VBOX_DISKS: Final = (("boot", "boot.vmdk"), ("base", "base.vmdk"), ("upper", "upper.vmdk"))

#: The most layers a chain may have under virtualbox: an AHCI controller has 30 ports; the boot
#: disk, BASE and U take three (the layers are ``layerN.vmdk`` on ports 3...).
MAX_LAYERS: Final = 27

#: Where distributions keep SYSLINUX's BIOS master boot record (Debian first).
MBR_CANDIDATES: Final = (
    Path("/usr/lib/syslinux/mbr/mbr.bin"),
    Path("/usr/share/syslinux/mbr.bin"),
    Path("/usr/lib/syslinux/bios/mbr.bin"),
)
PART_START: Final = 2048  # sectors: the partition starts at 1 MiB
MIB: Final = 1 << 20
KERNEL_FILE: Final = "vmlinuz"
INITRD_FILE: Final = "initrd.img"
FAT_LABEL: Final = "UNIONIMGBT"
MAX_CMDLINE: Final = 2000  # x86 COMMAND_LINE_SIZE is 2048, minus what SYSLINUX adds
_MTOOLS_ENV: Final = {"MTOOLS_SKIP_CHECK": "1"}


@dataclass(frozen=True)
class BootDisk:
    path: Path
    size: int  # bytes, a multiple of 1 MiB

    @property
    def sectors(self) -> int:
        return self.size // SECTOR


def boot_disk_path(spec: BootSpec) -> Path:
    """Where the virtualbox profile expects the instance's boot disk."""
    return spec.workdir / VBOX_BOOT_IMAGE


def mbr_code() -> bytes:
    """SYSLINUX's 440-byte MBR boot code (it boots the active partition)."""
    for path in MBR_CANDIDATES:
        if path.is_file():
            code = path.read_bytes()
            if len(code) != 440:
                raise MissingCapability(f"{path} is {len(code)} bytes, not 440; reinstall syslinux")
            return code
    raise MissingCapability(
        "SYSLINUX's mbr.bin not found; install syslinux-common (apt-get install syslinux "
        "syslinux-common mtools dosfstools)"
    )


def _chs(lba: int) -> bytes:
    """CHS bytes of ``lba`` in the usual 255-head, 63-sector geometry (saturated past 1023)."""
    heads, spt = 255, 63
    cyl = lba // (heads * spt)
    if cyl > 1023:
        return bytes((254, 0xFF, 0xFF))
    head = (lba // spt) % heads
    sector = lba % spt + 1
    return bytes((head, sector | ((cyl >> 2) & 0xC0), cyl & 0xFF))


def mbr(code: bytes, disk_id: int, start: int, count: int) -> bytes:
    """A 512-byte MBR: ``code``, disk signature, one active FAT16 (LBA) partition."""
    entry = (
        bytes((0x80,))
        + _chs(start)
        + bytes((0x0E,))
        + _chs(start + count - 1)
        + struct.pack("<II", start, count)
    )
    return code[:440] + struct.pack("<IH", disk_id, 0) + entry + bytes(48) + b"\x55\xaa"


def _file(path: Path, what: str) -> int:
    if not path.is_file():
        raise NotFound(f"{what} {path} does not exist; build it first")
    return path.stat().st_size


def make_boot_disk(out: Path, kernel: Path, initrd: Path, cmdline: str) -> BootDisk:
    """Write a BIOS-bootable raw disk to ``out`` (atomically) that boots ``kernel`` with
    ``initrd`` and the kernel command line ``cmdline`` (the console= included; see
    :func:`unionimg.hypervisors.profiles.kernel_cmdline`)."""
    out = Path(out)
    kernel_size = _file(Path(kernel), "kernel")
    initrd_size = _file(Path(initrd), "initramfs")
    if len(cmdline) > MAX_CMDLINE:
        raise UsageError(f"kernel command line is {len(cmdline)} characters; use at most 2000")
    config = render_syslinux_cfg(cmdline, kernel_file=KERNEL_FILE, initrd_file=INITRD_FILE)
    code = mbr_code()
    # payload + ~200 KiB of SYSLINUX + FAT overhead, with room to spare
    fs_mib = max(16, math.ceil((kernel_size + initrd_size) * 1.1 / MIB) + 4)
    size = (fs_mib + 1) * MIB
    part_sectors = size // SECTOR - PART_START
    digest = hashlib.sha256(f"{kernel}\0{initrd}\0{cmdline}".encode()).digest()
    disk_id = int.from_bytes(digest[:4], "little")
    offset = PART_START * SECTOR
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.truncate(size)
            fh.write(mbr(code, disk_id, PART_START, part_sectors))
        what = f"making the boot disk {out}"
        run(
            [
                "mkfs.fat",
                f"--offset={PART_START}",
                "-h",
                str(PART_START),
                "-F",
                "16",
                "-n",
                FAT_LABEL,
                "-i",
                digest[4:8].hex(),
                "--invariant",
                str(tmp),
                str(part_sectors // 2),  # in KiB
            ],
            what=what,
        )
        image = f"{tmp}@@{offset}"
        with tempfile.TemporaryDirectory(prefix="unionimg-boot-") as stage:
            cfg = Path(stage) / "syslinux.cfg"
            cfg.write_text(config, encoding="utf-8")
            for src, dest in ((kernel, KERNEL_FILE), (initrd, INITRD_FILE), (cfg, cfg.name)):
                run(["mcopy", "-i", image, str(src), f"::/{dest}"], env=_MTOOLS_ENV, what=what)
        run(
            ["syslinux", "--offset", str(offset), "--install", str(tmp)],
            env=_MTOOLS_ENV,
            what=what,
        )
        listing = run(["mdir", "-a", "-b", "-i", image, "::/"], env=_MTOOLS_ENV, what=what)
        found = {line.rsplit("/", 1)[-1].lower() for line in listing.stdout.split()}
        lacking = {"ldlinux.sys", "syslinux.cfg", KERNEL_FILE, INITRD_FILE} - found
        if lacking:
            raise ToolFailed(f"boot disk {out} lacks {', '.join(sorted(lacking))} after install")
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("boot disk %s: %d MiB", out, size // MIB)
    return BootDisk(out, size)


def image_sectors(path: Path) -> int:
    """Size of a raw image in 512-byte sectors (what a VMDK extent line needs)."""
    size = _file(Path(path), "disk image")
    if size % SECTOR:
        raise UsageError(f"disk image {path} is {size} bytes, not a whole number of sectors")
    return size // SECTOR


def disk_sectors(spec: BootSpec) -> dict[str, int]:
    """The sizes :func:`render` needs: the boot disk, BASE, U and each layer image (``layerN``,
    N = 0 for the top layer) in 512-byte sectors."""
    return {
        "boot": image_sectors(boot_disk_path(spec)),
        "base": image_sectors(spec.base_image),
        "upper": image_sectors(spec.upper_image),
        **{f"layer{i}": image_sectors(image) for i, image in enumerate(spec.layer_images)},
    }


# --- the profile -----------------------------------------------------------------------------


def vbox_mac(mac: str) -> str:
    """VirtualBox's MAC spelling: 12 upper-case hex digits, no separators."""
    return parse_mac(mac).replace(":", "").upper()


def render_syslinux_cfg(cmdline: str, *, kernel_file: str, initrd_file: str) -> str:
    """``syslinux.cfg`` of a boot disk that boots ``/kernel_file`` with ``/initrd_file``."""
    return render_template(
        "virtualbox/syslinux.cfg.j2",
        {"cmdline": cmdline, "kernel_file": kernel_file, "initrd_file": initrd_file},
    )


def _vmdk(spec: BootSpec, role: str, image: Path, sectors: int) -> str:
    if isinstance(sectors, bool) or not isinstance(sectors, int) or sectors < 1:
        raise UsageError(f"instance {spec.name}: {role} image size {sectors!r} sectors is wrong")
    ns = uuidlib.UUID(spec.uuid)
    key = f"{role}:{image}:{sectors}"
    ctx = {
        "image": str(image),
        "sectors": sectors,
        "cylinders": min(sectors // (16 * 63), 16383),
        # stable per instance, role, image and size: a new base generation is a new medium
        "cid": hashlib.sha256(key.encode()).hexdigest()[:8],
        "image_uuid": str(uuidlib.uuid5(ns, "image:" + key)),
        "modification_uuid": str(uuidlib.uuid5(ns, "modification:" + key)),
    }
    return render_template("virtualbox/disk.vmdk.j2", ctx)


def render(spec: BootSpec, disk_sectors: Mapping[str, int]) -> dict[str, str]:
    """``create-vm.sh`` and the three VMDK descriptors of ``spec``. ``disk_sectors`` maps
    ``boot``, ``base`` and ``upper`` to the size of ``spec.workdir/boot.img``, the BASE and
    the U image in 512-byte sectors (:func:`disk_sectors` stats them)."""
    ctx = common(spec, CONSOLE)
    layers = layer_disks(
        spec,
        MAX_LAYERS,
        "virtualbox",
        "an AHCI controller has 30 ports, three of them the boot disk, BASE and U",
        lambda i: f"layer{i}",
    )
    disks = [*VBOX_DISKS, *((layer.device, f"{layer.device}.vmdk") for layer in layers)]
    missing = [role for role, _ in disks if role not in disk_sectors]
    if missing:
        raise UsageError(f"instance {spec.name}: no size given for the {missing[0]} image")
    images = {
        "boot": boot_disk_path(spec),
        "base": spec.base_image,
        "upper": spec.upper_image,
        **{layer.device: Path(layer.image) for layer in layers},
    }
    ctx |= {
        "vbox_mac": vbox_mac(spec.mac),
        "basefolder": str(spec.workdir / "virtualbox"),
        "ports": len(disks),
        "layers": [
            {"index": layer.index, "vmdk": str(spec.workdir / f"{layer.device}.vmdk")}
            for layer in layers
        ],
    }
    ctx |= {f"{role}_vmdk": str(spec.workdir / file) for role, file in VBOX_DISKS}
    files = {"create-vm.sh": render_template("virtualbox/create-vm.sh.j2", ctx)}
    for role, file in disks:
        files[file] = _vmdk(spec, role, images[role], disk_sectors[role])
    return files


# --- the driver ------------------------------------------------------------------------------


class VirtualBoxDriver(Driver):
    name = "virtualbox"
    capabilities = Capabilities(
        can_start=False,
        can_snapshot=True,  # VBoxManage snapshot
        validated_by=("qemu-img", "sh-n"),  # the VMDK descriptors; create-vm.sh's syntax
        kernel="guest",
    )

    def can_boot_here(self) -> tuple[bool, str]:
        return False, (
            "unionimg renders VirtualBox VMs (create-vm.sh, VMDK descriptors, a boot disk) but "
            "does not start them; run the rendered create-vm.sh on a VirtualBox host"
        )

    def render(self, spec: BootSpec) -> dict[str, str]:
        """The profile, with the sizes of the boot disk and the images stat'ed (the boot disk
        must exist: :meth:`prepare` makes it)."""
        common(spec, CONSOLE)  # the spec's own checks first, before any file is stat'ed
        return render(spec, disk_sectors(spec))

    def prepare(self, spec: BootSpec, *, boot: bool = False) -> Prepared:
        """The boot disk (``boot.img`` in ``spec.workdir``), then the profile that points at it."""
        del boot
        common(spec, CONSOLE)  # the spec's own checks first, before anything is made
        disk = make_boot_disk(
            boot_disk_path(spec), spec.kernel, spec.initrd, kernel_cmdline(spec, CONSOLE)
        )
        return Prepared(spec, self.render(spec), made=(disk.path,))


DRIVER = VirtualBoxDriver()
