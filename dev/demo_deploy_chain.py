"""Demo section for issue 13's finished gaps (run by ``dev/demo.py`` after the fleet section).

A base with a delta generation; a system whose VM lies on it, deployed to a namespace host
that has no base at all: the host makes generations 1 and 2 straight from the pulled layers
(the same numbers and digests as here, no ``base create``). Then a snapshot layer that
installs sshd and systemd over a base that has neither: two VMs made ``--from`` it get SSH
host keys and machine-ids of their own, and ``status`` of a VM on that layer compares with
the layer's view. Raises (SystemExit) on any failure. Run alone, as root::

    .venv/bin/python -c 'from dev import demo_deploy_chain as d; d.main()'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dev.demo import STORE, UNIONIMG, cli, say


def _fail(why: str) -> None:
    print(f"demo: {why}", file=sys.stderr)
    raise SystemExit(1)


def _generations(store: Path | None, base: str) -> dict[int, dict[str, object]]:
    args = ("base", "show", base, "--json")
    if store is None:
        out = cli(*args, quiet=True)
    else:  # the host's store, read from here (namespaces share the file system)
        from unionimg.runner import run

        out = run([UNIONIMG, "--store", str(store), *args]).stdout
    return {g["number"]: g for g in json.loads(out)["generations"]}


def _edit(vm: str, files: dict[str, str]) -> None:
    mnt = STORE / "mnt" / vm
    mnt.mkdir(parents=True, exist_ok=True)
    cli("mount", vm, str(mnt))
    try:
        for rel, text in files.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_text(text)
    finally:
        cli("umount", str(mnt))


def _read(vm: str, rels: list[str]) -> list[str]:
    mnt = STORE / "mnt" / vm
    mnt.mkdir(parents=True, exist_ok=True)
    cli("mount", vm, str(mnt), "--readonly", quiet=True)
    try:
        return [(mnt / rel).read_text() if (mnt / rel).is_file() else "" for rel in rels]
    finally:
        cli("umount", str(mnt), quiet=True)


def run(rootfs: Path) -> None:
    from unionimg.registry import server as registry_server
    from vm_fixtures.nethosts import Lab

    say("base 'chain': generation 2 is a delta layer over generation 1")
    cli("base", "create", "chain", "--from-dir", str(rootfs))
    upd = STORE / "work" / "chain-upd"
    (upd / "etc").mkdir(parents=True, exist_ok=True)
    (upd / "etc" / "chain-release").write_text("chain generation 2\n")
    cli("base", "update", "chain", "--apply-dir", str(upd))
    mine = _generations(None, "chain")
    if mine[2]["kind"] != "delta":
        _fail("generation 2 of base chain is not a delta")
    cli("instance", "create", "ch1", "--base", "chain", "--hypervisor", "uml")
    _edit("ch1", {"etc/ch1.conf": "ch1 on generation 2\n"})
    cli("system", "create", "chainsys", "--instance", "ch1", "-m", "on a delta generation")

    lab = Lab(STORE / "lab-chain")
    server = None
    try:
        say("a registry and host c1 with an empty store; deploy: c1 makes generations 1 and 2")
        reg = lab.add_namespace("reg")
        server = registry_server.start(
            STORE / "registry-chain", f"{reg.addr}:5000", prefix=reg.prefix
        )
        host = lab.add_host("c1")
        host.authorize(cli("host", "key", quiet=True).strip())
        cli(
            "host", "add", "c1", "--ssh", f"root@{host.addr}", "--store", str(host.store),
            "--unionimg", UNIONIMG, "--host-key", str(host.host_key_pub),
        )  # fmt: skip
        report = json.loads(
            cli("deploy", "chainsys", "--host", "c1", "--registry", server.url, "--json")
        )
        made = report["hosts"]["c1"]["generations_made"]
        theirs = _generations(host.store, "chain")
        for n in (1, 2):
            print(
                f"generation {n}: here {mine[n]['kind']} {str(mine[n]['layer'])[:19]}, "
                f"on c1 {theirs[n]['kind']} {str(theirs[n]['layer'])[:19]}"
            )
        if made != ["chain/1", "chain/2"] or any(
            (mine[n]["kind"], mine[n]["files"]) != (theirs[n]["kind"], theirs[n]["files"])
            for n in (1, 2)
        ):
            _fail(f"c1's generations are not this store's ({made})")
        if mine[2]["layer"] != theirs[2]["layer"]:
            _fail("c1's generation 2 is another layer")
    finally:
        if server is not None:
            server.stop()
        lab.close()

    say("a snapshot layer installs sshd and systemd (marker files) over a base with neither")
    cli("instance", "create", "keysrc", "--base", "chain", "--hypervisor", "uml")
    _edit("keysrc", {"usr/sbin/sshd": "#!/bin/sh\n", "lib/systemd/systemd": "#!/bin/sh\n",
                     "etc/ssh/sshd_config": "Port 22\n"})  # fmt: skip
    layer = json.loads(cli("instance", "snapshot", "keysrc", "--json"))["layer"]
    seen = []
    for vm in ("keys1", "keys2"):
        cli("instance", "create", vm, "--from", layer, "--hypervisor", "uml")
        key, mid = _read(vm, ["etc/ssh/ssh_host_ed25519_key.pub", "etc/machine-id"])
        tail = key.split()[1][-16:] if key else "-"
        print(f"{vm}: machine-id {mid.strip()}, host key ...{tail}")
        seen.append((key, mid))
    if not all(k and m for k, m in seen) or seen[0][0] == seen[1][0] or seen[0][1] == seen[1][1]:
        _fail("the VMs made from the layer do not have identities of their own")

    say("status of keys1 compares with its layer's view: sshd_config rewritten as it was")
    _edit("keys1", {"etc/ssh/sshd_config": "Port 22\n", "etc/motd": "keys1\n"})
    cli("status", "keys1")
    st = json.loads(cli("status", "keys1", "--json", quiet=True))
    if "/etc/ssh/sshd_config" not in st["identical"]:
        _fail("status compared keys1 with the base, not with its layer")


def main() -> None:
    """Run this section alone (a fresh demo store: STORE/store must not hold these names)."""
    from vm_fixtures import build

    run(build("tiny"))


if __name__ == "__main__":
    main()
