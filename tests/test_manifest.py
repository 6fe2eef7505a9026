"""Scanning trees, SQLite manifests, deltas, the sidecar, and status classification."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from tests.conftest import make_tree
from unionimg.entries import (
    LARGE_FILE,
    MAX_HG_PATH,
    OUT_DEEP,
    OUT_LARGE,
    OUT_NAME,
    OUT_REPOSITORY,
    OUT_RESERVED,
    Entry,
    hg_unfit,
    mark_outside,
    outside_roots,
    parent_of,
    sidecar_text,
)
from unionimg.fs.fsops import remove_tree
from unionimg.fs.manifest import (
    DIGEST_BLOCK,
    DIGEST_KIND,
    Manifest,
    diff_manifests,
    scan_tree,
    sparse_digest,
    stat_entry,
    write_manifest,
)
from unionimg.layers.status import classify


def test_scan_keeps_what_hg_drops(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    entries = {e.path: e for e in scan_tree(tree)}
    assert entries["/"].kind == "dir"
    assert entries["/bin/tool"].mode == 0o4755
    assert entries["/bin/hostlink"].kind == "symlink"
    assert entries["/bin/hostlink"].target == "../etc/hostname"
    conf = entries["/etc/app/app.conf"]
    assert (conf.uid, conf.gid) == (123, 456) or os.geteuid() != 0
    assert dict(conf.xattrs)["user.unionimg-test"] == b"v1".hex()
    assert entries["/empty"].mode == 0o1777
    assert entries["/dir with space/näme.txt"].sha256 is not None
    motd, hard = entries["/etc/motd"], entries["/etc/motd.hard"]
    assert motd.link == hard.link == "/etc/motd"
    if os.geteuid() == 0:
        assert entries["/dev/null"].kind == "chr"
        assert entries["/dev/null"].rdev == os.makedev(1, 3)
        assert entries["/dev/fifo"].kind == "fifo"


def test_whiteout_and_opaque_detected(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        return  # mknod of a whiteout and trusted.* xattrs need root; covered by root tests
    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    os.mknod(up / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.setxattr(up / "d", "trusted.overlay.opaque", b"y")
    entries = {e.path: e for e in scan_tree(up)}
    assert entries["/gone"].kind == "whiteout"
    assert entries["/d"].opaque and entries["/d"].xattrs == ()


def test_sqlite_roundtrip_and_children(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    entries = list(scan_tree(tree))
    db = tmp_path / "m.sqlite"
    assert write_manifest(entries, db) == len(entries)
    with Manifest(db) as m:
        assert len(m) == len(entries)
        for e in entries:
            assert m.get(e.path) == e
        assert m.get("/nope") is None
        below = [e.path for e in m.children("/etc")]
        assert below == sorted(below, key=os.fsencode)
        assert "/etc/app/app.conf" in below and "/etc" not in below
        assert all(p.startswith("/etc/") for p in below)
        assert {e.path for e in m.children("/")} == {e.path for e in entries} - {"/"}


def test_undecodable_names_roundtrip(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    raw = os.fsdecode(b"latin1-\xe9")
    (tree / raw).write_text("x")
    db = tmp_path / "m.sqlite"
    write_manifest(scan_tree(tree), db)
    with Manifest(db) as m:
        assert m.get("/" + raw) is not None


def test_diff_manifests(tmp_path: Path) -> None:
    a = [
        Entry("/", "dir", 0o755),
        Entry("/x", "file", 0o644, sha256="1"),
        Entry("/y", "file", 0o644, sha256="2"),
        Entry("/z", "file", 0o644, sha256="3"),
    ]
    b = [
        Entry("/", "dir", 0o755),
        Entry("/x", "file", 0o600, sha256="1"),
        Entry("/y", "file", 0o644, sha256="9"),
        Entry("/new", "file", 0o644, sha256="4"),
    ]
    write_manifest(a, tmp_path / "a")
    write_manifest(b, tmp_path / "b")
    changes = {c.path: c.status for c in diff_manifests(tmp_path / "a", tmp_path / "b")}
    assert changes == {"/x": "metadata", "/y": "modified", "/z": "deleted", "/new": "added"}


def test_sidecar_is_sorted_json_without_content(tmp_path: Path) -> None:
    entries = list(scan_tree(make_tree(tmp_path / "t")))
    lines = sidecar_text(entries).splitlines()
    objs = [json.loads(line) for line in lines]
    paths = [o["path"] for o in objs]
    assert paths == sorted(paths, key=os.fsencode)
    assert all("sha256" not in o and "size" not in o for o in objs)
    tool = next(o for o in objs if o["path"] == "/bin/tool")
    assert tool["mode"] == "4755"


class _Base:
    def __init__(self, entries: list[Entry]) -> None:
        self.map = {e.path: e for e in entries}

    def get(self, path: str) -> Entry | None:
        return self.map.get(path)


def test_classify() -> None:
    base = _Base(
        [
            Entry("/etc", "dir", 0o755),
            Entry("/etc/a", "file", 0o644, sha256="a"),
            Entry("/etc/b", "file", 0o644, sha256="b"),
            Entry("/etc/c", "file", 0o644, sha256="c"),
            Entry("/etc/d", "file", 0o644, sha256="d"),
            Entry("/opt", "dir", 0o755),
        ]
    )
    upper = [
        Entry("/", "dir", 0o755),
        Entry("/etc", "dir", 0o755),
        Entry("/etc/a", "file", 0o644, sha256="A"),  # modified
        Entry("/etc/b", "file", 0o600, sha256="b"),  # metadata only
        Entry("/etc/c", "file", 0o644, sha256="c"),  # identical copy-up
        Entry("/etc/d", "whiteout"),  # deleted
        Entry("/etc/new", "file", 0o644, sha256="n"),  # added
        Entry("/opt", "dir", 0o755, opaque=True),  # opaque
    ]
    ch = classify(upper, base)
    assert ch.modified == ["/etc/a"]
    assert ch.metadata == ["/etc/b"]
    assert ch.identical == ["/etc/c"]
    assert ch.deleted == ["/etc/d"]
    assert ch.added == ["/etc/new"]
    assert ch.opaque == ["/opt"]


def test_delta_json_roundtrip(tmp_path: Path) -> None:
    from unionimg.entries import changes_from_json, changes_to_json

    odd = os.fsdecode(b"/latin1-\xe9")
    a = [
        Entry("/", "dir", 0o755),
        Entry("/x", "file", 0o644, sha256="1", xattrs=(("user.a", "00ff"),)),
        Entry(odd, "symlink", 0o777, target="t"),
        Entry("/d", "chr", 0o600, rdev=259),
    ]
    b = [
        Entry("/", "dir", 0o755),
        Entry("/x", "file", 0o600, sha256="2"),
        Entry("/new", "file", 0o644, sha256="4", link="/new"),
    ]
    write_manifest(a, tmp_path / "a")
    write_manifest(b, tmp_path / "b")
    changes = diff_manifests(tmp_path / "a", tmp_path / "b")
    assert changes_from_json(changes_to_json(changes)) == changes
    assert {c.path for c in changes} == {"/x", odd, "/d", "/new"}


# -- what Mercurial cannot hold -------------------------------------------------------------------
def test_hg_unfit_rules() -> None:
    assert hg_unfit(b"upper/etc/hostname", b"hostname", "file", 10) is None
    assert hg_unfit(b"upper/a\nb", b"a\nb", "file", 1) == OUT_NAME
    assert hg_unfit(b"upper/a\rb", b"a\rb", "dir", 0) == OUT_NAME
    for name in (b".hg", b".HG", b".hG.", b".h\xe2\x80\x8cg", b"hg~1", b"HG8B6C~2"):
        assert hg_unfit(b"upper/" + name, name, "file", 1) == OUT_RESERVED, name
    for name in (b".hgignore", b"hg~", b"hg~x", b"x.hg", b".hgrc"):
        assert hg_unfit(b"upper/" + name, name, "file", 1) is None, name
    long = b"upper/" + b"d" * (MAX_HG_PATH - 6)
    assert hg_unfit(long, b"d", "file", 1) is None
    assert hg_unfit(long + b"x", b"dx", "file", 1) == OUT_DEEP
    assert hg_unfit(b"upper/big", b"big", "file", LARGE_FILE - 1) is None
    assert hg_unfit(b"upper/big", b"big", "file", LARGE_FILE) == OUT_LARGE
    assert hg_unfit(b"upper/big", b"big", "dir", LARGE_FILE) is None


def _naive_digest(path: Path) -> str:
    size = path.stat().st_size
    outer = hashlib.sha256(size.to_bytes(8, "big"))
    with open(path, "rb") as fh:
        while block := fh.read(DIGEST_BLOCK):
            outer.update(hashlib.sha256(block).digest())
    return f"{DIGEST_KIND}:{outer.hexdigest()}"


def test_sparse_digest_equals_reading_everything(tmp_path: Path) -> None:
    """Holes skipped or read, the digest is the same: it depends on content only."""
    cases = {
        "empty": [],
        "small": [(0, b"hello")],
        "hole-then-data": [(3 * DIGEST_BLOCK + 5, b"x" * 100)],
        "data-in-two-blocks": [(DIGEST_BLOCK - 3, b"abcdef")],
        "explicit-zeros": [(0, bytes(2 * DIGEST_BLOCK))],
    }
    for name, writes in cases.items():
        p = tmp_path / name
        with open(p, "wb") as fh:
            for off, data in writes:
                fh.seek(off)
                fh.write(data)
            if name == "hole-then-data":
                fh.truncate(9 * DIGEST_BLOCK + 17)  # ends in a hole, short last block
        fd = os.open(p, os.O_RDONLY)
        try:
            assert sparse_digest(fd, p.stat().st_size) == _naive_digest(p), name
        finally:
            os.close(fd)
    # same content, one sparse and one written out: one digest
    dense = tmp_path / "dense"
    dense.write_bytes(bytes(9 * DIGEST_BLOCK + 17))
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as fh:
        fh.truncate(9 * DIGEST_BLOCK + 17)
    digests = []
    for p in (dense, sparse):
        fd = os.open(p, os.O_RDONLY)
        digests.append(sparse_digest(fd, p.stat().st_size))
        os.close(fd)
    assert digests[0] == digests[1]


def test_huge_sparse_file_digest_is_fast(tmp_path: Path) -> None:
    """An 8 TiB sparse file (what a guest makes in a blink): digested in seconds."""
    p = tmp_path / "huge"
    with open(p, "wb") as fh:
        fh.truncate(8 << 40)
        fh.seek(5 << 40)
        fh.write(b"data")
    fd = os.open(p, os.O_RDONLY)
    try:
        start = time.monotonic()
        digest = sparse_digest(fd, 8 << 40)
        assert time.monotonic() - start < 30
    finally:
        os.close(fd)
    assert digest.startswith(DIGEST_KIND + ":")


def test_scan_marks_what_hg_cannot_hold(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    (up / "etc/ok").write_text("fine\n")
    (up / "etc/bad\nname").write_text("x\n")
    (up / "dir\rx/sub").mkdir(parents=True)
    (up / "dir\rx/sub/f").write_text("below\n")
    (up / "app/.hg").mkdir(parents=True)
    (up / "app/main").write_text("code\n")
    with open(up / "big", "wb") as fh:
        fh.truncate(LARGE_FILE)
    entries = {e.path: e for e in scan_tree(up, hash_files=False, hg_prefix="upper")}
    assert entries["/etc/ok"].outside is None and entries["/etc/ok"].digest is None
    assert entries["/etc/bad\nname"].outside == OUT_NAME
    assert entries["/etc/bad\nname"].digest == _naive_digest(up / "etc/bad\nname")
    assert entries["/dir\rx/sub/f"].outside == OUT_NAME  # inherited
    assert entries["/app"].outside == OUT_REPOSITORY
    assert entries["/app/main"].digest is not None
    assert entries["/big"].outside == OUT_LARGE and entries["/big"].digest is not None
    assert outside_roots(entries.values()) == sorted(
        ["/app", "/big", "/dir\rx", "/etc/bad\nname"], key=os.fsencode
    )
    side = {
        json.loads(line)["path"]: json.loads(line)
        for line in sidecar_text(entries.values()).splitlines()
    }
    assert side["/big"]["size"] == LARGE_FILE and side["/big"]["outside"] == "large"
    assert "size" not in side["/etc/ok"] and "digest" not in side["/etc/ok"]
    # without hg_prefix nothing is classified (base trees, comparisons); mark_outside does
    # it afterwards, the same way
    plain = scan_tree(up)
    assert all(e.outside is None for e in plain)
    marked = {e.path: e.outside for e in mark_outside(plain, "upper")}
    assert marked == {p: e.outside for p, e in entries.items()}
    assert mark_outside(plain)[0].outside is None  # a base's root


def test_scan_any_depth_with_few_descriptors(tmp_path: Path) -> None:
    """2000 nested directories (a path of 16 KB, four times PATH_MAX): every entry, parents
    before children, descriptors bounded."""
    top = tmp_path / "t"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(2000):
        os.mkdir(f"dir{i:04d}", dir_fd=fd)
        nfd = os.open(f"dir{i:04d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        if i % 500 == 0:
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    try:
        before = len(os.listdir("/proc/self/fd"))
        entries = scan_tree(top, hg_prefix="upper")
        assert len(os.listdir("/proc/self/fd")) == before
        assert len(entries) == 1 + 2000 + 4
        seen: set[str] = set()
        for e in entries:
            assert e.path == "/" or parent_of(e.path) in seen
            seen.add(e.path)
        deepest = max(entries, key=lambda e: len(e.path))
        assert len(deepest.path) >= 16000 and deepest.outside == OUT_DEEP
        assert sum(1 for e in entries if e.outside is None) > 100  # the shallow part stays in hg
    finally:
        remove_tree(top)  # pytest's own clean-up (shutil.rmtree) recurses too deep for it
    assert not top.exists()


def test_stat_entry_and_symlinked_root(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    up.mkdir()
    (up / "f").write_text("x")
    e = stat_entry(str(up / "f"), "/f")
    assert e.kind == "file" and e.sha256 == hashlib.sha256(b"x").hexdigest()
    link = tmp_path / "link"
    link.symlink_to(up)
    with pytest.raises(OSError):
        scan_tree(link)  # never followed, not even at the top
