"""User databases merged by name (unionimg.reconcile.userdb and its registry entry).

Every rule of the module docstring with small texts, then hostile input: a guest's passwd
can hold anything (NUL bytes, megabyte lines, missing fields, duplicate names) and the merge
must never crash, never lose a line, and say why it conflicts in one short line. All pure
but the last test (root): the chowns of ``resolve --take proposal`` on a real tree.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

import pytest

from unionimg.entries import DIR, FILE, WHITEOUT, Entry
from unionimg.reconcile import userdb
from unionimg.reconcile.proposal import apply_owner_changes
from unionimg.reconcile.structured import (
    CONFLICT,
    KEEP_LOCAL,
    MERGED,
    MERGERS,
    MergeInput,
    StructuredResult,
    Versions,
)
from unionimg.reconcile.userdb import GROUP, GSHADOW, PASSWD, SHADOW, SUBGID, SUBUID, merge, parse
from unionimg.store.reconcile_records import OwnerChange, OwnerChanges
from unionimg.store.records import RecordError

ROOT = b"root:x:0:0:root:/root:/bin/bash\n"
DAEMON = b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
NOBODY = b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
PW0 = ROOT + DAEMON + NOBODY
ALICE = b"alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
DEPLOY = b"deploy:x:1000:1000::/home/deploy:/bin/bash\n"
SSHD = b"sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"


def lines(data: bytes) -> list[bytes]:
    """Lines split on \\n only (\\r stays part of a line, as in the merge)."""
    out = data.split(b"\n")
    return out[:-1] if out and out[-1] == b"" else out


# -- parsing: nothing lost ----------------------------------------------------------------------
def test_parse_keeps_every_line_and_keys_duplicates() -> None:
    text = (
        b"# a comment\n\nroot:x:0:0::/root:/bin/sh\n+@netgroup::::::\n-baduser\n"
        b"odd line without colon\nroot:x:0:0:second root::\n  # indented comment:x\n"
        b"nul\0name:x:5:5::/:/bin/sh\n:x:7:7::/:\nlast:x:9:9::/:/bin/sh"
    )
    parsed = parse(text)
    assert [ln.raw for ln in parsed] == text.split(b"\n")
    entries = [ln for ln in parsed if ln.is_entry]
    assert [ln.name for ln in entries] == [b"root", b"root", b"nul\0name", b"last"]
    assert entries[0].key != entries[1].key  # a duplicate name is its second occurrence
    assert parse(None) == [] and parse(b"") == []


def test_crlf_and_missing_newline_kept() -> None:
    old = b"root:x:0:0::/root:/bin/sh\r\n"
    local = old + b"alice:x:1000:1000::/home/alice:/bin/sh\r\n"
    new = old + b"bob:x:1001:1001::/home/bob:/bin/sh"  # no final newline
    r = merge(PASSWD, old, local, new)
    assert r.clean
    assert lines(r.data) == [
        b"root:x:0:0::/root:/bin/sh\r",
        b"bob:x:1001:1001::/home/bob:/bin/sh",
        b"alice:x:1000:1000::/home/alice:/bin/sh\r",
    ]


# -- the rules by name --------------------------------------------------------------------------
def test_both_added_users_merge_in_b1_order_then_the_vms() -> None:
    local = PW0 + b"alice:x:1001:1001::/home/alice:/bin/bash\n"
    new = ROOT + SSHD + DAEMON + NOBODY + b"deploy:x:1000:1000::/home/deploy:/bin/bash\n"
    r = merge(PASSWD, PW0, local, new)
    assert r.clean, r.reason()
    assert r.data == new + b"alice:x:1001:1001::/home/alice:/bin/bash\n"
    assert "2 entries from B1, 1 local" in r.reason()
    assert merge(PASSWD, PW0, local, new).data == r.data  # deterministic


def test_one_side_changes_and_removals_take_that_side() -> None:
    local = PW0.replace(b"daemon:x:1:1:daemon:", b"daemon:x:1:1:Daemon (local):")
    new = ROOT + DAEMON  # B1 removes nobody
    r = merge(PASSWD, PW0, local, new)
    assert r.clean
    assert lines(r.data) == [
        ROOT.strip(),
        b"daemon:x:1:1:Daemon (local):/usr/sbin:/usr/sbin/nologin",
    ]
    r = merge(PASSWD, PW0, ROOT + NOBODY, PW0 + ALICE)  # the VM removed daemon
    assert r.clean and lines(r.data) == [ROOT.strip(), NOBODY.strip(), ALICE.strip()]
    assert "1 removed" in r.reason()
    assert merge(PASSWD, PW0, PW0, PW0 + ALICE).data == PW0 + ALICE  # unchanged VM


def test_same_name_changed_on_both_sides_merges_per_field() -> None:
    local = PW0.replace(b"daemon:x:1:1:daemon:/usr/sbin:", b"daemon:x:1:1:daemon:/srv/d:")
    new = PW0.replace(b":/usr/sbin/nologin\nnobody", b":/bin/false\nnobody")
    r = merge(PASSWD, PW0, local, new)
    assert r.clean
    assert b"daemon:x:1:1:daemon:/srv/d:/bin/false\n" in r.data
    assert "1 merged per field" in r.reason()


def test_same_field_changed_differently_is_a_conflict_with_both_shown() -> None:
    local = PW0.replace(b"daemon:x:1:1:daemon:/usr/sbin:", b"daemon:x:1:1:daemon:/srv/a:")
    new = PW0.replace(b"daemon:x:1:1:daemon:/usr/sbin:", b"daemon:x:1:1:daemon:/srv/b:")
    r = merge(PASSWD, PW0, local, new)
    assert not r.clean and r.proposal is None
    assert "daemon: changed differently on both sides: home" in r.reason()
    assert "edit 'merged'" in r.reason()
    block = (
        b"<<<<<<< local\ndaemon:x:1:1:daemon:/srv/a:/usr/sbin/nologin\n||||||| base\n"
        + DAEMON
        + b"=======\ndaemon:x:1:1:daemon:/srv/b:/usr/sbin/nologin\n>>>>>>> B1\n"
    )
    assert block in r.data
    assert ROOT in r.data and NOBODY in r.data


def test_removed_on_one_side_changed_on_the_other_conflicts() -> None:
    local = PW0.replace(b"daemon:x:1:1:daemon:", b"daemon:x:1:1:changed:")
    r = merge(PASSWD, PW0, local, ROOT + NOBODY)
    assert not r.clean and "daemon: removed in B1, changed locally" in r.reason()
    r = merge(PASSWD, PW0, ROOT + NOBODY, local)
    assert not r.clean and "daemon: removed locally, changed in B1" in r.reason()


def test_password_fields_never_shown() -> None:
    old = b"root:$6$old:19000:0:99999:7:::\n"
    local = b"root:$6$SECRETLOCAL:19001:0:99999:7:::\n"
    new = b"root:$6$SECRETBASE:19002:0:99999:7:::\n"
    r = merge(SHADOW, old, local, new)
    assert not r.clean
    assert "password" in r.reason() and "SECRET" not in r.reason()


def test_group_members_merge_as_sets() -> None:
    old = b"root:x:0:\nsudo:x:27:carol,dave\nusers:x:100:\n"
    local = b"root:x:0:\nsudo:x:27:carol,alice\nusers:x:100:alice\n"  # dave out, alice in
    new = b"root:x:0:\nsudo:x:27:carol,dave,deploy\nusers:x:100:\n"
    r = merge(GROUP, old, local, new)
    assert r.clean
    assert r.data == b"root:x:0:\nsudo:x:27:carol,deploy,alice\nusers:x:100:alice\n"


def test_gshadow_admins_and_members_merge_as_sets() -> None:
    old = b"sudo:*:adm1:carol\n"
    local = b"sudo:*:adm1,adm2:carol,alice\n"
    new = b"sudo:!:adm3:carol,deploy\n"  # B1 also changed the password field
    r = merge(GSHADOW, old, local, new)
    assert r.clean and r.data == b"sudo:!:adm3,adm2:carol,deploy,alice\n"


def test_both_added_the_same_group_members_united() -> None:
    r = merge(GROUP, b"", b"docker:x:999:alice\n", b"docker:x:999:deploy\n")
    assert r.clean and r.data == b"docker:x:999:deploy,alice\n"


# -- IDs ----------------------------------------------------------------------------------------
def upper_entries(*owned: tuple[str, int, int]) -> list[Entry]:
    return [Entry(p, DIR if p.endswith("/") else FILE, uid=u, gid=g) for p, u, g in owned]


def test_uid_given_to_two_names_proposes_renumbering_with_owner_changes() -> None:
    upper = upper_entries(("/home/alice", 1000, 1000), ("/home/alice/.profile", 1000, 1000),
                          ("/etc/passwd", 0, 0), ("/tmp/x", 1001, 5))  # fmt: skip
    upper.append(Entry("/gone", WHITEOUT, uid=1000))  # a whiteout is no file to chown
    new = PW0 + b"deploy:x:1000:1000::/home/deploy:/bin/bash\nuser1:x:1001:1001::/:/bin/sh\n"
    r = merge(PASSWD, PW0, PW0 + ALICE, new, upper=upper)
    assert not r.clean
    assert "alice: uid 1000 is also deploy's in B1" in r.reason()
    assert "proposal: alice uid 1000 → 1002" in r.reason()  # 1001 is taken
    assert "2 of the VM's files to chown" in r.reason()
    assert r.proposal == new + b"alice:x:1002:1000:Alice:/home/alice:/bin/bash\n"
    assert [(o.path, o.field, o.old, o.new) for o in r.owners] == [
        ("/home/alice", "uid", 1000, 1002),
        ("/home/alice/.profile", "uid", 1000, 1002),
    ]
    records = OwnerChanges.from_json(json.loads(r.owners_json()))  # what resolve reads
    first = records.items[0]
    assert (first.path, first.which, first.old, first.new) == ("/home/alice", "uid", 1000, 1002)
    assert json.loads(r.owners_json())[0] == {
        "path": "/home/alice", "field": "uid", "old": 1000, "new": 1002,
    }  # fmt: skip
    # the merged artefact shows both entries: B1's in place, the VM's against its proposal
    assert DEPLOY in r.data and b"<<<<<<< local\n" + ALICE in r.data
    assert b">>>>>>> proposal\n" in r.data


def test_system_collision_stays_in_the_system_range() -> None:
    local = PW0 + b"foo:x:998:998::/:/usr/sbin/nologin\n"
    new = PW0 + b"bar:x:998:998::/:/usr/sbin/nologin\nbaz:x:999:999::/:/sbin/nologin\n"
    r = merge(PASSWD, PW0, local, new)
    assert not r.clean
    # 999 is taken, the range ends there: wraps to the first free system UID (100)
    assert r.renumberings[0].new == 100 and r.renumberings[0].field == "uid"


def test_ranges_come_from_b1_login_defs_then_adduser_conf() -> None:
    defs = b"# comment\nUID_MIN\t\t 2000\nUID_MAX 3000\n#SYS_UID_MAX 500\nGID_MIN 5000\n"
    conf = b'FIRST_SYSTEM_UID=200\nLAST_SYSTEM_UID="400"\nFIRST_GID=7000\n'
    ranges = userdb.id_ranges(defs, conf)
    assert ranges.uid_login == (2000, 3000) and ranges.uid_system == (200, 400)
    assert ranges.gid_login == (5000, 60000)  # login.defs beats adduser.conf
    assert userdb.id_ranges(b"UID_MIN 9000\nUID_MAX 10\n").uid_login == (1000, 60000)
    assert userdb.id_ranges(b"UID_MIN 99999999999999\n").uid_login == (1000, 60000)
    local = PW0 + b"alice:x:2000:2000::/home/alice:/bin/bash\n"
    new = PW0 + b"deploy:x:2000:2000::/home/deploy:/bin/bash\n"
    r = merge(PASSWD, PW0, local, new, ranges=ranges)
    assert r.renumberings[0].new == 2001


def test_no_free_id_is_a_conflict_without_proposal() -> None:
    ranges = userdb.IdRanges(uid_login=(1000, 1001))
    local = PW0 + ALICE
    new = PW0 + DEPLOY + b"other:x:1001:1001::/:/bin/sh\n"
    r = merge(PASSWD, PW0, local, new, ranges=ranges)
    assert not r.clean and r.proposal is None
    assert "no uid is free in 1000-1001" in r.reason()


def test_duplicate_ids_within_one_side_are_not_ours() -> None:
    new = PW0 + b"toor:x:0:0::/root:/bin/sh\n"  # B1's own duplicate of UID 0
    local = PW0 + b"root2:x:0:0::/root:/bin/sh\n"  # and the VM's own
    r = merge(PASSWD, PW0, local, new)
    assert r.clean  # each side's own choice, nothing the merge made


def test_vm_changing_an_id_onto_a_new_base_user_conflicts() -> None:
    old = PW0 + ALICE
    local = old.replace(b"alice:x:1000:", b"alice:x:1005:")
    new = old + b"bob:x:1005:1005::/home/bob:/bin/sh\n"
    r = merge(PASSWD, old, local, new)
    assert not r.clean and "alice: uid 1005 is also bob's in B1" in r.reason()


def test_same_name_with_different_ids_proposes_b1s_id() -> None:
    local = PW0 + b"foo:x:105:110::/nonexistent:/usr/sbin/nologin\n"
    new = PW0 + b"foo:x:107:110::/nonexistent:/usr/sbin/nologin\n"
    upper = upper_entries(("/var/lib/foo", 105, 110), ("/etc/x", 0, 0))
    r = merge(PASSWD, PW0, local, new, upper=upper)
    assert not r.clean
    assert "foo: added differently on both sides: uid local 105 / B1 107" in r.reason()
    assert r.proposal == new
    assert [(o.path, o.old, o.new) for o in r.owners] == [("/var/lib/foo", 105, 107)]
    # not when another of the VM's names holds B1's ID
    taken = local + b"bar:x:107:107::/:/bin/sh\n"
    r = merge(PASSWD, PW0, taken, new, upper=upper)
    assert not r.clean and r.proposal is None and not r.owners


def test_group_collision_and_passwd_following_the_renumbered_group() -> None:
    g0 = b"root:x:0:\nusers:x:100:\n"
    gl = g0 + b"alice:x:1000:\n"
    gn = g0 + b"deploy:x:1000:\n"
    upper = upper_entries(("/home/alice", 1000, 1000))
    g = merge(GROUP, g0, gl, gn, upper=upper)
    assert not g.clean and g.renumberings[0].describe() == "alice gid 1000 → 1001"
    assert [(o.field, o.old, o.new) for o in g.owners] == [("gid", 1000, 1001)]
    moves = {r.old: r.new for r in g.renumberings}
    # passwd: alice's UID is free, but its primary group moves: passwd follows
    local = PW0 + b"alice:x:1005:1000::/home/alice:/bin/bash\n"
    new = PW0 + b"deploy:x:1000:1000::/home/deploy:/bin/bash\n"
    p = merge(PASSWD, PW0, local, new, upper=upper, gid_moves=moves)
    assert not p.clean and "follows group's renumbering: alice gid 1000 → 1001" in p.reason()
    assert p.proposal is not None
    assert p.proposal.endswith(b"alice:x:1005:1001::/home/alice:/bin/bash\n")
    assert b"deploy:x:1000:1000:" in p.proposal  # B1's user keeps its group
    assert p.data == new + local[len(PW0) :]  # merged: the clean merge, no markers needed
    # both colliding: one proposal line with both moves
    p = merge(PASSWD, PW0, PW0 + ALICE, new, upper=upper, gid_moves=moves)
    assert p.proposal is not None
    assert p.proposal.endswith(b"alice:x:1001:1001:Alice:/home/alice:/bin/bash\n")


def test_subuid_overlap_proposes_a_free_range() -> None:
    old = b"root:100000:65536\n"
    local = old + b"alice:165536:65536\n"
    new = old + b"deploy:165536:65536\nother:300000:1000\n"
    upper = upper_entries(
        ("/home/alice/c/rootfs", 165536, 165536),
        ("/home/alice/c/rootfs/etc", 165537, 165537),
        ("/x", 1000, 0),
    )
    r = merge(SUBUID, old, local, new, upper=upper)
    assert not r.clean
    assert "alice: range 165536+65536 overlaps deploy's in B1" in r.reason()
    assert r.proposal == new + b"alice:231072:65536\n"
    assert [(o.path, o.field, o.old, o.new) for o in r.owners] == [
        ("/home/alice/c/rootfs", "uid", 165536, 231072),
        ("/home/alice/c/rootfs/etc", "uid", 165537, 231073),
    ]
    g = merge(SUBGID, old, local, new, upper=upper)
    assert [(o.field, o.new) for o in g.owners] == [("gid", 231072), ("gid", 231073)]
    # no overlap: clean, both kept
    r = merge(SUBUID, old, old + b"alice:400000:65536\n", new)
    assert r.clean and r.data == new + b"alice:400000:65536\n"


def test_subuid_range_found_past_every_taken_range() -> None:
    ranges = userdb.IdRanges(subuid=(100000, 300000))
    local = b"alice:100000:65536\n"
    new = b"deploy:100000:65536\nx:165536:100000\n"
    r = merge(SUBUID, b"", local, new, ranges=ranges)
    assert r.proposal is None and "no free range of 65536 in 100000-300000" in r.reason()


# -- the registry: followers, backups ------------------------------------------------------------
def user_input(path: str, files: Mapping[str, Versions], upper: list[Entry]) -> MergeInput:
    def related(p: str) -> Versions:
        return files.get(p, Versions(None, None, None))

    return MergeInput(path, files[path], related, lambda: upper)


def test_registry_covers_the_six_files_and_keeps_backups_local() -> None:
    names = ("passwd", "group", "shadow", "gshadow", "subuid", "subgid")
    ours = {f"/etc/{n}" for n in names} | {f"/etc/{n}-" for n in names}
    assert ours <= set(MERGERS)  # other databases (debconf, dpkg) are registered too
    assert {p for p in MERGERS if p.startswith("/etc/")} == ours
    v = Versions(b"a\n", b"b\n", b"c\n")
    result = MERGERS["/etc/shadow-"](user_input("/etc/shadow-", {"/etc/shadow-": v}, []))
    assert result.outcome == KEEP_LOCAL and "backup" in result.reason


def colliding_files() -> dict[str, Versions]:
    return {
        "/etc/passwd": Versions(PW0, PW0 + ALICE, PW0 + SSHD + DEPLOY),
        "/etc/group": Versions(
            b"root:x:0:\n", b"root:x:0:\nalice:x:1000:\n", b"root:x:0:\ndeploy:x:1000:\n"
        ),
        "/etc/shadow": Versions(
            b"root:*:1::::::\n",
            b"root:*:1::::::\nalice:!:2::::::\n",
            b"root:*:1::::::\nsshd:!:3::::::\ndeploy:!:3::::::\n",
        ),
        "/etc/login.defs": Versions(None, None, b"UID_MIN 1000\nUID_MAX 1500\n"),
    }


def test_shadow_follows_passwd_and_passwd_takes_groups_moves() -> None:
    files = colliding_files()
    upper = upper_entries(("/home/alice", 1000, 1000))
    passwd = MERGERS["/etc/passwd"](user_input("/etc/passwd", files, upper))
    assert passwd.outcome == CONFLICT
    assert passwd.artifacts["proposal"].endswith(b"alice:x:1001:1001:Alice:/home/alice:/bin/bash\n")
    owners = json.loads(passwd.artifacts["proposal-owners"])
    assert owners == [{"path": "/home/alice", "field": "uid", "old": 1000, "new": 1001}]
    shadow = MERGERS["/etc/shadow"](user_input("/etc/shadow", files, upper))
    assert shadow.outcome == CONFLICT
    assert "follows /etc/passwd, /etc/group (in conflict): resolve them too" in shadow.reason
    expected = b"root:*:1::::::\nsshd:!:3::::::\ndeploy:!:3::::::\nalice:!:2::::::\n"
    assert shadow.data == expected and shadow.artifacts["proposal"] == expected
    # without the collision everything merges
    files["/etc/passwd"] = Versions(PW0, PW0 + ALICE, PW0 + SSHD)
    files["/etc/group"] = Versions(b"root:x:0:\n", b"root:x:0:\nalice:x:1000:\n", b"root:x:0:\n")
    shadow = MERGERS["/etc/shadow"](user_input("/etc/shadow", files, upper))
    assert shadow.outcome == MERGED and shadow.data == expected
    passwd = MERGERS["/etc/passwd"](user_input("/etc/passwd", files, upper))
    assert passwd.outcome == MERGED and passwd.data == PW0 + SSHD + ALICE


def test_shadow_entry_without_passwd_line_kept_as_is() -> None:
    files = {
        "/etc/passwd": Versions(PW0, PW0, PW0 + SSHD),
        "/etc/shadow": Versions(
            b"root:*:1::::::\n",
            b"root:*:1::::::\nghost:!:5::::::\n",
            b"root:*:1::::::\nsshd:!:3::::::\n",
        ),
    }
    result = MERGERS["/etc/shadow"](user_input("/etc/shadow", files, []))
    assert result.outcome == MERGED
    assert result.data == b"root:*:1::::::\nsshd:!:3::::::\nghost:!:5::::::\n"


# -- hostile input ------------------------------------------------------------------------------
def test_hostile_lines_never_crash_and_reasons_stay_short() -> None:
    huge = b"x" * (1 << 20)
    local = PW0 + huge + b":x:1000:1000::/:/bin/sh\n" + b"\0\0\0:\0:\n" + b"a:b\n" + b":::\n"
    local += b"dup:x:1000:1000::/:/bin/sh\ndup:x:1000:1000::/:/bin/sh\n\x1b[2J:x:1000:0::/:\n"
    local += b"neg:x:-1:0::/:\nbig:x:99999999999999999999:0::/:\nshort:x\n"
    new = PW0 + DEPLOY
    r = merge(PASSWD, PW0, local, new)
    assert not r.clean
    assert len(r.reason()) < 2000 and "\x1b" not in r.reason() and "\n" not in r.reason()
    assert "\\x1b" in r.reason() or "+" in r.reason()
    # never lose a line: every line of both sides is in the merged artefact and the proposal
    for line in [*lines(local), *lines(new)]:
        assert line in lines(r.data)
    assert r.proposal is not None and huge in r.proposal
    # every one of the VM's holders of UID 1000 moves to the same new UID (the VM's own
    # duplicates stay duplicates: not the merge's business); its files are listed once
    assert lines(r.proposal).count(b"dup:x:1001:1000::/:/bin/sh") == 2
    assert {x.new for x in r.renumberings} == {1001}
    assert len(r.renumberings) == 3  # the huge name, dup, the escape sequence


def test_proposals_are_bounded_for_a_flood_of_collisions() -> None:
    many = b"".join(b"u%d:x:%d:0::/:/bin/sh\n" % (i, 1000 + i) for i in range(3000))
    taken = b"".join(b"b%d:x:%d:0::/:/bin/sh\n" % (i, 1000 + i) for i in range(3000))
    upper = upper_entries(*((f"/f{i}", 1000 + i, 0) for i in range(3000)))
    r = merge(PASSWD, PW0, PW0 + many, PW0 + taken, upper=upper)
    assert not r.clean and len(r.conflicts) == 3000
    assert len(r.renumberings) == 256 and len(r.owners) == 256 and r.proposal is None
    assert "too many conflicts to propose more" in r.conflicts[-1].why


@pytest.mark.parametrize("fmt", [PASSWD, GROUP, SHADOW, GSHADOW, SUBUID, SUBGID])
def test_random_garbage_never_crashes_and_keeps_lines(fmt: userdb.Format) -> None:
    rng = random.Random(f"userdb-{fmt.name}")
    alphabet = [b"a", b"b", b":", b",", b"\0", b"1", b"0", b"#", b"+", b" ", b"\r", b"\xff"]

    def garbage() -> bytes:
        return b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))

    for _ in range(300):
        common = [garbage() for _ in range(rng.randint(0, 6))]
        mine = [garbage() for _ in range(rng.randint(0, 4))]
        theirs = [garbage() for _ in range(rng.randint(0, 4))]
        old = b"".join(x + b"\n" for x in common)
        local = old + b"".join(x + b"\n" for x in mine)
        new = old + b"".join(x + b"\n" for x in theirs)
        r = merge(fmt, old, local, new, upper=upper_entries(("/a", 1000, 1000)))
        assert isinstance(r.reason(), str) and "\n" not in r.reason()
        out = lines(r.data)
        names = {ln.name for ln in parse(r.data) if ln.is_entry}
        for line in common:  # kept by both sides: always there, as it was
            assert line in out
        for line in [*mine, *theirs]:  # there, or its name merged per field
            assert not line or line in out or parse(line)[0].name in names
        assert merge(fmt, old, old, new).data == new  # an unchanged VM takes B1 as it is
        assert merge(fmt, old, local, old).data == local  # an unchanged base keeps the VM's


def test_merger_output_is_a_structured_result() -> None:
    files = colliding_files()
    result = MERGERS["/etc/group"](user_input("/etc/group", files, []))
    assert isinstance(result, StructuredResult) and result.outcome == CONFLICT
    assert "alice: gid 1000 is also deploy's in B1" in result.reason


def test_owner_changes_record_refuses_what_resolve_must_not_apply() -> None:
    for bad in (
        [{"path": "/x", "field": "mode", "old": 1, "new": 2}],
        [{"path": "/x", "field": "uid", "old": -1, "new": 2}],
        [{"path": "/x", "field": "uid", "old": 1, "new": 2**32 - 1}],
        [{"path": "/x", "field": "uid", "old": 1}],
        {"path": "/x"},
    ):
        with pytest.raises(RecordError):
            OwnerChanges.from_json(bad)


def test_proposal_owners_applied_only_beneath_u_and_only_from_the_old_owner(
    tmp_path: Path, root: None
) -> None:
    """resolve --take proposal's chowns: a symlink the guest planted on a listed path is not
    followed (the host's file keeps its owner), a file whose owner changed since is skipped."""
    upper, aside, outside = tmp_path / "upper", tmp_path / "aside", tmp_path / "outside"
    for d in (upper / "home/alice", aside, outside):
        d.mkdir(parents=True)
    (upper / "home/alice/notes").write_text("x")
    os.chown(upper / "home/alice/notes", 1000, 1000)
    os.chown(upper / "home/alice", 1000, 1000)
    (upper / "home/alice/other").write_text("y")
    os.chown(upper / "home/alice/other", 5, 5)  # changed since the reconcile
    (outside / "host-file").write_text("z")
    os.chown(outside / "host-file", 1000, 1000)
    (upper / "escape").symlink_to(outside)
    changes = [
        OwnerChange(p, "uid", 1000, 1001)
        for p in ("/home/alice", "/home/alice/notes", "/home/alice/other", "/escape/host-file")
    ]
    (aside / "proposal-owners").write_text(json.dumps(OwnerChanges(tuple(changes)).to_json()))
    done = apply_owner_changes(upper, aside)
    assert (done.changed, done.skipped) == (2, 2)
    assert (upper / "home/alice").stat().st_uid == 1001
    assert (upper / "home/alice/notes").stat().st_uid == 1001
    assert (upper / "home/alice/notes").stat().st_gid == 1000  # only the uid moves
    assert (upper / "home/alice/other").stat().st_uid == 5
    assert (outside / "host-file").stat().st_uid == 1000
    assert done.describe() == "2 file(s) chowned, 2 skipped (changed since)"


def test_passwd_group_shadow_gshadow_conflict_together() -> None:
    """A conflict in one of the four keeps all four the VM's: B1's new user deploy names
    group 1000, which only B1's /etc/group has (pwck would say "no group 1000")."""
    files = {
        "/etc/passwd": Versions(
            PW0, PW0 + b"alice:x:1001:1001::/home/alice:/bin/sh\n", PW0 + DEPLOY
        ),
        "/etc/group": Versions(
            b"root:x:0:\nstaff:x:50:\n",
            b"root:x:0:\nstaff:y:50:\nalice:x:1001:\n",  # the VM changed staff's password field
            b"root:x:0:\nstaff:z:50:\ndeploy:x:1000:\n",  # and so did B1, differently
        ),
    }
    group = MERGERS["/etc/group"](user_input("/etc/group", files, []))
    assert group.outcome == CONFLICT and "staff: changed differently" in group.reason
    passwd = MERGERS["/etc/passwd"](user_input("/etc/passwd", files, []))
    assert passwd.outcome == CONFLICT
    assert passwd.reason.startswith("follows /etc/group (in conflict): resolve it too")
    assert (
        passwd.artifacts["proposal"] == PW0 + DEPLOY + b"alice:x:1001:1001::/home/alice:/bin/sh\n"
    )
    for path in ("/etc/subuid", "/etc/subgid"):  # not part of the unit
        files[path] = Versions(b"", b"alice:100000:65536\n", b"")
        assert MERGERS[path](user_input(path, files, [])).outcome == MERGED


# -- the live files while a user-database conflict is pending ----------------------------------
G0 = b"root:x:0:\ndaemon:x:1:\nsudo:x:27:\nnogroup:x:65534:\n"
GS0 = b"root:*::\ndaemon:*::\nsudo:*::\nnogroup:*::\n"
S0 = b"root:*:1::::::\ndaemon:*:1::::::\nnobody:*:1::::::\n"


def clash_unit() -> dict[str, Versions]:
    """Base and VM both gave UID/GID 1000 to another name (VM: alice, B1: deploy); B1 also
    added the system user sshd (group nogroup) and the system group _ssh, and made deploy a
    member of sudo."""
    g0, gs0, s0 = G0, GS0, S0
    return {
        "/etc/passwd": Versions(PW0, PW0 + ALICE, PW0 + SSHD + DEPLOY),
        "/etc/group": Versions(
            g0,
            g0.replace(b"sudo:x:27:", b"sudo:x:27:alice") + b"alice:x:1000:\n",
            g0.replace(b"sudo:x:27:", b"sudo:x:27:deploy") + b"_ssh:x:101:\ndeploy:x:1000:\n",
        ),
        "/etc/shadow": Versions(
            s0, s0 + b"alice:!:2::::::\n", s0 + b"sshd:!:3::::::\ndeploy:!:3::::::\n"
        ),
        "/etc/gshadow": Versions(
            gs0,
            gs0.replace(b"sudo:*::", b"sudo:*::alice") + b"alice:!::\n",
            gs0.replace(b"sudo:*::", b"sudo:*:deploy:deploy") + b"_ssh:!::\ndeploy:!::\n",
        ),
        "/etc/subuid": Versions(b"", b"alice:100000:65536\n", b"deploy:100000:65536\n"),
        "/etc/subgid": Versions(b"", b"alice:100000:65536\n", b"deploy:100000:65536\n"),
    }


def entries_of(data: bytes) -> dict[str, list[str]]:
    return {ln.split(":")[0]: ln.split(":") for ln in data.decode().splitlines()}


def pwck_like(files: Mapping[str, bytes]) -> list[str]:
    """What pwck -r / grpck -r would find in a set of the four files (and subuid/subgid
    ranges): duplicate names or IDs, a user's missing primary group, shadow/gshadow lines
    without their passwd/group entry and the reverse, members that are no user."""
    found: list[str] = []
    pw, gr = entries_of(files["passwd"]), entries_of(files["group"])
    sh, gs = entries_of(files["shadow"]), entries_of(files["gshadow"])
    for what, table, idf in (("uid", pw, 2), ("gid", gr, 2)):
        ids = [f[idf] for f in table.values()]
        found += [f"duplicate {what} {i}" for i in set(ids) if ids.count(i) > 1]
    gids = {f[2] for f in gr.values()}
    found += [f"user {n}: no group {f[3]}" for n, f in pw.items() if f[3] not in gids]
    found += [f"shadow {n}: no user" for n in sh.keys() - pw.keys()]
    found += [f"user {n}: no shadow" for n in pw.keys() - sh.keys()]
    found += [f"gshadow {n}: no group" for n in gs.keys() - gr.keys()]
    found += [f"group {n}: no gshadow" for n in gr.keys() - gs.keys()]
    for n, f in gr.items():
        found += [f"group {n}: no user {m}" for m in f[3].split(",") if m and m not in pw]
    for n, f in gs.items():
        for m in f[2].split(",") + f[3].split(","):
            if m and m not in pw:
                found.append(f"gshadow {n}: no user {m}")
    for sub in ("subuid", "subgid"):
        spans = sorted((int(f[1]), int(f[1]) + int(f[2])) for f in entries_of(files[sub]).values())
        found += [f"{sub} overlap" for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    return found


def test_uid_clash_live_files_hold_both_sides_but_the_clashing_base_entry() -> None:
    files = clash_unit()
    upper = upper_entries(("/home/alice", 1000, 1000))
    results = {p: MERGERS[p](user_input(p, files, upper)) for p in files}
    assert all(r.outcome == CONFLICT for r in results.values()), results
    live = {p.rsplit("/", 1)[1]: r.live for p, r in results.items()}
    assert all(v is not None for v in live.values()), live
    got = {k: v for k, v in live.items() if v is not None}
    pw, gr = entries_of(got["passwd"]), entries_of(got["group"])
    assert got["passwd"] == PW0 + SSHD + ALICE  # the base's sshd, the VM's alice, no deploy
    assert pw["alice"][2:4] == ["1000", "1000"] and "deploy" not in pw
    assert got["shadow"].splitlines()[-2:] == [b"sshd:!:3::::::", b"alice:!:2::::::"]
    assert set(gr) == {"root", "daemon", "sudo", "nogroup", "_ssh", "alice"}
    assert gr["sudo"][3] == "alice"  # deploy's membership dropped, the VM's kept
    assert b"sudo:*::alice\n" in got["gshadow"] and b"deploy" not in got["gshadow"]
    assert b"deploy" not in b"".join(got.values())
    assert got["subuid"] == got["subgid"] == b"alice:100000:65536\n"
    assert pwck_like(got) == []
    # the four agree: every user of passwd in shadow, every group in gshadow, and back
    assert entries_of(got["shadow"]).keys() == pw.keys()
    assert entries_of(got["gshadow"]).keys() == gr.keys()
    # the conflict and its artefacts are as before: the proposal renumbers alice
    prop = results["/etc/passwd"].artifacts["proposal"]
    assert b"alice:x:1001:1001:" in prop and DEPLOY in prop
    assert json.loads(results["/etc/passwd"].artifacts["proposal-owners"])[0]["new"] == 1001


def test_live_leaves_out_base_users_of_a_left_out_group_and_a_left_out_users_group() -> None:
    """B1's system user svc has B1's new group 1000 (clashing with the VM's alice group) as
    primary group: svc goes too (else it would own files as the VM's group); B1's deploy,
    left out for its UID, takes its own group deploy (GID 1001, no clash) with it."""
    files = {
        "/etc/passwd": Versions(
            PW0,
            PW0 + ALICE,
            PW0 + b"svc:x:998:1000::/:/bin/false\ndeploy:x:1000:1001::/home/deploy:/bin/sh\n",
        ),
        "/etc/group": Versions(G0, G0 + b"alice:x:1000:\n", G0 + b"svc:x:1000:\ndeploy:x:1001:\n"),
        "/etc/shadow": Versions(
            S0, S0 + b"alice:!:2::::::\n", S0 + b"svc:!:3::::::\ndeploy:!:3::::::\n"
        ),
        "/etc/gshadow": Versions(GS0, GS0 + b"alice:!::\n", GS0 + b"svc:!::\ndeploy:!::\n"),
    }
    live = {p.rsplit("/", 1)[1]: MERGERS[p](user_input(p, files, [])).live for p in files}
    assert live["passwd"] == files["/etc/passwd"].local  # nothing of B1's fits (the
    # planner then leaves the VM's file as it is)
    results = {p: MERGERS[p](user_input(p, files, [])) for p in files}
    assert all(r.outcome == CONFLICT for r in results.values())
    got = {k: v if v is not None else files[f"/etc/{k}"].local for k, v in live.items()}
    got.update(subuid=b"", subgid=b"")
    assert pwck_like({k: v or b"" for k, v in got.items()}) == []
    assert b"svc" not in b"".join(v or b"" for v in got.values())
    assert b"deploy" not in b"".join(v or b"" for v in got.values())


def test_live_is_none_when_it_is_the_vms_own_file_or_a_file_is_too_large() -> None:
    files = clash_unit()
    files["/etc/shadow"] = Versions(None, None, None, too_large=True)
    result = MERGERS["/etc/passwd"](user_input("/etc/passwd", files, []))
    assert result.outcome == CONFLICT and result.live is None
