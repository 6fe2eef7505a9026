"""Named crash points for the crash-safety tests.

``checkpoint("base-update:committed")`` kills the process with SIGKILL when the
environment variable ``UNIONIMG_CRASH_AT`` names that point. Nothing happens otherwise;
tests iterate over :data:`POINTS` to kill a command at every step in turn.
"""

from __future__ import annotations

import os
import signal

POINTS: dict[str, tuple[str, ...]] = {
    "base-create": ("staged", "image-made", "committed", "published"),
    "base-update": ("staged", "image-made", "committed", "published"),
    "instance-create": ("staged", "image-made", "published"),
    "reconcile": (
        "pre-committed",
        "staged",
        "swap-journaled",
        "swapped",
        "generation",
        "committed",
    ),
}


def checkpoint(name: str) -> None:
    if os.environ.get("UNIONIMG_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
