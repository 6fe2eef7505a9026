"""The shared rendering core of the hypervisor drivers: Jinja2 templates and escaping. Pure.

Each driver (:mod:`unionimg.hypervisors`) renders its profile from the templates in
``templates/<hypervisor>/`` of this package (links to the repository's ``hypervisor_profiles/``);
:func:`render_net_naming` renders the guest side of the fixed MAC from ``templates/net``
(``udev_rules/``): a udev rule and a systemd ``.link`` file that give the NIC with that MAC
the same name under every hypervisor. The templates ship inside the package (a wheel holds
copies) and are found one way, through the package (``importlib.resources`` / Jinja2's
``PackageLoader``), in a checkout, an editable install and an installed wheel alike.

Each template has one output format, and every value written into it is escaped for that
format: XML by autoescape; xl.cfg, shell, udev, ``.link``, VMDK, SYSLINUX and UML argv values
through a filter that quotes the value or rejects it with :class:`UsageError` when the format
cannot hold it. A value that reaches a non-XML template without its filter is a template bug
and fails the render (:class:`TemplateBug`), so a forgotten filter cannot slip through.

:func:`common` checks the fields of a :class:`~unionimg.hypervisors.spec.BootSpec` every
profile uses (cheaply: the CLI validated most of them already) and gives them to a template.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import shlex
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final

import jinja2

from unionimg.errors import UsageError
from unionimg.hypervisors.spec import BootSpec
from unionimg.names import check_name, parse_mac, shown

__all__ = [
    "TEMPLATES",
    "LayerDisk",
    "TemplateBug",
    "check_ifname",
    "check_paths",
    "common",
    "kernel_cmdline",
    "layer_disks",
    "link_value",
    "lowers_arg",
    "refuse",
    "render_net_naming",
    "render_template",
    "sh_quote",
    "template_dir",
    "udev_value",
    "xl_quote",
]

#: The package whose ``templates/`` directory holds every template.
TEMPLATE_PACKAGE: Final = "unionimg.hypervisors"


class TemplateBug(RuntimeError):
    """A template wrote a value without the escaping filter of its format (a bug, not a user
    error: the CLI shows it with a traceback)."""


def template_dir() -> Traversable:
    """The ``templates`` directory of this package (``<hypervisor>/`` and ``net/``)."""
    return importlib.resources.files(TEMPLATE_PACKAGE) / "templates"


# --- escaping, one set of filters per output format -----------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# XML 1.0 cannot hold these characters at all, escaped or not
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | Path):
        raise TemplateBug(f"template value of type {type(value).__name__}: {value!r}")
    return str(value)


def refuse(text: str, where: str, why: str) -> UsageError:
    """The one-line error for a value ``text`` that ``where`` (a format) cannot hold."""
    return UsageError(f"'{shown(text)}' cannot be written into {where}: {why}")


def _no_control(text: str, where: str) -> str:
    if _CONTROL.search(text):
        raise refuse(text, where, "it contains a newline or another control character")
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
        raise refuse(text, "an xl.cfg string", "it contains a backslash")
    if "'" not in text:
        return _XlText(f"'{text}'")
    if '"' not in text:
        return _XlText(f'"{text}"')
    raise refuse(text, "an xl.cfg string", "it contains both kinds of quote")


def sh_quote(value: object) -> str:
    """One POSIX shell word (:func:`shlex.quote`); NUL is refused (no shell can hold it)."""
    text = _text(value)
    if "\0" in text:
        raise refuse(text, "a shell script", "it contains a NUL byte")
    return _ShText(shlex.quote(text))


def udev_value(value: object) -> str:
    """A value inside a udev rule's double quotes: no ``"``, backslash or control character."""
    text = _no_control(_text(value), "a udev rule")
    if '"' in text or "\\" in text:
        raise refuse(text, "a udev rule", 'it contains " or \\')
    return _UdevText(text)


def link_value(value: object) -> str:
    """A value of a systemd ``.link`` file (one line, ``Key=value``): no control characters."""
    return _LinkText(_no_control(_text(value), "a systemd .link file"))


def _argv_value(value: object) -> str:
    text = _no_control(_text(value), "the UML command line")
    if not text or any(c.isspace() for c in text):
        raise refuse(text, "the UML command line", "UML joins its arguments with blanks")
    return _ArgvText(text)


def _ubd_value(value: object) -> str:
    text = _argv_value(value)
    if "," in text or ":" in text:
        raise refuse(text, "a UML ubd option", "',' and ':' separate a COW backing file there")
    return _ArgvText(text)


def _vmdk_value(value: object) -> str:
    text = _no_control(_text(value), "a VMDK descriptor")
    if '"' in text:
        raise refuse(text, "a VMDK descriptor", 'it contains "')
    return _VmdkText(text)


def _syslinux_value(value: object) -> str:
    return _SyslinuxText(_no_control(_text(value), "a SYSLINUX configuration"))


def _xml_final(value: object) -> object:
    """Every value of an XML template: text without characters XML cannot hold (autoescape
    then escapes ``<&>'"``)."""
    text = _text(value)
    if _XML_ILLEGAL.search(text):
        raise refuse(text, "libvirt XML", "it contains a control character XML cannot hold")
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
    "net/70-unionimg-net.rules.j2": "udev",
    "net/unionimg.link.j2": "link",
}


@functools.cache
def _environment(fmt: str) -> jinja2.Environment:
    spec = _FORMATS[fmt]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, "templates"),
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


def render_template(name: str, context: Mapping[str, object]) -> str:
    """Template ``name`` (a key of :data:`TEMPLATES`) rendered with ``context``, every value
    through its format's escaping."""
    return _environment(TEMPLATES[name]).get_template(name).render(context)


# --- checks of the spec (cheap; the CLI validated most of it already) ------------------------

_IFNAME_MAX = 15


def check_ifname(name: str, what: str = "NIC name") -> str:
    """A Linux interface name: 1-15 printable ASCII characters, none of ``/ : " '`` or blanks,
    not ``.``/``..``, not all digits (systemd refuses those)."""
    text = shown(name)
    if not name or len(name.encode()) > _IFNAME_MAX:
        raise UsageError(f"{what} '{text}' must be 1-{_IFNAME_MAX} characters long")
    if name in (".", "..") or name.isdigit():
        raise UsageError(f"{what} '{text}' is not allowed; use a name like eth0")
    bad = [c for c in name if not 33 <= ord(c) <= 126 or c in "/:\"'\\"]
    if bad:
        raise UsageError(
            f"{what} '{text}' contains '{shown(bad[0])}'; use letters, digits, '-', '_' or '.'"
        )
    return name


def _check_uuid(text: str, name: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise UsageError(f"instance {name}: UUID '{shown(text)}' is malformed") from None


def check_paths(spec: BootSpec, *fields: str) -> None:
    """UsageError unless each of ``fields`` of ``spec`` is an absolute path."""
    for field in fields:
        path = getattr(spec, field)
        if not Path(path).is_absolute():
            raise UsageError(
                f"instance {spec.name}: {field} '{shown(str(path))}' must be an absolute path"
            )


def _check_spec(spec: BootSpec) -> None:
    check_name(spec.name, "instance")
    if isinstance(spec.memory_mib, bool) or not isinstance(spec.memory_mib, int):
        raise UsageError(f"instance {spec.name}: memory must be a whole number of MiB")
    if spec.memory_mib < 16:
        raise UsageError(f"instance {spec.name}: memory {spec.memory_mib} MiB; give at least 16")
    if isinstance(spec.vcpus, bool) or not isinstance(spec.vcpus, int) or spec.vcpus < 1:
        raise UsageError(f"instance {spec.name}: vcpus {spec.vcpus!r}; give at least 1")
    check_paths(spec, "base_image", "upper_image", "kernel", "initrd", "console_log", "workdir")
    _check_chain(spec)


#: A layer image's filesystem label: ``L`` + the first 15 hex digits of the layer's diff_id
#: (ext4 labels hold 16 bytes); the guest's initramfs finds the disk by it.
LAYER_LABEL: Final = re.compile(r"L[0-9a-f]{15}")


def _check_chain(spec: BootSpec) -> None:
    images, labels = tuple(spec.layer_images), tuple(spec.layer_labels)
    if len(images) != len(labels):
        raise UsageError(
            f"instance {spec.name}: {len(images)} layer images but {len(labels)} layer labels"
        )
    for label in labels:
        if not isinstance(label, str) or not LAYER_LABEL.fullmatch(label):
            raise UsageError(
                f"instance {spec.name}: layer label '{shown(str(label))}' is not L and 15 "
                "lower-case hex digits"
            )
    if len(set(labels)) != len(labels):
        raise UsageError(f"instance {spec.name}: its chain names one layer twice")
    seen = {Path(spec.base_image), Path(spec.upper_image)}
    for image in images:
        if not Path(image).is_absolute():
            raise UsageError(
                f"instance {spec.name}: layer image '{shown(str(image))}' must be an absolute path"
            )
        if Path(image) in seen:
            raise UsageError(
                f"instance {spec.name}: layer image '{shown(str(image))}' is attached twice"
            )
        seen.add(Path(image))


def lowers_arg(spec: BootSpec) -> str:
    """The kernel argument naming ``spec``'s chain for the guest's initramfs, top to bottom:
    ``unionimg.lowers=LABEL,...,BASE``; '' without layers (BASE is then the only lower)."""
    if not spec.layer_labels:
        return ""
    return "unionimg.lowers=" + ",".join((*spec.layer_labels, "BASE"))


@dataclass(frozen=True)
class LayerDisk:
    """One layer image of a chain as a profile attaches it (read-only)."""

    image: str  # the raw ext4 image
    label: str  # its filesystem label, L + 15 hex digits
    index: int  # 0 for the top layer
    device: str  # the guest device the profile gives it (vdc, ubd2, xvdc, a SATA port)


def layer_disks(
    spec: BootSpec, max_layers: int, hypervisor: str, why: str, device: Callable[[int], str]
) -> list[LayerDisk]:
    """``spec``'s layer images, top to bottom, with ``device(index)`` each (index 0 is the top
    layer); UsageError in one line for a chain longer than ``max_layers``, the most
    ``hypervisor`` can attach besides BASE and U (``why``: its device limit)."""
    _check_chain(spec)
    count = len(spec.layer_images)
    if count > max_layers:
        raise UsageError(
            f"instance {spec.name}: its chain has {count} layers above BASE but {hypervisor} "
            f"attaches at most {max_layers} ({why}); boot it under another hypervisor or "
            "derive the VM from a shorter chain"
        )
    return [
        LayerDisk(str(image), label, i, device(i))
        for i, (image, label) in enumerate(zip(spec.layer_images, spec.layer_labels, strict=True))
    ]


def kernel_cmdline(spec: BootSpec, console: str) -> str:
    """The guest kernel's command line: the profile's ``console`` argument (``console=ttyS0``;
    '' for none), then ``spec.cmdline``, then the chain (:func:`lowers_arg`; last, so that
    the host's chain wins over anything in ``spec.cmdline``)."""
    extra = spec.cmdline.strip()
    if _CONTROL.search(extra):
        raise UsageError(
            f"instance {spec.name}: kernel command line '{shown(extra)}' contains a newline or "
            "another control character"
        )
    return " ".join(part for part in (console, extra, lowers_arg(spec)) if part)


def common(spec: BootSpec, console: str) -> dict[str, object]:
    """The checked fields of ``spec`` every profile's template gets (``cmdline`` begins with
    the profile's ``console`` argument)."""
    _check_spec(spec)
    return {
        "name": spec.name,
        "uuid": _check_uuid(spec.uuid, spec.name),
        "mac": parse_mac(spec.mac),
        "memory_mib": spec.memory_mib,
        "vcpus": spec.vcpus,
        "kernel": str(spec.kernel),
        "initrd": str(spec.initrd),
        "cmdline": kernel_cmdline(spec, console),
        "base_image": str(spec.base_image),
        "upper_image": str(spec.upper_image),
        "console_log": str(spec.console_log),
        "workdir": str(spec.workdir),
    }


def render_net_naming(spec: BootSpec) -> dict[str, str]:
    """The guest files that name the NIC with ``spec.mac`` ``spec.nic_name``: the udev rule
    ``70-unionimg-net.rules`` (for /etc/udev/rules.d) and ``10-unionimg-<nic>.link`` (for
    /etc/systemd/network)."""
    check_name(spec.name, "instance")
    nic = check_ifname(spec.nic_name)
    link_file = f"10-unionimg-{nic}.link"
    ctx = {"name": spec.name, "mac": parse_mac(spec.mac), "nic_name": nic, "file_name": link_file}
    return {
        "70-unionimg-net.rules": render_template("net/70-unionimg-net.rules.j2", ctx),
        link_file: render_template("net/unionimg.link.j2", ctx),
    }
