"""Raw ext4 images: made from a directory with ``mke2fs -d`` (no mount), labels, sizes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from unionimg.entries import Entry
from unionimg.errors import StoreFull, ToolFailed, UsageError
from unionimg.fs.space import full_message
from unionimg.names import human_size
from unionimg.runner import run

MIN_IMAGE = 16 << 20
BLOCK = 4096


def usage_of(entries: Iterable[Entry]) -> tuple[int, int]:
    """(bytes rounded up to 4 KiB blocks, number of inodes) of scanned entries."""
    total = 0
    count = 0
    for e in entries:
        count += 1
        total += (e.size + BLOCK - 1) // BLOCK * BLOCK if e.kind == "file" else BLOCK
    return total, count


def default_size(used: int, inodes: int) -> int:
    """Room for the tree, its inodes, a journal and 25 % growth, in MiB steps."""
    need = int(used * 1.25) + inodes * 256 + (32 << 20)
    mib = 1 << 20
    return max(64 << 20, (need + mib - 1) // mib * mib)


def make_ext4(image: Path, label: str, source: Path | None, size: int, *, inodes: int = 0) -> None:
    """A sparse raw ext4 image labeled ``label`` holding exactly ``source`` (``None``: an
    empty file system, its root and ``lost+found``).

    ``mke2fs -d`` copies owners, modes, symlinks, device nodes, xattrs and hardlinks
    without mounting anything; lazy init keeps the file sparse.
    """
    if size < MIN_IMAGE:
        raise UsageError(
            f"size {human_size(size)} is too small; give at least {human_size(MIN_IMAGE)}"
        )
    with open(image, "wb") as fh:
        fh.truncate(size)
    os.chmod(image, 0o600)
    args = [
        "mke2fs",
        "-F",
        "-q",
        "-t",
        "ext4",
        "-L",
        label,
        "-b",
        str(BLOCK),
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
    ]
    if source is not None:
        args += ["-d", str(source)]
    by_ratio = size // 16384
    if inodes and inodes * 5 // 4 + 1024 > by_ratio:
        args += ["-N", str(inodes * 5 // 4 + 1024)]
    args.append(str(image))
    res = run(args, check=False, env={"MKE2FS_CONFIG": "/etc/mke2fs.conf"})
    if res.returncode != 0:
        image.unlink(missing_ok=True)
        text = res.stderr + res.stdout
        if "No space left on device" in text:  # the host's ENOSPC: the store is full
            need = _tree_bytes(source) if source is not None else 4 << 20
            raise StoreFull(full_message(image.parent, need, f"make {image.name}"))
        if re.search(
            r"Could not allocate|No free space|too many inodes|"
            r"Could not allocate inode",
            text,
            re.IGNORECASE,
        ):
            raise UsageError(
                f"size {human_size(size)} is too small for {source}; give a larger --size"
            )
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise ToolFailed(f"mke2fs failed for {image.name}: {lines[-1] if lines else ''}")


def disk_usage(path: Path) -> int:
    """Bytes really allocated on disk (sparse files count what they hold)."""
    return os.stat(path).st_blocks * 512


def _tree_bytes(root: Path) -> int:
    """Bytes the files below ``root`` occupy, plus what mke2fs writes beside them (for the
    "about Y needed" of a full store)."""
    total = 4 << 20
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
            except OSError:
                continue
    return total
