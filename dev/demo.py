"""``make demo``: the whole story on an embedded store (``<repo>/demo-store``, remade each run).

A busybox base (the ``tiny`` fixture), two VMs with local changes made through their mounted
unions, a base patch, ``reconcile --all`` with one real conflict, and its resolution; a
hostile guest whose planted Mercurial hook never runs and whose planted symlink is refused;
then (when the machine can run guests) a boot under QEMU through libvirt and a switch to UML;
then the fleet: a snapshot layer, a system node, an OCI registry and a deploy to a namespace
host over SSH, and a redeploy that sends only the changed layer; last, a real Debian base:
users added on both sides (one UID clash), reconcile's checks, per-VM machine-ids, and the
clash resolved by renumbering.
Every step is the real CLI, printed as it runs.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from unionimg.runner import run

REPO = Path(__file__).resolve().parent.parent
STORE = Path(os.environ.get("UNIONIMG_DEMO_STORE", REPO / "demo-store"))
STORE_DIR = STORE / "store"  # unionimg's store; the unions are mounted beside it, never in it
UNIONIMG = str(Path(sys.executable).parent / "unionimg")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def cli(
    *args: str,
    ok: tuple[int, ...] = (0,),
    quiet: bool = False,
    on_failure: Callable[[], None] | None = None,
) -> str:
    """Run the real CLI, printing the command and its output (``quiet``: neither); a
    status not in ``ok`` ends the demo with that status after ``on_failure``."""
    if not quiet:
        print(f"$ unionimg {' '.join(args)}", flush=True)
    res = run([UNIONIMG, "--store", str(STORE_DIR), *args], check=False)
    out = (res.stdout + res.stderr).rstrip()
    if out and (not quiet or res.returncode not in ok):
        print(out, flush=True)
    if res.returncode not in ok:
        if on_failure is not None:
            on_failure()
        print(f"demo: 'unionimg {' '.join(args)}' exited {res.returncode}", file=sys.stderr)
        raise SystemExit(res.returncode or 1)
    return res.stdout


def edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text + "\n"
    path.write_text("".join(lines))


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (loop devices and overlay mounts)", file=sys.stderr)
        return 2
    from vm_fixtures import build

    for leftover in ("web1", "web2", "app1", "app2", "d1", "d2"):
        run(["umount", "-R", str(STORE / "mnt" / leftover)], check=False)
    if STORE.exists():
        from unionimg.fs.mounts import unmount_tree

        unmount_tree(STORE)
        shutil.rmtree(STORE)
    STORE.mkdir(parents=True)
    work = STORE / "work"
    work.mkdir()

    say("a busybox root file system (vm_fixtures 'tiny')")
    rootfs = build("tiny")
    print(rootfs)

    say("one read-only BASE image, one small U image per VM")
    cli("base", "create", "tiny", "--from-dir", str(rootfs))
    cli("instance", "create", "web1", "--base", "tiny")
    cli("instance", "create", "web2", "--base", "tiny", "--mac", "52:54:00:00:00:02")
    cli("instance", "list")

    say("each VM changes its own files (through its mounted union)")
    for vm, line in (("web1", 3), ("web2", 15)):
        mnt = STORE / "mnt" / vm
        mnt.mkdir(parents=True)
        cli("mount", vm, str(mnt))
        edit_line(mnt / "etc/tiny/services.conf", line, f"# {vm} tuned line {line}")
        (mnt / "etc/hostname").write_text(f"{vm}\n")
        cli("status", vm)
        cli("umount", str(mnt))
        cli("commit", vm, "-m", f"{vm}: hostname and services")

    say("the admin patches the base once: generation 2")
    patch = work / "patch" / "etc" / "tiny"
    patch.mkdir(parents=True)
    conf = patch / "services.conf"
    shutil.copyfile(rootfs / "etc/tiny/services.conf", conf)
    edit_line(conf, 15, "# security fix: line 15 patched by the base")
    edit_line(conf, 20, "# security fix: line 20 patched by the base")
    (work / "patch" / "etc" / "motd").write_text("patched base: generation 2\n")
    cli("base", "update", "tiny", "--apply-dir", str(work / "patch"))
    cli("base", "diff", "tiny")
    cli("base", "log", "tiny")

    say("reconcile every VM: clean merges applied, real conflicts reported")
    cli("reconcile", "--all", "--dry-run", ok=(0, 1))
    cli("reconcile", "--all", ok=(0, 1))
    cli("conflicts", "web2")
    cli("instance", "list")  # web2's pending conflict is counted until it is resolved

    say("the admin settles web2's conflict: keep the VM's line")
    cli("resolve", "web2", "/etc/tiny/services.conf", "--take", "local")
    cli("reconcile", "--all")
    cli("log", "web2")
    mnt = STORE / "mnt" / "web1"
    cli("mount", "web1", str(mnt), "--readonly")
    print("$ sed -n '1,4p;15p;20p' .../web1/etc/tiny/services.conf")
    lines = (mnt / "etc/tiny/services.conf").read_text().splitlines()
    print("\n".join([*lines[:4], lines[14], lines[19]]))
    cli("umount", str(mnt))

    _hostile_guest_demo()
    _boot_demo()
    _fleet_demo(rootfs)
    _debian_demo()
    # the sections of issues 13 (its last gaps) to 16, each in its own module (they import
    # this one: loaded here, once it is fully defined)
    for section in ("demo_deploy_chain", "demo_migrate", "demo_placement", "demo_snapshots"):
        importlib.import_module(f"dev.{section}").run(rootfs)
    say("done: the store is at " + str(STORE_DIR))
    return 0


def _as_guest(vm: str, change: Callable[[Path], None]) -> None:
    """Write into the VM's U image as its own kernel could (loop-mounted here: the demo
    plays the guest)."""
    u = STORE / "guest" / vm
    u.mkdir(parents=True, exist_ok=True)
    image = STORE_DIR / "instances" / vm / "upper.img"
    run(["mount", "-o", "loop,nosuid,nodev,noexec", str(image), str(u)])
    try:
        change(u)
    finally:
        run(["umount", str(u)])


def _hostile_guest_demo() -> None:
    """The guest is untrusted: what it writes into its U image never makes the host run code
    or follow a link (docs/security.md)."""
    canary = STORE / "canary"
    canary.mkdir()
    (canary / "host-file").write_text("a host file\n")

    def plant_hook(u: Path) -> None:
        (u / ".hg" / "hgrc").write_text(
            f"[hooks]\nprecommit = touch {canary}/pwned\npre-log = touch {canary}/pwned\n"
        )
        (u / "upper" / "etc" / "guest-note").write_text("written by web2's guest\n")

    say("a hostile guest: web2 plants a Mercurial hook; the host's commit and log run none of it")
    _as_guest("web2", plant_hook)
    cli("commit", "web2", "-m", "after the guest's hook")
    cli("log", "web2", quiet=True)
    if (canary / "pwned").exists():
        print("demo: the guest's hook ran on the host", file=sys.stderr)
        raise SystemExit(1)
    print(f"no hook ran: {canary}/pwned does not exist")

    def plant_link(u: Path) -> None:
        shutil.rmtree(u / "work")
        (u / "work").symlink_to(canary)

    def unplant_link(u: Path) -> None:
        (u / "work").unlink()
        (u / "work").mkdir()

    say("the guest makes U's work/ a symlink to a host directory: refused, nothing followed")
    _as_guest("web2", plant_link)
    mnt = STORE / "mnt" / "web2"
    cli("mount", "web2", str(mnt), ok=(8,))
    if sorted(p.name for p in canary.iterdir()) != ["host-file"]:
        print("demo: the host directory behind the link changed", file=sys.stderr)
        raise SystemExit(1)
    print(f"{canary} untouched: {sorted(p.name for p in canary.iterdir())}")
    _as_guest("web2", unplant_link)
    cli("status", "web2")


def _boot_demo() -> None:
    """Boot one VM under QEMU (libvirt) and switch it to UML; each boot must really reach the
    VM's init on the union root and power off cleanly (exit 9 with the cause otherwise)."""
    say("boot web1 under QEMU through libvirt, then switch it to User-Mode Linux")
    mac = json.loads(cli("instance", "show", "web1", "--json", quiet=True))["mac"]
    for args in (
        ("boot", "web1", "--hypervisor", "kvm", "--wait", "--timeout", "300"),
        ("switch", "web1", "--to", "uml", "--boot", "--wait", "--timeout", "300"),
    ):
        cli(*args, on_failure=lambda: _console_tail("web1"))
        console = cli("console", "web1", quiet=True)
        nics = [ln.strip() for ln in console.splitlines() if "unionimg-guest: nic" in ln]
        for line in nics:
            print(f"  console: {line}")
        state = json.loads(cli("instance", "show", "web1", "--json", quiet=True))["state"]
        if state != "stopped" or f"unionimg-guest: nic eth0 mac {mac}" not in nics:
            _console_tail("web1")
            raise SystemExit(f"demo: web1 did not boot as it should (state {state}, NICs {nics})")
    print(f"the same MAC {mac} under kvm and uml; web1 is stopped, not crashed")
    cli("instance", "show", "web1")


def _fleet_demo(rootfs: Path) -> None:
    """Issue 13: the image tree (snapshot layers), the system tree, an OCI registry (Debian's
    docker-registry) and a deploy over SSH to a host: a network namespace on this machine
    with its own sshd and store, pulling only the layers it lacks (bytes on its link).

    Its own base, generation 1 on the host made from the pulled layer (later and delta
    generations: ``dev/demo_deploy_chain.py``)."""
    from unionimg.registry import server as registry_server
    from vm_fixtures.nethosts import Lab

    say("the image tree: web1's upper layer frozen into a layer; web1 goes on with a fresh U")
    cli("instance", "snapshot", "web1", "-m", "web1 tuned")
    cli("layer", "tree")

    say("a system: two VMs of a new base as one node of the system tree")
    cli("base", "create", "site", "--from-dir", str(rootfs))
    for vm in ("app1", "app2"):
        cli("instance", "create", vm, "--base", "site")
    mnt = STORE / "mnt" / "app1"
    mnt.mkdir(parents=True)
    cli("mount", "app1", str(mnt))
    (mnt / "etc" / "app.conf").write_text("app1: tuned for the site\n")
    cli("umount", str(mnt))
    cli("system", "create", "site", "--instance", "app1", "--instance", "app2", "-m", "initial")
    cli("layer", "tree")

    lab = Lab(STORE / "lab")
    server = None
    try:
        say("an OCI registry in a namespace of its own, and host h1 (its own sshd and store)")
        reg = lab.add_namespace("reg")
        server = registry_server.start(STORE / "registry", f"{reg.addr}:5000", prefix=reg.prefix)
        print(f"registry {server.url}")
        host = lab.add_host("h1")
        host.authorize(cli("host", "key", quiet=True).strip())
        cli(
            "host", "add", "h1", "--ssh", f"root@{host.addr}", "--store", str(host.store),
            "--unionimg", UNIONIMG, "--host-key", str(host.host_key_pub),
        )  # fmt: skip

        say("deploy the system: h1 pulls every layer it lacks straight from the registry")
        before = host.counters()["rx_bytes"]
        cli("deploy", "site", "--host", "h1", "--registry", server.url)
        first = host.counters()["rx_bytes"] - before

        say("app2 is changed and the system snapshotted as a child node; redeploy pulls only that")
        mnt = STORE / "mnt" / "app2"
        mnt.mkdir(parents=True)
        cli("mount", "app2", str(mnt))
        (mnt / "etc" / "motd").write_text("site, cleaned after an incident\n")
        cli("umount", str(mnt))
        cli("system", "snapshot", "site", "--as", "site-clean", "-m", "cleaned")
        before = host.counters()["rx_bytes"]
        cli("redeploy", "site-clean", "--host", "h1", "--registry", server.url)
        again = host.counters()["rx_bytes"] - before
        print(f"bytes received by h1: first deploy {first:,}, redeploy {again:,}")
        if not 0 < again < first / 10:
            print("demo: the redeploy did not send only the changed layer", file=sys.stderr)
            raise SystemExit(1)
        cli("host", "cache", "h1")
    finally:
        if server is not None:
            server.stop()
        lab.close()


def _debian_demo() -> None:
    """Issue 12 on a real Debian (the ``debian`` fixture, minbase + systemd + kernel, built
    from the host's Debian mirror and cached): users added with Debian's own ``useradd`` in
    two VMs and in the base, one UID both sides gave to different users; ``reconcile --all``
    merges the user databases by name, checks each staged result with the host's dpkg, apt,
    pwck and grpck before swapping, gives each VM its own machine-id, and keeps the clash
    pending, consistent, until ``resolve`` renumbers the VM's user and chowns its files."""
    from vm_fixtures import build

    say("a real Debian base (vm_fixtures 'debian', cached after its first build)")
    rootfs = build("debian")
    cli("base", "create", "deb", "--from-dir", str(rootfs))
    for vm, uid in (("d1", "1001"), ("d2", "1000")):
        cli("instance", "create", vm, "--base", "deb")
        mnt = STORE / "mnt" / vm
        mnt.mkdir(parents=True)
        cli("mount", vm, str(mnt))
        print(f"$ useradd --root .../{vm} -m -u {uid} -s /bin/bash alice")
        run(["useradd", "--root", str(mnt), "-m", "-u", uid, "-s", "/bin/bash", "alice"])
        cli("umount", str(mnt))

    say("the base adds a system user and a login user (UID 1000, as d2's alice)")
    cli(
        "base", "update", "deb", "--run",
        "useradd --system --no-create-home --shell /usr/sbin/nologin svcd && "
        "useradd -m -u 1000 -s /bin/bash deploy",
    )  # fmt: skip

    say("reconcile: user databases merged by name, each result checked before its swap")
    cli("reconcile", "--all", ok=(1,))  # d2's UID clash stays pending
    cli("instance", "list")
    cli("conflicts", "d2")
    seen = {vm: _debian_users(vm) for vm in ("d1", "d2")}
    if seen["d1"][1] == seen["d2"][1]:
        print("demo: two VMs share a machine-id", file=sys.stderr)
        raise SystemExit(1)

    say("the admin takes the proposal: d2's alice renumbered, her files chowned")
    for path in ("/etc/group", "/etc/passwd", "/etc/subuid", "/etc/subgid"):
        cli("resolve", "d2", path, "--take", "proposal", ok=(0, 3))
    for path in ("/etc/shadow", "/etc/gshadow"):
        cli("resolve", "d2", path, "--take", "merged", ok=(0, 3))
    cli("conflicts", "d2")
    users, _ = _debian_users("d2")
    if "deploy:1000" not in users or "alice:1000" in users:
        print("demo: d2's users after resolve are not the proposal's", file=sys.stderr)
        raise SystemExit(1)


def _debian_users(vm: str) -> tuple[list[str], str]:
    """The demo's users (NAME:UID) and the machine-id in VM's union, printed."""
    mnt = STORE / "mnt" / vm
    cli("mount", vm, str(mnt), "--readonly")
    try:
        users = [
            f"{f[0]}:{f[2]}"
            for f in (ln.split(":") for ln in (mnt / "etc/passwd").read_text().splitlines())
            if f[0] in ("svcd", "deploy", "alice")
        ]
        machine_id = (mnt / "etc/machine-id").read_text().strip()
    finally:
        cli("umount", str(mnt))
    print(f"  {vm}: users {' '.join(users)}; machine-id {machine_id}")
    return users, machine_id


def _console_tail(vm: str, lines: int = 15) -> None:
    res = run([UNIONIMG, "--store", str(STORE_DIR), "console", vm], check=False)
    tail = res.stdout.splitlines()[-lines:]
    print(f"--- last {len(tail)} console lines of {vm} ---", flush=True)
    print("\n".join(tail) + ("\n" + res.stderr.rstrip() if res.stderr.strip() else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
