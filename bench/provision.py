"""Provisioning benchmark: N instances (U image + history) vs full copies of the base image.

For bases of 64 MiB and 1 GiB apparent size (filled ~60 % with file data, so a copy really
moves bytes), it times ``unionimg instance create`` through the CLI (what an admin runs) and
measures the disk bytes each instance allocates, then copies the base image the conventional
way (a full raw copy per VM) in the same run, and prints the ratios.

Full copies of the 1 GiB base are capped by ``--copies`` (default 10, because 100 copies
would need 100 GiB of disk); figures are per instance, so the ratio does not depend on the
cap. Goal: < 1 s and < 5 MB per instance, whatever the base size.

Run as root: ``.venv/bin/python bench/provision.py [--instances 100] [--copies 10]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
MiB = 1 << 20


def fill_tree(root: Path, data_bytes: int) -> None:
    """An OS-like tree: a few thousand small config files plus large 'library' files."""
    (root / "etc").mkdir(parents=True)
    for i in range(2000):
        (root / "etc" / f"conf{i}.conf").write_text(f"key{i} = value{i}\n" * 4)
    lib = root / "usr" / "lib"
    lib.mkdir(parents=True)
    chunk = os.urandom(MiB)
    left = data_bytes
    n = 0
    while left > 0:
        size = min(left, 32 * MiB)
        with open(lib / f"lib{n}.so", "wb") as fh:
            for _ in range(size // MiB):
                fh.write(chunk[: MiB - n % 7] + bytes([n % 251]) * (n % 7))
        left -= size
        n += 1


# The CLI runs as installed: Python's bytecode cache on (a PYTHONDONTWRITEBYTECODE inherited
# from a developer's shell would recompile every module on every call and time the compiler).
CLI_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cli(store: Path, *args: str) -> None:
    subprocess.run(
        [str(UNIONIMG), "--store", str(store), *args],
        check=True,
        stdout=subprocess.DEVNULL,
        env=CLI_ENV,
    )


def allocated(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def bench_size(work: Path, image_size: int, instances: int, copies: int) -> dict[str, float]:
    tree = work / f"tree-{image_size}"
    fill_tree(tree, int(image_size * 0.6))
    store = work / f"store-{image_size}"
    cli(store, "base", "create", "b", "--from-dir", str(tree), "--size", str(image_size))
    shutil.rmtree(tree)
    image = store / "bases" / "b" / "generations" / "1" / "base.img"
    # not timed: the first create of a store also makes its history template, and the first
    # call after an edit of the code writes the bytecode cache
    cli(store, "instance", "create", "warmup", "--base", "b")

    before = allocated(store / "instances")
    t0 = time.perf_counter()
    for i in range(instances):
        cli(store, "instance", "create", f"vm{i:03d}", "--base", "b")
    t_ours = (time.perf_counter() - t0) / instances
    d_ours = (allocated(store / "instances") - before) / instances

    copy_dir = work / f"copies-{image_size}"
    copy_dir.mkdir()
    t0 = time.perf_counter()
    for i in range(copies):
        dst = copy_dir / f"vm{i:03d}.img"
        with open(image, "rb") as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 8 * MiB)  # a full raw copy, like a cloned disk
            out.flush()
            os.fsync(out.fileno())
    t_copy = (time.perf_counter() - t0) / copies
    d_copy = allocated(copy_dir) / copies
    shutil.rmtree(copy_dir)
    shutil.rmtree(store)
    return {"t_ours": t_ours, "d_ours": d_ours, "t_copy": t_copy, "d_copy": d_copy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument(
        "--copies",
        type=int,
        default=10,
        help="full copies of the 1 GiB base (the 64 MiB base gets --instances)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/provision.py needs root (base create mounts an overlay)", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="unionimg-bench-") as tmp:
        work = Path(tmp)
        print(
            f"{'base':>8} {'per instance':>14} {'full copy':>12} {'time ratio':>11} "
            f"{'disk/instance':>14} {'disk/copy':>11} {'disk ratio':>11}"
        )
        for size, copies in ((64 * MiB, args.instances), (1024 * MiB, args.copies)):
            r = bench_size(work, size, args.instances, copies)
            print(
                f"{size // MiB:>6}Mi {r['t_ours']:>12.3f} s {r['t_copy']:>10.3f} s "
                f"{r['t_copy'] / r['t_ours']:>10.1f}x {r['d_ours'] / MiB:>11.2f} MiB "
                f"{r['d_copy'] / MiB:>7.1f} MiB {r['d_copy'] / r['d_ours']:>10.1f}x"
            )
            ok &= r["t_ours"] < 1.0 and r["d_ours"] < 5 * 1000 * 1000
    print("goal (< 1 s and < 5 MB per instance, any base size):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
