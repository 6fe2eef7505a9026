"""Input checks through the real CLI on a real store: every refused value gives ONE line
``unionimg: error: ...`` naming it, exit 2, and leaves the store byte-for-byte as it was
(every path, type, mode, size and mtime, lock files included). Also: a SIGKILLed
``base update --run`` leaves no process and no mount behind."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, _loop_devices, need, need_programs, need_root
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.layers import sandbox
from unionimg.layers.base import _bzimage_version
from unionimg.layers.sandbox import proc_start

Listing = list[tuple[str, int, int, int]]


def listing(root: Path) -> Listing:
    """Every path below ``root`` (and ``root``) with its mode, size and mtime."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out.append((str(p.relative_to(root)), st.st_mode, st.st_size, st.st_mtime_ns))
    return sorted(out)


def busybox_tree(root: Path) -> Path:
    """A tiny root file system whose /bin/sh is busybox (for --run)."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "etc" / "hostname").write_text("tiny\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    return root


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    """A store with base 'b' (generation 1) and instance 'vm1', shared by the module's
    refusal tests (none of which may change it)."""
    need_root()
    need_programs("busybox", "unshare")
    tmp = tmp_path_factory.mktemp("input-checks")
    cli = Cli(tmp / "store")
    cli.ok("base", "create", "b", "--from-dir", str(busybox_tree(tmp / "src")))
    cli.ok("instance", "create", "vm1", "--base", "b", "--size", "64M")
    yield cli
    leaked = [m.target for m in mountinfo() if m.target.startswith(str(tmp))]
    unmount_tree(tmp)
    assert not leaked and not _loop_devices(tmp), f"left behind: {leaked}"


def refused(cli: Cli, *args: str, expect: str = "") -> str:
    """Run a command that must be refused: exit 2, one line, the store unchanged."""
    before = listing(cli.store)
    res = cli.fails(*args, code=2)
    assert listing(cli.store) == before, f"store changed by {args}"
    line = res.output.strip()
    assert expect in line, (args, line)
    return line


CREATE = ("instance", "create", "vm2", "--base", "b", "--size", "64M")


@pytest.mark.parametrize(
    "mac",
    [
        "52:54:00:ab:cd:ef\n",  # the stored trailing newline that broke 'instance list'
        " 52:54:00:ab:cd:ef",
        "52:54:00:ab:cd:ef ",
        "52:54:00:ab:cd:e\u0660",
        "52:54-00:ab:cd:ef",  # mixed separators
        "52.54.00.ab.cd.ef",
        "5254.00ab.cdef",
        "525400abcdef",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:ef:01",
        "ff:ff:ff:ff:ff:ff",
        "01:00:5e:00:00:01",
        "33:33:00:00:00:01",
        "00:00:00:00:00:00",
    ],
)
def test_bad_mac_refused(stocked: Cli, mac: str) -> None:
    line = refused(stocked, *CREATE, "--mac", mac, expect="MAC '")
    assert "for instance vm2" in line


def test_mac_normalised_and_listed(stocked: Cli) -> None:
    stocked.ok(*CREATE, "--mac", "52-54-00-AB-CD-EF")
    try:
        rows = stocked.ok("instance", "list").output.splitlines()
        assert "vm2\tb:1\t52:54:00:ab:cd:ef\tkvm\tstopped" in rows
    finally:
        stocked.ok("instance", "remove", "vm2")


@pytest.mark.parametrize(
    ("nic", "expect"),
    [
        ("", "empty"),
        ("a" * 16, "longer than 15 bytes"),
        ("\u00e9" * 8, "longer than 15 bytes"),  # 16 bytes in UTF-8
        ("eth/0", "not allowed"),
        ("eth 0", "not allowed"),
        ("eth0\n", "not allowed"),
        ("eth\t0", "not allowed"),
        ("eth:0", "not allowed"),
        ("eth%d", "not allowed"),
        ('eth"0', "not allowed"),
        ("\u00e9th0", "not allowed"),
        (".", "not allowed"),
        ("..", "not allowed"),
        ("-eth0", "not allowed"),
        ("all", "refused by systemd"),
        ("default", "refused by systemd"),
        ("1234", "refused by systemd"),
    ],
)
def test_bad_nic_name_refused_at_create(stocked: Cli, nic: str, expect: str) -> None:
    line = refused(stocked, *CREATE, "--nic-name", nic, expect=expect)
    assert "NIC name" in line and "for instance vm2" in line


@pytest.mark.parametrize(
    ("size", "expect"),
    [
        ("1\u0660G", "not understood"),  # ARABIC-INDIC ZERO: int() reads 10
        ("\uff14G", "not understood"),  # FULLWIDTH DIGIT FOUR
        ("999999T", "more than 8.0 TiB"),
        ("8193G", "more than 8.0 TiB"),
        ("9" * 5000, "too long"),
        ("0", "zero"),
        ("0.0G", "zero"),
        ("-1G", "not understood"),
        ("1.5", "whole number of bytes"),
        ("4 G", "not understood"),
        ("4G\n", "not understood"),
        ("1e3", "not understood"),
        ("1_000M", "not understood"),
        ("0x10M", "not understood"),
    ],
)
def test_bad_size_refused(stocked: Cli, size: str, expect: str) -> None:
    line = refused(stocked, "instance", "create", "vm2", "--base", "b", "--size", size)
    assert expect in line and "--size" in line and "for instance vm2" in line


def test_bad_size_refused_for_base(stocked: Cli, tmp_path: Path) -> None:
    src = busybox_tree(tmp_path / "src")
    for size in ("1\u0660G", "999999T"):
        line = refused(stocked, "base", "create", "b2", "--from-dir", str(src), "--size", size)
        assert "for base b2" in line
        line = refused(stocked, "base", "update", "b", "--from-dir", str(src), "--size", size)
        assert "for base b" in line


@pytest.mark.parametrize(
    ("option", "value", "expect"),
    [
        ("--memory", "\u0665\u0661\u0662", "not a whole number"),  # Arabic-Indic 512
        ("--memory", "1_024", "not a whole number"),
        ("--memory", " 512", "not a whole number"),
        ("--memory", "abc", "not a whole number"),
        ("--memory", "16", "out of range"),
        ("--memory", "99999999999", "out of range"),
        ("--memory", "9" * 5000, "out of range"),
        ("--vcpus", "0", "out of range"),
        ("--vcpus", "257", "out of range"),
        ("--vcpus", "\u0661", "not a whole number"),
        ("--generation", "\u0661", "not a whole number"),
        ("--generation", "+1", "not a whole number"),
    ],
)
def test_bad_number_refused(stocked: Cli, option: str, value: str, expect: str) -> None:
    line = refused(stocked, *CREATE, option, value)
    assert expect in line


def test_unicode_digits_refused_elsewhere(stocked: Cli) -> None:
    refused(stocked, "base", "diff", "b", "--from", "\u0661", expect="--from")
    refused(stocked, "base", "diff", "b", "--to", "\u0661", expect="--to")
    refused(stocked, "reconcile", "vm1", "--to-generation", "\u0661", expect="--to-generation")
    refused(stocked, "reconcile", "vm1", "--jobs", "\u0662", expect="--jobs")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e3", "\u0661\u0660", "9999999999", " 5"])
def test_bad_seconds_refused(stocked: Cli, value: str) -> None:
    """click's FLOAT took all of these ('nan' and 'inf' made --wait return at once or never)."""
    for args in (
        ("boot", "vm1", "--wait", "--timeout", value),
        ("switch", "vm1", "--to", "uml", "--boot", "--wait", "--timeout", value),
        ("stop", "vm1", "--timeout", value),
    ):
        line = refused(stocked, *args, expect="--timeout")
        assert "seconds" in line


@pytest.mark.parametrize("name", ["web1\n", "web1 ", "w\u00e9b", "web\u0661"])
def test_names_must_match_whole(stocked: Cli, name: str) -> None:
    """'$' in a regular expression also matches before a trailing newline."""
    refused(stocked, "instance", "create", name, "--base", "b", expect="not allowed")


def test_directories_overlapping_the_store_refused(stocked: Cli) -> None:
    """A base made from the store (or from a directory holding it) would copy the store into
    itself: it failed with a traceback ('Too many levels of symbolic links') or made a base
    of the store's images; render --out inside the store wrote among its objects."""
    store = stocked.store
    for src, expect in (
        (store, "is inside the store"),
        (store / "bases" / "b", "is inside the store"),
        (store.parent, "holds the store"),
    ):
        refused(stocked, "base", "create", "x", "--from-dir", str(src), expect=expect)
        refused(stocked, "base", "update", "b", "--apply-dir", str(src), expect=expect)
        refused(stocked, "base", "update", "b", "--from-dir", str(src), expect=expect)
    refused(stocked, "render", "vm1", "--out", str(store / "instances" / "vm1"), expect="inside")
    refused(stocked, "render", "vm1", "--out", str(store), expect="is inside the store")


# -- --kernel ------------------------------------------------------------------------------
def host_vmlinuz() -> Path:
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    need(found, "no kernel in /boot (setup installs linux-image-amd64)")
    return found[-1]


def test_bzimage_header_parsed() -> None:
    kernel = host_vmlinuz()
    version = _bzimage_version(kernel.read_bytes()[: 1 << 16])
    assert version == kernel.name[len("vmlinuz-") :]
    assert _bzimage_version(b"") is None
    assert _bzimage_version(b"\0" * 0x202 + b"HdrS" + b"\0" * 100) is None  # no 0xAA55


@pytest.mark.parametrize("kind", ["text", "empty", "directory", "missing", "elf", "fifo", "gzip"])
def test_kernel_must_be_a_bzimage(stocked: Cli, tmp_path: Path, kind: str) -> None:
    src = busybox_tree(tmp_path / "src")
    kernel = tmp_path / "vmlinuz"
    expect = {
        "text": "not a bootable x86 kernel image",
        "empty": "is empty",
        "directory": "is a directory",
        "missing": "does not exist",
        "elf": "is an ELF file",
        "fifo": "not a regular file",
        "gzip": "not a bootable x86 kernel image",
    }[kind]
    if kind == "text":
        kernel.write_text("#!/bin/sh\necho I am not a kernel\n" * 100)
    elif kind == "empty":
        kernel.touch()
    elif kind == "directory":
        kernel.mkdir()
    elif kind == "elf":
        shutil.copy2("/bin/busybox", kernel)
    elif kind == "fifo":
        os.mkfifo(kernel)
    elif kind == "gzip":
        kernel.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4096))
    for args in (
        ("base", "create", "k", "--from-dir", str(src)),
        ("base", "update", "b", "--apply-dir", str(src)),
    ):
        line = refused(stocked, *args, "--kernel", str(kernel), expect=expect)
        assert str(kernel) in line


def test_real_kernel_accepted_with_its_version(cli: Cli, tmp_path: Path, root: None) -> None:
    need_programs("busybox")
    kernel = tmp_path / "bzImage"  # not named vmlinuz-VERSION: the version comes from its header
    shutil.copyfile(host_vmlinuz(), kernel)
    src = busybox_tree(tmp_path / "src")
    cli.ok("base", "create", "k", "--from-dir", str(src), "--kernel", str(kernel))
    gen = json.loads(cli.ok("base", "show", "k", "--json").output)["generations"][0]
    assert gen["kernel_version"] == host_vmlinuz().name[len("vmlinuz-") :]
    assert Path(gen["kernel"]).read_bytes() == kernel.read_bytes()


# -- timer --every -------------------------------------------------------------------------
@pytest.mark.parametrize("every", ["15m\n", " 15m", "15 m", "\u0661\u0665m", "9" * 5000 + "m"])
def test_bad_every_refused(cli: Cli, tmp_path: Path, every: str) -> None:
    """'15m\\n' used to be taken and written raw into the cron file, breaking its comment
    line into a second line cron cannot parse."""
    root = tmp_path / "img"
    res = cli.fails("timer", "install", "--every", every, "--root", str(root), code=2)
    assert "interval '" in res.output
    assert not root.exists()


# -- a killed base update --run --------------------------------------------------------------
def processes_with(token: bytes) -> list[int]:
    """Processes whose command line holds ``token`` (the test's own excluded)."""
    out = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(cmdline.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            with open(cmdline, "rb") as fh:
                if token in fh.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def mounts_below(path: Path) -> list[str]:
    return [m.target for m in mountinfo() if m.target.startswith(str(path) + "/")]


def wait_for(condition: object, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if callable(condition) and condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def test_killed_run_leaves_nothing_behind(cli: Cli, tmp_path: Path, root: None) -> None:
    need_programs("busybox", "unshare")
    cli.ok("base", "create", "b", "--from-dir", str(busybox_tree(tmp_path / "src")))
    token = f"KILLTEST{secrets.token_hex(6)}"
    command = f"while :; do date > /tmp/{token}; sleep 0.1; done"
    proc = subprocess.Popen(
        [str(UNIONIMG), "--store", str(cli.store), "base", "update", "b", "--run", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        pattern = str(cli.store / "tmp" / "*" / "upper" / "tmp" / token)
        wait_for(lambda: glob.glob(pattern) or proc.poll() is not None, 30, "the command")
        assert proc.poll() is None, proc.communicate()
        marker = Path(glob.glob(pattern)[0])
        stage = marker.parents[2]
        assert processes_with(token.encode())
        # the chroot's /proc, /sys, /dev and resolv.conf exist only in its own namespace
        assert mounts_below(stage / "tree") == [], mounts_below(stage / "tree")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone_after = wait_for(lambda: not processes_with(token.encode()), 10, "no process left")
    written = marker.stat().st_mtime_ns
    time.sleep(0.5)
    assert marker.stat().st_mtime_ns == written, "something still writes the marker"
    assert mounts_below(stage / "tree") == []
    print(f"every process of the killed --run gone {gone_after:.2f} s after SIGKILL")
    # the next command sweeps the dead staging (its overlay and loop mounts too) and works
    cli.ok("base", "update", "b", "--run", "echo after > /etc/after-kill")
    assert not stage.exists() and mounts_below(cli.store) == []
    assert os.listdir(cli.store / "tmp") == []
    diff = cli.ok("base", "diff", "b").output.split()
    assert diff == ["A", "/etc/after-kill"]


def test_run_sees_only_its_own_processes(cli: Cli, tmp_path: Path, root: None) -> None:
    """/proc in the chroot belongs to the command's PID namespace: the host's processes are
    not visible (nor killable by number) from the admin's command."""
    need_programs("busybox", "unshare")
    cli.ok("base", "create", "b", "--from-dir", str(busybox_tree(tmp_path / "src")))
    cli.ok(
        "base",
        "update",
        "b",
        "--run",
        "ls /proc | grep '^[0-9]' > /etc/pids && test -c /dev/null && test -d /sys/kernel",
    )
    gdir = cli.store / "bases" / "b" / "generations" / "2"
    gen = next(p for p in (gdir / "layer.img", gdir / "base.img") if p.exists())  # a delta?
    pids = subprocess.run(
        ["debugfs", "-R", "cat /etc/pids", str(gen)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "1" in pids and len(pids) <= 6, pids  # init, chroot's sh, ls, grep (+ a thread)
    assert mounts_below(cli.store) == []


def test_run_leaves_no_daemon(cli: Cli, tmp_path: Path, root: None) -> None:
    """A process the command leaves running in the background (a daemon a package started)
    is killed when the command's shell exits; unionimg does not wait for it."""
    need_programs("busybox", "unshare")
    cli.ok("base", "create", "b", "--from-dir", str(busybox_tree(tmp_path / "src")))
    token = f"DAEMON{secrets.token_hex(6)}"
    start = time.monotonic()
    cli.ok("base", "update", "b", "--run", f"( while :; do sleep 0.2; done ) & echo {token}")
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed
    assert processes_with(token.encode()) == []
    assert mounts_below(cli.store) == [] and os.listdir(cli.store / "tmp") == []


def test_failed_run_reports_status(cli: Cli, tmp_path: Path, root: None) -> None:
    need_programs("busybox", "unshare")
    cli.ok("base", "create", "b", "--from-dir", str(busybox_tree(tmp_path / "src")))
    before = listing(cli.store / "bases")
    res = cli("base", "update", "b", "--run", "echo oops >&2; exit 3")
    assert res.exit_code == 2  # the command's output, streamed, then the one error line
    assert res.output.splitlines()[0] == "oops" and len(res.output.splitlines()) == 2
    assert res.output.splitlines()[1].startswith("unionimg: error: ")
    assert "exit status 3: oops" in res.output
    assert listing(cli.store / "bases") == before
    assert mounts_below(cli.store) == [] and os.listdir(cli.store / "tmp") == []
    res = cli.fails("base", "update", "b", "--run", "kill -TERM $$", code=2)
    assert "exit status 143" in res.output  # 128 + SIGTERM, as a shell reports it


def test_sandbox_refuses_outside_a_new_pid_namespace(tmp_path: Path, root: None) -> None:
    """The namespace's init refuses to run anywhere else, or once unionimg is gone (a
    parent that died before the death signal was set would leave nothing to kill it)."""
    me, start = str(os.getpid()), proc_start(os.getpid()) or "0"
    full = sandbox.argv(tmp_path, "true")
    boot = full[full.index(sys.executable) : full.index("inside")]  # python -I -S -c BOOT
    for args in (["inside", str(tmp_path), "true", me, start], ["nonsense"]):
        res = subprocess.run([*boot, *args], capture_output=True, text=True, check=False)
        assert res.returncode == 125 and res.stderr.startswith("unionimg-sandbox: ")
    need_root()
    need_programs("unshare")
    marker = tmp_path / "ran"
    ns = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--"]
    for parent, parent_start, code in ((me, "1", 125), ("999999999", start, 125)):
        res = subprocess.run(
            [*ns, *boot, "inside", str(tmp_path), f"touch {marker}", parent, parent_start],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == code and "exited before the command started" in res.stderr
    assert not marker.exists()


def test_listing_sees_changes(tmp_path: Path) -> None:
    """The store comparison of these tests notices a change of mtime, mode and size."""
    f = tmp_path / "f"
    f.write_text("x")
    a = listing(tmp_path)
    os.chmod(f, 0o600 if stat.S_IMODE(f.stat().st_mode) != 0o600 else 0o644)
    assert listing(tmp_path) != a
