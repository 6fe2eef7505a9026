"""Build the guest's early boot: one initramfs (gzip'd newc cpio) for every guest kernel.

The same archive boots the Debian amd64 kernel under QEMU/KVM, Xen and VirtualBox and the
User-Mode Linux kernel: its ``/init`` (``guest_init.sh``, shipped as package data) loads the
modules listed for ``uname -r`` in ``/lib/modules/<version>/unionimg.load``, finds the disks
by label (``BASE``, ``U``), mounts their overlay union and ``switch_root``s into it.

Layout of the archive::

    init                                   guest_init.sh
    bin/busybox, bin/<applet> -> busybox   a static busybox and the applets /init uses
    lib/modules/<version>/kernel/...ko     the modules, decompressed (busybox insmod)
    lib/modules/<version>/unionimg.load    their paths, one a line, in load order
    dev/ proc/ sys/ run/ newroot/          mount points

Which files a kernel needs comes from ``modprobe --show-depends`` (dependencies and softdeps
in load order); what is built into a kernel or absent from it is simply not loaded. Entries
are sorted, owned by root and carry a fixed mtime, so the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import lzma
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unionimg.errors import MissingCapability, ToolFailed, UsageError
from unionimg.runner import run

log = logging.getLogger(__name__)

#: Drivers for every hypervisor unionimg targets, plus the two filesystems of the union.
#: virtio (QEMU/KVM), xen front ends (Xen), AHCI/PIIX + sd_mod + e1000 (VirtualBox);
#: pvpanic-mmio reports a guest panic to QEMU's ISA pvpanic device (the kvm profile's).
DEFAULT_MODULES: tuple[str, ...] = (
    "pvpanic-mmio",  # first: a panic later in the initramfs already reaches the hypervisor
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "xen-blkfront",
    "xen-netfront",
    "libata",
    "ahci",
    "ata_piix",
    "sd_mod",
    "e1000",
    "ext4",
    "overlay",
)

#: busybox applets ``guest_init.sh`` calls (the debug shell installs the rest at run time).
INIT_APPLETS: tuple[str, ...] = (
    "cat",
    "cp",
    "cttyhack",
    "dd",
    "dmesg",
    "findfs",
    "insmod",
    "ip",
    "ls",
    "lsmod",
    "mkdir",
    "mount",
    "poweroff",
    "setsid",
    "sh",
    "sleep",
    "switch_root",
    "sync",
    "tr",
    "umount",
    "uname",
)

#: Where Debian's user-mode-linux package keeps the modules of ``/usr/bin/linux.uml``.
UML_MODULES_BASE = Path("/usr/lib/uml/modules")
#: The file in ``lib/modules/<version>/`` that tells /init what to insmod, in order.
LOAD_LIST = "unionimg.load"
#: Empty directories /init mounts on (``newroot`` takes the union before ``switch_root``).
MOUNT_POINTS: tuple[str, ...] = ("dev", "newroot", "proc", "run", "sys")

_COMPRESSED_SUFFIXES: tuple[str, ...] = (".xz", ".zst", ".gz")


@dataclass(frozen=True)
class KernelModules:
    """One guest kernel: its ``uname -r`` and the directory holding its ``modules.dep``."""

    version: str
    modules_dir: Path

    @classmethod
    def in_root(cls, version: str, root: Path = Path("/")) -> KernelModules:
        """The modules of ``version`` in a root filesystem (``/`` or a base's rootfs)."""
        return cls(version, root / "lib" / "modules" / version)


@dataclass(frozen=True)
class ShowDepends:
    """What ``modprobe --show-depends`` printed for one module."""

    insmod: tuple[str, ...]  # module files, in load order (duplicates kept as printed)
    builtin: tuple[str, ...]  # module names built into the kernel
    other: tuple[str, ...]  # lines this parser does not act on (install commands)


@dataclass(frozen=True)
class ResolvedModules:
    """The modules one kernel gets in the initramfs."""

    version: str
    load: tuple[str, ...]  # source files relative to the modules dir, in load order
    builtin: tuple[str, ...]  # requested names built into the kernel
    missing: tuple[str, ...]  # requested names this kernel does not have at all

    @property
    def staged(self) -> tuple[str, ...]:
        """The paths in the archive (below ``lib/modules/<version>/``), decompressed."""
        return tuple(decompressed_name(p) for p in self.load)


@dataclass(frozen=True)
class InitramfsInfo:
    """What :func:`build_initramfs` wrote: the file, its size and hash, the modules per kernel."""

    path: Path
    size: int
    sha256: str
    kernels: tuple[ResolvedModules, ...]
    entries: int


def parse_show_depends(text: str) -> ShowDepends:
    """Parse ``modprobe --show-depends`` output (``insmod PATH [OPTS]``, ``builtin NAME``)."""
    insmod: list[str] = []
    builtin: list[str] = []
    other: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        word, _, rest = line.partition(" ")
        fields = rest.split()
        if word == "insmod" and fields:
            insmod.append(os.path.normpath(fields[0]).replace("//", "/"))
        elif word == "builtin" and fields:
            builtin.append(fields[0])
        else:
            other.append(line)
    return ShowDepends(tuple(insmod), tuple(builtin), tuple(other))


def merge_load_order(orders: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """Concatenate load orders keeping each file's first occurrence.

    ``--show-depends`` lists every dependency before the module needing it, so the first
    occurrence of a file is never later than any module depending on it.
    """
    seen: set[str] = set()
    merged: list[str] = []
    for order in orders:
        for item in order:
            if item not in seen:
                seen.add(item)
                merged.append(item)
    return tuple(merged)


def decompressed_name(path: str) -> str:
    """``kernel/fs/x.ko.xz`` → ``kernel/fs/x.ko``; uncompressed names are unchanged."""
    for suffix in _COMPRESSED_SUFFIXES:
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


def kernels_in(modules_base: Path) -> list[KernelModules]:
    """Every kernel version under a ``lib/modules``-style directory that has a modules.dep."""
    if not modules_base.is_dir():
        return []
    return [
        KernelModules(entry.name, entry)
        for entry in sorted(modules_base.iterdir())
        if (entry / "modules.dep").is_file()
    ]


def host_kernels(root: Path = Path("/")) -> list[KernelModules]:
    """Kernels whose modules are in ``root/lib/modules`` (the host or a base's rootfs)."""
    return kernels_in(root / "lib" / "modules")


def uml_kernels(modules_base: Path = UML_MODULES_BASE) -> list[KernelModules]:
    """Kernels of Debian's user-mode-linux package."""
    return kernels_in(modules_base)


def default_kernels() -> list[KernelModules]:
    """The host's installed guest kernels and the UML kernel, if present."""
    return host_kernels() + uml_kernels()


def _check_version(version: str) -> None:
    if not version or "/" in version or version in (".", "..") or version != version.strip():
        raise UsageError(f"kernel version {version!r} is not a valid directory name")


def resolve_modules(kernel: KernelModules, names: Sequence[str]) -> ResolvedModules:
    """Ask ``modprobe --show-depends`` which files ``names`` need on ``kernel``, in load order.

    Host modprobe configuration is ignored (``-C /dev/null``); softdeps recorded in the
    modules themselves are kept.
    """
    _check_version(kernel.version)
    moddir = kernel.modules_dir
    if not (moddir / "modules.dep").is_file():
        raise UsageError(
            f"no modules.dep in {moddir} (kernel {kernel.version}); run 'depmod' for it first"
        )
    orders: list[tuple[str, ...]] = []
    builtin: list[str] = []
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="unionimg-modprobe-") as tmp:
        # modprobe -d ROOT reads ROOT/lib/modules/VERSION: give it that shape for any layout.
        link_parent = Path(tmp) / "lib" / "modules"
        link_parent.mkdir(parents=True)
        (link_parent / kernel.version).symlink_to(moddir.resolve())
        prefix = str(link_parent / kernel.version) + "/"
        for name in names:
            result = run(
                [
                    "modprobe",
                    "-C",
                    "/dev/null",
                    "-S",
                    kernel.version,
                    "-d",
                    tmp,
                    "--show-depends",
                    name,
                ],
                check=False,
                what=f"resolving module {name} of kernel {kernel.version}",
            )
            if result.returncode != 0:
                if "not found" in result.stderr:
                    missing.append(name)
                    continue
                raise ToolFailed(
                    f"modprobe --show-depends {name} failed for kernel {kernel.version}: "
                    f"{result.stderr.strip() or result.returncode}"
                )
            parsed = parse_show_depends(result.stdout)
            for line in parsed.other:
                log.warning("kernel %s, module %s: ignoring %r", kernel.version, name, line)
            builtin.extend(parsed.builtin)
            rel: list[str] = []
            for path in parsed.insmod:
                if not path.startswith(prefix):
                    raise ToolFailed(f"modprobe named {path}, outside {moddir}")
                rel.append(path[len(prefix) :])
            orders.append(tuple(rel))
    return ResolvedModules(
        version=kernel.version,
        load=merge_load_order(orders),
        builtin=tuple(dict.fromkeys(builtin)),
        missing=tuple(missing),
    )


def elf_is_static(path: Path) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (PT_INTERP)."""
    with path.open("rb") as fh:
        ident = fh.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            return False
        endian = "<" if ident[5] == 1 else ">"
        if ident[4] == 2:  # ELFCLASS64: e_phoff at 32, e_phentsize/e_phnum at 54/56
            header = fh.read(48)
            (phoff,) = struct.unpack_from(endian + "Q", header, 32 - 16)
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 54 - 16)
        else:  # ELFCLASS32: e_phoff at 28, e_phentsize/e_phnum at 42/44
            header = fh.read(36)
            (phoff,) = struct.unpack_from(endian + "I", header, 28 - 16)
            phentsize, phnum = struct.unpack_from(endian + "HH", header, 42 - 16)
        for index in range(phnum):
            fh.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", fh.read(4))
            if p_type == 3:  # PT_INTERP: needs ld.so, which the initramfs does not have
                return False
    return True


def guest_init_script() -> bytes:
    """The /init shipped inside the initramfs."""
    return importlib.resources.files("unionimg.boot").joinpath("guest_init.sh").read_bytes()


def _copy_module(src: Path, dst: Path) -> None:
    name = src.name
    if name.endswith(".ko.xz"):
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        dst.write_bytes(gzip.decompress(src.read_bytes()))
    elif name.endswith(".ko.zst"):
        run(["zstd", "-q", "-d", "-f", "-o", str(dst), str(src)], what=f"decompressing {src}")
    else:
        shutil.copyfile(src, dst)
    dst.chmod(0o644)


def _check_busybox(busybox: Path) -> None:
    if not busybox.is_file():
        raise MissingCapability(f"busybox not found at {busybox}; install busybox-static")
    if not elf_is_static(busybox):
        raise MissingCapability(
            f"{busybox} is not a static executable; the initramfs needs busybox-static"
        )
    applets = set(run([str(busybox), "--list"], what="listing busybox applets").stdout.split())
    lacking = sorted(set(INIT_APPLETS) - applets)
    if lacking:
        raise MissingCapability(f"{busybox} lacks the applets {', '.join(lacking)}")


def _stage(
    root: Path, busybox: Path, kernels: Sequence[KernelModules], resolved: Sequence[ResolvedModules]
) -> None:
    for name in ("bin", "lib", *MOUNT_POINTS):
        (root / name).mkdir(mode=0o755)
    init = root / "init"
    init.write_bytes(guest_init_script())
    init.chmod(0o755)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in INIT_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for kernel, mods in zip(kernels, resolved, strict=True):
        kdir = root / "lib" / "modules" / kernel.version
        kdir.mkdir(parents=True)
        for src_rel, dst_rel in zip(mods.load, mods.staged, strict=True):
            dst = kdir / dst_rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy_module(kernel.modules_dir / src_rel, dst)
        (kdir / LOAD_LIST).write_text("".join(f"{p}\n" for p in mods.staged), encoding="utf-8")
        (kdir / LOAD_LIST).chmod(0o644)


def _archive_names(root: Path, mtime: int) -> list[str]:
    """Every staged path, parents before children, sorted; normalizes modes and mtimes."""
    names: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            names.append((Path(dirpath) / name).relative_to(root))
    names.sort(key=lambda p: p.parts)
    for rel in names:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return [str(p) for p in names]


def pack_cpio(root: Path, names: Sequence[str], out: Path) -> None:
    """A newc archive of ``names`` (relative to ``root``, parents first), owned by root,
    reproducible; the format the kernel unpacks into its rootfs."""
    run(
        [
            "cpio",
            "--create",
            "--format=newc",
            "--owner=0:0",
            "--reproducible",
            "--quiet",
            f"--file={out}",
        ],
        input="".join(f"{n}\n" for n in names),
        cwd=str(root),
        what=f"packing {out.name}",
    )


def build_initramfs(
    out: Path,
    *,
    kernels: Sequence[KernelModules] | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    busybox: Path = Path("/bin/busybox"),
    mtime: int = 0,
) -> InitramfsInfo:
    """Write the initramfs to ``out`` (atomically) and describe what went in.

    ``kernels`` defaults to :func:`default_kernels`; pass ``host_kernels(base_rootfs)`` for
    a base that carries its own kernel. ``modules`` are module names as modprobe knows them.
    """
    kernels = default_kernels() if kernels is None else list(kernels)
    versions = [k.version for k in kernels]
    for version in versions:
        _check_version(version)
    if len(set(versions)) != len(versions):
        raise UsageError(f"kernel versions given twice: {', '.join(sorted(versions))}")
    _check_busybox(busybox)
    resolved = [resolve_modules(k, modules) for k in kernels]
    for mods in resolved:
        log.info(
            "kernel %s: %d module files, built in: %s, absent: %s",
            mods.version,
            len(mods.load),
            " ".join(mods.builtin) or "-",
            " ".join(mods.missing) or "-",
        )

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unionimg-initramfs-") as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        _stage(stage, busybox, kernels, resolved)
        names = _archive_names(stage, mtime)
        cpio_file = Path(tmp) / "initramfs.cpio"
        pack_cpio(stage, names, cpio_file)
        fd, tmp_out = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as raw_out:
                with (
                    gzip.GzipFile(
                        filename="", mode="wb", fileobj=raw_out, mtime=0, compresslevel=6
                    ) as gz,
                    cpio_file.open("rb") as src,
                ):
                    shutil.copyfileobj(src, gz, 1 << 20)
                raw_out.flush()
                os.fsync(raw_out.fileno())
            os.chmod(tmp_out, 0o644)
            os.replace(tmp_out, out)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    digest = hashlib.sha256()
    with out.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return InitramfsInfo(
        path=out,
        size=out.stat().st_size,
        sha256=digest.hexdigest(),
        kernels=tuple(resolved),
        entries=len(names),
    )
