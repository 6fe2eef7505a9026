"""System accounts of both sides given one ID, renumbered by reconcile itself (issue 12).

``useradd --system`` counts down from 999 on the base and in each VM alike: a VM whose own
package made a system user ``foo`` (999) meets the base's new ``svcd`` (999). Every conflict
of passwd, group, shadow and gshadow being such a clash, the four files take their proposal
at once (svcd keeps 999, foo moves to the first free system ID) and the plan gives the VM's
files of the old ID the new one — as ``set-meta`` (a copy renamed over the staging tree's
entry, so the live layer's shared inode keeps its owner). A login account's clash, a file
that cannot be copied safely, or the policy's setting off leave it a conflict as before.
Pure but the last test (root: real chowns in a hardlink copy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.test_plan import Run, Tree, edit, run
from unionimg.entries import DIR, FILE, Entry
from unionimg.fs import fsops
from unionimg.reconcile.apply import _apply_action
from unionimg.reconcile.plan import CONFLICT, KEEP, SET_META, WRITE
from unionimg.reconcile.policy import parse_policy
from unionimg.reconcile.structured import (
    CONFLICT as STRUCTURED_CONFLICT,
)
from unionimg.reconcile.structured import (
    MERGED,
    MERGERS,
    RENUMBER_SYSTEM,
    MergeInput,
    StructuredResult,
    Versions,
)

PW0 = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
G0 = b"root:x:0:\nnogroup:x:65534:\n"
S0 = b"root:*:1::::::\nnobody:*:1::::::\n"
GS0 = b"root:*::\nnogroup:*::\n"
FOO = {  # the VM's own package's system user (useradd --system: 999) and its group
    "passwd": b"foo:x:999:999::/var/lib/foo:/usr/sbin/nologin\n",
    "group": b"foo:x:999:\n",
    "shadow": b"foo:!:19000::::::\n",
    "gshadow": b"foo:!::\n",
}
SVCD = {  # the base's new system user, the same IDs
    "passwd": b"svcd:x:999:999::/nonexistent:/usr/sbin/nologin\n",
    "group": b"svcd:x:999:\n",
    "shadow": b"svcd:!:19001::::::\n",
    "gshadow": b"svcd:!::\n",
}
OLD = {"passwd": PW0, "group": G0, "shadow": S0, "gshadow": GS0}
ALICE = {  # a login account
    "passwd": b"alice:x:1000:1000::/home/alice:/bin/bash\n",
    "group": b"alice:x:1000:\n",
    "shadow": b"alice:!:19000::::::\n",
    "gshadow": b"alice:!::\n",
}
DEPLOY = {
    "passwd": b"deploy:x:1000:1000::/home/deploy:/bin/bash\n",
    "group": b"deploy:x:1000:\n",
    "shadow": b"deploy:!:19001::::::\n",
    "gshadow": b"deploy:!::\n",
}
APP = b"".join(b"setting %d\n" % i for i in range(1, 9))


def unit(local: Mapping[str, bytes], new: Mapping[str, bytes]) -> dict[str, Versions]:
    """The four files: B0, B0 + the VM's additions, B0 + B1's additions."""
    out = {}
    for name, old in OLD.items():
        out[f"/etc/{name}"] = Versions(old, old + local[name], old + new[name])
    return out


def merge_all(
    files: Mapping[str, Versions], upper: list[Entry], *, renumber: bool = True
) -> dict[str, StructuredResult]:
    memo: dict[str, object] = {}

    def related(p: str) -> Versions:
        return files.get(p, Versions(None, None, None))

    return {
        p: MERGERS[p](MergeInput(p, files[p], related, lambda: upper, memo, renumber))
        for p in files
    }


def owned(path: str, uid: int, gid: int, kind: str = FILE, **kw: object) -> Entry:
    return Entry(path, kind, uid=uid, gid=gid, **kw)  # type: ignore[arg-type]


UPPER = [
    owned("/var/lib/foo", 999, 999, DIR),
    owned("/var/lib/foo/state", 999, 999, size=10),
    owned("/var/lib/foo/shared", 999, 0, size=10),  # only its uid is foo's
    owned("/etc/foo.conf", 0, 999, size=10),  # only its gid is foo's
    owned("/home/alice/x", 1000, 1000, size=1),
]


# -- the merger's choice ----------------------------------------------------------------------
def test_system_clash_takes_the_proposal_and_lists_the_files_to_chown() -> None:
    results = merge_all(unit(FOO, SVCD), UPPER)
    assert all(r.outcome == MERGED for r in results.values()), results
    passwd, group = results["/etc/passwd"], results["/etc/group"]
    # B1's svcd keeps 999; foo moves to the first free system ID (100), its primary group too
    assert passwd.data == PW0 + SVCD["passwd"] + b"foo:x:100:100::/var/lib/foo:/usr/sbin/nologin\n"
    assert group.data == G0 + SVCD["group"] + b"foo:x:100:\n"
    assert results["/etc/shadow"].data == S0 + SVCD["shadow"] + FOO["shadow"]
    assert results["/etc/gshadow"].data == GS0 + SVCD["gshadow"] + FOO["gshadow"]
    assert "foo uid 999 → 100" in passwd.reason and "foo gid 999 → 100" in passwd.reason
    assert "system accounts renumbered" in results["/etc/shadow"].reason
    assert [(o.path, o.field, o.old, o.new) for o in passwd.owners] == [
        ("/var/lib/foo", "uid", 999, 100),
        ("/var/lib/foo/shared", "uid", 999, 100),
        ("/var/lib/foo/state", "uid", 999, 100),
    ]
    assert [(o.path, o.field) for o in group.owners] == [
        ("/etc/foo.conf", "gid"),
        ("/var/lib/foo", "gid"),
        ("/var/lib/foo/state", "gid"),
    ]
    assert not results["/etc/shadow"].owners and not results["/etc/gshadow"].owners
    assert [r.renumbered for r in results.values()] == ["uid", "gid", "", ""]


def test_a_subuid_conflict_beside_keeps_the_base_users_the_unit_now_has() -> None:
    """subuid is no part of the unit: its overlap stays a conflict, but its live file no
    longer leaves out svcd (left out of the unit while a clash was pending, kept now)."""
    files = unit(
        {k: FOO[k] + ALICE[k].replace(b"1000", b"1001") for k in FOO},
        {k: SVCD[k] + DEPLOY[k] for k in SVCD},
    )
    files["/etc/subuid"] = Versions(
        b"", b"alice:100000:65536\n", b"svcd:300000:65536\ndeploy:100000:65536\n"
    )
    results = merge_all(files, UPPER)
    assert results["/etc/passwd"].outcome == MERGED
    sub = results["/etc/subuid"]
    assert sub.outcome == STRUCTURED_CONFLICT and "overlaps deploy's" in sub.reason
    assert sub.live == b"svcd:300000:65536\nalice:100000:65536\n"


def test_new_id_is_free_on_both_sides() -> None:
    local = dict(FOO, passwd=b"a:x:100:999::/:/bin/false\n" + FOO["passwd"])
    new = dict(SVCD, passwd=SVCD["passwd"] + b"b:x:101:999::/:/bin/false\n")
    passwd = merge_all(unit(local, new), UPPER)["/etc/passwd"]
    assert passwd.outcome == MERGED and b"\nfoo:x:102:100:" in passwd.data  # 100, 101 taken


def test_login_clash_stays_a_conflict() -> None:
    results = merge_all(unit(ALICE, DEPLOY), UPPER)
    assert all(r.outcome == STRUCTURED_CONFLICT for r in results.values())
    assert "not renumbered automatically" not in results["/etc/passwd"].reason


def test_system_and_login_clash_together_stay_conflicts_saying_why() -> None:
    local = {k: FOO[k] + ALICE[k] for k in FOO}
    new = {k: SVCD[k] + DEPLOY[k] for k in SVCD}
    passwd = merge_all(unit(local, new), UPPER)["/etc/passwd"]
    assert passwd.outcome == STRUCTURED_CONFLICT
    assert (
        "(system accounts not renumbered automatically: other entries of the user databases "
        "conflict too)" in passwd.reason
    )


def test_setting_off_leaves_the_clash_to_the_admin() -> None:
    results = merge_all(unit(FOO, SVCD), UPPER, renumber=False)
    assert all(r.outcome == STRUCTURED_CONFLICT for r in results.values())
    passwd = results["/etc/passwd"]
    assert f"the policy turns it off ({RENUMBER_SYSTEM})" in passwd.reason
    assert b"foo:x:100:100:" in passwd.artifacts["proposal"]  # resolve --take proposal


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (owned("/var/lib/foo/state", 999, 999, size=10, link="g1"), "hardlinked file"),
        (owned("/var/lib/foo/sock", 999, 999, "sock"), "sock node"),
        (owned("/var/lib/foo/db", 999, 999, size=64 << 20), "file of 64 MiB"),
    ],
)
def test_a_file_that_cannot_be_copied_safely_leaves_it_a_conflict(entry: Entry, why: str) -> None:
    upper = [e for e in UPPER if e.path != entry.path] + [entry]
    passwd = merge_all(unit(FOO, SVCD), upper)["/etc/passwd"]
    assert passwd.outcome == STRUCTURED_CONFLICT
    assert f"{entry.path} is a {why}" in passwd.reason


# -- the plan: the files chowned ----------------------------------------------------------------
def trees() -> tuple[Tree, Tree, Tree]:
    b0 = Tree()
    for name, old in OLD.items():
        b0.file(f"/etc/{name}", old)
    b0.file("/etc/app.conf", APP)
    b0.file("/etc/motd", b"hi\n", gid=999)  # B0 with a file of that GID (an odd base)
    b1 = b0.copy()
    for name, old in OLD.items():
        b1.file(f"/etc/{name}", old + SVCD[name])
    b1.put(Entry("/var/lib/svcd", DIR, uid=999, gid=999, mode=0o700))  # the base's files
    b1.file("/etc/app.conf", edit(APP, 3, b"setting 3 of B1"))
    b1.file("/etc/motd", b"hello\n", gid=999)
    u = Tree(upper=True)
    for name, old in OLD.items():
        u.file(f"/etc/{name}", old + FOO[name])
    u.put(Entry("/var/lib/foo", DIR, uid=999, gid=999, mode=0o750))
    u.file("/var/lib/foo/state", b"s\n", uid=999, gid=999)
    u.file("/etc/app.conf", edit(APP, 3, b"setting 3 of the VM"), uid=999)  # a conflict
    u.file("/etc/motd", b"VM's\n", gid=999)  # B1's motd has that GID too: left alone
    return b0, b1, u


def plan_of(**kw: object) -> Run:
    b0, b1, u = trees()
    return run(u, b0, b1, reads=True, **kw)  # type: ignore[arg-type]


def test_plan_gives_the_vms_files_the_new_ids_and_names_them() -> None:
    r = plan_of()
    passwd = r.action("/etc/passwd")
    assert (passwd.case, passwd.action) == (5, WRITE)
    assert "foo uid 999 → 100" in passwd.reason
    assert passwd.reason.endswith("; uid of 3 of the VM's files changed to match")
    assert r.action("/etc/group").reason.endswith("; gid of 2 of the VM's files changed to match")
    d = r.action("/var/lib/foo")
    assert d.action == SET_META and d.entry is not None and (d.entry.uid, d.entry.gid) == (100, 100)
    assert d.entry.mode == 0o750
    assert "owner uid 999 → 100: the VM's system account renumbered" in d.reason
    f = r.action("/var/lib/foo/state")
    assert f.action == SET_META and f.entry is not None and (f.entry.uid, f.entry.gid) == (100, 100)
    # a conflict: the VM's file stays live (no data), with its new owner
    c = r.action("/etc/app.conf")
    assert c.action == CONFLICT and c.data is None
    assert c.entry is not None and (c.entry.uid, c.entry.gid) == (100, 0)
    # B1's own file of that GID (and so the merged one) keeps it: svcd's group's
    m = r.action("/etc/motd")
    assert m.action == CONFLICT and m.entry is None  # left as it is
    assert [a.path for a in r.plan.conflicts] == ["/etc/app.conf", "/etc/motd"]
    # nothing else of the unit conflicts
    for name in ("passwd", "group", "shadow", "gshadow"):
        assert r.action(f"/etc/{name}").action == WRITE


def test_plan_names_the_renumbering_when_no_file_moves() -> None:
    b0, b1, u = trees()
    for path in ("/var/lib/foo/state", "/var/lib/foo", "/etc/app.conf", "/etc/motd"):
        u.remove(path)
    r = run(u, b0, b1, reads=True)
    passwd, group = r.action("/etc/passwd"), r.action("/etc/group")
    assert "foo uid 999 → 100" in passwd.reason
    assert passwd.reason.endswith("; uid of 0 of the VM's files changed to match")
    assert group.reason.endswith("; gid of 0 of the VM's files changed to match")
    assert r.plan.status == "changed" and not r.plan.conflicts
    assert "files changed to match" not in r.action("/etc/shadow").reason


@pytest.mark.parametrize("action", ["keep-local", "fail", "take-base"])
def test_policy_rule_turns_it_off(action: str) -> None:
    policy = parse_policy(f'[[rule]]\nglob = "{RENUMBER_SYSTEM}"\naction = "{action}"\n')
    r = plan_of(policy=policy)
    passwd = r.action("/etc/passwd")
    assert passwd.action == CONFLICT and "the policy turns it off" in passwd.reason
    assert r.action("/var/lib/foo").action == KEEP
    assert r.action("/var/lib/foo/state").action == KEEP


def test_a_narrower_rule_on_the_unit_turns_it_off_too() -> None:
    policy = parse_policy('[[rule]]\nglob = "/etc/gshadow"\naction = "keep-local"\n')
    r = plan_of(policy=policy)
    assert r.action("/etc/gshadow").action == KEEP
    assert r.action("/etc/passwd").action == CONFLICT
    assert r.action("/var/lib/foo").action == KEEP


# -- applied in a hardlink copy: the live layer's inodes keep their owner ----------------------
def test_chown_in_the_staging_copy_never_touches_the_live_inode(tmp_path: Path, root: None) -> None:
    live, staged = tmp_path / "upper", tmp_path / "upper.new"
    (live / "var/lib/foo").mkdir(parents=True)
    (live / "etc").mkdir()
    for rel, uid, gid in (("var/lib/foo", 999, 999), ("var/lib/foo/state", 999, 999),
                          ("etc/app.conf", 999, 0)):  # fmt: skip
        if not (live / rel).exists():
            (live / rel).write_bytes(b"x\n")
        os.chown(live / rel, uid, gid)
    fsops.link_copy(live, staged)
    before = {p: os.lstat(live / p) for p in ("var/lib/foo", "var/lib/foo/state", "etc/app.conf")}
    assert os.lstat(staged / "var/lib/foo/state").st_ino == before["var/lib/foo/state"].st_ino
    r = plan_of()
    for path in ("/var/lib/foo", "/var/lib/foo/state", "/etc/app.conf"):
        _apply_action(staged, r.action(path))
    for rel, want in (("var/lib/foo", (100, 100)), ("var/lib/foo/state", (100, 100)),
                      ("etc/app.conf", (100, 0))):  # fmt: skip
        st, old = os.lstat(staged / rel), os.lstat(live / rel)
        assert (st.st_uid, st.st_gid) == want, rel
        assert (old.st_uid, old.st_ino) == (999, before[rel].st_ino), rel  # live untouched
    assert (staged / "var/lib/foo/state").read_bytes() == b"x\n"
    assert os.lstat(staged / "var/lib/foo/state").st_ino != before["var/lib/foo/state"].st_ino
