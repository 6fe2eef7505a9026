"""The pure side of a migration (no root, no files): the manifest rules a receiver applies
before it makes anything, the chain rules, ``--bandwidth`` and the summary of what is sent."""

from __future__ import annotations

import pytest

from unionimg.errors import UsageError
from unionimg.migrate import plan
from unionimg.store.migrate_records import ChainLayer, TreeEntry

SHA = "ab" * 32


def d(path: str) -> TreeEntry:
    return TreeEntry(path, "dir", 0o755, 0, 0, 1)


def f(path: str, size: int = 10, sha: str = SHA, **kw: object) -> TreeEntry:
    return TreeEntry(path, "file", 0o644, 0, 0, 1, size, sha, **kw)  # type: ignore[arg-type]


GOOD = [d("upper"), d("upper/etc"), f("upper/etc/a"), f("upper/etc/b", link="upper/etc/a")]


def test_a_good_manifest_and_its_total() -> None:
    assert plan.check_entries(GOOD, 100) == 10  # the hard link counts once
    acl = (("system.posix_acl_default", "02000000"), ("user.x", ""))
    assert plan.check_entries([d("var").replace(xattrs=acl)], 100) == 0


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([d("upper"), f("upper/../x")], "'..'"),
        ([d("upper"), f("/etc/passwd")], "relative"),
        ([d("upper"), f("upper/./x")], "'.'"),
        ([d("upper"), f("upper//x")], "empty"),
        ([d("upper"), f("upper/" + "x" * 256)], "255"),
        ([d("upper"), f("upper/a\0b")], "relative path"),
        ([f("upper/x")], "parent"),
        (
            [
                d("upper"),
                TreeEntry("upper/l", "symlink", 0o777, 0, 0, 1, target="/etc"),
                f("upper/l/passwd"),
            ],
            "parent",
        ),
        ([d("upper"), f("upper/x"), f("upper/x")], "twice"),
        ([d("upper"), f("upper/x", link="upper/nothing")], "hard link"),
        ([d("upper"), f("upper/x"), f("upper/y", sha="cd" * 32, link="upper/x")], "hard link"),
        ([d("upper"), f("upper/x", size=101)], "out of range"),
        ([d("upper"), f("upper/x", size=60), f("upper/y", size=60, sha="cd" * 32)], "U size"),
        ([d("upper"), f("upper/x", sha="xyz")], "sha256"),
        ([d("upper"), TreeEntry("upper/c", "chr", 0o600, 0, 0, 1)], "device number"),
        ([d("upper"), TreeEntry("upper/s", "symlink", 0o777, 0, 0, 1)], "target"),
        ([d("upper"), TreeEntry("upper/q", "door", 0o600, 0, 0, 1)], "unknown kind"),
        ([d("upper"), f("upper/x").replace(mode=0o10000)], "mode"),
        ([d("upper"), f("upper/x").replace(uid=1 << 32)], "owner"),
        (
            [d("upper"), f("upper/x").replace(xattrs=(("system.nfs4_acl", "00"),))],
            "not allowed",
        ),
        ([d("upper"), f("upper/x").replace(xattrs=(("user.a", "0g"),))], "hex"),
        ([d("upper"), d("upper/d").replace(size=5)], "size"),
    ],
)
def test_refused_manifests(entries: list[TreeEntry], why: str) -> None:
    with pytest.raises(plan.Refused) as exc:
        plan.check_entries(entries, 100)
    assert why in exc.value.message and exc.value.exit_code == 8


def test_chains() -> None:
    base = ChainLayer("sha256:" + "11" * 32, "base", None, 100, "os", 1)
    snap = ChainLayer("sha256:" + "22" * 32, "snapshot", base.diff_id, 10)
    assert plan.check_chain([snap, base]) == [snap, base]
    with pytest.raises(plan.Refused, match="does not lie"):
        plan.check_chain([snap.replace(parent=None), base])
    with pytest.raises(plan.Refused, match="no diff_id"):
        plan.check_chain([base.replace(diff_id="sha256:zz")])
    with pytest.raises(plan.Refused, match="empty"):
        plan.check_chain([])


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50mbit", 6_250_000),
        ("6M", 6_000_000),
        ("6MB/s", 6_000_000),
        ("800k", 800_000),
        ("2048", 2048),
        ("1.5gbit", 187_500_000),
    ],
)
def test_rates(text: str, rate: int) -> None:
    assert plan.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10", "-5M", "5 parsecs"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(UsageError):
        plan.parse_rate(text)


def test_summary_by_reason() -> None:
    entries = [*GOOD, f("upper/etc/c", 20, "cd" * 32), f("upper/etc/d", 30, "ef" * 32)]
    base = ChainLayer("sha256:" + "11" * 32, "base", None, 100, "os", 1)
    found = {SHA: "base os/1 /etc/a", "cd" * 32: "cache"}
    s = plan.summary(entries, found, {"ef" * 32: 7}, [base], [base.diff_id])
    assert s.files == 4 and s.contents == 3
    assert s.by_reason == {
        "base": {"contents": 1, "bytes": 10},
        "cache": {"contents": 1, "bytes": 20},
        "new": {"contents": 1, "bytes": 30},
    }
    assert s.send_bytes == 7 and s.layer_bytes == 100
    assert s.to_json()["bytes_sent"] == 107
