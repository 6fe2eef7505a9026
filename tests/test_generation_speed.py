"""A host's base generation from a pulled base layer without a second read of its tree
(issue 13): the manifest recorded while the verified blob was extracted holds the very
records a scan of the layer's image gives (hard links, symlinks, devices, FIFOs, xattrs,
setuid, default ACLs, empty and sparse files, lost+found left out, the tiny and Debian
fixtures), a generation made from it holds the same manifest rows as one made by the scan,
and a blob whose digest fails gives no manifest.

Root: images are made with ``mke2fs`` and mounted, owners and ``trusted.*`` xattrs set.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

import vm_fixtures
from tests.conftest import make_tree
from unionimg.entries import Entry
from unionimg.fs.manifest import scan_tree
from unionimg.fs.mounts import mount_image, unmount_tree
from unionimg.layers import base as base_mod
from unionimg.layers import layerstore
from unionimg.layers.layer import BlobDamaged, read_blob
from unionimg.layers.layerstore import MANIFEST, Origin
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
T0 = 1_700_000_000


def _store(path: Path) -> Store:
    s = Store(path)
    s.init()
    return s


def _rich_tree(root: Path) -> Path:
    """:func:`make_tree` and what a scan records in its own ways: a hard-link group of three
    names in different directories (the content carried by the first in tar order, the
    scan's first another), xattrs on a file, a directory and a symlink, a capability, empty
    and sparse files, a block device, a setgid directory, a top-level lost+found, names
    whose tar order and scan order differ."""
    make_tree(root)
    (root / "a").mkdir()
    (root / "a-b").write_text("dash\n")
    (root / "a" / "z").mkdir()
    (root / "a" / "z" / "deep").write_text("x" * 5000)
    (root / "a" / "zz").write_text("hard\n")
    os.link(root / "a" / "zz", root / "a-c")
    os.link(root / "a" / "zz", root / "a" / "z" / "h")
    (root / "empty-file").write_bytes(b"")
    with open(root / "sparse", "wb") as fh:
        fh.seek(5 << 20)
        fh.write(b"tail")
    (root / "zeros").write_bytes(bytes(3 << 20))
    os.setxattr(root / "a" / "zz", "trusted.test", b"\x00\x01bin")
    os.setxattr(root / "a", "user.dirattr", b"d")
    os.symlink("/nowhere", root / "a" / "link")
    os.setxattr(root / "a" / "link", "trusted.onlink", b"s", follow_symlinks=False)
    # cap_net_raw+ep, VFS_CAP_REVISION_2 (what Debian's ping carries)
    cap = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    os.setxattr(root / "bin" / "tool", "security.capability", cap)
    os.chmod(root / "bin" / "tool", 0o755)  # a capability and setuid do not go together
    os.mknod(root / "dev" / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.chown(root / "dev" / "loop9", 0, 6)
    (root / "srv").mkdir()
    os.chmod(root / "srv", 0o2775)
    # a default ACL (systemd's /var/log/journal has one): children inherit it, one of them
    # stripped of it after (its tar entry has no ACL; extracted, it inherits one again)
    (root / "acl" / "sub").mkdir(parents=True)
    for d in (root / "acl", root / "acl" / "sub"):
        os.setxattr(d, "system.posix_acl_access", _acl(0o7, 0o5, 0o5, 0o5))
        os.setxattr(d, "system.posix_acl_default", _acl(0o7, 0o5, 0o7, 0o5))
    (root / "acl" / "file").write_text("inherits\n")
    os.setxattr(root / "acl" / "file", "system.posix_acl_access", _acl(0o6, 0o4, 0o6, 0o4))
    (root / "acl" / "sub" / "bare").write_text("stripped\n")
    os.removexattr(root / "acl" / "sub" / "bare", "system.posix_acl_access")
    (root / "lost+found").mkdir()
    (root / "lost+found" / "stray").write_text("left out\n")
    for top, dirs, files in os.walk(root, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))
    return root


def _acl(user: int, group: int, named: int, other: int) -> bytes:
    """A POSIX ACL xattr value: owner, group, user 1000 (``named``), mask, other."""
    undefined = 0xFFFFFFFF
    out = (2).to_bytes(4, "little")
    for tag, perm, uid in (
        (0x01, user, undefined),
        (0x02, named, 1000),
        (0x04, group, undefined),
        (0x10, named | group, undefined),
        (0x20, other, undefined),
    ):
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + uid.to_bytes(4, "little")
    return out


def _pulled(tmp_path: Path, tree: Path) -> tuple[Store, layerstore.Layer]:
    """``tree`` made a base layer on a 'controller' store and its blob imported into a
    'host' store, as a deploy's pull does (both digests checked)."""
    src = _store(tmp_path / "src")
    made, _ = layerstore.put_tree(
        src, tree, parent=None, kind="base", origin=Origin("test", base="b", generation=1)
    )
    blob = layerstore.blob_path(src, made)
    host = _store(tmp_path / "host")
    layer, new = layerstore.import_blob(
        host, blob, made.diff_id, None, kind="base", expected_blob_digest=made.meta.blob_digest
    )
    assert new
    return host, layer


def _scanned(layer: layerstore.Layer, where: Path) -> list[Entry]:
    mount_image(layer.image, where, readonly=True, exclusive=False)
    try:
        return scan_tree(where, skip_top=("lost+found",))
    finally:
        unmount_tree(where)


def _rows(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT * FROM entries ORDER BY path").fetchall()
    finally:
        conn.close()


def _same_as_scan(tmp_path: Path, tree: Path) -> tuple[Store, layerstore.Layer]:
    host, layer = _pulled(tmp_path, tree)
    assert (layer.dir / MANIFEST).is_file(), "the import kept no manifest"
    recorded = layerstore.tree_manifest(layer)
    scanned = _scanned(layer, tmp_path / "mnt")
    assert recorded is not None
    assert len(recorded) == len(scanned)
    for got, want in zip(recorded, scanned, strict=True):
        assert got == want
    return host, layer


def test_the_recorded_manifest_is_the_scan_of_the_image(tmp_path: Path) -> None:
    """Entry for entry, in the scan's order: every kind of entry a base holds."""
    _host, layer = _same_as_scan(tmp_path, _rich_tree(tmp_path / "t"))
    recorded = layerstore.tree_manifest(layer)
    assert recorded is not None
    by_path = {e.path: e for e in recorded}
    assert by_path["/a-c"].link == by_path["/a/zz"].link == by_path["/a/z/h"].link == "/a-c"
    assert by_path["/sparse"].size == (5 << 20) + 4
    assert by_path["/dev/loop9"].rdev == os.makedev(7, 9)
    assert dict(by_path["/a/link"].xattrs) == {"trusted.onlink": b"s".hex()}
    assert "/lost+found" not in by_path and "/lost+found/stray" not in by_path
    assert "system.posix_acl_access" in dict(by_path["/acl/sub/bare"].xattrs)


def test_a_generation_from_the_recorded_manifest_has_the_scans_rows(tmp_path: Path) -> None:
    """generation_from_layer with the recorded manifest and, the file removed, with the
    scan (its fallback): the same rows in both manifests; the same files count."""
    host, layer = _same_as_scan(tmp_path, _rich_tree(tmp_path / "t"))
    fast = base_mod.generation_from_layer(host, "fast", 1, layer)
    (layer.dir / MANIFEST).unlink()
    assert layerstore.tree_manifest(layer) is None
    slow = base_mod.generation_from_layer(host, "slow", 1, layer)
    assert _rows(fast.manifest_path) == _rows(slow.manifest_path)
    assert fast.files == slow.files == len(_rows(fast.manifest_path))


def test_the_tiny_fixture(tmp_path: Path) -> None:
    """The tiny fixture's tree (busybox, its links and devices): the same records."""
    _same_as_scan(tmp_path, vm_fixtures.build("tiny"))


def test_the_debian_fixture(tmp_path: Path) -> None:
    """The Debian fixture (what bench/deploy.py deploys: 12k entries, capabilities, the
    journal directory's default ACL): the same records; the recorded manifest is used."""
    _same_as_scan(tmp_path, vm_fixtures.build("debian"))


def test_no_manifest_from_a_blob_whose_digest_fails(tmp_path: Path) -> None:
    """The digests' verdict comes after the whole read: a wrong blob digest or diff_id
    leaves the caller's list empty (nothing recorded is handed back)."""
    _host, layer = _pulled(tmp_path, make_tree(tmp_path / "t"))
    good = layer.meta.blob_digest
    for n, (diff_id, digest) in enumerate(
        [(layer.diff_id, "sha256:" + "0" * 64), ("sha256:" + "1" * 64, good)]
    ):
        dest = tmp_path / f"x{n}"
        dest.mkdir()
        entries: list[Entry] = []
        with pytest.raises(BlobDamaged):
            read_blob(
                layer.blob, dest, kind="base", expected_diff_id=diff_id,
                expected_blob_digest=digest, manifest=entries,
            )  # fmt: skip
        assert entries == []
    dest = tmp_path / "ok"
    dest.mkdir()
    entries = []
    read_blob(layer.blob, dest, kind="base", expected_blob_digest=good, manifest=entries)
    assert entries and entries[0].path == "/"
