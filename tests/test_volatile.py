"""The shipped policy (issue 12, item 5): volatile paths, backups, generated files. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_plan import Tree, base, run
from unionimg.errors import UsageError
from unionimg.reconcile.policy import load_policy, shipped_policy

VOLATILE = (
    "/tmp/x",
    "/tmp/a/b/c",
    "/run/sshd.pid",
    "/var/tmp/y",
    "/var/cache/apt/pkgcache.bin",
    "/var/cache/ldconfig/aux-cache",
    "/var/cache/debconf/config.dat-old",
    "/var/log/dpkg.log",
    "/var/log/apt/eipp.log.xz",
    "/var/log/journal/abc/system.journal",
)
KEPT_LOCAL = (
    "/etc/passwd-",
    "/etc/gshadow-",
    "/etc/subuid-",
    "/etc/apt/sources.list.d/x.list.dpkg-old",
    "/etc/nginx/nginx.conf.dpkg-dist",
    "/var/lib/systemd/random-seed",
    "/var/lib/dbus/machine-id",
    "/etc/machine-id",
    "/var/lib/dhcp/dhclient.leases",
    "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
    "/var/lib/apt/periodic/update-success-stamp",
    "/etc/resolv.conf",
    "/etc/.pwd.lock",
    "/var/lib/ucf/registry.0",
    "/var/lib/ucf/hashfile.3",
    "/var/lib/ldconfig/aux-cache",
)


def test_shipped_rules_parse_and_are_marked() -> None:
    policy = shipped_policy()
    assert policy.rules and all(r.shipped for r in policy.rules)
    assert all(r.describe().startswith("shipped rule ") for r in policy.rules)


@pytest.mark.parametrize("path", VOLATILE + KEPT_LOCAL)
def test_volatile_and_own_files_keep_local(path: str) -> None:
    assert load_policy(None).action_for(path) == "keep-local"


@pytest.mark.parametrize(
    "path",
    [
        "/var/cache/debconf/config.dat",
        "/var/cache/debconf/templates.dat",
        "/var/cache/debconf/passwords.dat",
    ],
)
def test_debconf_databases_are_state_merged_despite_var_cache(path: str) -> None:
    decision = load_policy(None).decide(path)
    assert decision.action == "merge" and decision.rule is not None
    assert decision.rule.shipped


def test_generated_files_take_the_base() -> None:
    assert load_policy(None).action_for("/etc/ld.so.cache") == "take-base"


@pytest.mark.parametrize(
    "path",
    ["/var/lib/dpkg/status", "/var/lib/dpkg/status-old", "/var/lib/apt/extended_states"],
)
def test_no_shipped_rule_for_the_package_databases(path: str) -> None:
    """dpkg's and apt's databases have mergers of their own (items 2/4)."""
    assert load_policy(None).decide(path).rule is None


def test_admin_rules_win_and_shipped_false_turns_them_off(tmp_path: Path) -> None:
    admin = tmp_path / "p.toml"
    admin.write_text('[[rule]]\nglob = "/var/log/important.log"\naction = "merge"\n')
    policy = load_policy(admin)
    assert policy.action_for("/var/log/important.log") == "merge"
    assert policy.action_for("/var/log/other.log") == "keep-local"
    assert not policy.rules[0].shipped and policy.rules[1].shipped
    admin.write_text('shipped = false\n[[rule]]\nglob = "/tmp/**"\naction = "fail"\n')
    policy = load_policy(admin)
    assert len(policy.rules) == 1 and policy.action_for("/var/log/x") == "merge"
    assert policy.action_for("/tmp/x") == "fail"
    admin.write_text('shipped = "no"\n')
    with pytest.raises(UsageError, match="shipped = 'no' is not true or false"):
        load_policy(admin)


# -- through the planner: never a conflict ---------------------------------------------------
LOG0 = b"".join(b"log %d\n" % i for i in range(5))


def test_logs_and_caches_changed_on_both_sides_are_no_conflicts() -> None:
    b0 = base().file("/var/log/dpkg.log", LOG0).file("/var/cache/ldconfig/aux-cache", b"\0a")
    b0.file("/var/cache/debconf/config.dat", b"Name: a/q\nOwners: a\n\n")
    b0.file("/etc/ld.so.cache", b"glibc-ld.so.cache1.1\0old").file("/tmp/t", b"0\n")
    b1 = b0.copy().file("/var/log/dpkg.log", LOG0 + b"base installs ssh\n")
    b1.file("/var/cache/ldconfig/aux-cache", b"\0base")
    b1.file("/var/cache/debconf/config.dat", b"Name: a/q\nOwners: a\n\nName: s/q\nOwners: s\n\n")
    b1.file("/etc/ld.so.cache", b"glibc-ld.so.cache1.1\0base").file("/tmp/t", b"b\n")
    b1.remove("/var/log/apt").dir("/var/log/apt")
    u = Tree(upper=True).file("/var/log/dpkg.log", LOG0 + b"vm installs nginx\n")
    u.file("/var/cache/ldconfig/aux-cache", b"\0vm")
    u.file("/var/cache/debconf/config.dat", b"Name: a/q\nOwners: a\n\nName: n/q\nOwners: n\n\n")
    u.file("/etc/ld.so.cache", b"glibc-ld.so.cache1.1\0vm").file("/tmp/t", b"v\n")
    r = run(u, b0, b1, policy=load_policy(None), reads=True)
    assert not r.plan.conflicts, r.plan.conflicts
    assert r.action("/var/log/dpkg.log").action == "keep"
    assert r.action("/var/cache/ldconfig/aux-cache").action == "keep"
    assert r.action("/tmp/t").action == "keep"
    assert r.action("/etc/ld.so.cache").action == "drop"  # B1's (regenerated if needed)
    debconf = r.action("/var/cache/debconf/config.dat")
    assert (debconf.case, debconf.action) == (5, "write")
    assert (
        debconf.data == b"Name: a/q\nOwners: a\n\nName: n/q\nOwners: n\n\nName: s/q\nOwners: s\n\n"
    )


def test_whiteout_and_deleted_directory_under_var_log_are_no_conflicts() -> None:
    b0 = base().file("/var/log/old.log", b"a\n").file("/var/log/app/x.log", b"x\n")
    b1 = b0.copy().file("/var/log/old.log", b"b\n").remove("/var/log/app")
    u = Tree(upper=True).whiteout("/var/log/old.log").file("/var/log/app/x.log", b"vm\n")
    r = run(u, b0, b1, policy=load_policy(None), reads=True)
    assert not r.plan.conflicts, r.plan.conflicts
    assert r.action("/var/log/old.log").action == "keep"
    assert r.action("/var/log/app").action == "keep"


# -- ld.so.cache: regenerated only when the VM has libraries of its own ----------------------
def test_ld_cache_needed_only_for_own_libraries() -> None:
    from unionimg.entries import FILE, SYMLINK, Change, Entry
    from unionimg.reconcile.ldcache import CACHE, needed, own_libraries, valid_cache

    delta = {CACHE: Change(CACHE, Entry(CACHE, FILE), Entry(CACHE, FILE, size=2))}
    cache = Entry(CACHE, FILE)
    lib = Entry("/usr/local/lib/libfoo.so.1.2", FILE)
    link = Entry("/usr/lib/x86_64-linux-gnu/libbar.so", SYMLINK, target="libbar.so.3")
    conf = Entry("/etc/ld.so.conf.d/local.conf", FILE)
    other = Entry("/etc/hosts", FILE)
    assert own_libraries([lib]) and own_libraries([link]) and own_libraries([conf])
    assert not own_libraries([other, Entry("/usr/share/doc/x.sox", FILE), cache])
    assert needed([cache, lib], delta, "drop")  # B1's taken, the VM has a library
    assert needed([lib], delta, None)  # the VM had no cache of its own: B1's shows
    assert not needed([cache, lib], delta, "keep")  # the VM's own cache kept (policy)
    assert not needed([cache, lib], delta, "conflict")
    assert not needed([cache, other], delta, "drop")  # no library: B1's cache is right
    assert not needed([cache, lib], {}, None)  # B1 did not change it
    assert valid_cache(b"glibc-ld.so.cache1.1" + b"\0" * 10)
    assert not valid_cache(b"") and not valid_cache(b"#!/bin/sh\n")


# -- history: volatile paths never committed ----------------------------------------------------
def test_volatile_roots_and_hgignore(tmp_path: Path) -> None:
    from unionimg.layers import history

    paths = [
        "/var", "/var/log", "/var/log/dpkg.log", "/var/log/apt", "/var/log/apt/eipp.log.xz",
        "/var/cache", "/var/cache/apt", "/var/cache/apt/pkgcache.bin", "/var/cache/debconf",
        "/var/cache/debconf/config.dat", "/var/cache/debconf/config.dat-old", "/tmp",
        "/tmp/x", "/run/a", "/etc/hosts", "/var/tmp/y", "/var/lib/dpkg/status",
    ]  # fmt: skip
    assert history.volatile_roots(paths) == [
        "upper/run/a",
        "upper/tmp/x",
        "upper/var/cache/apt",
        "upper/var/cache/debconf/config.dat-old",
        "upper/var/log/apt",
        "upper/var/log/dpkg.log",
        "upper/var/tmp/y",
    ]
    assert all(line in history.hgignore_text() for line in history.VOLATILE_HGIGNORE)


def test_commit_forgets_volatile_files_tracked_before(tmp_path: Path) -> None:
    """A U committed before the rule (its .hgignore without the volatile lines) tracked
    /var/log/app.log: the next commit forgets it; new volatile files are never added."""
    from unionimg.layers import history

    u = tmp_path / "u"
    (u / "upper/var/log").mkdir(parents=True)
    (u / "upper/var/cache/debconf").mkdir(parents=True)
    (u / "upper/etc").mkdir()
    (u / "upper/var/log/app.log").write_text("1\n")
    (u / "upper/etc/hosts").write_text("h\n")
    history.init_repo(u)
    (u / ".hgignore").write_text(history.U_HGIGNORE)  # the old text
    with history.open_repo(u, trusted=True) as repo:
        repo.commit_all("before the rule")
        assert "upper/var/log/app.log" in repo.cmd("files").decode().splitlines()
        (u / ".hgignore").write_text(history.hgignore_text())
        (u / "upper/var/log/app.log").write_text("2\n")
        (u / "upper/var/log/new.log").write_text("new\n")
        (u / "upper/tmp").mkdir()
        (u / "upper/tmp/t").write_text("t\n")
        (u / "upper/var/cache/debconf/config.dat").write_text("Name: a\n\n")
        (u / "upper/var/cache/debconf/config.dat-old").write_text("Name: a\n\n")
        scan = [
            "/var/log", "/var/log/app.log", "/var/log/new.log", "/tmp", "/tmp/t", "/etc",
            "/etc/hosts", "/var/cache/debconf/config.dat", "/var/cache/debconf/config.dat-old",
        ]  # fmt: skip
        repo.commit_all("after", outside=history.volatile_roots(scan))
        files = repo.cmd("files").decode().splitlines()
    assert "upper/var/cache/debconf/config.dat" in files and "upper/etc/hosts" in files
    assert not [f for f in files if f.startswith(("upper/var/log/", "upper/tmp/"))], files
    assert "upper/var/cache/debconf/config.dat-old" not in files
