"""Guest data Mercurial cannot hold never blocks commit, status, log or reconcile.

Each kind is written by the "guest" through the instance's mounted union (so the upper layer
is what overlayfs makes): a 2.5 GiB sparse file, file names holding a newline, a carriage
return or an escape sequence, 1000 nested directories, names Mercurial reserves. For each:
commit, status, log and reconcile succeed, the content is recorded in the sidecar by size
and digest and not in Mercurial, memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, UNIONIMG, Cli
from unionimg.entries import LARGE_FILE, MAX_HG_PATH
from unionimg.fs.manifest import DIGEST_BLOCK
from unionimg.layers.instance import u_layer
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")
HG_ENV = {**os.environ, "HGRCSKIPREPO": "1", "HGRCPATH": "", "HGPLAIN": "1"}
BIG = 5 << 29  # 2.5 GiB: past Mercurial's 2 GiB revlog limit
CONF = "".join(f"setting{i} = {i}\n" for i in range(20))


def base_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "etc/hostname").write_text("base\n")
    (root / "etc/app.conf").write_text(CONF)
    (root / "etc/blob.conf").write_text(CONF)
    return root


@pytest.fixture
def vm(cli: Cli, tmp_path: Path) -> Iterator[str]:
    """Base 'os' generation 1, instance vm1 on it, generation 2 changing two files."""
    g1 = base_tree(tmp_path / "g1")
    cli.ok("base", "create", "os", "--from-dir", str(g1))
    cli.ok("instance", "create", "vm1", "--base", "os")
    g2 = tmp_path / "g2"
    shutil.copytree(g1, g2)
    (g2 / "etc/app.conf").write_text(CONF.replace("setting3 = 3", "setting3 = three"))
    (g2 / "etc/blob.conf").write_text(CONF.replace("setting9 = 9", "setting9 = nine"))
    cli.ok("base", "update", "os", "--from-dir", str(g2))
    yield "vm1"


def as_guest(cli: Cli, tmp: Path, write: Callable[[Path], None]) -> None:
    """Let the 'guest' change its root file system: through the mounted union."""
    mnt = tmp / "guest"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", "vm1", str(mnt))
    try:
        write(mnt)
    finally:
        cli.ok("umount", str(mnt))


def in_u(cli: Cli) -> Any:
    return u_layer(Store(cli.store), "vm1", write=False)


def hg_files(u: Path) -> list[bytes]:
    out = subprocess.run(
        [HG, "--cwd", str(u), "files", "-0"], env=HG_ENV, capture_output=True, check=False
    ).stdout
    return [f for f in out.split(b"\0") if f]


def sidecar(u: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (u / ".unionimg/manifest.jsonl").read_text().splitlines()]
    return {r["path"]: r for r in rows}


def peak_rss_commit(cli: Cli, message: str) -> tuple[int, str]:
    """Peak resident memory (bytes) of ``unionimg commit`` run as its own process, with
    its Mercurial server; its output."""
    probe = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(p.stdout + p.stderr, end='')\n"
    )
    argv = [str(UNIONIMG), "--store", str(cli.store), "commit", "vm1", "-m", message]
    res = subprocess.run(
        [sys.executable, "-c", probe, *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    head, _, output = res.stdout.partition("\n")
    code, kib = head.split()
    assert code == "0", output
    return int(kib) * 1024, output


def expected_digest(size: int, blocks: dict[int, bytes]) -> str:
    """The sidecar digest computed here by its definition (sha256 over the size and each
    4 MiB block's sha256), for a sparse file whose only data is ``blocks`` (index: bytes,
    each a whole block)."""
    zero = hashlib.sha256(bytes(DIGEST_BLOCK)).digest()
    outer = hashlib.sha256(size.to_bytes(8, "big"))
    count = (size + DIGEST_BLOCK - 1) // DIGEST_BLOCK
    for i in range(count):
        length = min(DIGEST_BLOCK, size - i * DIGEST_BLOCK)
        if i in blocks:
            outer.update(hashlib.sha256(blocks[i][:length]).digest())
        else:
            outer.update(zero if length == DIGEST_BLOCK else hashlib.sha256(bytes(length)).digest())
    return "sha256-4m:" + outer.hexdigest()


def reconciled(cli: Cli, *args: str) -> dict[str, Any]:
    res = cli("reconcile", "vm1", "--json", *args)
    assert res.exit_code in (0, 1), res.output
    report: dict[str, Any] = json.loads(res.output)["instances"][0]
    assert report["status"] in ("clean", "conflicts") and report["error"] is None, report
    return report


# -- files of 2 GiB and more ---------------------------------------------------------------------
def test_large_sparse_file(cli: Cli, vm: str, tmp_path: Path) -> None:
    head, tail = b"H" * DIGEST_BLOCK, b"T" * DIGEST_BLOCK
    last = BIG // DIGEST_BLOCK - 1

    def write(m: Path) -> None:
        with open(m / "var/big.img", "wb") as fh:
            fh.write(head)
            fh.seek(last * DIGEST_BLOCK)
            fh.write(tail)
        assert os.stat(m / "var/big.img").st_size == BIG
        (m / "etc/hostname").write_text("vm1\n")

    as_guest(cli, tmp_path, write)
    rss, out = peak_rss_commit(cli, "with a 2.5 GiB sparse file")
    assert out.startswith("committed "), out
    assert rss < 300 << 20, f"commit took {rss >> 20} MiB"  # hg took 2.1 GB for 2 GiB
    with in_u(cli) as u:
        files = hg_files(u)
        assert b"upper/etc/hostname" in files and b"upper/var/big.img" not in files
        row = sidecar(u)["/var/big.img"]
        assert row["outside"] == "large" and row["size"] == BIG
        assert row["digest"] == expected_digest(BIG, {0: head, last: tail})

    status = json.loads(cli.ok("status", "vm1", "--json").output)
    assert "/var/big.img" in status["added"] and "/etc/hostname" in status["modified"]
    log = json.loads(cli.ok("log", "vm1", "--json").output)
    assert [c["message"] for c in log] == ["with a 2.5 GiB sparse file"]

    # the guest changes it: a new digest in the next commit
    def poke(m: Path) -> None:
        with open(m / "var/big.img", "r+b") as fh:
            fh.seek(7 * DIGEST_BLOCK)
            fh.write(b"x" * DIGEST_BLOCK)

    as_guest(cli, tmp_path, poke)
    assert cli.ok("commit", "vm1", "-m", "poked").output.startswith("committed ")
    with in_u(cli) as u:
        assert sidecar(u)["/var/big.img"]["digest"] == expected_digest(
            BIG, {0: head, 7: b"x" * DIGEST_BLOCK, last: tail}
        )

    report = reconciled(cli)
    assert report["status"] == "clean" and report["to_generation"] == 2
    with in_u(cli) as u:
        assert os.stat(u / "upper/var/big.img").st_size == BIG
        assert sidecar(u)["/var/big.img"]["outside"] == "large"


def test_file_grown_large_leaves_hg_and_large_conflict_is_not_read(
    cli: Cli, vm: str, tmp_path: Path
) -> None:
    """A file committed small, then grown past LARGE_FILE: Mercurial forgets it (the
    sidecar holds it). A large file at a path the base changed too: a conflict, decided
    without reading it whole."""

    def small(m: Path) -> None:
        (m / "etc/blob.conf").write_text("mine\n")

    as_guest(cli, tmp_path, small)
    cli.ok("commit", "vm1", "-m", "small")
    with in_u(cli) as u:
        assert b"upper/etc/blob.conf" in hg_files(u)

    def grow(m: Path) -> None:
        with open(m / "etc/blob.conf", "r+b") as fh:
            fh.truncate(LARGE_FILE + 1)

    as_guest(cli, tmp_path, grow)
    cli.ok("commit", "vm1", "-m", "grown")
    with in_u(cli) as u:
        assert b"upper/etc/blob.conf" not in hg_files(u)
        assert sidecar(u)["/etc/blob.conf"]["outside"] == "large"
    report = reconciled(cli)
    conflict = {c["path"]: c["reason"] for c in report["conflicts"]}
    assert "too large to merge" in conflict["/etc/blob.conf"]
    assert report["status"] == "conflicts"


# -- names Mercurial refuses -------------------------------------------------------------------
NASTY = {
    "/etc/new\nline": b"a newline in the name\n",
    "/etc/carriage\rreturn": b"a CR in the name\n",
    "/etc/dir\nname/inside": b"in a directory whose name holds a newline\n",
    "/etc/\x1b[31mred\x1b[0m": b"an escape sequence in the name\n",
    "/etc/latin1-" + os.fsdecode(b"\xe9"): b"not UTF-8\n",
}


def test_names_with_newline_cr_and_escapes(cli: Cli, vm: str, tmp_path: Path) -> None:
    def write(m: Path) -> None:
        for path, data in NASTY.items():
            p = m / path.lstrip("/")
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(data)

    as_guest(cli, tmp_path, write)
    assert cli.ok("commit", "vm1", "-m", "nasty names").output.startswith("committed ")
    with in_u(cli) as u:
        files = hg_files(u)
        side = sidecar(u)
    # Mercurial holds what it can (escape sequence, latin-1), the sidecar the rest
    assert b"upper/etc/\x1b[31mred\x1b[0m" in files and b"upper/etc/latin1-\xe9" in files
    assert not [f for f in files if b"\n" in f or b"\r" in f]
    for path in ("/etc/new\nline", "/etc/carriage\rreturn", "/etc/dir\nname/inside"):
        assert side[path]["outside"] == "name" and side[path]["digest"].startswith("sha256-4m:")
    assert side["/etc/dir\nname"]["outside"] == "name"

    # status: JSON as it is, the human listing one escaped line per path
    status = json.loads(cli.ok("status", "vm1", "--json").output)
    assert set(NASTY) | {"/etc/dir\nname"} <= set(status["added"])
    human = cli.ok("status", "vm1").output
    lines = human.splitlines()
    assert len(lines) == 1 + len(status["added"]) + len(status["modified"])
    assert "A /etc/new\\nline" in lines and "A /etc/carriage\\rreturn" in lines
    assert "A /etc/\\e[31mred\\e[0m" in lines and "A /etc/latin1-\\xe9" in lines
    assert "\x1b" not in human and "\r" not in human

    cli.ok("log", "vm1")
    report = reconciled(cli)
    assert report["status"] == "clean"
    with in_u(cli) as u:
        assert (u / "upper/etc/new\nline").read_bytes() == NASTY["/etc/new\nline"]
        log = subprocess.run(
            [HG, "-R", str(u), "log", "-T", "{desc}\n"], env=HG_ENV, capture_output=True
        ).stdout.decode()
    assert "reconcile vm1: base os generation 1 -> 2" in log


# -- very deep trees -----------------------------------------------------------------------------
def make_deep(top: Path, depth: int) -> None:
    """``depth`` nested directories below ``top`` with a file at the bottom and one at
    level 5, made by descriptors (the path is far longer than PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir(f"dir{i:04d}", dir_fd=fd)
            nfd = os.open(f"dir{i:04d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if i in (4, depth - 1):
                wfd = os.open(f"file{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(wfd, f"at depth {i}\n".encode())
                os.close(wfd)
    finally:
        os.close(fd)


def test_thousand_nested_directories(cli: Cli, vm: str, tmp_path: Path) -> None:
    as_guest(cli, tmp_path, lambda m: make_deep(m / "var", 1000))
    res = cli.ok("commit", "vm1", "-m", "deep")
    assert res.output.startswith("committed ")
    deep_file = "/var" + "".join(f"/dir{i:04d}" for i in range(1000)) + "/file999"
    with in_u(cli) as u:
        files = hg_files(u)
        side = sidecar(u)
    assert b"upper/var/dir0000/dir0001/dir0002/dir0003/dir0004/file4" in files
    assert max(len(f) for f in files) <= MAX_HG_PATH
    assert side[deep_file]["outside"] == "deep" and side[deep_file]["digest"].startswith(
        "sha256-4m:"
    )

    status = json.loads(cli.ok("status", "vm1", "--json").output)
    assert deep_file in status["added"]
    cli.ok("log", "vm1")
    report = reconciled(cli)
    assert report["status"] == "clean"
    # once more (upper.prev, the deep tree saved by the first, is removed by the second)
    g3 = tmp_path / "g3"
    shutil.copytree(tmp_path / "g2", g3)
    (g3 / "etc/hostname").write_text("generation 3\n")
    cli.ok("base", "update", "os", "--from-dir", str(g3))
    assert reconciled(cli)["to_generation"] == 3
    cli.ok("reconcile", "--undo", "vm1")
    status = json.loads(cli.ok("status", "vm1", "--json").output)
    assert status["generation"] == 2 and deep_file in status["added"]


# -- names Mercurial reserves ----------------------------------------------------------------------
def test_reserved_names_and_nested_repositories(cli: Cli, vm: str, tmp_path: Path) -> None:
    """A directory holding .hg (Mercurial would skip it whole as a nested repository), .HG
    and .h<ZWNJ>g (its path auditor aborts the commit on them)."""
    canary = tmp_path / "nested-hook-ran"

    def write(m: Path) -> None:
        app = m / "opt/app"
        (app / ".hg").mkdir(parents=True)
        (app / ".hg/hgrc").write_text(f"[hooks]\npre-commit = touch {canary}\n")
        (app / "main.py").write_text("print('app')\n")
        (m / "etc/.HG").write_text("upper case\n")
        (m / "etc/.h\u200cg").write_text("hfs-ignored code point\n")

    as_guest(cli, tmp_path, write)
    assert cli.ok("commit", "vm1", "-m", "reserved").output.startswith("committed ")
    with in_u(cli) as u:
        files = hg_files(u)
        side = sidecar(u)
    assert not [f for f in files if f.startswith(b"upper/opt")]
    assert side["/opt/app"]["outside"] == "repository"
    assert side["/opt/app/main.py"]["digest"].startswith("sha256-4m:")
    assert side["/etc/.HG"]["outside"] == side["/etc/.h\u200cg"]["outside"] == "reserved"
    assert not canary.exists()
    assert reconciled(cli)["status"] == "clean"
    assert json.loads(cli.ok("status", "vm1", "--json").output)["generation"] == 2


# -- what the admin reads ----------------------------------------------------------------------
def test_conflicts_reconcile_and_show_escape_guest_text(cli: Cli, tmp_path: Path) -> None:
    """A conflict at a path holding an escape sequence and a newline: the human reports of
    reconcile, conflicts and resolve print it escaped, one line each; JSON keeps it."""
    nasty = "/etc/\x1b[1mbold\nconf"
    g1 = base_tree(tmp_path / "g1")
    (g1 / nasty.lstrip("/")).write_text(CONF)
    cli.ok("base", "create", "os", "--from-dir", str(g1))
    cli.ok("instance", "create", "vm1", "--base", "os")

    def mine(m: Path) -> None:
        (m / nasty.lstrip("/")).write_text(CONF.replace("setting3 = 3", "mine"))

    as_guest(cli, tmp_path, mine)
    g2 = tmp_path / "g2"
    shutil.copytree(g1, g2)
    (g2 / nasty.lstrip("/")).write_text(CONF.replace("setting3 = 3", "theirs"))
    cli.ok("base", "update", "os", "--from-dir", str(g2))

    res = cli("reconcile", "vm1")
    assert res.exit_code == 1, res.output
    shown_path = "/etc/\\e[1mbold\\nconf"
    assert f"  conflict {shown_path}: text changed on both sides" in res.output
    assert "\x1b" not in res.output and len(res.output.splitlines()) == 2
    listing = cli.ok("conflicts", "vm1").output
    assert listing.startswith(shown_path + "\t") and "\x1b" not in listing
    assert len(listing.splitlines()) == 1
    assert json.loads(cli.ok("conflicts", "vm1", "--json").output)[0]["path"] == nasty
    out = cli.ok("resolve", "vm1", nasty, "--take", "local").output
    assert out == f"resolved {shown_path} in vm1: took local\n"

    mnt = tmp_path / "m\x1b]0;owned\x07"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt), "--readonly")
    try:
        show = cli.ok("instance", "show", "vm1").output
        assert "mounted_at: " + str(tmp_path) + "/m\\e]0;owned\\x07" in show
        assert "\x1b" not in show and "\x07" not in show
    finally:
        cli.ok("umount", str(mnt))
