"""Which kernel an instance boots, and the initramfs that goes with it.

A driver says which kind of kernel its guests boot (:attr:`Capabilities.kernel
<unionimg.hypervisors.Capabilities.kernel>`):

* ``guest``: the base's own kernel (kept with its generation), else the host's newest
  ``/boot/vmlinuz-*``; the initramfs carries that kernel's modules (from the base image when
  the kernel is the base's) plus UML's;
* ``uml``: the UML kernel :func:`unionimg.boot.umlprobe.select` finds booting on this host
  (Debian's ``/usr/bin/linux.uml``, else the project-built one); the initramfs carries its
  modules (none for a kernel with everything built in).

The shared initramfs is built once per kernel and content (:mod:`unionimg.boot.initramfs`),
cached in ``STORE/boot/``; each instance's initramfs is that archive followed by a small one
holding its NIC naming files (:func:`instance_initramfs`).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from unionimg.boot import umlprobe
from unionimg.boot.initramfs import (
    DEFAULT_MODULES,
    KernelModules,
    build_initramfs,
    guest_init_script,
    pack_cpio,
)
from unionimg.boot.umlprobe import UmlKernel
from unionimg.errors import MissingCapability
from unionimg.layers.base import Generation, mount_generation, unmount_layers
from unionimg.store.layout import Store

UML_MODULES = Path("/usr/lib/uml/modules")


@dataclass(frozen=True)
class BootKernel:
    """The kernel an instance boots and where the modules of its initramfs come from."""

    path: Path
    sources: tuple[tuple[str, KernelModules, str], ...]
    """(kind, modules, stamp) for the initramfs: kind ``base`` (the modules are read from the
    base image), ``host`` or ``uml``; the stamp changes when the modules do."""
    transport: str = "tuntap"
    """How a UML command line attaches the NIC (:data:`unionimg.boot.umlprobe.TRANSPORTS`)."""
    facts: Mapping[str, object] = field(default_factory=dict)
    """What ``boot`` reports about the choice (``uml_kernel``)."""
    note: str = ""
    """One line said on stderr when it boots (which UML kernel, and why)."""


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
    return umlprobe.select()


def _guest(gen: Generation) -> BootKernel:
    sources: list[tuple[str, KernelModules, str]]
    if gen.kernel_path is not None and gen.kernel:
        kernel = gen.kernel_path
        modules = KernelModules(gen.kernel, Path("/lib/modules") / gen.kernel)
        sources = [("base", modules, f"{gen.base}:{gen.number}")]
    else:
        kernel, version = _host_kernel()
        host = KernelModules.in_root(version)
        if not host.modules_dir.is_dir():
            raise MissingCapability(f"the host has {kernel} but no {host.modules_dir}")
        sources = [("host", host, _dir_stamp(host.modules_dir))]
    sources += [("uml", k, _dir_stamp(k.modules_dir)) for k in _uml_modules()]
    return BootKernel(kernel, tuple(sources))


def _uml(gen: Generation) -> BootKernel:
    del gen  # the UML kernel is the host's, whatever the base
    chosen = uml_kernel()
    mods = chosen.modules_dir  # None for a kernel with everything built in
    sources = []
    if mods is not None:
        sources.append(("uml", KernelModules(chosen.release, mods), _dir_stamp(mods)))
    return BootKernel(
        chosen.path,
        tuple(sources),
        transport=chosen.transport,
        facts={"uml_kernel": chosen.as_dict()},
        note=f"UML kernel {chosen.path} ({chosen.reason})",
    )


#: How each kind of kernel (:data:`unionimg.hypervisors.KERNEL_KINDS`) is chosen.
CHOOSERS: Final[Mapping[str, Callable[[Generation], BootKernel]]] = {
    "guest": _guest,
    "uml": _uml,
}


def choose(gen: Generation, kind: str) -> BootKernel:
    """The kernel of kind ``kind`` that boots an instance of generation ``gen`` here."""
    return CHOOSERS[kind](gen)


def shared_initramfs(store: Store, gen: Generation, kernel: BootKernel) -> Path:
    """The initramfs shared by every instance booting ``kernel``, built once."""
    key = hashlib.sha256(
        json.dumps(
            [
                hashlib.sha256(guest_init_script()).hexdigest(),
                list(DEFAULT_MODULES),
                [(kind, k.version, stamp) for kind, k, stamp in kernel.sources],
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = store.root / "boot" / f"initrd-{key}.cpio.gz"
    if cache.is_file():
        return cache
    cache.parent.mkdir(mode=0o700, exist_ok=True)
    base_modules = any(kind == "base" for kind, _, _ in kernel.sources)
    with store.staging("initramfs") as stage:
        kernels = [k for kind, k, _ in kernel.sources if kind != "base"]
        if base_modules:
            mnt = mount_generation(store, gen, stage / "base")  # its chain, if a delta
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
                unmount_layers(stage / "base")
        else:
            build_initramfs(stage / "initrd", kernels=kernels)
        os.replace(stage / "initrd", cache)
    return cache


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
