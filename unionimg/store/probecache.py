"""The on-disk cache of host probes (does KVM run a guest? does this UML kernel boot?).

One JSON file per probe kind under ``/var/cache/unionimg``: ``{"version": N, "entries":
{digest-of-key: answer}}``, written atomically. The key holds everything that decides the
answer (host kernel, CPU flags, the probed program's path, size and mtime...), so a changed
host or kernel probes again; a damaged or unwritable cache only costs a probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from unionimg.store.layout import write_atomic
from unionimg.store.records import ProbeCache

log = logging.getLogger(__name__)

#: where the probe caches (and the project-built UML kernel) live
CACHE_DIR = Path("/var/cache/unionimg")


def digest(key: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def load(cache_file: Path, version: int) -> dict[str, object]:
    """The cached answers, or none if the file is missing, damaged or of another version."""
    try:
        cache = ProbeCache.from_json(json.loads(cache_file.read_text()))
    except (OSError, ValueError):  # unreadable, not JSON, or not a cache (RecordError)
        return {}
    return dict(cache.entries) if cache.version == version else {}


def save(cache_file: Path, version: int, entries: dict[str, object], what: str) -> None:
    """Write the cache atomically; a failure only costs a re-probe (``what`` names it)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(ProbeCache(version, entries).to_json(), indent=2) + "\n"
        write_atomic(cache_file, text.encode(), mode=0o644)
    except OSError as exc:
        log.warning("could not write the %s probe cache %s: %s", what, cache_file, exc.strerror)
