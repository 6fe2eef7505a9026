"""The Mercurial wrapper on real repositories."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from unionimg.entries import MAX_HG_PATH, hg_unfit
from unionimg.errors import GuestDataRefused
from unionimg.layers import history

from .conftest import REPO

HG = str(REPO / ".venv" / "bin" / "hg")


def test_commit_after_an_interrupted_transaction(tmp_path: Path) -> None:
    """A commit cut short (host crash) leaves a journal: the next commit rolls it back and
    goes on, instead of failing forever with 'abandoned transaction found'."""
    root = tmp_path / "repo"
    history.init_repo(root)
    (root / "a").write_text("one\n")
    with history.open_repo(root) as repo:
        first = repo.commit_all("first")
    assert first is not None
    # what a half-done transaction leaves: bytes appended to a revlog, and the journal
    # that says how long the file was before
    store = root / ".hg" / "store"
    index = store / "00changelog.i"
    size = index.stat().st_size
    with open(index, "ab") as fh:
        fh.write(b"\0" * 64)
    (store / "journal").write_bytes(b"00changelog.i\0" + str(size).encode() + b"\n")

    (root / "a").write_text("two\n")
    with history.open_repo(root) as repo:
        second = repo.commit_all("second")
        assert second is not None and second != first
        assert [c.desc for c in repo.log()] == ["second", "first"]
    subprocess.run([HG, "-R", str(root), "verify", "-q"], check=True)


def test_commit_paths_leaves_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    history.init_repo(root)
    (root / "d").mkdir()
    for name in ("x", "y"):
        (root / "d" / name).write_text("0\n")
    (root / "gone").write_text("0\n")
    with history.open_repo(root) as repo:
        repo.commit_all("first")
        (root / "d" / "x").write_text("1\n")
        (root / "d" / "y").write_text("1\n")
        (root / "gone").unlink()
        (root / "new dir").mkdir()
        (root / "new dir" / "é").write_text("1\n")
        # a path with nothing to commit (d/nothing) is fine; d/y is left out on purpose
        node = repo.commit_all("some", ["d/x", "gone", "new dir", "d/nothing"])
        assert node is not None
        left = repo.cmd("status").decode()
    assert left == "M d/y\n"


# -- a repository written by a guest ----------------------------------------------------------
def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    history.init_repo(root)
    (root / "a").write_text("one\n")
    with history.open_repo(root) as repo:
        repo.commit_all("first")
    return root


def test_init_makes_only_allowed_requirements(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    reqs = set((root / ".hg/requires").read_text().split())
    reqs |= set((root / ".hg/store/requires").read_text().split())
    assert "share-safe" in reqs and reqs <= history.ALLOWED_REQUIREMENTS
    history.check_repo(root, "vm")  # Mercurial's own files pass, wcache/checklink included


def test_repository_configuration_is_never_read(tmp_path: Path) -> None:
    """hooks, extensions and aliases in .hg/hgrc and an %include: inert for every command
    through unionimg's servers (and live for a plain hg, so the test can fail)."""
    root = _repo(tmp_path)
    canary = tmp_path / "canary"
    (root / ".hg/evil.py").write_text(
        f"open({str(canary)!r} + '-ext', 'w').close()\ndef hook(**kw):\n"
        f"    open({str(canary)!r} + '-py', 'w').close()\n"
    )
    (root / ".hg/inc.rc").write_text(f"[hooks]\npre-log.inc = touch {canary}-inc\n")
    (root / ".hg/hgrc").write_text(
        f"[hooks]\npre-commit = touch {canary}-pre\ncommit = touch {canary}-commit\n"
        f"pre-log = touch {canary}-log\npretxncommit = python:.hg/evil.py:hook\n"
        f"[extensions]\nevil = {root}/.hg/evil.py\n"
        f"[alias]\naddremove = !touch {canary}-alias\n%include inc.rc\n"
    )
    subprocess.run([HG, "--cwd", str(root), "log"], capture_output=True, check=False)
    assert list(tmp_path.glob("canary*")), "the hgrc should be live for plain hg"
    for p in tmp_path.glob("canary*"):
        p.unlink()
    (root / "upper").mkdir()
    (root / "upper/b").write_text("two\n")
    (root / "junk").write_text("at the root\n")
    with history.open_repo(root, guest="vm") as repo:
        assert repo.commit_all("second") is not None
        assert repo.commit_all("third", ["upper/b"]) is None
        repo.addremove()
        assert not repo.changed()  # the junk at the root is outside the scope
        assert len(repo.log()) == 2
    with history.open_repo(root) as repo:
        assert repo.commit_all("all") is not None
        assert [c.desc for c in repo.log()] == ["all", "second", "first"]
        assert repo.cmd("files").split() == [b"a", b"junk", b"upper/b"]
    assert not list(tmp_path.glob("canary*"))


def _refused(root: Path, *words: str) -> None:
    with pytest.raises(GuestDataRefused) as err:
        history.check_repo(root, "vm7")
    msg = err.value.message
    assert "instance 'vm7'" in msg and "\n" not in msg
    assert all(w in msg for w in words), msg
    with pytest.raises(GuestDataRefused), history.open_repo(root, guest="vm7"):
        pass


def test_shares_and_requirements_refused(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    other = tmp_path / "other"
    history.init_repo(other)
    (root / ".hg/sharedpath").write_text(str(other / ".hg"))
    _refused(root, "sharedpath")
    (root / ".hg/sharedpath").unlink()
    (root / ".hg/requires").write_text("share-safe\nrelshared\n")
    _refused(root, "requires", "relshared")
    (root / ".hg/requires").write_text("share-safe\n")
    for req in ("largefiles", "persistent-nodemap", "treemanifest"):
        saved = (root / ".hg/store/requires").read_text()
        (root / ".hg/store/requires").write_text(saved + req + "\n")
        _refused(root, req)
        (root / ".hg/store/requires").write_text(saved)
    (root / ".hg/requires").unlink()
    _refused(root, "requires", "missing")


def test_links_nodes_and_sparse_files_in_hg_refused(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    target = tmp_path / "host-file"
    target.write_text("host\n")
    journal = root / ".hg/store/journal"
    journal.symlink_to(target)
    _refused(root, "store/journal", "symlink")
    journal.unlink()
    os.mkfifo(root / ".hg/store/fifo")
    _refused(root, "fifo")
    (root / ".hg/store/fifo").unlink()
    with open(root / ".hg/dirstate", "ab") as fh:
        fh.truncate(8 << 30)
    _refused(root, "dirstate", "sparse")
    (root / ".hg/dirstate").unlink()
    shutil.rmtree(root / ".hg")
    (root / ".hg").symlink_to(tmp_path / "other-repo")
    _refused(root, "not a directory")
    assert target.read_text() == "host\n"


def test_transaction_files_naming_outside_paths_refused(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    for rel, data in (
        ("store/undo.backupfiles", b"2\nplain\0branch\0" + os.fsencode(victim) + b"\0\n"),
        ("store/undo.backupfiles", b"2\nstore\0../../../x\0undo.x\0\n"),
        ("store/journal.backupfiles", b"2\n\0" + os.fsencode(victim) + b"\0\0\n"),
        ("store/journal", b"../../etc/passwd\x000\n"),
        ("store/undo.backupfiles", b"2\nelsewhere\0a\0b\0\n"),
    ):
        saved = (root / ".hg" / rel).read_bytes() if (root / ".hg" / rel).exists() else None
        (root / ".hg" / rel).write_bytes(data)
        _refused(root, rel)
        if saved is None:
            (root / ".hg" / rel).unlink()
        else:
            (root / ".hg" / rel).write_bytes(saved)
    history.check_repo(root, "vm7")  # Mercurial's own transaction files pass
    assert victim.read_text() == "keep\n"


def test_u_hgignore_matches_what_hg_cannot_hold() -> None:
    """The fixed .hgignore patterns agree with entries.hg_unfit on names and depth."""
    pats = [re.compile(p.encode()) for p in history.U_HGIGNORE_EXTRA]

    def ignored(rel: bytes) -> bool:
        return any(p.search(rel) for p in pats)

    names = [
        b"plain",
        b"new\nline",
        b"cr\rx",
        b".hg",
        b".HG",
        b".Hg.",
        b".h\xe2\x80\x8cg",
        b"\xef\xbb\xbf.hg",
        b"hg~1",
        b"HG8B6C~12",
        b"hg~",
        b"hg~1a",
        b".hgx",
        b"x.hg",
        b".hgignore",
        b"caf\xc3\xa9",
        b"\xe9",
    ]
    for name in names:
        for rel in (b"upper/" + name, b"upper/" + name + b"/below", b"upper/d/" + name):
            leaf = rel.split(b"/")
            why = None
            for i in range(1, len(leaf)):
                why = why or hg_unfit(b"/".join(leaf[: i + 1]), leaf[i], "file", 0)
            assert ignored(rel) == (why is not None), (rel, why)
    deep = b"upper/" + b"d/" * 600
    for length in (MAX_HG_PATH - 1, MAX_HG_PATH, MAX_HG_PATH + 1):
        rel = deep[:length]
        assert ignored(rel) == (hg_unfit(rel, b"d", "dir", 0) is not None), length
