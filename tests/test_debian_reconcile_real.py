"""Issue 12 end to end on the real Debian fixture: after ``reconcile --all`` every VM is one its
own package manager and user tools call consistent, with the base's update in it and its own
changes kept (or it stays, whole, where it was, with the reason).

The world (built once for the module, ~5 min, see :func:`world`): base generation 1 is the
Debian fixture. Four VMs make real local changes through ``unionimg mount`` (remounted exec by
the TEST: unionimg itself never runs guest programs), as a sysadmin would:

* ``web1``: the guest's own ``apt-get install openssh-server`` (real packages from Debian's
  mirror, in a chroot of its union), ``PermitRootLogin no`` and ``PasswordAuthentication no``
  in ``/etc/ssh/sshd_config``, user alice (``useradd --root``, UID 1001);
* ``db1``: the guest's own ``apt-get install nginx``, ``worker_connections 4096`` in
  ``/etc/nginx/nginx.conf``, user bob (UID 1002);
* ``app1``: local packages from ``tests/debs.py`` with the host's ``dpkg --root`` (``uimg-conf``
  1.0 with a conffile, ``uimg-svc`` whose postinst adds the system user ``uimgsvc``), its
  conffile edited on line 3, user carol (UID 1003);
* ``clash1``: user dave with useradd's first free UID, 1000 — the UID the base gives deploy.

Then the base is patched the usual way, one ``base update --run``: ``uimg-conf`` 2.0 (its
conffile changed on line 10; 1.0's .deb left in its apt cache, as a base that had it keeps
it), ``apt-get install openssh-server nginx`` (real), a system user ``svcd``, a login user
``deploy`` and a ``sed`` on ``sshd_config`` (ClientAliveInterval).

Read back with the HOST's tools on each VM's union mounted read-only (``bench/debvm.py``):
``dpkg --audit``, ``apt-get check``, ``pwck -r``/``grpck -r`` no worse than the base itself,
``dpkg -l`` (the base's AND the VM's packages ``ii``), ``dpkg --verify`` no worse than the
base; ``sshd -t`` of the guest's own sshd in a test-owned chroot (``debvm.guest_chroot``);
host keys and machine-id unique across VMs; then app1 (openssh-server from the base, users of
both sides) boots under QEMU and its console says ``ssh.service`` is active.

Conflicts that stay pending by design, each asserted: clash1's dave keeps UID 1000, deploy is
left out until ``resolve``; every VM's login user and deploy got the same subuid range. Not
pending: app1's system user and the base's svcd got the same system UID (useradd allocates
downward from 999 on both sides): reconcile renumbers the VM's system account itself; app1's
uimg-conf 1.0 (pristine but for its edited conffile) and the base's 2.0: the newer version
is taken whole, the conffile merged. No
assertion is marked xfail: every part of issue 12 it exercises has landed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import debvm
from tests import debs
from tests.conftest import REQUIRE_REAL, Cli, need, need_programs
from tests.test_boot_real import guest_lines, need_guests
from tests.test_identity import SSH_HOOK, sshd_t
from unionimg.fs.mounts import mountinfo, unmount_tree

VMS = ("web1", "db1", "app1", "clash1")
BOOTED = "app1"
APT = "apt-get -q -o Dpkg::Use-Pty=0"
SSHD_CONFIG = "/etc/ssh/sshd_config"
NGINX_CONF = "/etc/nginx/nginx.conf"
UIMG_CONF = debs.CONFFILE
#: each VM's own edits: path -> (line before, line after)
EDITS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "web1": {
        SSHD_CONFIG: [
            ("#PermitRootLogin prohibit-password", "PermitRootLogin no"),
            ("#PasswordAuthentication yes", "PasswordAuthentication no"),
        ]
    },
    "db1": {NGINX_CONF: [("\tworker_connections 768;", "\tworker_connections 4096;")]},
    "app1": {UIMG_CONF: [("option02 = value02", "option02 = local-app1")]},
    "clash1": {},
}
USERS = {"web1": ["-u", "1001", "alice"], "db1": ["-u", "1002", "bob"]}
USERS |= {"app1": ["-u", "1003", "carol"], "clash1": ["dave"]}
BASE_SED = ("#ClientAliveInterval 0", "ClientAliveInterval 300")
BASE_RUN_TAIL = (
    f"{APT} update && {APT} install -y --no-install-recommends openssh-server nginx && "
    "useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin svcd && "
    "useradd -m -s /bin/bash deploy && "
    f"sed -i 's/^{BASE_SED[0]}$/{BASE_SED[1]}/' {SSHD_CONFIG}"
)
#: packages every VM must have ``ii`` after reconcile: the base's, and each VM's own
BASE_PACKAGES = ("openssh-server", "nginx", "uimg-conf", "systemd")
OWN_PACKAGES = {"web1": ["openssh-server"], "db1": ["nginx"], "app1": ["uimg-conf", "uimg-svc"]}
OWN_PACKAGES["clash1"] = []
READ = (SSHD_CONFIG, NGINX_CONF, UIMG_CONF, "/etc/machine-id", "/etc/passwd", "/etc/group")


@dataclass
class Result:
    """One VM after ``reconcile --all``, read back while its union was mounted read-only."""

    generation: int
    report: dict[str, Any]
    checked: debvm.Checked
    files: dict[str, bytes | None]
    sshd: subprocess.CompletedProcess[str] | None = None
    host_key: str = ""  # the ed25519 host key's fingerprint


@dataclass
class World:
    cli: Cli
    tmp: Path
    code: int  # reconcile --all's exit code
    output: str  # its JSON
    results: dict[str, Result]
    before: dict[str, dict[str, bytes | None]]  # the VMs' files before reconcile
    seconds: dict[str, float] = field(default_factory=dict)


def read(root: Path, path: str) -> bytes | None:
    p = root / path.lstrip("/")
    return p.read_bytes() if p.is_file() and not p.is_symlink() else None


def edit(root: Path, path: str, changes: list[tuple[str, str]]) -> None:
    p = root / path.lstrip("/")
    text = p.read_text()
    for old, new in changes:
        assert text.count(f"\n{old}\n") == 1, (path, old)
        text = text.replace(f"\n{old}\n", f"\n{new}\n")
    p.write_text(text)


def shows(cli: Cli, *what: str) -> Any:
    return json.loads(cli.ok(*what, "--json").output)


def no_mirror(output: str) -> bool:
    return "Could not resolve" in output or "Temporary failure resolving" in output


def fingerprint(pub: Path) -> str:
    done = debvm.run(["ssh-keygen", "-l", "-f", str(pub)])
    return done.stdout.split()[1] if done.returncode == 0 else f"none ({done.stderr.strip()})"


def local_changes(cli: Cli, tmp: Path, vm: str, built: dict[str, Path]) -> None:
    """VM's local changes, made through its mounted union (remounted exec for the guest's own
    apt-get and the packages' maintainer scripts)."""
    with debvm.exec_union(cli.ok, vm, tmp / f"mnt-{vm}") as mnt:
        install = {"web1": "openssh-server", "db1": "nginx"}.get(vm)
        if install:  # the guest's own apt, in a chroot of its union
            done = debvm.sandboxed(
                mnt,
                f"{APT} update && {APT} install -y --no-install-recommends {install}",
            )
            if done.returncode != 0 and no_mirror(done.stdout + done.stderr):
                need(False, "no route to the Debian mirror (apt-get update in a VM)")
            assert done.returncode == 0, (vm, done.stdout[-3000:], done.stderr[-3000:])
        if vm == "app1":  # local packages with the host's dpkg --root, kept in its apt cache
            debs.install(mnt, built["conf1"], built["svc"], cache=True)
        for path, changes in EDITS[vm].items():
            edit(mnt, path, changes)
        done = debvm.run(["useradd", "--root", str(mnt), "-m", "-s", "/bin/bash", *USERS[vm]])
        assert done.returncode == 0, (vm, done.stderr)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1" or REQUIRE_REAL,
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    need_programs(
        "useradd", "pwck", "grpck", "dpkg", "dpkg-deb", "dpkg-query", "apt-get", "ssh-keygen",
        "unshare", "setpriv", "chroot",
    )  # fmt: skip
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("debrec")
    cli = Cli(tmp / "store")
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        rootfs = build("debian")
        built = {
            "conf1": debs.build(debs.conf_package(1), tmp / "debs"),
            "conf2": debs.build(debs.conf_package(2), tmp / "debs"),
            "svc": debs.build(debs.user_package(), tmp / "debs"),
        }
        cli.ok("base", "create", "deb", "--from-dir", str(rootfs))
        seconds["base create"] = time.monotonic() - t0
        before: dict[str, dict[str, bytes | None]] = {}
        for vm in VMS:
            t = time.monotonic()
            cli.ok("instance", "create", vm, "--base", "deb", "--size", "1G", "--memory", "768")
            local_changes(cli, tmp, vm, built)
            seconds[f"local changes {vm}"] = time.monotonic() - t
        for vm in VMS:
            mnt = tmp / f"before-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt), "--readonly")
            try:
                before[vm] = {p: read(mnt, p) for p in READ}
            finally:
                cli.ok("umount", str(mnt))
        t = time.monotonic()
        run = debvm.cache_command(built["conf1"])  # the base had 1.0 before: apt kept it
        run += "; " + debs.install_command(built["conf2"], then=BASE_RUN_TAIL)
        res = cli("base", "update", "deb", "--run", run)
        if res.exit_code != 0 and no_mirror(res.output):
            need(False, "no route to the Debian mirror (apt-get update in base update)")
        assert res.exit_code == 0, res.output[-4000:]
        seconds["base update"] = time.monotonic() - t
        t = time.monotonic()
        rec = cli("reconcile", "--all", "--json")
        seconds["reconcile --all"] = time.monotonic() - t
        assert rec.exit_code in (0, 1, 10), rec.output
        reports = {r["name"]: r for r in json.loads(rec.output)["instances"]}
        for r in reports.values():  # what reconcile said, for CI logs (-s or on failure)
            print(f"reconcile {r['name']}: {r['status']}, applied {r['applied']}, "
                  f"error {r['error']}")  # fmt: skip
            for c in r["conflicts"]:
                print(f"  conflict {c['path']}: {c['reason'][:300]}")

        t = time.monotonic()
        baselines = {}
        for number in (1, 2):
            with debvm.generation_root(cli.store, "deb", number, tmp / f"gen{number}") as gen:
                baselines[number] = debvm.Baseline.of(gen)
        results = {}
        for vm in VMS:
            generation = shows(cli, "instance", "show", vm)["generation"]
            mnt = tmp / f"after-{vm}"
            mnt.mkdir()
            cli.ok("mount", vm, str(mnt), "--readonly")
            try:
                checked = debvm.check(mnt, baselines[generation], frozenset(EDITS[vm]))
                files = {p: read(mnt, p) for p in READ}
                key = fingerprint(mnt / "etc/ssh/ssh_host_ed25519_key.pub")
                has_sshd = (mnt / "usr/sbin/sshd").exists()
            finally:
                cli.ok("umount", str(mnt))
            result = Result(generation, reports[vm], checked, files, host_key=key)
            if has_sshd:
                with debvm.guest_chroot(cli.ok, vm, tmp / f"chroot-{vm}") as croot:
                    result.sshd = sshd_t(croot)
            results[vm] = result
        seconds["checks"] = time.monotonic() - t
        yield World(cli, tmp, rec.exit_code, rec.output, results, before, seconds)
    finally:
        for vm in VMS:
            with_state = cli("instance", "show", vm, "--json")
            if with_state.exit_code == 0 and json.loads(with_state.output)["state"] == "running":
                cli("stop", vm, "--force")
        seconds["total"] = time.monotonic() - t0
        print("debian reconcile world:", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]
        for vm in VMS:  # removing an instance undefines its libvirt domain (kvm boots left one)
            if cli("instance", "show", vm, "--json").exit_code == 0:
                cli.ok("instance", "remove", vm)


def conflicts(world: World, vm: str) -> list[str]:
    return [c["path"] for c in world.results[vm].report["conflicts"]]


def why(world: World, vm: str) -> str:
    """What reconcile said of VM: status, error, conflicts with their reasons."""
    r = world.results[vm].report
    lines = [f"{vm}: {r['status']}, generation {world.results[vm].generation}"]
    if r["error"]:
        lines.append(f"error: {r['error']}")
    lines += [f"conflict {c['path']}: {c['reason'][:200]}" for c in r["conflicts"]]
    return "\n".join(lines)


def text(data: bytes | None) -> str:
    assert data is not None
    return data.decode()


# -- the reconcile itself -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("vm", ["web1", "db1", "app1"])
def test_vm_takes_the_base_update(world: World, vm: str) -> None:
    """A VM without a UID clash is on generation 2 with nothing failed."""
    r = world.results[vm]
    assert r.report["error"] is None, r.report["error"]
    assert (r.generation, r.report["to_generation"], r.report["applied"]) == (2, 2, True), why(
        world, vm
    )


@pytest.mark.slow
@pytest.mark.parametrize("vm", VMS)
def test_no_noise_conflicts(world: World, vm: str) -> None:
    """Generated and volatile files (debconf, ld.so.cache, logs, ``-`` backups, apt state)
    are never a conflict."""
    noise = [p for p in conflicts(world, vm) if debvm.is_noise(p)]
    assert not noise, noise


# -- item 1's checks, read back with the host's tools ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("vm", VMS)
def test_dpkg_audit_and_apt_check_are_clean(world: World, vm: str) -> None:
    failures = world.results[vm].checked.failures
    assert "dpkg --audit" not in failures, failures["dpkg --audit"]
    assert "apt-get check" not in failures, failures["apt-get check"]


@pytest.mark.slow
@pytest.mark.parametrize("vm", VMS)
def test_pwck_grpck_no_worse_than_the_base(world: World, vm: str) -> None:
    failures = world.results[vm].checked.failures
    assert "pwck/grpck -r" not in failures, failures["pwck/grpck -r"]


@pytest.mark.slow
@pytest.mark.parametrize("vm", VMS)
def test_dpkg_verify_no_worse_than_the_base(world: World, vm: str) -> None:
    failures = world.results[vm].checked.failures
    assert "dpkg --verify" not in failures, failures["dpkg --verify"]


@pytest.mark.slow
@pytest.mark.parametrize("vm", ["web1", "db1", "app1"])
def test_base_and_own_packages_installed(world: World, vm: str) -> None:
    """``dpkg -l``: the base's packages and the VM's own are ``ii``. A package both sides
    changed (app1's local uimg-conf 1.0, the base's 2.0) is settled as apt would settle it:
    the VM's copy is pristine but for its edited conffile (merged, below), so the base's
    newer version is taken whole, reported per package, and nothing stays pending for it
    (the VM's package is never re-applied: that would run its maintainer scripts on the
    host)."""
    pkgs = world.results[vm].checked.packages
    want = [*BASE_PACKAGES, *OWN_PACKAGES[vm]]
    states = {p: pkgs.get(p, ("absent", ""))[0] for p in want}
    assert all(s == "ii" for s in states.values()), (states, why(world, vm))
    assert pkgs["uimg-conf"][1] == "2.0"  # the base's newer version
    if vm != "app1":
        return
    listed = shows(world.cli, "conflicts", vm)
    assert "/var/lib/dpkg/status" not in {c["path"] for c in listed}, listed
    status = [a for a in world.results[vm].report["actions"] if a["path"] == "/var/lib/dpkg/status"]
    assert len(status) == 1 and status[0]["packages"] == [
        "uimg-conf: base 2.0 supersedes VM's 1.0 (taken)"
    ], status


@pytest.mark.slow
@pytest.mark.parametrize("vm", ["web1", "db1", "app1"])
def test_sshd_config_check_passes(world: World, vm: str) -> None:
    """Debian's ssh.service check (``sshd -t``) passes: the sshd user exists, the host keys
    are the VM's own, the merged sshd_config parses."""
    done = world.results[vm].sshd
    assert done is not None
    assert done.returncode == 0, (done.stderr, why(world, vm))


# -- the VM's own changes kept, with the base's --------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("vm", ["web1", "db1", "app1"])
def test_users_of_both_sides(world: World, vm: str) -> None:
    """Both sides' users. app1's local package's postinst user and the base's svcd got the
    same system UID: reconcile renumbers the VM's system account itself (a free system ID,
    its files chowned in the staged layer), so both are there with distinct IDs and nothing
    is pending for it."""
    passwd = text(world.results[vm].files["/etc/passwd"])
    names = {line.split(":")[0]: line for line in passwd.splitlines()}
    own = USERS[vm][-1]
    assert {own, "deploy", "sshd"} <= set(names), (sorted(names), why(world, vm))
    assert names["deploy"].startswith("deploy:x:1000:1000:")
    assert names[own].startswith(f"{own}:x:{USERS[vm][1]}:")
    if vm != "app1":
        assert "svcd" in names
        return
    assert debs.SYSTEM_USER in names and "svcd" in names, (sorted(names), why(world, vm))
    uids = {n: int(names[n].split(":")[2]) for n in (debs.SYSTEM_USER, "svcd")}
    assert len(set(uids.values())) == 2 and all(100 <= u <= 999 for u in uids.values()), uids
    assert "/etc/passwd" not in conflicts(world, vm), why(world, vm)


@pytest.mark.slow
def test_sshd_config_has_both_edits(world: World) -> None:
    """web1 installed openssh-server itself (B0 had no sshd_config): its edits and the base's
    ``sed`` merge against ucf's pristine copy (sshd_config is ucf's, not a dpkg conffile)."""
    config = text(world.results["web1"].files[SSHD_CONFIG]).splitlines()
    for _old, new in EDITS["web1"][SSHD_CONFIG]:
        assert new in config
    assert BASE_SED[1] in config, "the base's sed is missing"
    assert SSHD_CONFIG not in conflicts(world, "web1")


@pytest.mark.slow
def test_conffile_merges_against_its_pristine_version(world: World) -> None:
    """app1's uimg-conf 1.0 conffile (edited on line 3) and the base's 2.0 (line 10): no
    common ancestor in the layer history; 1.0's pristine conffile, from the .deb the base's
    apt cache kept (never the VM's own cache: the guest's), is the ancestor (item 4)."""
    conf = text(world.results["app1"].files[UIMG_CONF]).splitlines()
    assert "option02 = local-app1" in conf and "option10 = changed-in-2.0" in conf, conf
    assert UIMG_CONF not in conflicts(world, "app1")


@pytest.mark.slow
def test_own_conffile_edit_kept(world: World) -> None:
    """db1 installed nginx itself and tuned nginx.conf; the base installed the same nginx
    with the pristine nginx.conf: db1's edit stays, with no conflict."""
    conf = text(world.results["db1"].files[NGINX_CONF])
    assert "\tworker_connections 4096;" in conf.splitlines()
    assert NGINX_CONF not in conflicts(world, "db1")


@pytest.mark.slow
def test_identity_unique_across_vms(world: World) -> None:
    keys = {vm: r.host_key for vm, r in world.results.items()}
    mids = {vm: r.files["/etc/machine-id"] for vm, r in world.results.items()}
    assert all(k.startswith("SHA256:") for k in keys.values()), keys
    assert len(set(keys.values())) == len(VMS), keys
    assert all(m and re.fullmatch(rb"[0-9a-f]{32}\n?", m) for m in mids.values()), mids
    assert len(set(mids.values())) == len(VMS), mids


@pytest.mark.slow
def test_uid_clash_is_consistent_or_held_whole(world: World) -> None:
    """clash1's dave has UID 1000, deploy's in the base: the VM is either on generation 2 and
    consistent (sshd's user there, sshd -t passes), or still entirely on generation 1 with
    the reason (its files untouched)."""
    r = world.results["clash1"]
    if r.generation == 2:
        assert r.checked.ok, r.checked.summary()
        assert r.sshd is not None and r.sshd.returncode == 0, r.sshd and r.sshd.stderr
        passwd = text(r.files["/etc/passwd"])
        assert "\nsshd:" in passwd and "\ndave:x:1000:" in passwd, passwd
        assert "/etc/passwd" in conflicts(world, "clash1"), why(world, "clash1")
    else:
        assert r.generation == 1 and not r.report["applied"], r.report
        assert r.report["conflicts"] or r.report["error"], r.report
        assert r.files == world.before["clash1"]


# -- the real thing: it boots ------------------------------------------------------------------
@pytest.mark.slow
def test_vm_boots_with_ssh_active(world: World) -> None:
    """app1 (openssh-server from the base, users of both sides, keys of its own) boots under
    QEMU; its console says ssh.service is active."""
    need_guests()
    cli = world.cli
    r = world.results[BOOTED]
    assert r.generation == 2
    mnt = world.tmp / "hook"
    mnt.mkdir()
    cli.ok("mount", BOOTED, str(mnt))
    try:
        hook = mnt / "etc/unionimg-boot.d/ssh-check"
        hook.parent.mkdir(exist_ok=True)
        hook.write_text(SSH_HOOK)
        os.chmod(hook, 0o755)
    finally:
        cli.ok("umount", str(mnt))
    t = time.monotonic()
    try:
        cli.ok(
            "boot", BOOTED, "--hypervisor", "kvm", "--append", "unionimg.selftest=1",
            "--wait", "--timeout", "600",
        )  # fmt: skip
        lines = guest_lines(cli, BOOTED)
    finally:
        if shows(cli, "instance", "show", BOOTED)["state"] == "running":
            cli("stop", BOOTED, "--force")
        print(f"boot of {BOOTED}: {time.monotonic() - t:.1f} s")
    mid = text(r.files["/etc/machine-id"]).strip()
    assert f"unionimg-guest: ssh active {mid} {r.host_key}" in lines, "\n".join(lines)
