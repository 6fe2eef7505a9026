"""Does KVM really run a guest on this host? Boot a kernel once and look, then remember.

``/dev/kvm`` existing is not enough: under a PVM host (``kvm_pvm``) a stock guest kernel hangs
right after its decompressor (and ``-cpu host`` aborts). So the probe boots the guest kernel
under ``accel=kvm`` with no disks: a kernel that really runs prints its banner, panics on the
missing root and, thanks to ``panic=-1`` and ``-no-reboot``, QEMU exits within a second or two.
No kernel output before the timeout means KVM is unusable and libvirt domains must use
``type='qemu'`` (TCG).

The answer is cached in a JSON file keyed by everything that decides it (host kernel release,
QEMU version, guest kernel path and mtime, effective uid), so the probe runs once per host.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from unionimg.errors import ToolFailed, UsageError
from unionimg.runner import run
from unionimg.store import probecache

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
PROBE_CACHE = probecache.CACHE_DIR / "kvm-probe.json"
CACHE_VERSION = 1
#: What the guest kernel prints when it really runs: its banner, then (no root disk) the panic.
BANNER = "Linux version"
GOT_FAR = ("Kernel panic", "VFS:")
#: Host modules that provide /dev/kvm, the first one loaded names the flavour in reasons.
KVM_MODULES = ("kvm_pvm", "kvm_intel", "kvm_amd")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # what was seen, for the reason
    seconds: float


def kvm_module() -> str:
    """The loaded KVM flavour (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``) or ``kvm``."""
    for name in KVM_MODULES:
        if Path("/sys/module", name).is_dir():
            return name
    return "kvm"


def boot_probe(
    kernel: Path, *, accel: str = "kvm", timeout: float = 25.0, qemu: str = QEMU
) -> ProbeResult:
    """Boot ``kernel`` without disks under ``accel`` and say whether it got as far as the
    panic on the missing root. Never raises for a guest that fails; raises MissingCapability
    if QEMU is not installed."""
    cpu = "max"  # a named model everywhere; "host" aborts under PVM
    with tempfile.TemporaryDirectory(prefix="unionimg-kvmprobe-") as tmp:
        console = Path(tmp) / "console.log"
        args = [
            qemu,
            "-nodefaults",
            "-machine",
            f"accel={accel}",
            "-cpu",
            cpu,
            "-m",
            "128",
            "-display",
            "none",
            "-serial",
            f"file:{console}",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
        ]
        started = time.monotonic()
        exited = True
        stderr = ""
        try:
            result = run(args, check=False, timeout=timeout, what=f"probing {accel}")
            stderr = result.stderr
        except ToolFailed:  # timed out: QEMU was killed
            exited = False
        seconds = time.monotonic() - started
        text = console.read_bytes().decode(errors="replace") if console.exists() else ""
    if BANNER in text and any(marker in text for marker in GOT_FAR):
        return ProbeResult(True, f"the guest kernel reached its panic in {seconds:.1f} s", seconds)
    if exited:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else "QEMU exited without kernel output"
        return ProbeResult(False, f"QEMU failed: {why}", seconds)
    if BANNER in text:
        seen = "the kernel started but did not reach its panic"
    else:
        seen = "no kernel output"
    return ProbeResult(False, f"{seen} within {timeout:.0f} s", seconds)


def _qemu_version(qemu: str) -> str:
    out = run([qemu, "--version"], timeout=30, what="asking QEMU its version").stdout
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def cache_key(kernel: Path, qemu: str = QEMU) -> dict[str, object]:
    """Everything the probe's answer depends on."""
    try:
        mtime = kernel.stat().st_mtime_ns
    except FileNotFoundError as exc:
        raise UsageError(f"guest kernel {kernel} not found; pass an existing kernel image") from exc
    return {
        "host_kernel": os.uname().release,
        "qemu": _qemu_version(qemu),
        "guest_kernel": str(kernel.resolve()),
        "guest_kernel_mtime_ns": mtime,
        "euid": os.geteuid(),
    }


def kvm_works(
    cache_file: Path, kernel: Path, *, timeout: float = 25.0, qemu: str = QEMU
) -> tuple[bool, str]:
    """Whether KVM really boots ``kernel`` here, and why; probed once, then read from
    ``cache_file``. Raises UsageError if the kernel is missing, MissingCapability without
    QEMU."""
    if not KVM_DEVICE.exists():
        return False, f"{KVM_DEVICE} is absent (no KVM on this host); using QEMU TCG"
    key = cache_key(kernel, qemu)
    digest = probecache.digest(key)
    entries = probecache.load(cache_file, CACHE_VERSION)
    hit = entries.get(digest)
    if isinstance(hit, dict) and isinstance(hit.get("ok"), bool):
        return bool(hit["ok"]), str(hit.get("reason", ""))
    module = kvm_module()
    log.info(
        "probing whether KVM (%s) boots %s (up to %.0f s, once per host)", module, kernel, timeout
    )
    probe = boot_probe(kernel, accel="kvm", timeout=timeout, qemu=qemu)
    if probe.ok:
        reason = f"KVM ({module}) runs a guest kernel on this host: {probe.detail}"
    else:
        reason = (
            f"KVM present ({module}) but a guest kernel does not boot under it "
            f"({probe.detail}); using QEMU TCG"
        )
    entries[digest] = {
        "ok": probe.ok,
        "reason": reason,
        "key": key,
        "seconds": round(probe.seconds, 2),
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    probecache.save(cache_file, CACHE_VERSION, entries, "KVM")
    return probe.ok, reason


def domain_type(cache_file: Path, kernel: Path, *, timeout: float = 25.0) -> tuple[str, str]:
    """The libvirt domain type to use here: ``("kvm", reason)`` or ``("qemu", reason)``."""
    ok, reason = kvm_works(cache_file, kernel, timeout=timeout)
    return ("kvm" if ok else "qemu"), reason


__all__ = [
    "ProbeResult",
    "boot_probe",
    "cache_key",
    "domain_type",
    "kvm_module",
    "kvm_works",
]
