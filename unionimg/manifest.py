"""What a tree holds, path by path: the model every other part (status, diff, reconcile) uses.

An :class:`Entry` is one path as the guest sees it (``/etc/hostname``) with everything a
filesystem keeps that matters for an OS image: type, full mode (setuid etc.), owner, size,
sha256 of the content, symlink target, device numbers, xattrs, hardlink group. Mercurial
keeps only content, the exec bit and symlinks, so this is also the *sidecar* committed next
to the files (as text, :func:`sidecar_text`).

A base generation's manifest is stored as SQLite (``manifest.sqlite``) keyed by path, so an
instance's upper layer can be checked against the base with indexed lookups: cost grows with
the upper layer, not with the base.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

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
        return out


def join(parent: str, name: str) -> str:
    return ("/" if parent == "/" else parent + "/") + name


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    if stat.S_ISREG(m):
        return FILE
    if stat.S_ISDIR(m):
        return DIR
    if stat.S_ISLNK(m):
        return SYMLINK
    if stat.S_ISCHR(m):
        return WHITEOUT if st.st_rdev == 0 else CHR
    if stat.S_ISBLK(m):
        return BLK
    if stat.S_ISFIFO(m):
        return FIFO
    return SOCK


def _xattrs(path: str) -> tuple[dict[str, bytes], tuple[tuple[str, str], ...]]:
    """(overlay's own xattrs, the rest as sorted (name, hex) pairs)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}, ()
    overlay: dict[str, bytes] = {}
    rest = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if name.startswith(OVERLAY_XATTR_PREFIXES):
            overlay[name.split(".", 2)[-1] if name.count(".") >= 2 else name] = value
        else:
            rest.append((name, value.hex()))
    return overlay, tuple(sorted(rest))


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def stat_entry(
    real: str,
    guest_path: str,
    st: os.stat_result | None = None,
    *,
    hash_files: bool = True,
    links: dict[tuple[int, int], str] | None = None,
) -> Entry:
    """The :class:`Entry` of the file at host path ``real`` shown to the guest as
    ``guest_path``."""
    if st is None:
        st = os.lstat(real)
    kind = _kind(st)
    overlay, xattrs = _xattrs(real)
    sha = target = None
    rdev = None
    if kind == FILE:
        if overlay.get("whiteout") is not None and st.st_size == 0:
            kind = WHITEOUT
        elif hash_files:
            sha = sha256_file(real)
    elif kind == SYMLINK:
        target = os.readlink(real)
    elif kind in (CHR, BLK):
        rdev = st.st_rdev
    link = None
    if links is not None and kind == FILE and st.st_nlink > 1:
        link = links.setdefault((st.st_dev, st.st_ino), guest_path)
    redirect = overlay.get("redirect")
    return Entry(
        path=guest_path,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == FILE else 0,
        sha256=sha,
        target=target,
        rdev=rdev,
        xattrs=xattrs,
        link=link,
        opaque=overlay.get("opaque") in (b"y", b"x"),
        redirect=redirect.decode("utf-8", "surrogateescape") if redirect else None,
        metacopy="metacopy" in overlay,
    )


def scan_tree(
    root: str | os.PathLike[str], *, hash_files: bool = True, skip_top: Iterable[str] = ()
) -> list[Entry]:
    """Every path below ``root`` (and ``/`` itself), parents before children.

    ``skip_top`` names top-level entries to leave out (e.g. ``.hg`` of a working copy).
    A file is marked as hardlinked (``link``) only when two of its names are in the tree:
    links from outside it (say, a saved copy of an upper layer) are not the tree's concern.
    """
    top = os.fspath(root)
    skip = set(skip_top)
    links: dict[tuple[int, int], str] = {}
    names: dict[tuple[int, int], int] = {}
    out = [stat_entry(top, "/", hash_files=hash_files, links=links)]
    stack: list[tuple[str, str]] = [(top, "/")]
    while stack:
        real_dir, guest_dir = stack.pop()
        with os.scandir(real_dir) as it:
            children = sorted(it, key=lambda d: os.fsencode(d.name))
        for child in children:
            if guest_dir == "/" and child.name in skip:
                continue
            guest = join(guest_dir, child.name)
            st = child.stat(follow_symlinks=False)
            entry = stat_entry(child.path, guest, st, hash_files=hash_files, links=links)
            if entry.link is not None:
                key = (st.st_dev, st.st_ino)
                names[key] = names.get(key, 0) + 1
            out.append(entry)
            if entry.kind == DIR:
                stack.append((child.path, guest))
    if links:
        shared = {first for key, first in links.items() if names.get(key, 0) > 1}
        out = [e if e.link is None or e.link in shared else replace(e, link=None) for e in out]
    return out


# -- SQLite manifests ---------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE entries (
    path BLOB PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT, target BLOB, rdev INTEGER,
    xattrs TEXT, link BLOB
) WITHOUT ROWID;
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLS = "path, kind, mode, uid, gid, size, sha256, target, rdev, xattrs, link"


def _enc(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _dec(raw: bytes | None) -> str | None:
    return None if raw is None else os.fsdecode(raw)


def _row(e: Entry) -> tuple[object, ...]:
    return (
        _enc(e.path),
        e.kind,
        e.mode,
        e.uid,
        e.gid,
        e.size,
        e.sha256,
        _enc(e.target),
        e.rdev,
        json.dumps(e.xattrs) if e.xattrs else None,
        _enc(e.link),
    )


def _entry(row: tuple[object, ...]) -> Entry:
    path, kind, mode, uid, gid, size, sha, target, rdev, xattrs, link = row
    return Entry(
        path=_dec(path),  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        uid=uid,  # type: ignore[arg-type]
        gid=gid,  # type: ignore[arg-type]
        size=size,  # type: ignore[arg-type]
        sha256=sha,  # type: ignore[arg-type]
        target=_dec(target),  # type: ignore[arg-type]
        rdev=rdev,  # type: ignore[arg-type]
        xattrs=tuple(tuple(x) for x in json.loads(xattrs)) if xattrs else (),  # type: ignore[arg-type]
        link=_dec(link),  # type: ignore[arg-type]
    )


def write_manifest(
    entries: Iterable[Entry], db_path: Path, info: dict[str, str] | None = None
) -> int:
    """Write entries to a new SQLite manifest; returns how many."""
    if db_path.exists():
        db_path.unlink()
    conn = sqlite3.connect(db_path)
    try:
        conn.executescript(_SCHEMA)
        count = 0
        batch: list[tuple[object, ...]] = []
        for entry in entries:
            batch.append(_row(entry))
            if len(batch) >= 5000:
                conn.executemany(
                    f"INSERT INTO entries ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", batch
                )
                count += len(batch)
                batch.clear()
        conn.executemany(f"INSERT INTO entries ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", batch)
        count += len(batch)
        conn.executemany("INSERT INTO info VALUES (?, ?)", sorted((info or {}).items()))
        conn.commit()
    finally:
        conn.close()
    os.chmod(db_path, 0o600)
    return count


class Manifest:
    """Read-only, indexed view of a stored manifest."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._conn = sqlite3.connect(
            f"file:{db_path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str) -> Entry | None:
        row = self._conn.execute(
            f"SELECT {_COLS} FROM entries WHERE path = ?", (_enc(path),)
        ).fetchone()
        return _entry(row) if row else None

    def children(self, directory: str, *, limit: int | None = None) -> list[Entry]:
        """Every entry strictly below ``directory`` (all depths), in path order."""
        if directory == "/":
            lo, hi = b"/", b"0"
            sql = f"SELECT {_COLS} FROM entries WHERE path > ? AND path < ? ORDER BY path"
        else:
            base = os.fsencode(directory)
            lo, hi = base + b"/", base + b"0"
            sql = f"SELECT {_COLS} FROM entries WHERE path >= ? AND path < ? ORDER BY path"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_entry(r) for r in self._conn.execute(sql, (lo, hi))]

    def __iter__(self) -> Iterator[Entry]:
        for row in self._conn.execute(f"SELECT {_COLS} FROM entries ORDER BY path"):
            yield _entry(row)

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def info(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM info").fetchall())


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


def _entry_from_json(d: dict[str, object] | None) -> Entry | None:
    if d is None:
        return None
    xattrs = tuple((str(n), str(v)) for n, v in d.pop("xattrs") or ())  # type: ignore[attr-defined]
    return Entry(xattrs=xattrs, **d)  # type: ignore[arg-type]


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


def diff_manifests(old_db: Path, new_db: Path) -> list[Change]:
    """Every path whose entry differs between two stored manifests, in path order.

    Runs inside SQLite (one pass over both indexes); this is the base delta that reconcile
    computes once per pair of generations.
    """
    conn = sqlite3.connect(f"file:{new_db}?mode=ro&immutable=1", uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (f"file:{old_db}?mode=ro&immutable=1",))
        cols_n = ", ".join(f"n.{c.strip()}" for c in _COLS.split(","))
        cols_o = ", ".join(f"o.{c.strip()}" for c in _COLS.split(","))
        differs = (
            "n.kind IS NOT o.kind OR n.mode IS NOT o.mode OR n.uid IS NOT o.uid OR "
            "n.gid IS NOT o.gid OR n.sha256 IS NOT o.sha256 OR n.target IS NOT o.target "
            "OR n.rdev IS NOT o.rdev OR n.xattrs IS NOT o.xattrs"
        )
        rows = conn.execute(
            f"SELECT {cols_o}, {cols_n} FROM old.entries o LEFT JOIN main.entries n "
            f"ON n.path = o.path WHERE n.path IS NULL OR {differs} "
            f"UNION ALL SELECT {cols_o}, {cols_n} FROM main.entries n "
            "LEFT JOIN old.entries o ON o.path = n.path WHERE o.path IS NULL"
        ).fetchall()
    finally:
        conn.close()
    width = len(_COLS.split(","))
    changes = []
    for row in rows:
        old = _entry(row[:width]) if row[0] is not None else None
        new = _entry(row[width:]) if row[width] is not None else None
        path = (old or new).path  # type: ignore[union-attr]
        changes.append(Change(path, old, new))
    changes.sort(key=lambda c: os.fsencode(c.path))
    return changes


# -- the sidecar kept in Mercurial next to the files --------------------------------------
def sidecar_text(entries: Iterable[Entry]) -> str:
    """One JSON object per line for what Mercurial cannot hold: type, full mode, owner,
    xattrs, device numbers, hardlinks, empty dirs, whiteouts and overlay markers. Content
    and size are left to Mercurial, so ``hg diff`` of this file shows metadata changes only.
    """
    lines = []
    for e in sorted(entries, key=lambda e: os.fsencode(e.path)):
        obj = replace(e, size=0, sha256=None).to_json()
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=True))
    return "\n".join(lines) + "\n"
