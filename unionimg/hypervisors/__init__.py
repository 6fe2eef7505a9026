"""Hypervisor drivers: one interface (:class:`Driver`), one module per hypervisor, found by name.

The same two raw images (BASE read-only, the instance's U read-write) boot under every
hypervisor; a driver knows how one hypervisor does it:

- **render** a :class:`~unionimg.hypervisors.spec.BootSpec` into the files of its profile
  (pure: text out, Jinja2 templates in ``templates/<hypervisor>/``, shared escaping in
  :mod:`unionimg.hypervisors.profiles`);
- **prepare** what the profile refers to besides the images (VirtualBox's boot disk) and, for
  a boot, what only this host can decide (kvm: the libvirt domain type its probe picks);
- **start** the guest and return a :class:`Running` record (what ``running.json`` holds:
  how the driver finds its guest again), then **is_running**, **stop**, **release** (free
  what the start took on the host once the guest is gone) and **forget** (remove what the
  hypervisor keeps about an instance, e.g. its libvirt definition);
- say what it can do (:class:`Capabilities`, :meth:`Driver.can_boot_here`).

The registry (:func:`get`, :func:`names`) maps a hypervisor's name to its driver; a driver
module is imported only when its driver is first asked for (the kvm driver loads libvirt).
Nothing outside this package compares hypervisor names: it asks the driver.

Drivers import only this package, :mod:`unionimg.errors`, :mod:`unionimg.runner`,
:mod:`unionimg.names`, :mod:`unionimg.display` and :mod:`unionimg.store.probecache`; writing
rendered files, the store, kernels and initramfs belong to :mod:`unionimg.boot`.
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from unionimg.errors import MissingCapability, UsageError
from unionimg.hypervisors.spec import BootSpec
from unionimg.names import shown

__all__ = [
    "BootSpec",
    "Capabilities",
    "Driver",
    "Liveness",
    "Prepared",
    "Running",
    "get",
    "names",
    "now_iso",
]

#: Every driver by hypervisor name, in the order the CLI lists them: name -> its module.
_MODULES: Final[Mapping[str, str]] = {
    "kvm": "unionimg.hypervisors.kvm",
    "uml": "unionimg.hypervisors.uml",
    "xen": "unionimg.hypervisors.xen",
    "virtualbox": "unionimg.hypervisors.virtualbox",
}

#: What :class:`Capabilities.kernel` may say.
KERNEL_KINDS: Final = ("guest", "uml")


def now_iso() -> str:
    """Now in UTC, as the records of the store spell times (``2026-12-01T10:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do, declared (the conformance suite holds each driver to it)."""

    can_start: bool
    """unionimg starts, watches and stops its guests on a host that has the hypervisor;
    otherwise it only renders their configuration (``unionimg render``)."""
    can_snapshot: bool
    """The hypervisor can save a running guest and resume it later (libvirt's save and
    managed save, ``xl save``, VirtualBox snapshots); UML cannot."""
    validated_by: tuple[str, ...]
    """The real programs that check its rendered files (the tests run each of them); empty
    when only a real boot proves them."""
    kernel: str
    """Which kernel its guests boot (one of :data:`KERNEL_KINDS`): ``guest``, the base's or
    the host's kernel image, loaded by the hypervisor; ``uml``, a User-Mode Linux kernel,
    which is the hypervisor itself (chosen by :mod:`unionimg.boot.umlprobe`)."""
    private_mounts: bool = False
    """Its guest processes get a copy of the host's mounts when they start (libvirt runs
    QEMU in a mount namespace of its own): ``/`` must be a shared mount first, so that a
    later unmount on the host reaches that copy."""
    poll_interval: float = 0.2
    """How often a waiting boot looks at a guest (seconds)."""

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_KINDS:
            raise ValueError(f"kernel kind {self.kernel!r} is not one of {KERNEL_KINDS}")


@dataclass(frozen=True)
class Liveness:
    """What a driver sees of a guest it started."""

    running: bool
    evidence: str | None = None
    """When it is not running: the hypervisor's own evidence that it failed (libvirt's
    shut-off reason ``crashed``, UML's exit status), else None."""


@dataclass(frozen=True)
class Prepared:
    """A spec made ready for one hypervisor: the rendered files and what else was made."""

    spec: BootSpec
    """The spec as the hypervisor boots it (kvm: with the domain type its probe picked)."""
    files: Mapping[str, str]
    """The rendered profile: file name in ``spec.workdir`` -> text (written by the caller)."""
    made: tuple[Path, ...] = ()
    """Other files made in ``spec.workdir`` (VirtualBox: its boot disk)."""
    facts: Mapping[str, str] = field(default_factory=dict)
    """What was decided on this host and why (kvm: ``domain_type``, ``why``); ``boot`` reports
    them."""


_RUNNING_STR = ("hypervisor", "started", "console")
_RUNNING_OPTIONAL_STR = ("domain", "domain_type", "umid", "tap")


@dataclass(frozen=True)
class Running:
    """A guest unionimg started (``running.json`` in the instance's directory): how its
    driver finds it again. Only the fields of its driver are set."""

    hypervisor: str
    started: str
    """When it started (UTC, :func:`now_iso`)."""
    console: str
    """Its serial console log."""
    stopping: bool = False
    """A stop was asked for: a guest gone after this was stopped, not crashed (unless its
    console shows a failure)."""
    domain: str | None = None
    """kvm: the libvirt domain."""
    domain_type: str | None = None
    """kvm: ``kvm`` or ``qemu`` (TCG)."""
    pid: int | None = None
    """uml: the ``linux.uml`` process (the leader of its process group)."""
    umid: str | None = None
    """uml: its ``umid=``, so that a recycled pid is not taken for the guest."""
    tap: str | None = None
    """uml: the host tap device carrying its NIC (removed once the guest is gone)."""

    def to_json(self) -> dict[str, Any]:
        """The record as written: unset fields are left out, ``stopping`` only when true."""
        out: dict[str, Any] = {
            "hypervisor": self.hypervisor,
            "started": self.started,
            "console": self.console,
        }
        if self.stopping:
            out["stopping"] = True
        for key in ("domain", "domain_type", "pid", "umid", "tap"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: object) -> Running:
        """The record from what :meth:`to_json` wrote; ValueError naming the first field
        that is missing or of the wrong type. Keys it does not know are ignored (as every
        record of the store does: a later version may add fields)."""
        if not isinstance(data, dict):
            raise ValueError("the record is not a JSON object")
        for key in _RUNNING_STR:
            if not isinstance(data.get(key), str):
                raise ValueError(f"'{key}' is missing or not a string")
        for key in _RUNNING_OPTIONAL_STR:
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"'{key}' is not a string")
        pid = data.get("pid")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 1):
            raise ValueError("'pid' is not a process id")
        stopping = data.get("stopping", False)
        if not isinstance(stopping, bool):
            raise ValueError("'stopping' is not true or false")
        return cls(
            hypervisor=data["hypervisor"],
            started=data["started"],
            console=data["console"],
            stopping=stopping,
            domain=data.get("domain"),
            domain_type=data.get("domain_type"),
            pid=pid,
            umid=data.get("umid"),
            tap=data.get("tap"),
        )


class Driver(abc.ABC):
    """One hypervisor. A driver that cannot start guests (``capabilities.can_start`` false)
    only implements :meth:`render` and :meth:`can_boot_here`; the defaults of the other
    methods say truthfully that it never runs a guest."""

    #: the hypervisor's name (what ``--hypervisor`` takes)
    name: str
    capabilities: Capabilities

    @abc.abstractmethod
    def can_boot_here(self) -> tuple[bool, str]:
        """Whether unionimg can boot this hypervisor's guests on this host, and why (or why
        not: what is missing, what to do). Cheap: no guest is started."""

    @abc.abstractmethod
    def render(self, spec: BootSpec) -> dict[str, str]:
        """The files of the profile for ``spec``: file name (relative to ``spec.workdir``,
        where they refer to each other) -> content. Deterministic; UsageError (one line)
        for a value its formats cannot hold."""

    def host_tap(self, instance: str) -> str:
        """The host tap device the instance's NIC is plugged into ('' when the hypervisor
        needs none)."""
        del instance
        return ""

    def prepare(self, spec: BootSpec, *, boot: bool = False) -> Prepared:
        """Render ``spec`` and make what the profile refers to besides the images; with
        ``boot``, also decide what depends on this host (e.g. a probe)."""
        del boot
        return Prepared(spec, self.render(spec))

    def start(self, prepared: Prepared, record: Callable[[Running], None]) -> Running:
        """Start the guest of a prepared spec (its files written to ``spec.workdir``) and
        return its record. ``record`` is called with the record as soon as the guest can be
        found by it (before it starts, where the driver can tell in advance), so that a
        crash of unionimg never leaves a guest nobody knows of; the caller forgets the record
        when this raises."""
        del record
        raise MissingCapability(
            f"unionimg does not start {self.name} guests; render the configuration of "
            f"{prepared.spec.name} and start it on a {self.name} host"
        )

    def is_running(self, rec: Running) -> Liveness:
        """Whether the guest of ``rec`` runs now and, if it stopped, the hypervisor's word
        on how."""
        del rec
        return Liveness(False)

    def stop(
        self,
        rec: Running,
        *,
        force: bool,
        timeout: float = 30.0,
        notice: Callable[[float], None] | None = None,
    ) -> str:
        """Stop the guest: a clean shutdown within ``timeout`` s, else a hard stop; at once
        with ``force``. ``notice(timeout)`` when the wait starts to take a while. Returns
        how: ``clean``, ``forced``, ``hard``, or ``gone`` (it was not running)."""
        del rec, force, timeout, notice
        return "gone"

    def release(self, rec: Running) -> None:
        """The guest of ``rec`` is gone: free what its start took on the host. Idempotent."""
        del rec

    def forget(self, instance: str) -> None:
        """Remove what the hypervisor keeps about ``instance`` (never a running guest's);
        nothing when there is nothing. Idempotent."""
        del instance

    def mac_user(self, instance: str, mac: str) -> str | None:
        """A running guest of this hypervisor that unionimg did not start as ``instance``
        and that uses ``mac``, named for a message; else None."""
        del instance, mac
        return None


def names() -> tuple[str, ...]:
    """Every registered hypervisor, in the order the CLI lists them."""
    return tuple(_MODULES)


_loaded: dict[str, Driver] = {}


def get(name: str) -> Driver:
    """The driver of hypervisor ``name`` (its module imported on first use); UsageError for
    a name no driver has."""
    driver = _loaded.get(name)
    if driver is not None:
        return driver
    module = _MODULES.get(name)
    if module is None:
        raise UsageError(f"unknown hypervisor '{shown(name)}'; choose one of {', '.join(_MODULES)}")
    # deferred on purpose: a driver module loads its hypervisor's library (kvm: libvirt) only
    # when a command needs that hypervisor
    found = importlib.import_module(module).DRIVER
    if not isinstance(found, Driver) or found.name != name:
        raise TypeError(f"{module}.DRIVER is not the Driver of {name}")
    _loaded[name] = found
    return found
