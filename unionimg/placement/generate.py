"""Seeded random clusters (pure) for the tests and the benchmark: servers loaded to about a
``load`` fraction of their CPU and memory, VMs on layer trees shaped like real image trees
(a base of a few GiB, a few levels of smaller shared layers, one small top layer per VM)."""

from __future__ import annotations

import random

from unionimg.placement.model import VM, Cluster, Layer, Server, cluster

GIB = 1 << 30
MIB = 1 << 20


def random_cluster(
    seed: int,
    servers: int,
    vms: int,
    trees: int = 3,
    depth: int = 3,
    fanout: int = 3,
    disk: int = 2048 * GIB,
    load: float = 0.6,
    small: bool = False,
) -> Cluster:
    """A cluster of ``servers`` x ``vms``. ``small``: sizes in whole GiB (few distinct
    values, so the exact solver's unit is a GiB and tests stay fast)."""
    rnd = random.Random(seed)
    unit = GIB if small else MIB
    layers: list[Layer] = []
    tops: list[str] = []
    for t in range(trees):
        base = f"t{t}"
        layers.append(
            Layer(
                base,
                rnd.randint(2, 8) * (GIB if small else rnd.choice((GIB, GIB)))
                + (0 if small else rnd.randint(0, 1023) * MIB),
                None,
            )
        )
        level = [base]
        for d in range(depth):
            nxt: list[str] = []
            for parent in level:
                for k in range(rnd.randint(1, fanout)):
                    name = f"{parent}.{k}"
                    size = (
                        rnd.randint(1, 3) * GIB
                        if small
                        else rnd.randint(50, 2048 // (d + 1)) * unit
                    )
                    layers.append(Layer(name, size, parent))
                    nxt.append(name)
            level = nxt
        tops += level
    cpu = 64.0
    memory = 256 * GIB
    per_server = max(1, -(-vms // servers))
    vm_cpu = max(1.0, cpu * load / per_server)
    vm_mem = max(GIB, int(memory * load / per_server) // GIB * GIB)
    srv = [
        Server(
            f"s{i:03d}",
            disk,
            {"cpu": cpu, "memory": float(memory), "disk_io": 2000.0, "net_io": 10000.0},
        )
        for i in range(servers)
    ]
    out: list[VM] = []
    for i in range(vms):
        top = rnd.choice(tops)
        # the VM's own top layer over a shared node of its tree
        own = f"vm{i:04d}.top"
        layers.append(
            Layer(own, (rnd.randint(1, 2) * GIB if small else rnd.randint(20, 500) * MIB), top)
        )
        needs = {
            "cpu": float(round(vm_cpu)),
            "memory": float(vm_mem),
            "disk_io": 2000.0 * load / per_server,
            "net_io": 10000.0 * load / per_server,
        }
        out.append(
            VM(
                f"vm{i:04d}",
                srv[i % servers].name,
                own,
                rnd.randint(1, 4) * GIB if small else rnd.randint(4, 40) * GIB,
                needs,
            )
        )
    return cluster(srv, out, layers)
