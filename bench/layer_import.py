"""Importing a pulled base layer on a host: three ways of making its image.

What a host does with each layer it pulls (``layerstore.import_blob``): extract the blob
while checking, in that one read, its digest and its tar's (the diff_id), into the layer's
image (a pull builds two layers at once this way: ``layerstore.stage_blob``). The Debian
fixture's base layer (a 147 MB blob, a 595 MB tar of ~12k paths) is imported into an
empty store, alternating the three ways in one period so the machine's load weighs on all
alike: ``disk`` — the tree extracted on disk (written, read by ``mke2fs -d``, removed
again); ``tmpfs`` — on a tmpfs (``layerstore._scratch``: never written to disk), then
``mke2fs -d``; ``image`` — what a pull does, given the (tar bytes, entries) the layer's
record claims: straight into a new image mounted in staging, synced while it is written,
its big files written with O_DIRECT (``layerstore._image_at``). The ratio printed is
``image`` / ``tmpfs``, per round.

Then, per round, where a tmpfs import's time goes: the extraction alone
(``layer.read_blob`` into a tmpfs, digests and manifest as the import makes them), ``mke2fs
-d`` of that tree into an image on the store's disk (``fs.image.make_ext4``, which fsyncs
it), and two floors for that image: as many bytes as the image holds written to a new file
there and fsynced, through the page cache and with O_DIRECT. On a VM whose memory its
hypervisor hands out on first touch the first is many times the second: each new
page-cache page costs more than the disk's write (why ``image`` writes big files with
O_DIRECT: ``layer._Uncached``).

Run as root (the Debian fixture is built once and cached)::

    .venv/bin/python bench/layer_import.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from unionimg.fs.image import default_size, make_ext4  # noqa: E402
from unionimg.fs.mounts import unmount_tree  # noqa: E402
from unionimg.layers import base, layerstore  # noqa: E402
from unionimg.layers.layer import read_blob  # noqa: E402
from unionimg.runner import run  # noqa: E402
from unionimg.store.layout import Store  # noqa: E402
from vm_fixtures import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-import."))
    try:
        src = Store(work / "src")
        src.init()
        base.create(src, "deb", build("debian"))
        layer = base.generation_layer(src, base.get_generation(src, "deb", 1))
        blob = layerstore.blob_path(src, layer)
        layer = layerstore.get(src, layer.diff_id)  # its blob digest recorded now
        print(f"blob {blob.stat().st_size:,} B, tree {layer.meta.tar_size:,} B of tar")
        results: dict[str, list[float]] = {"disk": [], "tmpfs": [], "image": []}
        claim = (layer.meta.tar_size, layer.meta.entries)
        minimum = layerstore.SCRATCH_MIN
        for rnd in range(args.rounds):
            for mode in ("disk", "tmpfs", "image"):
                layerstore.SCRATCH_MIN = 1 << 62 if mode == "disk" else minimum
                dst = Store(work / f"dst-{mode}")
                dst.init()
                t = time.monotonic()
                layerstore.import_blob(
                    dst, blob, layer.diff_id, None, kind="base",
                    expected_blob_digest=layer.meta.blob_digest,
                    hint=claim if mode == "image" else None,
                )  # fmt: skip
                took = time.monotonic() - t
                results[mode].append(took)
                print(f"round {rnd + 1} {mode:>5}: {took:.1f} s (load {os.getloadavg()[0]:.1f})")
                shutil.rmtree(dst.root)
        for mode, times in results.items():
            print(f"{mode:>5}: " + ", ".join(f"{x:.1f} s" for x in times))
        ratios = [i / t for i, t in zip(results["image"], results["tmpfs"], strict=True)]
        print("image / tmpfs: " + ", ".join(f"{r:.2f}" for r in ratios))
        for rnd in range(args.rounds):
            parts = _split(blob, layer.meta.blob_digest, work / f"split-{rnd}")
            print(
                f"round {rnd + 1} split: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
            )
    finally:
        unmount_tree(work)
        shutil.rmtree(work, ignore_errors=True)


def _split(blob: Path, digest: str, where: Path) -> dict[str, float]:
    """Seconds of the extraction, of ``mke2fs -d``, and of writing the image's bytes with
    fsync (the floors: :func:`_floor`), one after the other."""
    where.mkdir()
    tree = where / "tree"
    tree.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "bench-split", str(tree)])
    try:
        t = time.monotonic()
        read_blob(blob, tree, kind="base", expected_blob_digest=digest, manifest=[])
        extract = time.monotonic() - t
        used, inodes = layerstore._usage(tree)
        t = time.monotonic()
        make_ext4(where / "image", "BASE", tree, default_size(used, inodes), inodes=inodes)
        mke2fs = time.monotonic() - t
    finally:
        unmount_tree(tree)
    allocated = (where / "image").stat().st_blocks * 512
    floors = {
        f"{how} floor ({allocated >> 20} MiB)": _floor(where / how, allocated >> 20, flag)
        for how, flag in (("page-cache", 0), ("O_DIRECT", os.O_DIRECT))
    }
    shutil.rmtree(where)
    return {"extraction": extract, "mke2fs -d": mke2fs, **floors}


def _floor(path: Path, mib: int, flag: int) -> float:
    """Seconds to write ``mib`` MiB of random bytes to a new file and fsync it: through the
    page cache (what the extraction onto a tmpfs and ``mke2fs -d`` pay for each new page),
    or with O_DIRECT from one aligned buffer (what the disk itself takes)."""
    buf = mmap.mmap(-1, 1 << 20)
    buf[:] = os.urandom(1 << 20)
    t = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o600)
    try:
        for _ in range(mib):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return time.monotonic() - t


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices, mounts)")
    main()
