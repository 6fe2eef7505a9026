"""Scanning trees, SQLite manifests, deltas, the sidecar, and status classification."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.conftest import make_tree
from unionimg.manifest import (
    Entry,
    Manifest,
    diff_manifests,
    scan_tree,
    sidecar_text,
    write_manifest,
)
from unionimg.status import classify


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
    from unionimg.manifest import changes_from_json, changes_to_json

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
