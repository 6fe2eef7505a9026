"""Migration of a VM between stores over SSH (issue 14), for real.

The lab (:mod:`vm_fixtures.nethosts`): a namespace host ``h1`` with a real OpenSSH sshd and
its own store directory; the controller is this process's store (it reaches ``h1`` as
``unionimg host add`` recorded it) and, for the way back, ``h1`` reaches the controller's
store as host ``back`` through a second namespace host whose store IS the controller's
store directory (namespaces share the file system). Bytes on the wire are the kernel's
counters of the namespace host's eth0.

What it shows: ``--dry-run`` says what would be sent and why, and sends nothing; a migration
sends only the contents the host has nowhere (files equal to the base's travel as a name and
a hash) and the host's VM holds the very same U tree (every file compared) with the same MAC,
while the VM is gone here; the way back after a small change sends little more than the
change; a killed transfer resumes without resending what arrived; strict receiving: an
existing VM name, and hostile streams (paths outside the tree, hash mismatch, more data
than announced) are refused in one line with nothing made.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UNIONIMG, Cli, need_ssh_hosts, need_uml_kernel
from tests.test_systems import tiny_store
from unionimg.fs.mounts import unmount_tree
from vm_fixtures.nethosts import Host, Lab

pytestmark = pytest.mark.usefixtures("root")


@dataclass
class Env:
    tmp: Path
    lab: Lab
    ctl: Cli
    hosts: dict[str, Host]

    def add_host(self, cli: Cli, name: str, host: Host) -> None:
        host.authorize(cli.ok("host", "key").output.strip())
        cli.ok(
            "host", "add", name, "--ssh", f"root@{host.addr}", "--store", str(host.store),
            "--unionimg", str(UNIONIMG), "--host-key", str(host.host_key_pub),
        )  # fmt: skip


def hcli(host: Host) -> Cli:
    return Cli(host.store)


def share_base(src: Cli, dst: Cli, base: str) -> None:
    """Give store ``dst`` the very same base as ``src`` (what a deploy leaves on a host; two
    'base create' of one tree differ in their root's mtime, so their layers differ)."""
    dst.ok("instance", "list")  # the store is made
    subprocess.run(
        ["cp", "-a", str(src.store / "bases" / base), str(dst.store / "bases" / base)], check=True
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_ssh_hosts("mke2fs")
    tmp = tmp_path_factory.mktemp("migrate")
    lab = Lab(tmp / "lab")
    try:
        ctl = tiny_store(tmp / "ctl")
        h1 = lab.add_host("h1")
        share_base(ctl, hcli(h1), "tiny")
        e = Env(tmp, lab, ctl, {"h1": h1})
        e.add_host(ctl, "h1", h1)
        # the way back: h1 reaches this store through namespace host 'back', whose sshd
        # runs unionimg on the controller's store directory
        back = lab.add_host("back")
        back.store = ctl.store
        e.hosts["back"] = back
        e.add_host(hcli(h1), "ctl", back)
        yield e
    finally:
        lab.close()
        unmount_tree(tmp)


def change(cli: Cli, vm: str, where: Path, files: dict[str, bytes | str | None]) -> None:
    """Write ``files`` (path -> content; None removes it) into VM's union, mounted."""
    mnt = where / f"mnt-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        for rel, data in files.items():
            path = mnt / rel
            if data is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
    finally:
        cli.ok("umount", str(mnt))


def make_vm(
    cli: Cli, where: Path, name: str, mac: str, files: dict[str, bytes | str | None]
) -> None:
    cli.ok("instance", "create", name, "--base", "tiny", "--mac", mac, "--hypervisor", "uml",
           "--size", "64M", "--memory", "96")  # fmt: skip
    change(cli, name, where, files)


def u_tree(cli: Cli, vm: str, where: Path) -> dict[str, Any]:
    """Every path of VM's union as the guest sees it: (kind, mode, owner, content)."""
    mnt = where / f"look-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    out: dict[str, Any] = {}
    try:
        for top, dirs, files in os.walk(mnt):
            for name in dirs + files:
                p = os.path.join(top, name)
                st = os.lstat(p)
                data: Any = None
                if os.path.isfile(p) and not os.path.islink(p):
                    data = Path(p).read_bytes()
                elif os.path.islink(p):
                    data = os.readlink(p)
                out[os.path.relpath(p, mnt)] = (st.st_mode, st.st_uid, st.st_gid, data)
    finally:
        cli.ok("umount", str(mnt))
    return out


def migrate(cli: Cli, vm: str, host: str, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("migrate", vm, "--to", host, "--json", *extra).output)
    return data


def wait_receivers_gone(host: Host, timeout: float = 30.0) -> None:
    """Wait (bounded) until no 'migrate-in' runs in the host's namespace: a killed sender's
    receiver ends when its stdin does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = subprocess.run(
            ["ip", "netns", "pids", host.ns], capture_output=True, text=True, check=False
        ).stdout.split()
        alive = []
        for pid in pids:
            try:
                alive.append(b"migrate-in" in Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        if not any(alive):
            return
        time.sleep(0.1)
    raise AssertionError(f"a migrate-in still runs on {host.name} after {timeout} s")


def names(cli: Cli) -> list[str]:
    return [i["name"] for i in json.loads(cli.ok("instance", "list", "--json").output)]


BIG = os.urandom(1 << 20).hex()  # 2 MiB of text no host holds
SHARED = os.urandom(300_000)  # also in a VM the host holds


def test_dry_run_then_migrate(env: Env) -> None:
    ctl, h1 = env.ctl, env.hosts["h1"]
    make_vm(hcli(h1), env.tmp, "peer", "52:54:00:14:00:11", {"srv/shared.bin": SHARED})
    # the base's busybox with 4 KiB appended (it still runs: the VM boots below): a delta
    bb = Path("/bin/busybox").read_bytes() + os.urandom(4096)
    make_vm(ctl, env.tmp, "web", "52:54:00:14:00:01", {
        "etc/web.conf": "role web\n", "srv/big.txt": BIG, "opt/same.bin": SHARED,
        "bin/busybox": bytes(bb),
        # the same bytes as the base's busybox: found in the host's base, not sent
        "opt/bb-copy": Path("/bin/busybox").read_bytes(),
    })  # fmt: skip
    before_tree = u_tree(ctl, "web", env.tmp)
    rx0 = h1.counters()["rx_bytes"]
    dry = migrate(ctl, "web", "h1", "--dry-run")
    assert dry["dry_run"] is True and dry["receiver"] is None
    plan = dry["plan"]
    assert plan["by_reason"]["new"]["bytes"] >= len(BIG)
    assert plan["by_reason"]["base"]["contents"] >= 1  # the busybox copy
    assert plan["by_reason"]["vm"]["bytes"] == len(SHARED)  # in the host's VM peer
    # why, per place: peer holds it at /srv/shared.bin (web at /opt/same.bin), the base
    # holds the busybox copy at /bin/busybox (web at /opt/bb-copy)
    peer = plan["found"]["vm peer"]
    assert peer["reason"] == "vm" and peer["elsewhere"]["bytes"] == len(SHARED), peer
    bases = [v for k, v in plan["found"].items() if k.startswith("base tiny/")]
    assert len(bases) == 1 and bases[0]["elsewhere"]["contents"] >= 1, plan["found"]
    assert dry["deltas"] == 1  # busybox, on the base's version
    # the host answered chunks of its busybox too (same path, over 1 MiB): the delta was
    # measured smaller than those chunks would be, so it went as the delta
    (bb_row,) = [r for r in dry["files"] if r["path"] == "/bin/busybox"]
    assert bb_row["method"] == "delta", bb_row
    assert bb_row["chunks_would_take"] > bb_row["payload"], bb_row
    assert dry["methods"]["delta"]["contents"] == 1 and dry["chunked"] == 0
    assert names(hcli(h1)) == ["peer"] and "web" in names(ctl)
    dry_wire = h1.counters()["rx_bytes"] - rx0
    assert dry_wire < 200_000  # the offer only
    human = ctl.ok("migrate", "web", "--to", "h1", "--dry-run").output
    assert "found in the upper layer of a stopped VM there" in human, human
    assert "in vm peer, other paths" in human, human

    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "web", "h1")
    wire = h1.counters()["rx_bytes"] - rx0
    r = out["receiver"]
    assert r["instance"] == "web" and r["mac"] == "52:54:00:14:00:01"
    assert r["files_verified"] >= 3
    assert (
        out["stream_bytes"] == dry["stream_bytes"]
        or abs(out["stream_bytes"] - dry["stream_bytes"]) < 4096
    )
    # the random 2 MiB hex compresses to ~1 MiB; busybox (found there) is not on the wire
    assert len(BIG) // 2 <= wire <= len(BIG) // 2 + 600_000, wire
    print(f"migrate: stream {out['stream_bytes']} B, wire {wire} B")
    assert "web" not in names(ctl)
    inst = json.loads(hcli(h1).ok("instance", "show", "web", "--json").output)
    assert inst["mac"] == "52:54:00:14:00:01" and inst["hypervisor"] == "uml"
    after_tree = u_tree(hcli(h1), "web", env.tmp)
    assert after_tree == before_tree
    # a second migration of the same name to the host is refused: it exists there
    make_vm(ctl, env.tmp, "web", "52:54:00:14:00:09", {"etc/x": "x\n"})
    res = ctl.fails("migrate", "web", "--to", "h1", code=4)
    assert "already exists" in res.output and res.output.count("\n") == 1
    assert "web" in names(ctl)
    ctl.ok("instance", "remove", "web")


def test_the_migrated_vm_boots_on_the_host(env: Env) -> None:
    """web runs on h1 (User-Mode Linux, booted there over SSH: its tap lives in h1's
    namespace) on its own MAC, then stops."""
    need_uml_kernel()
    h1 = env.hosts["h1"]
    if "web" not in names(hcli(h1)):
        pytest.skip("needs test_dry_run_then_migrate's VM on h1")

    def there(*args: str, check: bool = True) -> str:
        res = subprocess.run(
            h1.ssh_argv(str(UNIONIMG), "--store", str(h1.store), *args),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 0 or not check, (args, res.stderr[-2000:])
        return res.stdout

    try:
        there("boot", "web")
        out = there("console", "web")
        assert "unionimg-guest: start" in out, out[-2000:]
        assert "mac 52:54:00:14:00:01" in out, out[-2000:]
    finally:
        there("stop", "web", "--force", check=False)


def test_way_back_sends_only_the_change(env: Env) -> None:
    """web went to h1 (the test above); it changes a little there and comes back: the
    controller kept its contents when it left, so only the change travels."""
    ctl, h1, back = env.ctl, hcli(env.hosts["h1"]), env.hosts["back"]
    if "web" not in names(h1):
        pytest.skip("needs test_dry_run_then_migrate's VM on h1")
    small = os.urandom(20_000).hex()
    change(h1, "web", env.tmp, {"etc/changed-on-h1": small, "etc/web.conf": None})
    before_tree = u_tree(h1, "web", env.tmp)
    rx0 = back.counters()["rx_bytes"]
    out = migrate(h1, "web", "ctl")
    wire = back.counters()["rx_bytes"] - rx0
    plan = out["plan"]
    assert plan["by_reason"]["new"]["bytes"] < 100_000, plan
    assert plan["by_reason"]["cache"]["bytes"] >= len(BIG)  # kept when it left
    assert wire < 150_000, wire  # the 2 MiB file did not travel again
    print(f"way back: {wire} B on the wire, {plan['by_reason']}")
    assert "web" in names(ctl) and "web" not in names(h1)
    assert plan["by_reason"].get("vm") is None  # kept when it left: found in the cache
    assert u_tree(ctl, "web", env.tmp) == before_tree
    inst = json.loads(ctl.ok("instance", "show", "web", "--json").output)
    assert inst["mac"] == "52:54:00:14:00:01"


def test_broken_transfer_resumes(env: Env) -> None:
    """The sender is killed (SIGKILL) half-way through its stream: the host keeps the
    contents that arrived whole and verified, makes nothing, and the rerun sends only the
    rest (bytes counted on the host's link)."""
    ctl, h1 = env.ctl, env.hosts["h1"]
    files: dict[str, bytes | str | None] = {f"srv/part{i}": os.urandom(400_000) for i in range(8)}
    make_vm(ctl, env.tmp, "db", "52:54:00:14:00:02", files)
    total = sum(len(v) for v in files.values() if isinstance(v, bytes))
    before_tree = u_tree(ctl, "db", env.tmp)
    rx0 = h1.counters()["rx_bytes"]
    res = subprocess.run(
        [str(UNIONIMG), "--store", str(ctl.store), "migrate", "db", "--to", "h1", "--json"],
        env={**os.environ, "UNIONIMG_CRASH_AT": "migrate:half-sent"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    first = h1.counters()["rx_bytes"] - rx0
    assert first >= total // 3, first
    # the host made nothing; the VM is still here, whole
    assert "db" not in names(hcli(h1)) and "db" in names(ctl)
    wait_receivers_gone(h1)
    kept = list((h1.store / "migrate" / "objects").glob("[0-9a-f]*"))
    assert len(kept) >= 2
    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "db", "h1")
    second = h1.counters()["rx_bytes"] - rx0
    assert out["plan"]["by_reason"]["cache"]["contents"] >= 2
    assert second < total - 600_000, (first, second, total)
    print(f"broken transfer: {first} B before the kill, {second} B on the rerun, {total} B of data")
    assert "db" not in names(ctl)
    assert u_tree(hcli(h1), "db", env.tmp) == before_tree


def killed_at(cli: Cli, point: str, vm: str, host: str) -> subprocess.CompletedProcess[str]:
    """``migrate VM --to HOST`` killed (SIGKILL) at checkpoint ``point``."""
    res = subprocess.run(
        [str(UNIONIMG), "--store", str(cli.store), "migrate", vm, "--to", host, "--json"],
        env={**os.environ, "UNIONIMG_CRASH_AT": point},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    return res


def test_killed_after_the_hosts_confirmation(env: Env) -> None:
    """The sender is killed after the host made the VM and said so, before the VM left
    here: both stores hold it, but here it does not boot (one line: run the migration
    again); the rerun asks the host, which holds that very VM, sends nothing, keeps the
    contents for the way back and only then removes the VM here. A read-write mount is
    refused like the boot; a VM changed here meanwhile all the same (by a tool that does not
    ask, as reconcile) is removed from neither side until the admin chooses; with the host's
    copy removed, the rerun migrates it again."""
    ctl, h1 = env.ctl, env.hosts["h1"]
    data = os.urandom(500_000)
    sha = hashlib.sha256(data).hexdigest()
    make_vm(ctl, env.tmp, "kc", "52:54:00:14:00:06", {"srv/k.bin": data})
    before_tree = u_tree(ctl, "kc", env.tmp)
    killed_at(ctl, "migrate:confirmed", "kc", "h1")
    assert "kc" in names(hcli(h1)) and "kc" in names(ctl)
    # xen never starts here: were the check missing, boot would fail otherwise (exit 6)
    res = ctl.fails("boot", "kc", "--hypervisor", "xen", code=4)
    assert "does not boot here" in res.output, res.output
    assert "'unionimg migrate kc --to h1' again" in res.output, res.output
    assert not (ctl.store / "migrate" / "objects" / sha).exists()
    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "kc", "h1")
    wire = h1.counters()["rx_bytes"] - rx0
    print(f"killed after confirmation: the rerun put {wire} B on the host's link")
    assert out["finished_earlier"] is True and out["stream_bytes"] == 0, out
    assert out["plan"]["by_reason"] == {"vm": out["plan"]["by_reason"]["vm"]}, out["plan"]
    assert wire < 40_000, wire  # an SSH session and a status query, no stream
    assert "kc" not in names(ctl) and "kc" in names(hcli(h1))
    assert (ctl.store / "migrate" / "objects" / sha).is_file()  # kept for the way back
    assert out["kept_for_way_back"] >= 1
    assert u_tree(hcli(h1), "kc", env.tmp) == before_tree

    # changed here after the kill: nothing removed, one line; the host's copy removed by
    # the admin, the rerun migrates the changed VM normally
    make_vm(ctl, env.tmp, "kd", "52:54:00:14:00:07", {"srv/d.bin": os.urandom(100_000)})
    killed_at(ctl, "migrate:confirmed", "kd", "h1")
    mnt = env.tmp / "mnt-kd-refused"
    mnt.mkdir()
    res = ctl.fails("mount", "kd", str(mnt), code=4)
    assert "does not mount read-write here" in res.output, res.output
    record = ctl.store / "instances" / "kd" / "migrate-pending.json"
    aside = record.with_name("pending.aside")
    record.rename(aside)  # what a tool that does not ask would do: change U all the same
    change(ctl, "kd", env.tmp, {"etc/after-the-kill": "changed here\n"})
    aside.rename(record)
    res = ctl.fails("migrate", "kd", "--to", "h1", code=4)
    assert "changed here" in res.output and "nothing was removed" in res.output, res.output
    assert "kd" in names(ctl) and "kd" in names(hcli(h1))
    ctl.fails("boot", "kd", "--hypervisor", "xen", code=4)
    hcli(h1).ok("instance", "remove", "kd")
    changed = u_tree(ctl, "kd", env.tmp)
    out = migrate(ctl, "kd", "h1")
    assert out["finished_earlier"] is False and out["receiver"]["instance"] == "kd"
    assert "kd" not in names(ctl)
    assert u_tree(hcli(h1), "kd", env.tmp) == changed


def test_link_down_mid_transfer_then_resume_with_a_rate_cap(env: Env) -> None:
    """The host's link goes down while a rate-limited transfer runs: the sender gives up
    (bounded by SSH's keep-alive) with one line and keeps its VM; the link back, the rerun
    (capped with --bandwidth) sends only what had not arrived, at about the capped rate."""
    ctl, h1 = env.ctl, env.hosts["h1"]
    files: dict[str, bytes | str | None] = {f"srv/blk{i}": os.urandom(300_000) for i in range(10)}
    make_vm(ctl, env.tmp, "vd", "52:54:00:14:00:03", files)
    total = 3_000_000
    before_tree = u_tree(ctl, "vd", env.tmp)
    h1.limit("8mbit")  # ~1 MB/s: the transfer takes ~3 s
    rx0 = h1.counters()["rx_bytes"]
    proc = subprocess.Popen(
        [str(UNIONIMG), "--store", str(ctl.store), "migrate", "vd", "--to", "h1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while h1.counters()["rx_bytes"] - rx0 < total // 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
            time.sleep(0.05)
        h1.link(False)
        _out, err = proc.communicate(timeout=120)  # SSH's keep-alive: 30 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        h1.link(True)
        h1.limit(None)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode not in (0, None) and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("unionimg: error: host h1"), lines
    assert "vd" in names(ctl) and "vd" not in names(hcli(h1))
    wait_receivers_gone(h1)
    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "vd", "h1", "--bandwidth", "2M")
    second = h1.counters()["rx_bytes"] - rx0
    assert out["plan"]["by_reason"]["cache"]["contents"] >= 1
    assert second < total - 500_000, second
    # the cap: 2 MB/s, so the stream took at least ~its size / 2 MB/s
    assert out["stages"]["push"] >= 0.8 * out["stream_bytes"] / 2_000_000, out["stages"]
    print(f"link down: rerun sent {second} B of {total}; push {out['stages']['push']} s")
    assert u_tree(hcli(h1), "vd", env.tmp) == before_tree


def test_to_a_host_without_the_base(env: Env) -> None:
    """A host that lacks the VM's base gets it by content: the base layer's tree is offered
    (a manifest), the host finds what it can in its own stores (nothing here: an empty
    host), remakes the layer from the contents, checks its diff_id and makes generation 1
    from it (a deploy's way); then the VM. With --whole-layers the layer's blob travels."""
    ctl = env.ctl
    for host, vm, mac, extra in (
        ("h2", "nb", "52:54:00:14:00:04", ()),
        ("h3", "nb3", "52:54:00:14:00:05", ("--whole-layers",)),
    ):
        h = env.lab.add_host(host)
        env.hosts[host] = h
        env.add_host(ctl, host, h)
        make_vm(ctl, env.tmp, vm, mac, {"etc/nb.conf": "no base there\n"})
        before_tree = u_tree(ctl, vm, env.tmp)
        dry = migrate(ctl, vm, host, "--dry-run", *extra)
        if extra:
            assert len(dry["plan"]["layers_sent"]) == 1, dry["plan"]
        else:  # the base's files are in the plan, busybox among them
            assert dry["plan"]["by_reason"]["new"]["bytes"] > Path("/bin/busybox").stat().st_size
        rx0 = h.counters()["rx_bytes"]
        out = migrate(ctl, vm, host, *extra)
        wire = h.counters()["rx_bytes"] - rx0
        assert out["receiver"]["layers_received"] == 1
        print(f"to a host without the base{' (whole layers)' if extra else ''}: {wire} B")
        bases = json.loads(hcli(h).ok("base", "list", "--json").output)
        assert [b["name"] for b in bases] == ["tiny"], bases
        assert u_tree(hcli(h), vm, env.tmp) == before_tree
        assert vm not in names(ctl)


def test_gc_after_the_way_back_frees_bytes_and_the_next_way_back_still_works(env: Env) -> None:
    """web came back to the controller (test_way_back_sends_only_the_change): the contents
    the controller kept when it left are in web's upper layer again, so ``migrate gc`` frees
    them (redundant); web leaves again (they are kept again), changes a little on h1 and
    comes back: still only the change travels."""
    ctl, h1 = env.ctl, hcli(env.hosts["h1"])
    if "web" not in names(ctl):
        pytest.skip("needs test_way_back_sends_only_the_change's VM back here")
    big = hashlib.sha256(BIG.encode()).hexdigest()
    assert (ctl.store / "migrate" / "objects" / big).is_file()
    dry = json.loads(ctl.ok("migrate", "gc", "--dry-run", "--json").output)
    assert (ctl.store / "migrate" / "objects" / big).is_file()
    rep = json.loads(ctl.ok("migrate", "gc", "--json").output)
    assert rep["removed"] == dry["removed"] and rep["dry_run"] is False
    assert {"kind": "object", "name": big, "bytes": len(BIG), "why": "redundant: in vm web"} in (
        rep["removed"]
    ), rep["removed"]
    assert rep["bytes_freed"] >= len(BIG) and rep["bytes_after"] < rep["bytes_before"]
    assert not (ctl.store / "migrate" / "objects" / big).exists()
    print(f"gc after the way back: {rep['bytes_freed']} B freed, {rep['by_reason']}")
    out = migrate(ctl, "web", "h1")
    assert out["plan"]["by_reason"].get("new", {"bytes": 0})["bytes"] < 100_000, out["plan"]
    assert out["kept_for_way_back"] >= 1
    assert (ctl.store / "migrate" / "objects" / big).is_file()  # kept again as it left
    h1_rep = json.loads(h1.ok("migrate", "gc", "--json").output)  # web is there: redundant
    assert h1_rep["bytes_freed"] >= len(BIG), h1_rep["by_reason"]
    change(h1, "web", env.tmp, {"etc/changed-again": "a small change\n"})
    before_tree = u_tree(h1, "web", env.tmp)
    back = migrate(h1, "web", "ctl")
    assert back["plan"]["by_reason"].get("new", {"bytes": 0})["bytes"] < 100_000, back["plan"]
    assert back["plan"]["by_reason"]["cache"]["bytes"] >= len(BIG), back["plan"]
    assert "web" in names(ctl) and "web" not in names(h1)
    assert u_tree(ctl, "web", env.tmp) == before_tree
