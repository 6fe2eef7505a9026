"""Mercurial overhead of the layers (the paper: 1.2 MB per U, 64 MB for the base).

For a fixture base (``tiny`` by default, ``--fixture debian`` for a real Debian tree) it
prints the size of the base's history repository against the base image, and the size of
an instance's ``.hg`` (inside its U image) when new and after committing 50 changed files.

Run as root: ``.venv/bin/python bench/history.py [--fixture tiny|debian]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
sys.path.insert(0, str(REPO))


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def cli(store: Path, *args: str) -> None:
    subprocess.run(
        [str(UNIONIMG), "--store", str(store), *args], check=True, stdout=subprocess.DEVNULL
    )


def main() -> int:
    from vm_fixtures import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="tiny", choices=("tiny", "debian"))
    args = ap.parse_args()
    rootfs = build(args.fixture)
    with tempfile.TemporaryDirectory(prefix="unionimg-hist-") as tmp:
        store = Path(tmp) / "store"
        cli(store, "base", "create", "b", "--from-dir", str(rootfs))
        history = du(store / "bases/b/history/.hg")
        rootfs_size = du(rootfs)
        cli(store, "instance", "create", "vm", "--base", "b")
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        cli(store, "mount", "vm", str(mnt))
        u_hg = store / "run/vm/u/.hg"
        fresh = du(u_hg)
        etc = mnt / "etc"
        for i in range(50):
            (etc / f"local-{i}.conf").write_text(f"setting {i}\n" * 20)
        subprocess.run(
            [str(UNIONIMG), "--store", str(store), "commit", "vm", "-m", "50 files"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        after = du(u_hg)
        cli(store, "umount", str(mnt))
    mib = 1 << 20
    print(f"fixture {args.fixture}: {rootfs_size / mib:.1f} MiB of files")
    print(f"  base history (.hg):            {history / mib:8.2f} MiB  (paper: 64 MB)")
    print(f"  instance .hg, new:             {fresh / 1024:8.1f} KiB")
    print(f"  instance .hg, 50 files commit: {after / 1024:8.1f} KiB  (paper: 1.2 MB per U)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
