"""Pure: a migration's tree manifest checked as hostile input, and what a migration sends.

:func:`check_entries` is the receiver's first line of defence (issue 14, item 4): every path
relative, made of plain names (no ``..``, no ``.``, no empty or over-long name, no NUL), each
one's parent a directory named earlier in the same manifest (so nothing is ever written
through a symlink, and a tree is made parents first), one entry per path, known kinds,
modes, owners, device numbers, symlink targets and xattrs of bounded size, a hard link naming
an earlier file of the same content, and file sizes that together stay within the VM's U
size. It reads nothing and writes nothing; the receiver calls it before it makes anything.

:func:`summary` says what a migration sends and why (``--dry-run``, the JSON report): per
reason (``cache``: the receiver's object cache holds it, from an earlier, broken transfer or
the VM's earlier stay; ``base``: a base generation there holds it; ``layer``: a snapshot
layer there; ``vm``: the upper layer of a stopped VM there; ``new``: sent), how many
contents and bytes; and per place (``base NAME/N``, ``layer L...``, ``vm NAME``, ``cache``)
the same, split into contents found at the same path as in the VM (the guest's path: U's
``upper/P`` is ``/P``, a layer's ``P`` is ``/P``) and contents found elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from unionimg.errors import GuestDataRefused


class TreeEntry(Protocol):
    """What the planner reads of a tree entry (``migrate_records.TreeEntry``)."""

    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def target(self) -> str | None: ...
    @property
    def rdev(self) -> int | None: ...
    @property
    def xattrs(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def link(self) -> str | None: ...


class ChainLayer(Protocol):
    """What the planner reads of a chain layer (``migrate_records.ChainLayer``)."""

    @property
    def diff_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def parent(self) -> str | None: ...
    @property
    def blob_size(self) -> int: ...


KINDS = ("file", "dir", "symlink", "chr", "blk", "fifo", "sock")
MAX_PATH = 4096
MAX_NAME = 255
MAX_ENTRIES = 2_000_000
MAX_XATTR = 64 << 10
XATTR_PREFIXES = ("trusted.", "user.", "security.")
XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")  # POSIX ACLs
_SHA_RE = re.compile(r"[0-9a-f]{64}")
DIFF_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")


L = TypeVar("L", bound=ChainLayer)


class Refused(GuestDataRefused):
    """A migration's data broke a rule: nothing was made (exit 8)."""


def _bad(path: str, why: str) -> Refused:
    shown = path.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "replace")
    return Refused(f"migration refused: entry {shown!r}: {why}; nothing was made")


def check_entries(entries: Iterable[TreeEntry], max_bytes: int) -> int:
    """Check a tree manifest (see the module docstring); the total of its file sizes."""
    kinds: dict[str, str] = {}
    sha_of: dict[str, str | None] = {}
    total = 0
    for n, e in enumerate(entries):
        if n >= MAX_ENTRIES:
            raise Refused(f"migration refused: more than {MAX_ENTRIES} entries; nothing was made")
        raw = e.path.encode("utf-8", "surrogateescape")
        if not raw or raw.startswith(b"/") or len(raw) > MAX_PATH or b"\0" in raw:
            raise _bad(e.path, "not a relative path of at most 4096 bytes")
        parts = raw.split(b"/")
        if any(p in (b"", b".", b"..") or len(p) > MAX_NAME for p in parts):
            raise _bad(e.path, "a name is empty, '.', '..' or longer than 255 bytes")
        if e.path in kinds:
            raise _bad(e.path, "named twice")
        parent = e.path.rpartition("/")[0]
        if parent and kinds.get(parent) != "dir":
            raise _bad(e.path, "its parent is not a directory named before it")
        if e.kind not in KINDS:
            raise _bad(e.path, f"unknown kind {e.kind[:20]!r}")
        if not 0 <= e.mode <= 0o7777:
            raise _bad(e.path, "mode out of range")
        if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32):
            raise _bad(e.path, "owner out of range")
        if not -(1 << 62) < e.mtime_ns < 1 << 62:
            raise _bad(e.path, "mtime out of range")
        if e.kind == "file":
            if e.sha256 is None or not _SHA_RE.fullmatch(e.sha256):
                raise _bad(e.path, "a file without a sha256")
            if not 0 <= e.size <= max_bytes:
                raise _bad(e.path, f"size {e.size} out of range (at most {max_bytes})")
            if e.link is not None:
                if kinds.get(e.link) != "file" or sha_of.get(e.link) != e.sha256:
                    raise _bad(e.path, "a hard link to no earlier file of the same content")
            else:
                total += e.size
                if total > max_bytes:
                    raise _bad(e.path, f"the files hold more than the VM's U size ({max_bytes})")
        elif e.size or e.sha256 is not None or e.link is not None:
            raise _bad(e.path, f"a {e.kind} with a size, sha256 or link")
        if e.kind == "symlink":
            t = (e.target or "").encode("utf-8", "surrogateescape")
            if not t or len(t) > MAX_PATH or b"\0" in t:
                raise _bad(e.path, "a symlink without a target of at most 4096 bytes")
        elif e.target is not None:
            raise _bad(e.path, "a target on what is no symlink")
        if e.kind in ("chr", "blk"):
            if e.rdev is None or not 0 <= e.rdev < 1 << 32:
                raise _bad(e.path, "a device without a device number")
        elif e.rdev is not None:
            raise _bad(e.path, "a device number on what is no device")
        size = 0
        for name, value in e.xattrs:
            allowed = name.startswith(XATTR_PREFIXES) or name in XATTR_NAMES
            if not allowed or len(name) > 255 or "\0" in name:
                raise _bad(e.path, f"xattr {name[:40]!r} not allowed")
            if len(value) % 2 or not re.fullmatch(r"[0-9a-f]*", value):
                raise _bad(e.path, f"xattr {name[:40]!r}: its value is not hex")
            size += len(name) + len(value) // 2
        if size > MAX_XATTR:
            raise _bad(e.path, "xattrs larger than 64 KiB")
        kinds[e.path] = e.kind
        sha_of[e.path] = e.sha256
    return total


def check_chain(chain: Iterable[L]) -> list[L]:
    """The chain of an offer: diff_ids, each lying on the next, the bottom a base layer."""
    out = list(chain)
    if not out or len(out) > 128:
        raise Refused("migration refused: the VM's chain is empty or longer than 128 layers")
    for i, layer in enumerate(out):
        if not DIFF_ID_RE.fullmatch(layer.diff_id):
            raise Refused(f"migration refused: chain layer {layer.diff_id[:80]!r} is no diff_id")
        below = out[i + 1].diff_id if i + 1 < len(out) else None
        if layer.parent != below:
            raise Refused(
                f"migration refused: chain layer {layer.diff_id[:19]} does not lie on the next"
            )
        if layer.kind not in ("snapshot", "base", "delta") or layer.blob_size < 0:
            raise Refused(f"migration refused: chain layer {layer.diff_id[:19]} is ill-formed")
    return out


def file_contents(entries: Iterable[TreeEntry]) -> dict[str, int]:
    """sha256 → size of every distinct file content of a manifest."""
    return {e.sha256: e.size for e in entries if e.kind == "file" and e.sha256 and not e.link}


@dataclass
class Count:
    contents: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.contents += 1
        self.bytes += size

    def to_json(self) -> dict[str, int]:
        return {"contents": self.contents, "bytes": self.bytes}


@dataclass
class PlaceRow:
    """What one place on the receiver holds of the VM: in all, and (but the cache, which has
    no paths) found at the same path as in the VM, or elsewhere."""

    reason: str
    all: Count = field(default_factory=Count)
    same_path: Count = field(default_factory=Count)
    elsewhere: Count = field(default_factory=Count)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"reason": self.reason, **self.all.to_json()}
        if self.reason != "cache":
            out["same_path"] = self.same_path.to_json()
            out["elsewhere"] = self.elsewhere.to_json()
        return out


@dataclass
class Summary:
    files: int = 0
    file_bytes: int = 0
    contents: int = 0
    by_reason: dict[str, dict[str, int]] = field(default_factory=dict)
    by_place: dict[str, PlaceRow] = field(default_factory=dict)
    send_bytes: int = 0  # compressed payload of the contents sent
    layers_sent: list[str] = field(default_factory=list)
    layer_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "file_bytes": self.file_bytes,
            "contents": self.contents,
            "by_reason": self.by_reason,
            "found": {k: v.to_json() for k, v in sorted(self.by_place.items())},
            "content_bytes_sent": self.send_bytes,
            "layers_sent": self.layers_sent,
            "layer_bytes_sent": self.layer_bytes,
            "bytes_sent": self.send_bytes + self.layer_bytes,
        }


def reason_of(label: str | None) -> str:
    """The reason of a receiver's label (``cache``, ``base ...``, ``layer ...``, ``vm ...``),
    ``new`` for a content found nowhere."""
    if label is None:
        return "new"
    return label.split(" ", 1)[0]


def place_of(label: str) -> tuple[str, str | None]:
    """(place, the guest's path there or None) of a receiver's label: ``cache`` →
    (``cache``, None); ``base os/1 /etc/a`` → (``base os/1``, ``/etc/a``); ``layer L12 /etc/a``
    → (``layer L12``, ``/etc/a``); ``vm web /upper/etc/a`` → (``vm web``, ``/etc/a``: a VM's
    upper layer is the guest's root; a path outside it has no guest path)."""
    kind, _, rest = label.partition(" ")
    ref, _, path = rest.partition(" ")
    if not ref:
        return kind, None
    place = f"{kind} {ref}"
    if kind == "vm":
        inside = path.lstrip("/")
        return place, ("/" + inside.removeprefix("upper/")) if inside.startswith("upper/") else None
    return place, path if path.startswith("/") else None


def guest_paths(
    entries: Iterable[TreeEntry], layer_entries: Iterable[TreeEntry] = ()
) -> dict[str, set[str]]:
    """sha256 → the guest's paths of the files holding it: U's ``upper/P`` is ``/P`` (U's
    other top names have none), a layer tree's ``P`` is ``/P``."""
    out: dict[str, set[str]] = {}
    for e in entries:
        if e.kind == "file" and e.sha256 and e.path.startswith("upper/"):
            out.setdefault(e.sha256, set()).add("/" + e.path.removeprefix("upper/"))
    for e in layer_entries:
        if e.kind == "file" and e.sha256:
            out.setdefault(e.sha256, set()).add("/" + e.path)
    return out


def summary(
    entries: Iterable[TreeEntry],
    found: Mapping[str, str],
    compressed: Mapping[str, int],
    chain: Iterable[ChainLayer],
    layers_missing: Iterable[str],
    *,
    layer_entries: Iterable[TreeEntry] = (),
) -> Summary:
    """What a migration sends and why (see the module docstring): ``entries`` are U's,
    ``layer_entries`` those of the chain layers offered by content."""
    out = Summary()
    u_entries = list(entries)
    l_entries = list(layer_entries)
    files = [e for e in (*u_entries, *l_entries) if e.kind == "file"]
    out.files = len(files)
    out.file_bytes = sum(e.size for e in files)
    contents = file_contents(files)
    out.contents = len(contents)
    paths = guest_paths(u_entries, l_entries)
    for sha, size in sorted(contents.items()):
        label = found.get(sha)
        why = reason_of(label)
        row = out.by_reason.setdefault(why, {"contents": 0, "bytes": 0})
        row["contents"] += 1
        row["bytes"] += size
        if why == "new":
            out.send_bytes += compressed.get(sha, size)
        if label is None:
            continue
        place, path = place_of(label)
        at = out.by_place.setdefault(place, PlaceRow(why))
        at.all.add(size)
        if path is not None and path in paths.get(sha, ()):
            at.same_path.add(size)
        else:
            at.elsewhere.add(size)
    missing = set(layers_missing)
    for layer in chain:
        if layer.diff_id in missing:
            out.layers_sent.append(layer.diff_id)
            out.layer_bytes += layer.blob_size
    return out


_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b|)(?:/s|ps)?", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """``--bandwidth``: bytes per second from ``50mbit``, ``6M``/``6MB`` (bytes), ``800k``,
    or a plain number of bytes per second."""
    from unionimg.errors import UsageError

    m = _RATE_RE.fullmatch(text.strip())
    if not m:
        raise UsageError(
            f"--bandwidth {text[:40]!r}: give a rate such as 50mbit, 6M (bytes/s) or 800k"
        )
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if m.group(3).lower() == "bit":
        value /= 8
    if value < 1024:
        raise UsageError(f"--bandwidth {text[:40]!r}: give at least 1 KiB/s")
    return int(value)
