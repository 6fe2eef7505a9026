"""The pure reconcile planner, one test per row of the table in docs/design.md and then some.

BaseView and ContentReader are fakes here (the planner is pure); they count what the planner
asks, so the cost rule (no walk of the base, no content reads outside cases 5-7) is checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import pytest

from unionimg.entries import (
    BLK,
    CHR,
    DIR,
    FIFO,
    FILE,
    LARGE_FILE,
    SOCK,
    SYMLINK,
    WHITEOUT,
    Change,
    Entry,
    parent_of,
)
from unionimg.errors import UsageError
from unionimg.reconcile.merge import merge3
from unionimg.reconcile.plan import Action, InstancePlan, check_upper, plan_instance
from unionimg.reconcile.policy import Policy, parse_policy

CONF = b"".join(b"line %d\n" % i for i in range(1, 11))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- trees: a generation or an upper layer ------------------------------------------------
class Tree:
    def __init__(self, *, upper: bool = False) -> None:
        self.entries: dict[str, Entry] = {}
        self.data: dict[str, bytes] = {}
        self.upper = upper
        if not upper:
            self.entries["/"] = Entry("/", DIR, mode=0o755)

    def _parents(self, path: str) -> None:
        parent = parent_of(path)
        if parent != "/" and parent not in self.entries:
            self._parents(parent)
            self.entries[parent] = Entry(parent, DIR, mode=0o755)

    def put(self, entry: Entry, data: bytes | None = None) -> Tree:
        self._parents(entry.path)
        self.entries[entry.path] = entry
        if data is not None:
            self.data[entry.path] = data
        else:
            self.data.pop(entry.path, None)
        return self

    def file(
        self,
        path: str,
        data: bytes = CONF,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        xattrs: tuple[tuple[str, str], ...] = (),
        link: str | None = None,
        hashed: bool = True,
    ) -> Tree:
        entry = Entry(
            path,
            FILE,
            mode=mode,
            uid=uid,
            gid=gid,
            size=len(data),
            sha256=sha(data) if hashed else None,
            xattrs=xattrs,
            link=link,
        )
        return self.put(entry, data)

    def dir(self, path: str, *, mode: int = 0o755, uid: int = 0, opaque: bool = False) -> Tree:
        return self.put(Entry(path, DIR, mode=mode, uid=uid, opaque=opaque))

    def symlink(self, path: str, target: str, *, uid: int = 0) -> Tree:
        return self.put(Entry(path, SYMLINK, mode=0o777, uid=uid, target=target))

    def whiteout(self, path: str) -> Tree:
        return self.put(Entry(path, WHITEOUT))

    def node(self, path: str, kind: str, rdev: int | None = None) -> Tree:
        return self.put(Entry(path, kind, mode=0o600, rdev=rdev))

    def remove(self, path: str) -> Tree:
        for p in [p for p in self.entries if p == path or p.startswith(path + "/")]:
            del self.entries[p]
            self.data.pop(p, None)
        return self

    def copy(self) -> Tree:
        out = Tree(upper=self.upper)
        out.entries = dict(self.entries)
        out.data = dict(self.data)
        return out


def delta_of(b0: Tree, b1: Tree) -> dict[str, Change]:
    out = {}
    for path in sorted(set(b0.entries) | set(b1.entries)):
        old, new = b0.entries.get(path), b1.entries.get(path)
        if old is None or new is None or not old.same(new):
            out[path] = Change(path, old, new)
    return out


# -- fakes that watch the planner --------------------------------------------------------
class FakeBase:
    """A BaseView that refuses to be walked and records every lookup."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.gets: list[str] = []
        self.children_calls: list[str] = []

    def get(self, path: str) -> Entry | None:
        self.gets.append(path)
        return self.tree.entries.get(path)

    def children(self, directory: str, *, limit: int | None = None) -> list[Entry]:
        self.children_calls.append(directory)
        prefix = "/" if directory == "/" else directory + "/"
        found = sorted(
            (e for p, e in self.tree.entries.items() if p.startswith(prefix) and p != "/"),
            key=lambda e: e.path,
        )
        return found[:limit] if limit is not None else found

    def __iter__(self) -> Iterator[Entry]:
        raise AssertionError("the planner iterated a whole base manifest")

    def __len__(self) -> int:
        raise AssertionError("the planner asked for the size of a base manifest")


class FakeContent:
    def __init__(self, upper: Tree, b0: Tree, b1: Tree, *, forbid: bool) -> None:
        self.trees = {"upper": upper, "b0": b0, "b1": b1}
        self.forbid = forbid
        self.reads: list[tuple[str, str]] = []

    def _read(self, source: str, path: str) -> bytes:
        if self.forbid:
            raise AssertionError(f"content of {path} read from {source} in a no-read case")
        self.reads.append((source, path))
        return self.trees[source].data[path]

    def upper(self, path: str) -> bytes:
        return self._read("upper", path)

    def base(self, which: Literal["b0", "b1"], path: str) -> bytes:
        return self._read(which, path)


@dataclass
class Run:
    plan: InstancePlan
    b0: FakeBase
    b1: FakeBase
    content: FakeContent
    upper: Tree
    extra: dict[str, object] = field(default_factory=dict)

    def action(self, path: str) -> Action:
        found = [a for a in self.plan.actions if a.path == path and a.case != 16]
        assert len(found) == 1, (path, self.plan.actions)
        return found[0]

    def paths(self) -> list[str]:
        return [a.path for a in self.plan.actions]


def run(
    upper: Tree,
    b0: Tree,
    b1: Tree,
    *,
    policy: Policy | None = None,
    reads: bool = False,
) -> Run:
    fb0, fb1 = FakeBase(b0), FakeBase(b1)
    content = FakeContent(upper, b0, b1, forbid=not reads)
    plan = plan_instance(
        list(upper.entries.values()), delta_of(b0, b1), fb0, fb1, policy or Policy(), content
    )
    json.dumps(plan.to_json(include_keep=True))  # always serialisable, never bytes
    return Run(plan, fb0, fb1, content, upper)


def base() -> Tree:
    return (
        Tree()
        .file("/etc/hostname", b"base\n")
        .file("/etc/app.conf", CONF)
        .file("/etc/motd", b"hello\n")
        .file("/usr/bin/tool", b"\x7fELF\0\0v1")
        .symlink("/lib/libx.so", "libx.so.1")
        .file("/lib/libx.so.1", b"\0lib1")
    )


def upper_of(b0: Tree, *paths: str) -> Tree:
    """An upper layer holding unmodified copies of ``paths`` (accidental copy-ups)."""
    u = Tree(upper=True)
    for path in paths:
        u.put(b0.entries[path], b0.data.get(path))
    for path in list(u.entries):
        parent = parent_of(path)
        while parent != "/":
            u.entries[parent] = b0.entries[parent]
            parent = parent_of(parent)
    u.entries["/"] = b0.entries["/"]
    return u


def edit(data: bytes, line: int, text: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    lines[line - 1] = text + b"\n"
    return b"".join(lines)


# -- the 17 cases ------------------------------------------------------------------------
def test_case_01_base_changed_path_not_in_upper() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/motd", b"patched\n").file("/usr/share/new.txt", b"x\n")
    u = upper_of(b0).file("/etc/hostname", b"vm1\n")
    r = run(u, b0, b1)
    assert "/etc/motd" not in r.paths() and "/usr/share/new.txt" not in r.paths()
    assert r.plan.unaffected == 3  # motd, /usr/share, /usr/share/new.txt
    assert r.plan.status == "unchanged"


def test_case_02_only_upper_changed() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/motd", b"patched\n")
    u = upper_of(b0).file("/etc/hostname", b"vm1\n").file("/root/notes", b"mine\n")
    r = run(u, b0, b1)
    for path in ("/etc/hostname", "/root/notes", "/root", "/etc"):
        assert (r.action(path).case, r.action(path).action) == (2, "keep")


def test_case_03_accidental_copy_up_dropped() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 2, b"patched"))
    u = upper_of(b0, "/etc/app.conf", "/etc/hostname")
    r = run(u, b0, b1)
    a = r.action("/etc/app.conf")
    assert (a.case, a.action) == (3, "drop")
    assert r.action("/etc/hostname").action == "keep"
    assert r.content.reads == []


def test_case_04_same_change_on_both_sides() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 2, b"same")).remove("/etc/motd")
    u = upper_of(b0).file("/etc/app.conf", edit(CONF, 2, b"same")).whiteout("/etc/motd")
    r = run(u, b0, b1)
    assert (r.action("/etc/app.conf").case, r.action("/etc/app.conf").action) == (4, "drop")
    assert (r.action("/etc/motd").case, r.action("/etc/motd").action) == (4, "drop")
    # /etc lost all its children and equals B1's /etc: dropped as well
    assert r.action("/etc").action == "drop"


def test_case_05_text_separate_lines_merged() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 2, b"base fix"), mode=0o640)
    u = upper_of(b0).file("/etc/app.conf", edit(CONF, 9, b"local tweak"), uid=7)
    r = run(u, b0, b1, reads=True)
    a = r.action("/etc/app.conf")
    assert (a.case, a.action) == (5, "write")
    assert a.data == edit(edit(CONF, 2, b"base fix"), 9, b"local tweak")
    assert a.entry is not None
    assert (a.entry.kind, a.entry.mode, a.entry.uid) == (FILE, 0o640, 7)  # per-field merge
    assert a.entry.sha256 == sha(a.data)
    assert r.plan.status == "changed"


def test_case_06_text_overlap_conflict() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 5, b"from base"))
    u = upper_of(b0).file("/etc/app.conf", edit(CONF, 5, b"from vm"))
    r = run(u, b0, b1, reads=True)
    a = r.action("/etc/app.conf")
    assert (a.case, a.action) == (6, "conflict")
    assert a.data is None and a.entry is None
    assert set(a.artifacts) == {"merged", "base-old", "base-new", "local"}
    merged = a.artifacts["merged"]
    assert b"<<<<<<< local\nfrom vm\n" in merged and b"from base\n>>>>>>> B1\n" in merged
    assert a.artifacts["local"] == u.data["/etc/app.conf"]
    assert r.plan.conflicts == [a] and r.plan.status == "conflict"
    assert "overlapping" in a.reason


def test_case_07_binary_both_changed_conflict() -> None:
    b0 = base()
    b1 = b0.copy().file("/usr/bin/tool", b"\x7fELF\0\0v2")
    u = upper_of(b0).file("/usr/bin/tool", b"\x7fELF\0\0patched")
    r = run(u, b0, b1, reads=True)
    a = r.action("/usr/bin/tool")
    assert (a.case, a.action) == (7, "conflict")
    assert "merged" not in a.artifacts and a.artifacts["base-new"] == b"\x7fELF\0\0v2"


def test_case_08_base_deleted_unmodified_copy() -> None:
    b0 = base()
    b1 = b0.copy().remove("/etc/motd")
    u = upper_of(b0, "/etc/motd")
    r = run(u, b0, b1)
    assert (r.action("/etc/motd").case, r.action("/etc/motd").action) == (8, "drop")


def test_case_09_base_deleted_modified_copy() -> None:
    b0 = base()
    b1 = b0.copy().remove("/etc/motd")
    u = upper_of(b0).file("/etc/motd", b"vm motd\n")
    r = run(u, b0, b1)
    a = r.action("/etc/motd")
    assert (a.case, a.action) == (9, "conflict")
    assert r.action("/etc").action == "keep"


def test_case_10_whiteout_base_unchanged() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/hostname", b"other\n")
    u = upper_of(b0).whiteout("/etc/motd")
    r = run(u, b0, b1)
    assert (r.action("/etc/motd").case, r.action("/etc/motd").action) == (10, "keep")


def test_case_11_whiteout_base_changed() -> None:
    b0 = base().file("/opt/app/a.txt", b"a\n")
    b1 = b0.copy().file("/etc/motd", b"patched\n").file("/opt/app/sub/new.txt", b"n\n")
    u = upper_of(b0).whiteout("/etc/motd").whiteout("/opt/app")
    r = run(u, b0, b1)
    a = r.action("/etc/motd")
    assert (a.case, a.action) == (11, "conflict")
    d = r.action("/opt/app")  # whited-out directory, B1 adds below it
    assert (d.case, d.action) == (11, "conflict")
    assert d.paths == ("/opt/app/sub", "/opt/app/sub/new.txt")


def test_case_12_local_metadata_base_content() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 1, b"new"))
    u = upper_of(b0).file("/etc/app.conf", CONF, mode=0o600, uid=33)
    r = run(u, b0, b1, reads=True)
    a = r.action("/etc/app.conf")
    assert (a.case, a.action) == (12, "write")
    assert a.data == edit(CONF, 1, b"new")
    assert a.entry is not None and (a.entry.mode, a.entry.uid) == (0o600, 33)
    assert r.content.reads == [("b1", "/etc/app.conf")]  # only B1's content, for the write


def test_case_13_metadata_both_sides() -> None:
    b0 = base().file("/etc/a", mode=0o644).file("/etc/b", mode=0o644)
    b1 = b0.copy().file("/etc/a", mode=0o640).file("/etc/b", mode=0o644, gid=4)
    u = upper_of(b0).file("/etc/a", mode=0o600).file("/etc/b", mode=0o600)
    r = run(u, b0, b1)
    a = r.action("/etc/a")
    assert (a.case, a.action) == (13, "conflict")
    assert "mode local 0600 / B1 0640" in a.reason
    b = r.action("/etc/b")  # a field changed on one side takes that side
    assert (b.case, b.action) == (13, "set-meta")
    assert b.entry is not None and (b.entry.mode, b.entry.gid) == (0o600, 4)


def test_case_13_xattrs_merge_per_name() -> None:
    b0 = base().file("/bin/ping", mode=0o755, xattrs=(("user.a", "01"),))
    b1 = b0.copy().file("/bin/ping", mode=0o755, xattrs=(("security.capability", "ff"),))
    u = upper_of(b0).file("/bin/ping", mode=0o755, xattrs=(("user.a", "01"), ("user.b", "02")))
    a = run(u, b0, b1).action("/bin/ping")
    assert (a.case, a.action) == (13, "set-meta")
    assert a.entry is not None
    assert a.entry.xattrs == (("security.capability", "ff"), ("user.b", "02"))


def test_case_14_symlink_retargeted() -> None:
    b0 = base().symlink("/etc/alt", "/usr/bin/a").symlink("/etc/mine", "/x")
    b1 = (
        b0.copy()
        .symlink("/lib/libx.so", "libx.so.2")
        .symlink("/etc/alt", "/usr/bin/b")
        .symlink("/etc/mine", "/x", uid=5)
    )
    u = upper_of(b0, "/lib/libx.so")
    u.put(replace(b0.entries["/lib/libx.so"], uid=9))  # local chown, B1 retargets
    u.symlink("/etc/alt", "/usr/bin/c").symlink("/etc/mine", "/y")
    r = run(u, b0, b1)
    one = r.action("/lib/libx.so")
    assert (one.case, one.action) == (14, "write")
    assert one.entry is not None and (one.entry.target, one.entry.uid) == ("libx.so.2", 9)
    assert one.data is None
    both = r.action("/etc/alt")
    assert (both.case, both.action) == (14, "conflict")
    local = r.action("/etc/mine")  # retargeted locally; B1 only chowned it
    assert (local.case, local.action) == (14, "set-meta")
    assert local.entry is not None and (local.entry.target, local.entry.uid) == ("/y", 5)


def test_case_15_type_change_conflict() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/hostname", b"patched\n")
    b1.remove("/etc/motd").dir("/etc/motd").file("/etc/motd/10-welcome", b"hi\n")
    u = upper_of(b0).dir("/etc/hostname", opaque=True).file("/etc/hostname/x", b"x\n")
    u.file("/etc/motd", b"vm motd\n")
    r = run(u, b0, b1)
    a = r.action("/etc/hostname")  # local file -> dir, base modified the file
    assert (a.case, a.action) == (15, "conflict")
    assert r.action("/etc/hostname/x").action == "keep"
    b = r.action("/etc/motd")  # base file -> dir, local modified the file
    assert (b.case, b.action) == (15, "conflict")


def test_case_15_local_file_over_base_dir_changed_below() -> None:
    b0 = base().file("/opt/app/a.txt", b"a\n")
    b1 = b0.copy().file("/opt/app/a.txt", b"a2\n")
    u = upper_of(b0).file("/opt/app", b"now a file\n")
    a = run(u, b0, b1).action("/opt/app")
    assert (a.case, a.action) == (15, "conflict") and a.paths == ("/opt/app/a.txt",)


def test_case_16_opaque_dir_hides_additions() -> None:
    b0 = base().file("/srv/www/index.html", b"old\n")
    b1 = b0.copy().file("/srv/www/new.html", b"new\n").file("/srv/www/index.html", b"v2\n")
    u = upper_of(b0).dir("/srv/www", opaque=True).file("/srv/www/mine.html", b"m\n")
    r = run(u, b0, b1)
    reports = [a for a in r.plan.actions if a.case == 16]
    assert len(reports) == 1
    rep = reports[0]
    assert (rep.path, rep.action) == ("/srv/www", "report")
    assert rep.paths == ("/srv/www/index.html", "/srv/www/new.html")
    assert r.action("/srv/www").action == "keep"
    assert r.plan.conflicts == [] and r.plan.status == "unchanged"
    assert r.b1.children_calls == []


def test_case_17_base_unchanged_is_fast_noop() -> None:
    b0 = base()
    u = upper_of(b0, "/etc/motd").file("/etc/hostname", b"vm\n")
    r = run(u, b0, b0.copy())
    assert [(a.path, a.case, a.action) for a in r.plan.actions] == [("/", 17, "keep")]
    assert r.b0.gets == r.b1.gets == [] and r.content.reads == []
    assert r.plan.status == "unchanged"


# -- policy ------------------------------------------------------------------------------
OVERLAP_POLICY = """
[[rule]]
glob = "/etc/keep/*"
action = "keep-local"
[[rule]]
glob = "/etc/take/**"
action = "take-base"
[[rule]]
glob = "/etc/fail.conf"
action = "fail"
"""


def overlap(paths: list[str]) -> tuple[Tree, Tree, Tree]:
    b0, b1, u = base(), base(), upper_of(base())
    for path in paths:
        b0.file(path, CONF)
        b1.file(path, edit(CONF, 5, b"from base"))
        u.file(path, edit(CONF, 5, b"from vm"))
    return u, b0, b1


def test_policy_keep_local_take_base_fail() -> None:
    u, b0, b1 = overlap(["/etc/keep/a", "/etc/take/x/y", "/etc/fail.conf", "/etc/other"])
    r = run(u, b0, b1, policy=parse_policy(OVERLAP_POLICY), reads=True)
    keep = r.action("/etc/keep/a")
    assert (keep.case, keep.action) == (6, "keep") and "rule 1" in keep.reason
    take = r.action("/etc/take/x/y")
    assert (take.case, take.action) == (6, "drop") and "take-base" in take.reason
    fail = r.action("/etc/fail.conf")
    assert (fail.case, fail.action) == (6, "error")
    assert r.action("/etc/other").action == "conflict"
    assert r.plan.errors == [fail] and r.plan.status == "error"


def test_policy_only_governs_paths_both_changed() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 1, b"new"))
    u = upper_of(b0, "/etc/app.conf").file("/etc/hostname", b"vm\n")
    policy = parse_policy('[[rule]]\nglob = "/etc/*"\naction = "fail"\n')
    r = run(u, b0, b1, policy=policy)
    assert r.action("/etc/app.conf").action == "drop"  # case 3: not both changed
    assert r.action("/etc/hostname").action == "keep"  # case 2
    assert r.plan.status == "changed"


def test_policy_take_base_under_opaque_dir_writes_b1() -> None:
    u, b0, b1 = overlap(["/srv/conf/a"])
    u.dir("/srv/conf", opaque=True)
    policy = parse_policy('[[rule]]\nglob = "/srv/**"\naction = "take-base"')
    r = run(u, b0, b1, policy=policy, reads=True)
    a = r.action("/srv/conf/a")
    assert a.action == "write" and a.data == edit(CONF, 5, b"from base")


@pytest.mark.parametrize(
    ("binary", "expected"),
    [("conflict", "conflict"), ("keep-local", "keep"), ("take-base", "drop")],
)
def test_binary_policy(binary: str, expected: str) -> None:
    b0 = base()
    b1 = b0.copy().file("/usr/bin/tool", b"\x7fELF\0\0v2")
    u = upper_of(b0).file("/usr/bin/tool", b"\x7fELF\0\0patched")
    r = run(u, b0, b1, policy=parse_policy(f'binary = "{binary}"'), reads=True)
    a = r.action("/usr/bin/tool")
    assert (a.case, a.action) == (7, expected)


def test_path_rule_beats_binary_setting() -> None:
    b0 = base()
    b1 = b0.copy().file("/usr/bin/tool", b"\x7fELF\0\0v2")
    u = upper_of(b0).file("/usr/bin/tool", b"\x7fELF\0\0patched")
    text = 'binary = "take-base"\n[[rule]]\nglob = "/usr/bin/*"\naction = "keep-local"\n'
    a = run(u, b0, b1, policy=parse_policy(text), reads=True).action("/usr/bin/tool")
    assert a.action == "keep"


# -- what reconcile refuses or leaves alone ----------------------------------------------
def test_redirect_and_metacopy_refused() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/motd", b"patched\n")
    u = upper_of(b0).put(Entry("/etc/renamed", DIR, mode=0o755, redirect="/etc/orig"))
    with pytest.raises(UsageError, match=r"/etc/renamed.*redirect.*redirect_dir=off"):
        run(u, b0, b1)
    m = upper_of(b0).put(replace(b0.entries["/etc/motd"], metacopy=True))
    with pytest.raises(UsageError, match=r"/etc/motd.*metacopy=off"):
        run(m, b0, b1)
    problems = check_upper([*u.entries.values(), *m.entries.values()], strict=False)
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert check_upper(upper_of(b0, "/etc/motd").entries.values()) == []


def test_hardlinks_sockets_devices_reported() -> None:
    b0 = base().file("/usr/bin/vi", b"\0vi").file("/usr/bin/vim", b"\0vi")
    b1 = b0.copy().file("/usr/bin/vi", b"\0vi2").file("/usr/bin/vim", b"\0vi2")
    u = upper_of(b0).file("/usr/bin/vi", b"\0vi", link="/usr/bin/vi")
    u.file("/usr/bin/vim", b"\0vi", link="/usr/bin/vi")
    u.node("/run/app.sock", SOCK).node("/run/fifo", FIFO).node("/dev/sda", BLK, 2048)
    u.node("/dev/null", CHR, 259)
    u.put(Entry("/etc/motd", WHITEOUT, link="/etc/motd"))  # whiteouts share one inode
    r = run(u, b0, b1)
    for path in ("/usr/bin/vi", "/usr/bin/vim"):
        a = r.action(path)
        assert (a.case, a.action) == (0, "report") and "hardlinked" in a.reason
    for path in ("/run/app.sock", "/run/fifo", "/dev/sda", "/dev/null"):
        a = r.action(path)
        assert (a.case, a.action) == (2, "report")
    assert (r.action("/etc/motd").case, r.action("/etc/motd").action) == (10, "keep")
    assert r.plan.changes == []


# -- paths, dirs, opaque, sha-less entries -----------------------------------------------
def test_spaces_and_non_ascii_paths() -> None:
    path = "/etc/my app/réglages été.conf"
    b0 = base().file(path, CONF)
    b1 = b0.copy().file(path, edit(CONF, 1, b"base"))
    u = upper_of(b0).file(path, edit(CONF, 10, "vm é".encode()))
    r = run(u, b0, b1, reads=True)
    a = r.action(path)
    assert (a.case, a.action) == (5, "write")
    assert a.data == edit(edit(CONF, 1, b"base"), 10, "vm é".encode())
    assert r.action("/etc/my app").action == "keep"


def test_new_nested_dirs_in_b1_are_case_1() -> None:
    b0 = base()
    b1 = b0.copy().file("/opt/vendor/x/y/z/tool.conf", b"t\n").symlink("/opt/vendor/cur", "x")
    u = upper_of(b0).file("/etc/hostname", b"vm\n").file("/opt/mine", b"m\n")
    r = run(u, b0, b1)
    assert not any(p.startswith("/opt/vendor") for p in r.paths())
    assert r.plan.unaffected == 6  # vendor, x, y, z, tool.conf, cur
    assert r.action("/opt").action == "keep"
    assert r.b1.gets == [] and r.b1.children_calls == []


def test_dir_cleanup_after_drops() -> None:
    b0 = base().file("/etc/foo/bar.conf", CONF).file("/etc/foo/deep/x", b"x\n")
    b1 = b0.copy().file("/etc/foo/bar.conf", edit(CONF, 3, b"p"))
    b1.file("/etc/foo/deep/x", b"x2\n").file("/etc/app.conf", edit(CONF, 1, b"p"))
    u = upper_of(b0, "/etc/foo/bar.conf", "/etc/foo/deep/x", "/etc/app.conf")
    u.file("/etc/hostname", b"vm\n").dir("/var/mine")
    r = run(u, b0, b1)
    drops = [a.path for a in r.plan.actions if a.action == "drop"]
    # every drop below a directory comes before the directory's own drop
    assert drops == [
        "/etc/app.conf",
        "/etc/foo/bar.conf",
        "/etc/foo/deep/x",
        "/etc/foo/deep",
        "/etc/foo",
    ]
    assert r.action("/etc").action == "keep"  # still holds the local /etc/hostname
    assert r.action("/var/mine").action == "keep"  # empty but not emptied by this plan
    assert sorted(r.b1.gets) == ["/etc/foo", "/etc/foo/deep"]  # only the emptied dirs


def test_dir_with_changed_metadata_not_dropped() -> None:
    b0 = base().file("/etc/foo/bar.conf", CONF)
    b1 = b0.copy().file("/etc/foo/bar.conf", edit(CONF, 3, b"p"))
    u = upper_of(b0, "/etc/foo/bar.conf").dir("/etc/foo", mode=0o700)
    r = run(u, b0, b1)
    assert r.action("/etc/foo/bar.conf").action == "drop"
    assert r.action("/etc/foo").action == "keep"


def test_dir_deleted_by_base() -> None:
    b0 = base().file("/opt/old/a", b"a\n").file("/opt/gone/b", b"b\n")
    b1 = b0.copy().remove("/opt/old").remove("/opt/gone")
    u = upper_of(b0, "/opt/old/a").file("/opt/gone/mine", b"m\n")
    r = run(u, b0, b1)
    assert r.action("/opt/old/a").action == "drop"
    assert (r.action("/opt/old").case, r.action("/opt/old").action) == (8, "drop")
    gone = r.action("/opt/gone")
    assert (gone.case, gone.action) == (9, "conflict") and gone.paths == ("/opt/gone/mine",)
    assert r.action("/opt/gone/mine").action == "keep"


def test_dir_deleted_by_base_take_base_drops_subtree() -> None:
    b0 = base().file("/opt/gone/b", b"b\n")
    b1 = b0.copy().remove("/opt/gone")
    u = upper_of(b0).file("/opt/gone/mine", b"m\n").file("/opt/gone/sub/x", b"x\n")
    policy = parse_policy('[[rule]]\nglob = "/opt/gone"\naction = "take-base"\n')
    r = run(u, b0, b1, policy=policy)
    assert [a.path for a in r.plan.actions if a.action == "drop"] == [
        "/opt/gone/mine", "/opt/gone/sub/x", "/opt/gone/sub", "/opt/gone", "/opt",
    ]  # fmt: skip
    assert r.action("/opt").reason == "directory emptied by this reconcile"


def test_dir_metadata_three_way() -> None:
    b0 = base().file("/srv/d/f", b"f\n")
    b1 = b0.copy().dir("/srv/d", mode=0o750)
    u = upper_of(b0).file("/srv/d/mine", b"m\n")
    u.entries["/srv/d"] = Entry("/srv/d", DIR, mode=0o755, uid=1000)
    a = run(u, b0, b1).action("/srv/d")
    assert (a.case, a.action) == (13, "set-meta")
    assert a.entry is not None and (a.entry.mode, a.entry.uid) == (0o750, 1000)


def test_unmodified_copy_inside_opaque_dir_is_rewritten_not_dropped() -> None:
    b0 = base().file("/srv/www/index.html", b"old\n")
    b1 = b0.copy().file("/srv/www/index.html", b"v2\n")
    u = upper_of(b0, "/srv/www/index.html").dir("/srv/www", opaque=True)
    r = run(u, b0, b1, reads=True)
    a = r.action("/srv/www/index.html")
    assert (a.case, a.action, a.data) == (3, "write", b"v2\n")
    assert r.action("/srv/www").action == "keep"


def test_missing_sha256_compares_content() -> None:
    b0 = base()
    b1 = b0.copy().file("/etc/app.conf", edit(CONF, 2, b"patched"))
    u = upper_of(b0).file("/etc/app.conf", CONF, hashed=False)
    r = run(u, b0, b1, reads=True)
    assert (r.action("/etc/app.conf").case, r.action("/etc/app.conf").action) == (3, "drop")
    assert ("upper", "/etc/app.conf") in r.content.reads


def test_multi_generation_skip_is_one_delta() -> None:
    b0 = base()
    g3 = edit(edit(CONF, 1, b"g2"), 2, b"g3")  # B1 and B2 never reconciled: one delta B0->B3
    b3 = b0.copy().file("/etc/app.conf", g3)
    u = upper_of(b0).file("/etc/app.conf", edit(CONF, 10, b"vm"))
    a = run(u, b0, b3, reads=True).action("/etc/app.conf")
    assert (a.case, a.action) == (5, "write")
    assert a.data == edit(g3, 10, b"vm")


# -- the cost rule -----------------------------------------------------------------------
def test_cost_rule_no_base_walk_no_content_reads() -> None:
    """Every no-content case at once over a large base: the planner asks B1 only about U
    directories emptied by this plan, never walks a base, and reads no content."""
    b0 = base()
    for i in range(2000):
        b0.file(f"/usr/share/doc/pkg{i}/README", b"r%d\n" % i)
    b0.file("/srv/www/index.html", b"i\n").file("/opt/app/a", b"a\n").file("/etc/foo/x", b"x\n")
    b1 = b0.copy()
    for i in range(0, 2000, 3):
        b1.file(f"/usr/share/doc/pkg{i}/README", b"r%d v2\n" % i)  # case 1
    b1.file("/etc/motd", b"patched\n").file("/etc/app.conf", edit(CONF, 2, b"same"))
    b1.remove("/etc/hostname").file("/srv/www/new.html", b"n\n").file("/opt/app/b", b"b\n")
    b1.file("/etc/foo/x", b"x2\n").dir("/etc/foo", mode=0o750)
    b1.symlink("/lib/libx.so", "libx.so.2")
    u = upper_of(b0, "/etc/motd", "/etc/hostname", "/etc/foo/x", "/lib/libx.so")  # 3, 8, 3
    u.file("/etc/app.conf", edit(CONF, 2, b"same"))  # 4
    u.whiteout("/opt/app")  # 11
    u.dir("/srv/www", opaque=True)  # 16
    u.file("/root/.profile", b"p\n")  # 2
    r = run(u, b0, b1)  # reads=False: any content read fails the test
    got = {a.path: (a.case, a.action) for a in r.plan.actions if a.case != 16}
    assert got["/etc/motd"] == (3, "drop") and got["/etc/hostname"] == (8, "drop")
    assert got["/etc/app.conf"] == (4, "drop") and got["/opt/app"] == (11, "conflict")
    assert got["/lib/libx.so"] == (3, "drop") and got["/root/.profile"] == (2, "keep")
    assert got["/etc/foo"] == (3, "drop")
    assert any(a.case == 16 for a in r.plan.actions)
    assert r.b0.gets == [] and r.b0.children_calls == [] and r.b1.children_calls == []
    u_dirs = {p for p, e in u.entries.items() if e.kind == DIR}
    assert set(r.b1.gets) <= u_dirs and len(r.b1.gets) <= len(u_dirs)
    assert r.plan.unaffected >= 667


def test_plan_json_has_no_bytes() -> None:
    u, b0, b1 = overlap(["/etc/x.conf"])
    r = run(u, b0, b1, reads=True)
    data = r.plan.to_json()
    assert data["status"] == "conflict"
    actions = data["actions"]
    assert isinstance(actions, list) and actions[0]["path"] == "/etc/x.conf"
    assert actions[0]["artifacts"] == ["base-new", "base-old", "local", "merged"]
    assert all(a["action"] != "keep" for a in actions)


# -- structured mergers: the user databases (reconcile/structured.py, userdb.py) ------------
PW0 = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
GR0 = b"root:x:0:\nusers:x:100:\nnogroup:x:65534:\n"
SH0 = b"root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
SSHD = b"sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
DEPLOY = b"deploy:x:1000:1000::/home/deploy:/bin/bash\n"


def user_trees(uid: int) -> tuple[Tree, Tree, Tree]:
    """B0 with the three databases; B1 adds the system user sshd and the login user deploy
    (UID 1000); the VM adds alice with ``uid`` (and a group of that GID) and her home."""
    b0 = base().file("/etc/passwd", PW0).file("/etc/group", GR0)
    b0.file("/etc/shadow", SH0, mode=0o640, gid=42).file("/etc/passwd-", PW0)
    b1 = b0.copy().file("/etc/passwd", PW0 + SSHD + DEPLOY)
    b1.file("/etc/group", GR0 + b"deploy:x:1000:\n").file("/etc/passwd-", PW0 + SSHD)
    b1.file("/etc/shadow", SH0 + b"sshd:!:20000::::::\ndeploy:!:20000:0:99999:7:::\n",
            mode=0o640, gid=42)  # fmt: skip
    alice = b"alice:x:%d:%d::/home/alice:/bin/bash\n" % (uid, uid)
    u = upper_of(b0).file("/etc/passwd", PW0 + alice).file("/etc/passwd-", PW0 + b"#\n")
    u.file("/etc/group", GR0 + b"alice:x:%d:\n" % uid)
    u.file("/etc/shadow", SH0 + b"alice:!:20001:0:99999:7:::\n", mode=0o640, gid=42)
    u.dir("/home").dir("/home/alice", uid=uid).file("/home/alice/.bashrc", b"x\n", uid=uid)
    return u, b0, b1


def test_user_databases_merged_by_name_not_as_text() -> None:
    u, b0, b1 = user_trees(1001)
    r = run(u, b0, b1, reads=True)
    passwd = r.action("/etc/passwd")
    assert (passwd.case, passwd.action) == (5, "write"), passwd
    assert passwd.data == PW0 + SSHD + DEPLOY + b"alice:x:1001:1001::/home/alice:/bin/bash\n"
    assert "passwd merged by name: 2 entries from B1, 1 local" in passwd.reason
    assert not merge3(PW0, u.data["/etc/passwd"], b1.data["/etc/passwd"]).clean  # as text
    group = r.action("/etc/group")
    assert group.data == GR0 + b"deploy:x:1000:\nalice:x:1001:\n"
    shadow = r.action("/etc/shadow")
    assert (shadow.case, shadow.action) == (5, "write")
    assert shadow.data is not None and shadow.data.endswith(b"alice:!:20001:0:99999:7:::\n")
    assert shadow.entry is not None and (shadow.entry.mode, shadow.entry.gid) == (0o640, 42)
    backup = r.action("/etc/passwd-")  # the tools' backup: the VM's own stays
    assert (backup.case, backup.action) == (5, "keep") and "backup" in backup.reason
    assert r.plan.status == "changed"


def test_user_database_id_collision_is_a_conflict_with_a_proposal() -> None:
    u, b0, b1 = user_trees(1000)
    r = run(u, b0, b1, reads=True)
    passwd = r.action("/etc/passwd")
    assert (passwd.case, passwd.action) == (6, "conflict")
    # live while pending: B1's sshd and the VM's alice, not deploy (never two names, one UID)
    assert passwd.data == PW0 + SSHD + b"alice:x:1000:1000::/home/alice:/bin/bash\n"
    assert passwd.entry is not None and passwd.entry.sha256 == sha(passwd.data)
    assert "alice: uid 1000 is also deploy's in B1" in passwd.reason
    assert "proposal: alice uid 1000 → 1001" in passwd.reason
    assert set(passwd.artifacts) == {
        "merged", "proposal", "proposal-owners", "base-old", "base-new", "local",
    }  # fmt: skip
    proposal = passwd.artifacts["proposal"]
    assert proposal == PW0 + SSHD + DEPLOY + b"alice:x:1001:1001::/home/alice:/bin/bash\n"
    owners = json.loads(passwd.artifacts["proposal-owners"])
    assert [o["path"] for o in owners] == ["/home/alice", "/home/alice/.bashrc"]
    merged = passwd.artifacts["merged"]
    assert DEPLOY in merged and b"<<<<<<< local\nalice:x:1000:1000:" in merged
    group = r.action("/etc/group")
    assert group.action == "conflict" and "alice gid 1000 → 1001" in group.reason
    shadow = r.action("/etc/shadow")
    assert shadow.action == "conflict" and "follows /etc/passwd" in shadow.reason
    assert r.plan.status == "conflict"


def test_user_databases_obey_the_policy() -> None:
    u, b0, b1 = user_trees(1000)
    policy = parse_policy(
        '[[rule]]\nglob = "/etc/passwd"\naction = "keep-local"\n'
        '[[rule]]\nglob = "/etc/group"\naction = "take-base"\n'
        '[[rule]]\nglob = "/etc/shadow"\naction = "fail"\n'
        '[[rule]]\nglob = "/etc/passwd-"\naction = "take-base"\n'
    )
    r = run(u, b0, b1, policy=policy, reads=True)
    assert (r.action("/etc/passwd").case, r.action("/etc/passwd").action) == (6, "keep")
    assert "policy keep-local by rule 1" in r.action("/etc/passwd").reason
    assert r.action("/etc/group").action == "drop"
    assert r.action("/etc/shadow").action == "error"
    assert r.action("/etc/passwd-").action == "drop"


def test_user_database_with_nul_bytes_is_still_merged_by_name() -> None:
    u, b0, b1 = user_trees(1001)
    u.file("/etc/passwd", PW0 + b"odd\0name:x:1001:1001::/:/bin/sh\n")
    r = run(u, b0, b1, reads=True)
    a = r.action("/etc/passwd")
    assert (a.case, a.action) == (5, "write")  # not case 7 (binary)
    assert a.data == PW0 + SSHD + DEPLOY + b"odd\0name:x:1001:1001::/:/bin/sh\n"


def test_user_database_ranges_read_from_b1_login_defs() -> None:
    u, b0, b1 = user_trees(1000)
    for tree in (b0, b1):  # unchanged from B0 to B1: asked of B1's manifest only
        tree.file("/etc/login.defs", b"UID_MIN 1000\nUID_MAX 1001\n")
    b1.file("/etc/passwd", b1.data["/etc/passwd"] + b"taken:x:1001:1001::/:/bin/sh\n")
    r = run(u, b0, b1, reads=True)
    assert "no uid is free in 1000-1001" in r.action("/etc/passwd").reason
    assert "/etc/login.defs" in r.b1.gets and ("b1", "/etc/login.defs") in r.content.reads
    assert r.b0.gets == [] and r.b1.children_calls == []


def test_huge_user_database_is_never_read() -> None:
    """A guest's passwd claiming 64 MiB or more is case 7 (too large to merge), unread."""
    u, b0, b1 = user_trees(1001)
    entry = u.entries["/etc/passwd"]
    u.put(replace(entry, size=LARGE_FILE, sha256=None), u.data["/etc/passwd"])
    r = run(u, b0, b1, reads=True)
    a = r.action("/etc/passwd")
    assert (a.case, a.action) == (7, "conflict") and "too large" in a.reason
    assert ("upper", "/etc/passwd") not in r.content.reads
    # and the others of the unit stay the VM's with it (no shadow naming users passwd lacks)
    shadow = r.action("/etc/shadow")
    assert shadow.action == "conflict" and "follows /etc/passwd" in shadow.reason
