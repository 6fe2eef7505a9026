"""Unattended reconcile: a systemd timer where systemd runs, a cron.d line otherwise."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

from unionimg.errors import UsageError
from unionimg.names import shown
from unionimg.runner import run
from unionimg.store.layout import write_atomic

UNIT = "unionimg-reconcile"
CRON_FILE = "etc/cron.d/unionimg"
SYSTEMD_DIR = "etc/systemd/system"


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


def command(store: Path) -> list[str]:
    return [program(), "--store", str(store), "reconcile", "--all", "--json"]


def systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def render_cron(every: str, store: Path) -> str:
    _, schedule = parse_every(every)
    log = store / "reports" / "cron.log"
    line = " ".join(shlex.quote(a) for a in command(store))
    return (
        f"# unionimg: reconcile every instance every {every} "
        "(written by 'unionimg timer install')\n"
        f"{schedule} root {line} >> {shlex.quote(str(log))} 2>&1\n"
    )


def render_systemd(every: str, store: Path) -> dict[str, str]:
    seconds, _ = parse_every(every)
    exec_line = " ".join(shlex.quote(a) for a in command(store))
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


def install(every: str, store: Path, root: Path = Path("/")) -> list[Path]:
    """Install the schedule; returns the files written. Rerunning replaces them."""
    parse_every(every)  # refuse a bad interval before anything is made below ``root``
    if systemd_running(root):
        written = []
        for name, text in render_systemd(every, store).items():
            path = root / SYSTEMD_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text.encode(), mode=0o644)
            written.append(path)
        run(["systemctl", "daemon-reload"], what="reloading systemd")
        run(["systemctl", "enable", "--now", f"{UNIT}.timer"], what="enabling the timer")
        return written
    path = root / CRON_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_cron(every, store).encode(), mode=0o644)
    return [path]


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
