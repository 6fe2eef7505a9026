"""A package both sides changed: the newer version wins where the rule is unambiguous (issue
12, item 2). Pure: Debian's version comparison (against the host's ``dpkg
--compare-versions`` where it is installed), :func:`dpkgdb.newer_side`, then the planner's
decisions on small trees (which files of the package drop, stay, or keep it a conflict).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Mapping

import pytest

from tests.test_dpkgdb import names, upper_from
from tests.test_plan import Tree, run
from unionimg.reconcile import dpkgdb
from unionimg.reconcile.dpkgdb import INFO, STATUS, DbError, compare_versions, md5_of
from unionimg.reconcile.policy import Policy, Rule
from unionimg.store.reconcile_records import PackageConflicts

# -- Debian's version comparison ----------------------------------------------------------------
ORDERED = [
    "0~~", "0~", "0", "0.1", "0.9", "0.10", "1.0~rc1", "1.0", "1.0-0.1", "1.0-1", "1.0-1+b1",
    "1.0-1.1", "1.0-2~bpo1", "1.0-2", "1.0a", "1.0+dfsg-1", "1.0.1", "1.1", "2", "10",
    "1:0.1", "1:9.2p1-2", "1:9.2p1-2+deb12u3", "2:0",
]  # fmt: skip


def test_versions_sort_as_debian_policy_says() -> None:
    for i, a in enumerate(ORDERED):
        for j, b in enumerate(ORDERED):
            want = (i > j) - (i < j)
            assert compare_versions(a, b) == want, (a, b)
    assert compare_versions("1.01", "1.1") == 0 and compare_versions("0:1", "1") == 0


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg on this host")
def test_versions_agree_with_dpkg_compare_versions() -> None:
    rng = random.Random(12)
    alphabet = "0123456789.+~ab"
    samples = list(ORDERED)
    for _ in range(40):
        up = rng.choice("0123456789") + "".join(rng.choice(alphabet) for _ in range(4))
        samples.append(up + (f"-{rng.choice('12')}{rng.choice(['', '~x', '+b1'])}"))
    for a, b in zip(samples, reversed(samples), strict=True):
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
        eq = subprocess.run(["dpkg", "--compare-versions", a, "eq", b], check=False).returncode
        assert compare_versions(a, b) == (0 if eq == 0 else -1 if lt == 0 else 1), (a, b)


@pytest.mark.parametrize(
    "bad", ["", "a1.0", "1.0-", "x:1.0", ":1", "1.0 1", "1.0-1_2", "1;rm -rf", "9" * 300]
)
def test_malformed_versions_are_refused(bad: str) -> None:
    with pytest.raises(DbError):
        compare_versions(bad, "1.0")


# -- the rule ----------------------------------------------------------------------------------
def para(name: str, version: str, state: str = "installed", conffiles: str = "") -> bytes:
    extra = f"Conffiles:\n{conffiles}" if conffiles else ""
    return (
        f"Package: {name}\nStatus: install ok {state}\nArchitecture: all\n"
        f"Version: {version}\n{extra}Description: {name}\n"
    ).encode()


KEY = ("tool", "all")


def test_newer_side() -> None:
    found, _ = dpkgdb.newer_side(KEY, para("tool", "1"), para("tool", "2"))
    assert found is not None and found.side == "new"
    assert found.describe() == "tool: base 2 supersedes VM's 1 (taken)"
    found, _ = dpkgdb.newer_side(KEY, para("tool", "1:0"), para("tool", "2"))
    assert found is not None and found.side == "local"
    assert found.describe() == "tool: VM's 1:0 supersedes base 2 (kept (newer))"
    for local, new, why in [
        (None, para("tool", "2"), "the VM removed it"),
        (para("tool", "1"), None, "B1 removed it"),
        (para("tool", "1", "half-configured"), para("tool", "2"), "half-configured"),
        (para("tool", "2"), para("tool", "2").replace(b"Desc", b"X: y\nDesc"), "same version"),
        (para("tool", "v2"), para("tool", "2"), "must start with a digit"),
    ]:
        found, reason = dpkgdb.newer_side(KEY, local, new)
        assert found is None and why in reason, (reason, why)


# -- the planner -------------------------------------------------------------------------------
Package = tuple[str, Mapping[str, bytes], Mapping[str, bytes]]  # version, files, conffiles


def tree(packages: Mapping[str, Package]) -> Tree:
    """A dpkg tree: each package's status paragraph (with its ``Conffiles:``), files,
    ``list`` and ``md5sums`` (conffiles left out, as dpkg does) as dpkg leaves them."""
    t = Tree()
    paragraphs = []
    for name, (version, files, conffiles) in sorted(packages.items()):
        cf = "".join(f" {p} {md5_of(d)}\n" for p, d in sorted(conffiles.items()))
        paragraphs.append(para(name, version, conffiles=cf) + b"\n")
        for path, data in {**files, **conffiles}.items():
            t.file(path, data)
        listing = "".join(f"{p}\n" for p in sorted({*files, *conffiles}))
        t.file(f"{INFO}{name}.list", listing.encode())
        sums = "".join(f"{md5_of(d)}  {p.lstrip('/')}\n" for p, d in sorted(files.items()))
        t.file(f"{INFO}{name}.md5sums", sums.encode())
    t.file(STATUS, b"".join(paragraphs))
    return t


CONF = b"".join(f"option{i} = value{i}\n".encode() for i in range(20))


def tool(version: str, *, extra: Mapping[str, bytes] | None = None, conf: bytes = CONF) -> Package:
    files = {"/usr/bin/tool": f"tool {version}\n".encode(), **(extra or {})}
    return version, files, {"/etc/tool.conf": conf}


BASE: dict[str, Package] = {"base-files": ("12", {"/etc/debian_version": b"12\n"}, {})}


def test_base_newer_version_taken_whole_when_the_vms_copy_is_pristine() -> None:
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("1", extra={"/usr/share/tool/old": b"only in 1\n"})})
    b1 = tree({**BASE, "tool": tool("2", conf=CONF.replace(b"value10", b"ten"))})
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    status = r.action(STATUS)
    assert status.action == "drop", status  # the merge is B1's file
    assert status.packages == ("tool: base 2 supersedes VM's 1 (taken)",), status
    assert "newer version wins: tool: base 2 supersedes VM's 1 (taken)" in status.reason
    for path in ("/usr/bin/tool", "/usr/share/tool/old", "/etc/tool.conf"):
        assert r.action(path).action == "drop", r.action(path)  # B1's show; 'old' goes
    for ext in ("list", "md5sums"):
        assert r.action(f"{INFO}tool.{ext}").action == "drop"
    assert r.plan.conflicts == []
    reported = json.loads(json.dumps(r.plan.to_json()))["actions"]  # packages included
    assert [a["packages"] for a in reported if "packages" in a] == [list(status.packages)]


def test_base_newer_with_an_edited_conffile_leaves_a_conflict_on_that_conffile_only() -> None:
    """The VM's edit of its version's conffile is merged as any path both sides changed:
    against that version's pristine conffile when the base has a copy (the executor's
    lookup; tests/test_pkg_conflict_real.py), else a conflict on the conffile alone."""
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("1")})
    edited = CONF.replace(b"value2\n", b"mine\n")
    vm.file("/etc/tool.conf", edited)
    b1 = tree({**BASE, "tool": tool("2", conf=CONF.replace(b"value10", b"ten"))})
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    assert r.action("/usr/bin/tool").action == "drop"
    conf = r.action("/etc/tool.conf")  # not claimed: decided as any path both sides added
    assert conf.action == "conflict" and "no pristine copy of the VM's version" in conf.reason
    assert r.action(STATUS).packages and [c.path for c in r.plan.conflicts] == ["/etc/tool.conf"]


def test_vms_newer_version_kept_whole() -> None:
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("3")})
    b1 = tree({**BASE, "tool": tool("2")})
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    status = r.action(STATUS)
    assert status.packages == ("tool: VM's 3 supersedes base 2 (kept (newer))",), status
    assert status.action == "keep", status  # the VM's file is the merge
    for path in ("/usr/bin/tool", "/etc/tool.conf", f"{INFO}tool.list", f"{INFO}tool.md5sums"):
        assert r.action(path).action == "keep", r.action(path)
    assert r.plan.conflicts == []


def test_vm_edited_a_file_of_its_version_stays_a_package_conflict() -> None:
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("1")})
    vm.file("/usr/bin/tool", b"patched by hand\n")
    b1 = tree({**BASE, "tool": tool("2")})
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    status = r.action(STATUS)
    assert status.action == "conflict" and not status.packages, status
    assert "the VM changed /usr/bin/tool of its version (md5sums)" in status.reason
    proposal = status.artifacts["proposal"]
    assert names(proposal) == [("base-files", "12"), ("tool", "1")]


def test_base_changed_a_file_of_its_older_version_keeps_the_conflict() -> None:
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("3")})
    b1 = tree({**BASE, "tool": tool("2")})
    b1.file("/usr/bin/tool", b"patched in the base\n")
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    assert "B1 changed /usr/bin/tool of its version" in r.action(STATUS).reason


@pytest.mark.parametrize(
    ("vm_version", "b1_packages", "why"),
    [
        ("2", {"tool": ("2", {"/usr/bin/tool": b"other build\n"}, {})}, "same version"),
        ("1", {}, "B1 removed it"),
        ("1", {"tool": ("2;x", {"/usr/bin/tool": b"x\n"}, {})}, "invalid"),
    ],
)
def test_not_unambiguous_stays_a_package_conflict(
    vm_version: str, b1_packages: Mapping[str, Package], why: str
) -> None:
    b0 = tree({**BASE, "tool": tool("0.9")})
    vm = tree({**BASE, "tool": tool(vm_version)})
    b1 = tree({**BASE, **b1_packages})
    status = run(upper_from(b0, vm), b0, b1, reads=True).action(STATUS)
    assert status.action == "conflict" and not status.packages, status
    if why == "invalid":
        assert "the upstream version must" in status.reason or "revision" in status.reason
    else:
        assert why in status.reason, status.reason


def test_setting_off_keeps_every_package_conflict_and_says_why() -> None:
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("1")})
    b1 = tree({**BASE, "tool": tool("2")})
    for glob in (dpkgdb.NEWER_WINS, "/var/lib/dpkg/**"):
        off = Policy(rules=(Rule(1, glob, "keep-local"),))
        status = run(upper_from(b0, vm), b0, b1, reads=True, policy=off).action(STATUS)
        if glob == dpkgdb.NEWER_WINS:
            assert status.action == "conflict", status
            assert "newer version wins off: policy keep-local by rule 1" in status.reason
        else:  # the status file itself is the VM's by the admin's rule: nothing settled
            assert status.action == "keep" and not status.packages, status


def test_the_vms_deletion_of_a_file_b1s_version_has_is_undone() -> None:
    """B0 had tool 1; the VM upgraded to 1.5, which dropped a file (a whiteout); B1's 2
    has that file again: the whiteout goes with the VM's copy."""
    extra = {"/usr/share/tool/data": b"data\n"}
    b0 = tree({**BASE, "tool": tool("1", extra=extra)})
    vm = tree({**BASE, "tool": tool("1.5")})
    b1 = tree({**BASE, "tool": tool("2", extra=extra)})
    b1.file("/usr/share/tool/data", b"data 2\n")
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    assert r.action("/usr/share/tool/data").action == "drop"
    assert r.action(STATUS).packages and r.plan.conflicts == []


def test_a_pending_package_conflict_lists_its_paths_for_resolve_package() -> None:
    """What ``resolve --package`` applies as one unit: U's entries of the package (info
    files and files), the conffile the VM edited apart (``--take base`` keeps it)."""
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("1")})
    vm.file("/usr/bin/tool", b"patched by hand\n")
    vm.file("/etc/tool.conf", CONF.replace(b"value2\n", b"mine\n"))
    b1 = tree({**BASE, "tool": tool("2")})
    status = run(upper_from(b0, vm), b0, b1, reads=True).action(STATUS)
    listed = PackageConflicts.from_json(json.loads(status.artifacts["packages"]))
    (only,) = listed.items
    assert (only.label, only.local, only.base) == ("tool:all", "1", "2")
    assert set(only.files) == {"/usr/bin/tool", f"{INFO}tool.list", f"{INFO}tool.md5sums"}
    assert only.edited_conffiles == ("/etc/tool.conf",)


def test_vms_newer_version_kept_names_the_files_only_the_base_version_has() -> None:
    """dpkg would remove them on an upgrade; the union shows them, owned by no package: the
    report says so."""
    b0 = tree(BASE)
    vm = tree({**BASE, "tool": tool("3")})
    b1 = tree({**BASE, "tool": tool("2", extra={"/usr/share/tool/only-2": b"2\n"})})
    r = run(upper_from(b0, vm), b0, b1, reads=True)
    assert r.action(STATUS).packages == (
        "tool: VM's 3 supersedes base 2 (kept (newer); 1 file(s) only the base's version has "
        "stay, unowned: /usr/share/tool/only-2)",
    )
    assert r.plan.conflicts == []
