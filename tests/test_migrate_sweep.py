"""A receiver killed mid-content leaves its ``.SHA.PID.tmp`` in the object cache: the next
receive removes those whose process is gone, and only those (no root needed)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from unionimg.migrate import index, plan, receive
from unionimg.migrate.wire import MAGIC, frame_head
from unionimg.store.layout import Store
from unionimg.store.migrate_records import PROTOCOL, MigrateOffer, TreeEntry
from unionimg.store.records import Instance


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(store: Store) -> dict[str, Path]:
    d = index.objects_dir(store)
    d.mkdir(parents=True)
    sha = "ab" * 32
    files = {
        "dead": d / f".{sha}.{dead_pid()}.tmp",
        "alive": d / f".{'cd' * 32}.{os.getpid()}.tmp",  # a writer at work
        "other": d / ".not-ours.1.tmp",
        "object": d / sha,
    }
    for p in files.values():
        p.write_bytes(b"partial")
    return files


def test_sweep_removes_only_dead_writers_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    assert index.sweep_temporaries(store) == 0  # no cache yet
    files = plant(store)
    assert index.sweep_temporaries(store) == 1
    assert not files["dead"].exists()
    assert all(files[k].exists() for k in ("alive", "other", "object"))


def test_the_next_receive_sweeps(tmp_path: Path) -> None:
    """Even a receive refused after it took its lock sweeps (here: a U size out of range)."""
    store = Store(tmp_path / "st")
    files = plant(store)
    inst = Instance(
        "web", "tiny", 1, "52:54:00:14:0b:01", "uml", 4096, 96, 1, "2026-01-01T00:00:00Z"
    )
    offer = MigrateOffer(PROTOCOL, inst, (), (TreeEntry("upper", "dir", 0o755, 0, 0, 1),))
    raw = zstandard.ZstdCompressor().compress(MAGIC + frame_head(b"H", offer.to_json(), 0))
    with pytest.raises(plan.Refused, match="U size"):
        receive.receive(store, io.BytesIO(raw))
    assert not files["dead"].exists() and files["alive"].exists()
