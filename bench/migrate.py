"""Migration benchmark (issue 14): bytes on a narrow link, unionimg beside its peers.

Two stores on one machine: the controller (this process's store) and a namespace host with
its own sshd (:mod:`vm_fixtures.nethosts`), its link limited with ``tc tbf`` (``--rate``,
default 50mbit); unionimg's bytes are the kernel's counters of the host's eth0 (what it
received: the stream, SSH and TCP overhead included), its time the command's wall time.

Pairs:

(a) same OS: both stores hold the same base (the Debian fixture; ``--quick``: the tiny
    busybox base) and the host one VM of its own (a package of its own, a few edits); the
    migrating VM has the same base plus ~30 MB of its own packages (real Debian packages
    unpacked into its union with ``dpkg-deb -x``; ``--quick``: a few MB of the host's
    libraries) and 5 % of the base's regular files changed (4 KiB rewritten in each);
(c) the way back after a small change: on the host the VM gets ~1 MB new and 20 files
    edited, then goes back to the controller, which kept its contents when it left.

(b) different OS release: the host holds only a Debian 13 (trixie) base, made with
    mmdebstrap from the Debian mirror (cached in .cache/bench-migrate/trixie), the VM is
    built like (a)'s on the Debian 12 fixture: its base layer travels by content, found
    where the Debian 13 tree holds the same files (``--no-b`` skips it; ``--quick`` too).

Peers, on the same pair, computed here (not sent over the link; rsync's own byte count):

- ``rsync image``: ``rsync --no-whole-file -z --compress-choice=zstd`` of the sender's
  flattened image (the VM's whole union, ``mke2fs -d``) onto the receiver's flattened image
  (for (a) its own VM's; for (c) the VM's earlier image): "Total bytes sent";
- ``rsync tree``: the same for the file trees (``-a``, onto a copy of the receiver's tree);
- ``casync --seed``: the chunks of the sender's image (``casync make``, its default chunk
  sizes and zstd) that the receiver's image (chunked the same way: what ``--seed`` finds)
  lacks, as casync stores them, plus the index;
- ``zstd -3``: the whole flattened image compressed (a plain compressed copy);
- ``limit``: the distinct 4 KiB blocks of the sender's files that the receiver's files do not
  hold, compressed together with zstd at the stream's level.

Run as root (minutes; the Debian fixture is built once and cached)::

    .venv/bin/python bench/migrate.py [--quick] [--rate 50mbit] [--level 9] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import UNIONIMG, Uimg, sh  # noqa: E402
from bench.deploy import deb_for  # noqa: E402
from vm_fixtures import build  # noqa: E402
from vm_fixtures.nethosts import Host, Lab  # noqa: E402

PACKAGES = ["bind9", "dns-root-data", "exim4-daemon-light", "dovecot-core", "squid",
            "apache2-utils", "gawk", "fortunes", "samba"]  # fmt: skip
OWN_BYTES = 30 << 20
BLOCK = 4096


class Mounted:
    """A VM's union mounted read-only while the block lasts."""

    def __init__(self, u: Uimg, vm: str, mnt: Path, *, write: bool = False) -> None:
        self.u, self.vm, self.mnt, self.write = u, vm, mnt, write

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.u("mount", self.vm, str(self.mnt), *(() if self.write else ("--readonly",)))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        self.u("umount", str(self.mnt))


def tree_bytes(root: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(top, name)).st_size
    return total


def flatten(u: Uimg, vm: str, work: Path, name: str) -> tuple[Path, Path]:
    """The VM's union as an ext4 image (``mke2fs -d``) and as a plain tree copy."""
    img, tree = work / f"{name}.img", work / f"{name}.tree"
    with Mounted(u, vm, work / "mnt") as mnt:
        size = tree_bytes(mnt) * 13 // 10 + (96 << 20)
        with open(img, "wb") as fh:
            fh.truncate(size)
        sh("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(mnt), str(img))
        sh("cp", "-a", f"{mnt}/.", str(tree))
    return img, tree


def rsync_sent(src: Path, basis: Path, work: Path, *, tree: bool) -> int:
    """rsync's "Total bytes sent" for ``src`` onto a copy of ``basis`` (its delta: the
    basis is what the receiver holds)."""
    dst = work / ("rsync-tree" if tree else "rsync-img")
    shutil.rmtree(dst, ignore_errors=True)
    if tree:
        sh("cp", "-a", str(basis), str(dst))
        args = ["rsync", "-aX", "--delete", f"{src}/", f"{dst}/"]
    else:
        dst.mkdir()
        sh("cp", "--sparse=always", str(basis), str(dst / src.name))
        args = ["rsync", "--inplace", str(src), str(dst / src.name)]
    out = sh(args[0], "--no-whole-file", "-z", "--compress-choice=zstd", "--stats", *args[1:])
    shutil.rmtree(dst, ignore_errors=True)
    m = re.search(r"Total bytes sent: ([\d,.]+)", out)
    if not m:
        raise SystemExit(f"rsync printed no byte count: {out[-300:]}")
    return int(re.sub(r"[,.]", "", m.group(1)))


def casync_needed(src: Path, seed: Path, work: Path) -> int:
    """Bytes casync would fetch: the sender's chunks the seed's chunking lacks, as stored
    (zstd), and the index."""
    d = work / "casync"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    sh("casync", "make", f"--store={d / 'src'}", str(d / "src.caibx"), str(src))
    sh("casync", "make", f"--store={d / 'seed'}", str(d / "seed.caibx"), str(seed))

    def chunks(store: Path) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in store.rglob("*.cacnk")}

    have = chunks(d / "seed")
    total = sum(size for name, size in chunks(d / "src").items() if name not in have)
    total += (d / "src.caibx").stat().st_size
    shutil.rmtree(d, ignore_errors=True)
    return total


def zstd_size(path: Path, level: int) -> int:
    proc = subprocess.Popen(["zstd", "-q", "-c", f"-{level}", "-T2", str(path)],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    n = 0
    while chunk := proc.stdout.read(1 << 20):
        n += len(chunk)
    if proc.wait() != 0:
        raise SystemExit("zstd failed")
    return n


def _blocks(root: Path) -> Any:
    for top, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(top, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as fh:
                while block := fh.read(BLOCK):
                    yield block


def limit(src: Path, held: list[Path], level: int) -> int:
    """The distinct 4 KiB blocks of ``src``'s files that no tree in ``held`` holds,
    compressed together (zstd, ``level``)."""
    have: set[bytes] = set()
    for tree in held:
        have.update(hashlib.sha256(b).digest() for b in _blocks(tree))
    cobj = zstandard.ZstdCompressor(level=level).compressobj()
    n = 0
    for block in _blocks(src):
        h = hashlib.sha256(block).digest()
        if h in have:
            continue
        have.add(h)
        n += len(cobj.compress(block))
    return n + len(cobj.flush())


def change_base_files(mnt: Path, fraction: float, rng: random.Random) -> int:
    """Rewrite 4 KiB (at a random offset) of ``fraction`` of the regular files of the union
    ``mnt`` (what the base holds: picked before the VM's own files are added)."""
    files = []
    for top, _dirs, names in os.walk(mnt):
        for name in names:
            p = os.path.join(top, name)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0:
                files.append(p)
    files.sort()
    picked = rng.sample(files, max(1, int(len(files) * fraction)))
    for p in picked:
        size = os.path.getsize(p)
        off = rng.randrange(0, max(1, size - BLOCK)) if size > BLOCK else 0
        with open(p, "r+b") as fh:
            fh.seek(off)
            fh.write(rng.randbytes(min(BLOCK, size)))
    return len(picked)


def own_content(mnt: Path, quick: bool, work: Path) -> int:
    """The VM's own packages: unpacked Debian packages (~30 MB), or host libraries."""
    if quick:
        dest = mnt / "opt" / "own"
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        for p in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("lib*.so.*")):
            small = p.is_file() and not p.is_symlink() and p.stat().st_size < (1 << 20)
            if small and n < (3 << 20):
                shutil.copy2(p, dest / p.name)
                n += p.stat().st_size
        return n
    before = tree_bytes(mnt)
    for pkg in PACKAGES:
        if tree_bytes(mnt) - before >= OWN_BYTES:
            break
        deb = deb_for(pkg, work / "debs")
        if deb is not None:
            sh("dpkg-deb", "-x", str(deb), str(mnt))
    return tree_bytes(mnt) - before


TRIXIE = REPO / ".cache" / "bench-migrate" / "trixie"


def trixie_rootfs() -> Path:
    """A Debian 13 minbase tree with the fixture's packages (mmdebstrap, cached)."""
    if (TRIXIE / "etc" / "debian_version").is_file():
        return TRIXIE
    partial = TRIXIE.with_name("trixie.partial")
    shutil.rmtree(partial, ignore_errors=True)
    print("mmdebstrap trixie (a few minutes, once) ...")
    done = subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
         "--include=systemd,systemd-sysv,udev,iproute2,kmod,linux-image-amd64",
         '--aptopt=APT::Install-Recommends "false"',
         "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/info/*",
         "--dpkgopt=path-exclude=/usr/share/doc/*", "trixie", str(partial),
         "deb http://deb.debian.org/debian trixie main"],
        capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, "INITRD": "No", "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"mmdebstrap trixie failed: {done.stderr.strip()[-500:]}")
    partial.rename(TRIXIE)
    return TRIXIE


def image_of(tree: Path, img: Path) -> Path:
    with open(img, "wb") as fh:
        fh.truncate(tree_bytes(tree) * 13 // 10 + (96 << 20))
    sh("mke2fs", "-F", "-q", "-t", "ext4", "-d", str(tree), str(img))
    return img


def add_host(lab: Lab, ctl: Uimg, name: str, store: Path | None = None) -> Host:
    host = lab.add_host(name)
    if store is not None:
        host.store = store
    return host


def record_host(u: Uimg, name: str, host: Host) -> None:
    host.authorize(u("host", "key").strip())
    u("host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
      "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub))  # fmt: skip


def migrate(u: Uimg, vm: str, to: str, wire_host: Host, level: int) -> dict[str, Any]:
    dry = u.json("migrate", vm, "--to", to, "--dry-run", "--level", str(level))
    before = wire_host.counters()["rx_bytes"]
    t = time.monotonic()
    out: dict[str, Any] = u.json("migrate", vm, "--to", to, "--level", str(level))
    out["wall"] = time.monotonic() - t
    out["wire"] = wire_host.counters()["rx_bytes"] - before
    out["dry"] = dry
    return out


def report(title: str, row: dict[str, int], secs: float, rate: int) -> None:
    print(f"\n{title}")
    lim = row["limit"]
    print(f"  {'':24}{'bytes':>14}{'vs limit':>10}{'at rate':>10}")
    for what, n in row.items():
        print(f"  {what:24}{n:>14,}{n / lim:>9.2f}x{n * 8 / rate:>9.1f}s")
    print(f"  unionimg wall time {secs:.1f} s (scan, offer, stream, verify, mke2fs, remove)")


def run_b(args: argparse.Namespace, lab: Lab, ctl: Uimg, base: str, size: str, work: Path,
          rate: int) -> None:  # fmt: skip
    """(b) a Debian 13 host for a VM on the Debian 12 fixture."""
    # (b) a Debian 13 host for a VM on the Debian 12 fixture
    trixie = trixie_rootfs()
    h4 = add_host(lab, ctl, "h4")
    h4u = Uimg(h4.store)
    h4u("base", "create", "trixie", "--from-dir", str(trixie))
    record_host(ctl, "h4", h4)
    ctl("instance", "create", "appb", "--base", base, "--hypervisor", "uml",
        "--mac", "52:54:00:14:0f:03", "--size", size)  # fmt: skip
    with Mounted(ctl, "appb", work / "mnt", write=True) as mnt:
        change_base_files(mnt, 0.05, random.Random(15))
        own_content(mnt, args.quick, work)
    b_img, b_tree = flatten(ctl, "appb", work, "b-src")
    r_img = image_of(trixie, work / "b-recv.img")
    row_b: dict[str, int] = {}
    h4.limit(args.rate)
    out = migrate(ctl, "appb", "h4", h4, args.level)
    h4.limit(None)
    row_b["unionimg (wire)"] = out["wire"]
    row_b["unionimg (stream)"] = out["stream_bytes"]
    print("\n(b) plan:", json.dumps(out["dry"]["plan"]["by_reason"]))
    print("(b) stages:", json.dumps(out["stages"]))
    row_b["rsync image"] = rsync_sent(b_img, r_img, work, tree=False)
    row_b["rsync tree"] = rsync_sent(b_tree, trixie, work, tree=True)
    row_b["casync --seed"] = casync_needed(b_img, r_img, work)
    row_b["zstd -3 image"] = zstd_size(b_img, 3)
    row_b["limit"] = limit(b_tree, [trixie], args.level)
    report("(b) different release: the host holds a Debian 13 base only", row_b,
           out["wall"], rate)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="The tiny base, a few MB: seconds.")
    ap.add_argument("--rate", default="50mbit", help="The host links' tc rate.")
    ap.add_argument("--level", type=int, default=9, help="zstd level of stream and limit.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    ap.add_argument("--no-b", action="store_true", help="Skip pair (b) (Debian 13 receiver).")
    ap.add_argument("--only-b", action="store_true", help="Run pair (b) alone.")
    args = ap.parse_args()
    m = re.fullmatch(r"(\d+)mbit", args.rate)
    rate = int(m.group(1)) * 10**6 if m else 50 * 10**6
    rng = random.Random(14)
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-migrate."))
    lab = Lab(work / "lab")
    base = "tiny" if args.quick else "deb"
    try:
        ctl = Uimg(work / "ctl")
        t = time.monotonic()
        ctl("base", "create", base, "--from-dir", str(build("tiny" if args.quick else "debian")))
        print(f"base create ({base}): {time.monotonic() - t:.1f} s")
        h1 = add_host(lab, ctl, "h1")
        hu = Uimg(h1.store)
        hu("instance", "list")
        sh("cp", "-a", str(ctl.store / "bases" / base), str(h1.store / "bases" / base))
        back = add_host(lab, ctl, "back", ctl.store)
        record_host(ctl, "h1", h1)
        record_host(hu, "ctl", back)
        size = "512M" if args.quick else "4G"
        # the host's own VM: a package of its own and a few edits
        hu("instance", "create", "other", "--base", base, "--hypervisor", "uml",
           "--mac", "52:54:00:14:0f:01", "--size", size)  # fmt: skip
        with Mounted(hu, "other", work / "mnt", write=True) as mnt:
            if not args.quick:
                deb = deb_for("fortunes", work / "debs")
                if deb is not None:
                    sh("dpkg-deb", "-x", str(deb), str(mnt))
            (mnt / "etc" / "motd").write_text("the host's own VM\n")
        # the migrating VM: 5 % of the base's files changed, ~30 MB of its own
        ctl("instance", "create", "app", "--base", base, "--hypervisor", "uml",
            "--mac", "52:54:00:14:0f:02", "--size", size)  # fmt: skip
        with Mounted(ctl, "app", work / "mnt", write=True) as mnt:
            changed = change_base_files(mnt, 0.05, rng)
            own = own_content(mnt, args.quick, work)
        print(f"VM app: {changed} base files changed, {own:,} bytes of its own")

        if args.only_b:
            run_b(args, lab, ctl, base, size, work, rate)
            return
        # (a) same OS
        s_img, s_tree = flatten(ctl, "app", work, "a-src")
        r_img, r_tree = flatten(hu, "other", work, "a-recv")
        row_a: dict[str, int] = {}
        h1.limit(args.rate)
        out = migrate(ctl, "app", "h1", h1, args.level)
        h1.limit(None)
        row_a["unionimg (wire)"] = out["wire"]
        row_a["unionimg (stream)"] = out["stream_bytes"]
        print("(a) plan:", json.dumps(out["dry"]["plan"]["by_reason"]))
        print("(a) stages:", json.dumps(out["stages"]))
        row_a["rsync image"] = rsync_sent(s_img, r_img, work, tree=False)
        row_a["rsync tree"] = rsync_sent(s_tree, r_tree, work, tree=True)
        row_a["casync --seed"] = casync_needed(s_img, r_img, work)
        row_a["zstd -3 image"] = zstd_size(s_img, 3)
        row_a["limit"] = limit(s_tree, [r_tree], args.level)
        report("(a) same OS: host holds the base and a VM of its own", row_a, out["wall"], rate)

        # (c) the way back after a small change on the host
        with Mounted(hu, "app", work / "mnt", write=True) as mnt:
            (mnt / "srv").mkdir(exist_ok=True)
            (mnt / "srv" / "new-data.bin").write_bytes(rng.randbytes(1 << 20))
            etc = sorted(p for p in (mnt / "etc").rglob("*") if p.is_file() and not p.is_symlink())
            for p in etc[:20]:
                with open(p, "a") as fh:
                    fh.write("# edited on h1\n")
        c_img, c_tree = flatten(hu, "app", work, "c-src")
        row_c: dict[str, int] = {}
        back.limit(args.rate)
        out = migrate(hu, "app", "ctl", back, args.level)
        back.limit(None)
        row_c["unionimg (wire)"] = out["wire"]
        row_c["unionimg (stream)"] = out["stream_bytes"]
        print("\n(c) plan:", json.dumps(out["dry"]["plan"]["by_reason"]))
        row_c["rsync image"] = rsync_sent(c_img, s_img, work, tree=False)
        row_c["rsync tree"] = rsync_sent(c_tree, s_tree, work, tree=True)
        row_c["casync --seed"] = casync_needed(c_img, s_img, work)
        row_c["zstd -3 image"] = zstd_size(c_img, 3)
        row_c["limit"] = limit(c_tree, [s_tree], args.level)
        report("(c) the way back: ~1 MB new, 20 files edited", row_c, out["wall"], rate)

        if not (args.quick or args.no_b):
            run_b(args, lab, ctl, base, size, work, rate)
    finally:
        lab.close()
        subprocess.run(["umount", "-R", str(work / "mnt")], capture_output=True, check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices, mounts, namespaces)")
    main()
