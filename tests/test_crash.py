"""SIGKILL at every step of base create/update and instance create: no half-made object is
ever visible, nothing stays mounted, and rerunning the command succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, UNIONIMG, Cli
from unionimg.faults import POINTS
from unionimg.fs.mounts import mountinfo

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")


def run_killed(store: Path, point: str, *args: str) -> None:
    env = dict(os.environ, UNIONIMG_CRASH_AT=point)
    proc = subprocess.run(
        [str(UNIONIMG), "--store", str(store), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, f"{point} was not reached: {proc.stderr}"


def mounts_below(path: Path) -> list[str]:
    return [m.target for m in mountinfo() if m.target.startswith(str(path))]


def hg_revs(history: Path) -> list[str]:
    out = subprocess.run(
        [HG, "-R", str(history), "log", "-T", "{desc}\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


@pytest.mark.parametrize("step", POINTS["base-create"])
def test_base_create_killed(cli: Cli, src_tree: Path, step: str) -> None:
    run_killed(
        cli.store, f"base-create:{step}", "base", "create", "deb", "--from-dir", str(src_tree)
    )
    listed = json.loads(cli.ok("base", "list", "--json").output)  # sweeps the dead staging
    assert mounts_below(cli.store) == []
    assert list((cli.store / "tmp").iterdir()) == []
    if step == "published":
        assert [b["name"] for b in listed] == ["deb"]
    else:
        assert listed == [], "a half-made base is visible"
        cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    data = json.loads(cli.ok("base", "show", "deb", "--json").output)
    assert data["latest"] == 1
    assert hg_revs(cli.store / "bases/deb/history") == [
        f"deb generation 1: created from {src_tree}"
    ]
    cli.ok("instance", "create", "vm1", "--base", "deb")


@pytest.mark.parametrize("step", POINTS["base-update"])
def test_base_update_killed(cli: Cli, src_tree: Path, tmp_path: Path, step: str) -> None:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    patch = tmp_path / "patch"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc" / "hostname").write_text("patched\n")
    run_killed(cli.store, f"base-update:{step}", "base", "update", "deb", "--apply-dir", str(patch))
    data = json.loads(cli.ok("base", "show", "deb", "--json").output)
    assert mounts_below(cli.store) == []
    if step == "published":
        assert data["latest"] == 2
    else:
        assert data["latest"] == 1, "a half-made generation is visible"
        cli.ok("base", "update", "deb", "--apply-dir", str(patch))
    data = json.loads(cli.ok("base", "show", "deb", "--json").output)
    assert [g["number"] for g in data["generations"]] == [1, 2]
    revs = hg_revs(cli.store / "bases/deb/history")
    assert len(revs) == 2, f"history holds an orphan changeset: {revs}"
    diff = json.loads(cli.ok("base", "diff", "deb", "--json").output)
    assert diff["modified"] == ["/etc/hostname"]


@pytest.mark.parametrize("step", POINTS["instance-create"])
def test_instance_create_killed(cli: Cli, src_tree: Path, step: str) -> None:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    run_killed(cli.store, f"instance-create:{step}", "instance", "create", "vm1", "--base", "deb")
    listed = json.loads(cli.ok("instance", "list", "--json").output)
    assert list((cli.store / "tmp").iterdir()) == []
    if step == "published":
        assert [i["name"] for i in listed] == ["vm1"]
    else:
        assert listed == []
        cli.ok("instance", "create", "vm1", "--base", "deb")
    status = json.loads(cli.ok("status", "vm1", "--json").output)
    assert status["added"] == [] and status["generation"] == 1
