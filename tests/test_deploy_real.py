"""Deploying systems to hosts over SSH through a registry (issue 13, items 4 and 6), for real.

The lab (:mod:`vm_fixtures.nethosts`): a bridge in a namespace of its own, the registry
(Debian's docker-registry) in its own namespace, and namespace hosts, each with a real
OpenSSH sshd and its own store directory; the controller is this process's store, reaching
the hosts with ``ssh`` as ``unionimg host add`` recorded them. Bytes are counted on each
host's veth (``rx_bytes``).

What it shows: the first deploy to two empty hosts pulls every layer of the system on each
(wire bytes = the blobs + a little); a redeploy of a child node pulls only the layers that
node changed (wire bytes a small fraction of the first); the VMs keep their MACs; ``--boot``
boots them under User-Mode Linux on the host and their console says they came up on their
MAC; bad input is one line and an exit code with nothing half-made on the host: a VM name the
host already has, two deploys at once (the host's deploy lock), a host whose store is full,
a host whose SSH key changed, a host that is down, a system whose second VM's layer blob is
tampered in the registry (the first VM's layers are not imported either; once the blob is
pushed again, the next deploy fetches only what it had not verified yet).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REQUIRE_REAL,
    UNIONIMG,
    Cli,
    flip_byte,
    need,
    need_ssh_hosts,
    need_uml_kernel,
)
from tests.test_systems import change, make_vms, tiny_store
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from vm_fixtures.nethosts import Host, Lab

pytestmark = pytest.mark.usefixtures("root")

WIRE_SLACK = 256 << 10
"""What SSH, HTTP headers and manifests may add to a deploy's blob bytes on a host's link."""


@dataclass
class Env:
    tmp: Path
    lab: Lab
    ctl: Cli
    url: str
    hosts: dict[str, Host]
    srv: server_mod.Server

    def add_host(self, name: str) -> Host:
        host = self.lab.add_host(name)
        host.authorize(self.ctl.ok("host", "key").output.strip())
        self.ctl.ok(
            "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
            "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
        )  # fmt: skip
        self.hosts[name] = host
        return host


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_ssh_hosts("docker-registry")
    tmp = tmp_path_factory.mktemp("deploy")
    lab = Lab(tmp / "lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = server_mod.start(tmp / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        ctl = tiny_store(tmp / "ctl")
        make_vms(ctl, tmp, ["web", "db", "dns"])
        ctl.ok("system", "create", "lab1", "--instance", "web", "--instance", "db",
               "--instance", "dns", "-m", "initial")  # fmt: skip
        change(ctl, "web", tmp, {"etc/web.conf": "role web, malware removed\n"})
        change(ctl, "dns", tmp, {"etc/dns.conf": "role dns, malware removed\n"})
        ctl.ok("system", "snapshot", "lab1", "--as", "lab2", "-m", "malware removed")
        e = Env(tmp, lab, ctl, srv.url, {}, srv)
        for name in ("h1", "h2"):
            e.add_host(name)
        yield e
    finally:
        if srv is not None:
            srv.stop()
        lab.close()
        unmount_tree(tmp)


def hcli(host: Host) -> Cli:
    """The host's store, read from here (namespaces share the file system)."""
    return Cli(host.store)


def layer_sizes(cli: Cli) -> dict[str, int]:
    rows = json.loads(cli.ok("layer", "list", "--json").output)
    return {r["diff_id"]: r["blob_size"] for r in rows}


def node_layers(cli: Cli, system: str) -> set[str]:
    """Every layer system node ``system`` needs (each VM's chain)."""
    rows = {r["diff_id"]: r for r in json.loads(cli.ok("layer", "list", "--json").output)}
    out: set[str] = set()
    for vm in json.loads(cli.ok("system", "show", system, "--json").output)["vms"]:
        layer = vm["layer"]
        while layer is not None:
            out.add(layer)
            layer = rows[layer]["parent"]
    return out


def deploy(env: Env, *args: str) -> dict[str, Any]:
    res = env.ctl.ok(*args, "--registry", env.url, "--json")
    data: dict[str, Any] = json.loads(res.output)
    return data


def nothing_made(
    host: Host, instances: list[str] | None = None, *, verified_downloads: bool = False
) -> None:
    """No VM (but ``instances``), no deployment, nothing in the host's scratch space; no
    download either, or with ``verified_downloads`` only whole, checked blobs (kept for the
    next deploy to resume from), no partial one."""
    cli = hcli(host)
    names = [i["name"] for i in json.loads(cli.ok("instance", "list", "--json").output)]
    assert names == (instances or [])
    systems = host.store / "systems"
    assert not systems.is_dir() or not any(systems.glob("*/deployed.json"))
    downloads = host.store / "downloads"
    if verified_downloads:
        assert not downloads.is_dir() or all(p.suffix == ".blob" for p in downloads.iterdir())
    else:
        assert not downloads.is_dir() or not any(downloads.iterdir())
    tmp = host.store / "tmp"
    assert not tmp.is_dir() or not any(tmp.iterdir())


def test_host_list_and_cache(env: Env) -> None:
    rows = json.loads(env.ctl.ok("host", "list", "--json").output)
    assert {r["name"] for r in rows} >= {"h1", "h2"}
    assert json.loads(env.ctl.ok("host", "cache", "h1", "--json").output) == []


def test_first_deploy_pulls_everything_then_redeploy_only_changed(env: Env) -> None:
    h1, h2 = env.hosts["h1"], env.hosts["h2"]
    sizes = layer_sizes(env.ctl)
    one, two = node_layers(env.ctl, "lab1"), node_layers(env.ctl, "lab2")
    before = {h.name: h.counters()["rx_bytes"] for h in (h1, h2)}
    report = deploy(env, "deploy", "lab1", "--host", "h1", "--host", "h2")
    blob_bytes = sum(sizes[d] for d in one)
    for h in (h1, h2):
        r = report["hosts"][h.name]
        assert r["ok"], r
        assert r["cache_hits"] == 0 and sorted(r["imported"]) == sorted(one)
        assert r["cached_before"] == 0  # the host's own count, in materialize's report
        # the host's program started and said ready while the controller pushed
        assert r["start_seconds"] is not None and 0 < r["start_seconds"] < 60, r
        assert r["bytes_pulled"] >= blob_bytes
        wire = h.counters()["rx_bytes"] - before[h.name]
        assert blob_bytes <= wire <= r["bytes_pulled"] + WIRE_SLACK, (wire, r)
        insts = {i["name"]: i for i in json.loads(hcli(h).ok("instance", "list", "--json").output)}
        ctl = {i["name"]: i for i in json.loads(env.ctl.ok("instance", "list", "--json").output)}
        assert sorted(insts) == ["db", "dns", "web"]
        for vm in insts:
            assert insts[vm]["mac"] == ctl[vm]["mac"]  # MACs kept
        cached = {
            r["diff_id"] for r in json.loads(env.ctl.ok("host", "cache", h.name, "--json").output)
        }
        assert cached == one
    first_wire = {h.name: h.counters()["rx_bytes"] - before[h.name] for h in (h1, h2)}

    # redeploy the child node to h1: only the layers lab2 changed (web's, dns's) travel
    new = two - one
    assert len(new) == 2
    before1 = h1.counters()["rx_bytes"]
    report = deploy(env, "redeploy", "lab2", "--host", "h1")
    r = report["hosts"]["h1"]
    assert r["ok"], r
    assert sorted(r["imported"]) == sorted(new)
    assert r["cache_hits"] == len(two) - 2
    assert r["cached_before"] == len(one)
    assert sorted(r["replaced"]) == ["db", "dns", "web"]
    wire = h1.counters()["rx_bytes"] - before1
    new_bytes = sum(sizes[d] for d in new)
    assert new_bytes <= wire <= r["bytes_pulled"] + WIRE_SLACK
    assert wire < first_wire["h1"] / 4, (wire, first_wire)
    print(f"first deploy {first_wire['h1']} B on the wire, redeploy {wire} B")
    dep = json.loads(hcli(h1).ok("system", "show", "lab2", "--json").output)["deployed"]
    assert dep["vms"] == ["web", "db", "dns"]
    # a deploy (not redeploy) where the VMs exist is refused: nothing changes
    res = env.ctl.fails("deploy", "lab2", "--host", "h1", "--registry", env.url, code=4)
    assert "redeploy" in res.output


def test_deploy_boot_under_uml(env: Env) -> None:
    need_uml_kernel()
    h2 = env.hosts["h2"]
    report = deploy(env, "redeploy", "lab2", "--host", "h2", "--boot")
    r = report["hosts"]["h2"]
    assert r["ok"], r
    assert sorted(r["booted"]) == ["db", "dns", "web"]
    for vm in ("web", "db"):
        out = subprocess.run(
            h2.ssh_argv(str(UNIONIMG), "--store", str(h2.store), "console", vm),
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        mac = json.loads(env.ctl.ok("instance", "show", vm, "--json").output)["mac"]
        assert "unionimg-guest: start" in out, out[-2000:]
        assert f"mac {mac}" in out, out[-2000:]
        assert "/etc/" in out or "root" in out
    for vm in ("web", "db", "dns"):  # stopped where they run (their taps are in h2's netns)
        subprocess.run(
            h2.ssh_argv(str(UNIONIMG), "--store", str(h2.store), "stop", vm, "--force"),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip


def test_vm_name_taken_on_host(env: Env) -> None:
    h3 = env.add_host("h3")
    from vm_fixtures import build

    cli = hcli(h3)
    cli.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
    cli.ok("instance", "create", "db", "--base", "tiny", "--size", "64M")
    layers_before = sorted(p.name for p in (h3.store / "layers").rglob("*"))
    res = env.ctl.fails("deploy", "lab1", "--host", "h3", "--registry", env.url, code=4)
    assert "db" in res.output and "h3" in res.output
    nothing_made(h3, ["db"])
    assert sorted(p.name for p in (h3.store / "layers").rglob("*")) == layers_before


def test_two_deploys_at_once(env: Env) -> None:
    h4 = env.add_host("h4")
    # the host's deploy lock held (a deploy in progress there): refused, nothing made
    (h4.store / "locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(h4.store / "locks" / "deploy.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"pid 1 deploy lab9", 0)
        res = env.ctl.fails("deploy", "lab1", "--host", "h4", "--registry", env.url, code=4)
        assert "locked" in res.output
        nothing_made(h4)
    finally:
        os.close(fd)
    # two real deploys started together: one makes the system, the other is refused (the
    # lock, or the VMs it finds made), and the host holds one whole deployment
    argv = [str(UNIONIMG), "--store", str(env.ctl.store), "deploy", "lab1", "--host", "h4",
            "--registry", env.url]  # fmt: skip
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes, errs = [], []
    for p in procs:
        _, err = p.communicate(timeout=300)
        codes.append(p.returncode)
        errs.append(err)
    assert sorted(codes) == [0, 4], errs
    bad = errs[codes.index(4)].strip().splitlines()
    assert len(bad) == 1 and bad[0].startswith("unionimg: error: host h4"), bad
    names = [i["name"] for i in json.loads(hcli(h4).ok("instance", "list", "--json").output)]
    assert sorted(names) == ["db", "dns", "web"]


def test_registry_down_at_the_push(env: Env) -> None:
    """The hosts' programs start while the controller pushes; a push that fails (nothing
    listens at the registry's address) hands them no node: each ends with its store as it
    was, and the deploy says the push's error in one line."""
    h9 = env.add_host("h9")
    dead = env.url.rsplit(":", 1)[0] + ":5999"
    res = env.ctl.fails("deploy", "lab1", "--host", "h9", "--registry", dead, code=5)
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and "5999" in lines[0] and "h9" not in lines[0], lines
    nothing_made(h9)
    layers = h9.store / "layers"
    assert not layers.is_dir() or not any(layers.rglob("layer.json"))
    # the same host then deploys through the live registry
    assert deploy(env, "deploy", "lab1", "--host", "h9")["hosts"]["h9"]["ok"]


def test_store_full_on_host(env: Env) -> None:
    h5 = env.add_host("h5")
    h5.store.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(h5.store)], check=True)
    try:
        res = env.ctl.fails("deploy", "lab1", "--host", "h5", "--registry", env.url, code=7)
        assert "store full" in res.output and "h5" in res.output
        nothing_made(h5)
        layers = h5.store / "layers"
        assert not layers.is_dir() or not any(layers.rglob("layer.json"))
    finally:
        subprocess.run(["umount", str(h5.store)], check=True)


def test_changed_host_key_and_host_down(env: Env) -> None:
    h6 = env.add_host("h6")
    h6.new_host_key()
    res = env.ctl.fails("deploy", "lab1", "--host", "h6", "--registry", env.url, code=4)
    assert "host key" in res.output
    res = env.ctl.fails("host", "cache", "h6", code=4)
    nothing_made(h6)
    h6.stop_sshd()
    h6.kill_sessions()
    res = env.ctl.fails("host", "cache", "h6", code=5)
    assert "unreachable" in res.output
    env.ctl.ok("host", "remove", "h6")
    assert "h6" not in {r["name"] for r in json.loads(env.ctl.ok("host", "list", "--json").output)}
    env.ctl.fails("host", "cache", "h6", code=3)


# -- item 5: many hosts at once, a link lost mid-pull ------------------------------------------
def materializing(host: Host) -> bool:
    """Whether a 'system materialize' runs in the host's namespace."""
    pids = subprocess.run(
        ["ip", "netns", "pids", host.ns], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in pids:
        try:
            if b"materialize" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_eight_hosts_at_once(env: Env) -> None:
    """8 hosts deploy one node at once from one registry; each pulls what it lacked (s1
    already holds lab1: only lab2's new layers; the others everything), counted on its
    veth; the time of the 8 against one host alone."""
    names = [f"s{i}" for i in range(1, 9)]
    for n in names:
        env.add_host(n)
    sizes = layer_sizes(env.ctl)
    one, two = node_layers(env.ctl, "lab1"), node_layers(env.ctl, "lab2")
    alone = deploy(env, "deploy", "lab1", "--host", "s1")
    assert alone["hosts"]["s1"]["ok"], alone
    t_one = alone["hosts"]["s1"]["seconds"]
    before = {n: env.hosts[n].counters()["rx_bytes"] for n in names}
    hosts = [a for n in names for a in ("--host", n)]
    report = deploy(env, "redeploy", "lab2", *hosts)
    t_eight = report["seconds"]
    for n in names:
        r = report["hosts"][n]
        assert r["ok"], r
        lacked = two - one if n == "s1" else two
        assert sorted(r["imported"]) == sorted(lacked), n
        need_bytes = sum(sizes[d] for d in lacked)
        wire = env.hosts[n].counters()["rx_bytes"] - before[n]
        assert need_bytes <= wire <= r["bytes_pulled"] + WIRE_SLACK, (n, wire, r)
    total = sum(report["hosts"][n]["bytes_pulled"] for n in names)
    assert report["bytes_pulled"] == total
    print(f"one host: {t_one:.1f} s; 8 hosts at once: {t_eight:.1f} s; {total} bytes pulled")


def test_link_lost_mid_pull_resumes(env: Env) -> None:
    """A host whose link goes down while it pulls a large layer: the deploy fails for that
    host (one line); once the link is back, a redeploy fetches only the rest of the blob
    (what the host had is not sent again) and the VM is made."""
    ctl = env.ctl
    ctl.ok("instance", "create", "big", "--base", "tiny", "--mac", "52:54:00:13:00:09",
           "--hypervisor", "uml", "--size", "128M", "--memory", "96")  # fmt: skip
    mnt = env.tmp / "mnt-big"
    mnt.mkdir()
    ctl.ok("mount", "big", str(mnt))
    try:
        (mnt / "srv").mkdir(exist_ok=True)
        (mnt / "srv" / "data.bin").write_bytes(os.urandom(24 << 20))  # incompressible
    finally:
        ctl.ok("umount", str(mnt))
    ctl.ok("system", "create", "bigsys", "--instance", "big")
    blob = max(layer_sizes(ctl)[d] for d in node_layers(ctl, "bigsys"))
    host = env.add_host("r1")
    host.limit("40mbit")  # ~5 MB/s: the pull takes seconds, time to cut it
    argv = [str(UNIONIMG), "--store", str(ctl.store), "deploy", "bigsys", "--host", "r1",
            "--registry", env.url]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    downloads = host.store / "downloads"

    def partial_bytes() -> int:
        files = list(downloads.glob("*")) if downloads.is_dir() else []
        return max((f.stat().st_size for f in files), default=0)

    try:
        from unionimg.poll import until

        assert until(lambda: partial_bytes() >= 8 << 20, 120, 0.05), "the pull never started"
        host.link(up=False)
        # sshd drops the silent session (ClientAlive, ~6 s); the host's deploy then ends
        # by itself (its heartbeat finds no one listening): no orphan goes on pulling
        assert until(lambda: not materializing(host), 60, 0.2), "the host's deploy ran on"
        host.link(up=True)
        _, err = proc.communicate(timeout=120)
    finally:
        host.link(up=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionimg: error: host r1"), err
    had = partial_bytes()
    assert 8 << 20 <= had < blob
    assert json.loads(hcli(host).ok("instance", "list", "--json").output) == []
    host.limit(None)
    before = host.counters()["rx_bytes"]
    report = deploy(env, "deploy", "bigsys", "--host", "r1")
    r = report["hosts"]["r1"]
    assert r["ok"], r
    wire = host.counters()["rx_bytes"] - before
    assert r["bytes_resumed"] >= had - (1 << 20), r
    assert wire <= blob - had + 4 * WIRE_SLACK, (wire, blob, had)
    print(f"blob {blob} B: {had} B before the cut, {wire} B on the wire after it")


def test_host_base_of_the_same_name_differs(env: Env) -> None:
    """A host whose own base 'tiny' generation 1 holds another tree: the system's base layer
    names 'tiny' generation 1 too, but the host compares trees, not names (VMs would boot
    on the wrong base): refused, nothing pulled or made."""
    from vm_fixtures import build

    host = env.add_host("h7")
    tree = env.tmp / "other-tiny"
    # cp -a: the fixture holds device nodes (/dev/console), which copytree would read
    subprocess.run(["cp", "-a", str(build("tiny")), str(tree)], check=True, timeout=120)
    (tree / "etc" / "motd").write_text("another base of the same name\n")
    cli = hcli(host)
    cli.ok("base", "create", "tiny", "--from-dir", str(tree))
    before = sorted(str(p) for p in (host.store / "layers").rglob("layer.json"))
    res = env.ctl.fails("deploy", "lab1", "--host", "h7", "--registry", env.url, code=4)
    assert "another tree" in res.output, res.output
    nothing_made(host)
    assert sorted(str(p) for p in (host.store / "layers").rglob("layer.json")) == before


# -- the base chain a host lacks: later and delta generations ----------------------------------
def gens(cli: Cli, base: str) -> dict[int, dict[str, Any]]:
    data = json.loads(cli.ok("base", "show", base, "--json").output)
    return {g["number"]: g for g in data["generations"]}


def same_generations(ctl: Cli, host: Cli, base: str, numbers: list[int]) -> None:
    """The host's generations ``numbers`` of ``base`` are the controller's: the same kind,
    parent, layer (diff_id) and file count, and manifests with no path that differs."""
    from unionimg.fs.manifest import diff_manifests

    mine, theirs = gens(ctl, base), gens(host, base)
    for n in numbers:
        a, b = mine[n], theirs[n]
        for key in ("kind", "parent", "files", "kernel_version"):
            assert a[key] == b[key], (n, key, a[key], b[key])
        assert a["layer"] is not None or a["kind"] == "full"
        if a["layer"] is not None:
            assert a["layer"] == b["layer"], n
        ma = Path(a["image"]).parent / "manifest.sqlite"
        mb = Path(b["image"]).parent / "manifest.sqlite"
        assert diff_manifests(ma, mb) == [], n


def test_later_and_delta_generations(env: Env) -> None:
    """A system on a delta generation of a base the host lacks: the host makes the chain
    (generations 1 and 2, same numbers and diff_ids, equivalent manifests) from the pulled
    layers, no 'base create'; a later node on generation 4 (a delta over a full 3) made the
    host add 3 and 4 only, pulling only the new layers."""
    from vm_fixtures import build

    ctl = env.ctl
    tree = env.tmp / "gens-tree"
    subprocess.run(["cp", "-a", str(build("tiny")), str(tree)], check=True, timeout=120)
    (tree / "etc" / "gens").write_text("the gens base\n")
    ctl.ok("base", "create", "gens", "--from-dir", str(tree))
    for n, full in ((2, False), (3, True), (4, False)):
        upd = env.tmp / f"gens-upd{n}"
        (upd / "etc").mkdir(parents=True)
        (upd / "etc" / f"gen{n}").write_text(f"generation {n}\n")
        ctl.ok("base", "update", "gens", "--apply-dir", str(upd), *(["--full"] if full else []))
        if n == 2:  # a VM on the delta generation 2, before 3 and 4 exist
            ctl.ok("instance", "create", "g2vm", "--base", "gens", "--mac", "52:54:00:13:02:02",
                   "--hypervisor", "uml", "--size", "64M", "--memory", "96")  # fmt: skip
            change(ctl, "g2vm", env.tmp, {"etc/g2vm.conf": "on generation 2\n"})
            ctl.ok("system", "create", "gsys1", "--instance", "g2vm")
    kinds = {n: g["kind"] for n, g in gens(ctl, "gens").items()}
    assert kinds == {1: "full", 2: "delta", 3: "full", 4: "delta"}
    host = env.add_host("g1")
    hc = hcli(host)
    r = deploy(env, "deploy", "gsys1", "--host", "g1")["hosts"]["g1"]
    assert r["ok"], r
    assert r["generations_made"] == ["gens/1", "gens/2"]
    same_generations(ctl, hc, "gens", [1, 2])
    assert set(gens(hc, "gens")) == {1, 2}
    inst = json.loads(hc.ok("instance", "show", "g2vm", "--json").output)
    assert (inst["base"], inst["generation"], len(inst["layers"])) == ("gens", 2, 1)
    # the host's generation images are the pulled layers' own (hard links: no copy)
    for n in (1, 2):
        img = Path(gens(hc, "gens")[n]["image"])
        assert img.stat().st_nlink == 2, img

    ctl.ok("instance", "create", "g4vm", "--base", "gens", "--mac", "52:54:00:13:02:04",
           "--hypervisor", "uml", "--size", "64M", "--memory", "96")  # fmt: skip
    change(ctl, "g4vm", env.tmp, {"etc/g4vm.conf": "on generation 4\n"})
    ctl.ok("system", "create", "gsys2", "--instance", "g2vm", "--instance", "g4vm")
    sizes = layer_sizes(ctl)
    new = node_layers(ctl, "gsys2") - node_layers(ctl, "gsys1")
    assert len(new) == 3  # generations 4 and 3, g4vm's snapshot
    before = host.counters()["rx_bytes"]
    r = deploy(env, "redeploy", "gsys2", "--host", "g1")["hosts"]["g1"]
    assert r["ok"], r
    assert r["generations_made"] == ["gens/3", "gens/4"]
    assert sorted(r["imported"]) == sorted(new)
    wire = host.counters()["rx_bytes"] - before
    assert sum(sizes[d] for d in new) <= wire <= r["bytes_pulled"] + WIRE_SLACK
    same_generations(ctl, hc, "gens", [1, 2, 3, 4])
    inst = json.loads(hc.ok("instance", "show", "g4vm", "--json").output)
    assert (inst["base"], inst["generation"]) == ("gens", 4)
    # the host's own base commands work on deploy-made generations
    hc.ok("base", "diff", "gens", "--from", "2", "--to", "4")
    upd = env.tmp / "gens-host5"
    (upd / "etc").mkdir(parents=True)
    (upd / "etc" / "local").write_text("the host's own generation\n")
    hc.ok("base", "update", "gens", "--apply-dir", str(upd))
    assert set(gens(hc, "gens")) == {1, 2, 3, 4, 5}


def test_debian_chain_made_from_layers(env: Env) -> None:
    """On the Debian fixture (setuid files, capabilities, hardlinks, devices, ~12k paths): a
    system on a delta generation 2 deployed to an empty host. The host makes generations 1
    (the pulled base layer's image, as is) and 2 (the delta's) with manifests equal to the
    controller's path for path, in a fraction of what 'base create' of the tree costs; the
    VM made there is on generation 2 with a machine-id of its own."""
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1" or REQUIRE_REAL,
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    ctl = Cli(env.tmp / "deb-ctl")
    ctl.ok("base", "create", "deb", "--from-dir", str(build("debian")))
    upd = env.tmp / "deb-upd"
    (upd / "etc" / "deb-site").mkdir(parents=True)
    (upd / "etc" / "deb-site" / "site.conf").write_text("site generation 2\n")
    ctl.ok("base", "update", "deb", "--apply-dir", str(upd))
    assert gens(ctl, "deb")[2]["kind"] == "delta"
    ctl.ok("instance", "create", "debvm", "--base", "deb", "--mac", "52:54:00:13:0d:01",
           "--hypervisor", "uml", "--size", "256M")  # fmt: skip
    change(ctl, "debvm", env.tmp, {"etc/debvm.conf": "a Debian VM\n"})
    ctl.ok("system", "create", "debsys", "--instance", "debvm")
    host = env.lab.add_host("d1")
    host.authorize(ctl.ok("host", "key").output.strip())
    ctl.ok("host", "add", "d1", "--ssh", f"root@{host.addr}", "--store", str(host.store),
           "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub))  # fmt: skip
    report = json.loads(ctl.ok("deploy", "debsys", "--host", "d1", "--registry", env.url,
                               "--json").output)  # fmt: skip
    r = report["hosts"]["d1"]
    assert r["ok"], r
    assert r["generations_made"] == ["deb/1", "deb/2"]
    hc = hcli(host)
    same_generations(ctl, hc, "deb", [1, 2])
    inst = json.loads(hc.ok("instance", "show", "debvm", "--json").output)
    assert (inst["base"], inst["generation"], len(inst["layers"])) == ("deb", 2, 1)
    mnt = env.tmp / "deb-mnt"
    mnt.mkdir()
    hc.ok("mount", "debvm", str(mnt), "--readonly")
    try:
        assert (mnt / "etc" / "debvm.conf").read_text() == "a Debian VM\n"
        assert (mnt / "etc" / "deb-site" / "site.conf").read_text() == "site generation 2\n"
        assert len((mnt / "etc" / "machine-id").read_text().strip()) == 32
    finally:
        hc.ok("umount", str(mnt))
    print(
        f"Debian: host made generations 1 and 2 in {r['base_seconds']:.1f} s "
        f"(pull {r['pull_seconds']:.1f} s, VMs {r['vm_seconds']:.1f} s)"
    )


# -- a bad blob of one VM: nothing of the others imported ------------------------------------
def test_a_tampered_blob_of_the_second_vm_changes_nothing_on_the_host(env: Env) -> None:
    """lab1's second VM (db): its layer's blob altered in the registry's storage. The deploy
    to an empty host fails (one line, exit 5) and leaves the host's layer cache empty: the
    first VM's (web's) layers arrived checked but are not imported, since every blob of every
    VM is verified before the first import (they wait in downloads/). The damaged blob is
    removed from the registry's storage and the layer pushed again: the next deploy makes the
    system, fetching only the blobs it had not verified yet (db's and dns's, not the base's
    nor web's), and its report splits the pull's seconds into fetching and importing."""
    ctl = env.ctl
    ctl.ok("system", "push", "lab1", "--registry", env.url)  # when run alone
    # read after the push: a base layer's blob (and its digest) is made by its first push
    rows = {r["diff_id"]: r for r in json.loads(ctl.ok("layer", "list", "--json").output)}
    vms = json.loads(ctl.ok("system", "show", "lab1", "--json").output)["vms"]
    assert [vm["name"] for vm in vms] == ["web", "db", "dns"]
    web, db, dns = (rows[vm["layer"]] for vm in vms)
    base = rows[db["parent"]]
    assert base["parent"] is None and web["parent"] == base["diff_id"]
    stored = env.srv.blob_file(db["blob_digest"])
    saved = stored.read_bytes()
    host = env.add_host("t1")
    layers = host.store / "layers"
    try:
        flip_byte(stored, min(100, len(saved) // 2))
        res = ctl.fails("deploy", "lab1", "--host", "t1", "--registry", env.url, code=5)
        assert "host t1" in res.output and db["blob_digest"] in res.output, res.output
        assert "refused, nothing imported" in res.output
        nothing_made(host, verified_downloads=True)
        assert not layers.is_dir() or not any(layers.rglob("layer.json"))  # cache unchanged
        assert json.loads(ctl.ok("host", "cache", "t1", "--json").output) == []
        kept = sorted(p.name for p in (host.store / "downloads").iterdir())
        assert kept == sorted(r["blob_digest"][7:] + ".blob" for r in (base, web)), kept

        # repaired: the damaged blob removed from the registry's storage, the layer pushed again
        stored.unlink()
        ctl.ok("push", db["diff_id"], "--registry", env.url)
        assert stored.read_bytes() == saved
        before = host.counters()["rx_bytes"]
        r = deploy(env, "deploy", "lab1", "--host", "t1")["hosts"]["t1"]
    finally:
        if not stored.exists() or stored.read_bytes() != saved:
            stored.write_bytes(saved)  # the other tests' registry as it was
    assert r["ok"], r
    assert sorted(r["imported"]) == sorted(node_layers(ctl, "lab1")) and r["cache_hits"] == 0
    rest = db["blob_size"] + dns["blob_size"]
    wire = host.counters()["rx_bytes"] - before
    assert rest <= r["bytes_pulled"] < rest + (64 << 10), (r, rest, base["blob_size"])
    assert rest <= wire <= r["bytes_pulled"] + WIRE_SLACK
    assert not any((host.store / "downloads").iterdir())  # used up
    names = [i["name"] for i in json.loads(hcli(host).ok("instance", "list", "--json").output)]
    assert sorted(names) == ["db", "dns", "web"]
    # the pull's seconds: fetching (the network) and importing (the host), adding up
    assert r["fetch_seconds"] > 0 and r["import_seconds"] > 0
    assert abs(r["fetch_seconds"] + r["import_seconds"] - r["pull_seconds"]) < 0.01, r
    print(
        f"resumed deploy: {r['bytes_pulled']} B pulled (base {base['blob_size']} B not "
        f"again); pull {r['pull_seconds']} s = fetch {r['fetch_seconds']} s + import "
        f"{r['import_seconds']} s"
    )
