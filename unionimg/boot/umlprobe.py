"""Which User-Mode Linux kernel runs on this host? Boot each candidate once and remember.

Debian's packaged ``/usr/bin/linux.uml`` does not run everywhere: on CPUs with AMX
(``amx_tile`` in ``/proc/cpuinfo``) Linux >= 5.16 wants the full XSTATE buffer for
``PTRACE_SETREGSET`` and UML kernels before about 6.13 pass a fixed-size one, so Debian 12's
6.1 and Debian 13's 6.12 panic at the first user process (``userspace - ptrace set fp regs
failed, errno = 14``). ``scripts/build-uml-kernel.sh`` (run by ``scripts/setup.sh`` when the
packaged kernel fails) builds one from Debian's ``linux-source`` >= 6.13 with everything
unionimg needs built in, into :data:`BUILT_DIR`.

The probe boots a candidate with a throw-away initramfs whose ``/init`` (static busybox sh)
prints :data:`MARKER` and powers off: the kernel passes when the marker shows and it exits
0 within the timeout. The answer is cached in a JSON file keyed by everything that decides it
(host kernel release, the CPU's flags, the UML kernel's path, size and mtime, effective uid),
so each kernel is probed once per host.

Selection (:func:`select`): ``UNIONIMG_UML_KERNEL`` if set (it must pass), else the
packaged kernel when it passes, else the project-built one. The chosen
:class:`UmlKernel` says why, which NIC transport its command line uses (``tuntap``: the
legacy ``ethN=tuntap,TAP,MAC``, gone from UML 6.15 on; ``vector``:
``vecN:transport=tap,ifname=TAP,mac=MAC``, read from the kernel's ``--help``), and where its
modules are (none for the built kernel: everything is built in).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from unionimg.boot.initramfs import UML_MODULES_BASE, elf_is_static, pack_cpio
from unionimg.errors import MissingCapability, ToolFailed, UsageError
from unionimg.hypervisors import uml
from unionimg.layers.running import analyse, console_lines
from unionimg.runner import run
from unionimg.store import probecache

log = logging.getLogger(__name__)

PACKAGED = Path("/usr/bin/linux.uml")
#: scripts/build-uml-kernel.sh's cache: ``<source version>/linux``; ``current`` -> the newest.
BUILT_DIR = probecache.CACHE_DIR / "uml"
BUILT = BUILT_DIR / "current" / "linux.uml"
PROBE_CACHE = probecache.CACHE_DIR / "uml-probe.json"
ENV_KERNEL = "UNIONIMG_UML_KERNEL"
BUSYBOX = Path("/bin/busybox")
CACHE_VERSION = 1
MARKER = "unionimg-umlprobe: the first user process runs"
TRANSPORTS = ("tuntap", "vector")
#: CPU features that change the FP/XSTATE layout UML must handle (shown in reasons).
CPU_FEATURES = ("amx_tile", "avx512f", "xsave")
#: Console lines worth quoting when a kernel fails, most telling first.
_FAILURE_PATTERNS = (
    re.compile(r"(?:userspace - )?ptrace set fp regs failed.*"),
    re.compile(r"Kernel panic - .*"),
    re.compile(r"Attempted to kill init.*"),
    re.compile(r".*(?:error|failed|Segmentation fault).*", re.IGNORECASE),
)
_BUILD_HINT = (
    "run scripts/build-uml-kernel.sh as root (scripts/setup.sh does it when the packaged "
    "kernel fails), or point UNIONIMG_UML_KERNEL at a UML kernel that boots here"
)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # what was seen, for the reason
    seconds: float


@dataclass(frozen=True)
class UmlKernel:
    """The UML kernel unionimg boots on this host, and why."""

    path: Path
    release: str  # what ``--version`` prints (``uname -r`` in the guest)
    transport: str  # one of TRANSPORTS: how the argv attaches the tap NIC
    source: str  # "packaged", "built" or "override" (UNIONIMG_UML_KERNEL)
    reason: str  # one line: why this one

    @property
    def modules_dir(self) -> Path | None:
        """Where Debian keeps this kernel's modules (only the packaged one has any)."""
        path = UML_MODULES_BASE / self.release
        return path if self.release and (path / "modules.dep").is_file() else None

    def as_dict(self) -> dict[str, str]:
        return {
            "path": str(self.path),
            "release": self.release,
            "transport": self.transport,
            "source": self.source,
            "modules": str(self.modules_dir or ""),
            "why": self.reason,
        }


# --- the host ----------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty if unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_summary(flags: set[str] | None = None) -> str:
    """``"CPU has amx_tile avx512f xsave"`` (the features of :data:`CPU_FEATURES` present)."""
    flags = cpu_flags() if flags is None else flags
    present = [f for f in CPU_FEATURES if f in flags]
    return f"CPU has {' '.join(present)}" if present else "CPU lacks " + " ".join(CPU_FEATURES)


def cache_key(kernel: Path) -> dict[str, object]:
    """Everything the probe's answer depends on."""
    try:
        st = kernel.stat()
    except OSError as exc:
        raise UsageError(f"UML kernel {kernel} not found ({exc.strerror})") from exc
    flags = sorted(cpu_flags())
    return {
        "host_kernel": os.uname().release,
        "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "amx": "amx_tile" in flags,
        "uml_kernel": str(kernel.resolve()),
        "uml_kernel_size": st.st_size,
        "uml_kernel_mtime_ns": st.st_mtime_ns,
        "euid": os.geteuid(),
    }


# --- asking the kernel -----------------------------------------------------------------------


def kernel_release(kernel: Path) -> str:
    """What ``KERNEL --version`` prints, or "" when it prints no version."""
    try:
        result = run([str(kernel), "--version"], check=False, timeout=30, what="UML --version")
    except ToolFailed:
        return ""
    words = result.stdout.split()
    if result.returncode != 0 or len(words) != 1 or not re.fullmatch(r"\d+\.\d+\S*", words[0]):
        return ""
    return words[0]


def net_transport(kernel: Path) -> str:
    """``tuntap`` when the kernel still has UML's legacy ``ethN=`` transports (its ``--help``
    lists ``eth[0-9]+=``), else ``vector`` (``vecN:transport=tap``, UML 4.17 and later)."""
    try:
        result = run([str(kernel), "--help"], check=False, timeout=30, what="UML --help")
    except ToolFailed:
        return "vector"
    text = result.stdout + result.stderr
    return "tuntap" if re.search(r"^eth\[0-9\]\+=", text, re.M) else "vector"


def _probe_initramfs(root: Path, out: Path, busybox: Path) -> None:
    """A cpio archive: /bin/busybox, /bin/sh -> busybox and an /init that prints the marker
    and powers off."""
    if not busybox.is_file() or not elf_is_static(busybox):
        raise MissingCapability(f"the UML probe needs a static {busybox}; install busybox-static")
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "dev").mkdir()
    init = root / "init"
    init.write_text(f"#!/bin/sh\necho '{MARKER}'\n/bin/busybox poweroff -f\n", encoding="utf-8")
    init.chmod(0o755)
    pack_cpio(root, ["bin", "bin/busybox", "bin/sh", "dev", "init"], out)


def _quote_failure(console: str) -> str:
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    for pattern in _FAILURE_PATTERNS:
        for line in lines:
            m = pattern.search(line)
            if m:
                return m.group(0).strip()[:200]
    return lines[-1][:200] if lines else "no output"


def boot_probe(kernel: Path, *, timeout: float = 30.0, busybox: Path = BUSYBOX) -> ProbeResult:
    """Boot ``kernel`` with the probe initramfs; say whether its first user process ran and
    it powered off cleanly. Never raises for a kernel that fails (MissingCapability only
    when the probe itself cannot run: no static busybox, no /dev/shm tmpfs)."""
    with tempfile.TemporaryDirectory(prefix="unionimg-umlprobe-") as tmp:
        work = Path(tmp)
        initrd = work / "initrd.cpio"
        _probe_initramfs(work / "root", initrd, busybox)
        console = work / "console.log"
        umid = f"uiprobe{os.getpid()}"
        argv = [
            str(kernel),
            "mem=64M",
            f"initrd={initrd}",
            "con=null",
            "con0=null,fd:1",
            f"uml_dir={work}",
            f"umid={umid}",
        ]
        started = time.monotonic()
        code: int | None = None
        finished = True
        try:
            pid = uml.start(argv, console, work)
        except ToolFailed:  # it exited at once: its console says why
            pid = 0
        if pid:
            finished = uml.wait(pid, timeout, umid=umid, argv0_hint=kernel.name)
            if not finished:
                uml.stop(pid, force=True, umid=umid, argv0_hint=kernel.name)
            code = uml.exit_status(pid)
        seconds = time.monotonic() - started
        raw = console.read_bytes() if console.exists() else b""
    text = raw.decode(errors="replace")
    reached = MARKER in text
    lines = console_lines(raw)
    # Debian's UML 6.1 is now and then killed by SIGABRT in its own exit path after the
    # kernel's halt line (see running.teardown_fault): the kernel ran its user process and
    # finished; caching a "fails" for that would send this host to a kernel it lacks
    after_halt = code not in (0, None) and analyse(lines, lines).halted
    if reached and finished and (code in (0, None) or after_halt):
        how = f" (then its process ended with status {code} after the halt)" if after_halt else ""
        return ProbeResult(
            True, f"its first user process ran; powered off in {seconds:.1f} s{how}", seconds
        )
    if not finished:
        seen = "the first user process ran but it" if reached else "it"
        return ProbeResult(False, f"{seen} did not power off within {timeout:.0f} s", seconds)
    status = f"exit status {code}" if code is not None else "exited"
    return ProbeResult(False, f"{_quote_failure(text)} ({status})", seconds)


# --- the cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probed:
    """A candidate kernel and what its (possibly cached) probe found."""

    path: Path
    ok: bool
    detail: str
    release: str
    transport: str
    cached: bool


def probe(
    cache_file: Path, kernel: Path, *, timeout: float = 30.0, refresh: bool = False
) -> Probed:
    """Probe ``kernel`` once per host (cached in ``cache_file``); ``refresh`` probes again."""
    key = cache_key(kernel)
    digest = probecache.digest(key)
    entries = probecache.load(cache_file, CACHE_VERSION)
    hit = entries.get(digest)
    if (
        not refresh
        and isinstance(hit, dict)
        and isinstance(hit.get("ok"), bool)
        and hit.get("transport") in TRANSPORTS
    ):
        return Probed(
            kernel,
            bool(hit["ok"]),
            str(hit.get("detail", "")),
            str(hit.get("release", "")),
            str(hit["transport"]),
            cached=True,
        )
    log.info(
        "probing whether UML kernel %s boots here (up to %.0f s, once per host)", kernel, timeout
    )
    release = kernel_release(kernel)
    transport = net_transport(kernel)
    result = boot_probe(kernel, timeout=timeout)
    entries[digest] = {
        "ok": result.ok,
        "detail": result.detail,
        "release": release,
        "transport": transport,
        "key": key,
        "seconds": round(result.seconds, 2),
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    probecache.save(cache_file, CACHE_VERSION, entries, "UML")
    return Probed(kernel, result.ok, result.detail, release, transport, cached=False)


# --- selection -------------------------------------------------------------------------------


def _named(p: Probed) -> str:
    return f"{p.path}" + (f" ({p.release})" if p.release else "")


def select(
    cache_file: Path | None = None,
    *,
    packaged: Path | None = None,
    built: Path | None = None,
    override: str | None = None,
    timeout: float = 30.0,
    refresh: bool = False,
) -> UmlKernel:
    """The UML kernel to boot here and why. ``override`` (default: ``$UNIONIMG_UML_KERNEL``)
    is used alone and must pass its probe; otherwise ``packaged`` (default :data:`PACKAGED`)
    when it passes, else ``built`` (default :data:`BUILT`). The probes are cached in
    ``cache_file`` (default :data:`PROBE_CACHE`). MissingCapability when none runs here,
    naming each failure."""
    cache_file = PROBE_CACHE if cache_file is None else cache_file
    packaged = PACKAGED if packaged is None else packaged
    built = BUILT if built is None else built
    if override is None:
        override = os.environ.get(ENV_KERNEL) or None
    cpu = cpu_summary()
    if override:
        path = Path(override)
        if not path.is_absolute() or not path.is_file():
            raise UsageError(
                f"{ENV_KERNEL}={override} is not an existing file given by absolute path"
            )
        if "linux.uml" not in path.name:
            # unionimg finds its running guests by that name in their command line
            raise UsageError(
                f"{ENV_KERNEL}={override}: the UML kernel's file name must contain "
                "'linux.uml' (e.g. /opt/uml/linux.uml)"
            )
        p = probe(cache_file, path, timeout=timeout, refresh=refresh)
        if not p.ok:
            raise MissingCapability(
                f"UML kernel {_named(p)} from {ENV_KERNEL} does not boot here: {p.detail} "
                f"({cpu}); unset it or point it at one that does"
            )
        return UmlKernel(
            path, p.release, p.transport, "override", f"{ENV_KERNEL} names it; {p.detail}"
        )
    failures: list[str] = []
    if packaged.is_file():
        p = probe(cache_file, packaged, timeout=timeout, refresh=refresh)
        if p.ok:
            why = f"the packaged kernel boots here: {p.detail}"
            return UmlKernel(packaged, p.release, p.transport, "packaged", why)
        failures.append(f"packaged {_named(p)} fails here: {p.detail} ({cpu})")
    else:
        failures.append(f"no packaged {packaged} (user-mode-linux)")
    if built.is_file():
        real = built.resolve()
        p = probe(cache_file, real, timeout=timeout, refresh=refresh)
        if p.ok:
            why = f"{failures[0]}; using the project-built kernel, which boots: {p.detail}"
            return UmlKernel(real, p.release, p.transport, "built", why)
        failures.append(f"project-built {_named(p)} fails too: {p.detail}")
    else:
        failures.append(f"no project-built kernel at {built}")
    raise MissingCapability(
        f"no UML kernel boots on this host: {'; '.join(failures)}; {_BUILD_HINT}"
    )


__all__ = [
    "BUILT",
    "ENV_KERNEL",
    "PACKAGED",
    "PROBE_CACHE",
    "ProbeResult",
    "Probed",
    "UmlKernel",
    "boot_probe",
    "cache_key",
    "cpu_flags",
    "kernel_release",
    "net_transport",
    "probe",
    "select",
]
