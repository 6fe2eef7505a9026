"""Snapshots of a running guest, off the host, restored after the host is gone (issue 16), for
real: the busybox guest under QEMU TCG through libvirt, namespace hosts with their own sshd
(:mod:`vm_fixtures.nethosts`).

Host ``a`` runs the VM (its store is driven from here: namespaces share the file system); a
boot hook in the VM's own layer counts on the console every 0.2 s. ``snapshot take --to b``
saves memory + U and copies the chunks to host ``b``; the guest counts on; then host ``a``
fails (its guest pulled, its VM and namespace deleted, its store removed) and the controller
runs ``restore --on b``: the counter on b's console continues from the snapshot's value, not
from 1. A second snapshot of the idle guest stores a small fraction of the first, and its
push sends only that. Two schedules on one VM: the second is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, need_ssh_hosts
from tests.test_boot_real import need_guests
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from vm_fixtures.nethosts import Host, Lab, _kill_netns

pytestmark = pytest.mark.usefixtures("root")

COUNTER = """#!/bin/sh
i=0
while :; do i=$((i+1)); echo "unionimg-guest: count $i"; sleep 0.2; done
"""
COUNT = re.compile(r"unionimg-guest: count (\d+)")


@dataclass
class Env:
    tmp: Path
    lab: Lab
    ctl: Cli
    hosts: dict[str, Host]
    url: str


def hcli(host: Host) -> Cli:
    return Cli(host.store)


def searchable(path: Path) -> None:
    """libvirt-qemu must traverse every directory above the images (o+x)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)


def record_host(store: Cli, name: str, host: Host) -> None:
    host.authorize(store.ok("host", "key").output.strip())
    store.ok(
        "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
        "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_guests()
    need_ssh_hosts("docker-registry")
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("snapreal")
    searchable(tmp)
    lab = Lab(tmp / "lab")
    srv = None
    e = Env(tmp, lab, Cli(tmp / "ctl"), {}, "")
    try:
        reg = lab.add_namespace("reg")
        srv = server_mod.start(tmp / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        e.url = srv.url
        for name in ("a", "b"):
            host = lab.add_host(name)
            e.hosts[name] = host
            hcli(host).ok("host", "list")  # the store made
            searchable(host.store)
            record_host(e.ctl, name, host)
        # only a has the base; b gets its layer from the registry (as a deploy would)
        hcli(e.hosts["a"]).ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
        record_host(hcli(e.hosts["a"]), "b", e.hosts["b"])  # a copies its snapshots to b
        yield e
    finally:
        if srv is not None:
            srv.stop()
        for host in e.hosts.values():
            cli = hcli(host)
            if host.store.is_dir():
                for inst in json.loads(cli.ok("instance", "list", "--json").output):
                    cli("stop", inst["name"], "--force")
                    cli("instance", "remove", inst["name"])
        lab.close()
        unmount_tree(tmp)


def counts(cli: Cli, vm: str) -> list[int]:
    return [int(m.group(1)) for m in COUNT.finditer(cli.ok("console", vm).output)]


def wait_count(cli: Cli, vm: str, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        seen = counts(cli, vm)
        if seen and seen[-1] >= at_least:
            return seen[-1]
        assert time.monotonic() < deadline, cli.ok("console", vm).output[-2000:]
        time.sleep(0.3)


def boot_counter(cli: Cli, vm: str, tmp: Path) -> None:
    cli.ok("instance", "create", vm, "--base", "tiny", "--memory", "128", "--size", "256M")
    mnt = tmp / f"mnt-{vm}"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/50-count"
        hook.write_text(COUNTER)
        hook.chmod(0o755)
    finally:
        cli.ok("umount", str(mnt))
    cli.ok("boot", vm, "--hypervisor", "kvm")


def fail_host(env: Env, name: str) -> None:
    """Host ``name`` is gone: its guest pulled (QEMU runs under the machine's libvirtd, not
    in the namespace), its VM forgotten, its namespace deleted, its store removed."""
    host = env.hosts.pop(name)
    cli = hcli(host)
    for inst in json.loads(cli.ok("instance", "list", "--json").output):
        cli("stop", inst["name"], "--force")
        cli.ok("instance", "remove", inst["name"])
    host.stop_sshd()
    _kill_netns(host.ns)
    env.lab.hosts.pop(name, None)
    shutil.rmtree(host.store)


def test_counter_resumes_on_another_host_after_the_first_is_gone(env: Env) -> None:
    a, b = env.hosts["a"], env.hosts["b"]
    ca, cb = hcli(a), hcli(b)
    boot_counter(ca, "ctr", env.tmp)
    try:
        wait_count(ca, "ctr", 10)
        before = counts(ca, "ctr")[-1]
        first = json.loads(ca.ok("snapshot", "take", "ctr", "--to", "b", "--json").output)
        after = counts(ca, "ctr")[-1]
        assert first["kind"] == "memory+disk" and first["memory_size"] > 16 << 20
        assert first["pause_s"] < 5, first
        assert first["push"]["chunks_sent"] == first["push"]["chunks"]
        # the guest runs on after the snapshot
        wait_count(ca, "ctr", after + 5, timeout=60)
        # a second snapshot of the (nearly idle) guest: a small fraction of the first, and
        # the push sends only its new chunks
        second = json.loads(ca.ok("snapshot", "take", "ctr", "--to", "b", "--json").output)
        assert second["new_bytes"] < first["new_bytes"] / 10, (first, second)
        assert second["push"]["bytes_sent"] <= second["new_bytes"] + 4096
        assert second["push"]["chunks_sent"] < second["push"]["chunks"] / 5
        rows = json.loads(cb.ok("snapshot", "list", "ctr", "--json").output)
        assert [r["id"] for r in rows] == [1, 2]
        # the base's layer (adopted by the first take) goes to the registry, as a deploy does
        layers = json.loads(ca.ok("layer", "list", "--json").output)
        base_layer = next(r["diff_id"] for r in layers if r["kind"] == "base")
        ca.ok("push", base_layer, "--registry", env.url)
        # the guest counts on, far past the first snapshot, then host a fails
        failed_at = wait_count(ca, "ctr", after + 40, timeout=120)
    finally:
        fail_host(env, "a")
    assert not a.store.exists()
    # b lacks the VM's base generation: refused, saying what to do, nothing made
    res = env.ctl.fails("restore", "ctr", "--on", "b", code=3)
    assert "which this store does not have" in res.output and "pull" in res.output
    assert json.loads(cb.ok("instance", "list", "--json").output) == []
    cb.ok("pull", base_layer, "--registry", env.url)  # what a deploy to b pulls
    t0 = time.monotonic()
    out = json.loads(env.ctl.ok("restore", "ctr", "--at", "1", "--on", "b", "--json").output)
    took = time.monotonic() - t0
    assert out["state"] == "running" and out["created"] is True and out["host"] == "b"
    resumed = wait_count(cb, "ctr", 1, timeout=60)
    log = cb.ok("console", "ctr").output
    assert "restored from snapshot 1 of ctr" in log
    seen = counts(cb, "ctr")
    # the counter continues from the snapshot's value (between what the console showed just
    # before and just after the take), not from 1, and not from where a was when it failed
    assert before <= seen[0] - 1 <= after + 1, (before, after, seen[:5])
    assert seen[0] < failed_at and seen == sorted(seen)
    wait_count(cb, "ctr", resumed + 5, timeout=60)
    show = json.loads(cb.ok("instance", "show", "ctr", "--json").output)
    assert show["state"] == "running"
    assert took < 60, took
    cb.ok("stop", "ctr", "--force")


def test_two_schedules_refused_and_schedule_logs(env: Env) -> None:
    b = env.hosts["b"]
    cb = hcli(b)
    if json.loads(cb.ok("instance", "show", "ctr", "--json").output)["state"] != "running":
        cb.ok("boot", "ctr")
    wait_count(cb, "ctr", 1, timeout=60)
    argv = [str(UNIONIMG), "--store", str(b.store), "snapshot", "schedule", "ctr",
            "--min", "2s", "--max", "20s", "--count", "2", "--keep", "3"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = b.store / "locks" / "snapshot-schedule-ctr.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and f"pid {proc.pid}" in lock.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.1)
        res = cb.fails("snapshot", "schedule", "ctr", "--count", "1", code=4)
        assert "snapshot-schedule-ctr is locked by pid" in res.output
        _out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = (b.store / "snapshots/vms/ctr/schedule.log").read_text().splitlines()
    assert len(lines) == 2 and all("load=" in ln and "next_s=" in ln for ln in lines), lines
    assert all("error=" not in ln for ln in lines), lines
    # the counter guest is nearly idle: the next interval stays near --min
    nexts = [float(re.search(r"next_s=([0-9.]+)", ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert all(2 <= n < 11 for n in nexts), lines
    ids = [r["id"] for r in json.loads(cb.ok("snapshot", "list", "ctr", "--json").output)]
    assert len(ids) == 3 and ids == sorted(ids)  # --keep 3
    cb.ok("stop", "ctr", "--force")


def chunk_count(store: Path) -> int:
    root = store / "snapshots" / "chunks"
    return sum(1 for _ in root.glob("*/*")) if root.is_dir() else 0


def test_host_killed_mid_copy_then_resumed(env: Env) -> None:
    b = env.hosts["b"]
    cb = hcli(b)
    c = env.lab.add_host("c")
    env.hosts["c"] = c
    hcli(c).ok("host", "list")
    record_host(cb, "c", c)
    latest = json.loads(cb.ok("snapshot", "list", "ctr", "--json").output)[-1]
    c.limit("16mbit")  # ~2 MB/s: the copy takes seconds, time to cut it
    argv = [str(UNIONIMG), "--store", str(b.store), "snapshot", "push", "ctr", "--to", "c",
            "--json"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from unionimg.poll import until

        assert until(lambda: chunk_count(c.store) >= 200, 120, 0.05), "the copy never started"
        c.kill_sessions()  # the host dies mid-copy
        _, err = proc.communicate(timeout=120)
    finally:
        c.limit(None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionimg: error: host c"), err
    # what arrived is kept (whole, checked chunks), but there is no snapshot there
    had = chunk_count(c.store)
    assert 200 <= had < latest["chunks"]
    assert not (c.store / "snapshots/vms/ctr").is_dir() or not any(
        (c.store / "snapshots/vms/ctr").glob("*.json")
    )
    assert json.loads(hcli(c).ok("snapshot", "list", "--json").output) == []
    # the host comes back (its sshd restarted); the next push sends only what is missing
    c.stop_sshd()
    env.lab._start_sshd(c)
    out = json.loads(cb.ok("snapshot", "push", "ctr", "--to", "c", "--json").output)
    assert out["chunks_sent"] <= latest["chunks"] - had + 1, (out, had)
    rows = json.loads(hcli(c).ok("snapshot", "list", "ctr", "--json").output)
    assert [r["id"] for r in rows] == [latest["id"]]


UML_COUNTER = """#!/bin/sh
i=0
while :; do i=$((i+1)); echo $i > /var/tmp/count; echo "unionimg-guest: count $i"; sleep 0.2; done
"""


def test_uml_snapshot_is_disk_only_with_synced_file_systems(env: Env) -> None:
    from tests.conftest import need_uml_kernel

    need_uml_kernel()
    b = env.hosts["b"]
    cb = hcli(b)
    vm = "umlctr"
    base = json.loads(cb.ok("instance", "show", "ctr", "--json").output)["base"]
    cb.ok("instance", "create", vm, "--base", base, "--hypervisor", "uml", "--memory", "96",
          "--size", "128M")  # fmt: skip
    mnt = env.tmp / "mnt-uml"
    mnt.mkdir()
    cb.ok("mount", vm, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/50-count"
        hook.write_text(UML_COUNTER)
        hook.chmod(0o755)
    finally:
        cb.ok("umount", str(mnt))
    cb.ok("boot", vm)
    try:
        # early, while the file the guest writes was made less than a journal commit
        # interval (5 s) ago: only a sync that waited for the commit has it
        wait_count(cb, vm, 3)
        before = counts(cb, vm)[-1]
        out = json.loads(cb.ok("snapshot", "take", vm, "--json").output)
        after = counts(cb, vm)[-1]
        assert out["kind"] == "disk" and out["memory_size"] == 0
        wait_count(cb, vm, after + 5, timeout=60)  # it runs on
    finally:
        cb.ok("stop", vm, "--force")
    res = json.loads(cb.ok("restore", vm, "--json").output)
    assert res["state"] == "stopped"
    cb.ok("mount", vm, str(mnt))
    try:
        saved = int((mnt / "var/tmp/count").read_text())
    finally:
        cb.ok("umount", str(mnt))
    # the guest's file written just before the take is in the snapshot (synced)
    assert before - 1 <= saved <= after + 1, (before, saved, after)
    cb.ok("instance", "remove", vm)


def test_disk_fills_during_a_take_of_a_running_guest(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's disk fills while libvirt writes the guest's memory: exit 7, no snapshot,
    no staging left, and the guest runs on; with space again the take succeeds."""
    fs = tmp_path / "fs"
    fs.mkdir()
    searchable(tmp_path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m,mode=0711", "tmpfs", str(fs)],
                   check=True)  # fmt: skip
    cli = Cli(fs / "store")
    try:
        from vm_fixtures import build

        cli.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
        searchable(fs / "store")
        boot_counter(cli, "full1", tmp_path)
        wait_count(cli, "full1", 5)
        filler = fs / "filler"
        for point in ("snapshot-take:staged", "snapshot-take:memory-stored"):
            monkeypatch.setenv("UNIONIMG_FILL_AT", point)
            monkeypatch.setenv("UNIONIMG_FILL_FILE", str(filler))
            res = cli("snapshot", "take", "full1")
            assert res.exit_code == 7, (point, res.output)
            assert res.output.startswith("unionimg: error: store full"), res.output
            assert json.loads(cli.ok("snapshot", "list", "--json").output) == []
            assert not any((fs / "store" / "tmp").iterdir())
            assert not list((fs / "store").rglob("*.snapshot-overlay"))  # the live take's
            chunks = fs / "store/snapshots/chunks"
            assert not chunks.is_dir() or not any(chunks.glob("*/*")), point
            filler.unlink()
            # the guest was resumed: it counts on
            wait_count(cli, "full1", counts(cli, "full1")[-1] + 3, timeout=60)
        monkeypatch.delenv("UNIONIMG_FILL_AT")
        out = json.loads(cli.ok("snapshot", "take", "full1", "--json").output)
        assert out["id"] == 1 and out["kind"] == "memory+disk"
    finally:
        cli("stop", "full1", "--force")
        cli("instance", "remove", "full1")
        subprocess.run(["umount", "-l", str(fs)], check=False)
