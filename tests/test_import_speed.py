"""What makes a host's import and a controller's blob faster keeps every check (issue 13):
the blob's digest checked in the read that extracts it (a tampered blob, or bytes appended
after its zstd frame, refused with nothing left in the cache), layers built ahead of their
parent but put in place only over it, a pull's layers built two at a time and all removed
again when one fails, the compressing thread giving the very bytes one thread gives, and a
base generation's blob made when its layer is adopted.

Root: whiteouts are character devices, images are made with ``mke2fs`` and mounted.
"""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard

from tests.conftest import flip_byte, loops_left, make_tree, resident_pages
from unionimg.errors import NotFound, StoreFull
from unionimg.fs.follow import Abandoned, Growing
from unionimg.fs.mounts import mountinfo
from unionimg.fs.pagecache import Recycler
from unionimg.layers import base as base_mod
from unionimg.layers import layer as layer_mod
from unionimg.layers import layerstore
from unionimg.layers.layer import (
    CHUNK,
    UNCACHED_MIN,
    ZSTD_LEVEL,
    BlobDamaged,
    LayerRefused,
    _Sink,
    file_digest,
    read_blob,
    write_blob,
)
from unionimg.layers.layerstore import Origin
from unionimg.registry import transfer
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
T0 = 1_700_000_000


def _stamp(root: Path) -> Path:
    for top, dirs, files in os.walk(root, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))
    return root


def _snapshot_tree(root: Path, text: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/conf").write_text(text)
    (root / "big").write_bytes(os.urandom(3 << 20))  # chunks across the reader's buffer
    return _stamp(root)


def _store(path: Path) -> Store:
    s = Store(path)
    s.init()
    return s


def _chain(tmp_path: Path) -> tuple[Store, layerstore.Layer, layerstore.Layer]:
    src = _store(tmp_path / "src")
    base, _ = layerstore.put_tree(
        src, _stamp(make_tree(tmp_path / "base")), parent=None, kind="base",
        origin=Origin("test", base="b", generation=1),
    )  # fmt: skip
    snap, _ = layerstore.put_tree(
        src, _snapshot_tree(tmp_path / "u", "one\n"), parent=base.diff_id, kind="snapshot",
        origin=Origin("instance vm", instance="vm"),
    )  # fmt: skip
    return src, base, snap


def _empty(store: Store) -> bool:
    return layerstore.list_layers(store) == [] and os.listdir(store.tmp_dir) == []


def test_the_compressing_thread_gives_the_bytes_one_thread_gives(tmp_path: Path) -> None:
    """write_blob compresses on a thread, in chunks gathered from headers and files: the
    blob is the zstd stream one thread makes of the same tar (so digests recorded before
    stay true), and an error of the writer reaches the caller, the thread ended."""
    tree = _snapshot_tree(tmp_path / "t", "x\n")
    blob = tmp_path / "b.zst"
    with open(blob, "wb") as out:
        info = write_blob(tree, out, kind="snapshot")
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob.read_bytes())
    assert len(tar) == info.tar_size
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_content_size=False)
    z = cctx.compressobj()
    assert z.compress(tar) + z.flush() == blob.read_bytes()

    class Broken:
        def write(self, data: bytes, /) -> int:
            raise OSError(28, "No space left on device")

    before = set(threading.enumerate())
    with pytest.raises(OSError, match="No space"):
        write_blob(tree, Broken(), kind="snapshot")
    # joined before the error came out: no wait (another test's daemon thread, a heartbeat,
    # may start or stop meanwhile, so only the compressing threads are counted)
    assert [t for t in threading.enumerate() if t.name == "unionimg-zstd" and t not in before] == []

    # the writer's error met by the thread after the last chunk was handed on: it comes out
    # of close, which hands on the end-of-archive padding; the thread is ended all the same
    # (a CI run left it waiting for ever when close raised before joining it)
    sink = _Sink(Broken())
    sink.write(bytes(CHUNK))
    deadline = time.monotonic() + 10
    while sink._zc is not None and sink._zc._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert [t for t in threading.enumerate() if t.name == "unionimg-zstd" and t not in before] == []


def test_a_tampered_blob_is_refused_in_the_extracting_read(tmp_path: Path) -> None:
    """The digest is checked in the one read that extracts: a flipped byte in the blob, or
    bytes appended after its zstd frame (the decompressor stumbles on them first), refused
    as damaged (the digest's verdict, not what the damage broke); nothing in the cache,
    nothing in staging."""
    _src, base, _snap = _chain(tmp_path)
    for how in ("flip", "append"):
        bad = tmp_path / f"{how}.zst"
        bad.write_bytes(base.blob.read_bytes())
        if how == "flip":
            flip_byte(bad, bad.stat().st_size // 2)
        else:
            with open(bad, "ab") as fh:
                fh.write(b"\0" * (3 << 20))  # past what the decompressor reads
        dst = _store(tmp_path / f"dst-{how}")
        with pytest.raises(BlobDamaged, match="damaged or tampered"):
            layerstore.import_blob(
                dst, bad, base.diff_id, None, kind="base",
                expected_blob_digest=base.meta.blob_digest,
            )  # fmt: skip
        assert _empty(dst)
        with pytest.raises(BlobDamaged):
            layerstore.stage_blob(
                dst, bad, base.diff_id, None, kind="base",
                expected_blob_digest=base.meta.blob_digest,
            )  # fmt: skip
        assert _empty(dst)
    # the same blob, intact, in the same read: its digest found without a second read
    dest = tmp_path / "x"
    dest.mkdir()
    got = read_blob(base.blob, dest, kind="base", expected_blob_digest=base.meta.blob_digest)
    assert got.blob_digest == base.meta.blob_digest and got.diff_id == base.diff_id


def _mount_count(image: Path) -> int:
    """How many times the kernel mounted ``image`` (``mke2fs -d`` makes it with 0)."""
    out = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"^Mount count:\s+(\d+)", out, re.MULTILINE)
    assert found, out
    return int(found.group(1))


def _image_tree(store: Store, layer: layerstore.Layer, where: Path) -> str:
    """The diff_id of the tar made again from the layer's image (its tree, exactly)."""
    with layerstore.mounted(store, layer, where):
        return layerstore.tree_digest(where, kind=layer.meta.kind).diff_id


def _nothing_left(store: Store, tmp_path: Path) -> None:
    assert layerstore.list_layers(store) == [] and os.listdir(store.tmp_dir) == []
    assert [m.target for m in mountinfo() if m.target.startswith(str(store.root))] == []
    assert not loops_left(tmp_path)


def test_big_files_are_written_around_the_page_cache(tmp_path: Path) -> None:
    """``read_blob(uncached=True)`` (what a layer extracted into its new image uses):
    files of UNCACHED_MIN bytes or more are written with O_DIRECT — none of their pages is
    left in the page cache, where the same files extracted the ordinary way leave them all —
    and every file is the same byte for byte: sizes on and off the alignment and the
    reader's chunk, a hole that stays a hole, a file of zeros that stays sparse, setuid
    kept; the diff_id of the tree made again is the blob's."""
    tree = make_tree(tmp_path / "t")
    sizes = {
        "below": UNCACHED_MIN - 1, "at": UNCACHED_MIN, "odd": UNCACHED_MIN + 1,
        "chunk": CHUNK, "chunk-odd": CHUNK + 4097, "three": 3 * CHUNK + 100,
    }  # fmt: skip
    for name, size in sizes.items():
        (tree / name).write_bytes(os.urandom(size))
    with open(tree / "holey", "wb") as fh:  # data, a chunk of zeros, data
        fh.write(os.urandom(CHUNK))
        fh.seek(2 * CHUNK)
        fh.write(os.urandom(CHUNK // 2))
    with open(tree / "zeros", "wb") as fh:
        fh.truncate(4 * CHUNK)
    with open(tree / "tail-hole", "wb") as fh:  # data, then a chunk of zeros to its end
        fh.write(os.urandom(CHUNK + 100))
        fh.truncate(3 * CHUNK + 100)
    (tree / "small-zeros").write_bytes(bytes(5000))
    (tree / "no-bytes").write_bytes(b"")
    os.chmod(tree / "three", 0o4755)
    os.chown(tree / "odd", 1234, 5678)  # handed over: owner, mode, times set by descriptor
    os.chmod(tree / "odd", 0o640)
    os.link(tree / "chunk", tree / "chunk.hard")  # a link to a file still being written
    _stamp(tree)
    blob = tmp_path / "b.zst"
    with open(blob, "wb") as fh:
        info = write_blob(tree, fh, kind="base")
    for uncached in (True, False):
        dest = tmp_path / f"x-{uncached}"
        dest.mkdir()
        got = read_blob(blob, dest, kind="base", expected_diff_id=info.diff_id, uncached=uncached)
        assert got.diff_id == info.diff_id
        for name in [*sizes, "holey", "zeros", "tail-hole", "small-zeros", "no-bytes"]:
            assert (dest / name).read_bytes() == (tree / name).read_bytes(), name
        assert (dest / "zeros").stat().st_blocks == 0
        assert (dest / "holey").stat().st_blocks * 512 <= 2 * CHUNK
        assert (dest / "three").stat().st_mode & 0o7777 == 0o4755
        st = (dest / "odd").stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o640)
        assert st.st_mtime == (tree / "odd").stat().st_mtime
        assert (dest / "chunk.hard").stat().st_ino == (dest / "chunk").stat().st_ino
        assert layerstore.tree_digest(dest, kind="base").diff_id == info.diff_id
    # the pages a write leaves (before anything reads them): none for a file written
    # uncached, all for one written the ordinary way
    for uncached in (True, False):
        dest = tmp_path / f"y-{uncached}"
        dest.mkdir()
        recycle = Recycler()
        read_blob(blob, dest, kind="base", uncached=uncached, recycle=recycle)
        # told of what went through the page cache (for the image's flusher to drop it):
        # the small files and the big ones' last bytes off the alignment; nothing when cached
        said = {Path(os.fsdecode(p)).name for p in recycle.take()}
        if uncached:
            assert {"below", "odd", "chunk-odd", "three", "small-zeros", "tail-hole"} <= said
            assert not said & {"at", "chunk", "holey", "zeros", "no-bytes"}
        else:
            assert not said
        pages = resident_pages(dest / "three")
        whole = -(-sizes["three"] // 4096)
        assert (pages <= 1) if uncached else (pages >= whole - 1), (uncached, pages)
        assert resident_pages(dest / "below") > 0  # a small file: the ordinary way


def test_a_layer_is_extracted_straight_into_its_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the (tar bytes, entries) its record claims, a layer is extracted into a new
    image (``mke2fs`` here, then mounted once: mount count 1) instead of a tmpfs copied by
    ``mke2fs -d`` (mount count 0); its tree is the layer exactly (the tar made again from
    the image has the diff_id: setuid, hard link, symlink, xattr, device node, FIFO,
    whiteouts) and a whole base's manifest is the one the other way records. A claim too
    small for the real tar (the image fills up) or one no tar can have: the layer is built
    the other way, the same layer. A tampered blob or a hostile tar: refused in one line,
    nothing left in the cache, staging, mounts or loop devices."""
    caplog.set_level("INFO", logger="unionimg.layers.layerstore")
    _src, base, snap = _chain(tmp_path)
    dst = _store(tmp_path / "dst")
    for layer, parent in ((base, None), (snap, base.diff_id)):
        got, new = layerstore.import_blob(
            dst, layer.blob, layer.diff_id, parent, kind=layer.meta.kind,
            expected_blob_digest=layer.meta.blob_digest,
            hint=(layer.meta.tar_size, layer.meta.entries),
        )  # fmt: skip
        assert new and _mount_count(got.image) == 1, layer.meta.kind
        assert _image_tree(dst, got, tmp_path / "m") == layer.diff_id
    direct = layerstore.tree_manifest(layerstore.get(dst, base.diff_id))
    other = _store(tmp_path / "other")
    got, _ = layerstore.import_blob(other, base.blob, base.diff_id, None, kind="base")
    assert _mount_count(got.image) == 0 and direct is not None
    assert direct == layerstore.tree_manifest(got)

    # a file larger than the image the claim makes room for (random: no holes, no zstd)
    big = _stamp(make_tree(tmp_path / "big"))
    (big / "data.bin").write_bytes(os.urandom(80 << 20))
    _stamp(big)
    large, _ = layerstore.put_tree(
        _store(tmp_path / "src2"), big, parent=None, kind="base", origin=Origin("test")
    )
    entries = large.meta.entries
    for name, hint in (("small", (entries * 512, entries)), ("impossible", (100, 5))):
        d = _store(tmp_path / f"dst-{name}")
        got, new = layerstore.import_blob(
            d, large.blob, large.diff_id, None, kind="base", hint=hint
        )
        assert new and _mount_count(got.image) == 0, name
        tried = "built the other way" in caplog.text  # the image was made, and filled up
        assert tried == (name == "small"), caplog.text
        caplog.clear()
        assert _image_tree(d, got, tmp_path / "m") == large.diff_id

    bad = tmp_path / "bad.zst"
    bad.write_bytes(base.blob.read_bytes())
    flip_byte(bad, bad.stat().st_size // 2)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc/", "../escaped"):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(b""))
    hostile = tmp_path / "hostile.zst"
    hostile.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    for blob, digest, error, words in (
        (bad, base.meta.blob_digest, BlobDamaged, "damaged or tampered"),
        (hostile, None, LayerRefused, "'..'"),
    ):
        d = _store(tmp_path / f"dst-{blob.stem}")
        with pytest.raises(error, match=words):
            layerstore.import_blob(
                d, blob, base.diff_id, None, kind="base", expected_blob_digest=digest,
                hint=(1 << 20, 100),
            )  # fmt: skip
        _nothing_left(d, tmp_path / f"dst-{blob.stem}")
    assert not (tmp_path / "escaped").exists()


class _Watched(Growing):
    """A Growing that notes how far the file was written each time a reader got bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.ends_seen: list[int] = []

    def _await(self, pos: int, seen: int) -> tuple[Path, int, int, int]:
        path, end, restarts, news = super()._await(pos, seen)
        self.ends_seen.append(-1 if self.finished else end)
        return path, end, restarts, news


def test_a_layer_is_extracted_while_its_blob_arrives(tmp_path: Path) -> None:
    """stage_blob with ``follow``: the snapshot's blob written in parts by another thread
    (as the registry client writes a download), the layer extracted from the bytes written
    so far, the complete file taken into the layer once it is there; the layer is the one
    built from the finished file. A blob that is damaged is refused the same way, and a
    transfer that gives up ends the build with nothing left."""
    _src, base, snap = _chain(tmp_path)
    data = snap.blob.read_bytes()
    dst = _store(tmp_path / "dst")
    layerstore.import_blob(dst, base.blob, base.diff_id, None, kind="base")

    def feed(g: Growing, body: bytes, give_up: bool = False) -> None:
        partial, dest = tmp_path / "dl.partial", tmp_path / "dl.blob"
        with partial.open("wb") as fh:
            g.begin(partial, 0)
            step = max(len(body) // 40, 1)
            for i in range(0, len(body), step):
                if give_up and i > len(body) // 2:
                    g.fail("the registry went away")
                    return
                fh.write(body[i : i + step])
                fh.flush()
                g.wrote(min(i + step, len(body)))
                time.sleep(0.01)
        os.replace(partial, dest)
        g.finish(dest)

    g = _Watched(len(data))
    writer = threading.Thread(target=feed, args=(g, data))
    writer.start()
    staged = layerstore.stage_blob(
        dst, tmp_path / "dl.blob", snap.diff_id, base.diff_id, kind="snapshot",
        expected_blob_digest=snap.meta.blob_digest, follow=g,
    )  # fmt: skip
    writer.join()
    layer, new = staged.publish()
    assert new and layer.diff_id == snap.diff_id
    assert layerstore.blob_path(dst, layer).read_bytes() == data
    assert sum(1 for e in g.ends_seen if 0 < e < len(data)) > 5  # read while it grew
    layerstore.remove(dst, layer)

    bad = bytearray(data)
    bad[len(bad) // 3] ^= 0xFF
    for body, give_up, error, words in (
        (bytes(bad), False, BlobDamaged, "damaged or tampered"),
        (data, True, Abandoned, "went away"),
    ):
        g = _Watched(len(body))
        writer = threading.Thread(target=feed, args=(g, body, give_up))
        writer.start()
        with pytest.raises(error, match=words):
            layerstore.stage_blob(
                dst, tmp_path / "dl.blob", snap.diff_id, base.diff_id, kind="snapshot",
                expected_blob_digest=snap.meta.blob_digest, follow=g,
            )  # fmt: skip
        writer.join()
    assert {la.diff_id for la in layerstore.list_layers(dst)} == {base.diff_id}
    assert os.listdir(dst.tmp_dir) == []


def test_a_layer_built_before_its_parent_appears_only_over_it(tmp_path: Path) -> None:
    """stage_blob builds a snapshot whose parent is not in the store yet; publishing it then
    is NotFound, nothing added; built again once the parent is there, it publishes. A
    discarded build leaves nothing."""
    _src, base, snap = _chain(tmp_path)
    dst = _store(tmp_path / "dst")
    early = layerstore.stage_blob(
        dst, snap.blob, snap.diff_id, base.diff_id, kind="snapshot",
        expected_blob_digest=snap.meta.blob_digest,
    )  # fmt: skip
    assert os.listdir(dst.tmp_dir) != []  # built, in staging
    with pytest.raises(NotFound, match="parent layer"):
        early.publish()
    assert _empty(dst)
    base_staged = layerstore.stage_blob(dst, base.blob, base.diff_id, None, kind="base")
    snap_staged = layerstore.stage_blob(dst, snap.blob, snap.diff_id, base.diff_id, kind="snapshot")
    base_staged.publish()
    layer, new = snap_staged.publish()
    assert new and layer.meta.blob_digest == snap.meta.blob_digest
    assert [la.diff_id for la in layerstore.chain(dst, snap.diff_id)] == [
        snap.diff_id,
        base.diff_id,
    ]
    assert os.listdir(dst.tmp_dir) == []
    again = layerstore.stage_blob(dst, snap.blob, snap.diff_id, base.diff_id, kind="snapshot")
    assert again.publish() == (layer, False)  # held already: not built again
    other = _store(tmp_path / "other")
    dropped = layerstore.stage_blob(other, base.blob, base.diff_id, None, kind="base")
    dropped.discard()
    assert _empty(other)


class _Plan:
    """What a pull reads of a PullPlan to fetch and build: the chain, the missing indexes,
    the layer.json bytes and the blob descriptors (digest, size)."""

    class _Top:
        def __init__(self, blobs: list[tuple[str, int]]) -> None:
            self.layers = [type("D", (), {"digest": d, "size": n})() for d, n in blobs]

    def __init__(self, chain: list[str], blobs: list[tuple[str, int]]) -> None:
        self.chain = tuple(chain)
        self.missing = list(range(len(chain)))
        self.metas = dict.fromkeys(self.missing, b"{}")
        self.top = self._Top(blobs)


def test_a_pull_builds_two_layers_at_once_and_a_failure_leaves_nothing(tmp_path: Path) -> None:
    """A host's pull (``transfer._fetch_while_staging``, its blobs in downloads/ already, so
    no registry is asked): a base and three snapshots built two at a time (the snapshots
    while the base is still being built), put in place base first; then a pull whose third
    blob is tampered: the layers it put in place are removed again, the ones built but not
    placed discarded, the store as it was."""
    src, base, snap = _chain(tmp_path)
    snaps = [snap]
    for i in (2, 3):
        layer, _ = layerstore.put_tree(
            src, _snapshot_tree(tmp_path / f"u{i}", f"{i}\n"), parent=base.diff_id,
            kind="snapshot", origin=Origin("instance vm", instance=f"vm{i}"),
        )  # fmt: skip
        snaps.append(layer)
    dl = tmp_path / "downloads"
    dl.mkdir()

    def downloads() -> dict[str, Path]:  # verified downloads (the pull removes them)
        out = {}
        for la in [base, *snaps]:
            path = dl / (la.meta.blob_digest[7:] + ".blob")
            path.write_bytes(la.blob.read_bytes())
            out[la.meta.blob_digest] = path
        return out

    def plans() -> list[_Plan]:
        return [
            _Plan(
                [base.diff_id, s.diff_id],
                [(la.meta.blob_digest, la.meta.blob_size) for la in (base, s)],
            )
            for s in snaps
        ]

    def run(dst: Store, files: dict[str, Path], tamper: str | None = None) -> list[str]:
        running: list[int] = []
        most = [0]
        lock = threading.Lock()

        def stage(
            blob: Path,
            meta: bytes,
            diff_id: str,
            parent: str | None,
            digest: str,
            /,
            *,
            follow: Growing | None = None,
        ) -> layerstore.StagedLayer:
            assert follow is not None and follow.finished  # verified files, all there
            with lock:
                running.append(1)
                most[0] = max(most[0], len(running))
            try:
                time.sleep(0.3)  # long enough for the other worker to start
                expect = "sha256:" + "0" * 64 if diff_id == tamper else digest
                kind = "base" if parent is None else "snapshot"
                return layerstore.stage_blob(
                    dst, blob, diff_id, parent, kind=kind, expected_blob_digest=expect
                )
            finally:
                with lock:
                    running.pop()

        def undo(diff_id: str) -> None:
            layerstore.remove(dst, layerstore.get(dst, diff_id))

        report = transfer.PullReport("-", "-", "-")
        out = transfer._fetch_while_staging(
            None,  # type: ignore[arg-type]  # every blob is in downloads/: no registry asked
            "-",
            plans(),  # type: ignore[arg-type]  # the fields a pull reads
            dl,
            have=lambda d: layerstore.has(dst, d),
            stage_blob=stage,
            on_bytes=None,
            check_space=None,
            undo=undo,
            report=report,
            start=time.monotonic(),
            workers=2,
        )
        assert most[0] == 2
        return out

    dst = _store(tmp_path / "dst")
    files = downloads()
    assert run(dst, files) == [base.diff_id] + [s.diff_id for s in snaps]
    assert {la.diff_id for la in layerstore.list_layers(dst)} == {base.diff_id} | {
        s.diff_id for s in snaps
    }
    assert not any(p.exists() for p in files.values())  # removed once all were imported
    bad = _store(tmp_path / "bad")
    files = downloads()
    with pytest.raises(LayerRefused, match="damaged or tampered"):
        run(bad, files, tamper=snaps[1].diff_id)
    assert _empty(bad)
    assert all(p.exists() for p in files.values())  # kept for the next pull


def test_a_base_generation_layer_gets_its_blob_when_adopted(tmp_path: Path) -> None:
    """A base generation adopted as a layer (the first snapshot, delta or push asks for it)
    has its blob made then, from its image, checked to be the layer: a push only sends it
    (blob_path returns it as it is)."""
    s = _store(tmp_path / "s")
    base_mod.create(s, "b", _stamp(make_tree(tmp_path / "tree")))
    layer = base_mod.generation_layer(s, base_mod.get_generation(s, "b", 1))
    assert layer.blob.is_file() and layer.meta.blob_digest
    assert file_digest(layer.blob) == layer.meta.blob_digest
    made = layer.blob.stat().st_mtime_ns
    assert layerstore.blob_path(s, layer) == layer.blob
    assert layer.blob.stat().st_mtime_ns == made
    out = tmp_path / "x"
    out.mkdir()
    got = read_blob(layer.blob, out, kind="base", expected_blob_digest=layer.meta.blob_digest)
    assert got.diff_id == layer.diff_id


def _writers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "unionimg-write"]


def test_a_file_handed_to_the_writing_thread_fails_as_one_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The big files ``read_blob(uncached=True)`` hands to a thread of their own: a setuid
    one where the policy refuses it is refused before it is handed over; a write that
    fails there (EIO, a full disk) fails the extraction in one line, as the same write in
    the extracting thread would; no writing thread is left, no descriptor open."""
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(6):
        (tree / f"big{i}").write_bytes(os.urandom(UNCACHED_MIN * (i + 1) + 7))
    os.chmod(tree / "big3", 0o4755)
    _stamp(tree)
    blob = tmp_path / "b.zst"
    with open(blob, "wb") as fh:
        write_blob(tree, fh, kind="base")
    fds = len(os.listdir("/proc/self/fd"))

    def extract(name: str, policy: layer_mod.Policy | None = None) -> None:
        dest = tmp_path / name
        dest.mkdir()
        read_blob(blob, dest, kind="base", uncached=True, policy=policy)

    with pytest.raises(LayerRefused, match="setuid or setgid file /big3"):
        extract("no-setuid", layer_mod.Policy(devices=False, setuid=False))
    real = layer_mod._write_handed
    for err, raised in ((errno.EIO, LayerRefused), (errno.ENOSPC, StoreFull)):
        calls = [0]

        def failing(buf: object, job: object, err: int = err, calls: list[int] = calls) -> None:
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(err, os.strerror(err))
            real(buf, job)  # type: ignore[arg-type]

        monkeypatch.setattr(layer_mod, "_write_handed", failing)
        with pytest.raises(raised) as exc:
            extract(f"fail-{err}")
        assert "\n" not in str(exc.value)
        assert calls[0] >= 2
    monkeypatch.setattr(layer_mod, "_write_handed", real)
    assert not _writers()
    assert len(os.listdir("/proc/self/fd")) == fds
    extract("good")  # and the same blob, undisturbed
    for i in range(6):
        assert (tmp_path / "good" / f"big{i}").read_bytes() == (tree / f"big{i}").read_bytes()
    assert not _writers()
