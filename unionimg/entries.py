"""The model of a tree, path by path: one :class:`Entry` per path. Pure (no I/O).

An :class:`Entry` is one path as the guest sees it (``/etc/hostname``) with everything a
filesystem keeps that matters for an OS image: type, full mode (setuid etc.), owner, size,
sha256 of the content, symlink target, device numbers, xattrs, hardlink group. Mercurial
keeps only content, the exec bit and symlinks, so this is also the *sidecar* committed next
to the files (as text, :func:`sidecar_text`), and what Mercurial cannot hold at all is marked
here (:func:`hg_unfit`). Scanning trees and the SQLite manifests are :mod:`unionimg.fs.manifest`;
the pure planners (:mod:`unionimg.reconcile.plan`) need only this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

FILE, DIR, SYMLINK, CHR, BLK, FIFO, SOCK, WHITEOUT = (
    "file",
    "dir",
    "symlink",
    "chr",
    "blk",
    "fifo",
    "sock",
    "whiteout",
)
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    rdev: int | None = None
    xattrs: tuple[tuple[str, str], ...] = ()
    link: str | None = None  # first path of this file's hardlink group (nlink > 1)
    # overlay markers, only ever set on entries of an upper layer
    opaque: bool = False
    redirect: str | None = None
    metacopy: bool = False
    # kept out of Mercurial (why: OUT_*), only set by scans that ask; then ``digest``
    outside: str | None = None
    digest: str | None = None

    # -- comparisons used by status and reconcile ---------------------------------------
    def content_key(self) -> tuple[object, ...]:
        """What the guest reads: type and payload, not metadata."""
        return (self.kind, self.sha256, self.target, self.rdev)

    def meta_key(self) -> tuple[object, ...]:
        return (self.mode, self.uid, self.gid, self.xattrs)

    def same_content(self, other: Entry | None) -> bool:
        return other is not None and self.content_key() == other.content_key()

    def same_meta(self, other: Entry | None) -> bool:
        return other is not None and self.meta_key() == other.meta_key()

    def same(self, other: Entry | None) -> bool:
        return self.same_content(other) and self.same_meta(other)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "path": self.path,
            "kind": self.kind,
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.size:
            out["size"] = self.size
        for key in ("sha256", "target", "rdev", "link", "redirect"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.xattrs:
            out["xattrs"] = dict(self.xattrs)
        if self.opaque:
            out["opaque"] = True
        if self.metacopy:
            out["metacopy"] = True
        if self.outside is not None:
            out["outside"] = self.outside
        if self.digest is not None:
            out["digest"] = self.digest
        return out


def join(parent: str, name: str) -> str:
    return ("/" if parent == "/" else parent + "/") + name


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


# -- what Mercurial cannot hold -----------------------------------------------------------
# Mercurial reads a file whole into memory to commit it (about its size again per copy; a
# 2 GiB file took 2.1 GB and is refused: "exceeds maximum revlog storage of 2GiB") and keeps
# every version of it for good. Files from this size on stay out of the history: the
# sidecar records their size and a digest instead. 64 MiB keeps a commit's memory in the
# low hundreds of MiB and the repository, which travels inside the small U image, small,
# while every configuration file, script and ordinary binary of an OS stays in it.
LARGE_FILE = 64 << 20
# Mercurial opens each file by its absolute path, so one longer than PATH_MAX (4096) aborts
# the whole commit ("File name too long"). A path deeper than this, relative to the
# repository root, stays out of the history; the U root's own path has the rest.
MAX_HG_PATH = 1024
# why a path stays out of Mercurial (``Entry.outside``); anything below it stays out too
OUT_LARGE = "large"  # a regular file of LARGE_FILE bytes or more
OUT_NAME = "name"  # a newline or carriage return in its name (Mercurial aborts)
OUT_RESERVED = "reserved"  # a name Mercurial reserves (.hg, .HG, .h<U+200C>g, hg~1, ...)
OUT_DEEP = "deep"  # longer than MAX_HG_PATH
OUT_REPOSITORY = "repository"  # a directory holding .hg: Mercurial skips it as a nested repo
_HFS_IGNORED = [
    chr(c).encode()
    for c in (*range(0x200C, 0x2010), *range(0x202A, 0x202F), *range(0x206A, 0x2070), 0xFEFF)
]


def _reserved(name: bytes) -> bool:
    """Whether Mercurial refuses ``name`` as a path component (its path auditor): .hg in
    any case, also with the code points HFS+ ignores, and the Windows short names."""
    low = name.lower()
    if b"\xe2" in low or b"\xef" in low:
        for ignored in _HFS_IGNORED:
            low = low.replace(ignored, b"")
    if low in (b".hg", b".hg."):
        return True
    if b"~" in name:
        first, last = name.split(b"~", 1)
        return last.isdigit() and first.upper() in (b"HG", b"HG8B6C")
    return False


def hg_unfit(rel: bytes, name: bytes, kind: str, size: int) -> str | None:
    """Why the entry ``name`` at ``rel`` (its path relative to the repository root) cannot
    go into Mercurial, or None. Pure."""
    if b"\n" in name or b"\r" in name:
        return OUT_NAME
    if _reserved(name):
        return OUT_RESERVED
    if len(rel) > MAX_HG_PATH:
        return OUT_DEEP
    if kind == FILE and size >= LARGE_FILE:
        return OUT_LARGE
    return None


@dataclass(frozen=True, slots=True)
class Change:
    path: str
    old: Entry | None
    new: Entry | None

    @property
    def status(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "deleted"
        if self.old.same_content(self.new):
            return "metadata"
        return "modified"


def _entry_json(e: Entry | None) -> dict[str, object] | None:
    if e is None:
        return None
    return {k: getattr(e, k) for k in Entry.__dataclass_fields__}


def _entry_from_json(d: dict[str, Any] | None) -> Entry | None:
    if d is None:
        return None
    xattrs = tuple((str(n), str(v)) for n, v in d.get("xattrs") or ())
    return Entry(**{**d, "xattrs": xattrs})


def changes_to_json(changes: Iterable[Change]) -> str:
    """A delta as JSON text (paths stay str; undecodable bytes survive as surrogates)."""
    return json.dumps(
        [{"path": c.path, "old": _entry_json(c.old), "new": _entry_json(c.new)} for c in changes]
    )


def changes_from_json(text: str) -> list[Change]:
    return [
        Change(row["path"], _entry_from_json(row["old"]), _entry_from_json(row["new"]))
        for row in json.loads(text)
    ]


# -- the sidecar kept in Mercurial next to the files --------------------------------------
def sidecar_text(entries: Iterable[Entry]) -> str:
    """One JSON object per line for what Mercurial cannot hold: type, full mode, owner,
    xattrs, device numbers, hardlinks, empty dirs, whiteouts and overlay markers. Content
    and size are left to Mercurial, so ``hg diff`` of this file shows metadata changes only
    — except for entries kept out of Mercurial (``outside``: why), whose line also holds
    the size and, for a regular file, its :func:`sparse_digest` (or, in a base's
    history, its sha256).
    """
    lines = []
    for e in sorted(entries, key=lambda e: os.fsencode(e.path)):
        # out of Mercurial: the size, and the digest (a base's entries: their sha256)
        sha = e.sha256 if e.outside and e.digest is None else None
        obj = replace(e, sha256=sha, size=e.size if e.outside else 0).to_json()
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=True))
    return "\n".join(lines) + "\n"


def mark_outside(entries: Iterable[Entry], prefix: str = "") -> list[Entry]:
    """``entries`` (a scan: parents before children) with ``outside`` set as
    :func:`scan_tree` with ``hg_prefix=prefix`` would set it (no digests): for trees
    scanned without it, such as a base generation's. Pure."""
    entries = list(entries)
    nested = {parent_of(e.path) for e in entries if e.kind == DIR and e.path.endswith("/.hg")}
    why: dict[str, str | None] = {}
    out = []
    for e in entries:
        reason = None
        if e.path != "/":
            reason = why.get(parent_of(e.path))
        if reason is None and e.path in nested:
            reason = OUT_REPOSITORY
        if reason is None and e.path != "/":
            rel = os.fsencode(prefix + e.path if prefix else e.path[1:])
            name = os.fsencode(e.path.rsplit("/", 1)[1])
            reason = hg_unfit(rel, name, e.kind, e.size)
        why[e.path] = reason
        out.append(replace(e, outside=reason) if reason != e.outside else e)
    return out


def outside_roots(entries: Iterable[Entry]) -> list[str]:
    """The topmost paths kept out of Mercurial (everything below each is out too), in
    path order."""
    out = {e.path for e in entries if e.outside is not None}
    return sorted((p for p in out if p == "/" or parent_of(p) not in out), key=os.fsencode)
