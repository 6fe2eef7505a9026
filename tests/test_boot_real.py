"""End to end: the same BASE + U images boot under QEMU (through libvirt) and UML with the
instance's MAC; switching hypervisor copies no disk; a running VM is protected."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, need, need_root
from unionimg.boot import umlprobe
from unionimg.fs.mounts import unmount_tree


def need_guests() -> None:
    need_root()
    need(Path("/usr/bin/linux.uml").exists(), "user-mode-linux is not installed")
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86 is not installed")
    need(shutil.which("libvirtd") is not None, "libvirt-daemon-system is not installed")
    need(bool(list(Path("/boot").glob("vmlinuz-*"))), "no guest kernel in /boot")
    need(Path("/dev/net/tun").exists(), "/dev/net/tun is missing (UML's tap NIC)")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guest_lines(cli: Cli, vm: str) -> list[str]:
    out = cli.ok("console", vm).output
    # a getty prompt may share the console line ("debian-fixture login: unionimg-guest: ...")
    marker = "unionimg-guest:"
    return [ln[ln.index(marker) :].strip() for ln in out.splitlines() if marker in ln]


def cleanup_guest(cli: Cli, vm: str) -> None:
    if json.loads(cli.ok("instance", "show", vm, "--json").output)["state"] == "running":
        cli("stop", vm, "--force")
    cli("instance", "remove", vm)


def guest_store(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Cli]:
    """A store holding the 'tiny' base; every guest made in it is stopped and removed after."""
    need_guests()
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp(name)
    cli = Cli(tmp / "store")
    cli.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
    try:
        yield cli
    finally:
        for inst in json.loads(cli.ok("instance", "list", "--json").output):
            cleanup_guest(cli, inst["name"])
        unmount_tree(tmp)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    yield from guest_store(tmp_path_factory, "boot")


def test_boot_kvm_then_switch_to_uml(tiny_store: Cli) -> None:
    cli = tiny_store
    cli.ok("instance", "create", "sw1", "--base", "tiny", "--mac", "52:54:00:aa:bb:01")
    base_img = Path(
        json.loads(cli.ok("base", "show", "tiny", "--json").output)["generations"][0]["image"]
    )
    before = sha(base_img)
    try:
        res = cli.ok("boot", "sw1", "--hypervisor", "kvm", "--wait", "--timeout", "240", "--json")
        out = json.loads(res.output)
        assert out["stopped"] is True and out["domain_type"] in ("kvm", "qemu")
        # it returned because the guest reached its init on the union root, then powered off
        assert out["state"] == "stopped" and 0 < out["ready_s"] <= out["elapsed_s"]
        lines = guest_lines(cli, "sw1")
        assert "unionimg-guest: nic eth0 mac 52:54:00:aa:bb:01" in lines
        assert "unionimg-guest: boot 1" in lines
        assert any("upperdir=/run/unionimg/u/upper" in ln for ln in lines)
        show = json.loads(cli.ok("instance", "show", "sw1", "--json").output)
        assert show["state"] == "stopped" and show["hypervisor"] == "kvm"

        u_before = Path(show["upper_image"]).stat().st_size
        res = cli.ok("switch", "sw1", "--to", "uml", "--boot", "--wait", "--json")
        out = json.loads(res.output)
        assert out["from"] == "kvm" and out["to"] == "uml" and out["boot"]["stopped"]
        # it says which UML kernel it booted and why (the packaged one, or the built one)
        chosen = umlprobe.select()
        assert out["boot"]["uml_kernel"]["path"] == str(chosen.path)
        assert out["boot"]["uml_kernel"]["why"] == chosen.reason
        assert out["boot"]["state"] == "stopped" and out["boot"]["ready_s"] > 0
        lines = guest_lines(cli, "sw1")
        assert "unionimg-guest: nic eth0 mac 52:54:00:aa:bb:01" in lines
        assert "unionimg-guest: boot 2" in lines, "the first boot's write is not in U"
        show = json.loads(cli.ok("instance", "show", "sw1", "--json").output)
        assert show["hypervisor"] == "uml" and show["state"] == "stopped"
        assert Path(show["upper_image"]).stat().st_size == u_before  # same image, no copy
        assert not [n for n in os.listdir("/sys/class/net") if n == out["boot"]["tap"]]
        # the log shows the guest wrote in both boots; the BASE image never changed
        status = json.loads(cli.ok("status", "sw1", "--json").output)
        assert "/var/log/boots" in status["added"] + status["modified"]
        assert sha(base_img) == before
        assert base_img.stat().st_uid == 0 and base_img.stat().st_mode & 0o777 == 0o600
    finally:
        cleanup_guest(cli, "sw1")


def _keep_running(cli: Cli, vm: str, tmp: Path) -> None:
    """A boot hook in the VM's own layer keeps the tiny guest up for a while."""
    mnt = tmp / f"hook-{vm}"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/50-stay-up"
        hook.write_text("#!/bin/sh\nsleep 300\n")
        hook.chmod(0o755)
    finally:
        cli.ok("umount", str(mnt))


def test_running_vm_is_protected(tiny_store: Cli, tmp_path: Path) -> None:
    cli = tiny_store
    cli.ok("instance", "create", "run1", "--base", "tiny", "--hypervisor", "uml")
    cli.ok("instance", "create", "twin", "--base", "tiny", "--hypervisor", "uml")
    _keep_running(cli, "run1", tmp_path)
    try:
        cli.ok("boot", "run1")
        deadline = time.monotonic() + 60
        while not any(
            "running /etc/unionimg-boot.d" in ln or "50-stay-up" in ln
            for ln in cli.ok("console", "run1").output.splitlines()
        ):
            assert time.monotonic() < deadline, cli.ok("console", "run1").output
            time.sleep(0.5)
        show = json.loads(cli.ok("instance", "show", "run1", "--json").output)
        assert show["state"] == "running"
        mnt = tmp_path / "m"
        mnt.mkdir()
        for args, expected in [
            (("boot", "run1"), "already running under uml"),
            (("mount", "run1", str(mnt)), "running"),
            (("instance", "remove", "run1"), "running"),
            (("status", "run1"), "running"),
        ]:
            res = cli.fails(*args)
            assert expected in res.output, (args, res.output)
        rec = cli("reconcile", "run1", "--json")
        assert rec.exit_code == 10 and "running" in rec.output  # an instance failed
        # another VM with the running VM's MAC must not start
        inst = cli.store / "instances" / "twin" / "instance.json"
        data = json.loads(inst.read_text())
        data["mac"] = show["mac"]
        inst.write_text(json.dumps(data))
        res = cli.fails("boot", "twin")
        assert "in use by running instance 'run1'" in res.output
        cli.ok("stop", "run1", "--force")
        assert json.loads(cli.ok("instance", "show", "run1", "--json").output)["state"] == "stopped"
    finally:
        cleanup_guest(cli, "run1")
        cleanup_guest(cli, "twin")


def test_bad_boot_input(tiny_store: Cli, tmp_path: Path) -> None:
    cli = tiny_store
    cli.ok("instance", "create", "bad1", "--base", "tiny")
    try:
        assert (
            "unknown hypervisor 'vmware'"
            in cli.fails("boot", "bad1", "--hypervisor", "vmware").output
        )
        assert "render its configuration" in cli.fails("boot", "bad1", "--hypervisor", "xen").output
        assert (
            "render its configuration"
            in cli.fails("boot", "bad1", "--hypervisor", "virtualbox").output
        )
        assert "not allowed" in cli.fails("boot", "a'b<c>").output
        assert "not running" in cli.fails("stop", "bad1").output
        assert "not been booted" in cli.fails("console", "bad1").output
        assert "unknown hypervisor" in cli.fails("switch", "bad1", "--to", "hyperv").output
        out = tmp_path / "render"
        for hv in ("kvm", "uml", "xen", "virtualbox"):
            files = cli.ok("render", "bad1", "--hypervisor", hv, "--out", str(out / hv))
            assert str(out / hv / "initrd.img") in files.output
        assert (out / "xen" / "xl.cfg").is_file() and (out / "virtualbox" / "boot.img").is_file()
        assert (out / "kvm" / "net" / "70-unionimg-net.rules").is_file()
    finally:
        cleanup_guest(cli, "bad1")


def test_missing_kernel_is_one_line(cli: Cli, tmp_path: Path, root: None) -> None:
    need_guests()
    src = tmp_path / "t"
    (src / "etc").mkdir(parents=True)
    res = cli.fails(
        "base", "create", "k", "--from-dir", str(src), "--kernel", str(tmp_path / "no-vmlinuz")
    )
    assert "kernel" in res.output and "does not exist" in res.output


@pytest.mark.slow
def test_debian_udev_names_nic_on_kvm_and_uml(cli: Cli, root: None) -> None:
    """systemd-udevd in a real Debian guest names the NIC by the rendered rule, under QEMU
    (where its own policy would say enp0s*) and under UML."""
    need_guests()
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    cli.ok("base", "create", "deb", "--from-dir", str(build("debian")))
    gen = json.loads(cli.ok("base", "show", "deb", "--json").output)["generations"][0]
    assert gen["kernel_version"], "the debian base carries its own kernel"
    cli.ok(
        "instance",
        "create",
        "d1",
        "--base",
        "deb",
        "--nic-name",
        "lan0",
        "--memory",
        "768",
        "--mac",
        "52:54:00:de:b1:01",
    )
    try:
        for hv in ("kvm", "uml"):
            if hv == "kvm":
                cli.ok(
                    "boot",
                    "d1",
                    "--hypervisor",
                    "kvm",
                    "--append",
                    "unionimg.selftest=1",
                    "--wait",
                    "--timeout",
                    "600",
                )
            else:
                cli.ok(
                    "switch",
                    "d1",
                    "--to",
                    "uml",
                    "--boot",
                    "--wait",
                    "--timeout",
                    "300",
                    "--append",
                    "unionimg.selftest=1",
                )
            lines = guest_lines(cli, "d1")
            assert "unionimg-guest: nic lan0 mac 52:54:00:de:b1:01" in lines, (hv, lines)
    finally:
        cleanup_guest(cli, "d1")


def test_union_mounted_while_libvirt_guest_starts_is_released(
    tiny_store: Cli, tmp_path: Path
) -> None:
    """libvirt gives QEMU a private copy of every mount; unionimg makes / shared (as systemd
    does) so unmounting a union afterwards really releases its U image."""
    import subprocess

    cli = tiny_store
    cli.ok("instance", "create", "ns1", "--base", "tiny")
    cli.ok("instance", "create", "ns2", "--base", "tiny", "--hypervisor", "kvm")
    _keep_running(cli, "ns2", tmp_path)
    mnt = tmp_path / "ns1"
    mnt.mkdir()
    if not Path("/run/systemd/system").is_dir():
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)  # a fresh host's state
    try:
        cli.ok("mount", "ns1", str(mnt))
        cli.ok("boot", "ns2")  # QEMU's mount namespace is a copy taken now
        deadline = time.monotonic() + 120
        while "50-stay-up" not in cli.ok("console", "ns2").output:
            assert time.monotonic() < deadline, "the guest did not come up"
            time.sleep(1)
        cli.ok("umount", str(mnt))
        cli.ok("mount", "ns1", str(mnt))  # fails if the U image is still pinned
        cli.ok("umount", str(mnt))
    finally:
        cleanup_guest(cli, "ns2")
        cleanup_guest(cli, "ns1")
