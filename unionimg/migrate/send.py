"""The sending side of a migration: ``unionimg migrate VM --to HOST``.

1. The VM must be stopped and not mounted, with no unfinished reconcile (its instance lock is
   held throughout). Its chain (snapshot layers, then its base generation's layers) and its U
   image's tree are read: U mounted read-only, every file hashed here (U's own sidecar is
   guest data, never trusted for a hash).
2. The offer (instance record, chain, U manifest) goes to the host
   (``migrate-in offer`` over SSH, :mod:`unionimg.hosts`); the host answers what it
   lacks: chain layers, and file contents it has nowhere (not in its object cache, not in
   any base generation, not in any snapshot layer).
3. ``--dry-run`` stops here and says what would be sent and why: per reason, contents and
   bytes, and the exact compressed bytes (the stream is made and counted, not sent).
4. Otherwise a pending record (:mod:`.pending`: the host, the offer's digest, U's tree
   digest) is written durably into the VM's directory: from here on the VM does not boot
   here until this run, or a rerun, knows whether the host made it. Then one stream goes to
   ``migrate-in push``: the offer, the missing layer blobs (bottom first), the missing
   contents (each whole, as a patch-from delta on the base's version, or as chunks against
   the host's nearest version when it answered their list: :func:`write_stream` says which
   when), the end; all of it one zstd stream, flushed every :data:`FLUSH_EVERY` bytes so
   what arrived can be kept by the host; ``--bandwidth`` caps its rate. The host verifies
   and makes the VM (recording the offer's digest in it), then says so.
5. Only then the VM leaves this host: its file contents are kept in this store's object cache
   with its large files' paths (its way back sends only what changed, a large file edited
   there as the chunks this store lacks; under the cache's lock, :data:`.index.CACHE_LOCK`,
   which ``migrate gc`` takes too), then the instance is removed (its pending record with
   it).

A failure before the stream leaves the VM here untouched. A push that fails asks the host
(``migrate-in status``): if it made the VM all the same, the migration finishes; if not, the
record goes and the error stands; if it cannot be asked, the record stays. The host keeps
the contents it verified (the rerun sends only the rest). A run that finds a pending record
asks its host first: when the host holds that very VM (name, MAC, offer digest) and U's tree
here is the one sent, it only finishes (nothing sent); otherwise the record goes and the
migration runs normally.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from unionimg import hosts as hosts_mod
from unionimg.errors import Conflict, ToolFailed, UnionimgError
from unionimg.faults import checkpoint
from unionimg.layers import base as base_mod
from unionimg.layers import instance as inst_mod
from unionimg.layers import layerstore, snapshot
from unionimg.layers.running import running_on
from unionimg.migrate import cdc, delta, index, pending, plan, tree
from unionimg.migrate.wire import MAGIC, frame_head
from unionimg.runner import stream
from unionimg.store.layout import Store, now_iso
from unionimg.store.migrate_records import (
    PROTOCOL,
    ChainLayer,
    LayerTree,
    MigrateAnswer,
    MigrateDone,
    MigrateOffer,
    TreeEntry,
)
from unionimg.store.records import ReconcileJournal, RecordError

LEVEL = 9
FLUSH_EVERY = 256 << 10
# a finer look when the changed regions' chunks hold 6 times the bytes of the offer it
# sends again: on scattered 4 KiB edits it saved about a fifth of their raw bytes in the
# stream (docs/migrate.md), so below that the offer would cost more than it saves
REFINE_FACTOR = 6
MAX_ANSWER = 256 << 20  # a host's answer: chunk lists of large files (16 bytes a chunk)
SKIP_TOP = ("lost+found",)
Progress = Callable[[int, int, int], None]
"""``progress(raw_done, raw_total, wire_bytes)``."""


@dataclass
class Sent:
    """How the stream carried each content: ``totals`` per method (``whole``, ``delta``,
    ``chunks``: contents, their bytes, the frames' payload bytes before the stream's zstd)
    and ``files``, one row per content sent as a delta or as chunks, or whole and of at
    least :data:`.cdc.MIN_FILE` (``path``, ``sha256``, ``size``, ``method``, ``payload``,
    ``why``; for chunks also ``chunks``, ``chunks_sent``, ``chunk_bytes_sent``,
    ``nearest``)."""

    deltas: int = 0
    chunked: int = 0
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)

    def add(self, method: str, size: int, payload: int, row: dict[str, Any] | None) -> None:
        t = self.totals.setdefault(method, {"contents": 0, "bytes": 0, "payload": 0})
        t["contents"] += 1
        t["bytes"] += size
        t["payload"] += payload
        if row is not None:
            self.files.append({"method": method, "size": size, "payload": payload, **row})


@dataclass
class Outcome:
    instance: str
    host: str
    dry_run: bool
    summary: plan.Summary
    found: dict[str, str]
    wire_bytes: int = 0  # the compressed stream's size (sent, or counted in a dry run)
    done: MigrateDone | None = None
    seconds: float = 0.0
    kept: int = 0  # contents kept in this store's cache for the way back
    deltas: int = 0  # changed files sent as deltas on their base versions
    sent: Sent | None = None  # how each content went (whole, delta, chunks)
    stages: dict[str, float] = field(default_factory=dict)
    # the host held the VM already (an earlier run stopped after its confirmation): this
    # run only kept its contents and removed it here (or, dry, would)
    finished_earlier: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "host": self.host,
            "dry_run": self.dry_run,
            "finished_earlier": self.finished_earlier,
            "plan": self.summary.to_json(),
            "stream_bytes": self.wire_bytes,
            "receiver": self.done.to_json() if self.done else None,
            "kept_for_way_back": self.kept,
            "deltas": self.deltas,
            "chunked": self.sent.chunked if self.sent else 0,
            "methods": self.sent.totals if self.sent else {},
            "files": self.sent.files if self.sent else [],
            "seconds": round(self.seconds, 3),
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
        }


def chain_of(store: Store, inst: inst_mod.Instance) -> list[ChainLayer]:
    """The VM's chain, top to bottom: its snapshot layers, then its generation's layers."""
    top = snapshot.node(store, inst)
    out = []
    for layer in layerstore.chain(store, top.diff_id):
        m = layer.meta
        out.append(ChainLayer(m.diff_id, m.kind, m.parent, m.blob_size, m.base, m.generation))
    return out


def _check_stopped(store: Store, name: str) -> None:
    if running_on(store, name):
        raise Conflict(f"instance '{name}' is running; stop it before migrating it")
    rec = inst_mod.mount_record(store, name)
    if rec is not None:
        raise Conflict(f"instance '{name}' is mounted at {rec.target}; umount it first")
    if (store.instance_dir(name) / ReconcileJournal.FILE).is_file():
        raise Conflict(
            f"instance '{name}' has an interrupted reconcile; run 'unionimg reconcile {name}' "
            "to finish it before migrating"
        )


def offer_text(offer: MigrateOffer) -> bytes:
    return json.dumps(offer.to_json(), sort_keys=True, separators=(",", ":")).encode()


def offer_digest(offer: MigrateOffer) -> str:
    """What the stream names the offer by: the sha256 of the JSON text the host kept."""
    return hashlib.sha256(offer_text(offer)).hexdigest()


def ask(host: hosts_mod.Host, offer: MigrateOffer, hypervisor: str | None) -> MigrateAnswer:
    """The host's answer to ``offer`` (sent as zstd-compressed JSON: a manifest compresses
    tenfold)."""
    args = ["migrate-in", "offer"] + (["--hypervisor", hypervisor] if hypervisor else [])
    data = zstandard.ZstdCompressor(level=LEVEL).compress(offer_text(offer))
    out = _feed(host, args, lambda write: write(data))
    try:
        return MigrateAnswer.from_json(json.loads(out))
    except (ValueError, RecordError):
        raise ToolFailed(f"host {host.name}: 'migrate-in offer' gave no answer") from None


class _Stream:
    """The compressed stream: frames in, zstd out to ``out`` (throttled to ``rate`` bytes/s),
    counted."""

    def __init__(self, out: Callable[[bytes], None], rate: int | None, level: int) -> None:
        self.out = out
        self.rate = rate
        self.cobj = zstandard.ZstdCompressor(level=level).compressobj()
        self.wire = 0
        self.raw = 0
        self.pending = 0
        self.t0 = time.monotonic()

    def _send(self, data: bytes) -> None:
        if not data:
            return
        self.out(data)
        self.wire += len(data)
        if self.rate:
            ahead = self.wire / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)

    def put(self, data: bytes) -> None:
        self.raw += len(data)
        self.pending += len(data)
        self._send(self.cobj.compress(data))
        if self.pending >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        self.pending = 0
        self._send(self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def finish(self) -> None:
        self._send(self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))


Deltas = dict[str, tuple[str, str]]
"""A changed file's content → (its base version's content, its path in the base tree)."""


def delta_candidates(
    store: Store, inst: inst_mod.Instance, entries: tuple[TreeEntry, ...]
) -> Deltas:
    """The files of U's upper layer whose path holds another content in the VM's base
    generation, both of a size a delta takes (:mod:`.delta`)."""
    gen = base_mod.get_generation(store, inst.base, inst.generation)
    out: Deltas = {}
    with gen.manifest() as man:
        for e in entries:
            if e.kind != "file" or e.link is not None or not e.path.startswith("upper/"):
                continue
            if not delta.MIN_SIZE <= e.size <= delta.MAX_SIZE or e.sha256 is None:
                continue
            b = man.get(e.path.removeprefix("upper"))
            if b is None or b.kind != "file" or b.sha256 in (None, e.sha256):
                continue
            if delta.MIN_SIZE <= b.size <= delta.MAX_SIZE and not b.xattrs:
                out.setdefault(e.sha256, (b.sha256, b.path))
    return out


def _delta(
    u: Path, base_root: Path, e: TreeEntry, base: tuple[str, str], level: int
) -> bytes | None:
    with tree.open_file(u, e.path) as fh:
        new = fh.read(e.size + 1)
    with tree.open_file(base_root, base[1].lstrip("/")) as fh:
        old = fh.read(delta.MAX_SIZE + 1)
    if len(new) != e.size:
        raise ToolFailed(f"instance file {e.path[:80]!r} changed while it was sent; retry")
    return delta.encode(old, new, level)


def write_stream(
    st: _Stream,
    store: Store,
    offer: MigrateOffer,
    ans: MigrateAnswer,
    u: Path,
    progress: Progress,
    total: int,
    *,
    deltas: Deltas | None = None,
    base_root: Path | None = None,
    level: int = LEVEL,
    asked: MigrateOffer | None = None,
    layer_roots: dict[str, Path] | None = None,
) -> Sent:
    """The whole stream (see :mod:`unionimg.migrate.wire`); how each content went.

    A missing content goes, in this order of preference: as a patch-from delta (the sender
    holds the receiver's version: the base's at the same path, :mod:`.delta`) when it is
    no larger than its chunks would be; as chunks (:mod:`.cdc`) when the receiver answered
    a chunk list for it and at least one chunk is reused; whole otherwise."""
    st.put(MAGIC)
    # the offer the host kept is named by its digest; one changed since (layer blobs made
    # meanwhile: their sizes) travels whole
    head: dict[str, object] = (
        {"offer_digest": offer_digest(offer)} if offer is asked else offer.to_json()
    )
    st.put(frame_head(b"H", head, 0))
    st.flush()
    done = 0
    layers = 0
    for diff_id in reversed(ans.layers_missing):  # bottom first (by content: not here)
        layer = layerstore.get(store, diff_id)
        blob = layerstore.blob_path(store, layer)
        st.put(frame_head(b"L", {"diff_id": diff_id}, blob.stat().st_size))
        with open(blob, "rb") as fh:
            while chunk := fh.read(tree.CHUNK):
                st.put(chunk)
                done += len(chunk)
                progress(done, total, st.wire)
        st.flush()
        layers += 1
    missing = set(ans.hashes_missing)
    sent = 0
    out = Sent()
    roots = layer_roots or {}
    have = chunk_lists(ans, offer)
    fine = chunk_lists(ans, offer, fine=True)
    labels = dict(ans.nearest)
    trees = [(u, offer.entries, "")] + [
        (roots[lt.diff_id], lt.entries, f"{lt.diff_id[:19]}:") for lt in offer.layer_trees
    ]
    for root, entries, where in trees:
        for e in entries:  # in tree order: like files lie together in the stream
            if e.kind != "file" or e.link is not None or e.sha256 not in missing:
                continue
            missing.discard(e.sha256)
            shown = where + ("/" + e.path.removeprefix("upper/") if not where else "/" + e.path)
            row: dict[str, Any] = {"path": shown, "sha256": e.sha256}
            recipe = None
            if e.sha256 in have and e.size >= cdc.MIN_FILE:
                with tree.open_file(root, e.path) as fh:
                    recipe = cdc.plan_recipe(cdc.cut(fh), have[e.sha256])
                    if recipe.reused and e.sha256 in fine:
                        recipe = cdc.refine_recipe(
                            recipe, fine[e.sha256], functools.partial(_pread, fh)
                        )
                        row["refined"] = True
                if not recipe.reused:
                    row["why"] = (
                        f"whole: no chunk of its nearest version there "
                        f"({labels.get(e.sha256, '?')}) is in it"
                    )
                    recipe = None
            patch = None
            on = (deltas or {}).get(e.sha256) if root is u and base_root is not None else None
            if on is not None and base_root is not None:
                patch = _delta(u, base_root, e, on, level)
                if patch is not None and recipe is not None:
                    cost = _chunks_cost(root, e, recipe, level)
                    if cost < len(patch):
                        patch = None
                    else:
                        row["chunks_would_take"] = cost
            if patch is not None and on is not None:
                head = {"sha256": e.sha256, "size": e.size, "base": on[0]}
                st.put(frame_head(b"D", head, len(patch)))
                st.put(patch)
                done += e.size
                progress(done, total, st.wire)
                sent += 1
                out.deltas += 1
                row["why"] = f"delta on the base's version at {on[1]}"
                out.add("delta", e.size, len(patch), row)
                continue
            if recipe is not None:
                _put_chunks(
                    st, root, e, recipe, (have[e.sha256], fine.get(e.sha256)),
                    progress, done, total,
                )  # fmt: skip
                done += e.size
                sent += 1
                out.chunked += 1
                nearest = labels.get(e.sha256, "?")
                row.update(
                    chunks=recipe.chunks,
                    chunks_sent=recipe.sent,
                    chunk_bytes_sent=recipe.sent_bytes,
                    nearest=nearest,
                    why=f"chunks: {recipe.sent:,} of {recipe.chunks:,} sent, nearest = {nearest}",
                )
                out.add("chunks", e.size, recipe.payload, row)
                continue
            if e.size >= cdc.MIN_FILE:
                row.setdefault(
                    "why",
                    "whole: no nearest version there"
                    if e.sha256 not in have
                    else "whole: nothing reused",
                )
            out.add("whole", e.size, e.size, row if e.size >= cdc.MIN_FILE else None)
            st.put(frame_head(b"O", {"sha256": e.sha256, "size": e.size}, e.size))
            got = 0
            with tree.open_file(root, e.path) as fh:
                while got < e.size and (chunk := fh.read(min(tree.CHUNK, e.size - got))):
                    st.put(chunk)
                    got += len(chunk)
                    done += len(chunk)
                    progress(done, total, st.wire)
                    if done * 2 >= total:
                        checkpoint("migrate:half-sent")  # the tests' broken transfer
            if got != e.size:
                raise ToolFailed(f"file {e.path[:80]!r} changed while it was sent; retry")
            sent += 1
    st.put(frame_head(b"E", {"objects": sent, "layers": layers}, 0))
    st.finish()
    progress(total, total, st.wire)
    return out


def _offer_cost(offer: MigrateOffer, level: int) -> int:
    """What sending ``offer`` costs: its JSON text compressed (:func:`ask`)."""
    return len(zstandard.ZstdCompressor(level=level).compress(offer_text(offer)))


def _regions(
    u: Path, offer: MigrateOffer, ans: MigrateAnswer, layer_roots: dict[str, Path]
) -> tuple[dict[str, str], int]:
    """Content → the host's chunk regions (:func:`.cdc.regions`) its changed parts replace,
    for each large content the host answered a chunk list for (each file cut here once);
    and the bytes of the file's chunks in those regions."""
    have = chunk_lists(ans, offer)
    out: dict[str, str] = {}
    gain = 0
    trees = [(u, offer.entries)] + [(layer_roots[t.diff_id], t.entries) for t in offer.layer_trees]
    for root, entries in trees:
        for e in entries:
            sha = e.sha256
            if e.kind != "file" or e.link is not None or sha is None or sha not in have:
                continue
            if sha in out or e.size < cdc.MIN_FILE:
                continue
            with tree.open_file(root, e.path) as fh:
                ranges, size = cdc.regions_and_bytes(cdc.plan_recipe(cdc.cut(fh), have[sha]))
            if ranges:
                out[sha] = cdc.encode_regions(ranges)
                gain += size
    return out, gain


def _pread(fh: BinaryIO, off: int, length: int) -> bytes:
    return os.pread(fh.fileno(), length, off)


def chunk_lists(
    ans: MigrateAnswer, offer: MigrateOffer, *, fine: bool = False
) -> dict[str, list[bytes]]:
    """The receiver's chunk lists (:mod:`.cdc`) of the contents it lacks (``fine``: its
    fine chunks of the regions the offer asked for), checked: only for contents of the
    offer it asked for, each bounded (:func:`.cdc.list_limit`); a list that is not is left
    out (that content goes whole, or unrefined)."""
    sizes = plan.file_contents(offer.entries)
    for lt in offer.layer_trees:
        sizes.update(plan.file_contents(lt.entries))
    missing = set(ans.hashes_missing)
    out: dict[str, list[bytes]] = {}
    for sha, text in ans.fine if fine else ans.chunks:
        if sha not in missing or sha not in sizes:
            continue
        with contextlib.suppress(plan.Refused):
            out[sha] = cdc.decode_list(text, cdc.list_limit(sizes[sha]))
    return out


def _chunks_cost(root: Path, e: TreeEntry, recipe: cdc.Recipe, level: int) -> int:
    """What a recipe would cost in the stream: its pieces' heads and the new chunks
    compressed (on their own: an estimate a little above what the stream pays)."""
    z = zstandard.ZstdCompressor(level=level).compressobj()
    n = 0
    with tree.open_file(root, e.path) as fh:
        for p in recipe.pieces:
            if p[0] == "N":
                n += len(z.compress(os.pread(fh.fileno(), p[2], p[1])))
    n += len(z.flush())
    return n + recipe.payload - recipe.sent_bytes


def _put_chunks(
    st: _Stream,
    root: Path,
    e: TreeEntry,
    recipe: cdc.Recipe,
    lists: tuple[list[bytes], list[bytes] | None],
    progress: Progress,
    done: int,
    total: int,
) -> None:
    """A ``C`` frame: the recipe of ``e`` (its new chunks read again, each checked against
    the plan: a file changed meanwhile fails)."""
    assert e.sha256 is not None
    st.put(frame_head(b"C", {"sha256": e.sha256, "size": e.size}, recipe.payload))
    with tree.open_file(root, e.path) as fh:

        def read_at(off: int, length: int) -> bytes:
            return os.pread(fh.fileno(), length, off)

        made = 0
        for piece in cdc.pieces(recipe, lists[0], read_at, lists[1]):
            st.put(piece)
            made += len(piece)
            progress(done + made * e.size // max(recipe.payload, 1), total, st.wire)
            if (done + made * e.size // max(recipe.payload, 1)) * 2 >= total:
                checkpoint("migrate:half-sent")


def _feed(
    host: hosts_mod.Host, args: list[str], produce: Callable[[Callable[[bytes], None]], None]
) -> bytes:
    """Run ``unionimg ARGS`` on the host with what ``produce`` writes on its stdin (a pipe,
    written by a thread while the host reads); its stdout, or its error as ours."""
    rfd, wfd = os.pipe()
    failure: list[BaseException] = []

    def write_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(wfd, view)
            view = view[n:]

    def writer() -> None:
        try:
            produce(write_all)
        except BrokenPipeError:
            pass  # the host stopped reading: its error line says why
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(wfd)

    out = bytearray()

    def sink(fd: int, data: bytes) -> None:
        if fd == 1 and len(out) < MAX_ANSWER:
            out.extend(data)

    thread = threading.Thread(target=writer, name="migrate-writer", daemon=True)
    thread.start()
    try:
        res = stream(host.remote_argv(args), sink, stdin=rfd)
    finally:
        os.close(rfd)  # a writer blocked on a full pipe gets EPIPE now
        thread.join(timeout=60)
    if failure:
        raise failure[0]
    if res.returncode != 0:
        raise host.error(res, " ".join(args[:2]))
    return bytes(out)


def _push(
    host: hosts_mod.Host,
    produce: Callable[[_Stream], Sent],
    *,
    rate: int | None,
    level: int,
    hypervisor: str | None,
) -> tuple[MigrateDone, int, Sent]:
    wired = [0]
    sent: list[Sent] = []

    def feed(write: Callable[[bytes], None]) -> None:
        st = _Stream(write, rate, level)
        sent.append(produce(st))
        wired[0] = st.wire

    args = ["migrate-in", "push", "--json"]
    if hypervisor:
        args += ["--hypervisor", hypervisor]
    out = _feed(host, args, feed)
    try:
        return MigrateDone.from_json(json.loads(out)), wired[0], sent[0] if sent else Sent()
    except (ValueError, RecordError):
        raise ToolFailed(f"host {host.name}: 'migrate-in push' gave no result") from None


def _keep_for_way_back(store: Store, name: str, u: Path, entries: tuple[TreeEntry, ...]) -> int:
    """Keep U's file contents in this store's object cache (those there already are marked
    used), under the cache's lock (a ``migrate gc`` meanwhile waits), and the guest paths of
    its large files (:func:`.index.keep_left`: the nearest versions its way back chunks);
    the number added."""
    kept = 0
    large: dict[str, str] = {}
    with store.lock(index.CACHE_LOCK, purpose="migrate: keeping contents for the way back"):
        for e in entries:
            if e.kind == "file" and e.link is None and e.sha256:
                with tree.open_file(u, e.path) as fh:
                    kept += index.keep_file(store, fh, e.sha256, e.size)
                if e.size >= cdc.MIN_FILE and e.path.startswith("upper/"):
                    large["/" + e.path.removeprefix("upper/")] = e.sha256
        index.keep_left(store, name, large)
    return kept


def ask_status(host: hosts_mod.Host, name: str, mac: str, digest: str) -> pending.Status:
    """Whether the host holds instance ``name`` with ``mac`` made from the offer ``digest``
    (``migrate-in status``)."""
    out = host.run(["migrate-in", "status", name, mac, digest], what="migrate-in status")
    try:
        return pending.Status.from_json(json.loads(out))
    except (ValueError, RecordError):
        raise ToolFailed(f"host {host.name}: 'migrate-in status' gave no answer") from None


def _earlier(
    store: Store, inst: inst_mod.Instance, host: hosts_mod.Host, dry_run: bool
) -> Outcome | None:
    """A migration of this VM that stopped after its stream (its :class:`.pending.Pending`
    record is here): when its host holds the VM, finish it (keep U's contents for the way
    back; the caller removes the VM) and say so; otherwise drop the record (not in a dry
    run) and return None: the migration runs normally."""
    name = inst.name
    earlier = pending.read(store, name)
    if earlier is None:
        return None
    try:
        there = hosts_mod.get(store, earlier.host)
    except UnionimgError:
        raise Conflict(
            f"instance {name} was being migrated to host {earlier.host}, which is not "
            f"recorded here any more, so whether it holds {name} is unknown: add it again "
            f"('unionimg host add') and run 'unionimg migrate {name} --to {earlier.host}'"
        ) from None
    st = ask_status(there, name, earlier.mac, earlier.offer_digest)
    if not st.holds:
        if not dry_run:
            pending.clear(store, name)
        return None
    if there.name != host.name:
        raise Conflict(
            f"instance {name} is on host {there.name} already (an earlier 'migrate' stopped "
            f"before removing it here); run 'unionimg migrate {name} --to {there.name}' to "
            "finish that one"
        )
    if dry_run:
        out = Outcome(name, host.name, True, plan.Summary(), {})
        out.finished_earlier = True
        return out
    stages: dict[str, float] = {}
    t = time.monotonic()
    with inst_mod.u_layer(store, name, write=False) as u:
        entries = tuple(tree.scan(u, skip_top=SKIP_TOP, max_bytes=inst.size))
        stages["scan"] = time.monotonic() - t
        if pending.tree_digest(entries) != earlier.u_digest:
            raise Conflict(
                f"instance {name} changed here (mounted or reconciled) after host {host.name} "
                f"made it from its earlier state; nothing was removed: keep one of the two "
                f"('unionimg instance remove {name}' here, or there and migrate again)"
            )
        t = time.monotonic()
        kept = _keep_for_way_back(store, name, u, entries)
        stages["keep"] = time.monotonic() - t
    there_all = {sha: f"vm {name}" for sha in plan.file_contents(entries)}
    out = Outcome(name, host.name, False, plan.summary(entries, there_all, {}, (), ()), there_all)
    out.kept = kept
    out.stages = stages
    out.finished_earlier = True
    return out


def _after_failed_push(
    store: Store, inst: inst_mod.Instance, host: hosts_mod.Host, digest: str, exc: UnionimgError
) -> None:
    """The push failed after the pending record was written: ask the host whether it made
    the VM all the same (the link may have broken after its final rename). Returns when it
    did (the caller finishes); re-raises ``exc`` when it did not (the record dropped: the VM
    boots here again); when the host cannot be asked, the record stays (the VM does not
    boot here) and the error says to run the migration again."""
    try:
        st = ask_status(host, inst.name, inst.mac, digest)
    except UnionimgError:
        raise type(exc)(
            f"{exc.message}; whether host {host.name} made instance {inst.name} is unknown "
            f"(asking it failed too): run 'unionimg migrate {inst.name} --to {host.name}' "
            f"again to find out ({inst.name} does not boot here until then)"
        ) from None
    if not st.holds:
        pending.clear(store, inst.name)
        raise exc


def migrate(
    store: Store,
    name: str,
    host_name: str,
    *,
    rate: int | None = None,
    dry_run: bool = False,
    hypervisor: str | None = None,
    level: int = LEVEL,
    progress: Progress | None = None,
    whole_layers: bool = False,
) -> Outcome:
    """Migrate instance ``name`` to host ``host_name`` (see the module docstring);
    ``whole_layers``: chain layers the host lacks travel as their blobs, not by content."""
    start = time.monotonic()
    host = hosts_mod.get(store, host_name)
    inst = inst_mod.load(store, name)
    with store.lock(f"instance-{name}", wait=False, purpose=f"migrate {name}"):
        _check_stopped(store, name)
        out = _earlier(store, inst, host, dry_run)
        if out is None:
            out = _migrate(
                store, inst, host, rate=rate, dry_run=dry_run, hypervisor=hypervisor,
                level=level, progress=progress, whole_layers=whole_layers,
            )  # fmt: skip
    if not out.dry_run:
        # the host has the VM, verified: now it leaves this host (its pending record with it)
        from unionimg import ops  # deferred: ops pulls in the boot layer

        try:
            ops.remove_instance(store, name)
        except UnionimgError as exc:
            raise Conflict(
                f"instance {name} was made on host {host.name}, but removing it here failed "
                f"({exc.message}); run 'unionimg migrate {name} --to {host.name}' again to "
                "finish"
            ) from None
    out.seconds = time.monotonic() - start
    return out


def _migrate(
    store: Store,
    inst: inst_mod.Instance,
    host: hosts_mod.Host,
    *,
    rate: int | None,
    dry_run: bool,
    hypervisor: str | None,
    level: int,
    progress: Progress | None,
    whole_layers: bool,
) -> Outcome:
    """The migration proper, under the instance's lock (see :func:`migrate`): the VM made
    on the host and its contents kept here, or (``dry_run``) what would be sent."""
    name = inst.name
    note: Progress = progress or (lambda _d, _t, _w: None)
    stages: dict[str, float] = {}
    chain = chain_of(store, inst)
    with (
        inst_mod.u_layer(store, name, write=False) as u,
        contextlib.ExitStack() as mounts,
    ):
        t = time.monotonic()
        entries = tuple(tree.scan(u, skip_top=SKIP_TOP, max_bytes=inst.size))
        stages["scan"] = time.monotonic() - t
        cands = delta_candidates(store, inst, entries)
        offer = MigrateOffer(
            PROTOCOL, inst, tuple(chain), entries, sender=str(store.root),
            bases=tuple(sorted({b for b, _p in cands.values()})),
        )  # fmt: skip
        t = time.monotonic()
        ans = ask(host, offer, hypervisor)
        asked = offer
        stages["offer"] = time.monotonic() - t
        layer_roots: dict[str, Path] = {}
        if ans.layers_missing and not whole_layers:
            # the layers the host lacks, offered by content: it finds what it can in
            # its own bases, layers and VMs, remakes each layer and checks its diff_id
            t = time.monotonic()
            stage = mounts.enter_context(store.staging("migrate-layers"))
            trees = []
            for i, diff_id in enumerate(ans.layers_missing):
                layer = layerstore.get(store, diff_id)
                root = mounts.enter_context(layerstore.mounted(store, layer, stage / f"l{i}"))
                layer_roots[diff_id] = root
                trees.append(LayerTree(diff_id, tree.root_entry(root), tuple(tree.scan(root))))
            offer = offer.replace(layer_trees=tuple(trees))
            stages["scan_layers"] = time.monotonic() - t
            ans = ask(host, offer, hypervisor)
            asked = offer
        regions, gain = _regions(u, offer, ans, layer_roots)
        if regions and gain > REFINE_FACTOR * _offer_cost(offer, level=LEVEL):
            # changed regions of large files: the host cuts its chunks there finer (worth
            # the offer sent again when their chunks are several times its size)
            t = time.monotonic()
            offer = offer.replace(refine=tuple(sorted(regions.items())))
            ans = ask(host, offer, hypervisor)
            asked = offer
            stages["refine"] = time.monotonic() - t
        found = dict(ans.found)
        if ans.layers_missing:  # their blobs made where not kept: the stream's offer
            for diff_id in ans.layers_missing:  # says their real sizes
                layerstore.blob_path(store, layerstore.get(store, diff_id))
            chain = chain_of(store, inst)
            offer = offer.replace(chain=tuple(chain))
        sizes = plan.file_contents(entries)
        for lt in offer.layer_trees:
            sizes.update(plan.file_contents(lt.entries))
        layer_sizes = {c.diff_id: c.blob_size for c in chain}
        total = sum(sizes.get(s, 0) for s in ans.hashes_missing) + sum(
            layer_sizes.get(d, 0) for d in ans.layers_missing
        )
        missing = set(ans.hashes_missing)
        usable = {n: bp for n, bp in cands.items() if n in missing and bp[0] in found}
        summ = plan.summary(
            entries, found, {}, chain, ans.layers_missing,
            layer_entries=[e for lt in offer.layer_trees for e in lt.entries],
        )  # fmt: skip
        stack = contextlib.ExitStack()
        with stack:
            base_root = None
            if usable:  # the base generation's tree: the deltas' older versions
                stage = stack.enter_context(store.staging("migrate-base"))
                gen = base_mod.get_generation(store, inst.base, inst.generation)
                base_root = stack.enter_context(base_mod.generation_tree(store, gen, stage / "gen"))

            def produce(st: _Stream, note: Progress = note) -> Sent:
                return write_stream(
                    st, store, offer, ans, u, note, total, deltas=usable,
                    base_root=base_root, level=level, asked=asked,
                    layer_roots=layer_roots,
                )  # fmt: skip

            t = time.monotonic()
            if dry_run:
                counter = _Stream(lambda _data: None, None, level)
                how = produce(counter, lambda *_a: None)
                stages["compress"] = time.monotonic() - t
                out = Outcome(name, host.name, True, summ, found, counter.wire)
                out.deltas = how.deltas
                out.sent = how
                out.stages = stages
                return out
            # from here the host may make the VM: until this run (or a rerun) knows whether
            # it did, the VM does not boot here (written durably, before the first byte)
            digest = offer_digest(offer)
            pending.write(store, name, pending.Pending(
                host=host.name, offer_digest=digest, mac=inst.mac,
                u_digest=pending.tree_digest(entries), started=now_iso(),
            ))  # fmt: skip
            done: MigrateDone | None = None
            wire = 0
            how = Sent()
            try:
                done, wire, how = _push(
                    host, produce, rate=rate, level=level, hypervisor=hypervisor
                )
                if done.instance != name or done.mac != inst.mac:
                    raise ToolFailed(
                        f"host {host.name} made {done.instance[:64]!r} ({done.mac[:20]}), "
                        f"not {name} ({inst.mac}); the VM stays here"
                    )
            except UnionimgError as exc:
                _after_failed_push(store, inst, host, digest, exc)
                done = None  # made all the same: the link broke after the host's rename
            stages["push"] = time.monotonic() - t
        checkpoint("migrate:confirmed")  # the tests' stop between confirmation and removal
        t = time.monotonic()
        kept = _keep_for_way_back(store, name, u, entries)
        stages["keep"] = time.monotonic() - t
    out = Outcome(name, host.name, False, summ, found, wire, done)
    out.kept = kept
    out.deltas = how.deltas
    out.sent = how
    out.stages = stages
    return out
