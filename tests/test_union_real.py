"""Instances, the overlay union, status and history on real loop devices and overlayfs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Cli

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def vm(cli: Cli, src_tree: Path) -> str:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "deb")
    return "vm1"


def show(cli: Cli, vm: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("instance", "show", vm, "--json").output)
    return data


def test_instance_image_is_small_sparse_labeled_u(cli: Cli, vm: str) -> None:
    data = show(cli, vm)
    assert {"name", "base", "generation", "mac", "hypervisor", "upper_image", "state"} <= set(data)
    assert data["state"] == "stopped" and data["generation"] == 1
    img = Path(data["upper_image"])
    assert img.stat().st_size == 4 << 30
    assert img.stat().st_blocks * 512 < 5 << 20
    assert img.stat().st_mode & 0o777 == 0o600
    label = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "LABEL", str(img)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert label == "U"
    listing = subprocess.run(
        ["debugfs", "-R", "ls /", str(img)], capture_output=True, text=True, check=True
    ).stdout
    assert "upper" in listing and "work" in listing and ".hg" in listing
    mac = data["mac"]
    assert int(mac[:2], 16) & 3 == 2
    cli.ok("instance", "create", "vm2", "--base", "deb")
    assert show(cli, "vm2")["mac"] != mac


def test_union_writes_go_to_upper_only(cli: Cli, vm: str, tmp_path: Path) -> None:
    base_img = Path(
        json.loads(cli.ok("base", "show", "deb", "--json").output)["generations"][0]["image"]
    )
    before = sha(base_img)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt))
    try:
        data = show(cli, vm)
        assert data["state"] == "mounted" and data["mounted_at"] == str(mnt)
        # the loop devices under the union, read back from sysfs through pyudev
        import pyudev

        loops = {}
        for dev in pyudev.Context().list_devices(subsystem="block"):
            backing = dev.attributes.get("loop/backing_file")
            if dev.sys_name.startswith("loop") and backing:
                loops[backing.decode().strip()] = dev.attributes.get("ro").decode().strip()
        assert loops.get(str(base_img)) == "1", "BASE must sit on a read-only loop device"
        assert loops.get(data["upper_image"]) == "0"
        assert (mnt / "etc/hostname").read_text() == "base\n"
        (mnt / "etc/hostname").write_text("mine\n")
        (mnt / "etc/new file é").write_text("new\n")
        (mnt / "etc/motd").unlink()
        os.chmod(mnt / "etc/app/app.conf", 0o600)
        (mnt / "srv/a/b").mkdir(parents=True)
        run_dir = cli.store / "run" / vm / "u" / "upper"
        st = os.lstat(run_dir / "etc/motd")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "deletion must be a whiteout"
        assert (run_dir / "etc/hostname").read_text() == "mine\n"
        status = json.loads(cli.ok("status", vm, "--json").output)
        assert status["modified"] == ["/etc/hostname"]
        assert status["deleted"] == ["/etc/motd"]
        assert status["metadata"] == ["/etc/app/app.conf"]
        assert "/etc/new file é" in status["added"] and "/srv/a/b" in status["added"]
        assert status["newer_generation"] is False
        assert cli.ok("commit", vm, "-m", "my edits").output.startswith("committed ")
        assert cli.ok("commit", vm).output.strip() == "nothing changed"
        # plain hg on the instance's repository, inside its U layer
        u = cli.store / "run" / vm / "u"
        log = subprocess.run(
            [HG, "-R", str(u), "log", "-T", "{desc}\\n"], capture_output=True, text=True, check=True
        ).stdout
        assert log.splitlines() == ["my edits"]
        side = (u / ".unionimg" / "manifest.jsonl").read_text()
        assert '"kind": "whiteout", "mode": "0000", "path": "/etc/motd"' in side
        files = subprocess.run(
            [HG, "--cwd", str(u), "files"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert "upper/etc/hostname" in files and not any(f.startswith("work/") for f in files)
        other = tmp_path / "other"
        other.mkdir()
        res = cli.fails("mount", vm, str(other))
        assert "already mounted" in res.output
    finally:
        cli.ok("umount", str(mnt))
    assert show(cli, vm)["state"] == "stopped"
    assert sha(base_img) == before, "the BASE image was written"
    # status and log also work with the union unmounted (U mounted read-only for the read)
    status = json.loads(cli.ok("status", vm, "--json").output)
    assert status["modified"] == ["/etc/hostname"]
    assert [c["message"] for c in json.loads(cli.ok("log", vm, "--json").output)] == ["my edits"]


def test_readonly_mount(cli: Cli, vm: str, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        with pytest.raises(OSError):
            (mnt / "etc/hostname").write_text("x")
        assert (mnt / "etc/hostname").read_text() == "base\n"
        res = cli.fails("commit", vm)
        assert "read-only" in res.output
    finally:
        cli.ok("umount", str(mnt))


def test_newer_generation_reported_and_pinning(cli: Cli, vm: str, tmp_path: Path) -> None:
    patch = tmp_path / "p"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc" / "hostname").write_text("gen2\n")
    cli.ok("base", "update", "deb", "--apply-dir", str(patch))
    status = json.loads(cli.ok("status", vm, "--json").output)
    assert status["generation"] == 1 and status["newer_generation"] is True
    cli.ok("instance", "create", "old", "--base", "deb", "--generation", "1")
    cli.ok("instance", "create", "new", "--base", "deb")
    assert show(cli, "old")["generation"] == 1 and show(cli, "new")["generation"] == 2
    mnt = tmp_path / "m"
    mnt.mkdir()
    cli.ok("mount", "new", str(mnt))
    try:
        assert (mnt / "etc/hostname").read_text() == "gen2\n"
    finally:
        cli.ok("umount", str(mnt))


def test_fuse_overlayfs_driver(cli: Cli, vm: str, tmp_path: Path) -> None:
    from tests.conftest import need

    need(Path("/usr/bin/fuse-overlayfs").exists(), "fuse-overlayfs not installed")
    need(Path("/dev/fuse").exists(), "/dev/fuse missing")
    mnt = tmp_path / "f"
    mnt.mkdir()
    out = cli.ok("mount", vm, str(mnt), "--driver", "fuse-overlayfs").output
    assert "fuse-overlayfs" in out
    try:
        (mnt / "etc/hostname").write_text("fuse\n")
        (mnt / "etc/motd").unlink()
    finally:
        cli.ok("umount", str(mnt))
    status = json.loads(cli.ok("status", vm, "--json").output)
    assert status["modified"] == ["/etc/hostname"] and status["deleted"] == ["/etc/motd"]


def test_two_unions_share_one_base_generation(cli: Cli, vm: str, tmp_path: Path) -> None:
    cli.ok("instance", "create", "vm2", "--base", "deb")
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.mkdir()
    m2.mkdir()
    cli.ok("mount", vm, str(m1))
    try:
        cli.ok("mount", "vm2", str(m2))
        try:
            (m1 / "etc/hostname").write_text("one\n")
            assert (m2 / "etc/hostname").read_text() == "base\n"
        finally:
            cli.ok("umount", str(m2))
    finally:
        cli.ok("umount", str(m1))
