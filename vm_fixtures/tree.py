"""A rootfs described as data: an ordered list of nodes applied to a directory.

Fixtures describe what they add to a tree as :class:`Node` values, so the cache key can be a
hash of exactly what gets written (contents, modes, owners, link targets, device numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unionimg.errors import UsageError

NodeKind = Literal["dir", "file", "copy", "symlink", "char"]


@dataclass(frozen=True)
class Node:
    """One thing to create at ``path`` (absolute inside the rootfs, e.g. ``/etc/hostname``).

    ``dir``: a directory; ``file``: ``data``; ``copy``: a copy of the host file ``source``;
    ``symlink``: a link to ``target``; ``char``: a character device ``major``:``minor``.
    """

    path: str
    kind: NodeKind
    mode: int = 0o644
    data: bytes = b""
    source: str = ""
    target: str = ""
    major: int = 0
    minor: int = 0
    uid: int = 0
    gid: int = 0


def directory(path: str, mode: int = 0o755) -> Node:
    return Node(path, "dir", mode)


def text(path: str, content: str, mode: int = 0o644) -> Node:
    return Node(path, "file", mode, data=content.encode())


def symlink(path: str, target: str) -> Node:
    return Node(path, "symlink", 0o777, target=target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(node: Node) -> dict[str, object]:
    """JSON-able description of ``node`` for the cache key (contents by hash)."""
    out: dict[str, object] = {"path": node.path, "kind": node.kind, "mode": node.mode}
    if node.kind == "file":
        out["sha256"] = hashlib.sha256(node.data).hexdigest()
    elif node.kind == "copy":
        out["sha256"] = sha256_file(Path(node.source))
    elif node.kind == "symlink":
        out["target"] = node.target
    elif node.kind == "char":
        out["dev"] = [node.major, node.minor]
    out["owner"] = [node.uid, node.gid]
    return out


def fingerprint(parts: object) -> str:
    """Stable sha256 of a JSON-able value."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _inside(root: Path, rel: str) -> Path:
    """Host path of ``rel`` inside ``root``; refuses parents that resolve outside ``root``."""
    if not rel.strip("/"):
        return root
    dest = root / rel.lstrip("/")
    real_root = root.resolve()
    parent = dest.parent.resolve()
    if parent != real_root and real_root not in parent.parents:
        raise UsageError(f"fixture path {rel} resolves outside the rootfs {root}")
    return dest


def apply(root: Path, nodes: Iterable[Node], *, as_root: bool) -> list[str]:
    """Create ``nodes`` under ``root`` in order; returns the paths skipped (device nodes when
    not root). Existing files and links at a node's path are replaced."""
    skipped: list[str] = []
    for node in nodes:
        dest = _inside(root, node.path)
        if node.kind == "dir":
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                dest.unlink()
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                if dest.is_dir() and not dest.is_symlink():
                    raise UsageError(f"fixture path {node.path} is a directory in {root}")
                dest.unlink()
            if node.kind == "file":
                dest.write_bytes(node.data)
            elif node.kind == "copy":
                with open(node.source, "rb") as src, dest.open("wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
            elif node.kind == "symlink":
                os.symlink(node.target, dest)
                if as_root:
                    os.lchown(dest, node.uid, node.gid)
                continue
            elif node.kind == "char":
                if not as_root:
                    skipped.append(node.path)
                    continue
                os.mknod(dest, stat.S_IFCHR | node.mode, os.makedev(node.major, node.minor))
        if as_root:
            os.lchown(dest, node.uid, node.gid)
        os.chmod(dest, node.mode)
    return skipped


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) under ``root``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for path in [dirpath, *(os.path.join(dirpath, n) for n in [*filenames, *links])]:
            st = os.lstat(path)
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total, len(seen)
