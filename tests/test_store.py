"""Store primitives: atomic writes, staging sweep after a crash, locks (no root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unionimg.errors import Conflict
from unionimg.store.layout import Store, read_json, write_json


def test_init_is_private_and_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    s.init()
    s.init()
    assert (tmp_path / "st").stat().st_mode & 0o777 == 0o700
    assert read_json(tmp_path / "st" / "store.json")["format"] == 2


def test_write_json_atomic_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert target.stat().st_mode & 0o777 == 0o600


def test_sweep_removes_dead_owner_staging_only(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    s.init()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = s.tmp_dir / f"{dead}.1.base-x.abcd"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with s.staging("live") as live:
        removed = s.sweep_tmp()
        assert stale in removed
        assert live.exists()
    assert not live.exists()
    assert list(s.tmp_dir.iterdir()) == []


def hold_lock(store: Store, name: str, purpose: str, seconds: float) -> subprocess.Popen[str]:
    """Another process holding ``name`` for ``seconds``; returns once it holds it."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from unionimg.store.layout import Store\n"
        f"s = Store({str(store.root)!r})\n"
        f"with s.lock({name!r}, purpose={purpose!r}):\n"
        f"    print('held', flush=True); time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_holder(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    s.init()
    proc = hold_lock(s, "instance-x", "reconcile x", 30)
    try:
        with (
            pytest.raises(Conflict, match=f"pid {proc.pid} reconcile x"),
            s.lock("instance-x", wait=False),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()
    with s.lock("instance-x", wait=False):
        assert os.path.exists(s.locks_dir / "instance-x.lock")


def test_waiting_lock_says_who_holds_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Store(tmp_path / "st")
    s.init()
    proc = hold_lock(s, "instance-y", "reconcile y", 1.5)
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING"), s.lock("instance-y"):
            assert time.monotonic() - t0 > 1.0, "got the lock while the other process held it"
        assert f"held by pid {proc.pid} reconcile y" in caplog.text
    finally:
        proc.kill()
        proc.wait()


def test_publish_under_a_race(tmp_path: Path) -> None:
    """Workers of one reconcile (threads) and concurrent runs (processes) may all try to
    make the store's template repositories at once: one complete directory wins."""
    store = Store(tmp_path / "store")
    store.init()
    final = store.root / "templates" / "hg-anchor"
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "who").write_text(threading.current_thread().name)
        time.sleep(0.05)

    def worker() -> None:
        try:
            start.wait()
            assert store.publish(final, build) == final
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (final / "who").read_text().startswith("w")
    assert sorted(p.name for p in final.parent.iterdir()) == ["hg-anchor"]  # no leftovers
    assert list(store.tmp_dir.iterdir()) == []  # the losers' copies went with their staging
