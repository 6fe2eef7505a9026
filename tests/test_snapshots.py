"""VM snapshots without a guest (issue 16): the chunk store, records, the schedule's policy,
retention and gc, and the faults — a missing or corrupt chunk refused naming it, a full
disk during a take leaving no half snapshot, a received stream that lies refused. Real
stores (ext4 images made by mke2fs, a tmpfs for the full disk); a stopped VM's snapshot is
its U alone."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli
from unionimg.errors import GuestDataRefused, UsageError
from unionimg.snapshots import chunks, policy, remote
from unionimg.store.layout import Store
from unionimg.store.records import RecordError
from unionimg.store.snapshot_records import SnapshotRecord

pytestmark = pytest.mark.usefixtures("root")


def tiny_vm(cli: Cli, name: str = "v1") -> None:
    from vm_fixtures import build

    cli.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
    cli.ok("instance", "create", name, "--base", "tiny", "--size", "64M", "--memory", "64")


def write_in_u(cli: Cli, vm: str, tmp: Path, files: dict[str, bytes]) -> None:
    mnt = tmp / f"mnt-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        for rel, data in files.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(data)
    finally:
        cli.ok("umount", str(mnt))


def snaps(cli: Cli, vm: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(cli.ok("snapshot", "list", vm, "--json").output)
    return rows


def chunk_files(store: Path) -> set[str]:
    root = store / "snapshots" / "chunks"
    return {p.name for p in root.glob("*/*")} if root.is_dir() else set()


def test_policy_interval_and_durations() -> None:
    assert policy.interval(0.0, 30, 600) == 30
    assert policy.interval(1.0, 30, 600) == 600
    assert policy.interval(0.5, 30, 600) == 315
    assert policy.interval(7.0, 30, 600) == 600  # clamped
    assert policy.load(2.0, 4.0, 1) == 0.5 and policy.load(2.0, 4.0, 2) == 0.25
    assert policy.load(5.0, 0.0, 1) == 0.0
    assert policy.parse_duration("30s", "--min") == 30
    assert policy.parse_duration("10m", "--max") == 600
    assert policy.parse_duration("1.5h", "--for") == 5400
    for bad in ("", "10x", "-1s", "0", "nan", "1e9"):
        with pytest.raises(UsageError):
            policy.parse_duration(bad, "--min")
    with pytest.raises(UsageError):
        policy.check_bounds(600, 30)
    made = [(1, 100.0), (2, 200.0), (3, 300.0), (4, 400.0)]
    assert policy.to_remove(made, 2, None, 400.0) == [1, 2]
    assert policy.to_remove(made, None, 150.0, 400.0) == [1, 2]
    assert policy.to_remove(made, None, 1.0, 10_000.0) == [1, 2, 3]  # never the newest
    assert policy.to_remove([], 1, None, 0.0) == []


def test_record_refuses_what_it_does_not_write() -> None:
    inst = {
        "name": "v1", "base": "tiny", "generation": 1, "mac": "52:54:00:00:00:01",
        "hypervisor": "kvm", "size": 1 << 20, "memory": 64, "vcpus": 1,
        "created": "2026-12-02T00:00:00Z",
    }  # fmt: skip
    good = {
        "vm": "v1", "id": 1, "created": "2026-12-02T00:00:00Z", "kind": "disk",
        "instance": inst, "chain": ["sha256:" + "a" * 64], "domain_type": "",
        "memory_size": 0, "memory": [], "disk_size": 1 << 20,
        "disk": [f"0:{'b' * 64}:65536"], "new_bytes": 10, "pause_ms": 0,
    }  # fmt: skip
    rec = SnapshotRecord.from_json(good)
    assert SnapshotRecord.from_json(rec.to_json()) == rec
    for key, value, says in [
        ("disk", ["0:../../etc/passwd:4"], "OFFSET:HEX:LENGTH"),
        ("disk", [f"{1 << 20}:{'b' * 64}:65536"], "past disk_size"),
        ("disk", [f"0:{'b' * 64}:65536", f"4096:{'c' * 64}:4096"], "overlaps"),
        ("disk", [f"0:{'b' * 64}:{2 << 20}"], "OFFSET:HEX:LENGTH"),
        ("memory", [f"{'b' * 64}:10"], "adds up"),
        ("chain", ["../x"], "sha256:HEX"),
        ("kind", "memory", "kind"),
        ("id", 0, "id"),
    ]:
        with pytest.raises(RecordError, match=says):
            SnapshotRecord.from_json({**good, key: value})


def test_take_list_rm_prune_gc(cli: Cli, tmp_path: Path) -> None:
    tiny_vm(cli)
    out = json.loads(cli.ok("snapshot", "take", "v1", "--json").output)
    assert out["id"] == 1 and out["kind"] == "disk" and out["new_bytes"] > 0
    first = chunk_files(cli.store)
    # nothing changed: the second snapshot adds no chunk at all
    out2 = json.loads(cli.ok("snapshot", "take", "v1", "--json").output)
    assert out2["id"] == 2 and out2["new_bytes"] == 0 and chunk_files(cli.store) == first
    # 1 MiB of new data in U: about that much is new (compressed random data: no less)
    write_in_u(cli, "v1", tmp_path, {"data/blob": os.urandom(1 << 20)})
    out3 = json.loads(cli.ok("snapshot", "take", "v1", "--json").output)
    assert (1 << 20) <= out3["new_bytes"] < 2 * (1 << 20) + (256 << 10), out3
    rows = snaps(cli, "v1")
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert [r["new_bytes"] for r in rows] == [out["new_bytes"], 0, out3["new_bytes"]]
    listing = cli.ok("snapshot", "list").output
    assert "v1\t3\t" in listing and "NEW" in listing
    # retention keeps the newest; gc by reachability frees the third's own chunks only when
    # nothing names them
    cli.ok("snapshot", "prune", "v1", "--keep", "2")
    assert [r["id"] for r in snaps(cli, "v1")] == [2, 3]
    assert chunk_files(cli.store) >= first
    cli.ok("snapshot", "rm", "v1", "3")
    assert chunk_files(cli.store) == first
    assert "no snapshot 9" in cli.fails("snapshot", "rm", "v1", "9", code=3).output
    assert "keep at least" in cli.fails("snapshot", "prune", "v1", "--keep", "0", code=2).output
    assert (
        "not a duration"
        in cli.fails("snapshot", "prune", "v1", "--older-than", "soon", code=2).output
    )
    assert "no snapshot" in cli.fails("restore", "nosuch", code=3).output
    assert (
        "--min 600 s is more than --max"
        in cli.fails("snapshot", "schedule", "v1", "--min", "10m", "--max", "30s", code=2).output
    )


def test_restore_stopped_vm_disk(cli: Cli, tmp_path: Path) -> None:
    tiny_vm(cli)
    write_in_u(cli, "v1", tmp_path, {"data/state": b"before\n"})
    cli.ok("snapshot", "take", "v1")
    write_in_u(cli, "v1", tmp_path, {"data/state": b"after\n"})
    out = json.loads(cli.ok("restore", "v1", "--json").output)
    assert out["state"] == "stopped" and out["id"] == 1
    mnt = tmp_path / "check"
    mnt.mkdir()
    cli.ok("mount", "v1", str(mnt))
    try:
        assert (mnt / "data/state").read_bytes() == b"before\n"
    finally:
        cli.ok("umount", str(mnt))


def test_missing_and_corrupt_chunks_refused(cli: Cli, tmp_path: Path) -> None:
    tiny_vm(cli)
    write_in_u(cli, "v1", tmp_path, {"data/state": b"kept\n"})
    cli.ok("snapshot", "take", "v1")
    rec = SnapshotRecord.from_json(json.loads((cli.store / "snapshots/vms/v1/1.json").read_text()))
    u = cli.store / "instances/v1/upper.img"
    before = u.read_bytes()
    digest = rec.disk_refs()[-1][1]
    chunk = cli.store / "snapshots/chunks" / digest[:2] / digest
    saved = chunk.read_bytes()
    chunk.unlink()
    res = cli.fails("restore", "v1", code=3)
    assert digest in res.output and "missing" in res.output
    assert u.read_bytes() == before  # nothing changed
    # a corrupt chunk: a valid zstd frame of other bytes under its name
    import zstandard

    chunk.write_bytes(zstandard.ZstdCompressor().compress(b"not the data" * 100))
    res = cli.fails("restore", "v1", code=70)
    assert digest in res.output and "corrupt" in res.output
    assert u.read_bytes() == before
    assert not any((cli.store / "tmp").iterdir())
    chunk.write_bytes(saved)
    cli.ok("restore", "v1")


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A store on a 200 MiB tmpfs of its own, so a test may fill its disk."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m,mode=0711", "tmpfs", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt / "store"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_take_leaves_no_half_snapshot(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = Cli(small_store)
    tiny_vm(cli)
    write_in_u(cli, "v1", tmp_path, {"data/blob": os.urandom(4 << 20)})
    cli.ok("snapshot", "take", "v1")
    write_in_u(cli, "v1", tmp_path, {"data/blob2": os.urandom(4 << 20)})
    before = chunk_files(small_store)
    filler = small_store.parent / "filler"
    for point in ("snapshot-take:memory-stored", "snapshot-take:chunks-stored"):
        monkeypatch.setenv("UNIONIMG_FILL_AT", point)
        monkeypatch.setenv("UNIONIMG_FILL_FILE", str(filler))
        res = cli("snapshot", "take", "v1")
        assert res.exit_code == 7, (point, res.output)
        assert res.output.startswith("unionimg: error: store full"), res.output
        assert [r["id"] for r in snaps(cli, "v1")] == [1]
        assert chunk_files(small_store) == before  # the chunks it added were taken back
        assert not any((small_store / "tmp").iterdir())
        filler.unlink()
    monkeypatch.delenv("UNIONIMG_FILL_AT")
    out = json.loads(cli.ok("snapshot", "take", "v1", "--json").output)
    assert out["id"] == 2 and out["new_bytes"] >= 4 << 20


def test_receive_checks_every_chunk(cli: Cli, tmp_path: Path) -> None:
    tiny_vm(cli)
    cli.ok("snapshot", "take", "v1")
    src = Store(cli.store)
    rec = SnapshotRecord.from_json(json.loads((cli.store / "snapshots/vms/v1/1.json").read_text()))
    dst = Store(tmp_path / "other")
    dst.init()

    def stream(lie: str = "") -> io.BytesIO:
        parts = []
        for i, d in enumerate(sorted(rec.digests())):
            frame = chunks.frame_of(src, d)
            if lie == "swap" and i == 0:
                frame = chunks.frame_of(src, sorted(rec.digests())[1])
            parts += [f"C {d} {len(frame)}\n".encode(), frame]
            if lie == "short" and i == 1:
                return io.BytesIO(b"".join(parts)[:-10])
        body = json.dumps(rec.to_json()).encode()
        if lie == "vm":
            body = body.replace(b'"vm": "v1"', b'"vm": "v2"')
        parts += [f"M {len(body)}\n".encode(), body]
        return io.BytesIO(b"".join(parts))

    with pytest.raises(GuestDataRefused, match="does not hash to its name"):
        remote.receive(dst, "v1", stream("swap"))
    with pytest.raises(GuestDataRefused, match="ended early"):
        remote.receive(dst, "v1", stream("short"))
    assert not (dst.root / "snapshots/vms/v1/1.json").exists()
    with pytest.raises(GuestDataRefused, match="of VM v2, not v1"):
        remote.receive(dst, "v1", stream("vm"))
    with pytest.raises(GuestDataRefused, match="unexpected header"):
        remote.receive(dst, "v1", io.BytesIO(b"X ../../etc 3\nabc"))
    got = remote.receive(dst, "v1", stream())
    assert got["id"] == 1 and (dst.root / "snapshots/vms/v1/1.json").is_file()
    assert chunks.missing(dst, rec.digests()) == []
    # asked again, the receiver lacks nothing
    assert remote.missing_here(dst, sorted(rec.digests())) == []
    with pytest.raises(UsageError):
        remote.missing_here(dst, ["../../x"])
    # restoring it there: a VM of that store with the same MAC refused; then the base it lies
    # on is not there (a base of the same name made separately is another tree): refused,
    # naming the layer to pull; nothing made
    other = Cli(dst.root)
    from vm_fixtures import build

    other.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
    other.ok("instance", "create", "w", "--base", "tiny", "--mac", rec.instance.mac)
    assert "has MAC" in other.fails("restore", "v1", code=4).output
    other.ok("instance", "remove", "w")
    res = other.fails("restore", "v1", code=3)
    assert "which this store does not have" in res.output and rec.chain[-1][:19] in res.output
    assert json.loads(other.ok("instance", "list", "--json").output) == []


DISKSTATS = (
    "  98       0 ubda 48 18 3978 49 0 0 0 0 0 50 49 0 0 0 0 0 0\n"
    "  98      16 ubdb 20 0 178 1 {w} 77 4072 68 {q} 60 71 0 0 0 0 {f} 1\n"
)


def test_uml_sync_reads_u_disk_counters() -> None:
    """U's line of the guest's /proc/diskstats: writes, in flight, flushes; a kernel without
    the flush fields, or no U line, fails the take instead of guessing."""
    from unionimg.errors import ToolFailed
    from unionimg.snapshots.capture import DiskCounters, disk_counters

    assert disk_counters(DISKSTATS.format(w=432, q=1, f=33)) == DiskCounters(1, 33)
    # data writes (a guest rewriting a file) are not what settles: not read
    assert disk_counters(DISKSTATS.format(w=9, q=1, f=33)) == DiskCounters(1, 33)
    with pytest.raises(ToolFailed):
        disk_counters("  98 16 ubdb 20 0 178 1 432 77 4072 68 0 60 71\n")
    with pytest.raises(ToolFailed):
        disk_counters(DISKSTATS.format(w=1, q=0, f=1).replace("ubdb", "ubdc"))


def test_uml_sync_waits_for_the_journal_commit() -> None:
    """'sysrq s' starts ext4's journal commit without waiting for it (a CI run once copied U
    before the commit landed): after the guest says its sync is complete, U's disk must show
    nothing in flight and no new cache flush (a commit's) for a while (several answers), or —
    on a guest that never stops committing — four completed flushes (two commits)."""
    from unionimg.snapshots.capture import QUIET_S, DiskCounters, Settle

    s = Settle(DiskCounters(0, 5), 0.0)
    assert not s.settled(DiskCounters(1, 5), 0.01)  # the commit in flight
    assert not s.settled(DiskCounters(0, 6), 0.05)  # it landed: quiet starts here
    for i in range(1, 4):  # (data writes are not read: a rewritten file keeps it quiet)
        assert not s.settled(DiskCounters(0, 6), 0.05 + i * 0.05)
    assert s.settled(DiskCounters(0, 6), 0.05 + QUIET_S)
    # quiet for long enough but with too few answers from the guest: not yet
    s = Settle(DiskCounters(0, 5), 0.0)
    assert not s.settled(DiskCounters(0, 5), 10.0)
    # a busy guest: never quiet, but four flushes completed since the sync
    s = Settle(DiskCounters(0, 5), 0.0)
    for i, f in enumerate([6, 7, 8]):
        assert not s.settled(DiskCounters(0, f), 0.01 * i)
    assert s.settled(DiskCounters(0, 9), 0.05)
    assert not s.settled(DiskCounters(2, 10), 0.06)  # but never with I/O in flight


def test_uml_sync_watches_only_new_console_bytes(tmp_path: Path) -> None:
    """The kernel's "Emergency Sync complete" counts only when printed after the take began,
    also when it straddles two reads."""
    from unionimg.snapshots.capture import SYNC_DONE, ConsoleWatch

    log = tmp_path / "console.log"
    log.write_bytes(b"boot\n" + SYNC_DONE + b"\n")  # an earlier take's
    w = ConsoleWatch(log, SYNC_DONE)
    assert not w.said()
    with log.open("ab") as f:
        f.write(b"sysrq: Emergency Sync\nEmergency Sync ")
    assert not w.said()
    with log.open("ab") as f:
        f.write(b"complete\n")
    assert w.said()
    assert not ConsoleWatch(tmp_path / "none.log", SYNC_DONE).said()
