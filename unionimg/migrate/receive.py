"""The receiving side of a migration (``unionimg migrate-in offer|push|status``, run over SSH
by the sender's ``migrate``).

``offer`` (the offer as JSON on stdin): checks the offer (:mod:`.plan`), that no VM of that
name or MAC is here, that the VM's base generation is here with the very same tree (or that
this host can make it: generation 1 of a base it lacks, from its layer), and answers which
chain layers and file contents it lacks (:mod:`.index`: found nowhere here), and for each
large one it lacks but holds a nearest version of, that version's chunk digests
(:mod:`.cdc`, :func:`nearest_versions`).

``push`` (a framed zstd stream on stdin, :mod:`.wire`): checks the offer again, then takes
each frame as it comes: a layer blob (one of those it lacks, bottom first) is imported into
the layer cache (its diff_id checked by :func:`unionimg.layers.layerstore.import_blob`); a
file content (one it lacks, with its announced size) is hashed and kept in the object cache
only when it matches; a delta or a chunked content is rebuilt with bounds, then the same. A
link that breaks inside a large content keeps what arrived of it as its partial arrival
(the rerun's nearest version). After the end frame (and nothing after it), the U tree is made in a
staging directory from the cache and the store's own contents (each hashed as copied),
scanned and compared with the offer's manifest entry by entry, made into the U image
(``mke2fs -d``), and the instance recorded with the sender's MAC, U size and resources and
the digest of the offer it was made from (:class:`.pending.Arrival`): the instance directory
appears whole by one rename, or not at all. A refusal is one line; what arrived and was
verified stays in the cache (a rerun does not need it again); nothing else is left. A receive
first removes the temporary files of writers killed mid-content
(:func:`.index.sweep_temporaries`). A receive holds the object cache's lock
(:data:`.index.CACHE_LOCK`) throughout, so ``migrate gc`` never removes what it uses; an offer
is kept (``migrate/offers/``) until its stream made the VM (or a day), and the gc keeps every
content a kept offer names.

``status NAME MAC DIGEST`` (:func:`.pending.status`): whether this host holds that very VM
(name, MAC, made from that offer): what a sender stopped after its stream asks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from unionimg.errors import Conflict, NotFound, UsageError
from unionimg.fs.image import make_ext4
from unionimg.fs.space import require_space
from unionimg.layers import base as base_mod
from unionimg.layers import instance as inst_mod
from unionimg.layers import layerstore
from unionimg.layers.layerstore import Origin
from unionimg.migrate import cdc, delta, index, pending, plan, tree
from unionimg.migrate.wire import Reader, StreamEnded, StreamRefused
from unionimg.names import check_hypervisor, check_name, parse_mac
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.migrate_records import (
    PROTOCOL,
    ChainLayer,
    MigrateAnswer,
    MigrateDone,
    MigrateOffer,
)
from unionimg.store.records import Instance, RecordError

LOCK = index.CACHE_LOCK  # the object cache's: a gc waits for the receive to end
_SHA_RE = re.compile(r"[0-9a-f]{64}")
TOP_NAMES = frozenset({"upper", "work", ".hg", ".hgignore", ".unionimg", "upper.prev"})
MAX_OFFER = 256 << 20
LAYER_MAX = 1 << 40
OFFER_KEPT = 86400.0


def parse_offer(data: object) -> MigrateOffer:
    try:
        offer = MigrateOffer.from_json(data)
    except RecordError as exc:
        raise plan.Refused(f"migration refused: the offer is ill-formed ({exc})") from None
    if offer.protocol != PROTOCOL:
        raise UsageError(
            f"the sender speaks migration protocol {offer.protocol}, this host {PROTOCOL}: "
            "run the same unionimg version on both"
        )
    return offer


def _check_instance(store: Store, inst: Instance, hypervisor: str | None) -> Instance:
    check_name(inst.name, "instance")
    check_name(inst.base, "base")
    mac = parse_mac(inst.mac, of=f" for instance {inst.name}")
    hv = check_hypervisor(hypervisor or inst.hypervisor)
    if not inst_mod.MIN_U_SIZE <= inst.size <= 1 << 44:
        raise plan.Refused(f"migration refused: U size {inst.size} of {inst.name} out of range")
    if store.instance_dir(inst.name).exists():
        raise Conflict(
            f"instance '{inst.name}' already exists on this host; nothing was made: remove or "
            "rename it here, or migrate elsewhere"
        )
    for other in inst_mod.list_instances(store):
        if other.mac == mac:
            raise Conflict(
                f"MAC {mac} of instance {inst.name} is used by instance {other.name} on this "
                "host; nothing was made"
            )
    return inst.replace(mac=mac, hypervisor=hv, created=now_iso())


def _generation_layer(chain: list[ChainLayer]) -> tuple[int, ChainLayer]:
    """(index in the chain, layer) of the VM's base generation: the first non-snapshot."""
    for i, layer in enumerate(chain):
        if layer.kind != "snapshot":
            if any(la.kind != "snapshot" for la in chain[:i]):
                break
            return i, layer
    raise plan.Refused("migration refused: the VM's chain holds no base generation layer")


def _gens_to_make(store: Store, offer: MigrateOffer, chain: list[ChainLayer]) -> list[ChainLayer]:
    """The generation layers of the VM's chain this host must make generations from
    (bottom first: a base layer, then deltas over it), made only where it lacks that
    generation; a generation of the same base and number holding another tree is a
    Conflict (the VM would boot on the wrong base)."""
    inst = offer.instance
    start, _ = _generation_layer(chain)
    gens = chain[start:]  # the VM's generation, then the ones it lies on
    if gens[0].generation != inst.generation:
        raise plan.Refused("migration refused: the chain's generation is not the VM's")
    make: list[ChainLayer] = []
    for layer in gens:
        if layer.base != inst.base or layer.generation is None or layer.kind == "snapshot":
            raise plan.Refused(
                f"migration refused: chain layer {layer.diff_id[:19]} is no generation of "
                f"base {inst.base}"
            )
        try:
            gen = base_mod.get_generation(store, inst.base, layer.generation)
        except NotFound:
            make.append(layer)
            continue
        if base_mod.generation_layer(store, gen).diff_id != layer.diff_id:
            raise Conflict(
                f"base {inst.base} generation {layer.generation} of this host holds another "
                f"tree than instance {inst.name}'s ({layer.diff_id[:19]}); nothing was made: "
                "rename the host's base or migrate elsewhere"
            )
        break  # this generation is here, so are the ones below it
    else:
        if make and make[-1].kind != "base":
            raise plan.Refused("migration refused: the chain's bottom is no whole base layer")
    return list(reversed(make))


def _make_generations(store: Store, offer: MigrateOffer, make: list[ChainLayer]) -> None:
    """Make the generations ``make`` names (bottom first) from their layers, received or
    held: :func:`unionimg.layers.base.generation_from_layer` (what a deploy does)."""
    for layer in make:
        assert layer.generation is not None
        parent = None
        if layer.kind == "delta":
            below = next(c for c in offer.chain if c.diff_id == layer.parent)
            assert below.generation is not None
            parent = base_mod.get_generation(store, offer.instance.base, below.generation)
        base_mod.generation_from_layer(
            store,
            offer.instance.base,
            layer.generation,
            layerstore.get(store, layer.diff_id),
            parent=parent,
        )


def answer(
    store: Store, offer: MigrateOffer, hypervisor: str | None = None, *, with_chunks: bool = True
) -> MigrateAnswer:
    """What this store lacks of ``offer`` (see the module docstring); checks first. With
    ``with_chunks``, the chunk lists of the nearest versions of the large contents it lacks
    (:func:`nearest_versions`)."""
    inst = _check_instance(store, offer.instance, hypervisor)
    chain = plan.check_chain(offer.chain)
    if tuple(c.diff_id for c in chain if c.kind == "snapshot") != inst.layers:
        raise plan.Refused("migration refused: the chain's snapshot layers are not the VM's")
    plan.check_entries(offer.entries, inst.size)
    _check_top(offer)
    make = {c.diff_id for c in _gens_to_make(store, offer, chain)}
    needed = [
        c.diff_id
        for c in chain
        if (c.kind == "snapshot" or c.diff_id in make) and not layerstore.has(store, c.diff_id)
    ]
    by_content = _check_layer_trees(offer, needed)
    missing_layers = [d for d in needed if d not in by_content]
    wanted = set(plan.file_contents(offer.entries))
    for lt in offer.layer_trees:
        wanted |= set(plan.file_contents(lt.entries))
    places = index.locate(store, wanted | _bases(offer))
    missing = tuple(sorted(wanted - places.keys()))
    chunks: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    fine: tuple[tuple[str, str], ...] = ()
    if with_chunks:
        with nearest_versions(store, offer, missing) as near:
            chunks = tuple((sha, cdc.encode_list(h)) for sha, h in sorted(near.have.items()))
            labels = tuple(sorted(near.labels.items()))
            fine = tuple((sha, cdc.encode_list(f)) for sha, f in sorted(near.fine.items()))
    return MigrateAnswer(
        layers_missing=tuple(missing_layers),
        hashes_missing=missing,
        found=tuple(sorted((sha, p.label) for sha, p in places.items())),
        base=inst.base,
        generation=inst.generation,
        install_base=bool(make),
        chunks=chunks,
        nearest=labels,
        fine=fine,
    )


def nearest_versions(store: Store, offer: MigrateOffer, missing: tuple[str, ...]) -> index.Nearest:
    """The nearest versions here of the offer's large contents (at least
    :data:`.cdc.MIN_FILE`) this store lacks, by their guest paths in the offer
    (:func:`.index.nearest`), ready to be chunked (enter the result), with the regions the
    offer asks to see finer (``refine``)."""
    layer_entries = [e for lt in offer.layer_trees for e in lt.entries]
    sizes = plan.file_contents([*offer.entries, *layer_entries])
    paths = plan.guest_paths(offer.entries, layer_entries)
    large = {sha: paths.get(sha, set()) for sha in missing if sizes.get(sha, 0) >= cdc.MIN_FILE}
    inst = offer.instance
    seeds = index.nearest(store, inst.name, inst.base, inst.generation, large)
    return index.Nearest(store, seeds, sizes, {s: r for s, r in offer.refine if s in large})


def _fill(w: index.ObjectWriter, reader: Reader, feed: Callable[[bytes], None]) -> None:
    """The frame's payload into ``feed`` (writing ``w``); a link that breaks meanwhile keeps
    what arrived as the content's partial arrival (a rerun's nearest version), any other
    failure drops it."""
    try:
        for chunk in reader.payload():
            feed(chunk)
    except (StreamEnded, zstandard.ZstdError):
        w.keep_partial()
        raise
    except BaseException:
        w.abort()
        raise


def _check_layer_trees(offer: MigrateOffer, needed: list[str]) -> set[str]:
    """The layers offered by content: each one this host needs, once, its tree checked like
    U's (but any top names: a base's whole tree) and its root a plain directory."""
    out: set[str] = set()
    for lt in offer.layer_trees:
        if lt.diff_id not in needed or lt.diff_id in out:
            raise plan.Refused(
                f"migration refused: layer {lt.diff_id[:19]!r} offered by content is not one "
                "this host needs (or offered twice)"
            )
        r = lt.root
        if (r.path, r.kind) != (".", "dir"):
            raise plan.Refused(f"migration refused: layer {lt.diff_id[:19]}'s root is ill-formed")
        plan.check_entries([r.replace(path="root")], LAYER_MAX)  # mode, xattrs...
        plan.check_entries(lt.entries, LAYER_MAX)
        out.add(lt.diff_id)
    return out


def _remake_layers(store: Store, offer: MigrateOffer, inst: Instance) -> int:
    """Remake the layers offered by content, bottom first: the tree built in staging from
    this store's contents (each hashed as copied), its diff_id computed and compared with
    the chain's before the layer is made (``layerstore.put_tree``); the number made."""
    trees = {lt.diff_id: lt for lt in offer.layer_trees}
    made = 0
    for c in reversed(offer.chain):
        lt = trees.get(c.diff_id)
        if lt is None:
            continue
        entries = list(lt.entries)
        total = sum(e.size for e in entries if e.kind == "file" and e.link is None)
        require_space(store.root, 3 * total + (64 << 20), f"remake layer {c.diff_id[:19]}")
        places = index.locate(store, set(plan.file_contents(entries)))
        with store.staging("migrate-layer") as stage:
            root = stage / "tree"
            root.mkdir(mode=0o700)
            with index.Sources(store, places) as src:
                tree.build(root, entries, src.read)
            tree.set_root(root, lt.root)
            got = layerstore.tree_digest(root, kind=c.kind).diff_id
            if got != c.diff_id:
                raise plan.Refused(
                    f"migration refused: layer {c.diff_id[:19]} remade from its contents gives "
                    f"{got[:19]}; nothing was made (migrate with --whole-layers)"
                )
            layerstore.put_tree(
                store,
                root,
                parent=c.parent,
                kind=c.kind,
                origin=Origin(
                    text=f"migrated with instance {inst.name}",
                    base=c.base,
                    generation=c.generation,
                    instance=inst.name if c.kind == "snapshot" else None,
                ),
            )
        made += 1
    return made


def _bases(offer: MigrateOffer) -> set[str]:
    """The delta bases the offer names: sha256s, at most one per entry."""
    if len(offer.bases) > len(offer.entries) or not all(_SHA_RE.fullmatch(b) for b in offer.bases):
        raise plan.Refused("migration refused: the offer's delta bases are ill-formed")
    return set(offer.bases)


def _check_top(offer: MigrateOffer) -> None:
    for e in offer.entries:
        top = e.path.split("/", 1)[0]
        if top not in TOP_NAMES:
            raise plan.Refused(
                f"migration refused: U entry {e.path[:80]!r} is not part of a U image "
                f"(its top holds only {', '.join(sorted(TOP_NAMES))}); nothing was made"
            )
    if not any(e.path == "upper" and e.kind == "dir" for e in offer.entries):
        raise plan.Refused("migration refused: the U tree has no upper/ directory")


def receive(store: Store, raw: BinaryIO, hypervisor: str | None = None) -> MigrateDone:
    """Take a migration stream from ``raw`` and make the VM (see the module docstring)."""
    reader = Reader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    try:
        return _receive(store, reader, raw, hypervisor)
    except zstandard.ZstdError as exc:
        if reader.at_end:
            raise StreamRefused(
                "migration refused: data after the end of the stream; nothing was made"
            ) from None
        raise StreamRefused(
            f"migration refused: the stream is not valid zstd ({exc}); what arrived before "
            "and was verified is kept"
        ) from None


def _receive(store: Store, reader: Reader, raw: BinaryIO, hypervisor: str | None) -> MigrateDone:
    start = time.monotonic()
    reader.start()
    kind, header = reader.next({b"H": 0})
    if kind != b"H":
        raise StreamRefused("migration refused: the stream does not start with the offer")
    digest = header.get("offer_digest")
    offer = stored_offer(store, str(digest)) if digest is not None else parse_offer(header)
    # what the instance records it was made from (the sender's pending record names it)
    made_from = str(digest) if digest is not None else _text_digest(header)
    with (
        store.lock(LOCK, wait=False, purpose=f"migrate-in {offer.instance.name}"),
        contextlib.ExitStack() as stack,
    ):
        index.sweep_temporaries(store)  # a killed receiver's partial contents
        ans = answer(store, offer, hypervisor, with_chunks=False)
        inst = _check_instance(store, offer.instance, hypervisor)
        chain = {c.diff_id: c for c in offer.chain}
        sizes = plan.file_contents(offer.entries)
        for lt in offer.layer_trees:
            sizes.update(plan.file_contents(lt.entries))
        want_objects = set(ans.hashes_missing)
        want_layers = list(ans.layers_missing)
        objects = layers = 0
        got_bytes = 0
        seen: set[str] = set()
        max_blob = max([c.blob_size for c in offer.chain] + [0])
        max_obj = max([*sizes.values(), 0])
        bases = _bases(offer)
        sources: index.Sources | None = None
        max_delta = min(max_obj, delta.MAX_SIZE) * 9 // 8 + (64 << 10)
        near = stack.enter_context(nearest_versions(store, offer, ans.hashes_missing))
        limits = {
            b"L": max_blob,
            b"O": max_obj,
            b"D": max_delta,
            b"C": cdc.max_payload(max_obj),
            b"E": 0,
        }
        while True:
            kind, header = reader.next(limits)
            if kind == b"E":
                if header.get("objects") != objects or header.get("layers") != layers:
                    raise StreamRefused(
                        "migration refused: the end frame does not count what arrived"
                    )
                reader.end()
                if raw.read(1):
                    raise StreamRefused("migration refused: data after the end of the stream")
                break
            if kind == b"O":
                sha = str(header.get("sha256", ""))
                if sha not in sizes or header.get("size") != sizes[sha] or sha in seen:
                    raise StreamRefused(
                        f"migration refused: content {sha[:16]!r} is not in the offer (or not "
                        "with that size, or twice); nothing was made"
                    )
                seen.add(sha)
                if reader.left != sizes[sha]:
                    raise StreamRefused(f"migration refused: content {sha[:16]} has a wrong size")
                if sha not in want_objects and index.has_object(store, sha):
                    for _chunk in reader.payload():  # kept meanwhile (an earlier run's end)
                        pass
                else:
                    w = index.ObjectWriter(store, sha, sizes[sha])
                    _fill(w, reader, w.write)
                    w.done()
                    index.drop_partial(store, sha)
                want_objects.discard(sha)
                objects += 1
                got_bytes += sizes[sha]
            elif kind == b"C":
                sha = str(header.get("sha256", ""))
                size = sizes.get(sha, -1)
                if header.get("size") != size or sha in seen or sha not in near.have:
                    raise StreamRefused(
                        f"migration refused: chunked content {sha[:16]!r} is not in the offer "
                        "(or not with that size, or twice, or this host answered no chunks "
                        "for it); nothing was made"
                    )
                if reader.left > cdc.max_payload(size):
                    raise StreamRefused(
                        f"migration refused: chunked content {sha[:16]}: a recipe of "
                        f"{reader.left} bytes for {size} bytes"
                    )
                seen.add(sha)
                if sha in want_objects or not index.has_object(store, sha):
                    w = index.ObjectWriter(store, sha, size)
                    have = near.have[sha]
                    rb = cdc.Rebuild(
                        have,
                        size,
                        functools.partial(near.read, sha),
                        w.write,
                        sha,
                        near.fine.get(sha),
                        functools.partial(near.read_fine, sha),
                    )
                    _fill(w, reader, rb.feed)
                    try:
                        rb.finish()
                    except BaseException:
                        w.abort()
                        raise
                    w.done()
                    index.drop_partial(store, sha)
                else:
                    for _chunk in reader.payload():  # kept meanwhile
                        pass
                want_objects.discard(sha)
                objects += 1
                got_bytes += size
            elif kind == b"D":
                sha, base = str(header.get("sha256", "")), str(header.get("base", ""))
                size = sizes.get(sha, -1)
                if header.get("size") != size or sha in seen or base not in bases:
                    raise StreamRefused(
                        f"migration refused: delta {sha[:16]!r} is not in the offer (or not "
                        "with that size or base, or twice); nothing was made"
                    )
                if size > delta.MAX_SIZE:
                    raise StreamRefused(f"migration refused: delta {sha[:16]} is too large")
                seen.add(sha)
                payload = b"".join(reader.payload())
                if sha in want_objects or not index.has_object(store, sha):
                    if sources is None:
                        places = index.locate(store, bases)
                        sources = stack.enter_context(index.Sources(store, places))
                    if base not in sources.places:
                        raise StreamRefused(
                            f"migration refused: delta base {base[:16]} is not here; nothing "
                            "was made"
                        )
                    old = bytearray()
                    for chunk in sources.read(base):
                        old += chunk
                        if len(old) > delta.MAX_SIZE:
                            raise StreamRefused("migration refused: a delta base is too large")
                    data = delta.decode(bytes(old), base, payload, size, sha)
                    w = index.ObjectWriter(store, sha, size)
                    w.write(data)
                    w.done()
                want_objects.discard(sha)
                objects += 1
                got_bytes += size
            elif kind == b"L":
                diff_id = str(header.get("diff_id", ""))
                if diff_id not in chain or diff_id in seen:
                    raise StreamRefused(
                        f"migration refused: layer {diff_id[:19]!r} is not in the VM's chain "
                        "(or came twice); nothing was made"
                    )
                seen.add(diff_id)
                layer = chain[diff_id]
                if reader.left != layer.blob_size:
                    raise StreamRefused(f"migration refused: layer {diff_id[:19]}: wrong size")
                if layerstore.has(store, diff_id):
                    for _chunk in reader.payload():  # here already (imported meanwhile)
                        pass
                else:
                    require_space(store.root, layer.blob_size * 4, f"receive layer {diff_id[:19]}")
                    with store.staging("migrate-blob") as stage:
                        blob = stage / "blob"
                        with open(blob, "wb") as fh:
                            for chunk in reader.payload():
                                fh.write(chunk)
                        layerstore.import_blob(
                            store,
                            blob,
                            diff_id,
                            layer.parent,
                            kind=layer.kind,
                            origin=Origin(
                                text=f"migrated with instance {inst.name}",
                                base=layer.base,
                                generation=layer.generation,
                                instance=inst.name if layer.kind == "snapshot" else None,
                            ),
                        )
                if diff_id in want_layers:
                    want_layers.remove(diff_id)
                layers += 1
                got_bytes += layer.blob_size
        stack.close()
        if want_objects or want_layers:
            raise StreamRefused(
                f"migration refused: the stream ended without {len(want_objects)} content(s) "
                f"and {len(want_layers)} layer(s) it had to bring; nothing was made"
            )
        layers += _remake_layers(store, offer, inst)
        _make_generations(store, offer, _gens_to_make(store, offer, list(offer.chain)))
        files, reused = _make_instance(store, offer, inst, made_from)
        if digest is not None:
            (offers_dir(store) / f"{digest}.json").unlink(missing_ok=True)
    return MigrateDone(
        instance=inst.name,
        mac=inst.mac,
        hypervisor=inst.hypervisor,
        files_verified=files,
        objects_received=objects,
        layers_received=layers,
        bytes_received=got_bytes,
        reused=reused,
        seconds=round(time.monotonic() - start, 3),
    )


def _text_digest(header: dict[str, object]) -> str:
    """The sha256 of an offer sent whole, as the sender computes it (``send.offer_digest``:
    the same JSON text, keys sorted, no spaces)."""
    return hashlib.sha256(
        json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _make_instance(
    store: Store, offer: MigrateOffer, inst: Instance, made_from: str
) -> tuple[int, int]:
    """Stage U's tree, verify it, make the U image, record the instance and the offer it
    was made from (:class:`.pending.Arrival`), all in one directory that appears by one
    rename."""
    entries = list(offer.entries)
    wanted = set(plan.file_contents(entries))
    places = index.locate(store, wanted)
    lacking = wanted - places.keys()
    if lacking:
        raise plan.Refused(
            f"migration refused: {len(lacking)} content(s) are neither here nor arrived; "
            "nothing was made"
        )
    total = sum(e.size for e in entries if e.kind == "file" and e.link is None)
    require_space(store.root, 2 * total + (16 << 20) + inst.size // 65536, f"make {inst.name}")
    reused = sum(1 for p in places.values() if p.kind != "cache")
    with store.staging(f"migrate-{inst.name}") as stage:
        u = stage / "u"
        u.mkdir(mode=0o755)
        with index.Sources(store, places) as src:
            tree.build(u, entries, src.read)
        files = tree.verify(u, entries)
        idir = stage / "instance"
        idir.mkdir(mode=0o700)
        make_ext4(idir / "upper.img", "U", u, inst.size)
        write_record(idir / Instance.FILE, inst)
        write_record(idir / pending.Arrival.FILE, pending.arrival(made_from, offer.sender))
        with store.lock("store", purpose=f"migrate-in {inst.name}"):
            if store.instance_dir(inst.name).exists():
                raise Conflict(f"instance '{inst.name}' appeared meanwhile; nothing was made")
            store.instances_dir.mkdir(parents=True, exist_ok=True)
            os.rename(idir, store.instance_dir(inst.name))
    return files, reused


def read_offer(raw: BinaryIO, store: Store | None = None) -> MigrateOffer:
    """An offer: zstd-compressed JSON read from ``raw``, at most :data:`MAX_OFFER` bytes of
    it once decompressed; with ``store``, kept there under the sha256 of its JSON text (the
    stream that follows names it instead of carrying it again: :func:`stored_offer`)."""
    text = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        while len(text) <= MAX_OFFER and (chunk := reader.read(1 << 20)):
            text += chunk
    except zstandard.ZstdError as exc:
        raise plan.Refused(f"migration refused: the offer is not zstd ({exc})") from None
    if len(text) > MAX_OFFER:
        raise plan.Refused(f"migration refused: an offer larger than {MAX_OFFER} bytes")
    try:
        data = json.loads(text)
    except ValueError:
        raise plan.Refused("migration refused: the offer is not JSON") from None
    offer = parse_offer(data)
    if store is not None:
        d = offers_dir(store)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.json"):  # offers no stream followed (a day old)
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > OFFER_KEPT:
                    old.unlink()
        write_record(d / f"{hashlib.sha256(text).hexdigest()}.json", offer)
    return offer


def offers_dir(store: Store) -> Path:
    return index.migrate_dir(store) / "offers"


def stored_offer(store: Store, digest: str) -> MigrateOffer:
    """The offer an earlier ``migrate-in offer`` kept under ``digest``."""
    if not _SHA_RE.fullmatch(digest):
        raise StreamRefused("migration refused: the stream names its offer ill-formed")
    try:
        return read_record(offers_dir(store) / f"{digest}.json", MigrateOffer)
    except FileNotFoundError:
        raise NotFound(
            f"the offer {digest[:16]} this stream names is not here (made over a day ago, or "
            "on another store); run the migration again"
        ) from None
