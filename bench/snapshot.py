"""What ``instance snapshot`` costs after an ``apt-get install``-sized change (issue 13, item 1).

A base from the ``debian`` fixture, one VM on it. In the VM's union (remounted exec, as
``bench/debvm.py`` does) its own ``apt-get install nginx`` (real packages from the Debian
mirror; without a route to it, two local packages of ``tests/debs.py`` with ``dpkg -i``).
Then, measured:

1. the generation's layer: adopting generation 1 into the layer store (its digest: one read
   of the whole base tree), paid once per generation, before the first snapshot over it;
2. ``instance snapshot`` of the change: seconds, the upper layer's bytes, the layer's tar,
   blob and image bytes, U's disk usage before and after (``fstrim`` gives the freed blocks
   back);
3. a second change (a one-line config edit) and its snapshot: a small N costs little;
4. for scale: the base's own bytes (what a snapshot never reads).

Run as root: ``.venv/bin/python bench/snapshot.py [--fixture debian|tiny] [--json]``.

Measured 2026-12-02 on this machine kind (2 cores, shared with other test runs: load average
about 6, which makes zstd and mke2fs 2-3x slower than on an idle machine), Debian fixture
(base image 587 MiB): generation 1's layer adopted in 7.1 s (once); ``apt-get update &&
apt-get install nginx`` (120 paths, 163 MiB of tar: apt's lists and .deb cache included)
snapshotted in 15.5 s into a 52.9 MiB blob and a 164 MiB image, U 171 MiB -> 26.5 MiB on disk
(its history keeps the changes, compressed); a 3-path config edit snapshotted in 2.3 s
(10 KiB tar).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.debvm import exec_union, sandboxed  # noqa: E402
from bench.generations import cli, local_debs_command, mirror_reachable, stored  # noqa: E402

APT = "apt-get -q -o Dpkg::Use-Pty=0"
INSTALL = f"{APT} update && {APT} install -y --no-install-recommends nginx"
EDIT = "sed -i 's/worker_connections 768/worker_connections 4096/' /etc/nginx/nginx.conf"


def main() -> int:
    from vm_fixtures import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="debian", choices=("debian", "tiny"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rootfs = build(args.fixture)
    out: dict[str, Any] = {"fixture": args.fixture}
    with tempfile.TemporaryDirectory(prefix="unionimg-snap-", dir="/var/tmp") as tmpdir:
        tmp = Path(tmpdir)
        store = tmp / "store"
        started = time.monotonic()
        cli(store, "base", "create", "b", "--from-dir", str(rootfs))
        out["base_create_seconds"] = round(time.monotonic() - started, 1)
        gen = json.loads(cli(store, "base", "show", "b", "--json").stdout)["generations"][0]
        out["base_image_bytes"] = gen["disk_usage"]
        cli(store, "instance", "create", "vm", "--base", "b", "--size", "2G")

        def unionimg(*a: str) -> None:
            cli(store, *a)

        if args.fixture == "tiny":
            install, edit = "mkdir -p /opt/tool && cp -a /bin /opt/tool/", "echo x >> /etc/motd"
            out["change"] = "a copy of /bin into /opt/tool"
        elif mirror_reachable(rootfs):
            install, edit = INSTALL, EDIT
            out["change"] = "apt-get install nginx (Debian mirror)"
        else:
            install = local_debs_command(tmp)
            edit = "echo '# edited' >> /etc/motd"
            out["change"] = "local debs (tests/debs.py): no route to the Debian mirror"
        with exec_union(unionimg, "vm", tmp / "mnt") as mnt:
            done = sandboxed(mnt, install)
            if done.returncode != 0:
                raise SystemExit(f"the change failed: {(done.stderr or done.stdout)[-800:]}")
        from unionimg.layers import base
        from unionimg.store.layout import Store

        st = Store(store)
        started = time.monotonic()
        base.generation_layer(st, base.get_generation(st, "b", 1))
        out["generation_layer_seconds"] = round(time.monotonic() - started, 2)
        for step, command in (("install", None), ("edit", edit)):
            if command is not None:
                with exec_union(unionimg, "vm", tmp / "mnt") as mnt:
                    done = sandboxed(mnt, command)
                    if done.returncode != 0:
                        raise SystemExit(f"{step} failed: {(done.stderr or done.stdout)[-800:]}")
            status = json.loads(cli(store, "status", "vm", "--json").stdout)
            before = stored(store / "layers")
            started = time.monotonic()
            snap = json.loads(cli(store, "instance", "snapshot", "vm", "--json").stdout)
            seconds = time.monotonic() - started
            out[step] = {
                "paths_changed": sum(
                    len(v) for k, v in status.items() if isinstance(v, list) and k != "identical"
                ),
                "seconds": round(seconds, 2),
                "tar_bytes": snap["tar_size"],
                "blob_bytes": snap["blob_size"],
                "image_bytes": snap["image_size"],
                "entries": snap["entries"],
                "layer_store_growth": stored(store / "layers") - before,
                "u_before": snap["u_disk_usage_before"],
                "u_after": snap["u_disk_usage_after"],
            }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mib = 1 << 20
    print(f"fixture {out['fixture']}: base image {out['base_image_bytes'] / mib:.0f} MiB; "
          f"change: {out['change']}")  # fmt: skip
    print(f"generation 1's layer adopted (its digest, once): {out['generation_layer_seconds']} s")
    print(f"{'step':<8} {'paths':>6} {'s':>6} {'tar MiB':>8} {'blob MiB':>9} {'image MiB':>10} "
          f"{'U MiB before':>13} {'after':>6}")  # fmt: skip
    for step in ("install", "edit"):
        r = out[step]
        print(
            f"{step:<8} {r['paths_changed']:>6} {r['seconds']:>6.2f} {r['tar_bytes'] / mib:>8.2f} "
            f"{r['blob_bytes'] / mib:>9.2f} {r['image_bytes'] / mib:>10.2f} "
            f"{r['u_before'] / mib:>13.1f} {r['u_after'] / mib:>6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
