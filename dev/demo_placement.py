"""Demo section of issue 15: spare-image placement.

1. The seed's example (four 270 GB servers, VMs A-J, two layer trees): the plan of the exact
   solver, the seed's method and the conventional placement side by side, and the failure
   of Sk simulated under each (the demo fails unless the figures are 0 / 40 / 65 GiB).
2. For real: a system of three VMs on three namespace hosts (each with its own sshd and
   store) and a registry; ``apply placement`` copies each host's planned layers; host pa's
   link goes down and ``recover`` makes its VM on the host the plan chose from the layers
   already there (the demo fails if a layer byte is pulled or the host's link carries more
   than SSH's few KB), then places again without pa.

Run by ``make demo`` (dev/demo.py) with ``run(rootfs)``: about a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dev.demo import STORE, STORE_DIR, UNIONIMG, cli, say

GIB = 1 << 30
SERVERS = """\
server = [
  { name = "pa", disk = "1G", cpu = 4, memory = "1G", runs = ["pv1", "pv2"] },
  { name = "pb", disk = "1G", cpu = 4, memory = "1G", runs = ["pv3"] },
  { name = "pc", disk = "1G", cpu = 4, memory = "1G" },
]
"""


def fail(why: str) -> None:
    print(f"demo: {why}", file=sys.stderr)
    raise SystemExit(1)


def run(rootfs: Path) -> None:
    from unionimg.placement.example import SEED_EXAMPLE
    from unionimg.registry import server as registry_server
    from vm_fixtures.nethosts import Lab

    work = STORE / "placement"
    work.mkdir(parents=True, exist_ok=True)
    seed = work / "seed.toml"
    seed.write_text(SEED_EXAMPLE)
    say("the seed's example: where each layer is kept, exact (CP-SAT) vs the seed vs conventional")
    cli("plan", "placement", "--cluster", str(seed), "--compare")
    figures = {}
    for method in ("exact", "seed", "conventional"):
        say(f"server Sk fails under the {method} plan")
        cli("simulate", "failure", "Sk", "--cluster", str(seed), "--method", method)
        out = cli("simulate", "failure", "Sk", "--cluster", str(seed), "--method", method,
                  "--json", quiet=True)  # fmt: skip
        figures[method] = json.loads(out)["bytes"]
    if figures != {"exact": 0, "seed": 40 * GIB, "conventional": 65 * GIB}:
        fail(f"Sk's recovery transfer is not 0 / 40 / 65 GiB: {figures}")

    say("for real: a system of three VMs, placed over three hosts and a registry")
    cli("base", "create", "plc", "--from-dir", str(rootfs))
    for vm in ("pv1", "pv2", "pv3"):
        cli("instance", "create", vm, "--base", "plc", "--size", "64M", "--memory", "96")
    cli("system", "create", "plc", "--instance", "pv1", "--instance", "pv2", "--instance", "pv3",
        "-m", "placed")  # fmt: skip
    servers = work / "servers.toml"
    servers.write_text(SERVERS)
    lab = Lab(STORE / "placement-lab")
    srv = None
    try:
        reg = lab.add_namespace("reg")
        srv = registry_server.start(work / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        hosts = {}
        for name in ("pa", "pb", "pc"):
            host = lab.add_host(name)
            host.authorize(cli("host", "key", quiet=True).strip())
            cli(
                "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
                "--unionimg", UNIONIMG, "--host-key", str(host.host_key_pub),
            )  # fmt: skip
            hosts[name] = host
        say("apply placement: each host pulls the layers the plan keeps there")
        cli("apply", "placement", "--from-store", "plc", "--servers", str(servers), "--registry",
            srv.url)  # fmt: skip
        rec = json.loads((STORE_DIR / "placement" / "applied.json").read_text())
        target = next(r["target"] for r in rec["recovery"] if r["vm"] == "pv1")
        say(f"host pa fails (its link goes down); pv1 is made on {target} from what is there")
        hosts["pa"].link(False)
        before = hosts[target].counters()["rx_bytes"]
        out = cli("recover", "pv1", "--on", target, "--no-replan", "--json")
        moved = hosts[target].counters()["rx_bytes"] - before
        res = json.loads(out)
        print(f"layer bytes pulled: {res['bytes_pulled']}; bytes on {target}'s link: {moved:,}")
        if res["bytes_pulled"] != 0 or moved > 64 << 10:
            fail(f"recovering pv1 sent {res['bytes_pulled']} layer bytes, {moved} on the link")
        say("pv2 too, then the placement is planned and applied again without pa")
        pv2 = next(r["target"] for r in rec["recovery"] if r["vm"] == "pv2")
        cli("recover", "pv2", "--on", pv2)
        hosts["pa"].link(True)
    finally:
        if srv is not None:
            srv.stop()
        lab.close()
