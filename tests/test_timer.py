"""timer install/remove: cron.d line or systemd units, rendered and written below --root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli
from unionimg.errors import UsageError
from unionimg.timer import parse_every, render_cron, render_systemd


@pytest.mark.parametrize(
    ("every", "seconds", "cron"),
    [
        ("15m", 900, "*/15 * * * *"),
        ("1m", 60, "* * * * *"),
        ("2h", 7200, "0 */2 * * *"),
        ("1h", 3600, "0 * * * *"),
        ("1d", 86400, "0 3 * * *"),
    ],
)
def test_parse_every(every: str, seconds: int, cron: str) -> None:
    assert parse_every(every) == (seconds, cron)


@pytest.mark.parametrize("every", ["7m", "90m", "5h", "2d", "0m", "soon", ""])
def test_bad_interval(every: str) -> None:
    with pytest.raises(UsageError):
        parse_every(every)


def test_cron_line_is_well_formed(tmp_path: Path) -> None:
    text = render_cron("15m", tmp_path / "my store")
    line = next(ln for ln in text.splitlines() if not ln.startswith("#"))
    fields = line.split(None, 6)
    assert fields[:6] == ["*/15", "*", "*", "*", "*", "root"]
    assert "reconcile --all --json" in fields[6]
    assert f"'{tmp_path / 'my store'}'" in fields[6]  # quoted for cron's /bin/sh
    assert text.endswith("\n")


def test_systemd_units(tmp_path: Path) -> None:
    units = render_systemd("2h", tmp_path)
    assert "OnUnitActiveSec=7200s" in units["unionimg-reconcile.timer"]
    assert "SuccessExitStatus=1" in units["unionimg-reconcile.service"]
    assert "--all --json" in units["unionimg-reconcile.service"]


def test_install_and_remove_below_root(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "img"
    out = cli.ok("timer", "install", "--every", "30m", "--root", str(root)).output
    cron = root / "etc/cron.d/unionimg"
    assert str(cron) in out and cron.read_text().count("*/30 * * * * root") == 1
    cli.ok("timer", "install", "--every", "1h", "--root", str(root))  # rerun replaces
    assert "0 * * * * root" in cron.read_text() and "*/30" not in cron.read_text()
    assert cron.stat().st_mode & 0o777 == 0o644
    cli.ok("timer", "remove", "--root", str(root))
    assert not cron.exists()
    assert "no schedule" in cli.ok("timer", "remove", "--root", str(root)).output
    res = cli.fails("timer", "install", "--every", "7m", "--root", str(root))
    assert "does not divide an hour" in res.output
