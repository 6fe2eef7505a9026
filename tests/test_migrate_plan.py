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


def test_summary_by_place_same_path_or_elsewhere() -> None:
    """Each content found there is counted under its place (``base NAME/N``, ``layer L``,
    ``vm NAME``, ``cache``), at the same path as in the VM (the guest's path) or elsewhere."""
    shas = {n: f"{n:02x}" * 32 for n in range(1, 8)}
    entries = [
        d("upper"), d("upper/etc"), d(".hg"),
        f("upper/etc/a", 10, shas[1]),  # base os/1 at /etc/a: same path
        f("upper/etc/b", 20, shas[2]),  # base os/1 at /usr/b: elsewhere
        f("upper/etc/c", 30, shas[3]),  # vm peer at /upper/etc/c: the guest's /etc/c
        f("upper/etc/d", 40, shas[4]),  # vm peer at /upper/srv/d: elsewhere
        f("upper/etc/e", 50, shas[5]),  # layer L1 at /etc/e
        f(".hg/store", 60, shas[6]),  # cache: no paths
        f("upper/etc/new", 70, shas[7]),  # nowhere
    ]  # fmt: skip
    found = {
        shas[1]: "base os/1 /etc/a",
        shas[2]: "base os/1 /usr/b",
        shas[3]: "vm peer /upper/etc/c",
        shas[4]: "vm peer /upper/srv/d",
        shas[5]: "layer L1 /etc/e",
        shas[6]: "cache",
    }
    s = plan.summary(entries, found, {}, [], [])
    got = s.to_json()["found"]
    assert got == {
        "base os/1": {
            "reason": "base", "contents": 2, "bytes": 30,
            "same_path": {"contents": 1, "bytes": 10},
            "elsewhere": {"contents": 1, "bytes": 20},
        },
        "vm peer": {
            "reason": "vm", "contents": 2, "bytes": 70,
            "same_path": {"contents": 1, "bytes": 30},
            "elsewhere": {"contents": 1, "bytes": 40},
        },
        "layer L1": {
            "reason": "layer", "contents": 1, "bytes": 50,
            "same_path": {"contents": 1, "bytes": 50},
            "elsewhere": {"contents": 0, "bytes": 0},
        },
        "cache": {"reason": "cache", "contents": 1, "bytes": 60},
    }  # fmt: skip
    assert s.by_reason["new"] == {"contents": 1, "bytes": 70}
    # a layer offered by content: its paths are the guest's
    lt = [d("usr"), f("usr/b", 20, shas[2])]
    s = plan.summary([d("upper")], {shas[2]: "base os/1 /usr/b"}, {}, [], [], layer_entries=lt)
    assert s.by_place["base os/1"].same_path.contents == 1 and s.files == 1


@pytest.mark.parametrize(
    ("label", "place"),
    [
        ("cache", ("cache", None)),
        ("base os/1 /etc/a b", ("base os/1", "/etc/a b")),
        ("layer L12 /x", ("layer L12", "/x")),
        ("vm web /upper/etc/a", ("vm web", "/etc/a")),
        ("vm web /.hg/store", ("vm web", None)),
        ("base os/1", ("base os/1", None)),
    ],
)
def test_places(label: str, place: tuple[str, str | None]) -> None:
    assert plan.place_of(label) == place


def test_the_dry_run_says_why_per_place(capsys: pytest.CaptureFixture[str]) -> None:
    """The human output: per reason (``vm`` named as such), then per place, same path or
    elsewhere."""
    from unionimg.cli.migrate_cmd import _human

    entries = [d("upper"), f("upper/a", 10, "01" * 32), f("upper/b", 20, "02" * 32)]
    found = {"01" * 32: "vm peer /upper/a", "02" * 32: "base os/1 /usr/b"}
    summ = plan.summary(entries, found, {}, [], [])
    out = {
        "instance": "web", "host": "h1", "dry_run": True, "finished_earlier": False,
        "plan": summ.to_json(), "deltas": 0, "stream_bytes": 0, "seconds": 0.1,
        "receiver": None,
    }  # fmt: skip
    _human(out)
    text = capsys.readouterr().out
    assert "found in the upper layer of a stopped VM there" in text
    assert "in vm peer, same path" in text and "in base os/1, other paths" in text
    assert text.index("vm peer") > text.index("stopped VM")
