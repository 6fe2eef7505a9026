"""Snapshots off the host: only the chunks another host lacks are sent, each checked there.

``snapshot push VM --to HOST [--at ID]`` (also ``take --to``, ``schedule --to``) runs over
the host's SSH connection (:mod:`unionimg.hosts`):

1. ``unionimg snapshot missing`` on the host reads the snapshot's chunk digests on stdin and
   prints those its store lacks;
2. ``unionimg snapshot receive VM`` on the host reads a stream on stdin (written into ssh's
   stdin by a thread, chunk by chunk: never held in memory whole): each missing chunk as it
   lies in this store (a zstd frame) behind a line ``C HEX LENGTH``, then the snapshot's
   record behind ``M LENGTH``. The receiver decompresses each frame (bounded) and
   checks its sha256 against its name before storing it; then checks the record (a valid
   SnapshotRecord for that VM, every chunk it names present) and writes it last.

A copy cut short (the host killed, the link gone) leaves the chunks that arrived, each whole
and checked, and no record: the snapshot does not exist there, and the next push sends only
what is still missing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Iterable
from typing import IO, Any

from unionimg import hosts
from unionimg.errors import Conflict, GuestDataRefused, ToolFailed, UsageError
from unionimg.names import check_name
from unionimg.runner import run
from unionimg.runner import stream as run_streaming
from unionimg.snapshots import chunks, core
from unionimg.store.layout import Store, read_record, write_record
from unionimg.store.records import RecordError
from unionimg.store.snapshot_records import MAX_CHUNK, SnapshotRecord

_HEX = re.compile(r"[0-9a-f]{64}")
#: the largest record a receiver reads (a 8 TiB U in 64 KiB chunks would be larger; such a
#: snapshot is refused rather than read without bound)
MAX_RECORD = 256 << 20


def missing_here(store: Store, digests: Iterable[str]) -> list[str]:
    wanted = []
    for d in digests:
        d = d.strip()
        if not d:
            continue
        if not _HEX.fullmatch(d):
            raise UsageError(f"'{d[:70]}' is not a chunk digest (64 hex digits)")
        wanted.append(d)
    return chunks.missing(store, wanted)


def push(store: Store, vm: str, host_name: str, snap_id: int | None = None) -> dict[str, Any]:
    """Copy snapshot ``snap_id`` (the latest) of VM to host ``host_name``: its missing chunks,
    then its record."""
    host = hosts.get(store, host_name)
    snap = core.get(store, vm, snap_id)
    digests = sorted(snap.digests())
    chunks.check_present(store, digests, f"snapshot {snap.id} of VM {vm}")
    res = run(
        host.remote_argv(["snapshot", "missing"]),
        check=False,
        input="\n".join(digests) + "\n",
        timeout=hosts.QUERY_TIMEOUT,
        what="asking which chunks it lacks",
    )
    lacking = [ln.strip() for ln in host.outcome(res, "snapshot missing").splitlines() if ln]
    unknown = set(lacking) - set(digests)
    if unknown:
        raise Conflict(f"host {host.name} asked for chunks the snapshot does not hold")
    record = json.dumps(snap.to_json(), sort_keys=True).encode()
    sent = _send(store, host, vm, lacking, record)
    return {
        "vm": vm,
        "id": snap.id,
        "host": host.name,
        "chunks": len(digests),
        "chunks_sent": len(lacking),
        "bytes_sent": sent,
    }


def _send(store: Store, host: hosts.Host, vm: str, lacking: list[str], record: bytes) -> int:
    """Stream the lacking chunks and the record into ``snapshot receive`` on ``host``: a
    thread writes them into a pipe that is ssh's stdin, one chunk at a time (a first push of
    a large guest never sits in memory whole). Returns the chunk bytes sent."""
    read_end, write_end = os.pipe()
    sent = [0]
    failed: list[OSError] = []

    def feed() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=1 << 20) as out:
                for d in lacking:
                    frame = chunks.frame_of(store, d)
                    out.write(f"C {d} {len(frame)}\n".encode())
                    out.write(frame)
                    sent[0] += len(frame)
                out.write(f"M {len(record)}\n".encode())
                out.write(record)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the other side ended: its error is the one reported
        except OSError as exc:  # a chunk of ours unreadable: the receiver sees the stream end
            failed.append(exc)

    writer = threading.Thread(target=feed, name="snapshot-push", daemon=True)
    writer.start()
    try:
        res = run_streaming(
            host.remote_argv(["snapshot", "receive", vm]), lambda _fd, _data: None, stdin=read_end
        )
    finally:
        os.close(read_end)  # a writer blocked on a dead ssh gets EPIPE and ends
        writer.join(timeout=60)
    if failed:
        raise ToolFailed(f"reading a chunk to send to host {host.name} failed: {failed[0]}")
    host.outcome(res, "snapshot receive")
    return sent[0]


def _line(stream: IO[bytes]) -> bytes:
    line = stream.readline(200)
    if line and not line.endswith(b"\n"):
        raise GuestDataRefused("snapshot stream: a header line is too long")
    return line.rstrip(b"\n")


def _exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise GuestDataRefused(
            f"snapshot stream ended early ({len(data)} of {n} bytes); nothing was recorded, "
            "push again"
        )
    return data


def receive(store: Store, vm: str, stream: IO[bytes] | None = None) -> dict[str, Any]:
    """Read chunks and a record from ``stream`` (stdin), each chunk checked before it is
    stored, the record written last (see the module docstring)."""
    check_name(vm, "instance")
    src = stream if stream is not None else sys.stdin.buffer
    received = 0
    with store.lock(core.CHUNK_LOCK, purpose=f"snapshot receive {vm}"):
        writer = chunks.Writer(store)
        while True:
            head = _line(src)
            if not head:
                raise GuestDataRefused("snapshot stream ended before its record; push again")
            parts = head.decode("ascii", "replace").split(" ")
            if parts[0] == "C" and len(parts) == 3 and _HEX.fullmatch(parts[1]):
                n = int(parts[2]) if parts[2].isdigit() else -1
                if not 0 < n <= MAX_CHUNK + 1024:
                    raise GuestDataRefused(f"snapshot stream: chunk {parts[1]} size {parts[2]}")
                frame = _exact(src, n)
                try:
                    raw = chunks.check_frame(frame, parts[1])
                except ValueError as exc:
                    raise GuestDataRefused(f"snapshot stream refused: {exc}") from None
                writer.put_frame(parts[1], frame, raw)
                received += 1
                continue
            if parts[0] == "M" and len(parts) == 2 and parts[1].isdigit():
                n = int(parts[1])
                if not 0 < n <= MAX_RECORD:
                    raise GuestDataRefused(f"snapshot stream: record size {n}")
                body = _exact(src, n)
                break
            raise GuestDataRefused(f"snapshot stream: unexpected header {head[:60]!r}")
        try:
            snap = SnapshotRecord.from_json(json.loads(body))
        except (ValueError, RecordError) as exc:
            raise GuestDataRefused(f"snapshot stream: the record is not valid: {exc}") from None
        if snap.vm != vm or snap.instance.name != vm:
            raise GuestDataRefused(f"snapshot stream: the record is of VM {snap.vm}, not {vm}")
        chunks.check_present(store, snap.digests(), f"received snapshot {snap.id} of VM {vm}")
        chunks.sync(store, f"receive snapshot {snap.id} of {vm}")
        path = core.record_path(store, vm, snap.id)
        if path.exists():
            if read_record(path, SnapshotRecord) != snap:
                raise Conflict(
                    f"VM {vm} here has another snapshot {snap.id}; remove it with 'snapshot rm "
                    f"{vm} {snap.id}' to receive this one"
                )
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_record(path, snap)
    return {"vm": vm, "id": snap.id, "chunks_received": received}
