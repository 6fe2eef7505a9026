"""SIGKILL the reconciler at every step of apply in turn; a rerun converges to the state of an
uninterrupted run, the live upper layer is at every moment either the old or the new one
(never half-applied, never with conflict markers), and the hg repository verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, UNIONIMG, Cli
from tests.scenario import build, upper_state
from unionimg.faults import POINTS
from unionimg.layers.instance import u_layer
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")


def final_state(cli: Cli) -> dict[str, Any]:
    show = json.loads(cli.ok("instance", "show", "vm1", "--json").output)
    conflicts = json.loads(cli.ok("conflicts", "vm1", "--json").output)
    log = json.loads(cli.ok("log", "vm1", "--json").output)
    with u_layer(Store(cli.store), "vm1", write=True) as u:
        verify = subprocess.run(
            [HG, "-R", str(u), "verify", "-q"], capture_output=True, text=True, check=False
        )
        assert verify.returncode == 0, verify.stderr
        clean = subprocess.run(
            [HG, "-R", str(u), "status"], capture_output=True, text=True, check=True
        ).stdout
    return {
        "generation": show["generation"],
        "upper": upper_state(cli.store, "vm1"),
        "conflicts": sorted((c["path"], c["reason"]) for c in conflicts),
        "history": [c["message"] for c in log],
        "uncommitted": clean,
        # set-aside conflict versions: complete directories only, no half-built leftovers
        "aside": sorted(
            (d.name, sorted(f.name for f in d.iterdir()))
            for d in (cli.store / "instances" / "vm1" / "conflicts").iterdir()
        ),
        "staging": sorted(p.name for p in (cli.store / "tmp").iterdir()),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.conftest import need_root

    need_root()
    tmp = tmp_path_factory.mktemp("ref")
    cli = Cli(tmp / "store")
    build(cli, tmp)
    before = upper_state(cli.store, "vm1")
    assert cli("reconcile", "vm1").exit_code == 1
    state = final_state(cli)
    state["before"] = before
    return state


@pytest.mark.parametrize("step", POINTS["reconcile"])
def test_killed_then_rerun_converges(
    cli: Cli, tmp_path: Path, step: str, reference: dict[str, Any]
) -> None:
    build(cli, tmp_path)
    env = dict(os.environ, UNIONIMG_CRASH_AT=f"reconcile:{step}")
    proc = subprocess.run(
        [str(UNIONIMG), "--store", str(cli.store), "reconcile", "vm1"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    live = upper_state(cli.store, "vm1", staging_ok=True)
    assert live in (reference["before"], reference["upper"]), (
        f"killed at {step}: the live upper layer is neither the old nor the new one"
    )
    for entry in live.values():
        assert entry[0] != "file" or entry[4] is not None
    with u_layer(Store(cli.store), "vm1", write=False) as u:
        for dirpath, _dirs, files in os.walk(u / "upper"):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    assert b"<<<<<<<" not in p.read_bytes(), f"markers in live {p}"
    res = cli("reconcile", "vm1")
    assert res.exit_code == 1, res.output
    state = final_state(cli)
    assert state["generation"] == reference["generation"] == 2
    assert state["upper"] == reference["upper"]
    assert state["conflicts"] == reference["conflicts"]
    assert state["history"] == reference["history"]
    assert state["uncommitted"] == ""
    assert state["aside"] == reference["aside"] != []
    assert state["staging"] == reference["staging"] == []
    again = cli("reconcile", "vm1", "--json")
    assert json.loads(again.output)["instances"][0]["actions"] == []
