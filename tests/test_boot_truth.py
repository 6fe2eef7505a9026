"""Every boot tells the truth: a guest that panics, misses its U disk, whose init exits or that
crashes later is reported as such (exit 9, the cause quoted from its console in one line,
``instance show`` state ``crashed`` with the reason), under kvm (QEMU through libvirt; TCG
here) and uml; a clean boot is not.

Real guests throughout: the ``tiny`` fixture base, the project's initramfs, libvirtd + QEMU,
User-Mode Linux. The failures are made deterministically, on any CPU:

- kernel panic in the running guest: a boot hook in the VM's own layer writes ``c`` to
  ``/proc/sysrq-trigger`` ("sysrq triggered crash");
- kernel panic before the initramfs runs: ``rdinit=`` naming nothing and ``root=`` naming no
  device ("VFS: Unable to mount root fs");
- no U disk: the U image's label changed, so ``/init`` finds no ``LABEL=U``;
- init exits: ``init=/bin/false`` ("Attempted to kill init!").

The console analysis itself is also tested on fixed texts (no guest needed), including the
panic Debian 12's packaged UML kernel shows on CPUs with AMX.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UNIONIMG, Cli, need_programs
from tests.test_boot_real import cleanup_guest, guest_store
from unionimg import hypervisors
from unionimg.hypervisors import Running, kvm
from unionimg.layers import running
from unionimg.layers.running import analyse, quote, read_console, stop_reason
from unionimg.store.layout import Store
from unionimg.store.records import DamagedRecord

HYPERVISORS = tuple(n for n in hypervisors.names() if hypervisors.get(n).capabilities.can_start)
#: generous: QEMU TCG on a loaded 2-core machine takes 5-30 s to reach the union root
WAIT = "300"


# -- the console analysis, on fixed texts --------------------------------------------------------
READY = "unionimg-init: switching root to the union of /dev/vda and /dev/vdb, starting /sbin/init"


def verdict_of(text: str) -> tuple[bool, str | None]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    v = analyse(lines, lines)
    return v.ready, v.failure


def test_clean_console_is_ready_and_not_failed() -> None:
    ready, failure = verdict_of(f"[    0.1] Linux version 6.1\n{READY}\nunionimg-guest: boot 1\n")
    assert ready and failure is None


def test_panic_in_a_base_init_names_its_exit_status() -> None:
    text = (
        f"{READY}\n"
        "[    2.301] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
        "[    2.302] CPU: 0 PID: 1 Comm: false Not tainted 6.1.0-57-amd64 #1\n"
        "[    2.303] Call Trace:\n"
    )
    ready, failure = verdict_of(text)
    assert ready
    assert failure == (
        "kernel panic: Attempted to kill init! exitcode=0x00000100 "
        "(the base's init (PID 1) exited with status 1)"
    )


def test_switch_root_failure_is_the_cause() -> None:
    text = (
        f"{READY}\n"
        "switch_root: can't execute '/sbin/init': Exec format error\n"
        "[    2.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
    )
    _, failure = verdict_of(text)
    assert failure is not None
    assert "(switch_root (PID 1) exited with status 1)" in failure
    assert failure.endswith("after 'switch_root: can't execute '/sbin/init': Exec format error'")


def test_packaged_uml_panic_on_amx_cpus() -> None:
    """The text Debian 12's linux.uml 6.1 prints on a CPU with AMX (issue 10)."""
    text = (
        "Run /init as init process\n"
        "userspace - ptrace set fp regs failed, errno = 14\n"
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n"
        "CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-57-amd64 #1\n"
    )
    ready, failure = verdict_of(text)
    assert not ready
    assert failure == (
        "kernel panic: Attempted to kill init! exitcode=0x0000000b (the initramfs's /init "
        "(PID 1) was killed by SIGSEGV) after 'userspace - ptrace set fp regs failed, errno = 14'"
    )


def test_initramfs_error_wins() -> None:
    text = (
        "unionimg-init: starting (kernel 6.1.0)\n"
        "unionimg-init: error: no disk with LABEL=U after 2 s (block devices: vda ); attach it\n"
        "unionimg-init: powering off (boot with unionimg.debug for a shell instead)\n"
        "reboot: Power down\n"
    )
    ready, failure = verdict_of(text)
    assert not ready
    assert failure == (
        "the initramfs failed: no disk with LABEL=U after 2 s (block devices: vda ); attach it"
    )


def test_guest_text_is_escaped_and_cut() -> None:
    evil = "Kernel panic - not syncing: \x1b]0;owned\x07\x1b[2J" + "x" * 1000 + "\u202e"
    _, failure = verdict_of(evil)
    assert failure is not None
    assert "\x1b" not in failure and "\x07" not in failure
    assert "\\e]0;owned\\x07\\e[2J" in failure
    assert len(failure) < 300
    assert quote("a\\b\u202ec") == "a\\\\b\\u202ec"


def test_silent_stop_before_the_union_root_is_a_failure() -> None:
    lines = ["Linux version 6.1", "Run /init as init process"]
    v = analyse(lines, lines)
    reason = stop_reason(v, hypervisor_says=None, stop_requested=False)
    assert reason is not None and "before its init started on the union root" in reason
    assert "'Run /init as init process'" in reason
    # stopped by the admin: not a crash; a clean guest that powered off: not a crash
    assert stop_reason(v, hypervisor_says=None, stop_requested=True) is None
    ready = analyse([READY], [READY])
    assert stop_reason(ready, hypervisor_says=None, stop_requested=False) is None
    said = stop_reason(
        ready, hypervisor_says="linux.uml was killed by SIGABRT", stop_requested=False
    )
    assert said is not None and said.startswith("linux.uml was killed by SIGABRT")


def test_a_uml_fault_after_the_guest_halted_is_a_clean_stop() -> None:
    """Debian's UML 6.1 is now and then killed by SIGABRT in its own exit path, after the
    guest's kernel printed its halt line: the guest had finished, so that is no crash. The
    same signal before the halt line, or a halt without the union root, still is."""
    sigabrt = "linux.uml was killed by SIGABRT"
    halted = [READY, "unionimg-guest: hello", "reboot: System halted"]
    v = analyse(halted, halted)
    assert v.ready and v.halted and v.failure is None
    assert stop_reason(v, hypervisor_says=sigabrt, stop_requested=False) is None
    powered = analyse([READY], [READY, "reboot: Power down"])
    assert powered.halted
    assert stop_reason(powered, hypervisor_says=sigabrt, stop_requested=False) is None
    # the halt line not last: something ran after it, so the signal counts
    after = analyse([READY], [READY, "reboot: System halted", "userspace - child died"])
    assert not after.halted
    said = stop_reason(after, hypervisor_says=sigabrt, stop_requested=False)
    assert said is not None and said.startswith(sigabrt)
    # halted before the union root: the boot failed, whatever UML did after
    early = analyse(["Run /init as init process"], ["reboot: System halted"])
    said = stop_reason(early, hypervisor_says=sigabrt, stop_requested=False)
    assert said is not None and said.startswith(sigabrt)
    # a panic is a panic, halt line or not
    panicked = analyse([READY], [READY, "Kernel panic - not syncing: x", "reboot: System halted"])
    assert stop_reason(panicked, hypervisor_says=sigabrt, stop_requested=False) == (
        "kernel panic: x"
    )


def test_console_reading_is_bounded(tmp_path: Path) -> None:
    """A guest that floods its console: the head holds the readiness line, the tail the
    panic; the middle is never read."""
    log = tmp_path / "console.log"
    with log.open("w") as fh:
        fh.write(READY + "\n")
        for i in range(200_000):
            fh.write(f"noise line {i} with some words to make it long enough\n")
        fh.write("Kernel panic - not syncing: sysrq triggered crash\n")
    assert log.stat().st_size > 10 << 20
    head, tail = read_console(log)
    assert sum(len(x) for x in head + tail) < 5 << 20
    v = analyse(head, tail)
    assert v.ready and v.failure == "kernel panic: sysrq triggered crash"


# -- the running record, without a guest ---------------------------------------------------------
def test_a_guest_found_gone_is_recorded_and_forgotten(tmp_path: Path) -> None:
    """running_on asks the record's driver; a guest it finds gone that never reached the
    union root has its crash recorded (with the driver's evidence) and its record removed."""
    store = Store(tmp_path / "store")
    store.instance_dir("vm1").mkdir(parents=True)
    console = tmp_path / "console.log"
    console.write_text("Linux version 6.1\nRun /init as init process\n")
    gone = Running(
        hypervisor="uml",
        started="2026-12-01T10:00:00Z",
        console=str(console),
        pid=2**22 + 17,  # above any pid_max: no process has it
        umid="uitest-gone",
        tap="uitestgone0",  # no such tap: releasing it is quiet
    )
    running.write_running(store, "vm1", gone)
    assert running.read_running(store, "vm1") == gone
    assert running.running_on(store, "vm1") is None
    assert running.read_running(store, "vm1") is None
    assert not running.running_path(store, "vm1").exists()
    crash = running.last_crash(store, "vm1")
    assert crash is not None and crash.hypervisor == "uml" and not crash.ready
    assert "stopped before its init started on the union root" in crash.reason
    assert "last console line: 'Run /init as init process'" in crash.reason
    # asked to stop: gone is not a crash
    running.clear_crash(store, "vm1")
    running.write_running(store, "vm1", dataclasses.replace(gone, stopping=True))
    assert running.running_on(store, "vm1") is None
    assert running.last_crash(store, "vm1") is None


def test_records_the_previous_version_wrote_still_load(tmp_path: Path) -> None:
    """running.json as written before the Running record (write_json, keys sorted; UML's
    umid could be null): read as the same guest, written back byte for byte."""
    store = Store(tmp_path / "store")
    store.instance_dir("vm1").mkdir(parents=True)
    old_kvm = {
        "console": "/s/run/vm1/guest/console.log",
        "domain": "vm1",
        "domain_type": "qemu",
        "hypervisor": "kvm",
        "started": "2026-12-01T10:00:00Z",
        "stopping": True,
    }
    old_uml = {
        "console": "/s/run/vm1/guest/console.log",
        "hypervisor": "uml",
        "pid": 4242,
        "started": "2026-12-01T10:00:00Z",
        "tap": "ui0123abcd",
        "umid": "ui0123abcd",
    }
    path = running.running_path(store, "vm1")
    for old in (old_kvm, old_uml):
        text = json.dumps(old, indent=2, sort_keys=True) + "\n"
        path.write_text(text)
        rec = running.read_running(store, "vm1")
        assert rec is not None and rec.to_json() == old
        running.write_running(store, "vm1", rec)
        assert path.read_text() == text
    path.write_text(json.dumps({**old_uml, "umid": None}))
    rec = running.read_running(store, "vm1")
    assert rec is not None and rec.umid is None and rec.pid == 4242


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "Expecting property name"),
        ('{"hypervisor": "uml", "started": "x", "console": "c", "pid": "12"}', "'pid'"),
        ('{"hypervisor": "uml", "console": "c"}', "'started'"),
        ("[1, 2]", "not a JSON object"),
        ('{"hypervisor": "vmware\\n", "started": "x", "console": "c"}', "'vmware\\n'"),
    ],
)
def test_a_damaged_running_record_is_one_line(tmp_path: Path, text: str, why: str) -> None:
    store = Store(tmp_path / "store")
    store.instance_dir("vm1").mkdir(parents=True)
    running.running_path(store, "vm1").write_text(text)
    with pytest.raises(DamagedRecord) as info:
        running.running_on(store, "vm1")
    message = info.value.message
    assert "\n" not in message and why in message, message
    assert str(running.running_path(store, "vm1")) in message and "remove that file" in message
    assert info.value.exit_code == 70


# -- real guests ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truth(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    need_programs("e2label")
    yield from guest_store(tmp_path_factory, "truth")


def allow_core_dumps() -> None:
    """In a child before exec: core dumps as large as the hard limit allows."""
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def show(cli: Cli, vm: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(cli.ok("instance", "show", vm, "--json").output)
    return data


def crash_file(cli: Cli, vm: str) -> Path:
    return cli.store / "instances" / vm / "crashed.json"


def add_hook(cli: Cli, vm: str, tmp: Path, script: str | None) -> None:
    """Put (or with None remove) a boot hook in the VM's own layer."""
    mnt = tmp / f"hook-{vm}-{time.monotonic_ns()}"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/50-test"
        if script is None:
            hook.unlink()
        else:
            hook.write_text(f"#!/bin/sh\n{script}\n")
            hook.chmod(0o755)
    finally:
        cli.ok("umount", str(mnt))


def new_vm(cli: Cli, vm: str, hv: str) -> None:
    cli.ok("instance", "create", vm, "--base", "tiny", "--hypervisor", hv, "--memory", "256")


def fails_with(cli: Cli, *args: str) -> str:
    """The command exits 9 with exactly one 'unionimg: error:' line (warnings such as the
    libvirt domain type may precede it) and no traceback; that line."""
    started = time.monotonic()
    res = cli(*args)
    print(f"{' '.join(args[:2])}: exit {res.exit_code} after {time.monotonic() - started:.1f} s")
    assert res.exit_code == 9, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("unionimg: error: ")]
    assert len(errors) == 1, res.output
    assert not res.stdout.strip(), res.output
    return errors[0]


def assert_crashed(cli: Cli, vm: str, reason: str) -> dict[str, object]:
    data = show(cli, vm)
    assert data["state"] == "crashed", data
    assert reason in str(data["crash_reason"]), data
    human = cli.ok("instance", "show", vm).output
    assert "state: crashed" in human and reason in human
    listed = cli.ok("instance", "list").output
    assert any(ln.startswith(f"{vm}\t") and ln.endswith("\tcrashed") for ln in listed.splitlines())
    return data


@pytest.mark.parametrize("hv", HYPERVISORS)
def test_kernel_panic_in_the_running_guest(truth: Cli, tmp_path: Path, hv: str) -> None:
    cli = truth
    vm = f"panic-{hv}"
    new_vm(cli, vm, hv)
    try:
        add_hook(cli, vm, tmp_path, "echo c > /proc/sysrq-trigger")
        line = fails_with(cli, "boot", vm, "--wait", "--timeout", WAIT)
        assert f"instance '{vm}' crashed: kernel panic: sysrq triggered crash" in line, line
        assert f"see 'unionimg console {vm}'" in line
        assert_crashed(cli, vm, "kernel panic: sysrq triggered crash")
        record = json.loads(crash_file(cli, vm).read_text())
        assert record["ready"] is True and record["hypervisor"] == hv
        if hv == "kvm":
            # the guest reported its panic through pvpanic; libvirt applies on_crash=destroy:
            # asked before the destroy it says crashed/panicked, after it shutoff/crashed
            assert record["evidence"] in (
                "libvirt reports the domain shutoff, reason crashed",
                "libvirt reports the domain crashed, reason panicked",
            )
        # the console says it too, on stderr after the log
        res = cli.ok("console", vm)
        assert "sysrq triggered crash" in res.stdout
        assert f"unionimg: {vm} crashed: kernel panic: sysrq triggered crash" in res.stderr
        # stop tells a crashed guest from a stopped one
        stop = cli.fails("stop", vm, code=9)
        assert "is not running: it crashed (kernel panic: sysrq triggered crash)" in stop.output
        # the next boot clears the record; a clean boot is a success and a stopped state
        add_hook(cli, vm, tmp_path, None)
        out = json.loads(cli.ok("boot", vm, "--wait", "--timeout", WAIT, "--json").output)
        assert out["stopped"] is True and out["state"] == "stopped"
        assert 0 < out["ready_s"] <= out["elapsed_s"]
        data = show(cli, vm)
        assert data["state"] == "stopped" and data["crash_reason"] is None
        assert not crash_file(cli, vm).exists()
        assert "crashed" not in cli.ok("console", vm).stderr
    finally:
        cleanup_guest(cli, vm)


@pytest.mark.parametrize("hv", HYPERVISORS)
def test_kernel_panic_before_the_initramfs(truth: Cli, hv: str) -> None:
    """No pvpanic driver yet: under kvm panic=-1 resets the guest and on_reboot=destroy ends
    it; the console says why."""
    cli = truth
    vm = f"early-{hv}"
    new_vm(cli, vm, hv)
    try:
        args = ("--append", "rdinit=/nonexistent root=/dev/nonexistent")
        line = fails_with(cli, "boot", vm, "--wait", "--timeout", WAIT, *args)
        assert f"instance '{vm}' failed to boot: kernel panic: VFS: Unable to mount root fs" in line
        assert_crashed(cli, vm, "kernel panic: VFS: Unable to mount root fs")
    finally:
        cleanup_guest(cli, vm)


@pytest.mark.parametrize("hv", HYPERVISORS)
def test_missing_u_disk(truth: Cli, hv: str) -> None:
    """The U image's label is wrong: /init finds no LABEL=U and powers off. Reported by a
    boot without --wait too."""
    cli = truth
    vm = f"nou-{hv}"
    new_vm(cli, vm, hv)
    image = cli.store / "instances" / vm / "upper.img"
    subprocess.run(["e2label", str(image), "NOTU"], check=True)
    try:
        line = fails_with(cli, "boot", vm, "--append", "unionimg.timeout=2")
        assert (
            f"instance '{vm}' failed to boot: the initramfs failed: no disk with LABEL=U "
            "after 2 s" in line
        ), line
        data = assert_crashed(cli, vm, "no disk with LABEL=U")
        assert "LABEL=BASE" not in str(data["crash_reason"])
        subprocess.run(["e2label", str(image), "U"], check=True)
        cli.ok("boot", vm, "--wait", "--timeout", WAIT)
        assert show(cli, vm)["state"] == "stopped"
    finally:
        subprocess.run(["e2label", str(image), "U"], check=False)
        cleanup_guest(cli, vm)


def test_failed_guest_that_hangs_is_pulled(truth: Cli) -> None:
    """unionimg.debug: after its error the initramfs waits in a shell on the serial console
    (a file under kvm: no input ever comes), so the guest never stops by itself. boot pulls
    it after FAIL_GRACE and reports the failure."""
    cli = truth
    vm = "hang-kvm"
    new_vm(cli, vm, "kvm")
    image = cli.store / "instances" / vm / "upper.img"
    subprocess.run(["e2label", str(image), "NOTU"], check=True)
    try:
        line = fails_with(cli, "boot", vm, "--append", "unionimg.timeout=1 unionimg.debug")
        assert "the initramfs failed: no disk with LABEL=U after 1 s" in line, line
        assert "(it did not stop by itself: pulled)" in line, line
        assert "unionimg.debug: starting a shell" in cli.ok("console", vm).stdout
        assert_crashed(cli, vm, "no disk with LABEL=U")
        assert not kvm.qemu_running(vm)
    finally:
        subprocess.run(["e2label", str(image), "U"], check=False)
        cleanup_guest(cli, vm)


@pytest.mark.parametrize("hv", HYPERVISORS)
def test_init_exits(truth: Cli, hv: str) -> None:
    cli = truth
    vm = f"exit-{hv}"
    new_vm(cli, vm, hv)
    try:
        line = fails_with(
            cli, "boot", vm, "--wait", "--timeout", WAIT, "--append", "init=/bin/false"
        )
        assert (
            "kernel panic: Attempted to kill init! exitcode=0x00000100 "
            "(the base's init (PID 1) exited with status 1)" in line
        ), line
        assert_crashed(cli, vm, "Attempted to kill init!")
    finally:
        cleanup_guest(cli, vm)


@pytest.mark.parametrize("hv", HYPERVISORS)
def test_later_crash_is_told_by_show_console_and_stop(truth: Cli, tmp_path: Path, hv: str) -> None:
    """boot without --wait returns once the init runs; the guest panics a little later. The
    boot ran in another process (the usual case), so the commands that look later see only
    the console and the hypervisor."""
    cli = truth
    vm = f"later-{hv}"
    new_vm(cli, vm, hv)
    try:
        add_hook(cli, vm, tmp_path, "sleep 4; echo c > /proc/sysrq-trigger")
        res = subprocess.run(
            [str(UNIONIMG), "--store", str(cli.store), "boot", vm, "--json"],
            capture_output=True,
            text=True,
            timeout=float(WAIT),
            check=False,
            preexec_fn=allow_core_dumps,  # the guest must not inherit this
        )
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["state"] == "running" and out["ready_s"] > 0
        if hv == "uml":
            # a panicking UML kernel abort()s: its memory is never dumped into the store
            running = json.loads((cli.store / "instances" / vm / "running.json").read_text())
            limits = Path(f"/proc/{running['pid']}/limits").read_text()
            assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
        deadline = time.monotonic() + float(WAIT)
        while show(cli, vm)["state"] == "running":
            assert time.monotonic() < deadline, cli.ok("console", vm).output[-3000:]
            time.sleep(0.5)
        assert_crashed(cli, vm, "kernel panic: sysrq triggered crash")
        assert "crashed: kernel panic" in cli.ok("console", vm).stderr
        assert "it crashed" in cli.fails("stop", vm, code=9).output
        assert not list((cli.store / "run" / vm).rglob("core*"))
    finally:
        cleanup_guest(cli, vm)


def test_stop_pulls_the_plug_after_its_timeout(truth: Cli, tmp_path: Path) -> None:
    """The tiny guest has no ACPI handler: 'stop' waits --timeout, then destroys it, says so,
    and the VM is stopped (not crashed)."""
    cli = truth
    vm = "deaf-kvm"
    new_vm(cli, vm, "kvm")
    try:
        add_hook(cli, vm, tmp_path, "sleep 600")
        cli.ok("boot", vm)
        # seen from /proc too (what running_on asks while libvirtd is down)
        assert kvm.qemu_running(vm) and not kvm.qemu_running("no-such-vm")
        started = time.monotonic()
        res = cli.ok("stop", vm, "--timeout", "6")
        took = time.monotonic() - started
        print(f"stop with a 6 s timeout: {took:.1f} s")
        assert 6 <= took < 30
        assert f"stopped {vm} (kvm, no clean shutdown within 6 s: pulled the plug)" in res.stdout
        assert "waiting up to 6 s" in res.stderr and "--force" in res.stderr
        data = show(cli, vm)
        assert data["state"] == "stopped" and data["crash_reason"] is None
        assert not kvm.qemu_running(vm)
    finally:
        cleanup_guest(cli, vm)


def test_timeout_needs_wait(truth: Cli) -> None:
    cli = truth
    vm = "usage"
    new_vm(cli, vm, "kvm")
    try:
        res = cli.fails("boot", vm, "--timeout", "5", code=2)
        assert "--timeout needs --wait" in res.output
        res = cli.fails("switch", vm, "--to", "uml", "--boot", "--timeout", "5", code=2)
        assert "--timeout needs --wait" in res.output
        res = cli.fails("switch", vm, "--to", "uml", "--wait", code=2)
        assert "--wait needs --boot" in res.output
        res = cli.fails("boot", vm, "--wait", "--timeout", "0", code=2)
        assert "give a number of seconds > 0" in res.output
        # nothing was started or changed
        assert not (cli.store / "run" / vm / "guest" / "console.log").exists()
        data = show(cli, vm)
        assert data["state"] == "stopped" and data["hypervisor"] == "kvm"
    finally:
        cleanup_guest(cli, vm)
