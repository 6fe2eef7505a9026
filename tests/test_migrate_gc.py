"""``unionimg migrate gc`` on a store made in a temporary directory (no root): redundant
objects go, the least recently used go first under ``--max-size``, what a kept offer or a
VM being migrated away needs stays, a dry run removes nothing, the lock a receive holds
refuses it, and the JSON report says what went and the bytes freed (issue 14)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from unionimg.cli import main
from unionimg.errors import Conflict
from unionimg.layers import instance as inst_mod
from unionimg.migrate import gc, index, pending, receive
from unionimg.store.layout import Store, write_record
from unionimg.store.migrate_records import PROTOCOL, HashIndex, MigrateOffer, TreeEntry
from unionimg.store.records import Instance

NOW = time.time()


def put(store: Store, data: bytes, age: float = 0.0) -> str:
    """An object in the cache, last used ``age`` seconds ago."""
    sha = hashlib.sha256(data).hexdigest()
    path = index.object_path(store, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))
    return sha


def vm(store: Store, name: str, holds: list[str], mac: str = "52:54:00:14:0b:01") -> None:
    """A stopped VM whose upper layer holds ``holds`` (its hash index computed already, as a
    migration leaves it)."""
    inst = Instance(name, "tiny", 1, mac, "uml", 64 << 20, 96, 1, "2026-01-01T00:00:00Z")
    d = store.instance_dir(name)
    d.mkdir(parents=True)
    write_record(d / Instance.FILE, inst)
    image = inst_mod.upper_image(store, name)
    image.write_bytes(b"U")
    st = image.stat()
    stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    hashes = tuple(sorted((sha, f"upper/f{i}") for i, sha in enumerate(holds)))
    path = index.migrate_dir(store) / "vms" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, HashIndex(stamp, hashes))


def offer_naming(store: Store, shas: list[str], age: float = 0.0) -> Path:
    """An offer a receive kept (a transfer broken after it), naming contents ``shas``."""
    inst = Instance(
        "web", "tiny", 1, "52:54:00:14:0b:09", "uml", 64 << 20, 96, 1, "2026-01-01T00:00:00Z"
    )
    entries = [TreeEntry("upper", "dir", 0o755, 0, 0, 1)]
    entries += [
        TreeEntry(f"upper/f{i}", "file", 0o644, 0, 0, 1, size=3, sha256=sha)
        for i, sha in enumerate(shas)
    ]
    offer = MigrateOffer(PROTOCOL, inst, (), tuple(entries))
    d = receive.offers_dir(store)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{'ef' * 32}.json"
    write_record(path, offer)
    os.utime(path, (NOW - age, NOW - age))
    return path


def objects(store: Store) -> set[str]:
    return {p.name for p in index.objects_dir(store).iterdir() if not p.name.startswith(".")}


def test_redundant_objects_go_the_rest_stays(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    held = put(store, b"held by vm peer")
    alone = put(store, b"held nowhere else")
    vm(store, "peer", [held])
    rep = gc.gc(store)
    assert objects(store) == {alone}
    assert [(r.kind, r.name, r.why) for r in rep.removed] == [
        ("object", held, "redundant: in vm peer")
    ]
    assert rep.bytes_freed == len(b"held by vm peer")
    assert (rep.objects_before, rep.objects_after) == (2, 1)
    assert rep.bytes_after == len(b"held nowhere else")


def test_lru_order_under_max_size(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    old = put(store, b"a" * 100, age=300)
    mid = put(store, b"b" * 100, age=200)
    new = put(store, b"c" * 100, age=100)
    used = put(store, b"d" * 100, age=400)  # the oldest write, but found by an offer now
    index.locate(store, {used})
    rep = gc.gc(store, max_size=250)
    assert [r.name for r in rep.removed] == [old, mid]
    assert all(r.why == "lru" for r in rep.removed)
    assert objects(store) == {new, used}
    assert rep.bytes_after == 200 and not rep.still_over
    # a content kept for the way back that was there already counts as used too
    os.utime(index.object_path(store, new), (NOW - 900, NOW - 900))
    with open(tmp_path / "src", "w+b") as fh:
        fh.write(b"c" * 100)
        fh.seek(0)
        assert not index.keep_file(store, fh, new, 100)
    gc.gc(store, max_size=100)
    assert objects(store) == {new}


def test_what_a_kept_offer_or_a_leaving_vm_needs_stays(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    broken = put(store, b"arrived before the link broke", age=500)
    leaving = put(store, b"in the VM being migrated away", age=500)
    free = put(store, b"nobody needs this", age=10)
    offer_naming(store, [broken])
    # the leaving VM holds the content too, but it is leaving: no redundancy, no eviction
    vm(store, "away", [leaving])
    pending.write(
        store, "away", pending.Pending("h1", "ab" * 32, "52:54:00:14:0b:01", "cd" * 32, "now")
    )
    rep = gc.gc(store, max_size=1)
    assert objects(store) == {broken, leaving}
    assert [r.name for r in rep.removed] == [free]
    assert rep.protected == 2 and rep.still_over
    # once the offer is over a day old it is stale: it goes, and protects nothing any more
    stale = offer_naming(store, [broken], age=gc.OFFER_KEPT + 60)
    rep = gc.gc(store, max_size=1)
    assert not stale.exists()
    assert {(r.kind, r.why) for r in rep.removed} == {
        ("offer", "over a day old, no stream followed"),
        ("object", "lru"),
    }
    assert objects(store) == {leaving}


def test_dry_run_removes_nothing_and_says_the_same(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    held = put(store, b"held")
    put(store, b"x" * 50, age=50)
    vm(store, "peer", [held])
    before = sorted(p.name for p in index.objects_dir(store).iterdir())
    dry = gc.gc(store, max_size=10, dry_run=True)
    assert sorted(p.name for p in index.objects_dir(store).iterdir()) == before
    real = gc.gc(store, max_size=10)
    assert dry.to_json() | {"dry_run": False} == real.to_json()
    assert real.bytes_freed == 54 and objects(store) == set()


def test_dead_writers_and_stale_indexes_go(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    sha = put(store, b"kept")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = index.objects_dir(store) / f".{'ab' * 32}.{proc.pid}.tmp"
    alive = index.objects_dir(store) / f".{'cd' * 32}.{os.getpid()}.tmp"
    dead.write_bytes(b"part")
    alive.write_bytes(b"part")
    vm(store, "gone", [])
    (store.instance_dir("gone") / Instance.FILE).unlink()  # the VM left
    layer_index = index.migrate_dir(store) / "layers" / f"{'12' * 32}.json"
    layer_index.parent.mkdir(parents=True)
    write_record(layer_index, HashIndex("x", ()))
    rep = gc.gc(store)
    assert {(r.kind, r.name) for r in rep.removed} == {
        ("tmp", dead.name),
        ("vm-index", "gone.json"),
        ("layer-index", layer_index.name),
    }
    assert alive.exists() and objects(store) == {sha}


def test_stale_partial_arrivals_and_left_manifests_go(tmp_path: Path) -> None:
    """A broken transfer's partial arrival goes after a day or once its content arrived
    whole; a fresh one stays (a rerun chunks it). A left VM's manifest of large files goes
    when the VM is here again; one of a VM still away stays (its way back needs it)."""
    store = Store(tmp_path / "st")
    whole = put(store, b"arrived whole since")
    pdir = index.migrate_dir(store) / "partial"
    pdir.mkdir(parents=True)
    fresh, old, done = pdir / ("aa" * 32), pdir / ("bb" * 32), pdir / whole
    for path in (fresh, old, done):
        path.write_bytes(b"prefix")
    os.utime(old, (NOW - 2 * gc.OFFER_KEPT, NOW - 2 * gc.OFFER_KEPT))
    vm(store, "back", [])
    index.keep_left(store, "back", {"/srv/db": "cc" * 32})
    index.keep_left(store, "away", {"/srv/db": "dd" * 32})
    rep = gc.gc(store)
    assert {(r.kind, r.name) for r in rep.removed} == {
        ("partial", old.name),
        ("partial", done.name),
        ("left", "back.json"),
    }, rep.removed
    assert fresh.exists() and index.read_left(store, "away") == {"/srv/db": "dd" * 32}


def test_a_receive_in_progress_refuses_the_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    sha = put(store, b"in use")
    with store.lock(receive.LOCK, purpose="migrate-in web"), pytest.raises(Conflict) as exc:
        gc.gc(store, max_size=1)
    assert "\n" not in exc.value.message and exc.value.exit_code == 4
    assert objects(store) == {sha}


def test_cli_json_report(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    held = put(store, b"held")
    lru = put(store, b"y" * 40, age=60)
    kept = put(store, b"z" * 30, age=5)
    vm(store, "peer", [held])
    res = CliRunner().invoke(
        main, ["--store", str(store.root), "migrate", "gc", "--max-size", "40", "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["bytes_freed"] == 44 and d["bytes_before"] == 74 and d["bytes_after"] == 30
    assert d["by_reason"] == {
        "redundant": {"files": 1, "bytes": 4},
        "lru": {"files": 1, "bytes": 40},
    }
    assert [(r["name"], r["why"]) for r in d["removed"]] == [
        (held, "redundant: in vm peer"),
        (lru, "lru"),
    ]
    assert objects(store) == {kept}
    human = CliRunner().invoke(main, ["--store", str(store.root), "migrate", "gc", "--dry-run"])
    assert human.exit_code == 0 and "would free 0 bytes" in human.output
    bad = CliRunner().invoke(main, ["--store", str(store.root), "migrate", "gc", "--max-size", "x"])
    assert bad.exit_code == 2 and "--max-size" in bad.output


def test_a_vm_called_gc_still_migrates(tmp_path: Path) -> None:
    """``--to`` makes it a migration: the error is the host's, not an unknown option."""
    res = CliRunner().invoke(main, ["--store", str(tmp_path / "st"), "migrate", "gc", "--to", "h9"])
    assert res.exit_code != 0 and "no host named 'h9'" in res.output, res.output
