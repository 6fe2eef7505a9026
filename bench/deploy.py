"""Deploy benchmark (issue 13): the seed's training-site scenario, scaled to fit one machine.

A Debian fixture base; 10 VMs in the seed's roles (2 mail, 2 DNS, a proxy, a file server,
4 desktops), each with its role's packages (real Debian packages' files, unpacked into its
union with ``dpkg-deb -x``: from the host's apt cache, else ``apt-get download``) and its
configs; three system nodes: ``initial``, ``cleaned`` ("malware removed": a few files
changed per VM) and ``restored`` (those files back as they were). Then, on the wire (the
veth counters of a namespace host with its own sshd, the registry in its own namespace,
:mod:`vm_fixtures.nethosts`):

- first deploy of ``initial`` to an empty host;
- redeploy to ``cleaned``, then to ``restored``;
- the baseline with no cache: every VM's full image, flattened (base + its layers), as the
  same canonical tar and the same zstd level a layer blob uses — what a host would receive
  for each deploy if it kept nothing.

Prints bytes and ratios side by side, and where each deploy's time goes: the push, the
host's pull split into its fetch (the network: manifests, configs, blobs, each blob's
sha256 checked as it arrives) and its import (extracting each verified blob into its layer
image), the host making the base generations it lacked (from the pulled layers: no
``base create``), the VMs (fresh U images, identity), and the rest (SSH, the cache query,
checks, records); and the share of the first deploy's time that is the transfer (push +
fetch). Goals: first deploy <= 12 % of the no-cache bytes (seed: 25.1 %), redeploy <= 0.1 %
(seed: 0.17 %); deploy time dominated by the transfer.

Run as root (minutes; the Debian fixture is built once and cached)::

    .venv/bin/python bench/deploy.py [--vms 10] [--keep]
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
sys.path.insert(0, str(REPO))

from bench.common import UNIONIMG, Uimg, sh  # noqa: E402
from unionimg.layers.layer import write_blob  # noqa: E402
from unionimg.registry import server  # noqa: E402
from vm_fixtures import build  # noqa: E402
from vm_fixtures.nethosts import Lab  # noqa: E402

APT_CACHE = Path("/var/cache/apt/archives")

ROLES: list[tuple[str, list[str]]] = [
    ("mail1", ["exim4-daemon-light", "dovecot-core"]),
    ("mail2", ["exim4-daemon-light", "dovecot-core"]),
    ("dns1", ["bind9", "dns-root-data"]),
    ("dns2", ["bind9", "dns-root-data"]),
    ("proxy", ["squid", "apache2-utils"]),
    ("files", ["samba", "libarchive-tools"]),
    ("desk1", ["fonts-liberation", "fortunes"]),
    ("desk2", ["fonts-liberation", "espeak-ng-data"]),
    ("desk3", ["fonts-liberation", "fortunes"]),
    ("desk4", ["fonts-liberation", "gawk"]),
]


def deb_for(package: str, downloads: Path) -> Path | None:
    found = sorted(APT_CACHE.glob(f"{package}_*.deb")) + sorted(downloads.glob(f"{package}_*"))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["apt-get", "download", package], cwd=downloads, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        print(f"  (no .deb for {package}: {done.stderr.strip()[-120:]})")
        return None
    found = sorted(downloads.glob(f"{package}_*"))
    return found[-1] if found else None


def edit_union(u: Uimg, vm: str, mnt: Path, debs: list[Path], files: dict[str, str]) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    u("mount", vm, str(mnt))
    try:
        for deb in debs:
            sh("dpkg-deb", "-x", str(deb), str(mnt))
        for rel, text in files.items():
            path = mnt / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    finally:
        u("umount", str(mnt))


class Count:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes, /) -> int:
        self.n += len(data)
        return len(data)


def flattened_bytes(u: Uimg, vm: str, mnt: Path) -> int:
    """The VM's whole image (base + its layers + U) as one canonical tar, zstd as a blob."""
    mnt.mkdir(parents=True, exist_ok=True)
    u("mount", vm, str(mnt), "--readonly")
    try:
        return write_blob(mnt, Count(), kind="base").blob_size
    finally:
        u("umount", str(mnt))


def cleaned_files(vm: str) -> dict[str, str]:
    return {
        f"etc/{vm}/role.conf": f"role {vm}\nhardened yes\n",
        "etc/cron.d/evil": "# removed\n",
        "etc/motd": f"{vm}: cleaned\n",
    }


def initial_files(vm: str) -> dict[str, str]:
    return {
        f"etc/{vm}/role.conf": f"role {vm}\n" + "".join(f"option{i} = {i}\n" for i in range(40)),
        "etc/cron.d/evil": "* * * * * root /tmp/.x\n",
        "etc/motd": f"welcome to {vm}\n",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    args = ap.parse_args()
    roles = ROLES[: args.vms]
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-deploy."))
    lab = Lab(work / "lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = server.start(work / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        ctl = Uimg(work / "ctl")
        t = time.monotonic()
        ctl("base", "create", "deb", "--from-dir", str(build("debian")))
        print(f"base create (Debian fixture): {time.monotonic() - t:.1f} s")
        downloads = work / "debs"
        for i, (vm, packages) in enumerate(roles):
            ctl("instance", "create", vm, "--base", "deb", "--hypervisor", "uml",
                "--mac", f"52:54:00:77:00:{i + 1:02x}", "--size", "2G")  # fmt: skip
            debs = [d for d in (deb_for(p, downloads) for p in packages) if d is not None]
            edit_union(ctl, vm, work / "mnt", debs, initial_files(vm))
        names = [vm for vm, _ in roles]
        vm_args = [a for vm in names for a in ("--instance", vm)]
        t = time.monotonic()
        ctl("system", "create", "initial", *vm_args, "-m", "initial")
        print(f"system create ({len(names)} VMs snapshotted): {time.monotonic() - t:.1f} s")
        for vm in names:
            edit_union(ctl, vm, work / "mnt", [], cleaned_files(vm))
        ctl("system", "snapshot", "initial", "--as", "cleaned", "-m", "malware removed")
        for vm in names:
            edit_union(ctl, vm, work / "mnt", [], initial_files(vm))
        ctl("system", "snapshot", "cleaned", "--as", "restored", "-m", "restored")

        print("no-cache baseline: flattening every VM's image ...")
        flat = {vm: flattened_bytes(ctl, vm, work / "mnt") for vm in names}
        no_cache = sum(flat.values())

        host = lab.add_host("h1")
        host.authorize(ctl("host", "key").strip())
        ctl("host", "add", "h1", "--ssh", f"root@{host.addr}", "--store", str(host.store),
            "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub))  # fmt: skip
        rows = []
        for verb, node in (("deploy", "initial"), ("redeploy", "cleaned"),
                           ("redeploy", "restored")):  # fmt: skip
            before = host.counters()["rx_bytes"]
            t = time.monotonic()
            rep = ctl.json(verb, node, "--host", "h1", "--registry", srv.url)
            secs = time.monotonic() - t
            wire = host.counters()["rx_bytes"] - before
            h = rep["hosts"]["h1"]
            if not h["ok"]:
                raise SystemExit(f"{verb} {node}: {h['error']}")
            rows.append((f"{verb} {node}", wire, h, secs, rep["push_seconds"]))
        print()
        print(f"{'':28}{'wire bytes':>14}{'no cache':>14}{'ratio':>9}  (seed)")
        seeds = ["25.1 %", "0.17 %", "0.17 %"]
        for (what, wire, _h, _s, _p), seed in zip(rows, seeds, strict=True):
            print(f"{what:28}{wire:>14,}{no_cache:>14,}{100 * wire / no_cache:>8.3f}%  ({seed})")
        print()
        print(
            f"{'':26}{'total s':>8}{'push s':>8}{'pull s':>8}{'fetch s':>8}{'import s':>9}"
            f"{'base s':>8}{'VMs s':>8}{'other s':>8}  layers pulled"
        )
        for what, _wire, h, secs, push in rows:
            pull, made, vms = h["pull_seconds"], h["base_seconds"], h["vm_seconds"]
            fetch, imp = h["fetch_seconds"], h["import_seconds"]  # pull = fetch + import
            gens = ", ".join(h["generations_made"])
            other = secs - push - pull - made - vms  # SSH, the cache query, checks, records
            print(
                f"{what:26}{secs:>8.1f}{push:>8.1f}{pull:>8.1f}{fetch:>8.1f}{imp:>9.1f}"
                f"{made:>8.1f}{vms:>8.1f}{other:>8.1f}  {len(h['imported'])} of {h['layers']} "
                f"({h['cache_hits']} cached){'; generations made: ' + gens if gens else ''}"
            )
        first = rows[0]
        moved = first[2]["fetch_seconds"] + first[4]  # the transfer: the push and the fetch
        print(
            f"first deploy: push + fetch {moved:.1f} s of {first[3]:.1f} s "
            f"({100 * moved / first[3]:.0f} %; the push includes making blobs the store had "
            "not kept); the host's import, base, VMs and the rest make up the remainder"
        )
        print()
        print("per VM, flattened (no cache): " + ", ".join(f"{k} {v:,}" for k, v in flat.items()))
    finally:
        if srv is not None:
            srv.stop()
        lab.close()
        if args.keep:
            print(f"kept {work}")
        else:
            subprocess.run(["umount", "-R", str(work / "mnt")], capture_output=True, check=False)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices, mounts, namespaces)")
    main()
