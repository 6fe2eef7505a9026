"""The inside of the consistency checks' sandbox (see :mod:`unionimg.reconcile.checks`):
PID 1 of its namespaces, started by ``python -I -S`` through
:func:`unionimg.layers.sandbox.contained`, so it imports only what it runs (the standard
library, fsops, mounts; not the store's records: a tenth of a second per VM).

It builds the root R (a tmpfs: the host's ``/usr`` read-only, the merged-usr links,
``/dev/null``, the union read-only at :data:`UNION`, unionimg's ``/etc`` with copies of the
union's user databases, the union's top-level home directories read-only), runs each check
as ``chroot R setpriv --no-new-privs --bounding-set -all,+dac_read_search ... PROGRAM``
under rlimits with a clean environment, and prints the outcomes as JSON on stdout
(``[{"check", "code", "lines"}]``, read back as :class:`~unionimg.store.records.CheckOutcome`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unionimg.errors import ToolFailed, UnionimgError
from unionimg.fs import fsops
from unionimg.layers import sandbox
from unionimg.runner import which

Outcome = dict[str, Any]  # {"check": str, "code": int, "lines": [str]}: CheckOutcome's JSON
#: the union, as the programs see it
UNION = "/union"
USER_DBS = ("passwd", "shadow", "group", "gshadow")
MAX_DB = 64 << 20  # a user database or status file larger than this is not read
#: the checks, by name (the name is how a problem is reported)
AUDIT, APT, PWCK, GRPCK, VERIFY = (
    "dpkg --audit",
    "apt-get check",
    "pwck -r",
    "grpck -r",
    "dpkg --verify",
)
PROGRAM_TIMEOUT = 300.0  # one program (a base's dpkg --verify reads every file)
LINES_KEPT = 50_000  # of one program's output (B1's dpkg --verify of a trimmed base: ~5k)
LINE_CHARS = 1000
HOMES_BOUND = 32  # top-level home directories of the union bound into R, at most
_LIMITS = (  # each program's: address space, CPU seconds, size of a file it writes (R's tmpfs)
    (resource.RLIMIT_AS, 4 << 30),
    (resource.RLIMIT_CPU, int(PROGRAM_TIMEOUT)),
    (resource.RLIMIT_FSIZE, 64 << 20),
)
#: top-level names of R that are never the union's
_RESERVED = frozenset(
    {"usr", "etc", "dev", "proc", "sys", "union", "bin", "sbin", "lib", "lib32", "lib64"}
    | {"libx32", "tmp"}
)
_SETPRIV_DROP = (
    "--no-new-privs",
    "--inh-caps",
    "-all",
    "--ambient-caps",
    "-all",
    "--bounding-set",
    "-all,+dac_read_search",
    "--",
)
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/"}
_APT_CONF = "/etc/apt/unionimg.conf"
_NSSWITCH = b"".join(f"{db}: files\n".encode() for db in ("passwd", "group", "shadow", "gshadow"))


_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2) in this private namespace (for R's own binds: no program per mount)."""
    if (
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind_ro(source: str, target: str, *, noexec: bool) -> None:
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | (_MS_NOEXEC if noexec else 0)
    _mount(source, target, None, _MS_BIND)
    _mount("none", target, None, _MS_REMOUNT | _MS_BIND | flags)


def read_db(root: Path, path: str) -> bytes | str:
    """A regular file of at most :data:`MAX_DB` inside ``root``, no symlink followed on the
    way or at the end, never blocking (a FIFO); or why it is not one (a str)."""
    try:
        with fsops.parent_fd(root, path) as (dfd, name):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dfd)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return f"{path} is a symbolic link or lies beneath one; not read"
        return f"{path} cannot be read: {exc.strerror}"
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file; not read"
        if st.st_size > MAX_DB:
            return f"{path} is larger than {MAX_DB >> 20} MiB; not read"
        return fh.read(MAX_DB + 1)


def _etc(root: Path, union: Path) -> dict[str, str]:
    """R's /etc: unionimg's own files and copies of the union's user databases; returns
    why each database that could not be copied was not (by name)."""
    etc = root / "etc"
    (etc / "apt" / "apt.conf.d").mkdir(parents=True)
    (etc / "apt" / "sources.list.d").mkdir()
    (etc / "apt" / "preferences.d").mkdir()
    (etc / "apt" / "sources.list").write_bytes(b"")
    (etc / "nsswitch.conf").write_bytes(_NSSWITCH)
    with contextlib.suppress(OSError):
        (etc / "ld.so.cache").write_bytes(Path("/etc/ld.so.cache").read_bytes())
    (etc / "apt" / "unionimg.conf").write_text(
        "".join(
            f'{k} "{v}";\n'
            for k, v in (
                ("Dir::Etc::main", "/etc/apt/apt.conf"),
                ("Dir::Etc::parts", "/etc/apt/apt.conf.d/"),
                ("Dir::Etc::sourcelist", "/etc/apt/sources.list"),
                ("Dir::Etc::sourceparts", "/etc/apt/sources.list.d/"),
                ("Dir::Etc::preferences", "/etc/apt/preferences"),
                ("Dir::Etc::preferencesparts", "/etc/apt/preferences.d/"),
                ("Dir::Bin::dpkg", "/usr/bin/dpkg"),
                ("Dir::State::status", f"{UNION}/var/lib/dpkg/status"),
                ("Dir::State::extended_states", f"{UNION}/var/lib/apt/extended_states"),
                ("Dir::State::lists", "/etc/apt/sources.list.d/"),
                ("Dir::Cache::pkgcache", ""),
                ("Dir::Cache::srcpkgcache", ""),
                ("Debug::NoLocking", "true"),
                ("Acquire::http::Proxy", "false"),
            )
        )
    )
    refused = {}
    for name in USER_DBS:
        data = read_db(union, f"/etc/{name}")
        if isinstance(data, bytes):
            (etc / name).write_bytes(data)
            os.chmod(etc / name, 0o600)
        elif "does not exist" not in data:
            refused[name] = data
    return refused


def _homes(passwd: Path) -> set[str]:
    """Top-level directories the union's users have homes (or shells) under."""
    out: set[str] = set()
    try:
        text = passwd.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split(":")
        for value in fields[5:7]:
            top = value.strip("/").split("/")[0] if value.startswith("/") else ""
            if top and top not in _RESERVED and top not in (".", ".."):
                out.add(top)
                if len(out) >= HOMES_BOUND:  # a hostile passwd: the rest are not bound
                    return out
    return out


def _build_root(root: Path, lowers: Sequence[str]) -> dict[str, str]:
    """R: tmpfs, the host's /usr read-only, merged-usr links, /dev/null, the union at
    /union, unionimg's /etc and the union's top-level home directories."""
    _mount("unionimg-checks", str(root), "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    (root / "usr").mkdir()
    _bind_ro("/usr", str(root / "usr"), noexec=False)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            os.symlink(os.readlink(host), root / name)
        elif host.is_dir():  # a host without merged /usr: its directory, read-only
            (root / name).mkdir()
            _bind_ro(str(host), str(root / name), noexec=False)
    (root / "dev").mkdir()
    (root / "dev" / "null").write_bytes(b"")
    _mount("/dev/null", str(root / "dev" / "null"), None, _MS_BIND)
    (root / "tmp").mkdir(mode=0o1777)
    union = root / UNION.lstrip("/")
    union.mkdir()
    from unionimg.fs.mounts import mount_overlay  # the one way to mount an overlay

    mount_overlay([Path(p) for p in lowers], None, None, union, driver="overlay", guest=True)
    refused = _etc(root, union)
    for top in sorted(_homes(root / "etc" / "passwd")):
        st = fsops.lstat_beneath(union, top)
        if st is not None and stat.S_ISDIR(st.st_mode):
            (root / top).mkdir()
            _bind_ro(str(union / top), str(root / top), noexec=True)
    return refused


def _outcome(name: str, code: int, out: str) -> Outcome:
    lines = [ln[:LINE_CHARS] for ln in out.splitlines() if ln.strip()]
    return {"check": name, "code": code, "lines": lines[:LINES_KEPT]}


def _limit() -> None:
    """In the program's process before its exec (the inside is single-threaded)."""
    for kind, value in _LIMITS:
        resource.setrlimit(kind, (value, value))


def _program(root: Path, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Outcome:
    chroot = which("chroot")
    try:
        done = subprocess.run(
            [chroot, str(root), "/usr/bin/setpriv", *_SETPRIV_DROP, *argv],
            env={**_ENV, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            timeout=PROGRAM_TIMEOUT,
            check=False,
            preexec_fn=_limit,  # safe here: PID 1 of the namespace runs no other thread
        )
    except subprocess.TimeoutExpired:
        return _outcome(name, 124, f"{name} timed out after {PROGRAM_TIMEOUT:.0f} s")
    return _outcome(name, done.returncode, done.stdout.decode("utf-8", "replace"))


def _host_program(name: str) -> str:
    """The host's program, which must live in /usr (the only host tree R has)."""
    path = os.path.realpath(which(name))
    if not path.startswith("/usr/"):
        raise ToolFailed(f"{name} is {path}, outside /usr; the checks' sandbox has only /usr")
    return path


def inside(spec: Mapping[str, object]) -> list[Outcome]:
    """Build R and run the checks of ``spec`` (lowers, root, checks, verify)."""
    root = Path(str(spec["root"]))
    lowers = [str(x) for x in spec["lowers"]]  # type: ignore[attr-defined]
    checks = [str(x) for x in spec["checks"]]  # type: ignore[attr-defined]
    verify = [str(x) for x in spec["verify"]]  # type: ignore[attr-defined]
    refused = _build_root(root, lowers)
    out: list[Outcome] = []
    for check in checks:
        if check == AUDIT:
            out.append(
                _program(root, check, [_host_program("dpkg"), f"--root={UNION}", "--audit"], {})
            )
        elif check == APT:
            argv = [_host_program("apt-get"), "-o", f"Dir={UNION}/", "check"]
            out.append(_program(root, check, argv, {"APT_CONFIG": _APT_CONF}))
        elif check in (PWCK, GRPCK):
            first, second = ("passwd", "shadow") if check == PWCK else ("group", "gshadow")
            bad = [refused[n] for n in (first, second) if n in refused]
            if bad:
                out.append(_outcome(check, 1, "\n".join(bad)))
                continue
            files = [f"/etc/{n}" for n in (first, second) if (root / "etc" / n).is_file()]
            if f"/etc/{first}" not in files:
                out.append(_outcome(check, 1, f"/etc/{first} does not exist"))
                continue
            tool = _host_program(check.split()[0])
            out.append(_program(root, check, [tool, "-r", *files], {}))
    if verify:  # ["*"]: every package (B1's baseline)
        names = [] if verify == ["*"] else verify
        argv = [_host_program("dpkg"), f"--root={UNION}", "--verify", *names]
        out.append(_program(root, VERIFY, argv, {}))
    return out


def main(args: list[str]) -> int:
    """PID 1 of the checks' namespaces: ``SPEC-JSON PARENT-PID PARENT-START``; prints the
    outcomes as JSON on stdout."""
    if len(args) != 3:
        return sandbox.fail("usage: (unionimg runs it) SPEC PARENT-PID PARENT-START")
    problem = sandbox.started(args[1], args[2], "the checks")
    if problem is not None:
        return sandbox.fail(problem)
    try:
        outcomes = inside(json.loads(args[0]))
    except (OSError, UnionimgError, ValueError, KeyError) as exc:
        return sandbox.fail(getattr(exc, "message", None) or str(exc))
    sys.stdout.write(json.dumps(outcomes))
    sys.stdout.flush()
    return 0
