"""Unattended reconcile: a systemd timer where systemd runs, a cron.d line otherwise.

Both run ``unionimg --store STORE timer run [--policy FILE]`` (:func:`run_logged`), which runs
``reconcile --all --json`` with the policy given at ``timer install`` (checked then: a bad
file is refused before anything is written) and appends its output, between a start and an
end line, to ``STORE/reports/timer.log``. The log is rotated by size: past
:data:`LOG_MAX_BYTES` it becomes ``timer.log.1`` (``.1`` becomes ``.2`` ...) and at most
:data:`LOG_KEEP` old logs are kept; ``reports/reconcile.log`` (a line per instance and run)
is rotated the same way. Under systemd the journal gets the start and end lines too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO

from unionimg.errors import UnionimgError, UsageError
from unionimg.names import shown
from unionimg.reconcile.policy import load_policy
from unionimg.runner import run, stream
from unionimg.store.layout import write_atomic

UNIT = "unionimg-reconcile"
CRON_FILE = "etc/cron.d/unionimg"
SYSTEMD_DIR = "etc/systemd/system"
LOG = "timer.log"  # in STORE/reports
LOG_MAX_BYTES = 1 << 20  # a log larger than this is rotated
LOG_KEEP = 5  # old logs kept: timer.log.1 (newest) .. timer.log.5
ROTATED = ("reconcile.log",)  # the store's other growing logs, rotated alike


def parse_every(text: str) -> tuple[int, str]:
    """``15m`` / ``2h`` / ``1d`` → (seconds, cron schedule fields)."""
    # ASCII digits, no blanks: the text is written verbatim into the cron file and the units
    m = re.fullmatch(r"([0-9]{1,4})([mhd])", text)
    if not m:
        raise UsageError(f"interval '{shown(text)}' is not understood; write e.g. 15m, 2h or 1d")
    n, unit = int(m.group(1)), m.group(2)
    if n < 1:
        raise UsageError(f"interval '{text}' must be at least 1")
    if unit == "m":
        if 60 % n and n < 60:
            raise UsageError(
                f"interval {n}m does not divide an hour; use one of "
                "1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 minutes or hours"
            )
        if n >= 60:
            raise UsageError(f"interval {n}m: write hours instead (e.g. {max(1, n // 60)}h)")
        return n * 60, f"*/{n} * * * *" if n > 1 else "* * * * *"
    if unit == "h":
        if n >= 24 or 24 % n:
            raise UsageError(
                f"interval {n}h does not divide a day; use 1, 2, 3, 4, 6, 8 or 12 hours, or 1d"
            )
        return n * 3600, f"0 */{n} * * *" if n > 1 else "0 * * * *"
    if n != 1:
        raise UsageError("daily runs only: write 1d")
    return 86400, "0 3 * * *"


def program() -> str:
    """The absolute path of this unionimg (the venv's console script)."""
    found = shutil.which("unionimg", path=str(Path(sys.executable).parent))
    return found or str(Path(sys.executable).parent / "unionimg")


def command(store: Path, policy: Path | None = None) -> list[str]:
    """What the schedule runs: ``timer run`` (the reconcile, logged and rotated)."""
    out = [program(), "--store", str(store), "timer", "run"]
    return out + (["--policy", str(policy)] if policy is not None else [])


def reconcile_command(store: Path, policy: Path | None = None) -> list[str]:
    """The reconcile ``timer run`` runs."""
    out = [program(), "--store", str(store), "reconcile", "--all", "--json"]
    return out + (["--policy", str(policy)] if policy is not None else [])


def check_policy(policy: Path | None) -> Path | None:
    """The policy file as an absolute path, checked now (one line if it is bad), so the
    schedule never runs with a file that stops every reconcile."""
    if policy is None:
        return None
    policy = Path(os.path.abspath(policy))
    load_policy(policy)  # UsageError: "policy FILE: ..." with what is wrong
    return policy


def systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def render_cron(every: str, store: Path, policy: Path | None = None) -> str:
    _, schedule = parse_every(every)
    line = " ".join(shlex.quote(a) for a in command(store, policy))
    log = shlex.quote(str(store / "reports" / LOG))
    return (
        f"# unionimg: reconcile every instance every {every} "
        "(written by 'unionimg timer install'; output in "
        f"{log}, rotated past {LOG_MAX_BYTES >> 20} MiB, {LOG_KEEP} old logs kept)\n"
        f"{schedule} root {line} >/dev/null 2>&1\n"
    )


def render_systemd(every: str, store: Path, policy: Path | None = None) -> dict[str, str]:
    seconds, _ = parse_every(every)
    exec_line = " ".join(shlex.quote(a) for a in command(store, policy))
    service = (
        "[Unit]\nDescription=unionimg: reconcile base updates into every instance\n\n"
        "[Service]\nType=oneshot\n"
        f"ExecStart={exec_line}\n"
        "# 1 = conflicts left for an admin: reported, not a failure of the service\n"
        "SuccessExitStatus=1\n"
    )
    timer = (
        f"[Unit]\nDescription=unionimg: reconcile every {every}\n\n"
        f"[Timer]\nOnBootSec=5min\nOnUnitActiveSec={seconds}s\nPersistent=true\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def install(
    every: str, store: Path, root: Path = Path("/"), policy: Path | None = None
) -> list[Path]:
    """Install the schedule; returns the files written. Rerunning replaces them."""
    parse_every(every)  # refuse a bad interval before anything is made below ``root``
    policy = check_policy(policy)  # and a bad policy file
    if systemd_running(root):
        written = []
        for name, text in render_systemd(every, store, policy).items():
            path = root / SYSTEMD_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text.encode(), mode=0o644)
            written.append(path)
        run(["systemctl", "daemon-reload"], what="reloading systemd")
        run(["systemctl", "enable", "--now", f"{UNIT}.timer"], what="enabling the timer")
        return written
    path = root / CRON_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_cron(every, store, policy).encode(), mode=0o644)
    return [path]


# -- the scheduled run and its log ----------------------------------------------------------
def rotate(log: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """If ``log`` is larger than ``max_bytes``: ``log.N-1`` → ``log.N`` ... ``log`` →
    ``log.1``, the oldest beyond ``keep`` removed. True if it rotated."""
    try:
        if log.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    log.with_name(f"{log.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = log.with_name(f"{log.name}.{n}")
        if older.exists():
            older.rename(log.with_name(f"{log.name}.{n + 1}"))
    if keep > 0:
        log.rename(log.with_name(f"{log.name}.1"))
    else:
        log.unlink()
    return True


class _Log:
    """An append-only log file rotated by size as it is written."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        rotate(path, max_bytes, keep)
        self._fh: BinaryIO = self._open()

    def _open(self) -> BinaryIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "ab")

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        if self._fh.tell() > self.max_bytes:
            self._fh.close()
            rotate(self.path, self.max_bytes, self.keep)
            self._fh = self._open()

    def close(self) -> None:
        self._fh.close()


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_logged(
    store: Path,
    policy: Path | None = None,
    *,
    max_bytes: int = LOG_MAX_BYTES,
    keep: int = LOG_KEEP,
) -> int:
    """``reconcile --all --json`` with its output appended to ``STORE/reports/timer.log``
    (rotated, see the module docstring); returns reconcile's exit code."""
    reports = store / "reports"
    reports.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ROTATED:
        rotate(reports / name, max_bytes, keep)
    log = _Log(reports / LOG, max_bytes, keep)
    try:
        try:
            policy = check_policy(policy)  # deleted or broken since install: said in the log
        except UnionimgError as exc:
            log.write(f"=== {_stamp()} not run: {exc.message}\n".encode())
            raise
        argv = reconcile_command(store, policy)
        start = f"=== {_stamp()} start: {shlex.join(argv[1:])}\n"
        log.write(start.encode())
        print(start, end="", flush=True)
        result = stream(argv, lambda _fd, data: log.write(data))
        end = f"=== {_stamp()} exit {result.returncode}\n"
        log.write(end.encode())
        print(end, end="", flush=True)
    finally:
        log.close()
    return result.returncode


def remove(root: Path = Path("/")) -> list[Path]:
    removed = []
    if systemd_running(root):
        run(["systemctl", "disable", "--now", f"{UNIT}.timer"], check=False)
    for path in (
        root / CRON_FILE,
        root / SYSTEMD_DIR / f"{UNIT}.service",
        root / SYSTEMD_DIR / f"{UNIT}.timer",
    ):
        if path.exists():
            path.unlink()
            removed.append(path)
    if systemd_running(root) and removed:
        run(["systemctl", "daemon-reload"], check=False)
    return removed
