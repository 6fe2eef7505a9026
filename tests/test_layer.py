"""A layer's canonical tar (unionimg.layers.layer) and the layer cache (layerstore), on small
trees: deterministic digests, overlayfs whiteouts and opaque directories as OCI's ``.wh.``
names, standard tools reading the tar, and hostile tars refused in one line with nothing left.

Root: whiteouts are character devices, opaque directories ``trusted.*`` xattrs, owners kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.conftest import make_tree, need_programs
from unionimg.errors import Conflict, NotFound
from unionimg.layers import layerstore
from unionimg.layers.layer import (
    OPAQUE_XATTR,
    LayerRefused,
    Policy,
    file_digest,
    read_blob,
    write_blob,
)
from unionimg.layers.layerstore import Origin
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
T0 = 1_700_000_000


def _stamp(root: Path) -> None:
    """Every mtime fixed (a tree made twice must be the same tree)."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))


def _upper(root: Path, *, reverse: bool = False) -> Path:
    """An overlayfs upper layer: files, a whiteout, an opaque directory, a hard link, an
    xattr, setuid, a long name; made in ``reverse`` order on demand (another listing order)."""
    steps: list[Callable[[], object]] = [
        lambda: (root / "etc").mkdir(),
        lambda: (root / "etc/conf").write_text("changed\n"),
        lambda: os.mknod(root / "etc/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0)),
        lambda: (root / "opaque").mkdir(),
        lambda: os.setxattr(root / "opaque", OPAQUE_XATTR, b"y"),
        lambda: (root / "opaque/only").write_text("only this\n"),
        lambda: (root / "bin").mkdir(),
        lambda: (root / "bin/su").write_bytes(b"\x7fELF su"),
        lambda: os.chmod(root / "bin/su", 0o4755),
        lambda: os.link(root / "bin/su", root / "bin/su.hard"),
        lambda: os.setxattr(root / "etc/conf", "user.note", b"\x00\xffbinary"),
        lambda: (root / ("n" * 150)).write_text("long name\n"),
        lambda: os.symlink("/etc/conf", root / "link"),
        lambda: os.chown(root / "etc/conf", 1234, 5678),
    ]
    root.mkdir()
    if reverse:  # directories first, then everything else backwards
        for i in (0, 3, 4, 6):
            steps[i]()
        for i, step in reversed(list(enumerate(steps))):
            if i not in (0, 3, 4, 6, 8, 9, 10, 13):
                step()
        for i in (8, 9, 10, 13):
            steps[i]()
    else:
        for step in steps:
            step()
    _stamp(root)
    return root


def _blob(tree: Path, path: Path, kind: str = "snapshot") -> tuple[str, str]:
    with open(path, "wb") as out:
        info = write_blob(tree, out, kind=kind)
    assert info.blob_digest == file_digest(path)
    return info.diff_id, info.blob_digest


class _Reversed:
    """``os.scandir`` of another host: the same entries, listed in the other order."""

    real = os.scandir

    def __init__(self, path: object) -> None:
        with _Reversed.real(path) as it:  # type: ignore[call-overload]
            self.entries = list(it)[::-1]

    def __enter__(self) -> object:
        return iter(self.entries)

    def __iter__(self) -> object:
        return iter(self.entries)

    def __exit__(self, *exc: object) -> None:
        return None


def test_canonical_tar_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _upper(tmp_path / "a")
    b = _upper(tmp_path / "b", reverse=True)  # made in another order
    da = _blob(a, tmp_path / "a.zst")
    assert _blob(a, tmp_path / "a2.zst") == da  # the same tree twice
    assert _blob(b, tmp_path / "b.zst") == da
    with monkeypatch.context() as m:  # a host listing directories in the other order
        m.setattr(os, "scandir", _Reversed)
        assert [e.name for e in os.scandir(a)] == [e.name for e in _Reversed.real(a)][::-1]
        assert _blob(b, tmp_path / "c.zst") == da
    # the diff_id is the sha256 of the decompressed blob, which standard tools read
    with open(tmp_path / "a.zst", "rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == da[0]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    names = list(members)
    assert names[0] == "." and names[1:] == sorted(names[1:], key=lambda n: n.encode())
    assert members["etc/.wh.gone"].isreg() and members["etc/.wh.gone"].size == 0
    assert members["opaque/.wh..wh..opq"].isreg()
    assert members["bin/su"].mode == 0o4755 and members["bin/su.hard"].islnk()
    assert members["bin/su.hard"].linkname == "bin/su"
    assert members["etc/conf"].uid == 1234 and members["etc/conf"].uname == ""
    assert members["etc/conf"].mtime == T0
    assert members["etc/conf"].pax_headers["SCHILY.xattr.user.note"]
    assert "n" * 150 in members and members["link"].linkname == "/etc/conf"
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)


def test_gnu_tar_lists_the_blob(tmp_path: Path) -> None:
    need_programs("tar", "zstd")
    tree = _upper(tmp_path / "t")
    _blob(tree, tmp_path / "t.zst")
    out = subprocess.run(
        ["tar", "--zstd", "-tvf", str(tmp_path / "t.zst")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "etc/.wh.gone" in out and "opaque/.wh..wh..opq" in out
    assert "bin/su.hard link to bin/su" in out


def test_whiteouts_and_opaque_round_trip(tmp_path: Path) -> None:
    tree = _upper(tmp_path / "t")
    first = _blob(tree, tmp_path / "t.zst")
    back = tmp_path / "back"
    back.mkdir()
    info = read_blob(
        tmp_path / "t.zst", back, kind="snapshot", expected_diff_id=first[0],
        expected_blob_digest=first[1],
    )  # fmt: skip
    assert (info.diff_id, info.blob_digest) == first
    st = os.lstat(back / "etc/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(back / "opaque", OPAQUE_XATTR) == b"y"
    assert not (back / "opaque/.wh..wh..opq").exists() and not (back / "etc/.wh.gone").exists()
    assert os.lstat(back / "bin/su").st_ino == os.lstat(back / "bin/su.hard").st_ino
    assert stat.S_IMODE(os.lstat(back / "bin/su").st_mode) == 0o4755
    assert os.getxattr(back / "etc/conf", "user.note") == b"\x00\xffbinary"
    assert os.lstat(back / "etc/conf").st_uid == 1234
    assert os.lstat(back / "etc").st_mtime == T0
    assert _blob(back, tmp_path / "again.zst") == first  # the tree read back is the layer


def test_a_whole_tree_with_devices_is_a_base_layer_not_a_snapshot(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "base")
    _stamp(tree)
    diff_id, _ = _blob(tree, tmp_path / "base.zst", kind="base")
    with pytest.raises(LayerRefused, match="device node"):
        _blob(tree, tmp_path / "snap.zst", kind="snapshot")
    back = tmp_path / "back"
    back.mkdir()
    assert read_blob(tmp_path / "base.zst", back, kind="base").diff_id == diff_id
    assert os.lstat(back / "dev/null").st_rdev == os.makedev(1, 3)
    with pytest.raises(LayerRefused, match="device node"):
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        read_blob(tmp_path / "base.zst", fresh, kind="snapshot")


def test_trees_a_layer_cannot_carry_are_refused(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / ".wh.real").write_text("a file named like a whiteout\n")
    with pytest.raises(LayerRefused, match="reserved for whiteouts"):
        write_blob(t, io.BytesIO(), kind="snapshot")
    (t / ".wh.real").unlink()
    (t / "d").mkdir()
    os.setxattr(t / "d", "trusted.overlay.redirect", b"/elsewhere")
    with pytest.raises(LayerRefused, match="redirect"):
        write_blob(t, io.BytesIO(), kind="snapshot")
    os.removexattr(t / "d", "trusted.overlay.redirect")
    (t / "suid").write_text("x")
    os.chmod(t / "suid", 0o4755)
    with pytest.raises(LayerRefused, match="setuid"):
        write_blob(t, io.BytesIO(), kind="snapshot", policy=Policy(devices=False, setuid=False))


def test_fifo_carried_and_sparse_file_stays_sparse(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    os.mkfifo(t / "pickup")  # postfix's own, in a guest's /var/spool
    with open(t / "big", "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(3 << 20)
        fh.write(b"data in the middle")
    diff_id, _ = _blob(t, tmp_path / "t.zst")
    assert (tmp_path / "t.zst").stat().st_size < 64 << 10  # zeros compress
    back = tmp_path / "back"
    back.mkdir()
    assert read_blob(tmp_path / "t.zst", back, kind="snapshot").diff_id == diff_id
    assert stat.S_ISFIFO(os.lstat(back / "pickup").st_mode)
    st = os.stat(back / "big")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 <= 2 << 20
    with open(back / "big", "rb") as fh:
        fh.seek(3 << 20)
        assert fh.read(18) == b"data in the middle"


# -- hostile tars ------------------------------------------------------------------------------
def _tar(tmp_path: Path, build: object, name: str = "evil") -> Path:
    """A zstd blob of the tar ``build(tf)`` writes (Python's tarfile: not unionimg's writer)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)  # type: ignore[operator]
    path = tmp_path / f"{name}.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def _file(tf: tarfile.TarFile, name: str, data: bytes = b"x", **kw: object) -> bool:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data))
    return True


def _entry(tf: tarfile.TarFile, name: str, type_: bytes, **kw: object) -> bool:
    info = tarfile.TarInfo(name)
    info.type = type_
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info)
    return True


HOSTILE = {
    "dotdot": (lambda tf: _file(tf, "../x"), "'..'"),
    "inner-dotdot": (lambda tf: _file(tf, "a/../../x"), "'..'"),
    "absolute": (lambda tf: _file(tf, "/etc/cron.d/evil"), "absolute path"),
    "symlink-then-file": (
        lambda tf: (
            _entry(tf, "l", tarfile.SYMTYPE, linkname="/etc"),
            _file(tf, "l/passwd", b"root::0:0::/:/bin/sh\n"),
        ),
        "not a directory in it",
    ),
    "symlink-dir-then-file": (
        lambda tf: (
            _entry(tf, "d", tarfile.SYMTYPE, linkname="/tmp"),
            _entry(tf, "d/", tarfile.DIRTYPE),
        ),
        "twice",
    ),
    "device": (
        lambda tf: _entry(tf, "dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        "device node",
    ),
    "oversized-header": (
        lambda tf: _file(tf, "f", pax_headers={"comment": "x" * (2 << 20)}),
        "pax header of",
    ),
    "long-path": (lambda tf: _file(tf, "d/" * 2100 + "f"), "path of"),
    "hardlink-outside": (
        lambda tf: _entry(tf, "h", tarfile.LNKTYPE, linkname="/etc/shadow"),
        "absolute path",
    ),
    "hardlink-to-nothing": (
        lambda tf: _entry(tf, "h", tarfile.LNKTYPE, linkname="missing"),
        "not a regular file extracted before",
    ),
    "twice": (lambda tf: (_file(tf, "f"), _file(tf, "f")), "twice"),
    "overlay-xattr": (
        lambda tf: _file(tf, "f", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        "overlayfs's own",
    ),
    "gnu-longname": (lambda tf: _entry(tf, "x", b"L"), "extensions"),
    "name-too-long": (lambda tf: _file(tf, "d/" + "n" * 300), "cannot be extracted"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_refused(tmp_path: Path, case: str) -> None:
    build, message = HOSTILE[case]
    blob = _tar(tmp_path, build)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(LayerRefused, match=message) as err:
        read_blob(blob, dest, kind="snapshot")
    assert "\n" not in str(err.value)
    assert not os.path.lexists("/etc/cron.d/evil")
    assert not list(tmp_path.glob("x")) and not (tmp_path.parent / "x").exists()


def test_setuid_refused_where_the_policy_forbids_it(tmp_path: Path) -> None:
    blob = _tar(tmp_path, lambda tf: _file(tf, "bin/sh", mode=0o4755))
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(LayerRefused, match="setuid"):
        read_blob(blob, dest, kind="snapshot", policy=Policy(devices=False, setuid=False))


def test_tampered_and_truncated_blobs(tmp_path: Path) -> None:
    tree = _upper(tmp_path / "t")
    diff_id, digest = _blob(tree, tmp_path / "t.zst")
    data = (tmp_path / "t.zst").read_bytes()
    bad = tmp_path / "bad.zst"
    bad.write_bytes(data[:-40] + bytes(b ^ 1 for b in data[-40:]))
    for n, kw in enumerate(
        ({"expected_blob_digest": digest}, {"expected_diff_id": diff_id}),
    ):
        dest = tmp_path / f"d{n}"
        dest.mkdir()
        with pytest.raises(LayerRefused):
            read_blob(bad, dest, kind="snapshot", **kw)  # type: ignore[arg-type]
    short = tmp_path / "short.zst"
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    short.write_bytes(zstandard.ZstdCompressor().compress(raw[:1500]))
    dest = tmp_path / "d3"
    dest.mkdir()
    with pytest.raises(LayerRefused, match="truncated"):
        read_blob(short, dest, kind="snapshot")


# -- the layer cache ---------------------------------------------------------------------------
def test_layerstore_put_get_chain_blob_gc(tmp_path: Path, store: Path) -> None:
    s = Store(store)
    s.init()
    base_tree = make_tree(tmp_path / "base")
    _stamp(base_tree)
    base, new = layerstore.put_tree(
        s, base_tree, parent=None, kind="base", origin=Origin("test", base="b", generation=1)
    )
    # a root base layer is a whole base: labelled BASE (as an adopted generation's image)
    assert new and base.meta.label == "BASE" and base.image.is_file()
    snap, new = layerstore.put_tree(
        s, _upper(tmp_path / "u"), parent=base.diff_id, kind="snapshot",
        origin=Origin("instance vm", instance="vm", message="m"),
    )  # fmt: skip
    assert new
    again, new = layerstore.put_tree(
        s, tmp_path / "u", parent=base.diff_id, kind="snapshot", origin=Origin()
    )
    assert not new and again.diff_id == snap.diff_id
    with pytest.raises(Conflict, match="one content, one layer"):
        layerstore.put_tree(s, tmp_path / "u", parent=None, kind="base", origin=Origin())
    assert [la.diff_id for la in layerstore.chain(s, snap.short)] == [snap.diff_id, base.diff_id]
    assert layerstore.get(s, snap.meta.label).diff_id == snap.diff_id
    assert layerstore.get(s, snap.diff_id).diff_id == snap.diff_id
    with pytest.raises(NotFound):
        layerstore.get(s, "sha256:" + "0" * 64)
    # the image is the layer: its blob made again from it is the same bytes
    kept = snap.blob.read_bytes()
    os.chmod(snap.blob, 0o600)
    snap.blob.unlink()
    assert layerstore.blob_path(s, snap).read_bytes() == kept
    os.chmod(base.blob, 0o600)
    base.blob.unlink()
    assert file_digest(layerstore.blob_path(s, base)) == base.meta.blob_digest
    # import: a blob from elsewhere, checked; a missing parent, a wrong digest: nothing left
    other = Store(tmp_path / "other")
    other.init()
    with pytest.raises(NotFound, match="parent layer"):
        layerstore.import_blob(other, snap.blob, snap.diff_id, base.diff_id, kind="snapshot")
    layerstore.import_blob(other, base.blob, base.diff_id, None, kind="base")
    with pytest.raises(LayerRefused):
        layerstore.import_blob(
            other, snap.blob, "sha256:" + "1" * 64, base.diff_id, kind="snapshot"
        )
    assert not layerstore.has(other, "sha256:" + "1" * 64)
    assert os.listdir(other.tmp_dir) == []
    got, new = layerstore.import_blob(
        other, snap.blob, snap.diff_id, base.diff_id, kind="snapshot",
        expected_blob_digest=snap.meta.blob_digest,
    )  # fmt: skip
    assert new and got.meta.blob_digest == snap.meta.blob_digest
    # references: a child keeps its parent; gc goes top down
    with pytest.raises(Conflict, match="used by layer"):
        layerstore.remove(s, base)
    assert [la.short for la in layerstore.gc(s, dry_run=True)] == [snap.short, base.short]
    assert layerstore.has(s, snap.diff_id)
    assert len(layerstore.gc(s)) == 2 and layerstore.list_layers(s) == []
    shutil.rmtree(tmp_path / "other")


def test_pinned_layers_survive_gc_until_their_command_ends(tmp_path: Path, store: Path) -> None:
    s = Store(store)
    s.init()
    tree = make_tree(tmp_path / "base")
    with layerstore.Pins(s) as pins:
        layer, _ = layerstore.put_tree(
            s, tree, parent=None, kind="base", origin=Origin(), pins=pins
        )
        assert layerstore.gc(s) == []  # pinned: a snapshot about to name it
        assert layerstore.references(s)[layer.diff_id][0].startswith("a command in progress")
        with pytest.raises(Conflict, match="in progress"):
            layerstore.remove(s, layer)
    # a dead command's pin (nobody holds its lock) is swept
    stale = layerstore.layers_dir(s).parent / "pins" / "999999.dead"
    stale.write_text(layer.diff_id)
    assert [la.diff_id for la in layerstore.gc(s)] == [layer.diff_id]
    assert not stale.exists()


def test_trailing_zeros_bomb_refused(tmp_path: Path) -> None:
    """Gigabytes of zeros after the end of the archive compress to little: refused after
    a MiB, never hashed to their end."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _file(tf, "f")
    cctx = zstandard.ZstdCompressor()
    blob = tmp_path / "bomb.zst"
    with open(blob, "wb") as fh, cctx.stream_writer(fh) as zw:
        zw.write(buf.getvalue())
        for _ in range(64):  # 64 MiB of zeros (the test's stand-in for terabytes)
            zw.write(bytes(1 << 20))
    assert blob.stat().st_size < 1 << 20
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(LayerRefused, match="after its end-of-archive"):
        read_blob(blob, dest, kind="snapshot")


def test_a_tree_of_huge_sparse_files_is_refused_before_reading(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    with open(t / "sparse", "wb") as fh:
        fh.truncate(1 << 40)  # 1 TiB of nothing
    with pytest.raises(LayerRefused, match="sparse"):
        write_blob(t, io.BytesIO(), kind="snapshot", max_bytes=1 << 30)
