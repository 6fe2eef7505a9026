"""What the benchmarks that drive the CLI share: a program run that fails loudly, and the
installed ``unionimg`` bound to one store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"


def sh(
    *args: str,
    timeout: float = 3600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """``args``' stdout; a failure ends the benchmark with the command and its stderr's end."""
    full_env = {**os.environ, **env} if env else None
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=full_env, cwd=cwd
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


class Uimg:
    """``unionimg --store STORE ...`` as an admin runs it."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def __call__(self, *args: str, timeout: float = 3600, env: dict[str, str] | None = None) -> str:
        return sh(str(UNIONIMG), "--store", str(self.store), *args, timeout=timeout, env=env)

    def json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return json.loads(self(*args, "--json", env=env))
