"""Bytes a ``base update`` stores: delta generations against full ones (issue 13, item 1).

Two stores get the same base (the ``debian`` fixture by default) and the same updates:

1. ``apt-get install openssh-server`` (real packages from the Debian mirror; without a route
   to it, two local packages built by ``tests/debs.py`` installed with ``dpkg -i``);
2. a one-line edit of a configuration file (``sed -i``).

Store ``delta`` lets ``base update`` choose (a delta layer where it holds under half of a
whole image); store ``full`` passes ``--full`` (every generation a whole image, as before
issue 13). Printed per update: the generation's kind, the bytes the store grew by (every
file's allocated blocks, each inode once: the layer store's hard links cost nothing), the
image alone, and the seconds ``base update`` took. Then a VM made on generation 1 in each
store, with a local edit, is reconciled to the latest: the two reports must name the same
actions and the two unions must hold the same files (reconcile unaffected by the layout).
The cost of a full generation's diff_id (paid once, when the first delta over it is made or
a push needs it) is measured apart.

Run as root: ``.venv/bin/python bench/generations.py [--fixture debian|tiny] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
sys.path.insert(0, str(REPO))

APT = "apt-get -q -o Dpkg::Use-Pty=0"
INSTALL = f"{APT} update && {APT} install -y --no-install-recommends openssh-server"
EDIT = "sed -i 's/^#Port 22$/Port 2222/' /etc/ssh/sshd_config"
LOCAL_EDIT = "sed -i 's/^/# edited /' /etc/motd"


def stored(root: Path) -> int:
    """Bytes allocated below ``root``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def cli(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(UNIONIMG), "--store", str(store), *args], capture_output=True, text=True
    )
    if check and res.returncode != 0:
        raise SystemExit(f"unionimg {' '.join(args)} failed: {(res.stderr or res.stdout)[-800:]}")
    return res


def update(store: Path, command: str, full: bool) -> dict[str, Any]:
    before = stored(store)
    started = time.monotonic()
    argv = [str(UNIONIMG), "--store", str(store), "--debug", "base", "update", "b"]
    res = subprocess.run(
        [*argv, "--run", command, *(["--full"] if full else [])],
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if res.returncode != 0:
        raise SystemExit(f"base update failed: {(res.stderr or res.stdout)[-800:]}")
    # where the seconds went, from base.py's --debug lines
    parts = [
        ln.removeprefix("unionimg: ")
        for ln in res.stderr.splitlines()
        if ln.startswith(("unionimg: generation ",))
    ]
    show = json.loads(cli(store, "base", "show", "b", "--json").stdout)
    gen = show["generations"][-1]
    return {
        "generation": gen["number"],
        "kind": gen["kind"],
        "stored": stored(store) - before,
        "image": gen["disk_usage"],
        "seconds": round(seconds, 1),
        "parts": parts,
    }


def local_debs_command(tmp: Path) -> str:
    """No mirror: two packages of tests/debs.py, copied into the tree by the command."""
    from tests import debs

    out = tmp / "debs"
    out.mkdir()
    made = [debs.build(debs.plain_package(f"uimg-bench{i}"), out) for i in (1, 2)]
    return debs.install_command(*made)


def mirror_reachable(rootfs: Path) -> bool:
    """Whether the first mirror the tree's apt sources name answers on port 80."""
    apt = rootfs / "etc/apt"
    text = "".join(
        p.read_text(errors="replace")
        for p in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*"))]
        if p.is_file()
    )
    hosts = [w.split("/")[2] for w in text.split() if w.startswith("http://")]
    if not hosts:
        return False
    import socket

    try:
        socket.create_connection((hosts[0], 80), timeout=5).close()
    except OSError:
        return False
    return True


def main() -> int:
    from vm_fixtures import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="debian", choices=("debian", "tiny"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rootfs = build(args.fixture)
    out: dict[str, Any] = {"fixture": args.fixture}
    with tempfile.TemporaryDirectory(prefix="unionimg-gens-", dir="/var/tmp") as tmpdir:
        tmp = Path(tmpdir)
        install = INSTALL
        if args.fixture == "tiny":  # no dpkg there: a program and its files
            install = (
                "mkdir -p /opt/tool/lib && cp /bin/busybox /opt/tool/ && touch /opt/tool/lib/x"
            )
            out["install"] = "a copy of busybox into /opt/tool"
        elif not mirror_reachable(rootfs):
            install = local_debs_command(tmp)
            out["install"] = "local debs (tests/debs.py): no route to the Debian mirror"
        else:
            out["install"] = "apt-get install openssh-server (Debian mirror)"
        steps = [("install", install), ("edit", EDIT if args.fixture == "debian" else LOCAL_EDIT)]
        for layout in ("delta", "full"):
            store = tmp / layout
            started = time.monotonic()
            cli(store, "base", "create", "b", "--from-dir", str(rootfs))
            out.setdefault("create_seconds", {})[layout] = round(time.monotonic() - started, 1)
            out.setdefault("generation1_bytes", stored(store))
            cli(store, "instance", "create", "vm", "--base", "b", "--hypervisor", "uml")
            mnt = tmp / f"{layout}-mnt"
            mnt.mkdir()
            cli(store, "mount", "vm", str(mnt))
            try:
                ver = mnt / "etc/debian_version"
                if ver.exists():
                    ver.write_text("# local\n" + ver.read_text())
                (mnt / "etc/motd").write_text("the VM's own motd\n")
            finally:
                cli(store, "umount", str(mnt))
        # each step in both stores, the order alternating (neither always gets a warm cache)
        for i, (step, command) in enumerate(steps):
            for layout in ("full", "delta") if i % 2 == 0 else ("delta", "full"):
                row = update(tmp / layout, command, full=layout == "full")
                out.setdefault(layout, {})[step] = row
        for layout in ("delta", "full"):
            store = tmp / layout
            mnt = tmp / f"{layout}-mnt"
            res = cli(store, "reconcile", "vm", "--json", check=False)
            rec = json.loads(res.stdout)
            print(f"{layout}: reconcile exit {res.returncode}", file=sys.stderr)
            inst = rec["instances"][0]
            out.setdefault("reconcile", {})[layout] = {
                "actions": sorted((a["path"], a["action"]) for a in inst.get("actions", [])),
            }
            cli(store, "mount", "vm", str(mnt), "--readonly")
            try:
                from unionimg.fs.manifest import Manifest, scan_tree
                from unionimg.layers import base
                from unionimg.store.layout import Store

                union = {
                    e.path: e.content_key() + e.meta_key()
                    for e in scan_tree(mnt, skip_top=("lost+found",))
                }
            finally:
                cli(store, "umount", str(mnt))
            # what the VM holds beyond its (latest) generation: its own changes, its identity
            with Manifest(base.get_generation(Store(store), "b", 3).manifest_path) as m:
                gen = {e.path: e.content_key() + e.meta_key() for e in m}
            own = sorted(p for p in set(union) | set(gen) if union.get(p) != gen.get(p))
            out.setdefault("_own", {})[layout] = own
        owns = out.pop("_own")
        rec = out["reconcile"]
        out["reconcile_same"] = rec["delta"]["actions"] == rec["full"]["actions"]
        # the two stores' apt runs differ (logs, caches), so each union is compared with its
        # own generation 3: the VM's own paths must be the same in both stores
        out["vm_own_paths"] = owns["delta"]
        out["union_same"] = owns["delta"] == owns["full"]
        for layout in ("delta", "full"):
            rec[layout]["actions"] = len(rec[layout]["actions"])
        # a full generation's diff_id: what its first delta (or push) pays once
        from unionimg.layers import base, layerstore
        from unionimg.store.layout import Store

        st = Store(tmp / "full")
        g1 = base.get_generation(st, "b", 1)
        with base.generation_tree(st, g1, tmp / "digest") as tree:
            started = time.monotonic()
            layerstore.tree_digest(tree, kind="base")
            out["full_diff_id_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mib = 1 << 20
    print(f"fixture {out['fixture']}: generation 1 {out['generation1_bytes'] / mib:.0f} MiB stored")
    print(f"update 1: {out['install']}; update 2: a one-line config edit")
    print(f"{'update':<8} {'layout':<6} {'kind':<6} {'stored MiB':>11} {'image MiB':>10} {'s':>6}")
    for step in ("install", "edit"):
        for layout in ("delta", "full"):
            r = out[layout][step]
            print(
                f"{step:<8} {layout:<6} {r['kind']:<6} {r['stored'] / mib:>11.1f} "
                f"{r['image'] / mib:>10.1f} {r['seconds']:>6.1f}"
            )
            for part in r["parts"]:
                print(f"{'':<8} {part}")
    for step in ("install", "edit"):
        d, f = out["delta"][step]["stored"], out["full"][step]["stored"]
        print(f"{step}: delta stores {100 * d / f:.1f} % of the full generation's bytes")
    print(f"a full generation's diff_id (once): {out['full_diff_id_seconds']} s")
    print(
        f"reconcile of a VM from 1 to 3: same actions {out['reconcile_same']} "
        f"({out['reconcile']['delta']['actions']}); the union holds, beyond its generation, "
        f"the same paths in both stores: {out['union_same']} ({' '.join(out['vm_own_paths'])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
