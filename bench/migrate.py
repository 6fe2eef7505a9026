"""Migration benchmark (issue 14): bytes on a narrow link, unionimg beside its peers.

Two stores on one machine: the controller (this process's store) and namespace hosts with
their own sshd (:mod:`vm_fixtures.nethosts`), each host's link limited with ``tc tbf``
(``--rate``, default 50mbit). Everything is sent over that link in the same run and counted
the same way: the kernel's counters of the receiving host's eth0 (``to host``: what it
received, protocol, SSH/HTTP and TCP overhead included; ``back``: what it sent), and the wall
time of the transfer. Every result is checked on the receiver: unionimg's VM mounted there
and the peers' rebuilt image or tree must equal the sender's (a tree digest: paths, kinds,
modes, owners, xattrs, contents, files' mtimes; an image's sha256); one that does not is
reported failed and not compared.

Pairs (``--pairs a,c,d,b``; ``--quick``: the tiny busybox base, a few MB, no (b)):

(a) same OS: both stores hold the same base (the Debian fixture) and the host one VM of its
    own (a package of its own, a few edits); the migrating VM has the same base plus ~30 MB
    of its own packages (real Debian packages unpacked into its union with ``dpkg-deb -x``;
    ``--quick``: a few MB of the host's libraries) and 5 % of the base's regular files
    changed (4 KiB rewritten in each);
(c) the way back after a small change: on the host the VM gets ~1 MB new and 20 files
    edited, then goes back to the controller, which kept its contents when it left;
(d) a large own file: a VM whose upper layer holds a large file of its own (``--big``,
    default 200M; ``--quick`` 20M: random words, compressible about threefold) goes to the
    host (not measured), 1 % of that file is rewritten there in scattered 4 KiB pieces
    (page-aligned, as a database writes) and 2 % appended, and it comes back;
(b) different OS release: the host holds only a Debian 13 (trixie) base, made with
    mmdebstrap from the Debian mirror (cached in .cache/bench-migrate/trixie), the VM is
    built like (a)'s on the Debian 12 fixture: its base layer travels by content, found
    where the Debian 13 tree holds the same files.

Columns (:mod:`bench.migrate_peers` runs the peers): unionimg (``migrate --level``), its
stream alone (payload, not a transfer), ``rsync image`` (``--no-whole-file -z
--compress-choice=zstd`` of the flattened image, ``mke2fs -d`` of the VM's union, onto the
receiver's image), ``rsync tree`` (the same with ``-aAXH`` for the file tree onto the
receiver's tree), ``casync --seed`` (the receiver's image as seed, chunks over HTTP),
``zsync -i`` (the receiver's image as input, ranges over HTTP), ``zstd -3 copy`` (the whole
image through ssh), and the ``limit`` (computed, not sent: the distinct 4 KiB blocks of the
sender's files that the receiver's files do not hold, compressed together with zstd at the
stream's level). The receiver's image and tree: in (a) its own VM's, in (b) its Debian 13
tree's, in (c) and (d) the VM's as it left.

Run as root (the Debian fixture is built once and cached; 10-20 min for all pairs)::

    .venv/bin/python bench/migrate.py [--quick] [--pairs a,c,d,b] [--rate 50mbit]
        [--level 9] [--big 200M] [--json FILE] [--at COMMIT] [--keep]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import Uimg, sh  # noqa: E402
from bench.deploy import deb_for  # noqa: E402
from bench.migrate_peers import Outcome, all_peers, on_wire, tree_digest  # noqa: E402
from vm_fixtures import build  # noqa: E402
from vm_fixtures.nethosts import Host, Lab  # noqa: E402

PACKAGES = ["bind9", "dns-root-data", "exim4-daemon-light", "dovecot-core", "squid",
            "apache2-utils", "gawk", "fortunes", "samba"]  # fmt: skip
OWN_BYTES = 30 << 20
BLOCK = 4096


class Mounted:
    """A VM's union mounted (read-only unless ``write``) while the block lasts."""

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
    TRIXIE.parent.mkdir(parents=True, exist_ok=True)
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


# -- pair (d): a large file of the VM's own ----------------------------------------------

_VOCAB: list[str] = []


def words(rng: random.Random, n: int) -> bytes:
    """``n`` bytes of words drawn at random from a fixed vocabulary of 5,000 (a line break
    after about one word in twelve): text zstd compresses about threefold, no pattern."""
    if not _VOCAB:
        v = random.Random(7)
        _VOCAB.extend("".join(v.choices("abcdefghijklmnopqrstuvwxyz", k=v.randint(2, 11)))
                      for _ in range(5000))  # fmt: skip
        _VOCAB.extend(w + "\n" for w in _VOCAB[:450])
    out = b""
    while len(out) < n:
        out += (" ".join(rng.choices(_VOCAB, k=n // 6 + 16)) + " ").encode()
    return out[:n]


def write_big(path: Path, size: int, rng: random.Random) -> None:
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            chunk = words(rng, min(left, 8 << 20))
            fh.write(chunk)
            left -= len(chunk)


def edit_big(path: Path, rng: random.Random) -> tuple[int, int]:
    """Rewrite 1 % of ``path`` in scattered 4 KiB pieces (page-aligned, new words) and
    append 2 % more words; returns (pieces, bytes appended)."""
    size = path.stat().st_size
    pieces = max(1, size // 100 // BLOCK)
    appended = size // 50
    with open(path, "r+b") as fh:
        for page in sorted(rng.sample(range(size // BLOCK), pieces)):
            fh.seek(page * BLOCK)
            fh.write(words(rng, BLOCK))
        fh.seek(0, os.SEEK_END)
        fh.write(words(rng, appended))
    return pieces, appended


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise SystemExit(f"bad size {text!r} (e.g. 200M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# -- the run -------------------------------------------------------------------------------


@dataclass
class Bench:
    """What the pairs share: options, the lab, the controller's store, the work directory."""

    args: argparse.Namespace
    lab: Lab
    work: Path
    ctl: Uimg
    base: str
    size: str
    rng: random.Random
    h1: Host | None = None
    hu: Uimg | None = None
    back: Host | None = None
    kept: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def level(self) -> str:
        return str(self.args.level)


def add_host(lab: Lab, name: str, store: Path | None = None) -> Host:
    host = lab.add_host(name)
    if store is not None:
        host.store = store
    return host


def record_host(u: Uimg, name: str, host: Host) -> None:
    host.authorize(u("host", "key").strip())
    u("host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
      "--unionimg", str(common.UNIONIMG), "--host-key", str(host.host_key_pub))  # fmt: skip


def setup_h1(b: Bench) -> tuple[Host, Uimg, Host]:
    """h1 (the base and a VM of its own, reached from the controller as "h1") and the
    controller as a host ("ctl", reached from h1's store), made once."""
    if b.h1 is not None and b.hu is not None and b.back is not None:
        return b.h1, b.hu, b.back
    h1 = add_host(b.lab, "h1")
    hu = Uimg(h1.store)
    hu("instance", "list")
    sh("cp", "-a", str(b.ctl.store / "bases" / b.base), str(h1.store / "bases" / b.base))
    back = add_host(b.lab, "back", b.ctl.store)
    record_host(b.ctl, "h1", h1)
    record_host(hu, "ctl", back)
    # the host's own VM: a package of its own and a few edits
    hu("instance", "create", "other", "--base", b.base, "--hypervisor", "uml",
       "--mac", "52:54:00:14:0f:01", "--size", b.size)  # fmt: skip
    with Mounted(hu, "other", b.work / "mnt", write=True) as mnt:
        if not b.args.quick:
            deb = deb_for("fortunes", b.work / "debs")
            if deb is not None:
                sh("dpkg-deb", "-x", str(deb), str(mnt))
        (mnt / "etc" / "motd").write_text("the host's own VM\n")
    b.h1, b.hu, b.back = h1, hu, back
    return h1, hu, back


def move(u: Uimg, vm: str, to: str, level: str) -> dict[str, Any]:
    """An unmeasured migration (the setup of a later pair)."""
    out: dict[str, Any] = u.json("migrate", vm, "--to", to, "--level", level)
    return out


def unionimg_move(b: Bench, sender: Uimg, vm: str, to: str, host: Host, receiver: Uimg,
                  want: str) -> tuple[Outcome, dict[str, Any]]:  # fmt: skip
    """``migrate VM --to TO`` on the wire of ``host``, then the VM mounted on the receiver
    compared with the sender's tree."""
    out = Outcome("unionimg")
    report: dict[str, Any] = {}
    on_wire(host, out, lambda: report.update(
        sender.json("migrate", vm, "--to", to, "--level", b.level)))  # fmt: skip
    print(f"  unionimg: {out.rx:,} B to the host, {out.secs:.1f} s {out.note}".rstrip(), flush=True)
    if not out.note:
        with Mounted(receiver, vm, b.work / "mnt") as mnt:
            got = tree_digest(mnt)
        out.ok = got == want
        if not out.ok:
            out.note = "failed: the VM on the receiver differs from the sender's tree"
    return out, report


def run_pair(b: Bench, key: str, title: str, *, host: Host, sender: Uimg, vm: str, to: str,
             receiver: Uimg, src: tuple[Path, Path], basis: tuple[Path, Path],
             held: list[Path]) -> dict[str, Any]:  # fmt: skip
    """unionimg and every peer over ``host``'s limited link, the limit, the goals."""
    print(f"\n({key}) {title}: sending ...", flush=True)
    want = tree_digest(src[1])
    host.limit(b.args.rate)
    try:
        uo, report = unionimg_move(b, sender, vm, to, host, receiver, want)
        peers = all_peers(host, src, basis, want, b.work, b.lab.ctl_addr)
    finally:
        host.limit(None)
    lim = limit(src[1], held, b.args.level)
    res: dict[str, Any] = {
        "pair": key, "title": title, "rate": b.args.rate, "limit": lim,
        "unionimg": {**uo.to_json(), "stream_bytes": report.get("stream_bytes"),
                     "plan": (report.get("plan") or {}).get("by_reason"),
                     "methods": report.get("methods"), "chunked": report.get("chunked"),
                     "deltas": report.get("deltas"), "stages": report.get("stages")},
        "peers": [p.to_json() for p in peers],
    }  # fmt: skip
    res["goals"] = goals(key, uo, peers, lim)
    b.results.append(res)
    print_pair(res)
    return res


def goals(key: str, uo: Outcome, peers: list[Outcome], lim: int) -> list[dict[str, Any]]:
    """The issue's goals for this pair, each met or not, with the figures that decide it."""
    out = []
    ok = [p for p in peers if p.ok]
    failed = [p.name for p in peers if not p.ok]
    beaten = [p for p in ok if uo.rx < p.rx]
    detail = ", ".join(f"{p.name} {p.rx / uo.rx:.2f}x" for p in ok) if uo.rx else ""
    if failed:
        detail += f"; failed, not compared: {', '.join(failed)}"
    out.append({"goal": "fewer bytes to the host than every peer", "detail": detail,
                "met": uo.ok and len(beaten) == len(ok) and not failed})  # fmt: skip
    both = [p for p in ok if uo.rx + uo.tx < p.rx + p.tx]
    out.append({"goal": "fewer bytes than every peer, both directions counted",
                "detail": ", ".join(f"{p.name} {(p.rx + p.tx) / (uo.rx + uo.tx):.2f}x"
                                    for p in ok) if uo.rx else "",
                "met": uo.ok and len(both) == len(ok) and not failed})  # fmt: skip
    over = uo.rx / lim - 1 if lim else float("inf")
    out.append({"goal": "within 10 % of the limit", "detail": f"{over:+.1%}",
                "met": uo.ok and over <= 0.10})  # fmt: skip
    if key == "a":
        full = next((p for p in peers if p.name.startswith("zstd") and p.ok), None)
        saving = 1 - uo.rx / full.rx if full else None
        out.append({"goal": "saving vs the full zstd copy >= 38.7 % (the seed's)",
                    "detail": f"{saving:.1%}" if saving is not None else "no zstd copy",
                    "met": uo.ok and saving is not None and saving >= 0.387})  # fmt: skip
    return out


def print_pair(res: dict[str, Any]) -> None:
    lim = res["limit"]
    u = res["unionimg"]
    full = next((p["rx"] for p in res["peers"] if p["name"].startswith("zstd") and p["ok"]), 0)

    def ratios(n: int) -> str:
        vs_full = f"{n / full:>9.3f}x" if full else f"{'-':>10}"
        return f"{n / lim:>9.2f}x{vs_full}" if lim else f"{'-':>10}{vs_full}"

    print(f"\n({res['pair']}) {res['title']}  [link {res['rate']}]")
    print(f"  {'':18}{'to host':>14}{'back':>11}{'xfer s':>8}{'prep s':>8}"
          f"{'vs limit':>10}{'vs zstd':>10}  check")  # fmt: skip
    for row in [u, *res["peers"]]:
        check = "ok" if row["ok"] else row["note"][:60]
        prep = f"{row['prep']:>8.1f}" if row["prep"] else f"{'':>8}"
        print(f"  {row['name']:18}{row['rx']:>14,}{row['tx']:>11,}{row['secs']:>8.1f}{prep}"
              f"{ratios(row['rx'])}  {check}")  # fmt: skip
        if row is u and u.get("stream_bytes"):
            print(f"  {'  its stream':18}{u['stream_bytes']:>14,}{'':>27}"
                  f"{ratios(u['stream_bytes'])}  (payload alone)")  # fmt: skip
    print(f"  {'limit':18}{lim:>14,}{'':>27}{ratios(lim)}  (computed)")
    print(f"  unionimg: plan {json.dumps(u['plan'])}")
    if u.get("methods"):
        print(f"  unionimg: methods {json.dumps(u['methods'])}, chunked {u['chunked']}, "
              f"deltas {u['deltas']}")  # fmt: skip
    print(f"  unionimg: stages {json.dumps(u['stages'])}")
    for g in res["goals"]:
        print(f"  goal: {g['goal']}: {'met' if g['met'] else 'NOT met'} ({g['detail']})")


def pair_a(b: Bench, measure: bool) -> None:
    """(a): the VM app made here, sent to h1 (measured, or only moved for (c))."""
    h1, hu, _back = setup_h1(b)
    ctl = b.ctl
    ctl("instance", "create", "app", "--base", b.base, "--hypervisor", "uml",
        "--mac", "52:54:00:14:0f:02", "--size", b.size)  # fmt: skip
    with Mounted(ctl, "app", b.work / "mnt", write=True) as mnt:
        changed = change_base_files(mnt, 0.05, b.rng)
        own = own_content(mnt, b.args.quick, b.work)
    print(f"VM app: {changed} base files changed, {own:,} bytes of its own")
    src = flatten(ctl, "app", b.work, "a-src")
    b.kept["a-src"] = src
    if not measure:
        move(ctl, "app", "h1", b.level)
        return
    basis = flatten(hu, "other", b.work, "a-recv")
    run_pair(b, "a", "same OS: the host holds the base and a VM of its own", host=h1,
             sender=ctl, vm="app", to="h1", receiver=hu, src=src, basis=basis,
             held=[basis[1]])  # fmt: skip
    drop(*basis)


def pair_c(b: Bench) -> None:
    """(c): app edited on h1 and sent back to the controller, which kept its contents."""
    _h1, hu, back = setup_h1(b)
    with Mounted(hu, "app", b.work / "mnt", write=True) as mnt:
        (mnt / "srv").mkdir(exist_ok=True)
        (mnt / "srv" / "new-data.bin").write_bytes(b.rng.randbytes(1 << 20))
        etc = sorted(p for p in (mnt / "etc").rglob("*") if p.is_file() and not p.is_symlink())
        for p in etc[:20]:
            with open(p, "a") as fh:
                fh.write("# edited on h1\n")
    src = flatten(hu, "app", b.work, "c-src")
    basis = b.kept.pop("a-src")
    run_pair(b, "c", "the way back: ~1 MB new, 20 files edited", host=back, sender=hu,
             vm="app", to="ctl", receiver=b.ctl, src=src, basis=basis, held=[basis[1]])  # fmt: skip
    drop(*src, *basis)


def pair_d(b: Bench) -> None:
    """(d): a VM with a large file of its own goes to h1 (not measured), the file is edited
    there, and the VM comes back."""
    _h1, hu, back = setup_h1(b)
    ctl = b.ctl
    size = parse_size(b.args.big or ("20M" if b.args.quick else "200M"))
    ctl("instance", "create", "big", "--base", b.base, "--hypervisor", "uml",
        "--mac", "52:54:00:14:0f:04", "--size", b.size)  # fmt: skip
    rng = random.Random(16)
    with Mounted(ctl, "big", b.work / "mnt", write=True) as mnt:
        (mnt / "srv").mkdir(exist_ok=True)
        write_big(mnt / "srv" / "data.words", size, rng)
    left = flatten(ctl, "big", b.work, "d-left")
    t = time.monotonic()
    there = move(ctl, "big", "h1", b.level)
    print(f"VM big: {size:,} B file of its own; to h1 (no limit, not measured): "
          f"{there['stream_bytes']:,} B stream, {time.monotonic() - t:.1f} s")  # fmt: skip
    with Mounted(hu, "big", b.work / "mnt", write=True) as mnt:
        pieces, appended = edit_big(mnt / "srv" / "data.words", rng)
    print(f"VM big on h1: {pieces} pieces of 4 KiB rewritten, {appended:,} B appended")
    src = flatten(hu, "big", b.work, "d-src")
    run_pair(b, "d", f"a large own file ({size >> 20} MiB): 1 % rewritten in 4 KiB pieces "
             "and 2 % appended on the host, the way back", host=back, sender=hu, vm="big",
             to="ctl", receiver=ctl, src=src, basis=left, held=[left[1]])  # fmt: skip
    drop(*src, *left)


def pair_b(b: Bench) -> None:
    """(b): a Debian 13 host for a VM on the Debian 12 fixture."""
    trixie = trixie_rootfs()
    h4 = add_host(b.lab, "h4")
    h4u = Uimg(h4.store)
    h4u("base", "create", "trixie", "--from-dir", str(trixie))
    record_host(b.ctl, "h4", h4)
    b.ctl("instance", "create", "appb", "--base", b.base, "--hypervisor", "uml",
          "--mac", "52:54:00:14:0f:03", "--size", b.size)  # fmt: skip
    with Mounted(b.ctl, "appb", b.work / "mnt", write=True) as mnt:
        change_base_files(mnt, 0.05, random.Random(15))
        own_content(mnt, b.args.quick, b.work)
    src = flatten(b.ctl, "appb", b.work, "b-src")
    basis = (image_of(trixie, b.work / "b-recv.img"), trixie)
    run_pair(b, "b", "different release: the host holds a Debian 13 base only", host=h4,
             sender=b.ctl, vm="appb", to="h4", receiver=h4u, src=src, basis=basis,
             held=[trixie])  # fmt: skip
    drop(*src, basis[0])


def drop(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def pinned(commit: str, work: Path) -> tuple[Path, str]:
    """unionimg as committed at ``commit`` (``git archive`` of unionimg/ into the work
    directory) and a program running it with this venv's Python, for both sides; returns the
    program and the commit's short name."""
    code = work / "code"
    code.mkdir()
    rev = sh("git", "-C", str(REPO), "rev-parse", "--short", f"{commit}^{{commit}}").strip()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "unionimg"],
                         capture_output=True, check=True, timeout=120).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(code)], input=tar, check=True, timeout=120)
    prog = code / "run-unionimg"
    prog.write_text(
        f"#!{REPO / '.venv' / 'bin' / 'python3'}\n"
        f"import sys\nsys.path.insert(0, {str(code)!r})\n"
        "from unionimg.cli import main\nsys.exit(main())\n"
    )
    prog.chmod(0o755)
    return prog, rev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="The tiny base, a few MB: a minute.")
    ap.add_argument("--pairs", help="Pairs to run, e.g. a,c or d (default a,c,d,b; --quick "
                    "a,c,d); (c) without (a) moves (a)'s VM first, unmeasured.")  # fmt: skip
    ap.add_argument("--only-b", action="store_true", help="Pair (b) alone (= --pairs b).")
    ap.add_argument("--no-b", action="store_true", help="Skip pair (b).")
    ap.add_argument("--rate", default="50mbit", help="The host links' tc rate.")
    ap.add_argument("--level", type=int, default=9, help="zstd level of stream and limit.")
    ap.add_argument("--big", help="Size of (d)'s large file (default 200M; --quick 20M).")
    ap.add_argument("--json", type=Path, help="Write every pair's figures to this file.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    ap.add_argument("--at", metavar="COMMIT", help="Run unionimg as committed at COMMIT (both "
                    "sides), not the working tree's code.")  # fmt: skip
    args = ap.parse_args()
    pairs = args.pairs or ("b" if args.only_b else "a,c,d" if args.quick else "a,c,d,b")
    wanted = [p.strip() for p in pairs.split(",") if p.strip()]
    if args.no_b:
        wanted = [p for p in wanted if p != "b"]
    if not wanted or set(wanted) - set("abcd"):
        raise SystemExit(f"--pairs: a comma-separated list of a, b, c, d (got {pairs!r})")
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-migrate."))
    lab = Lab(work / "lab")
    base = "tiny" if args.quick else "deb"
    started = time.monotonic()
    try:
        if args.at:
            common.UNIONIMG, head = pinned(args.at, work)
            print(f"unionimg at {head} (as committed, on both sides)")
        else:
            head = sh("git", "-C", str(REPO), "describe", "--always", "--dirty").strip()
            print(f"unionimg at {head} (the working tree's code, on both sides)")
        ctl = Uimg(work / "ctl")
        t = time.monotonic()
        ctl("base", "create", base, "--from-dir", str(build("tiny" if args.quick else "debian")))
        print(f"base create ({base}): {time.monotonic() - t:.1f} s")
        b = Bench(args, lab, work, ctl, base, "512M" if args.quick else "4G", random.Random(14))
        if "a" in wanted or "c" in wanted:
            pair_a(b, measure="a" in wanted)
        if "c" in wanted:
            pair_c(b)
        if "d" in wanted:
            pair_d(b)
        if "b" in wanted:
            pair_b(b)
        print(f"\nsummary ({args.rate}, {time.monotonic() - started:.0f} s in all):")
        for res in b.results:
            met = sum(g["met"] for g in res["goals"])
            print(f"  ({res['pair']}) unionimg {res['unionimg']['rx']:,} B; limit "
                  f"{res['limit']:,} B; goals met {met}/{len(res['goals'])}")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"rate": args.rate, "level": args.level,
                                             "quick": args.quick, "unionimg_at": head,
                                             "pairs": b.results},
                                            indent=1) + "\n")  # fmt: skip
            print(f"JSON: {args.json}")
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
