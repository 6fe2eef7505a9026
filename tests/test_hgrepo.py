"""The Mercurial wrapper on real repositories."""

from __future__ import annotations

import subprocess
from pathlib import Path

from unionimg import hgrepo

from .conftest import REPO

HG = str(REPO / ".venv" / "bin" / "hg")


def test_commit_after_an_interrupted_transaction(tmp_path: Path) -> None:
    """A commit cut short (host crash) leaves a journal: the next commit rolls it back and
    goes on, instead of failing forever with 'abandoned transaction found'."""
    root = tmp_path / "repo"
    hgrepo.init_repo(root)
    (root / "a").write_text("one\n")
    with hgrepo.open_repo(root) as repo:
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
    with hgrepo.open_repo(root) as repo:
        second = repo.commit_all("second")
        assert second is not None and second != first
        assert [c.desc for c in repo.log()] == ["second", "first"]
    subprocess.run([HG, "-R", str(root), "verify", "-q"], check=True)


def test_commit_paths_leaves_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    hgrepo.init_repo(root)
    (root / "d").mkdir()
    for name in ("x", "y"):
        (root / "d" / name).write_text("0\n")
    (root / "gone").write_text("0\n")
    with hgrepo.open_repo(root) as repo:
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
