"""Per-hypervisor boot recipes ("profiles"), rendered from Jinja2 templates. Pure.

A profile turns one :class:`~unionimg.hypervisors.spec.BootSpec` into the files a hypervisor
needs to boot the instance's two raw images (BASE read-only, U read-write) with its fixed MAC:

- ``kvm``: ``domain.xml``, a libvirt domain (type ``kvm``, or ``qemu`` for TCG);
- ``xen``: ``xl.cfg`` (PVH, for ``xl create``) and ``domain.xml`` (the libvirt/libxl twin);
- ``virtualbox``: ``create-vm.sh`` (VBoxManage commands) and the VMDK descriptors
  ``boot.vmdk``, ``base.vmdk``, ``upper.vmdk`` that point at raw images in place; the boot disk
  itself (``boot.img``, SYSLINUX + kernel + initramfs) is made by
  :mod:`unionimg.hypervisors.virtualbox`;
- ``uml``: ``uml.argv``, the User-Mode Linux command line, one argument per line.

:func:`render_net_naming` renders the guest side of the fixed MAC: a udev rule and a systemd
``.link`` file that give the NIC with that MAC the same name under every hypervisor.

Templates live in ``hypervisor_profiles/<hypervisor>/`` and ``udev_rules/``. Each template
has one output format, and every value written into it is escaped for that format: XML by
autoescape; xl.cfg, shell, udev, ``.link``, VMDK, SYSLINUX and UML argv values through a
filter that quotes the value or rejects it with :class:`UsageError` when the format cannot
hold it. A value that reaches a non-XML template without its filter is a template bug and
fails the render (:class:`TemplateBug`), so a forgotten filter cannot slip through.

Only :func:`write_rendered` (and the ``disk_sectors`` default of :func:`render`, which stats
images through :func:`unionimg.hypervisors.virtualbox.disk_sectors`) touches the file system.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import jinja2

from unionimg.errors import MissingCapability, UsageError
from unionimg.hypervisors.spec import BootSpec
from unionimg.names import HYPERVISORS, check_name, parse_mac
from unionimg.store.layout import write_atomic

__all__ = [
    "HYPERVISORS",
    "TEMPLATES",
    "VBOX_BOOT_IMAGE",
    "XEN_BRIDGE",
    "TemplateBug",
    "check_ifname",
    "kernel_cmdline",
    "link_value",
    "profile_dirs",
    "render",
    "render_net_naming",
    "render_syslinux_cfg",
    "sh_quote",
    "udev_value",
    "uml_argv",
    "vbox_mac",
    "write_rendered",
    "xl_quote",
]

#: Bridge the Xen profile plugs the NIC into (BootSpec has no network field yet).
XEN_BRIDGE: Final = "xenbr0"
#: File name, in ``spec.workdir``, of the VirtualBox boot disk made by
#: :mod:`unionimg.hypervisors.virtualbox`.
VBOX_BOOT_IMAGE: Final = "boot.img"
#: The console each profile puts first on the kernel command line (UML: its con0 channel).
CONSOLE: Final = {"kvm": "console=ttyS0", "xen": "console=hvc0", "virtualbox": "console=ttyS0"}

SECTOR: Final = 512
PACKAGE_DIR: Final = Path(__file__).resolve().parents[1]  # the unionimg package


class TemplateBug(RuntimeError):
    """A template wrote a value without the escaping filter of its format (a bug, not a user
    error: the CLI shows it with a traceback)."""


# --- where the templates are ---------------------------------------------------------------


def _data_dir(name: str) -> Path:
    # installed: package data inside the package; source checkout / editable: the repo root
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise MissingCapability(
        f"template directory '{name}' not found in {PACKAGE_DIR} or {PACKAGE_DIR.parent}; "
        "reinstall unionimg (the templates ship as package data)"
    )


def profile_dirs() -> tuple[Path, Path]:
    """The ``hypervisor_profiles`` and ``udev_rules`` directories in use."""
    return _data_dir("hypervisor_profiles"), _data_dir("udev_rules")


# --- escaping, one set of filters per output format -----------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# XML 1.0 cannot hold these characters at all, escaped or not
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _show(text: str) -> str:
    shown = text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | Path):
        raise TemplateBug(f"template value of type {type(value).__name__}: {value!r}")
    return str(value)


def _refuse(text: str, where: str, why: str) -> UsageError:
    return UsageError(f"'{_show(text)}' cannot be written into {where}: {why}")


def _no_control(text: str, where: str) -> str:
    if _CONTROL.search(text):
        raise _refuse(text, where, "it contains a newline or another control character")
    return text


class _Escaped(str):
    """A value already escaped for one output format (what that format's filters return)."""

    __slots__ = ()


class _XlText(_Escaped):
    __slots__ = ()


class _ShText(_Escaped):
    __slots__ = ()


class _UdevText(_Escaped):
    __slots__ = ()


class _LinkText(_Escaped):
    __slots__ = ()


class _ArgvText(_Escaped):
    __slots__ = ()


class _VmdkText(_Escaped):
    __slots__ = ()


class _SyslinuxText(_Escaped):
    __slots__ = ()


def xl_quote(value: object) -> str:
    """An xl.cfg string literal: ``'...'``, or ``"..."`` when the value holds a ``'``.

    xl strings cannot span lines and treat ``\\`` as an escape, so values with a newline or
    another control character, a backslash, or both quote kinds are refused.
    """
    text = _no_control(_text(value), "an xl.cfg string")
    if "\\" in text:
        raise _refuse(text, "an xl.cfg string", "it contains a backslash")
    if "'" not in text:
        return _XlText(f"'{text}'")
    if '"' not in text:
        return _XlText(f'"{text}"')
    raise _refuse(text, "an xl.cfg string", "it contains both kinds of quote")


def sh_quote(value: object) -> str:
    """One POSIX shell word (:func:`shlex.quote`); NUL is refused (no shell can hold it)."""
    text = _text(value)
    if "\0" in text:
        raise _refuse(text, "a shell script", "it contains a NUL byte")
    return _ShText(shlex.quote(text))


def udev_value(value: object) -> str:
    """A value inside a udev rule's double quotes: no ``"``, backslash or control character."""
    text = _no_control(_text(value), "a udev rule")
    if '"' in text or "\\" in text:
        raise _refuse(text, "a udev rule", 'it contains " or \\')
    return _UdevText(text)


def link_value(value: object) -> str:
    """A value of a systemd ``.link`` file (one line, ``Key=value``): no control characters."""
    return _LinkText(_no_control(_text(value), "a systemd .link file"))


def _argv_value(value: object) -> str:
    text = _no_control(_text(value), "the UML command line")
    if not text or any(c.isspace() for c in text):
        raise _refuse(text, "the UML command line", "UML joins its arguments with blanks")
    return _ArgvText(text)


def _ubd_value(value: object) -> str:
    text = _argv_value(value)
    if "," in text or ":" in text:
        raise _refuse(text, "a UML ubd option", "',' and ':' separate a COW backing file there")
    return _ArgvText(text)


def _vmdk_value(value: object) -> str:
    text = _no_control(_text(value), "a VMDK descriptor")
    if '"' in text:
        raise _refuse(text, "a VMDK descriptor", 'it contains "')
    return _VmdkText(text)


def _syslinux_value(value: object) -> str:
    return _SyslinuxText(_no_control(_text(value), "a SYSLINUX configuration"))


def _xml_final(value: object) -> object:
    """Every value of an XML template: text without characters XML cannot hold (autoescape
    then escapes ``<&>'"``)."""
    text = _text(value)
    if _XML_ILLEGAL.search(text):
        raise _refuse(text, "libvirt XML", "it contains a control character XML cannot hold")
    return value


def _marked(kind: type[_Escaped], fmt: str) -> Callable[[object], object]:
    def finalize(value: object) -> object:
        if isinstance(value, kind):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TemplateBug(f"{fmt} template wrote {value!r} without its escaping filter")

    return finalize


@dataclass(frozen=True)
class _Format:
    finalize: Callable[[object], object]
    filters: Mapping[str, Callable[[object], str]]
    autoescape: bool = False


_FORMATS: Final[Mapping[str, _Format]] = {
    "xml": _Format(_xml_final, {}, autoescape=True),
    "xl": _Format(
        _marked(_XlText, "xl.cfg"),
        {"xl": xl_quote, "comment": lambda v: _XlText(_no_control(_text(v), "a comment"))},
    ),
    "sh": _Format(
        _marked(_ShText, "shell"),
        {"sh": sh_quote, "comment": lambda v: _ShText(_no_control(_text(v), "a comment"))},
    ),
    "udev": _Format(_marked(_UdevText, "udev"), {"udev": udev_value}),
    "link": _Format(_marked(_LinkText, ".link"), {"link": link_value}),
    "argv": _Format(_marked(_ArgvText, "UML argv"), {"argv": _argv_value, "ubd": _ubd_value}),
    "vmdk": _Format(_marked(_VmdkText, "VMDK"), {"vmdk": _vmdk_value}),
    "syslinux": _Format(_marked(_SyslinuxText, "SYSLINUX"), {"syslinux": _syslinux_value}),
}

#: Every template and its output format (a test checks no template file is missing here).
TEMPLATES: Final[Mapping[str, str]] = {
    "kvm/domain.xml.j2": "xml",
    "xen/domain.xml.j2": "xml",
    "xen/xl.cfg.j2": "xl",
    "virtualbox/create-vm.sh.j2": "sh",
    "virtualbox/disk.vmdk.j2": "vmdk",
    "virtualbox/syslinux.cfg.j2": "syslinux",
    "uml/uml.argv.j2": "argv",
    "70-unionimg-net.rules.j2": "udev",
    "unionimg.link.j2": "link",
}


@functools.cache
def _environment(fmt: str) -> jinja2.Environment:
    spec = _FORMATS[fmt]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in profile_dirs()]),
        undefined=jinja2.StrictUndefined,
        autoescape=spec.autoescape,
        finalize=spec.finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.filters.clear()  # only this format's escaping filters; no |safe, no |e by mistake
    env.filters.update(spec.filters)
    return env


def _render_template(name: str, context: Mapping[str, object]) -> str:
    return _environment(TEMPLATES[name]).get_template(name).render(context)


# --- checks of the spec (cheap; the CLI validated most of it already) ------------------------

_IFNAME_MAX = 15


def check_ifname(name: str, what: str = "NIC name") -> str:
    """A Linux interface name: 1-15 printable ASCII characters, none of ``/ : " '`` or blanks,
    not ``.``/``..``, not all digits (systemd refuses those)."""
    shown = _show(name)
    if not name or len(name.encode()) > _IFNAME_MAX:
        raise UsageError(f"{what} '{shown}' must be 1-{_IFNAME_MAX} characters long")
    if name in (".", "..") or name.isdigit():
        raise UsageError(f"{what} '{shown}' is not allowed; use a name like eth0")
    bad = [c for c in name if not 33 <= ord(c) <= 126 or c in "/:\"'\\"]
    if bad:
        raise UsageError(
            f"{what} '{shown}' contains '{_show(bad[0])}'; use letters, digits, '-', '_' or '.'"
        )
    return name


def _check_uuid(text: str, name: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise UsageError(f"instance {name}: UUID '{_show(text)}' is malformed") from None


def _check_paths(spec: BootSpec, *fields: str) -> None:
    for field in fields:
        path = getattr(spec, field)
        if not Path(path).is_absolute():
            raise UsageError(
                f"instance {spec.name}: {field} '{_show(str(path))}' must be an absolute path"
            )


def _check_spec(spec: BootSpec) -> None:
    check_name(spec.name, "instance")
    if isinstance(spec.memory_mib, bool) or not isinstance(spec.memory_mib, int):
        raise UsageError(f"instance {spec.name}: memory must be a whole number of MiB")
    if spec.memory_mib < 16:
        raise UsageError(f"instance {spec.name}: memory {spec.memory_mib} MiB; give at least 16")
    if isinstance(spec.vcpus, bool) or not isinstance(spec.vcpus, int) or spec.vcpus < 1:
        raise UsageError(f"instance {spec.name}: vcpus {spec.vcpus!r}; give at least 1")
    _check_paths(spec, "base_image", "upper_image", "kernel", "initrd", "console_log", "workdir")


def kernel_cmdline(hypervisor: str, spec: BootSpec) -> str:
    """The guest kernel's command line under ``hypervisor``: its console, then spec.cmdline."""
    extra = spec.cmdline.strip()
    if _CONTROL.search(extra):
        raise UsageError(
            f"instance {spec.name}: kernel command line '{_show(extra)}' contains a newline or "
            "another control character"
        )
    console = CONSOLE.get(hypervisor, "")
    return " ".join(part for part in (console, extra) if part)


def vbox_mac(mac: str) -> str:
    """VirtualBox's MAC spelling: 12 upper-case hex digits, no separators."""
    return parse_mac(mac).replace(":", "").upper()


def _common(spec: BootSpec, hypervisor: str) -> dict[str, object]:
    _check_spec(spec)
    return {
        "name": spec.name,
        "uuid": _check_uuid(spec.uuid, spec.name),
        "mac": parse_mac(spec.mac),
        "memory_mib": spec.memory_mib,
        "vcpus": spec.vcpus,
        "kernel": str(spec.kernel),
        "initrd": str(spec.initrd),
        "cmdline": kernel_cmdline(hypervisor, spec),
        "base_image": str(spec.base_image),
        "upper_image": str(spec.upper_image),
        "console_log": str(spec.console_log),
        "workdir": str(spec.workdir),
    }


# --- the profiles ----------------------------------------------------------------------------


def _kvm(spec: BootSpec) -> dict[str, str]:
    ctx = _common(spec, "kvm")
    if spec.domain_type not in ("kvm", "qemu"):
        raise UsageError(
            f"instance {spec.name}: libvirt domain type '{_show(spec.domain_type)}' "
            "is not supported; use kvm, or qemu (TCG) where KVM does not work"
        )
    _check_paths(spec, "emulator")
    ctx |= {"domain_type": spec.domain_type, "emulator": str(spec.emulator)}
    return {"domain.xml": _render_template("kvm/domain.xml.j2", ctx)}


def _xl_disk(vdev: str, access: str, image: str) -> str:
    # target= must come last: everything after it, commas included, is the path
    return f"format=raw,vdev={vdev},access={access},target={image}"


def _xen(spec: BootSpec) -> dict[str, str]:
    ctx = _common(spec, "xen")
    ctx |= {
        "bridge": XEN_BRIDGE,
        "disks": [
            _xl_disk("xvda", "ro", str(spec.base_image)),
            _xl_disk("xvdb", "rw", str(spec.upper_image)),
        ],
        "vifs": [f"mac={ctx['mac']},bridge={XEN_BRIDGE}"],
    }
    return {
        "xl.cfg": _render_template("xen/xl.cfg.j2", ctx),
        "domain.xml": _render_template("xen/domain.xml.j2", ctx),
    }


#: where UML keeps its per-guest directory (pid file, mconsole socket): short on purpose
UML_DIR: Final = "/run/unionimg-uml"
#: How the argv attaches the tap NIC: UML's legacy ``eth0=tuntap,TAP,MAC`` (gone from UML
#: 6.15 on; the guest NIC is eth0) or the vector driver ``vec0:transport=tap,ifname=TAP,mac=MAC``
#: (the guest NIC is vec0 until the initramfs renames it by MAC). unionimg.boot.umlprobe decides.
UML_TRANSPORTS: Final = ("tuntap", "vector")


def _uml(spec: BootSpec) -> dict[str, str]:
    ctx = _common(spec, "uml")
    if spec.kernel.name.startswith("vmlinuz"):
        raise UsageError(
            f"instance {spec.name}: the uml profile runs the UML kernel itself (e.g. "
            f"/usr/bin/linux.uml), not '{_show(str(spec.kernel))}'"
        )
    if not spec.tap:
        raise UsageError(
            f"instance {spec.name}: the uml profile needs a host tap device for its NIC "
            "(ip tuntap add dev TAP mode tap; ip link set TAP up)"
        )
    check_ifname(spec.tap, "tap device")
    if spec.uml_transport not in UML_TRANSPORTS:
        raise UsageError(
            f"instance {spec.name}: UML NIC transport '{_show(spec.uml_transport)}' is not "
            f"supported; use one of {', '.join(UML_TRANSPORTS)}"
        )
    ctx |= {
        "tap": spec.tap,
        "transport": spec.uml_transport,
        "cmdline_words": spec.cmdline.split(),
        "uml_dir": UML_DIR,
    }
    return {"uml.argv": _render_template("uml/uml.argv.j2", ctx)}


VBOX_DISKS: Final = (("boot", "boot.vmdk"), ("base", "base.vmdk"), ("upper", "upper.vmdk"))


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
    return _render_template("virtualbox/disk.vmdk.j2", ctx)


def _virtualbox(spec: BootSpec, disk_sectors: Mapping[str, int] | None) -> dict[str, str]:
    ctx = _common(spec, "virtualbox")
    if disk_sectors is None:
        from unionimg.hypervisors.virtualbox import (
            disk_sectors as stat_sectors,  # the one I/O step, outside the core
        )

        disk_sectors = stat_sectors(spec)
    missing = [role for role, _ in VBOX_DISKS if role not in disk_sectors]
    if missing:
        raise UsageError(f"instance {spec.name}: no size given for the {missing[0]} image")
    images = {
        "boot": spec.workdir / VBOX_BOOT_IMAGE,
        "base": spec.base_image,
        "upper": spec.upper_image,
    }
    ctx |= {
        "vbox_mac": vbox_mac(spec.mac),
        "basefolder": str(spec.workdir / "virtualbox"),
    }
    ctx |= {f"{role}_vmdk": str(spec.workdir / file) for role, file in VBOX_DISKS}
    files = {"create-vm.sh": _render_template("virtualbox/create-vm.sh.j2", ctx)}
    for role, file in VBOX_DISKS:
        files[file] = _vmdk(spec, role, images[role], disk_sectors[role])
    return files


def render(
    hypervisor: str, spec: BootSpec, *, disk_sectors: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The files of ``hypervisor``'s profile for ``spec``: file name → content.

    ``disk_sectors`` (virtualbox only) maps ``boot``, ``base`` and ``upper`` to the size of
    ``spec.workdir/boot.img``, the BASE and the U image in 512-byte sectors; by default the
    images are stat'ed. File names are relative to ``spec.workdir``, where the rendered files
    refer to each other (write them there with :func:`write_rendered`).
    """
    if hypervisor == "kvm":
        return _kvm(spec)
    if hypervisor == "xen":
        return _xen(spec)
    if hypervisor == "virtualbox":
        return _virtualbox(spec, disk_sectors)
    if hypervisor == "uml":
        return _uml(spec)
    raise UsageError(f"unknown hypervisor '{_show(hypervisor)}'; choose one of {HYPERVISORS}")


def uml_argv(spec: BootSpec) -> list[str]:
    """What a driver execs to boot ``spec`` under User-Mode Linux (no shell involved).

    The UML console (con0) is the process's stdin/stdout: redirect stdout to
    ``spec.console_log``.
    """
    return render("uml", spec)["uml.argv"].splitlines()


def render_syslinux_cfg(cmdline: str, *, kernel_file: str, initrd_file: str) -> str:
    """``syslinux.cfg`` of a boot disk that boots ``/kernel_file`` with ``/initrd_file``."""
    return _render_template(
        "virtualbox/syslinux.cfg.j2",
        {"cmdline": cmdline, "kernel_file": kernel_file, "initrd_file": initrd_file},
    )


def render_net_naming(spec: BootSpec) -> dict[str, str]:
    """The guest files that name the NIC with ``spec.mac`` ``spec.nic_name``: the udev rule
    ``70-unionimg-net.rules`` (for /etc/udev/rules.d) and ``10-unionimg-<nic>.link`` (for
    /etc/systemd/network)."""
    check_name(spec.name, "instance")
    nic = check_ifname(spec.nic_name)
    link_file = f"10-unionimg-{nic}.link"
    ctx = {"name": spec.name, "mac": parse_mac(spec.mac), "nic_name": nic, "file_name": link_file}
    return {
        "70-unionimg-net.rules": _render_template("70-unionimg-net.rules.j2", ctx),
        link_file: _render_template("unionimg.link.j2", ctx),
    }


# --- writing ---------------------------------------------------------------------------------


def write_rendered(files: Mapping[str, str], out: Path) -> list[Path]:
    """Write ``files`` into directory ``out`` (made if missing), each atomically (see
    :func:`unionimg.store.layout.write_atomic`), mode 0600 (``*.sh`` 0700). Returns the paths."""
    out = Path(out)
    for name in files:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"rendered file name {name!r} is not a plain file name")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in sorted(files.items()):
        target = out / name
        write_atomic(target, content.encode("utf-8"), mode=0o700 if name.endswith(".sh") else 0o600)
        written.append(target)
    return written
