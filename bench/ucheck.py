"""What checking a U image before the host mounts it costs, per VM, for a fleet of VMs.

For N instances (default 100) of a small base, each with local files written through its
union and committed (so its U holds an upper layer and a Mercurial history, as in real
use), it times, per VM and in the same run:

* ANCHOR: the U mount itself (loop-mount read-write with the guest options + unmount), the
  operation the check guards;
* COLD: the check when the image changed since the host last vouched for it (every VM
  whose guest ran since): ``e2fsck -f -n`` (+ recording the stamp);
* FAST: the check when the image is unchanged (its stamp matches: one stat, one small JSON
  read);
* LAYOUT: the layout check run on every mount (U's root entries through openat2, ``.hg``
  walked for symlinks);
* ``status VM`` in-process with a cold check and on the fast path (a whole host command).

Figures are medians per VM and totals for the fleet, with each one's ratio to the anchor.
Run as root: ``.venv/bin/python bench/ucheck.py [--instances 100] [--files 50]
[--size 4G] [--drop-caches]`` (``--drop-caches`` drops the page cache before the cold pass,
so e2fsck reads from disk: slower, noisier, and it slows whatever else runs on the host).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from unionimg.fs.mounts import mount_image, umount  # noqa: E402
from unionimg.layers import instance, status, ucheck, union  # noqa: E402
from unionimg.layers.base import create as base_create  # noqa: E402
from unionimg.names import parse_size  # noqa: E402
from unionimg.store.layout import Store  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_base_tree(root: Path) -> Path:
    for d in range(20):
        sub = root / "etc" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(50):
            (sub / f"f{f}.conf").write_text(f"key{f} = value {d}/{f}\n" * 8)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(os.urandom(256 << 10))
    return root


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
        fh.write("3\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--files", type=int, default=50, help="local files per VM")
    ap.add_argument("--size", default="4G", help="U image size (sparse; default as created)")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/ucheck.py needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ucheck-bench-", dir=args.work or "/var/tmp"))
    store = Store(work / "store")
    store.init()
    names = [f"vm{k:03d}" for k in range(args.instances)]
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        log("base create")
        base_create(store, "os", make_base_tree(work / "tree"))
        log(f"{len(names)} × instance create + {args.files} files through the union + commit")
        for k, name in enumerate(names):
            instance.create(store, name, "os", size=parse_size(args.size))
            union.mount(store, name, mnt)
            for f in range(args.files):
                p = mnt / "etc" / f"d{f % 20}" / f"local{f}.conf"
                p.write_text(f"local change {f} of {name}\n" * (1 + k % 5))
            union.umount_union(store, mnt)
            status.commit(store, name, "local files")
        images = {n: ucheck.image_path(store, n) for n in names}
        amnt = work / "anchor"

        def anchor(n: str) -> None:
            mount_image(images[n], amnt, readonly=False, guest=True)
            umount(amnt)

        def cold(n: str) -> None:
            ucheck.forget(store, n)
            assert ucheck.check_image(store, n) is True

        def fast(n: str) -> None:
            assert ucheck.check_image(store, n) is False

        def layout(n: str) -> None:
            ucheck.check_layout(amnt)

        def status_cold(n: str) -> None:
            ucheck.forget(store, n)
            status.status(store, n)

        def status_fast(n: str) -> None:
            status.status(store, n)

        results: dict[str, list[float]] = {}
        log("anchor: the U mount itself (mount + umount), per VM")
        results["anchor"] = [timed(lambda n=n: anchor(n)) for n in names]  # type: ignore[misc]
        if args.drop_caches:
            drop_caches()
        log("cold check (e2fsck -f -n), per VM")
        results["cold"] = [timed(lambda n=n: cold(n)) for n in names]  # type: ignore[misc]
        log("fast path (stamp matches), per VM")
        results["fast"] = [timed(lambda n=n: fast(n)) for n in names]  # type: ignore[misc]
        log("layout check on a mounted U, per VM")
        lay = []
        for n in names:
            mount_image(images[n], amnt, readonly=True, guest=True)
            try:
                lay.append(timed(lambda n=n: layout(n)))  # type: ignore[misc]
            finally:
                umount(amnt)
        results["layout"] = lay
        log("status VM: cold check, then fast path")
        results["status cold"] = [timed(lambda n=n: status_cold(n)) for n in names]  # type: ignore[misc]
        results["status fast"] = [timed(lambda n=n: status_fast(n)) for n in names]  # type: ignore[misc]

        base = statistics.median(results["anchor"])
        ino = os.stat(images[names[0]])
        print(
            f"\n{len(names)} VMs, U images {args.size} sparse "
            f"({ino.st_blocks * 512 / (1 << 20):.1f} MiB allocated each), {args.files} local "
            f"files + hg history per VM; cache {'dropped' if args.drop_caches else 'warm'}"
        )
        print(f"{'what':<34}{'median/VM':>12}{'total':>10}{'× anchor':>10}")
        labels = {
            "anchor": "ANCHOR: U mount + umount",
            "cold": "cold check (e2fsck -f -n)",
            "fast": "fast path (stamp unchanged)",
            "layout": "layout check (every mount)",
            "status cold": "status VM, cold check",
            "status fast": "status VM, fast path",
        }
        for key, label in labels.items():
            vals = results[key]
            med = statistics.median(vals)
            print(f"{label:<34}{med * 1000:>10.2f}ms{sum(vals):>9.2f}s{med / base:>10.3f}")
        cold_m = statistics.median(results["cold"])
        fast_m = statistics.median(results["fast"])
        print(
            f"\ncold check / anchor = {cold_m / base:.2f}; fast path / anchor = "
            f"{fast_m / base:.4f}; cold / fast = {cold_m / fast_m:.0f}x"
        )
        return 0
    finally:
        from unionimg.fs.mounts import unmount_tree

        unmount_tree(work)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
