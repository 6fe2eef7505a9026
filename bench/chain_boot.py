"""What a VM's image chain costs at boot (issue 13, item 1), and what the alternative of a
host-made flattened lower would cost instead. Root; real UML and QEMU (TCG) guests.

The guest: the ``tiny`` fixture's busybox tree as BASE with ``/sbin/bench-init`` (prints the
guest's ``/proc/uptime`` on the union root, powers off), an empty U, and 0..N layer images
above BASE (each one file of its own, made as the layer store makes them: ``mkfs.ext4 -d`` of
an overlayfs-format tree, label ``L`` + 15 hex digits), named on the kernel command line
(``unionimg.lowers=...,BASE``). Each depth is booted ``--repeat`` times:

* ``uptime``: the guest's uptime when its init runs on the union root (kernel boot + the
  initramfs: the kernel part is the same at every depth, so the slope over depths is the
  initramfs's cost per layer: one more ``findfs`` pass over the disks, one more ``mount``);
* ``wall``: the host's time from spawning the hypervisor to its exit.

UML boots the kernel ``umlprobe.select`` picks; QEMU TCG boots the host's /boot kernel with
the same initramfs (``--qemu-depths`` to choose its depths; TCG is slow, so fewer).

Then the flattened alternative: one ``mkfs.ext4 -d`` of a whole tree (``--flatten-tree``,
default the Debian fixture if it is cached) is what a host would pay per chain node, in time
and disk, to give each VM a single lower disk.

Usage::

    .venv/bin/python bench/chain_boot.py [--repeat 5] [--depths 0,1,3,8,14] [--qemu-depths 0,3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # vm_fixtures and tests live in the checkout

from tests import chainlayers  # noqa: E402  (after the sys.path line)
from unionimg.boot import umlprobe  # noqa: E402
from unionimg.boot.initramfs import build_initramfs  # noqa: E402
from unionimg.runner import run  # noqa: E402

BENCH_INIT = """#!/bin/busybox sh
echo "BENCH uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
"""
UPTIME = re.compile(r"^BENCH uptime ([0-9.]+)", re.MULTILINE)
TIMEOUT = 180.0


def qemu_kernel() -> Path | None:
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        if (Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-") / "modules.dep").is_file():
            return vmlinuz
    return None


def boot_once(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(guest uptime at init on the union root, host wall time to exit)."""
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=TIMEOUT,
        start_new_session=True,
        check=False,
    )
    wall = time.monotonic() - started
    out = proc.stdout.decode(errors="replace")
    found = UPTIME.search(out)
    if found is None or "unionimg-init: error" in out:
        sys.exit(f"{argv[0]}: no BENCH line; console tail:\n{out[-3000:]}")
    return float(found.group(1)), wall


def uml_argv(
    kernel: Path, home: Path, initrd: Path, disks: list[str], cmdline: list[str]
) -> list[str]:
    return [
        str(kernel),
        "mem=256M",
        f"initrd={initrd}",
        "con=null",
        "con0=fd:0,fd:1",
        f"uml_dir={home}",
        f"umid=bench-chain-{os.getpid()}",
        *disks,
        *cmdline,
    ]


def row(hypervisor: str, depth: int, uptime: float, wall: float) -> None:
    print(f"{hypervisor:10} {depth:>6} {uptime:>22.2f} s {wall:>12.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--depths", default="0,1,3,8,14")
    ap.add_argument("--qemu-depths", default="0,3")
    ap.add_argument("--qemu-repeat", type=int, default=3)
    ap.add_argument("--flatten-tree", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/chain_boot.py needs root (whiteouts, loop-free images, taps)")
    depths = [int(d) for d in args.depths.split(",") if d]
    qdepths = [int(d) for d in args.qemu_depths.split(",") if d]
    from vm_fixtures import build

    with tempfile.TemporaryDirectory(prefix="unionimg-bench-chain-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        run(["cp", "-a", str(build("tiny")), str(rootfs)])
        (rootfs / "sbin/bench-init").write_text(BENCH_INIT)
        (rootfs / "sbin/bench-init").chmod(0o755)
        base = work / "BASE.img"
        run(["mke2fs", "-q", "-t", "ext4", "-L", "BASE", "-d", str(rootfs), str(base), "64M"])
        udir = work / "udir"
        (udir / "upper").mkdir(parents=True)
        (udir / "work").mkdir()
        u_img = work / "U.img"
        layers = [chainlayers.extra_layer(work, f"X{i:02d}") for i in range(max(depths + qdepths))]
        t0 = time.monotonic()
        initrd = build_initramfs(work / "initrd.cpio.gz").path
        print(
            f"initramfs built in {time.monotonic() - t0:.1f} s; layer image "
            f"{layers[0].image.stat().st_blocks * 512 // 1024} KiB allocated each"
        )

        def fresh_u() -> None:
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "U", "-d", str(udir), str(u_img), "64M"])

        uml = umlprobe.select()
        print(f"UML kernel {uml.path} ({uml.release}); {args.repeat} boots per depth")
        print(
            f"{'hypervisor':10} {'layers':>6} {'uptime at init (median)':>24} {'wall (median)':>14}"
        )
        medians: dict[int, float] = {}
        for depth in depths:
            chain = layers[:depth]
            disks = [f"ubd0r={base}", f"ubd1={u_img}"] + [
                f"ubd{i + 2}r={la.image}" for i, la in enumerate(chain)
            ]
            cmdline = ["init=/sbin/bench-init"] + ([chainlayers.lowers(chain)] if chain else [])
            ups, walls = [], []
            for _ in range(args.repeat):
                fresh_u()
                with tempfile.TemporaryDirectory(prefix="uml-", dir=work) as home:
                    env = {**os.environ, "HOME": home, "TMPDIR": home}
                    up, wall = boot_once(
                        uml_argv(uml.path, Path(home), initrd, disks, cmdline), env
                    )
                ups.append(up)
                walls.append(wall)
            medians[depth] = statistics.median(ups)
            row("uml", depth, medians[depth], statistics.median(walls))
        if len(depths) > 1 and depths[-1] > depths[0]:
            slope = (medians[depths[-1]] - medians[depths[0]]) / (depths[-1] - depths[0])
            print(
                f"uml: initramfs cost per layer ~{slope * 1000:.0f} ms "
                f"({depths[0]} -> {depths[-1]} layers)"
            )

        vmlinuz = qemu_kernel()
        if vmlinuz is None or not qdepths:
            print("qemu: skipped (no /boot kernel with modules, or no --qemu-depths)")
        else:
            print(f"QEMU TCG, kernel {vmlinuz.name}; {args.qemu_repeat} boots per depth")
            qmed: dict[int, float] = {}
            for depth in qdepths:
                chain = layers[:depth]
                append = " ".join(
                    ["console=ttyS0", "panic=-1", "init=/sbin/bench-init"]
                    + ([chainlayers.lowers(chain)] if chain else [])
                )
                drives = [
                    f"file={base},format=raw,if=virtio,readonly=on",
                    f"file={u_img},format=raw,if=virtio",
                ]
                drives += [f"file={la.image},format=raw,if=virtio,readonly=on" for la in chain]
                argv = [
                    "qemu-system-x86_64",
                    "-machine",
                    "q35,accel=tcg",
                    "-m",
                    "256",
                    "-nographic",
                    "-no-reboot",
                    "-kernel",
                    str(vmlinuz),
                    "-initrd",
                    str(initrd),
                    "-append",
                    append,
                    "-net",
                    "none",
                ]
                for d in drives:
                    argv += ["-drive", d]
                ups, walls = [], []
                for _ in range(args.qemu_repeat):
                    fresh_u()
                    up, wall = boot_once(argv)
                    ups.append(up)
                    walls.append(wall)
                qmed[depth] = statistics.median(ups)
                row("qemu-tcg", depth, qmed[depth], statistics.median(walls))

        tree = args.flatten_tree
        if tree is None:
            cached = sorted((REPO / ".cache/fixtures").glob("debian-*/rootfs"))
            tree = cached[0] if cached else None
        if tree is None:
            print("flatten: skipped (no --flatten-tree and no cached Debian fixture)")
            return
        size = run(["du", "-sb", str(tree)]).stdout.split()[0]
        flat = work / "flat.img"
        t0 = time.monotonic()
        run(
            [
                "mke2fs",
                "-q",
                "-t",
                "ext4",
                "-d",
                str(tree),
                str(flat),
                f"{int(size) * 3 // 2 // (1 << 20) + 64}M",
            ]
        )
        took = time.monotonic() - t0
        alloc = flat.stat().st_blocks * 512
        print(
            f"flatten (one mkfs.ext4 -d of {tree}, {int(size) / 2**20:.0f} MiB of files): "
            f"{took:.1f} s, {alloc / 2**20:.0f} MiB allocated: per chain node, per host"
        )


if __name__ == "__main__":
    main()
