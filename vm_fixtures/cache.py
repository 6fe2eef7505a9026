"""The fixture cache: one directory per (fixture, recipe hash), made atomically.

Layout of a cache directory::

    <cache>/<name>-<hash16>/rootfs/        the ready tree (what build() returns)
    <cache>/<name>-<hash16>/fixture.json   recipe, build time, size
    <cache>/.<name>.lock                   flock held while building <name>
    <cache>/.<name>-<hash16>.partial-<pid> a build in progress (or left by a crash)

An entry is complete exactly when ``<name>-<hash16>`` exists: builds happen in a ``.partial``
directory next to it that is renamed into place only after everything (including
``fixture.json``) is written and synced. Leftover partial directories are removed by the next
build of the same fixture (under the lock), after checking nothing is still mounted inside them;
a build that fails with an exception removes its own partial directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unionimg.errors import Conflict, UnionimgError, UsageError
from unionimg.store.layout import fsync_dir

from .tree import disk_usage, fingerprint

KEY_CHARS = 16
"""Hex digits of the recipe hash in an entry's name."""


def say(message: str) -> None:
    """Progress for humans, on stderr (stdout carries only the result path)."""
    print(f"vm_fixtures: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """What a fixture is: ``key`` (JSON-able, everything that decides the result) and
    ``populate(rootfs)``, which makes the tree at ``rootfs`` (a path that does not exist yet)
    and returns extra facts to store in ``fixture.json``."""

    name: str
    key: dict[str, object]
    populate: Callable[[Path], dict[str, object]] = field(compare=False)

    @property
    def digest(self) -> str:
        return fingerprint({"fixture": self.name, "recipe": self.key})


def entry_dir(cache_dir: Path, recipe: Recipe) -> Path:
    return cache_dir / f"{recipe.name}-{recipe.digest[:KEY_CHARS]}"


def is_complete(entry: Path) -> bool:
    return (entry / "rootfs").is_dir() and (entry / "fixture.json").is_file()


@contextlib.contextmanager
def locked(cache_dir: Path, name: str) -> Iterator[None]:
    with (cache_dir / f".{name}.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _unescape_mount(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (a crashed mmdebstrap can leave /proc, /dev mounted)."""
    prefix = str(path.resolve())
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape_mount(fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a (partial or old) fixture directory, refusing if anything is mounted inside."""
    if not path.exists() and not path.is_symlink():
        return
    mounted = mounts_under(path)
    if mounted:
        raise Conflict(
            f"cannot remove {path}: {mounted[0]} is still mounted; "
            f"unmount it (umount -R {mounted[0]}) and run again"
        )
    shutil.rmtree(path)


def _discard(partial: Path) -> None:
    """Remove a failed build; if that is impossible (a mount left inside), leave it to the next
    build and say so, without hiding the original error."""
    try:
        remove_tree(partial)
    except (UnionimgError, OSError) as exc:
        say(f"left the failed build {partial} in place: {exc}")


def _sync_tree(path: Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs(2); Python 3.11 has no os.syncfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def ensure(recipe: Recipe, cache_dir: Path, *, force: bool = False) -> Path:
    """Path of the ready rootfs of ``recipe`` in ``cache_dir``, building it if needed."""
    entry = entry_dir(cache_dir, recipe)
    if not force and is_complete(entry):
        return entry / "rootfs"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the fixture cache {cache_dir}: {exc.strerror}; "
            "pass --cache DIR or set UNIONIMG_FIXTURE_CACHE"
        ) from exc
    with locked(cache_dir, recipe.name):
        if not force and is_complete(entry):  # another process built it meanwhile
            return entry / "rootfs"
        for stale in sorted(cache_dir.glob(f".{recipe.name}-*.partial-*")):
            say(f"removing an unfinished build {stale}")
            remove_tree(stale)
        for stale in sorted(cache_dir.glob(f".{recipe.name}-*.old-*")):
            remove_tree(stale)
        partial = cache_dir / f".{entry.name}.partial-{os.getpid()}"
        partial.mkdir(mode=0o755)
        say(f"building fixture {recipe.name} ({recipe.digest[:KEY_CHARS]}) in {partial}")
        started = time.monotonic()
        try:
            facts = recipe.populate(partial / "rootfs")
        except BaseException:
            _discard(partial)
            raise
        seconds = time.monotonic() - started
        size, inodes = disk_usage(partial / "rootfs")
        meta = {
            "fixture": recipe.name,
            "digest": recipe.digest,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(seconds, 2),
            "size_bytes": size,
            "inodes": inodes,
            **facts,
            "recipe": recipe.key,
        }
        (partial / "fixture.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _sync_tree(partial)
        old = cache_dir / f".{entry.name}.old-{os.getpid()}"
        if entry.exists():
            entry.rename(old)
        partial.rename(entry)
        fsync_dir(cache_dir)
        remove_tree(old)
        say(f"fixture {recipe.name} ready in {seconds:.1f} s, {size / 1e6:.1f} MB: {entry}")
    return entry / "rootfs"


def prune(cache_dir: Path, keep: set[str]) -> list[Path]:
    """Remove complete cache entries whose directory name is not in ``keep`` (unfinished
    builds are left to the next build of their fixture, which holds the lock)."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    for child in sorted(cache_dir.iterdir()):
        if child.name.startswith(".") or child.name in keep or not child.is_dir():
            continue
        remove_tree(child)
        removed.append(child)
    return removed
