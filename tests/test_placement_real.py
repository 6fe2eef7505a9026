"""Spare-image placement made real (issue 15, item 3): namespace hosts with their own sshd
(:mod:`vm_fixtures.nethosts`), a registry in its own namespace, the controller's store with
a system node of three tiny VMs (web, db on h1; dns on h2; h3 spare).

``apply placement --from-store`` plans where each layer is kept (the cluster taken from the
store: the VMs' chains, U sizes, vCPUs and memory) and each host pulls what the plan keeps
there; h1's link then goes down (it "fails") and ``recover web --on TARGET`` makes web on the
server the plan chose, from the layers already there: no layer bytes, and only SSH on the
target's link (its veth counters); the VM keeps its MAC and, with --boot, comes up under
User-Mode Linux. Then the placement is planned and applied again without h1. Bad input is
one line and its exit code.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, need_ssh_hosts, need_uml_kernel
from tests.test_systems import make_vms, show, tiny_store
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from vm_fixtures.nethosts import Host, Lab

pytestmark = pytest.mark.usefixtures("root")

SSH_SLACK = 64 << 10  # what SSH alone may add on a link while a VM is made from its layers

SERVERS = """\
server = [
  { name = "h1", disk = "1G", cpu = 4, memory = "1G", runs = ["web", "db"] },
  { name = "h2", disk = "1G", cpu = 4, memory = "1G", runs = ["dns"] },
  { name = "h3", disk = "1G", cpu = 4, memory = "1G" },
]
"""


@dataclass
class Env:
    tmp: Path
    lab: Lab
    ctl: Cli
    url: str
    hosts: dict[str, Host]
    servers: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_ssh_hosts("docker-registry")
    tmp = tmp_path_factory.mktemp("placement")
    lab = Lab(tmp / "lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = server_mod.start(tmp / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        ctl = tiny_store(tmp / "ctl")
        make_vms(ctl, tmp, ["web", "db", "dns"])
        ctl.ok("system", "create", "lab1", "--instance", "web", "--instance", "db",
               "--instance", "dns", "-m", "initial")  # fmt: skip
        hosts = {}
        for name in ("h1", "h2", "h3"):
            host = lab.add_host(name)
            host.authorize(ctl.ok("host", "key").output.strip())
            ctl.ok(
                "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
                "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
            )  # fmt: skip
            hosts[name] = host
        servers = tmp / "servers.toml"
        servers.write_text(SERVERS)
        yield Env(tmp, lab, ctl, srv.url, hosts, servers)
    finally:
        for h in ("h1", "h2", "h3"):  # guests a test booted on a host
            host_ = lab.hosts.get(h)
            if isinstance(host_, Host):
                for vm in ("web", "db", "dns"):
                    subprocess.run(
                        host_.ssh_argv(str(UNIONIMG), "--store", str(host_.store), "stop", vm,
                                       "--force"),
                        capture_output=True, timeout=60, check=False,
                    )  # fmt: skip
        if srv is not None:
            srv.stop()
        lab.close()
        unmount_tree(tmp)


def cached(host: Host) -> set[str]:
    return cached_store(host.store)


def cached_store(store: Path) -> set[str]:
    rows = json.loads(Cli(store).ok("layer", "list", "--json").output)
    return {r["diff_id"] for r in rows}


def test_apply_recover_replan(env: Env) -> None:
    ctl = env.ctl
    args = ["--from-store", "lab1", "--servers", str(env.servers)]
    plan = json.loads(ctl.ok("plan", "placement", *args, "--json").output)
    assert plan["ok"] and plan["worst_bytes"] == 0, plan
    applied = json.loads(
        ctl.ok("apply", "placement", *args, "--registry", env.url, "--json").output
    )
    assert applied["plan"]["worst_bytes"] == 0
    # each host holds exactly the layers the plan keeps there (pulled, chains whole)
    for name, row in applied["hosts"].items():
        assert cached(env.hosts[name]) == set(row["layers"]), name
    target = applied["plan"]["failures"]["h1"]["targets"]
    web_to = next(t["server"] for t in target if "web" in t["vms"])
    assert web_to in ("h2", "h3")
    # h1 fails: its link goes down; web is made on the planned server from what is there
    h1, to = env.hosts["h1"], env.hosts[web_to]
    h1.link(False)
    try:
        before = to.counters()["rx_bytes"]
        res = json.loads(ctl.ok("recover", "web", "--on", web_to, "--no-replan",
                                "--json").output)  # fmt: skip
        after = to.counters()["rx_bytes"]
        assert res["layers_lacking"] == [] and res["bytes_pulled"] == 0, res
        assert res["planned_bytes"] == 0 and res["planned_target"] == web_to
        assert after - before < SSH_SLACK, after - before
        print(
            f"\n  apply: bytes pulled per host "
            f"{ {h: r['bytes_pulled'] for h, r in applied['hosts'].items()} }; recover web on "
            f"{web_to}: {res['bytes_pulled']} layer bytes, {after - before} bytes on its link"
        )
        made = json.loads(Cli(to.store).ok("instance", "show", "web", "--json").output)
        mac = json.loads(ctl.ok("instance", "show", "web", "--json").output)["mac"]
        assert made["mac"] == mac
        # then planned and applied again without h1 (a second failure covered)
        db_to = next(t["server"] for t in target if "db" in t["vms"])
        res2 = json.loads(ctl.ok("recover", "db", "--on", db_to, "--json").output)
        again = res2["replan"]
        assert set(again["hosts"]) == {"h2", "h3"}
        assert again["plan"]["ok"] is True
        assert set(again["plan"]["failures"]) == {"h2", "h3"}
        for name, row in again["hosts"].items():
            assert set(row["layers"]) <= cached(env.hosts[name])
    finally:
        h1.link(True)


def test_recover_boots_under_uml(env: Env) -> None:
    """After h1's failure was placed around: h2 fails too; dns is made on the server the new
    plan chose, from the layers there (no layer bytes), and boots on its MAC."""
    need_uml_kernel()
    ctl = env.ctl
    plan = json.loads((env.ctl.store / "placement" / "applied.json").read_text())
    to_name = next(r["target"] for r in plan["recovery"] if r["vm"] == "dns")
    to = env.hosts[to_name]
    before = to.counters()["rx_bytes"]
    res = json.loads(ctl.ok("recover", "dns", "--on", to_name, "--boot", "--no-replan",
                            "--json").output)  # fmt: skip
    after = to.counters()["rx_bytes"]
    assert res["bytes_pulled"] == 0 and res["made"]["booted"] is True
    assert after - before < SSH_SLACK, after - before
    print(f"\n  recover dns on {to_name} --boot: {after - before} bytes on its link")
    mac = json.loads(ctl.ok("instance", "show", "dns", "--json").output)["mac"]
    out = subprocess.run(
        to.ssh_argv(str(UNIONIMG), "--store", str(to.store), "console", "dns"),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "unionimg-guest: start" in out and f"mac {mac}" in out, out[-2000:]


def test_bad_input_one_line(env: Env) -> None:
    ctl = env.ctl
    res = ctl.fails("recover", "nosuch", "--on", "h3", code=3)
    assert "nosuch" in res.output
    bad = env.tmp / "bad.toml"
    bad.write_text(SERVERS.replace('runs = ["dns"]', 'runs = ["dns", "ghost"]'))
    res = ctl.fails("apply", "placement", "--from-store", "lab1", "--servers", str(bad),
                    "--registry", env.url, code=2)  # fmt: skip
    assert "ghost" in res.output
    unknown = env.tmp / "unknown.toml"
    unknown.write_text(SERVERS.replace('name = "h3"', 'name = "h9"'))
    res = ctl.fails("apply", "placement", "--from-store", "lab1", "--servers", str(unknown),
                    "--registry", env.url, code=3)  # fmt: skip
    assert "h9" in res.output
    split = env.tmp / "split.toml"  # splits are bounded: at most 8 byte ranges of a blob
    split.write_text(SERVERS + "[placement]\nsplit_parts = 9\n")
    res = ctl.fails("plan", "placement", "--from-store", "lab1", "--servers", str(split), code=2)
    assert "split_parts" in res.output and "1 to 8" in res.output
    res = ctl.fails("plan", "placement", "--from-store", "lab1", code=2)
    assert "--servers" in res.output


def test_apply_removes_what_the_new_plan_moved_away(env: Env) -> None:
    """Disk use follows the plan: applying a placement removes from each host the layers the
    previous placement kept there and the new one does not — unless a VM of that host uses
    them (kept, and said why). Here lab1's placement (three VMs) is replaced by lab2's (dns
    alone): web's and db's own layers leave every host where no instance uses them."""
    ctl = env.ctl
    ctl.ok("system", "create", "lab2", "--instance", "dns", "-m", "dns alone")
    apply = ["apply", "placement", "--registry", env.url, "--json", "--from-store"]
    first = json.loads(ctl.ok(*apply, "lab1", "--servers", str(env.servers)).output)
    for name, row in first["hosts"].items():
        assert set(row["layers"]) <= cached(env.hosts[name]), name
    servers2 = env.tmp / "servers2.toml"
    servers2.write_text(SERVERS.replace('runs = ["web", "db"]', "runs = []"))
    pre = {h: cached(host) for h, host in env.hosts.items()}
    second = json.loads(ctl.ok(*apply, "lab2", "--servers", str(servers2)).output)
    freed = 0
    for name, row in second["hosts"].items():
        host = env.hosts[name]
        prev, new = set(first["hosts"][name]["layers"]), set(row["layers"])
        removed, in_use = set(row["removed"]), set(row["in_use"])
        assert removed | in_use == (prev - new) & pre[name], name
        assert not removed & in_use and not removed & new
        for who in row["in_use"].values():  # kept only for something on that host
            assert who, name
        after = cached(host)
        assert after == (pre[name] - removed) | new, name  # new: what lab2's plan pulled
        freed += row["bytes_freed"]
        if removed:
            assert row["bytes_freed"] > 0
    assert freed > 0, second["hosts"]
    # the host's side keeps a layer a VM there uses, and says who: web's own layer in the
    # controller's store (instance web's chain); a layer it lacks is skipped
    web = next(v["layer"] for v in show(ctl, "lab1")["vms"] if v["name"] == "web")
    absent = "sha256:" + "0" * 64
    kept = json.loads(
        ctl.ok("apply", "placement", "--here", "--drop", web, "--drop", absent, "--json").output
    )
    assert kept["removed"] == [] and kept["bytes_freed"] == 0, kept
    assert any("instance web" in w for w in kept["in_use"][web]), kept
    assert web in cached_store(ctl.store)
    # the host's side refuses a name that is no diff_id, in one line
    res = Cli(env.hosts["h3"].store).fails("apply", "placement", "--here", "--drop", "../x",
                                           code=2)  # fmt: skip
    assert "not a layer's diff_id" in res.output
    print(
        "\n  lab1 -> lab2: removed per host "
        f"{ {h: len(r['removed']) for h, r in second['hosts'].items()} }, in use "
        f"{ {h: len(r['in_use']) for h, r in second['hosts'].items()} }, {freed} bytes freed"
    )


def test_recover_after_a_replan_in_any_order(env: Env) -> None:
    """The order the audit found broken: web recovered WITH the re-plan first, then db. The
    re-plan leaves db pending (from h1, assumed on its planned target); 'recover db' on that
    target then recovers it from h1 — not refused as "ran on" it — and re-plans over h2 and
    h3, the healthy server kept."""
    ctl = env.ctl
    for host in env.hosts.values():  # start clean: instances earlier tests made
        for vm in ("web", "db", "dns"):
            subprocess.run(
                host.ssh_argv(str(UNIONIMG), "--store", str(host.store), "stop", vm, "--force"),
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            Cli(host.store)("instance", "remove", vm)
    args = ["--from-store", "lab1", "--servers", str(env.servers)]
    applied = json.loads(
        ctl.ok("apply", "placement", *args, "--registry", env.url, "--json").output
    )
    target = applied["plan"]["failures"]["h1"]["targets"]
    web_to = next(t["server"] for t in target if "web" in t["vms"])
    db_to = next(t["server"] for t in target if "db" in t["vms"])
    h1 = env.hosts["h1"]
    h1.link(False)
    try:
        res = json.loads(ctl.ok("recover", "web", "--on", web_to, "--json").output)
        assert res["failed"] == "h1" and res["was_pending"] is False, res
        assert set(res["replan"]["hosts"]) == {"h2", "h3"} and res["replan"]["plan"]["ok"]
        record = json.loads((ctl.store / "placement" / "applied.json").read_text())
        assert 'vm = "db"' in record["servers"] and 'failed = "h1"' in record["servers"]
        assert record["recovered"] == [f"web@{web_to}"]
        res2 = json.loads(ctl.ok("recover", "db", "--on", db_to, "--json").output)
        assert res2["failed"] == "h1" and res2["was_pending"] is True, res2
        assert res2["planned_target"] == db_to
        again = res2["replan"]
        assert set(again["hosts"]) == {"h2", "h3"}, again["hosts"]
        assert again["plan"]["ok"] is True
        assert set(again["plan"]["failures"]) == {"h2", "h3"}
        record = json.loads((ctl.store / "placement" / "applied.json").read_text())
        assert "pending" not in record["servers"], record["servers"]
        assert record["recovered"] == [f"web@{web_to}", f"db@{db_to}"]
        made = json.loads(Cli(env.hosts[db_to].store).ok("instance", "show", "db", "--json").output)
        assert made["mac"] == json.loads(ctl.ok("instance", "show", "db", "--json").output)["mac"]
        # recovered there already: refused in one line, naming the record
        res3 = ctl.fails("recover", "db", "--on", db_to, code=2)
        assert "already recovered" in res3.output
        print(
            f"\n  recover web --on {web_to} (re-plan), then db --on {db_to}: db from h1, "
            f"{res2['bytes_pulled']} layer bytes pulled, re-planned over h2, h3"
        )
    finally:
        h1.link(True)
