"""Root filesystem fixtures for unionimg's tests and demos, built once and cached.

``build(name)`` returns the path of a ready rootfs DIRECTORY (feed it to ``mke2fs -d``; do not
modify it: it is shared by every caller). Fixtures:

- ``tiny``: busybox-static tree with a shell-script ``/sbin/init`` for boot tests (~0.1 s).
- ``debian``: minimal Debian 12 with systemd, udev, iproute2, kmod and a kernel (minutes,
  needs root and the host's Debian apt mirror).

The cache is keyed by a hash of each fixture's recipe (everything it writes, the busybox binary,
the package list, the host's Debian sources), so a fixture is rebuilt only when that changes.
Default cache: ``$UNIONIMG_FIXTURE_CACHE`` or ``<repo root>/.cache/fixtures``.
Command line: ``python -m vm_fixtures build tiny|debian [--cache DIR] [--force]``.
"""

from __future__ import annotations

import os
from pathlib import Path

from unionimg.errors import UsageError

from . import cache
from .cache import Recipe

FIXTURES = ("tiny", "debian")
CACHE_ENV = "UNIONIMG_FIXTURE_CACHE"
REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["CACHE_ENV", "FIXTURES", "build", "default_cache_dir", "entry_name", "recipe"]


def default_cache_dir() -> Path:
    """``$UNIONIMG_FIXTURE_CACHE`` or ``<repo root>/.cache/fixtures``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / ".cache" / "fixtures"


def recipe(name: str) -> Recipe:
    """The recipe of fixture ``name`` (cheap: reads the host's inputs, builds nothing)."""
    if name == "tiny":
        from . import tiny

        return tiny.recipe()
    if name == "debian":
        from . import debian

        return debian.recipe()
    raise UsageError(f"unknown fixture '{name}'; choose one of: {', '.join(FIXTURES)}")


def entry_name(name: str) -> str:
    """Directory name of fixture ``name``'s current cache entry (``<name>-<hash16>``)."""
    r = recipe(name)
    return f"{r.name}-{r.digest[: cache.KEY_CHARS]}"


def build(name: str, *, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Path of the ready rootfs directory of fixture ``name``, built if missing or stale.

    ``force`` rebuilds even when a cached entry exists. Raises UsageError (unknown name, bad
    cache dir), MissingCapability (not root for debian, no Debian sources) or ToolFailed.
    """
    r = recipe(name)
    return cache.ensure(
        r, Path(cache_dir) if cache_dir is not None else default_cache_dir(), force=force
    )
