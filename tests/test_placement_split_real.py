"""Split layers made real (issue 15): a VM whose own layer is large runs on h1; the spare
hosts h2 and h3 have disk for the base, the VM's image and about half of that layer, so the
plan splits it in two (``split_parts = 2`` in the servers file), one part on each.
``apply placement`` has each spare host fetch only its byte range of the layer's blob (HTTP
Range from the registry) into its parts area; h1 fails; ``recover big --on TARGET`` fetches
the range the target lacks, makes the whole blob, checks its digest, imports it and makes the
VM — the bytes fetched are the plan's predicted transfer for that failure. A part tampered
with on the target is refused in one line and nothing is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, need_ssh_hosts
from tests.test_systems import tiny_store
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from vm_fixtures.nethosts import Host, Lab

pytestmark = pytest.mark.usefixtures("root")

MAC = "52:54:00:15:0b:01"
BIG = 6 << 20  # the VM's own file: random, so its layer's blob is about this large


@dataclass
class Env:
    tmp: Path
    lab: Lab
    ctl: Cli
    url: str
    hosts: dict[str, Host]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_ssh_hosts("docker-registry")
    tmp = tmp_path_factory.mktemp("split")
    lab = Lab(tmp / "lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = server_mod.start(tmp / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        ctl = tiny_store(tmp / "ctl")
        ctl.ok("instance", "create", "big", "--base", "tiny", "--mac", MAC, "--hypervisor",
               "uml", "--size", "64M", "--memory", "96")  # fmt: skip
        mnt = tmp / "mnt-big"
        mnt.mkdir()
        ctl.ok("mount", "big", str(mnt))
        try:
            (mnt / "srv").mkdir(exist_ok=True)
            (mnt / "srv" / "data.bin").write_bytes(os.urandom(BIG))
        finally:
            ctl.ok("umount", str(mnt))
        ctl.ok("system", "create", "sp", "--instance", "big", "-m", "one big VM")
        hosts = {}
        for name in ("h1", "h2", "h3"):
            host = lab.add_host(name)
            host.authorize(ctl.ok("host", "key").output.strip())
            ctl.ok(
                "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
                "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
            )  # fmt: skip
            hosts[name] = host
        yield Env(tmp, lab, ctl, srv.url, hosts)
    finally:
        if srv is not None:
            srv.stop()
        lab.close()
        unmount_tree(tmp)


def layers(store: Path) -> dict[str, dict[str, object]]:
    rows = json.loads(Cli(store).ok("layer", "list", "--json").output)
    return {r["diff_id"]: r for r in rows}


def part_files(store: Path) -> dict[str, int]:
    top = store / "placement" / "parts"
    if not top.is_dir():
        return {}
    return {f"{f.parent.name}/{f.name}": f.stat().st_size for f in top.rglob("*") if f.is_file()}


def servers_text(spare_disk: int) -> str:
    return (
        "server = [\n"
        '  { name = "h1", disk = "2G", cpu = 4, memory = "1G", runs = ["big"] },\n'
        f'  {{ name = "h2", disk = {spare_disk}, cpu = 4, memory = "1G" }},\n'
        f'  {{ name = "h3", disk = {spare_disk}, cpu = 4, memory = "1G" }},\n'
        ']\n[placement]\nsplit_parts = 2\nsplit_min = "1M"\ntransfer_kept = false\n'
    )


def test_split_apply_and_recover(env: Env) -> None:
    ctl = env.ctl
    top = json.loads(ctl.ok("system", "show", "sp", "--json").output)["vms"][0]["layer"]
    # the first apply (disk plenty) has the blobs made and pushed: sizes as the hosts see them
    roomy = env.tmp / "roomy.toml"
    roomy.write_text(servers_text(2 << 30))
    ctl.ok("apply", "placement", "--from-store", "sp", "--servers", str(roomy),
           "--registry", env.url)  # fmt: skip
    rows = layers(ctl.store)
    size = {d: int(r["image_size"]) + int(r["blob_size"]) for d, r in rows.items()}  # type: ignore[call-overload]
    chain = [top]
    while rows[chain[-1]]["parent"]:
        chain.append(str(rows[chain[-1]]["parent"]))
    below = sum(size[d] for d in chain[1:])
    assert size[top] > 4 << 20, size[top]
    # the spare hosts: the base, big's 64 MiB image and 3/4 of its own layer, not all of it
    servers = env.tmp / "servers.toml"
    servers.write_text(servers_text(below + (64 << 20) + size[top] * 3 // 4))
    args = ["--from-store", "sp", "--servers", str(servers)]
    applied = json.loads(
        ctl.ok("apply", "placement", *args, "--registry", env.url, "--json").output
    )
    plan = applied["plan"]
    assert plan["ok"], plan
    short = top.removeprefix("sha256:")[:12]
    assert plan["stores"][f"{short}/0"] != plan["stores"][f"{short}/1"], plan["stores"]
    blob = str(rows[top]["blob_digest"]).removeprefix("sha256:")
    blob_size = int(rows[top]["blob_size"])  # type: ignore[call-overload]
    ranges = {0: (0, blob_size // 2), 1: (blob_size // 2, blob_size)}
    for name in ("h2", "h3"):  # each spare keeps one part only: its range, nothing more
        row = applied["hosts"][name]
        assert top not in layers(env.hosts[name].store), name
        (k,) = [i for i in (0, 1) if name in plan["stores"][f"{short}/{i}"]]
        s, e = ranges[k]
        assert part_files(env.hosts[name].store) == {f"{blob}/{s}-{e}": e - s}, name
        assert row["parts"] == [f"{short}/{k}"] and row["part_bytes"] == e - s
    assert part_files(env.hosts["h1"].store) == {}
    # h1 fails: big recovers on the planned target, which lacks the other part
    (tgt,) = plan["failures"]["h1"]["targets"]
    to = tgt["server"]
    missing = [m for m in tgt["sent"] if m.startswith(short)]
    assert len(missing) == 1 and tgt["bytes"] > 0, tgt
    predicted = sum(ranges[int(m.rsplit("/", 1)[1])][1] - ranges[int(m.rsplit("/", 1)[1])][0]
                    for m in missing)  # fmt: skip
    # a part tampered with on the target: refused in one line, nothing made
    (held,) = (env.hosts[to].store / "placement" / "parts" / blob).iterdir()
    good = held.read_bytes()
    held.write_bytes(b"\0" + good[1:])
    env.hosts["h1"].link(False)
    try:
        res = ctl.fails("recover", "big", "--on", to, "--no-replan")  # one line (fails)
        assert "tampered" in res.output, res.output
        assert top not in layers(env.hosts[to].store)
        Cli(env.hosts[to].store).fails("instance", "show", "big", code=3)
        held.write_bytes(good)
        out = json.loads(ctl.ok("recover", "big", "--on", to, "--no-replan", "--json").output)
    finally:
        env.hosts["h1"].link(True)
    assert out["range_bytes_fetched"] == out["planned_range_bytes"] == predicted, out
    assert out["layers_lacking"] == [top]
    made = json.loads(Cli(env.hosts[to].store).ok("instance", "show", "big", "--json").output)
    assert made["layers"] == [top] and made["mac"] == MAC, made
    got = layers(env.hosts[to].store)[top]
    assert got["blob_digest"] == rows[top]["blob_digest"], got
    spare = {h: part_files(env.hosts[h].store) for h in ("h2", "h3")}
    # a placement that keeps the layer whole (roomy disks) removes the parts from the hosts
    again = json.loads(
        ctl.ok("apply", "placement", "--from-store", "sp", "--servers", str(roomy),
               "--registry", env.url, "--json").output
    )  # fmt: skip
    assert not any(again["hosts"][h]["parts"] for h in ("h2", "h3")), again["hosts"]
    for name in ("h2", "h3"):
        assert part_files(env.hosts[name].store) == {}, name
        assert len(again["hosts"][name]["parts_removed"]) == 1, again["hosts"][name]
    print(
        f"\n  tampered part refused: {res.output.strip()[:200]}"
        f"\n  split: {short} ({blob_size} bytes of blob) in two; parts on the spares "
        f"{ {h: list(v.values()) for h, v in spare.items()} }; "
        f"recover big on {to}: {out['range_bytes_fetched']} bytes by range (the plan: "
        f"{predicted} of blob, {tgt['bytes']} model bytes), pull {out['bytes_pulled']} bytes"
    )
