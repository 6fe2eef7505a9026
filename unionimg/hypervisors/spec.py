"""What a hypervisor driver needs to boot one instance. Pure data, made by
:func:`unionimg.boot.control.make_spec`, rendered and started by the drivers
(:mod:`unionimg.hypervisors`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

_NS = uuid.UUID("6f1c2d8e-4b7a-5c3e-9a10-2b4d6e8f0a1c")


def instance_uuid(name: str) -> str:
    """A stable UUID per instance name (libvirt, Xen and VirtualBox all want one)."""
    return str(uuid.uuid5(_NS, name))


@dataclass(frozen=True)
class BootSpec:
    name: str  # instance name: [A-Za-z0-9._-]{1,64}, already validated
    uuid: str
    mac: str  # aa:bb:cc:dd:ee:ff, unicast
    nic_name: str  # the name the guest gives the NIC with that MAC (eth0)
    memory_mib: int
    vcpus: int
    base_image: Path  # raw ext4 labeled BASE: always attached read-only
    upper_image: Path  # raw ext4 labeled U: read-write
    kernel: Path
    initrd: Path  # the instance's initramfs (shared part + its network naming files)
    cmdline: str  # extra kernel arguments; each profile adds its own console= argument
    console_log: Path  # where the serial console is written
    workdir: Path  # the instance's run directory (rendered files, UML's uml_dir, sockets)
    domain_type: str = "kvm"  # libvirt domain type for the kvm profile: kvm | qemu (TCG)
    tap: str = ""  # host tap device carrying the MAC (UML)
    uml_transport: str = "tuntap"  # UML NIC: tuntap (ethN=tuntap, UML < 6.15) | vector (vecN:)
    emulator: str = "/usr/bin/qemu-system-x86_64"
    # The VM's image chain between U and BASE, top to bottom: raw ext4 layer images, each
    # attached read-only, and the filesystem label of each (``L`` + the first 15 hex digits of
    # the layer's diff_id), which the profiles put on the kernel command line
    # (``unionimg.lowers=LABEL,...,BASE``) for the guest's initramfs to find them by.
    # Empty: BASE is the only lower layer.
    layer_images: tuple[Path, ...] = ()
    layer_labels: tuple[str, ...] = ()
