"""Mercurial history on the layers, driven through python-hglib (one command server per use).

* A base's history is a normal repository (``bases/NAME/history``) whose working copy stays
  empty; a generation is committed from its staging tree through a *share* of that
  repository, so the tree is never copied.
* An instance's history lives at the root of its U image (``.hg`` next to ``upper/`` and
  ``work/``), so it travels with the image; ``work/`` is ignored.

Both commit a sidecar ``.unionimg/manifest.jsonl`` (see :func:`manifest.sidecar_text`) with
what Mercurial cannot hold. Plain ``hg log``/``hg diff`` work on both for an admin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hglib
import hglib.error

from .errors import ToolFailed

USER = "unionimg <unionimg@localhost>"
_MAX_PATHS = 2000  # past this, a full walk of the working copy is cheaper than the patterns
SIDECAR_DIR = ".unionimg"
SIDECAR = f"{SIDECAR_DIR}/manifest.jsonl"
_CONFIGS = [
    "extensions.share=",
    "extensions.strip=",
    "ui.merge=internal:fail",
    "ui.interactive=false",
    "ui.username=" + USER,
    # read the branch cache instead of mmapping it: a mapping held by the long-lived command
    # server would pin every U filesystem it touched (umount: target is busy)
    "storage.revbranchcache.mmap=no",
    # unionimg never reads "created new head"; computing it loads the branch map per commit
    "commands.commit.report-head-changes=false",
]


def _hg_binary() -> str:
    """The venv's hg (next to our interpreter) unless ``HGPATH`` says otherwise."""
    env = os.environ.get("HGPATH")
    if env:
        return env
    candidate = Path(sys.executable).parent / "hg"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("hg")
    if found is None:
        from .errors import MissingCapability

        raise MissingCapability("Mercurial (hg) is not installed; run make setup")
    return found


def _b(*args: str | bytes) -> list[bytes]:
    return [a if isinstance(a, bytes) else os.fsencode(a) for a in args]


@dataclass(frozen=True)
class Changeset:
    rev: int
    node: str
    date: str
    desc: str
    files: int

    def to_json(self) -> dict[str, Any]:
        return {
            "rev": self.rev,
            "node": self.node,
            "date": self.date,
            "message": self.desc,
            "files": self.files,
        }


class _Abandoned(Exception):
    """The repository holds the journal of an interrupted transaction."""


class Repo:
    """A thin, typed wrapper over an hglib client, bound to one repository.

    Every command names its repository (``-R ROOT --cwd ROOT``), so one command server can
    serve many repositories: reconcile runs one server per worker for a whole fleet instead
    of paying Mercurial's start-up (~0.4 s) per instance.
    """

    def __init__(self, client: Any, root: Path) -> None:
        self._c = client
        self.root = root

    def cmd(self, *args: str | bytes) -> bytes:
        try:
            out: bytes = self._c.rawcommand(
                _b("-R", str(self.root), "--cwd", str(self.root), *args)
            )
        except hglib.error.CommandError as exc:
            err = (exc.err or exc.out or b"").decode(errors="replace").strip().splitlines()
            raise ToolFailed(
                f"hg {os.fsdecode(_b(*args)[0])} failed in {self.root}: "
                f"{err[-1] if err else exc.ret}"
            ) from exc
        return out

    def tip(self) -> str | None:
        node = self.cmd("log", "-r", "tip", "-T", "{node}").decode().strip()
        return None if not node or set(node) == {"0"} else node

    def commit_all(self, message: str, paths: Sequence[str] | None = None) -> str | None:
        """addremove + commit in one Mercurial command; the new node, or None when nothing
        changed. With ``paths`` (relative to the root; a directory stands for everything
        below it) only those are looked at: the caller knows nothing else changed, and
        Mercurial is spared comparing every file of the working copy."""
        pats: list[bytes] = []
        for path in paths if paths is not None and len(paths) <= _MAX_PATHS else ():
            pats += [b"-I", b"path:" + os.fsencode(path)]  # -I: no abort on unchanged paths
        try:
            return self._commit(message, pats)
        except _Abandoned:
            # a commit cut short (power loss, host crash) left its transaction behind:
            # roll it back (its changeset was never recorded) and commit again
            self.cmd("recover")
            return self._commit(message, pats)

    def _commit(self, message: str, pats: list[bytes]) -> str | None:
        try:
            out: bytes = self._c.rawcommand(
                _b(
                    "-R",
                    str(self.root),
                    "--cwd",
                    str(self.root),
                    "commit",
                    "--addremove",
                    "--debug",
                    "-m",
                    message,
                    "-u",
                    USER,
                    *pats,
                )
            )
        except hglib.error.CommandError as exc:
            said = (exc.out or b"") + (exc.err or b"")
            if exc.ret == 1 and b"nothing changed" in said:
                return None
            if b"abandoned transaction found" in said:
                raise _Abandoned from exc
            err = (exc.err or exc.out or b"").decode(errors="replace").strip().splitlines()
            raise ToolFailed(
                f"hg commit failed in {self.root}: {err[-1] if err else exc.ret}"
            ) from exc
        for line in reversed(out.decode("utf-8", "replace").splitlines()):
            if line.startswith("committed changeset "):
                return line.rsplit(":", 1)[1].strip()
        return self.tip()

    def log(self, limit: int | None = None) -> list[Changeset]:
        args = ["log", "-T", "{rev}\\0{node}\\0{date|isodatesec}\\0{desc}\\0{files|count}\\n"]
        if limit:
            args += ["-l", str(limit)]
        out = []
        for line in self.cmd(*args).decode("utf-8", "replace").split("\n"):
            if not line:
                continue
            rev, node, date, desc, nfiles = line.split("\0")
            out.append(Changeset(int(rev), node, date, desc, int(nfiles)))
        return out

    def strip(self, node: str) -> None:
        self.cmd("strip", "--no-backup", "-q", "-r", node)


class Server:
    """One Mercurial command server; :meth:`repo` binds it to any repository."""

    def __init__(self, anchor: Path) -> None:
        hglib.HGPATH = _hg_binary()
        try:
            self._client = hglib.open(os.fsencode(anchor), configs=_CONFIGS)
        except hglib.error.ServerError as exc:
            raise ToolFailed(f"cannot open Mercurial repository {anchor}: {exc}") from exc

    def repo(self, root: Path) -> Repo:
        return Repo(self._client, root)

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def open_server(anchor: Path) -> Iterator[Server]:
    """A command server started in ``anchor`` (a repository that stays mounted)."""
    server = Server(anchor)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def open_repo(path: Path) -> Iterator[Repo]:
    with open_server(path) as server:
        yield server.repo(path)


def init_repo(path: Path, template: Path | None = None) -> None:
    """``hg init path``; with ``template`` (an empty repository made by ``hg init``) its
    ``.hg`` is copied instead: an empty repository is a few small files, and this saves a
    Mercurial start-up per instance."""
    path.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copytree(template / ".hg", path / ".hg", symlinks=True)
        return
    hglib.HGPATH = _hg_binary()
    try:
        hglib.init(os.fsencode(path))
    except hglib.error.CommandError as exc:
        raise ToolFailed(f"hg init failed for {path}: {exc}") from exc


def write_sidecar(tree: Path, text: str, extra: dict[str, str] | None = None) -> None:
    # beneath tree without following a symlink (a U root is the guest's): fsops refuses one
    from .fsops import write_beneath

    write_beneath(tree, SIDECAR, text.encode("utf-8"))
    for name, content in (extra or {}).items():
        write_beneath(tree, f"{SIDECAR_DIR}/{name}", content.encode("utf-8"))


def commit_tree_into(history: Path, tree: Path, parent: str | None, message: str) -> str:
    """Commit ``tree`` (a staging tree holding the sidecar) as a child of ``parent`` in the
    repository at ``history``, without copying the tree; returns the new node.

    The tree gets a temporary ``.hg`` that shares ``history``'s store; the dirstate is
    rebuilt from ``parent`` so Mercurial records exactly what changed since then.
    """
    with open_repo(history) as repo:
        repo.cmd("share", "-U", str(history), str(tree))
    try:
        with open_repo(tree) as work:
            if parent:
                work.cmd("debugsetparents", parent)
                work.cmd("debugrebuilddirstate")
            work.cmd("addremove", "-q")
            work.cmd("commit", "-m", message, "-u", USER)
            node = work.tip()
    finally:
        shutil.rmtree(tree / ".hg")
    if node is None:
        raise ToolFailed(f"hg commit of {tree} recorded nothing")
    return node


def verify_node(root: Path, node: str, repo: Repo | None = None) -> None:
    """Check that the repository at ``root`` holds changeset ``node``, after the caller made
    the filesystem durable (syncfs checked), so what is read is what the disk holds: the
    changelog's cached pages (clean after the sync) are dropped first, so it is read from
    the disk again. ``repo``: a command server to ask (reconcile's workers: no start-up per
    instance); without it a fresh Mercurial process. Raises :class:`ToolFailed` otherwise."""
    for name in ("00changelog.i", "00changelog.d"):
        with contextlib.suppress(OSError):
            fd = os.open(root / ".hg" / "store" / name, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    try:
        if repo is not None:
            found = repo.cmd("log", "-r", node, "-T", "{node}").decode().strip()
        else:
            with open_repo(root) as fresh:
                found = fresh.cmd("log", "-r", node, "-T", "{node}").decode().strip()
    except ToolFailed as exc:
        raise ToolFailed(
            f"changeset {node[:12]} is not in the repository at {root} after the commit "
            f"({exc.message}); nothing was recorded"
        ) from exc
    if found != node:
        raise ToolFailed(
            f"changeset {node[:12]} is not in the repository at {root} after the commit; "
            "nothing was recorded"
        )
