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
``base create``), the VMs (fresh U images, identity), and the rest (split: SSH's part
once the node was handed to the host, the host's checks and records, the controller's
own; the SSH connection and the host's program starting happen during the push, and their
time is printed beside it), with the load average when each began; and the share of the first
deploy's time that is the transfer (push + fetch). The first deploy is measured twice: over
the unlimited veths (a memory copy: gigabytes a second), and with ``--rate`` (default
``1gbit``, a datacenter link) to a second empty host through a second, empty registry, with
``tc tbf`` limiting what the host and the registry receive (its pull; the controller's push).
Goals: first deploy <= 12 % of the no-cache bytes (seed: 25.1 %), redeploy <= 0.1 % (seed:
0.17 %); deploy time dominated by the transfer.

Run as root (minutes; the Debian fixture is built once and cached)::

    .venv/bin/python bench/deploy.py [--vms 10] [--rate 1gbit|none] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import UNIONIMG, Uimg, sh  # noqa: E402
from unionimg.layers.layer import write_blob  # noqa: E402
from unionimg.registry import server  # noqa: E402
from vm_fixtures import build  # noqa: E402
from vm_fixtures.nethosts import Host, Lab  # noqa: E402

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


@dataclass
class Row:
    what: str
    wire: int
    host: dict[str, Any]
    secs: float
    push: float
    load: float


def first_deploy(ctl: Uimg, host: Host, registry: str, name: str) -> Row:
    """``deploy initial`` to the empty namespace host ``host`` through ``registry``."""
    host.authorize(ctl("host", "key").strip())
    ctl("host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
        "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub))  # fmt: skip
    return deploy_row(ctl, host, name, "deploy", "initial", registry)


def deploy_row(ctl: Uimg, host: Host, name: str, verb: str, node: str, registry: str) -> Row:
    before = host.counters()["rx_bytes"]
    load = os.getloadavg()[0]
    t = time.monotonic()
    rep = ctl.json(verb, node, "--host", name, "--registry", registry)
    secs = time.monotonic() - t
    wire = host.counters()["rx_bytes"] - before
    h = rep["hosts"][name]
    if not h["ok"]:
        raise SystemExit(f"{verb} {node}: {h['error']}")
    return Row(f"{verb} {node}", wire, h, secs, rep["push_seconds"], load)


def print_times(rows: list[Row]) -> None:
    print(
        f"{'':30}{'total s':>8}{'push s':>8}{'pull s':>8}{'fetch s':>8}{'import s':>9}"
        f"{'base s':>8}{'VMs s':>8}{'other s':>8}{'load':>6}  layers pulled"
    )
    for row in rows:
        h = row.host
        pull, made, vms = h["pull_seconds"], h["base_seconds"], h["vm_seconds"]
        fetch, imp = h["fetch_seconds"], h["import_seconds"]  # pull = fetch + import
        gens = ", ".join(h["generations_made"])
        other = row.secs - row.push - pull - made - vms  # split below
        print(
            f"{row.what:30}{row.secs:>8.1f}{row.push:>8.1f}{pull:>8.1f}{fetch:>8.1f}{imp:>9.1f}"
            f"{made:>8.1f}{vms:>8.1f}{other:>8.1f}{row.load:>6.1f}  {len(h['imported'])} of "
            f"{h['layers']} ({h['cache_hits']} cached)"
            f"{'; generations made: ' + gens if gens else ''}"
        )
    print(
        f"{'other s, split:':30}{'SSH, besides':>13}{'host, besides':>15}{'controller':>12}"
        f"   {'(SSH + the host starting, during the push)':>20}"
    )
    for row in rows:
        h = row.host
        ssh = h["seconds"] - h["host_seconds"]  # SSH's part after the node was handed over
        host = h["host_seconds"] - h["pull_seconds"] - h["base_seconds"] - h["vm_seconds"]
        ctl = row.secs - row.push - h["seconds"]  # the controller's own: lookups, records
        start = h["start_seconds"]
        hidden = "never said ready" if start is None else f"{start:.2f} of {row.push:.2f}"
        print(f"{row.what:30}{ssh:>13.2f}{host:>15.2f}{ctl:>12.2f}   ({hidden})")


def transfer_share(row: Row, link: str) -> str:
    moved = row.host["fetch_seconds"] + row.push  # the transfer: the push and the fetch
    rest = row.secs - moved
    verdict = "the transfer dominates" if moved > rest else "unionimg's own work dominates"
    return (
        f"first deploy, {link}: push + fetch {moved:.1f} s of {row.secs:.1f} s "
        f"({100 * moved / row.secs:.0f} %), the host's import, base, VMs and the rest "
        f"{rest:.1f} s: {verdict}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument(
        "--rate",
        default="1gbit",
        help="The link rate (tc tbf) of the second first deploy, to a new host through a new "
        "registry: what the host and the registry receive (default 1gbit, a datacenter "
        "link; 'none': skip it).",
    )
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    args = ap.parse_args()
    roles = ROLES[: args.vms]
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-deploy."))
    lab = Lab(work / "lab")
    servers: list[server.Server] = []
    try:
        reg = lab.add_namespace("reg")
        srv = server.start(work / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        servers.append(srv)
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
        print(
            f"system create ({len(names)} VMs snapshotted; the base generation's layer and "
            f"its blob made): {time.monotonic() - t:.1f} s"
        )
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
        rows = [first_deploy(ctl, host, srv.url, "h1")]
        for node in ("cleaned", "restored"):
            rows.append(deploy_row(ctl, host, "h1", "redeploy", node, srv.url))
        limited: Row | None = None
        if args.rate != "none":
            # a first deploy again, over a limited link: a new registry (the controller
            # pushes every blob again) and a new empty host, both receiving at the rate
            reg2 = lab.add_namespace("reg2")
            srv2 = server.start(work / "registry2", f"{reg2.addr}:5000", prefix=reg2.prefix)
            servers.append(srv2)
            host2 = lab.add_host("h2")
            reg2.limit(args.rate)
            host2.limit(args.rate)
            limited = first_deploy(ctl, host2, srv2.url, "h2")
            limited.what = f"deploy initial @ {args.rate}"
        print()
        print(f"{'':28}{'wire bytes':>14}{'no cache':>14}{'ratio':>9}  (seed)")
        seeds = ["25.1 %", "0.17 %", "0.17 %"]
        for row, seed in zip(rows, seeds, strict=True):
            print(
                f"{row.what:28}{row.wire:>14,}{no_cache:>14,}{100 * row.wire / no_cache:>8.3f}%"
                f"  ({seed})"
            )
        if limited is not None:
            print(
                f"{limited.what:28}{limited.wire:>14,}{no_cache:>14,}"
                f"{100 * limited.wire / no_cache:>8.3f}%"
            )
        print()
        print_times(rows + ([limited] if limited is not None else []))
        print(transfer_share(rows[0], "unlimited veth"))
        if limited is not None:
            print(transfer_share(limited, f"host and registry links at {args.rate} (tc tbf)"))
        print()
        print("per VM, flattened (no cache): " + ", ".join(f"{k} {v:,}" for k, v in flat.items()))
    finally:
        for srv in servers:
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
