"""Hypervisor switch benchmark: KVM -> UML with ``unionimg switch --boot --wait`` against the
conventional path, measured in the same run on the same VM.

OURS: ``unionimg switch VM --to uml --boot --wait`` (the VM ran under KVM/libvirt first, so
the switch includes undefining it). Tool overhead = the switch's time minus the time the
guest itself ran (start of linux.uml until it powered off), i.e. render + initramfs +
undefine + start. Disk: the BASE and U images are the same inodes, same sizes, and no new
image file appears.

CONVENTIONAL: the VM's disk as one standalone image, as it would be under KVM (the union
flattened with ``mke2fs -d`` and converted to qcow2 — setup, not timed); the switch then
converts it for the new hypervisor with ``qemu-img convert -O raw`` and boots that under UML
(``root=/dev/ubda``). Bytes copied = the converted image's allocation.

Goals: overhead < 1 s, whole switch < 10 s, 0 bytes of disk copied.
Run as root: ``.venv/bin/python bench/switch.py [--fixture tiny|debian] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
sys.path.insert(0, str(REPO))
MiB = 1 << 20

from unionimg.boot.control import uml_kernel  # noqa: E402  (after the sys.path line)
from unionimg.layers.running import console_verdict  # noqa: E402

# the debian fixture's guest reports its NICs and powers off only when asked to (tiny always)
SELFTEST = "unionimg.selftest=1"


def ui(store: Path, *args: str) -> str:
    """Run the CLI; a failure (a guest that panicked or crashed exits 9 with its cause) ends
    the benchmark with that command's error line and status: nothing is measured from a
    boot that did not reach the VM's init."""
    res = subprocess.run(
        [str(UNIONIMG), "--store", str(store), *args], check=False, capture_output=True, text=True
    )
    if res.returncode != 0:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("unionimg: error:")]
        print(
            f"bench/switch.py: 'unionimg {' '.join(args)}' exited {res.returncode}: "
            f"{errors[-1] if errors else res.stderr.strip()}",
            file=sys.stderr,
        )
        raise SystemExit(res.returncode)
    return res.stdout


def wait_not_running(store: Path, vm: str, timeout: float) -> str:
    """The VM's state once it no longer runs (stopped, or crashed with a reason)."""
    deadline = time.monotonic() + timeout
    while True:
        state = str(json.loads(ui(store, "instance", "show", vm, "--json"))["state"])
        if state != "running":
            return state
        if time.monotonic() >= deadline:
            raise SystemExit(f"bench/switch.py: {vm} still runs after {timeout:.0f} s")
        time.sleep(0.2)


def images(store: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in list(store.glob("bases/*/generations/*/base.img")) + list(
        store.glob("instances/*/upper.img")
    ):
        st = p.stat()
        out[str(p)] = (st.st_ino, st.st_size)
    return out


def image_files(store: Path) -> set[str]:
    return {str(p) for p in store.rglob("*.img") if "guest" not in p.parts}


def ours(store: Path, vm: str) -> dict[str, float]:
    before, files_before = images(store), image_files(store)
    t0 = time.perf_counter()
    out = json.loads(
        ui(store, "switch", vm, "--to", "uml", "--boot", "--wait", "--json", "--append", SELFTEST)
    )
    whole = time.perf_counter() - t0
    guest = out["boot"]["elapsed_s"] - out["boot"]["overhead_s"]
    after = images(store)
    new_images = image_files(store) - files_before
    copied = sum(Path(p).stat().st_blocks * 512 for p in new_images)
    assert before == after, "an image was replaced or resized"
    ui(store, "switch", vm, "--to", "kvm")  # back, for the next round (not timed)
    return {"whole": whole, "overhead": whole - guest, "guest": guest, "copied": copied}


def conventional(store: Path, vm: str, work: Path) -> dict[str, float]:
    mnt = work / "union"
    mnt.mkdir(exist_ok=True)
    ui(store, "mount", vm, str(mnt), "--readonly")
    try:
        flat = work / "flat.raw"
        base_size = max(Path(p).stat().st_size for p in images(store) if "base.img" in p)
        with open(flat, "wb") as fh:
            fh.truncate(base_size + 64 * MiB)
        subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", "-d", str(mnt), str(flat)], check=True)
    finally:
        ui(store, "umount", str(mnt))
    kvm_disk = work / "vm.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(flat), str(kvm_disk)], check=True)
    flat.unlink()
    target = work / "vm-uml.img"
    tap = "uibench0"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=False)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    mac = json.loads(ui(store, "instance", "show", vm, "--json"))["mac"]
    uml = uml_kernel()  # the UML kernel unionimg uses on this host, with its NIC transport
    if uml.transport == "tuntap":
        nic = f"eth0=tuntap,{tap},{mac}"
    else:
        nic = f"vec0:transport=tap,ifname={tap},mac={mac}"
    try:
        t0 = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(kvm_disk), str(target)], check=True)
        t_convert = time.perf_counter() - t0
        uml_dir = work / "uml"
        uml_dir.mkdir(exist_ok=True)
        log = work / "console.log"
        with open(log, "wb") as out:
            done = subprocess.run(
                [
                    str(uml.path),
                    "mem=256M",
                    f"ubd0={target}",
                    "root=/dev/ubda",
                    "rw",
                    "init=/sbin/init",
                    SELFTEST,
                    nic,
                    "con=null",
                    "con0=null,fd:1",
                    f"uml_dir={uml_dir}",
                    "umid=bench",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
                timeout=300,
                env=dict(os.environ, HOME=str(uml_dir)),
            )
        whole = time.perf_counter() - t0
        # the same truth as unionimg's boots: a panic or a crash is no measurement
        failure = console_verdict(log).failure
        if failure is not None or done.returncode != 0:
            raise SystemExit(
                f"bench/switch.py: the conventional UML boot failed (status {done.returncode}): "
                f"{failure or 'see ' + str(log)}"
            )
        if f"mac {mac}" not in log.read_text(errors="replace"):
            raise SystemExit(f"bench/switch.py: the conventional guest did not come up; see {log}")
        copied = target.stat().st_blocks * 512
    finally:
        subprocess.run(["ip", "link", "del", tap], check=False)
        target.unlink(missing_ok=True)
    return {"whole": whole, "convert": t_convert, "copied": copied}


def main() -> int:
    from vm_fixtures import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="tiny", choices=("tiny", "debian"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/switch.py needs root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="unionimg-switch-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        store = work / "store"
        ui(store, "base", "create", "b", "--from-dir", str(build(args.fixture)))
        ui(store, "instance", "create", "vm", "--base", "b", "--mac", "52:54:00:5e:00:01")
        try:
            first = json.loads(
                ui(
                    store,
                    "boot",
                    "vm",
                    "--hypervisor",
                    "kvm",
                    "--wait",
                    "--timeout",
                    "900",
                    "--json",
                    "--append",
                    SELFTEST,
                )
            )
            print(
                f"warm-up boot under kvm (libvirt domain type {first['domain_type']}): "
                f"{first['elapsed_s']:.1f} s",
                flush=True,
            )
            rounds = []
            for _ in range(args.rounds):
                # returns once the guest's init runs on the union root (exit 9 if it failed)
                ui(store, "boot", "vm", "--hypervisor", "kvm", "--append", SELFTEST)
                # a tiny guest powers itself off; wait for that so both paths start from a
                # stopped VM (a crash after its init started is reported as such)
                state = wait_not_running(store, "vm", 900.0)
                if state != "stopped":
                    show = json.loads(ui(store, "instance", "show", "vm", "--json"))
                    print(
                        f"bench/switch.py: the kvm guest ended {state}: {show['crash_reason']}",
                        file=sys.stderr,
                    )
                    return 9
                rounds.append(ours(store, "vm"))
            conv = conventional(store, "vm", work)
        finally:
            subprocess.run(
                [str(UNIONIMG), "--store", str(store), "stop", "vm", "--force"],
                capture_output=True,
                check=False,
            )
            subprocess.run(
                [str(UNIONIMG), "--store", str(store), "instance", "remove", "vm"],
                capture_output=True,
                check=False,
            )
    whole = statistics.median(r["whole"] for r in rounds)
    overhead = statistics.median(r["overhead"] for r in rounds)
    guest = statistics.median(r["guest"] for r in rounds)
    copied = max(r["copied"] for r in rounds)
    print(f"\nKVM -> UML switch of the '{args.fixture}' VM (median of {args.rounds})")
    print(f"{'':28}{'unionimg':>12}{'conventional':>15}")
    print(
        f"{'whole switch (s)':28}{whole:>12.2f}{conv['whole']:>15.2f}"
        f"   ratio {conv['whole'] / whole:.1f}x"
    )
    print(
        f"{'tool overhead (s)':28}{overhead:>12.2f}{conv['convert']:>15.2f}"
        "   (conventional: the qemu-img convert alone)"
    )
    print(f"{'guest run (s)':28}{guest:>12.2f}")
    print(f"{'disk bytes copied':28}{copied:>12d}{int(conv['copied']):>15d}")
    ok = overhead < 1.0 and whole < 10.0 and copied == 0
    print("goals (overhead < 1 s, switch < 10 s, 0 bytes copied):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
