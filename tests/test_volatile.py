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
