"""Per-VM identity (docs/identity.md): no base generation holds a machine-id, SSH host keys or
random seeds; each instance gets its own at create, and at the reconcile that brings sshd.

Read back without trusting unionimg's own code: debugfs on the images, ssh-keygen on the keys,
the real sshd of a real Debian base in a chroot of a VM's union."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, REQUIRE_REAL, Cli, make_tree, need, need_programs
from tests.test_boot_real import guest_lines, need_guests
from unionimg.fs.manifest import Manifest
from unionimg.layers import identity

pytestmark = pytest.mark.usefixtures("root")

HEX32 = re.compile(r"^[0-9a-f]{32}$")
KEY_FILES = [f"ssh_host_{t}_key{s}" for t in identity.SSH_KEY_TYPES for s in ("", ".pub")]


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def exists_in(image: Path, path: str) -> bool:
    res = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=False
    )
    return "Inode:" in res.stdout


def mode_owner(image: Path, path: str) -> tuple[int, int, int]:
    st = debugfs(image, f"stat {path}")
    m = re.search(r"Mode:\s+(\d+)", st)
    o = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", st)
    assert m and o, st
    return int(m.group(1), 8), int(o.group(1)), int(o.group(2))


def show(cli: Cli, *what: str) -> Any:
    return json.loads(cli.ok(*what, "--json").output)


def gen_image(cli: Cli, base: str, number: int | None = None) -> Path:
    gens = show(cli, "base", "show", base)["generations"]
    g = gens[-1] if number is None else next(g for g in gens if g["number"] == number)
    return Path(g["image"])


def u_image(cli: Cli, vm: str) -> Path:
    return Path(show(cli, "instance", "show", vm)["upper_image"])


def identity_tree(root: Path, *, sshd: bool) -> Path:
    """make_tree plus every identity path of a used system (a machine-id, D-Bus's copy, host
    keys, seeds) and the markers of a systemd (and an sshd) base."""
    make_tree(root)
    for d in ("etc/ssh", "var/lib/dbus", "var/lib/systemd", "var/lib/urandom", "lib/systemd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "etc/ssh", 0o751)  # copied to the VM's upper with the base's mode
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(root / "etc/machine-id", 0o444)
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/systemd/random-seed").write_bytes(os.urandom(512))
    (root / "var/lib/systemd/credential.secret").write_bytes(os.urandom(32))
    (root / "var/lib/urandom/random-seed").write_bytes(os.urandom(512))
    (root / "lib/systemd/systemd").write_bytes(b"\x7fELF systemd")
    (root / "etc/ssh/ssh_config").write_text("Host *\n")
    if sshd:
        (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
        (root / "usr/sbin/sshd").write_bytes(b"\x7fELF sshd")
        (root / "etc/ssh/sshd_config").write_text("PermitRootLogin no\n")
        key = root / "etc/ssh/ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return root


SCRUBBED = [
    "/var/lib/dbus/machine-id",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
    "/var/lib/urandom/random-seed",
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_ed25519_key.pub",
]


def assert_no_identity(image: Path, manifest: Path, mid_mode: int = 0o444) -> None:
    for path in [*SCRUBBED, "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_outside_key"]:
        assert not exists_in(image, path), f"{path} is in the generation's image"
    assert debugfs(image, "cat /etc/machine-id") == "", "the machine-id is not empty"
    assert mode_owner(image, "/etc/machine-id") == (mid_mode, 0, 0)  # emptied: mode kept
    with Manifest(manifest) as m:
        assert all(m.get(p) is None for p in SCRUBBED)
        e = m.get("/etc/machine-id")
        assert e is not None and e.size == 0
        assert not [e.path for e in m.children("/etc/ssh") if "ssh_host_" in e.path]


def test_base_generations_hold_no_identity(cli: Cli, tmp_path: Path) -> None:
    """base create and each way of base update leave identity out of the image and the
    manifest; the source directory keeps its files; a symlinked key is removed as the link
    (its target, outside the tree, untouched); /etc/hostname stays."""
    need_programs("ssh-keygen", "debugfs")
    src = identity_tree(tmp_path / "src", sshd=True)
    outside = tmp_path / "outside-key"
    outside.write_text("not the base's\n")
    os.symlink(str(outside), src / "etc/ssh/ssh_host_outside_key")
    cli.ok("base", "create", "b", "--from-dir", str(src))
    g1 = show(cli, "base", "show", "b")["generations"][0]
    image, manifest = Path(g1["image"]), Path(g1["image"]).with_name("manifest.sqlite")
    assert_no_identity(image, manifest)
    assert debugfs(image, "cat /etc/hostname") == "base\n"
    assert outside.read_text() == "not the base's\n"
    assert (src / "etc/ssh/ssh_host_ed25519_key").is_file(), "the source directory was changed"
    assert (src / "etc/machine-id").stat().st_size == 33
    # history: the base's changeset holds none of them either
    hist = show(cli, "base", "show", "b")["history"]
    files = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hg"), "-R", hist, "files", "-r", "tip"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HGRCPATH": "", "HGRCSKIPREPO": "1"},
    ).stdout
    assert "ssh_host_" not in files and "random-seed" not in files

    patch = tmp_path / "patch"
    (patch / "etc/ssh").mkdir(parents=True)
    (patch / "etc/ssh/ssh_host_rsa_key").write_text("a key a patch brought\n")
    (patch / "etc/machine-id").write_text("fedcba9876543210fedcba9876543210\n")
    cli.ok("base", "update", "b", "--apply-dir", str(patch))
    g2 = show(cli, "base", "show", "b")["generations"][1]
    g2_image = Path(g2["image"])
    assert_no_identity(g2_image, g2_image.with_name("manifest.sqlite"), mid_mode=0o644)
    src2 = identity_tree(tmp_path / "src2", sshd=True)
    cli.ok("base", "update", "b", "--from-dir", str(src2))
    g3 = show(cli, "base", "show", "b")["generations"][2]
    assert_no_identity(Path(g3["image"]), Path(g3["image"]).with_name("manifest.sqlite"))


def test_run_made_identity_never_reaches_the_generation(cli: Cli, tmp_path: Path) -> None:
    """What a --run command makes (a package's postinst writing host keys, systemd writing
    a machine-id) is removed before the image is made."""
    need_programs("busybox", "unshare", "debugfs")
    src = tmp_path / "src"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (src / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", src / "bin" / "busybox")
    os.symlink("busybox", src / "bin" / "sh")
    (src / "etc" / "machine-id").write_text("")
    cli.ok("base", "create", "b", "--from-dir", str(src))
    cli.ok(
        "base",
        "update",
        "b",
        "--run",
        "mkdir -p /etc/ssh /var/lib/systemd && echo key > /etc/ssh/ssh_host_ecdsa_key && "
        "echo pub > /etc/ssh/ssh_host_ecdsa_key.pub && echo 0123 > /etc/machine-id && "
        "head -c 512 /dev/urandom > /var/lib/systemd/random-seed && echo kept > /etc/kept",
    )
    d = show(cli, "base", "diff", "b")
    assert d["added"] == ["/etc/kept", "/etc/ssh", "/var", "/var/lib", "/var/lib/systemd"], d
    assert d["modified"] == []  # the machine-id stays empty
    image = gen_image(cli, "b")
    assert not exists_in(image, "/etc/ssh/ssh_host_ecdsa_key")
    assert debugfs(image, "cat /etc/machine-id") == ""


def read_u(image: Path, path: str) -> bytes:
    res = subprocess.run(
        ["debugfs", "-R", f"cat /upper{path}", str(image)], capture_output=True, check=True
    )
    return res.stdout


def hg_tip(image: Path, mnt: Path) -> list[str]:
    """[description, files...] of the tip changeset of the U image's own repository (the
    image mounted read-only, Mercurial with no repository configuration)."""
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(mnt)], check=True)
    try:
        out = subprocess.run(
            [
                str(REPO / ".venv/bin/hg"),
                "-R",
                str(mnt),
                "log",
                "-r",
                "tip",
                "-T",
                "{desc|firstline}\n{join(files, '\n')}\n",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HGRCPATH": "", "HGRCSKIPREPO": "1"},
        ).stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return out.splitlines()


def keys_of(cli: Cli, vm: str, tmp: Path) -> dict[str, bytes]:
    image = u_image(cli, vm)
    return {name: read_u(image, f"/etc/ssh/{name}") for name in KEY_FILES}


def check_key_pair(private: bytes, public: bytes, tmp: Path) -> None:
    """The private key is a valid OpenSSH key whose public half is the .pub file."""
    key = tmp / "k"
    key.write_bytes(private)
    os.chmod(key, 0o600)
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert public.decode().split()[:2] == derived
    key.unlink()


def test_each_instance_gets_its_own_identity(cli: Cli, tmp_path: Path) -> None:
    need_programs("ssh-keygen", "debugfs")
    cli.ok("base", "create", "b", "--from-dir", str(identity_tree(tmp_path / "src", sshd=True)))
    cli.ok("instance", "create", "vm1", "--base", "b")
    cli.ok("instance", "create", "vm2", "--base", "b")
    ids, keys = {}, {}
    for vm in ("vm1", "vm2"):
        image = u_image(cli, vm)
        mid = read_u(image, "/etc/machine-id").decode()
        assert HEX32.match(mid.rstrip("\n")) and mid.endswith("\n"), mid
        assert mid[12] == "4" and mid[16] in "89ab", "not marked as a UUID v4, as systemd does"
        assert mode_owner(image, "/upper/etc/machine-id") == (0o444, 0, 0)
        # the directory on the way has the base's owner and mode (as a copy-up makes it)
        assert mode_owner(image, "/upper/etc/ssh") == (0o751, 0, 0)
        for name in KEY_FILES:
            want = 0o644 if name.endswith(".pub") else 0o600
            assert mode_owner(image, f"/upper/etc/ssh/{name}") == (want, 0, 0), name
        ids[vm] = mid
        keys[vm] = keys_of(cli, vm, tmp_path)
        for t in identity.SSH_KEY_TYPES:
            pub = keys[vm][f"ssh_host_{t}_key.pub"]
            assert pub.decode().split()[2] == f"root@{vm}"  # not the host's user@host
            check_key_pair(keys[vm][f"ssh_host_{t}_key"], pub, tmp_path)
    assert ids["vm1"] != ids["vm2"]
    assert all(keys["vm1"][n] != keys["vm2"][n] for n in KEY_FILES)
    # no key material is left in the store's scratch space
    assert os.listdir(cli.store / "tmp") == []
    # the VM sees them as its own files (and the base's other /etc/ssh files too)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt), "--readonly")
    try:
        assert (mnt / "etc/ssh/ssh_config").read_text() == "Host *\n"
        assert (mnt / "etc/machine-id").read_text() == ids["vm1"]
        assert (mnt / "etc/ssh/ssh_host_ed25519_key").read_bytes() == keys["vm1"][KEY_FILES[4]]
    finally:
        cli.ok("umount", str(mnt))
    status = cli.ok("status", "vm1").output
    assert "/etc/machine-id" in status and "/etc/ssh/ssh_host_rsa_key" in status


def test_generation_made_before_the_rule(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generation made before identity was kept out (simulated: the scrub switched off)
    still holds a machine-id and a host key: a VM created on it gets its own anyway,
    shadowing them; the next update removes them from the base, and the VM's reconcile
    keeps the VM's own."""
    need_programs("ssh-keygen", "debugfs")
    monkeypatch.setattr(identity, "scrub_base", lambda tree: [])
    cli.ok("base", "create", "old", "--from-dir", str(identity_tree(tmp_path / "src", sshd=True)))
    monkeypatch.undo()
    image = gen_image(cli, "old")
    base_key = debugfs(image, "cat /etc/ssh/ssh_host_ed25519_key")
    assert base_key and debugfs(image, "cat /etc/machine-id").strip()
    for vm in ("vm1", "vm2"):
        cli.ok("instance", "create", vm, "--base", "old")
    own = {vm: keys_of(cli, vm, tmp_path) for vm in ("vm1", "vm2")}
    mids = {vm: read_u(u_image(cli, vm), "/etc/machine-id") for vm in ("vm1", "vm2")}
    assert mids["vm1"] != mids["vm2"]
    assert b"0123456789abcdef" not in mids["vm1"] + mids["vm2"]
    assert own["vm1"]["ssh_host_ed25519_key"].decode() != base_key
    assert own["vm1"]["ssh_host_ed25519_key"] != own["vm2"]["ssh_host_ed25519_key"]
    patch = tmp_path / "patch"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc/motd").write_text("updated\n")
    # --full: the image itself is checked (a delta's image holds the scrubbed keys as
    # whiteouts over generation 1, which the manifest check covers)
    cli.ok("base", "update", "old", "--apply-dir", str(patch), "--full")
    g2 = gen_image(cli, "old")
    assert_no_identity(g2, g2.with_name("manifest.sqlite"))
    res = cli("reconcile", "vm1")
    print(res.output)
    assert res.exit_code in (0, 1), res.output
    assert keys_of(cli, "vm1", tmp_path) == own["vm1"]
    assert read_u(u_image(cli, "vm1"), "/etc/machine-id") == mids["vm1"]


def test_base_without_systemd_or_sshd_gets_nothing(cli: Cli, src_tree: Path) -> None:
    """A base with neither systemd nor sshd: no identity file in the VM's layer (status
    stays empty)."""
    need_programs("debugfs")
    cli.ok("base", "create", "plain", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "plain")
    assert not exists_in(u_image(cli, "vm1"), "/upper/etc")


def test_reconcile_gives_keys_when_the_base_gains_sshd(cli: Cli, tmp_path: Path) -> None:
    """A VM made before its base had sshd gets its own host keys at the reconcile that brings
    sshd (the base's, made by the update, never reach it); its machine-id stays; a VM with a
    key of its own keeps exactly its keys; a VM whose /etc/ssh is a symlink gets nothing
    written through it; a key name that is a symlink to a host file is replaced by a real
    key, the host file untouched."""
    need_programs("ssh-keygen", "debugfs")
    cli.ok("base", "create", "b", "--from-dir", str(identity_tree(tmp_path / "src", sshd=False)))
    for vm in ("vm1", "vm2", "vm3", "vm4"):
        cli.ok("instance", "create", vm, "--base", "b")
    for vm in ("vm1", "vm2", "vm3", "vm4"):
        assert not exists_in(u_image(cli, vm), "/upper/etc/ssh"), "keys without sshd"
    mid1 = read_u(u_image(cli, "vm1"), "/etc/machine-id")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    cli.ok("mount", "vm2", str(mnt))
    try:
        (mnt / "etc/ssh/ssh_host_ed25519_key").write_text("vm2's own\n")
        os.chmod(mnt / "etc/ssh/ssh_host_ed25519_key", 0o600)
    finally:
        cli.ok("umount", str(mnt))
    cli.ok("mount", "vm3", str(mnt))
    try:
        shutil.rmtree(mnt / "etc/ssh")
        os.symlink(str(host_dir), mnt / "etc/ssh")
    finally:
        cli.ok("umount", str(mnt))

    host_file = tmp_path / "host-file"
    host_file.write_text("host secret\n")
    cli.ok("mount", "vm4", str(mnt))
    try:  # a key "file" that is a symlink to a host file: not a key, and never written through
        os.symlink(str(host_file), mnt / "etc/ssh/ssh_host_rsa_key")
    finally:
        cli.ok("umount", str(mnt))

    patch = tmp_path / "patch"
    (patch / "usr/sbin").mkdir(parents=True)
    (patch / "usr/sbin/sshd").write_bytes(b"\x7fELF sshd")
    (patch / "etc/ssh").mkdir(parents=True)
    os.chmod(patch / "etc/ssh", 0o751)
    (patch / "etc/ssh/sshd_config").write_text("PermitRootLogin no\n")
    (patch / "etc/ssh/ssh_host_rsa_key").write_text("the base's: must reach no VM\n")
    cli.ok("base", "update", "b", "--apply-dir", str(patch))
    res = cli("reconcile", "--all")
    assert res.exit_code in (0, 1, 10), res.output  # vm3's symlinked /etc/ssh may fail

    k1 = keys_of(cli, "vm1", tmp_path)
    assert all(k1.values()) and b"must reach no VM" not in k1["ssh_host_rsa_key"]
    check_key_pair(k1["ssh_host_ed25519_key"], k1["ssh_host_ed25519_key.pub"], tmp_path)
    assert read_u(u_image(cli, "vm1"), "/etc/machine-id") == mid1
    # committed with the reconcile: its changeset in the VM's own history holds them
    tip = hg_tip(u_image(cli, "vm1"), tmp_path / "u1")
    assert tip[0].startswith("reconcile vm1: base b generation 1 -> 2"), tip
    assert {f"upper/etc/ssh/{n}" for n in KEY_FILES} <= set(tip[1:]), tip

    image2 = u_image(cli, "vm2")
    assert read_u(image2, "/etc/ssh/ssh_host_ed25519_key") == b"vm2's own\n"
    assert not exists_in(image2, "/upper/etc/ssh/ssh_host_rsa_key")
    assert os.listdir(host_dir) == [], "a key was written through the guest's symlink"
    assert not exists_in(u_image(cli, "vm3"), "/upper/etc/ssh/ssh_host_rsa_key")
    assert host_file.read_text() == "host secret\n"
    image4 = u_image(cli, "vm4")
    assert "Type: regular" in debugfs(image4, "stat /upper/etc/ssh/ssh_host_rsa_key")
    k4 = keys_of(cli, "vm4", tmp_path)
    check_key_pair(k4["ssh_host_rsa_key"], k4["ssh_host_rsa_key.pub"], tmp_path)
    assert show(cli, "instance", "show", "vm1")["generation"] == 2
    assert show(cli, "instance", "show", "vm2")["generation"] == 2


# -- the Debian fixture: real openssh-server, real sshd --------------------------------------
def need_debian() -> Path:
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1" or REQUIRE_REAL,
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    need_programs("debugfs", "ssh-keygen", "unshare", "setpriv")
    from vm_fixtures import build

    return build("debian")


@contextlib.contextmanager
def chroot_union(cli: Cli, vm: str, tmp: Path) -> Iterator[Path]:
    """The VM's union as its guest sees it, for running the guest's own programs: its base
    generation and its U image mounted read-only, their overlay with a throwaway upper (so
    nothing is written to either), a tmpfs on /run and the host's /dev."""
    from unionimg.layers import base as bases
    from unionimg.store.layout import Store

    inst = show(cli, "instance", "show", vm)
    st = Store(cli.store)
    gen = bases.get_generation(st, inst["base"], inst["generation"])
    u, w, root = (tmp / n for n in ("u", "w", "root"))
    for d in (u, w, root):
        d.mkdir(parents=True)
    done: list[Path] = []

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)
        done.append(Path(args[-1]))

    try:  # the generation's whole tree: a delta generation is the overlay of its chain
        b = bases.mount_generation(st, gen, tmp / "b")
        done.append(tmp / "b")
        mount("-o", "ro,loop,noload", inst["upper_image"], str(u))
        mount("-t", "tmpfs", "tmpfs", str(w))
        (w / "up").mkdir()
        (w / "wk").mkdir()
        mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={u}/upper:{b},upperdir={w}/up,workdir={w}/wk",
            str(root),
        )
        mount("-t", "tmpfs", "tmpfs", str(root / "run"))
        mount("--bind", "/dev", str(root / "dev"))
        yield root
    finally:
        for target in reversed(done):
            if target == tmp / "b":
                bases.unmount_layers(target)
            else:
                subprocess.run(["umount", str(target)], check=False)


SSH_HOOK = """#!/bin/sh
# run by the fixture's self-test at boot: wait for ssh.service to settle, then report
for i in $(seq 1 180); do
    state=$(systemctl is-active ssh.service)
    [ "$state" = active ] || [ "$state" = failed ] && break
    sleep 1
done
fp=$(ssh-keygen -l -f /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)
echo "unionimg-guest: ssh $state $(cat /etc/machine-id) $fp" >/dev/console
"""


def sshd_t(root: Path) -> subprocess.CompletedProcess[str]:
    """``sshd -t`` as ssh.service's ExecStartPre runs it (its RuntimeDirectory made)."""
    (root / "run/sshd").mkdir(mode=0o755, exist_ok=True)
    return subprocess.run(
        ["chroot", str(root), "/usr/sbin/sshd", "-t"], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_debian_vms_have_their_own_identity_and_sshd_works(cli: Cli, tmp_path: Path) -> None:
    """On the real Debian base: two VMs have different machine-ids; the base update that
    installs the real openssh-server (its postinst makes host keys) leaves none in the
    generation, its output is streamed and kept; Debian's own ssh.service check (sshd -t)
    fails without keys — first boot would not make them — and passes in each VM after its
    reconcile, with keys of its own; an update that changes nothing makes no generation."""
    rootfs = need_debian()
    cli.ok("base", "create", "deb", "--from-dir", str(rootfs))
    image1 = gen_image(cli, "deb")
    assert debugfs(image1, "cat /etc/machine-id") == ""
    for vm in ("d1", "d2"):
        cli.ok("instance", "create", vm, "--base", "deb", "--size", "256M", "--memory", "768")
    mids = {vm: read_u(u_image(cli, vm), "/etc/machine-id") for vm in ("d1", "d2")}
    assert mids["d1"] != mids["d2"] and all(HEX32.match(m.decode().strip()) for m in mids.values())

    res = cli(
        "base",
        "update",
        "deb",
        "--run",
        "apt-get update -q && apt-get install -y -q --no-install-recommends openssh-server",
    )
    if res.exit_code != 0 and "Could not resolve" in res.output:
        need(False, "no route to the Debian mirror (apt-get update)")
    assert res.exit_code == 0, res.output
    assert "Setting up openssh-server" in res.output, "the command's output was not shown"
    gen2 = show(cli, "base", "show", "deb")["generations"][-1]
    assert gen2["number"] == 2 and gen2["run_log"]
    kept = Path(gen2["run_log"]).read_text(errors="replace")
    assert "Setting up openssh-server" in kept and "Creating SSH2" in kept  # postinst made keys
    image2 = Path(gen2["image"])
    assert exists_in(image2, "/usr/sbin/sshd")
    assert "ssh_host_" not in debugfs(image2, "ls /etc/ssh"), "host keys in the generation"
    assert debugfs(image2, "cat /etc/machine-id") == ""
    assert "--run output" in cli.ok("base", "show", "deb").output

    # a VM on generation 2 with no keys is what first boot would see: ssh.service's check fails
    bare = tmp_path / "bare"
    bare.mkdir()
    cli.ok("instance", "create", "bare", "--base", "deb", "--size", "64M")
    cli.ok("mount", "bare", str(tmp_path / "bare"))
    try:
        for name in KEY_FILES:
            (bare / "etc/ssh" / name).unlink()
    finally:
        cli.ok("umount", str(bare))
    with chroot_union(cli, "bare", tmp_path / "c0") as root:
        failed = sshd_t(root)
    assert failed.returncode != 0 and "no hostkeys available" in failed.stderr, failed

    res = cli("reconcile", "d1", "d2")
    assert res.exit_code in (0, 1), res.output
    fingerprints = {}
    for vm in ("d1", "d2"):
        assert show(cli, "instance", "show", vm)["generation"] == 2
        with chroot_union(cli, vm, tmp_path / f"c-{vm}") as root:
            ok = sshd_t(root)
            assert ok.returncode == 0, (vm, ok.stderr)
            fingerprints[vm] = subprocess.run(
                ["ssh-keygen", "-l", "-f", str(root / "etc/ssh/ssh_host_ed25519_key.pub")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[1]
            assert (root / "etc/machine-id").read_bytes() == mids[vm]
    assert fingerprints["d1"] != fingerprints["d2"]

    # the real thing: d1 boots under QEMU and its ssh.service is active with its own key
    need_guests()
    mnt = tmp_path / "mnt-d1"
    mnt.mkdir()
    cli.ok("mount", "d1", str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/ssh-check"
        hook.write_text(SSH_HOOK)
        os.chmod(hook, 0o755)
    finally:
        cli.ok("umount", str(mnt))
    try:
        cli.ok(
            "boot",
            "d1",
            "--hypervisor",
            "kvm",
            "--append",
            "unionimg.selftest=1",
            "--wait",
            "--timeout",
            "900",
        )
        lines = guest_lines(cli, "d1")
    finally:
        cleanup_state = show(cli, "instance", "show", "d1")["state"]
        if cleanup_state == "running":
            cli("stop", "d1", "--force")
    want = f"unionimg-guest: ssh active {mids['d1'].decode().strip()} {fingerprints['d1']}"
    assert want in lines, lines

    # a command that changes nothing makes no generation
    res = cli.ok("base", "update", "deb", "--run", "true")
    assert "no change: base deb stays at generation 2" in res.output
    assert [g["number"] for g in show(cli, "base", "show", "deb")["generations"]] == [1, 2]
    assert os.listdir(cli.store / "tmp") == []

    # a failing command's output is shown, with the one error line last
    res = cli("base", "update", "deb", "--run", "echo seen-out; echo seen-err >&2; exit 4")
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "seen-out" in lines and "seen-err" in lines
    assert lines[-1].startswith("unionimg: error: ") and "exit status 4: seen-err" in lines[-1]
    assert [g["number"] for g in show(cli, "base", "show", "deb")["generations"]] == [1, 2]
    for vm in ("d1", "d2", "bare"):
        cli.ok("instance", "remove", vm)
