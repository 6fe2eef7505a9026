"""The receiving side of a migration is strict (issue 14, item 4), for real.

A real VM's offer (its chain, its U scanned from the mounted image) is made here, then
changed the way a hostile or broken sender would, framed and compressed like the sender's
stream, and fed to ``unionimg migrate-in push`` (a real process on a real store holding the
same base). Each bad stream gets one line and exit 8 (4 for a name taken), the host store
keeps no instance, no staging, and no content that did not verify; a stream cut short keeps
the contents that arrived whole. The unchanged stream makes the VM (so every refusal is the
change's doing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.conftest import UNIONIMG, Cli, need_programs
from tests.test_migrate_real import make_vm, share_base
from tests.test_systems import tiny_store
from unionimg.fs.mounts import unmount_tree
from unionimg.layers import instance as inst_mod
from unionimg.migrate import cdc, index, send, tree
from unionimg.migrate.wire import MAGIC, frame_head
from unionimg.store.layout import Store
from unionimg.store.migrate_records import PROTOCOL, MigrateOffer, TreeEntry

pytestmark = pytest.mark.usefixtures("root")


@dataclass
class Setup:
    ctl: Cli
    host: Cli
    offer: MigrateOffer
    data: dict[str, bytes]  # sha256 -> content, every file of the VM's U


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Setup]:
    need_programs("mke2fs")
    tmp = tmp_path_factory.mktemp("mstrict")
    try:
        ctl = tiny_store(tmp / "ctl")
        host = Cli(tmp / "host")
        share_base(ctl, host, "tiny")
        make_vm(ctl, tmp, "web", "52:54:00:14:01:01", {
            "etc/web.conf": os.urandom(3000), "srv/data.bin": os.urandom(50_000),
        })  # fmt: skip
        store = Store(ctl.store)
        inst = inst_mod.load(store, "web")
        chain = send.chain_of(store, inst)
        data: dict[str, bytes] = {}
        with inst_mod.u_layer(store, "web", write=False) as u:
            entries = tree.scan(u, skip_top=send.SKIP_TOP)
            for e in entries:
                if e.kind == "file" and e.sha256:
                    data[e.sha256] = (u / e.path).read_bytes()
        offer = MigrateOffer(PROTOCOL, inst, tuple(chain), tuple(entries))
        yield Setup(ctl, host, offer, data)
    finally:
        unmount_tree(tmp)


def frames(offer: MigrateOffer, objects: list[tuple[str, bytes]] | None, data: dict[str, bytes],
           *, end: dict[str, object] | None = None, trailing: bytes = b"",
           cut: int | None = None) -> bytes:  # fmt: skip
    """The stream a sender would write: ``objects`` (sha, payload) or, with None, every
    content of the offer; ``end``: the end frame's header; ``trailing``: raw bytes after
    the compressed stream; ``cut``: the compressed stream cut after that many bytes."""
    raw = bytearray(MAGIC)
    raw += frame_head(b"H", offer.to_json(), 0)
    if objects is None:
        objects = [(sha, data[sha]) for sha in dict.fromkeys(
            e.sha256 for e in offer.entries if e.kind == "file" and e.sha256 in data
        )]  # fmt: skip
    sizes = {e.sha256: e.size for e in offer.entries if e.kind == "file"}
    for sha, payload in objects:
        raw += frame_head(b"O", {"sha256": sha, "size": sizes.get(sha, len(payload))}, len(payload))
        raw += payload
    raw += frame_head(b"E", end if end is not None else {"objects": len(objects), "layers": 0}, 0)
    z = zstandard.ZstdCompressor(level=3).compress(bytes(raw))
    if cut is not None:
        z = z[:cut]
    return z + trailing


def push(host: Cli, stream: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(UNIONIMG), "--store", str(host.store), "migrate-in", "push", "--json"],
        input=stream.decode("latin-1"), encoding="latin-1",
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip


def refused(setup: Setup, stream: bytes, code: int, text: str) -> str:
    res = push(setup.host, stream)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("unionimg: error: "), res.stderr[-2000:]
    assert text in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    nothing_made(setup.host)
    return lines[0]


def nothing_made(host: Cli) -> None:
    insts = json.loads(host.ok("instance", "list", "--json").output)
    assert [i["name"] for i in insts if i["name"] != "web"] == []
    tmp = host.store / "tmp"
    assert not tmp.is_dir() or not any(tmp.iterdir())
    objs = host.store / "migrate" / "objects"
    if objs.is_dir():
        for p in objs.iterdir():  # only whole, verified contents, named by their hash
            assert not p.name.startswith("."), p
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name


def with_entries(offer: MigrateOffer, extra: list[TreeEntry]) -> MigrateOffer:
    return offer.replace(entries=(*offer.entries, *extra))


def first_file(offer: MigrateOffer) -> TreeEntry:
    return next(e for e in offer.entries if e.kind == "file" and e.path.endswith("data.bin"))


def test_paths_outside_the_tree(setup: Setup) -> None:
    o, d = setup.offer, setup.data
    f = first_file(o)
    for path, why in [
        ("upper/../../escape", "'..'"),
        ("/etc/passwd", "not a relative path"),
        ("upper/./x", "'.'"),
        ("upper//x", "empty"),
        ("passwd", "not part of a U image"),
    ]:
        bad = with_entries(o, [f.replace(path=path)])
        refused(setup, frames(bad, None, d), 8, why)
    # through a symlink: upper/evil -> /tmp, then a file below it
    link = TreeEntry("upper/evil", "symlink", 0o777, 0, 0, 1, target="/tmp")
    below = f.replace(path="upper/evil/planted")
    refused(setup, frames(with_entries(o, [link, below]), None, d), 8, "parent is not a directory")
    # a path named twice, a hard link to nothing
    refused(setup, frames(with_entries(o, [f]), None, d), 8, "named twice")
    ghost = f.replace(path="upper/ghost", link="upper/nothing")
    refused(setup, frames(with_entries(o, [ghost]), None, d), 8, "hard link")


def test_sizes_and_hashes(setup: Setup) -> None:
    o, d = setup.offer, setup.data
    f = first_file(o)
    assert f.sha256 is not None
    # a file larger than the VM's U
    big = f.replace(path="upper/big", size=o.instance.size + 1, sha256="0" * 64)
    refused(setup, frames(with_entries(o, [big]), None, d), 8, "out of range")
    # the right size, other bytes: the content is not kept
    objs = [(s, p) for s, p in ((s, d[s]) for s in d) if s != f.sha256]
    wrong = [(f.sha256, os.urandom(f.size)), *objs]
    refused(setup, frames(o, wrong, d), 8, "does not match its sha256")
    assert not (setup.host.store / "migrate" / "objects" / f.sha256).exists()
    # more bytes in a content frame than the offer gives it
    longer = [(f.sha256, d[f.sha256] + b"x"), *objs]
    refused(setup, frames(o, longer, d), 8, "more than announced")
    # a content the offer does not name
    stray = [("ab" * 32, b"surprise"), *objs]
    refused(setup, frames(o, stray, d), 8, "not in the offer")


def test_more_data_than_announced_and_cut_streams(setup: Setup) -> None:
    o, d = setup.offer, setup.data
    # bytes after the end of the stream
    for trailing in (b"\x28\xb5\x2f\xfd-more", b"more"):  # a zstd frame's magic, or not
        refused(setup, frames(o, None, d, trailing=trailing), 8, "data after the end")
    # an end frame that does not count what came
    refused(setup, frames(o, None, d, end={"objects": 99, "layers": 0}), 8, "end frame")
    # a stream cut short (a broken link): refused, what arrived whole is kept
    full = frames(o, None, d)
    refused(setup, full[: len(full) * 2 // 3], 8, "ended early")


def test_deltas_are_checked(setup: Setup) -> None:
    """A delta on a base the offer does not name, and one that makes other bytes than its
    announced content (on a base the host does hold: the tiny base's busybox)."""
    from unionimg.migrate import delta

    fresh = os.urandom(20_000)  # a content no earlier test sent
    sha = hashlib.sha256(fresh).hexdigest()
    entry = TreeEntry("upper/fresh.bin", "file", 0o644, 0, 0, 1, len(fresh), sha)
    o = with_entries(setup.offer, [entry])
    d = {**setup.data, sha: fresh}
    busybox = Path("/bin/busybox").read_bytes()
    bb_sha = hashlib.sha256(busybox).hexdigest()
    rest = [(s, p) for s, p in d.items() if s != sha]

    def with_delta(offer: MigrateOffer, base: str, patch: bytes) -> bytes:
        raw = bytearray(MAGIC)
        raw += frame_head(b"H", offer.to_json(), 0)
        raw += frame_head(b"D", {"sha256": sha, "size": len(fresh), "base": base}, len(patch))
        raw += patch
        for other, payload in rest:
            raw += frame_head(b"O", {"sha256": other, "size": len(payload)}, len(payload))
            raw += payload
        raw += frame_head(b"E", {"objects": len(rest) + 1, "layers": 0}, 0)
        return zstandard.ZstdCompressor(level=3).compress(bytes(raw))

    good = delta.encode(busybox, fresh, 3) or b""
    refused(setup, with_delta(o, bb_sha, good), 8, "not in the offer")  # base not named
    named = o.replace(bases=(bb_sha,))
    liar = zstandard.ZstdCompressor(dict_data=delta._dict(busybox)).compress(os.urandom(len(fresh)))
    refused(setup, with_delta(named, bb_sha, liar), 8, "does not make its announced")
    assert not (setup.host.store / "migrate" / "objects" / sha).exists()


def test_chunked_contents_are_checked(setup: Setup) -> None:
    """A large content sent as chunks (``C``) against the host's nearest version (here a
    partial arrival of it, as a broken transfer leaves): hostile recipes are refused in one
    line, nothing of them kept, the partial arrival unchanged; a good recipe whose stream
    is cut keeps only its verified chunks, and never shortens a longer partial arrival."""
    big = os.urandom(3 << 20)
    sha = hashlib.sha256(big).hexdigest()
    entry = TreeEntry("upper/big.bin", "file", 0o644, 0, 0, 1, len(big), sha)
    o = with_entries(setup.offer, [entry])
    partial = index.partial_path(setup.host.store / "migrate", sha)
    partial.parent.mkdir(parents=True, exist_ok=True)
    held = big[: (1 << 20) + 12345]
    partial.write_bytes(held)
    have = [dg for _o, _n, dg in cdc.cut(io.BytesIO(held))]
    recipe = cdc.plan_recipe(cdc.cut(io.BytesIO(big)), have)
    good = b"".join(cdc.pieces(recipe, have, lambda off, n: big[off : off + n]))
    assert recipe.reused >= len(have) - 1

    def with_recipe(payload: bytes, size: int = len(big), what: str = sha) -> bytes:
        raw = bytearray(MAGIC)
        raw += frame_head(b"H", o.to_json(), 0)
        raw += frame_head(b"C", {"sha256": what, "size": size}, len(payload))
        raw += payload
        raw += frame_head(b"E", {"objects": 1, "layers": 0}, 0)
        return zstandard.ZstdCompressor(level=3).compress(bytes(raw))

    run = struct.Struct(">cII16s")
    bad_ref = run.pack(b"R", len(have) + 5, 1, bytes(16))
    cases = [
        (good + run.pack(b"R", 0, 1, cdc.run_check(have[:1])), "more than the announced"),
        (bad_ref + good, "lacks"),
        (run.pack(b"R", 0, 2, cdc.run_check(have[1:3])) + good, "not the ones answered"),
        (b"N" + (cdc.MAX_CHUNK + 1).to_bytes(4, "big") + bytes(16) + good, "at most"),
        (good[:-1], "ends inside a piece"),
    ]
    for payload, why in cases:
        refused(setup, with_recipe(payload), 8, why)
        assert partial.read_bytes() == held  # not replaced by what the refusal left
    refused(setup, with_recipe(good, size=len(big) - 1), 8, "not in the offer")
    # regions to look at finer that no honest sender asks for
    for text in ("5-3", f"0-{len(have) + 1}", "0-2,1-3", "a-b"):
        o_refine = o.replace(refine=((sha, text),))
        raw = bytearray(MAGIC) + frame_head(b"H", o_refine.to_json(), 0)
        raw += frame_head(b"E", {"objects": 0, "layers": 0}, 0)
        refused(setup, zstandard.ZstdCompressor().compress(bytes(raw)), 8, "region to refine")
    small = next(e for e in o.entries if e.kind == "file" and e.path.endswith("data.bin"))
    assert small.sha256 is not None
    refused(setup, with_recipe(good, size=small.size, what=small.sha256), 8, "no chunks")
    huge = good + bytes(cdc.max_payload(len(big)))
    refused(setup, with_recipe(huge), 8, "more than announced or allowed")
    assert not (setup.host.store / "migrate" / "objects" / sha).exists()
    # cut inside the recipe: the chunks before the cut are kept, if more than it held
    whole = with_recipe(good)
    for cut_at, longer in ((len(whole) // 8, False), (len(whole) * 7 // 8, True)):
        refused(setup, whole[:cut_at], 8, "ended early")
        got = partial.read_bytes()
        assert big.startswith(got) and (len(got) > len(held)) == longer, (len(got), cut_at)


def test_the_unchanged_stream_makes_the_vm_and_a_taken_name_is_refused(setup: Setup) -> None:
    o, d = setup.offer, setup.data
    res = push(setup.host, frames(o, None, d))
    assert res.returncode == 0, res.stderr[-2000:]
    done = json.loads(res.stdout)
    assert done["instance"] == "web" and done["mac"] == "52:54:00:14:01:01"
    assert done["files_verified"] == sum(1 for e in o.entries if e.kind == "file")
    show = json.loads(setup.host.ok("instance", "show", "web", "--json").output)
    assert show["mac"] == "52:54:00:14:01:01"
    # again: the name exists here now
    refused(setup, frames(o, None, d), 4, "already exists")
    # another name, the same MAC: refused too
    other = o.replace(instance=o.instance.replace(name="web2"))
    refused(setup, frames(other, None, d), 4, "MAC")
