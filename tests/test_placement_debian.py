"""Spare placement on the Debian fixture (issue 15): the cluster taken from the store
(``--from-store``: a system node of two Debian VMs, one with its own change), placed over two
namespace hosts; the hosts' chains are the Debian base layer and the VMs' snapshot layers.
``apply placement`` copies them to the spare host; its peer's link goes down and ``recover``
makes d1 there from the layers already in its cache: 0 layer bytes, only SSH on the link,
and d1's own file in its union. Gated like the other Debian tests (minutes)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, need, need_ssh_hosts
from tests.test_systems import change
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from vm_fixtures.nethosts import Host, Lab

pytestmark = pytest.mark.usefixtures("root")

SSH_SLACK = 64 << 10

SERVERS = """\
server = [
  { name = "da", disk = "8G", cpu = 4, memory = "2G", runs = ["d1", "d2"] },
  { name = "db", disk = "8G", cpu = 4, memory = "2G" },
]
"""


@dataclass
class Env:
    tmp: Path
    ctl: Cli
    url: str
    hosts: dict[str, Host]
    servers: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    need_ssh_hosts("docker-registry")
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("placement-deb")
    lab = Lab(tmp / "lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = server_mod.start(tmp / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        ctl = Cli(tmp / "store")
        ctl.ok("base", "create", "deb", "--from-dir", str(build("debian")))
        for vm in ("d1", "d2"):
            ctl.ok("instance", "create", vm, "--base", "deb", "--size", "256M")
        change(ctl, "d1", tmp, {"etc/d1.conf": "d1's own setting\n"})
        ctl.ok("system", "create", "debsys", "--instance", "d1", "--instance", "d2")
        hosts = {}
        for name in ("da", "db"):
            host = lab.add_host(name)
            host.authorize(ctl.ok("host", "key").output.strip())
            ctl.ok(
                "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
                "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
            )  # fmt: skip
            hosts[name] = host
        servers = tmp / "servers.toml"
        servers.write_text(SERVERS)
        yield Env(tmp, ctl, srv.url, hosts, servers)
    finally:
        if srv is not None:
            srv.stop()
        lab.close()
        unmount_tree(tmp)


def test_debian_apply_and_recover(env: Env) -> None:
    ctl = env.ctl
    args = ["--from-store", "debsys", "--servers", str(env.servers)]
    applied = json.loads(
        ctl.ok("apply", "placement", *args, "--registry", env.url, "--json").output
    )
    plan = applied["plan"]
    assert plan["ok"] and plan["worst_bytes"] == 0, plan
    kept = set(applied["hosts"]["db"]["layers"])
    d1_chain = set()
    rows = {r["diff_id"]: r for r in json.loads(ctl.ok("layer", "list", "--json").output)}
    layer = json.loads(ctl.ok("system", "show", "debsys", "--json").output)["vms"][0]["layer"]
    while layer is not None:
        d1_chain.add(layer)
        layer = rows[layer]["parent"]
    assert d1_chain <= kept  # rule (a): off da, where d1 runs
    db = env.hosts["db"]
    env.hosts["da"].link(False)
    try:
        before = db.counters()["rx_bytes"]
        res = json.loads(ctl.ok("recover", "d1", "--on", "db", "--no-replan", "--json").output)
        moved = db.counters()["rx_bytes"] - before
    finally:
        env.hosts["da"].link(True)
    assert res["bytes_pulled"] == 0 and res["layers_lacking"] == [], res
    assert moved < SSH_SLACK, moved
    print(f"\n  apply: db pulled {applied['hosts']['db']['bytes_pulled']:,} bytes; recover d1 "
          f"on db: 0 layer bytes, {moved:,} bytes on its link")  # fmt: skip
    host = Cli(db.store)
    mac = json.loads(ctl.ok("instance", "show", "d1", "--json").output)["mac"]
    assert json.loads(host.ok("instance", "show", "d1", "--json").output)["mac"] == mac
    mnt = env.tmp / "mnt-d1-on-db"
    mnt.mkdir()
    host.ok("mount", "d1", str(mnt), "--readonly")
    try:
        assert (mnt / "etc" / "d1.conf").read_text() == "d1's own setting\n"
        assert (mnt / "etc" / "debian_version").exists()
    finally:
        host.ok("umount", str(mnt))
