"""timer install/remove: cron.d line or systemd units, rendered and written below --root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli
from unionimg import timer
from unionimg.errors import UsageError
from unionimg.timer import parse_every, render_cron, render_systemd, rotate, run_logged


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
    assert "timer run" in fields[6] and "--policy" not in fields[6]
    assert fields[6].endswith(">/dev/null 2>&1")  # timer run writes its own rotated log
    assert f"'{tmp_path / 'my store'}'" in fields[6]  # quoted for cron's /bin/sh
    assert text.endswith("\n")


def test_systemd_units(tmp_path: Path) -> None:
    units = render_systemd("2h", tmp_path)
    assert "OnUnitActiveSec=7200s" in units["unionimg-reconcile.timer"]
    assert "SuccessExitStatus=1" in units["unionimg-reconcile.service"]
    assert " timer run" in units["unionimg-reconcile.service"]


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


# -- --policy and the rotated log (issue 12, item 5) ------------------------------------------
def test_install_policy_checked_and_recorded_absolute(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "img"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nglob = "/etc/*"\naction = "keep"\n')
    res = cli.fails("timer", "install", "--root", str(root), "--policy", str(bad), code=2)
    assert f"policy {bad}: rule 1: action = 'keep'" in res.output
    res = cli.fails("timer", "install", "--root", str(root), "--policy", str(tmp_path / "no"))
    assert "no such file" in res.output
    assert not root.exists()  # nothing written for a bad policy
    good = tmp_path / "good.toml"
    good.write_text('[[rule]]\nglob = "/etc/ssh/*"\naction = "keep-local"\n')
    monkeypatch.chdir(tmp_path)
    cli.ok("timer", "install", "--root", str(root), "--policy", "good.toml")
    line = (root / "etc/cron.d/unionimg").read_text().splitlines()[-1]
    assert f"timer run --policy {good}" in line  # absolute: cron's cwd is not the admin's
    units = render_systemd("1h", tmp_path / "s", good)
    assert f"--policy {good}" in units["unionimg-reconcile.service"]


def test_help_states_the_rotation_values(cli: Cli) -> None:
    for args in (("timer", "install", "--help"), ("timer", "run", "--help")):
        text = " ".join(cli.ok(*args).output.split())
        assert f"rotated past {timer.LOG_MAX_BYTES >> 20} MiB" in text
        assert f"{timer.LOG_KEEP} are kept" in text and "STORE/reports/timer.log" in text


def test_rotate_keeps_n_old_logs(tmp_path: Path) -> None:
    log = tmp_path / "timer.log"
    assert not rotate(log, 10, 2)  # no log yet
    for n in range(5):
        log.write_text(f"run {n} " * 5)
        assert rotate(log, 10, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timer.log.1", "timer.log.2"]
    assert (tmp_path / "timer.log.1").read_text().startswith("run 4")
    assert (tmp_path / "timer.log.2").read_text().startswith("run 3")
    log.write_text("small")
    assert not rotate(log, 10, 2) and log.read_text() == "small"


def test_timer_run_logs_reconcile_and_stays_bounded(cli: Cli) -> None:
    """The real reconcile program (an empty store: nothing to reconcile), run eight times
    with a tiny bound: every run is logged, never more than bound + keep files."""
    cli.ok("timer", "--help")  # the store exists
    reports = cli.store / "reports"
    for _ in range(8):
        assert run_logged(cli.store, max_bytes=200, keep=3) == 0
    names = sorted(p.name for p in reports.iterdir() if p.name.startswith("timer.log"))
    assert names == ["timer.log", "timer.log.1", "timer.log.2", "timer.log.3"]
    text = (reports / "timer.log").read_text() + (reports / "timer.log.1").read_text()
    assert "start: --store" in text and "reconcile --all --json" in text
    assert "=== " in text and " exit 0" in text and '"instances": []' in text
    for name in names:
        assert (reports / name).stat().st_size <= 200 + (64 << 10)


def test_timer_run_cli_refuses_a_bad_policy(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("default = 3\n")
    res = cli.fails("timer", "run", "--policy", str(bad), code=2)
    assert f"policy {bad}: default = 3" in res.output
    log = (cli.store / "reports/timer.log").read_text()  # cron sends the output nowhere
    assert f"not run: policy {bad}: default = 3" in log
