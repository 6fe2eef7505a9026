"""The uml driver: User-Mode Linux guests, their tap devices, the ``linux.uml`` process, and
a clean stop through UML's management console.

Its profile is ``uml.argv`` (``templates/uml/uml.argv.j2``), the UML command line, one
argument per line: the UML kernel itself (the one :mod:`unionimg.boot.umlprobe` finds booting
here), ``ubd0r=`` BASE (read-only), ``ubd1=`` U, the initramfs, the NIC on a host tap with
the instance's MAC (the legacy ``eth0=tuntap`` transport or the vector driver, whichever the
kernel has), the console on stdout. This module runs it detached and finds it again later by
pid and umid (a later CLI invocation is not the guest's parent); :data:`DRIVER` puts it behind
the :class:`~unionimg.hypervisors.Driver` interface.

Facts this module builds on (Debian 12 ``user-mode-linux`` 6.1, measured):

- ``linux.uml`` is one process group of several host processes sharing the command line
  (kernel, I/O helper, one per guest address space). It keeps guest memory in an unlinked
  file under ``$TMPDIR`` (else ``/dev/shm`` if a tmpfs, else ``/tmp``); we point TMPDIR at
  ``/dev/shm`` after checking it is a tmpfs with room for ``mem=``.
- It writes ``<uml_dir>/<umid>/pid`` and the socket ``<uml_dir>/<umid>/mconsole`` at start
  and removes that directory when it exits; ``uml_dir`` defaults to ``$HOME/.uml`` and the
  driver sets HOME to the instance's workdir.
- SIGTERM, SIGINT and SIGHUP make UML clean up its helpers and exit at once (no guest
  shutdown, like pulling the plug). The mconsole command ``halt`` does the same. ``cad``
  sends ctrl-alt-del to the guest's init, which sysvinit and systemd turn into a REBOOT, and
  UML re-executes itself on reboot, so it is no way to stop a guest.
- So a clean stop here is: mconsole ``sysrq s`` (sync) and ``sysrq u`` (remount every
  filesystem read-only, which leaves U clean on disk), wait until the guest's ``/proc/mounts``
  (mconsole ``proc mounts``) shows its ubd filesystems read-only, then ``halt``. The
  mconsole protocol is a small datagram exchange spoken here directly, so ``uml_mconsole``
  (package uml-utilities) is not needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from unionimg.errors import Conflict, MissingCapability, ToolFailed, UsageError
from unionimg.hypervisors import Capabilities, Driver, Liveness, Prepared, Running, now_iso
from unionimg.hypervisors.profiles import (
    check_ifname,
    common,
    layer_disks,
    lowers_arg,
    render_template,
)
from unionimg.hypervisors.spec import BootSpec
from unionimg.names import shown
from unionimg.poll import Deadline, until
from unionimg.runner import run, which

log = logging.getLogger(__name__)

UML = "linux.uml"
SHM = Path("/dev/shm")
TAP_MAX = 15  # IFNAMSIZ - 1
_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
POLL = 0.1
START_GRACE = 3.0  # seconds to catch an immediate failure of linux.uml

#: Popen objects of guests this process started, so they are reaped (no zombies, no warnings),
#: and the exit status of those reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}
_exits: dict[int, int] = {}


# --- tap devices ---------------------------------------------------------------------------


def tap_name(instance_name: str) -> str:
    """A short deterministic tap name for an instance: ``ui`` + 8 hex digits of a hash."""
    return "ui" + hashlib.sha256(instance_name.encode()).hexdigest()[:8]


def _check_tap(name: str) -> None:
    if not _TAP_RE.match(name) or name in (".", ".."):
        raise UsageError(
            f"bad tap device name '{name}': use 1-{TAP_MAX} letters, digits, '_', '.', '-'"
        )


def tap_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def make_tap(name: str) -> None:
    """Create tap device ``name`` (if missing) and bring it up. Needs CAP_NET_ADMIN."""
    _check_tap(name)
    if tap_exists(name):
        if not Path("/sys/class/net", name, "tun_flags").exists():
            raise Conflict(
                f"network device {name} exists and is not a tap device; remove it or pick "
                "another tap name"
            )
    else:
        if not Path("/dev/net/tun").exists():
            raise MissingCapability(
                "/dev/net/tun is missing; load the tun module (modprobe tun) to make tap devices"
            )
        if os.geteuid() != 0:
            raise MissingCapability(f"creating tap device {name} needs root; run as root")
        run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], what=f"creating tap {name}")
    run(["ip", "link", "set", name, "up"], what=f"bringing tap {name} up")


def remove_tap(name: str) -> None:
    """Delete tap device ``name``; quiet if it does not exist."""
    _check_tap(name)
    if not tap_exists(name):
        return
    result = run(["ip", "link", "del", name], check=False, what=f"removing tap {name}")
    if result.returncode != 0 and tap_exists(name):
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        raise ToolFailed(
            f"could not remove tap device {name}: {lines[-1] if lines else result.returncode}"
        )


# --- argv and /proc --------------------------------------------------------------------------


def _arg(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` argument."""
    found = None
    for arg in argv[1:]:
        if arg.startswith(key + "="):
            found = arg[len(key) + 1 :]
    return found


def umid_of(argv: list[str]) -> str | None:
    """The ``umid=`` of a UML argv (None: UML makes up a random one)."""
    return _arg(argv, "umid")


def _mem_bytes(argv: list[str]) -> int:
    """Guest memory from ``mem=`` (UML's default is 32 MiB)."""
    value = _arg(argv, "mem")
    if value is None:
        return 32 << 20
    m = re.fullmatch(r"(\d+)([KkMmGg]?)", value)
    if not m:
        raise UsageError(f"bad UML argument mem={value}; use e.g. mem=256M")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    return int(m.group(1)) << shift


def _proc_args(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a]


PF_KTHREAD = 0x00200000


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, flags) of ``pid`` from /proc/PID/stat, None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[6])


def _reap(pid: int) -> None:
    """Collect the exit status of a guest this process started (no-op for others)."""
    proc = _children.get(pid)
    if proc is not None:
        code = proc.poll()
        if code is not None:
            _exits[pid] = code
            del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, argv0_hint: str = UML, *, umid: str | None = None) -> bool:
    """Whether ``pid`` is a live ``linux.uml`` (argv0 contains ``argv0_hint``) with ``umid=``
    ``umid`` when given — so a recycled pid is not mistaken for the guest."""
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X") or stat[1] & PF_KTHREAD:
        return False
    args = _proc_args(pid)
    if not args:
        # A live user process with no command line is between states: exec'ing (UML at
        # start) or exiting (its memory already gone). Still there: count it as running, so
        # wait() returns only once it is really gone.
        return True
    if argv0_hint not in os.path.basename(args[0]):
        return False
    return umid is None or f"umid={umid}" in args[1:]


def wait(pid: int, timeout: float, *, umid: str | None = None, argv0_hint: str = UML) -> bool:
    """Wait until the guest ``pid`` and its helper processes have exited; False if it still
    runs after ``timeout``. Works whether or not this process started it (polls /proc)."""
    deadline = Deadline(timeout)
    if not until(lambda: not is_running(pid, argv0_hint, umid=umid), deadline.left(), POLL):
        return False
    # UML's helper processes (its process group) end a moment after the main one: only then
    # are the images really let go
    return until(lambda: not group_members(pid), deadline.left(), 0.02)


def _uml_dir(args: list[str], env_home: str | None) -> Path | None:
    explicit = _arg(args, "uml_dir")
    if explicit:
        return Path(explicit)
    return Path(env_home) / ".uml" if env_home else None


def _home_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"HOME="):
            return item[5:].decode(errors="surrogateescape")
    return None


def mconsole_socket(pid: int) -> Path | None:
    """The management console socket of the running guest ``pid`` (None if not found)."""
    args = _proc_args(pid)
    if not args:
        return None
    base = _uml_dir(args, _home_of(pid))
    if base is None:
        return None
    umid = _arg(args, "umid")
    candidates = [base / umid] if umid else sorted(p for p in base.glob("*") if p.is_dir())
    for umid_dir in candidates:
        try:
            owner = int((umid_dir / "pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if owner == pid and (umid_dir / "mconsole").exists():
            return umid_dir / "mconsole"
    return None


# --- the management console ------------------------------------------------------------------

_MC_MAGIC = 0xCAFEBABE
_MC_VERSION = 2
_MC_MAX_DATA = 512


def mconsole(sock: Path, command: str, *, timeout: float = 5.0) -> str:
    """Send one mconsole command (``version``, ``halt``, ``sysrq s``, ``proc mounts``...) to
    the guest behind ``sock`` and return its reply; ToolFailed if UML reports an error."""
    data = command.encode()
    if len(data) >= _MC_MAX_DATA:
        raise UsageError(f"mconsole command too long: {command[:40]}...")
    request = struct.pack("=III", _MC_MAGIC, _MC_VERSION, len(data)) + data.ljust(
        _MC_MAX_DATA, b"\0"
    )
    reply = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        # an abstract address: nothing to clean up, and UML can answer to it
        s.bind(f"\0unionimg-mconsole-{os.getpid()}-{time.monotonic_ns()}")
        s.settimeout(timeout)
        try:
            s.sendto(request, str(sock))
            while True:
                packet = s.recv(12 + _MC_MAX_DATA)
                err, more, length = struct.unpack("=III", packet[:12])
                reply += packet[12 : 12 + length]
                if not more:
                    break
        except OSError as exc:
            raise ToolFailed(
                f"UML management console {sock} did not answer '{command}': {exc.strerror or exc}"
            ) from exc
    text = reply.replace(b"\0", b"").decode(errors="replace")
    if err:
        raise ToolFailed(f"UML mconsole '{command}' failed: {text.strip()}")
    return text


def _ubd_rw_mounts(sock: Path) -> list[str]:
    """The guest's ubd-backed filesystems still mounted read-write."""
    mounts = mconsole(sock, "proc mounts")
    busy = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].startswith("/dev/ubd") and "rw" in fields[3].split(","):
            busy.append(fields[0])
    return busy


_UBD_RE = re.compile(r"^ubd(\d+)([a-z]*)=([^,:]+)")
_EXT4_MAGIC = 0xEF53
_EXT4_VALID_FS = 0x0001
_EXT4_INCOMPAT_RECOVER = 0x0004


def writable_disks(args: list[str], cwd: Path) -> list[Path]:
    """The images a UML argv attaches read-write (``ubdN=`` without the ``r`` flag)."""
    found = []
    for arg in args[1:]:
        m = _UBD_RE.match(arg)
        if m and "r" not in m.group(2):
            found.append(cwd / m.group(3))
    return found


def ext4_clean(image: Path) -> bool | None:
    """Whether the ext4 filesystem in ``image`` is clean on disk (valid, no journal to
    replay): True after a read-only remount or unmount, False while mounted read-write.
    None if ``image`` holds no ext4."""
    try:
        with image.open("rb") as fh:
            fh.seek(1024)
            sb = fh.read(0x64)
    except OSError:
        return None
    if len(sb) < 0x64 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        return None
    (state,) = struct.unpack_from("<H", sb, 0x3A)
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    return bool(state & _EXT4_VALID_FS) and not incompat & _EXT4_INCOMPAT_RECOVER


def _sync_and_halt(sock: Path, disks: list[Path], timeout: float) -> None:
    """Sync, remount every filesystem read-only, wait until the guest shows its ubd mounts
    read-only AND the writable ext4 images are clean on disk (the guest flags a filesystem
    read-only before its last superblock write), then halt."""
    mconsole(sock, "sysrq s")
    mconsole(sock, "sysrq u")
    deadline = time.monotonic() + timeout
    while True:
        busy = _ubd_rw_mounts(sock) + [str(d) for d in disks if ext4_clean(d) is False]
        if not busy:
            break
        if time.monotonic() >= deadline:
            log.warning("guest filesystems %s not clean after %.0f s; halting", busy, timeout)
            break
        time.sleep(POLL)
    with contextlib.suppress(ToolFailed):  # UML may exit before its reply is read
        mconsole(sock, "halt", timeout=2.0)


# --- starting and stopping -------------------------------------------------------------------


def _tmpfs_mounted(path: Path) -> bool:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(
        len(f) >= 3 and f[1] == str(path) and f[2] == "tmpfs" for f in (ln.split() for ln in lines)
    )


def _check_shm(argv: list[str]) -> None:
    if not _tmpfs_mounted(SHM):
        raise MissingCapability(
            f"UML keeps guest memory in a tmpfs file but {SHM} is not a tmpfs; "
            f"mount one (mount -t tmpfs -o mode=1777 tmpfs {SHM})"
        )
    need = _mem_bytes(argv)
    st = os.statvfs(SHM)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise MissingCapability(
            f"{SHM} has {free >> 20} MiB free but the UML guest needs {need >> 20} MiB (mem=); "
            f"free some or enlarge it (mount -o remount,size=... {SHM})"
        )


def _check_taps(argv: list[str]) -> None:
    """Every tap an ``ethN=tuntap,TAP,...`` or ``vecN:...ifname=TAP`` argument names exists."""
    for arg in argv[1:]:
        m = re.match(r"^(eth\d+)=tuntap,([^,]+)", arg) or re.match(
            r"^(vec\d+):.*\bifname=([^,]+)", arg
        )
        if m and not tap_exists(m.group(2)):
            raise MissingCapability(
                f"tap device {m.group(2)} for the guest's {m.group(1)} does not exist; "
                "create it first (unionimg.hypervisors.uml.make_tap)"
            )


def _spawn(argv: list[str], *, out: IO[bytes], env: dict[str, str], cwd: Path) -> int:
    """The one place a long-running guest process is started: detached in its own session,
    stdin /dev/null, stdout and stderr into ``out``. Returns its pid."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )
    _children[proc.pid] = proc
    _exits.pop(proc.pid, None)  # a recycled pid of an earlier guest
    # a panicking UML kernel abort()s: no core dump of the guest's memory into the workdir
    with contextlib.suppress(OSError):
        resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
    return proc.pid


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_bytes()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def start(argv: list[str], console_log: Path, workdir: Path) -> int:
    """Start ``argv`` (``linux.uml ...``) detached; its console (stdout+stderr) is appended to
    ``console_log``, HOME is ``workdir`` (so ``uml_dir`` defaults to ``workdir/.uml``).
    Returns the pid. Conflict if a guest with the same umid runs."""
    if not argv:
        raise UsageError("empty UML command line")
    try:
        program = which(argv[0])
    except MissingCapability as exc:
        raise MissingCapability(
            f"{argv[0]} not found; install user-mode-linux (apt-get install user-mode-linux)"
        ) from exc
    _check_shm(argv)
    _check_taps(argv)
    workdir.mkdir(parents=True, exist_ok=True)
    console_log.parent.mkdir(parents=True, exist_ok=True)
    umid = umid_of(argv)
    uml_dir = _uml_dir(argv, str(workdir))
    if umid and uml_dir is not None:
        try:
            owner = int((uml_dir / umid / "pid").read_text().strip())
        except (OSError, ValueError):
            owner = 0
        if owner and is_running(owner, os.path.basename(program), umid=umid):
            raise Conflict(f"UML guest {umid} is already running (pid {owner}); stop it first")
    env = dict(os.environ)
    env.update({"HOME": str(workdir), "TMPDIR": str(SHM)})
    full = [program, *argv[1:]]
    with console_log.open("ab") as out:
        pid = _spawn(full, out=out, env=env, cwd=workdir)
    log.info("started %s as pid %d (console %s)", argv[0], pid, console_log)
    # catch an immediate failure (bad argument, no memory): UML writes its pid file early
    deadline = time.monotonic() + START_GRACE
    pidfile = uml_dir / umid / "pid" if umid and uml_dir is not None else None
    while time.monotonic() < deadline:
        code = exit_status(pid)  # our child: its own status, no /proc guessing
        if code is not None:
            raise ToolFailed(
                f"{argv[0]} exited at once (status {code}): "
                f"{_tail(console_log) or 'no output'}; see {console_log}"
            )
        if pidfile.exists() if pidfile is not None else mconsole_socket(pid) is not None:
            break
        time.sleep(POLL)
    return pid


def exit_status(pid: int) -> int | None:
    """The exit status of a guest this process started and that has exited, else None."""
    _reap(pid)
    return _exits.get(pid)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    """Signal the guest's whole process group (its helpers too) when it leads one (as
    :func:`start` makes it), else just the process."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise MissingCapability(
            f"not allowed to signal UML guest pid {pid}; run as its owner or root"
        ) from exc


def stop(
    pid: int,
    *,
    force: bool,
    timeout: float = 30.0,
    umid: str | None = None,
    argv0_hint: str = UML,
) -> str:
    """Stop the UML guest ``pid``. Without ``force``: sync and remount its filesystems
    read-only through the mconsole, then halt (SIGTERM if there is no mconsole); after
    ``timeout`` s, or at once with ``force``, SIGKILL its whole process group. Quiet if it is
    not running. ``umid`` (and ``argv0_hint``) guard against a recycled pid. Returns how:
    ``clean``, ``forced``, ``hard`` (killed after ``timeout``) or ``gone``."""
    if not is_running(pid, argv0_hint, umid=umid):
        return "gone"
    group = _leads_group(pid)  # decided while the pid is known to be the guest
    if not force:
        sock = mconsole_socket(pid)
        try:
            if sock is not None:
                try:
                    cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
                except OSError:
                    cwd = Path("/")
                disks = writable_disks(_proc_args(pid) or [], cwd)
                _sync_and_halt(sock, disks, min(timeout / 2, 15.0))
            else:
                log.info("UML pid %d has no mconsole; sending SIGTERM", pid)
                _signal(pid, signal.SIGTERM, group=group)
        except ToolFailed as exc:
            log.warning("clean stop of UML pid %d failed (%s); sending SIGTERM", pid, exc)
            _signal(pid, signal.SIGTERM, group=group)
        if wait(pid, timeout, umid=umid, argv0_hint=argv0_hint):
            if group:
                _reap_group(pid)
            return "clean"
        log.warning("UML pid %d still runs %.0f s after the stop request; killing it", pid, timeout)
    _signal(pid, signal.SIGKILL, group=group)
    if not wait(pid, 10.0, umid=umid, argv0_hint=argv0_hint):
        raise ToolFailed(f"UML guest pid {pid} survived SIGKILL for 10 s")
    if group:
        _reap_group(pid)
    return "forced" if force else "hard"


def _reap_group(pgid: int, timeout: float = 5.0) -> None:
    """After the guest's main process is gone: kill what is left of its process group (UML's
    helpers die a moment later than it) and wait until none of it runs."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        _signal(pgid, signal.SIGKILL, group=True)
        if time.monotonic() >= deadline:
            raise ToolFailed(
                f"UML helper processes {group_members(pgid)} of guest pid {pgid} survived SIGKILL"
            )
        time.sleep(0.02)


def group_members(pid: int) -> list[int]:
    """Live processes whose process group is ``pid`` (to check nothing was left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] not in ("Z", "X") and int(fields[2]) == pid:
            found.append(int(entry.name))
    return found


# --- the profile and the driver --------------------------------------------------------------

#: where UML keeps its per-guest directory (pid file, mconsole socket): short on purpose
UML_DIR: Final = "/run/unionimg-uml"
#: How the argv attaches the tap NIC: UML's legacy ``eth0=tuntap,TAP,MAC`` (gone from UML
#: 6.15 on; the guest NIC is eth0) or the vector driver ``vec0:transport=tap,ifname=TAP,mac=MAC``
#: (the guest NIC is vec0 until the initramfs renames it by MAC). unionimg.boot.umlprobe decides.
UML_TRANSPORTS: Final = ("tuntap", "vector")


#: The most layers a chain may have under uml: UML's ubd driver has 16 devices (MAX_DEV in
#: arch/um/drivers/ubd_kern.c), ubd0 is BASE and ubd1 U.
MAX_LAYERS: Final = 14


def render(spec: BootSpec) -> dict[str, str]:
    """``uml.argv`` of ``spec``: ``spec.kernel`` is the UML kernel, ``spec.tap`` the host tap
    of its NIC, ``spec.uml_transport`` how the NIC is attached. UML has one console (con0,
    its stdout) and one CPU: no console= argument, ``spec.vcpus`` unused."""
    ctx = common(spec, "")
    if spec.kernel.name.startswith("vmlinuz"):
        raise UsageError(
            f"instance {spec.name}: the uml profile runs the UML kernel itself (e.g. "
            f"/usr/bin/linux.uml), not '{shown(str(spec.kernel))}'"
        )
    if not spec.tap:
        raise UsageError(
            f"instance {spec.name}: the uml profile needs a host tap device for its NIC "
            "(ip tuntap add dev TAP mode tap; ip link set TAP up)"
        )
    check_ifname(spec.tap, "tap device")
    if spec.uml_transport not in UML_TRANSPORTS:
        raise UsageError(
            f"instance {spec.name}: UML NIC transport '{shown(spec.uml_transport)}' is not "
            f"supported; use one of {', '.join(UML_TRANSPORTS)}"
        )
    layers = layer_disks(
        spec,
        MAX_LAYERS,
        "uml",
        "UML's ubd driver has 16 devices, ubd0-ubd15, two of them BASE and U",
        lambda i: f"ubd{i + 2}",
    )
    lowers = lowers_arg(spec)
    ctx |= {
        "tap": spec.tap,
        "transport": spec.uml_transport,
        "layers": layers,
        # the chain last: the host's unionimg.lowers= wins over one in spec.cmdline
        "cmdline_words": [*spec.cmdline.split(), *([lowers] if lowers else [])],
        "uml_dir": UML_DIR,
    }
    return {"uml.argv": render_template("uml/uml.argv.j2", ctx)}


def argv_of(spec: BootSpec) -> list[str]:
    """What the driver execs to boot ``spec`` under User-Mode Linux (no shell involved): the
    lines of the rendered ``uml.argv``. The console (con0) is the process's stdout."""
    return render(spec)["uml.argv"].splitlines()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _pid(rec: Running) -> int:
    if rec.pid is None:
        raise Conflict(f"a uml running record without its pid ({rec.console})")
    return rec.pid


class UmlDriver(Driver):
    name = "uml"
    capabilities = Capabilities(
        can_start=True,
        can_snapshot=False,
        validated_by=(),  # no validator of UML command lines but UML: the tests boot it
        kernel="uml",
        poll_interval=0.05,  # UML guests are up in well under a second
    )

    def can_boot_here(self) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "a UML guest's NIC needs a tap device, which needs root"
        if not Path("/dev/net/tun").exists():
            return False, "/dev/net/tun is missing; load the tun module (modprobe tun)"
        try:
            which("ip")
        except MissingCapability:
            return False, "ip (iproute2) is not installed; it makes the tap devices"
        if not _tmpfs_mounted(SHM):
            return False, f"UML keeps guest memory in a tmpfs file but {SHM} is not a tmpfs"
        return True, (
            "UML runs as a process of this host; the UML kernel that boots here is probed "
            "at boot ('unionimg uml-kernel')"
        )

    def host_tap(self, instance: str) -> str:
        return tap_name(instance)

    def render(self, spec: BootSpec) -> dict[str, str]:
        return render(spec)

    def start(self, prepared: Prepared, record: Callable[[Running], None]) -> Running:
        spec = prepared.spec
        argv = prepared.files["uml.argv"].splitlines()
        Path(UML_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        make_tap(spec.tap)
        try:
            pid = start(argv, spec.console_log, spec.workdir)
        except BaseException:
            remove_tap(spec.tap)
            raise
        rec = Running(
            hypervisor=self.name,
            started=now_iso(),
            console=str(spec.console_log),
            pid=pid,
            umid=umid_of(argv),
            tap=spec.tap,
        )
        record(rec)
        return rec

    def is_running(self, rec: Running) -> Liveness:
        pid = _pid(rec)
        if is_running(pid, umid=rec.umid):
            return Liveness(True)
        # known only to the process that started it (boot --wait, switch --boot --wait)
        code = exit_status(pid)
        if code is None or code == 0:
            return Liveness(False)
        if code < 0:
            return Liveness(False, f"linux.uml was killed by {_signal_name(-code)}")
        return Liveness(False, f"linux.uml exited with status {code}")

    def stop(
        self,
        rec: Running,
        *,
        force: bool,
        timeout: float = 30.0,
        notice: Callable[[float], None] | None = None,
    ) -> str:
        del notice  # a clean UML stop takes a second or two: nothing to announce
        return stop(_pid(rec), force=force, timeout=timeout, umid=rec.umid)

    def release(self, rec: Running) -> None:
        if rec.tap:
            remove_tap(rec.tap)


DRIVER = UmlDriver()
