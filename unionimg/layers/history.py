"""Mercurial history on the layers, driven through python-hglib (one command server per use).

* A base's history is a normal repository (``bases/NAME/history``) whose working copy stays
  empty; a generation is committed from its staging tree through a *share* of that
  repository, so the tree is never copied.
* An instance's history lives at the root of its U image (``.hg`` next to ``upper/`` and
  ``work/``), so it travels with the image; ``work/`` is ignored.

Both commit a sidecar ``.unionimg/manifest.jsonl`` (see :func:`entries.sidecar_text`) with
what Mercurial cannot hold. Plain ``hg log``/``hg diff`` work on both for an admin.

Trust: an instance's ``.hg`` is written by its guest. The repository stays on U (history
travels with the image, no second copy to keep in step and no store space per VM), but no
Mercurial process unionimg starts reads configuration from it: ``HGRCSKIPREPO=1`` and an
empty ``HGRCPATH`` (only ``_CONFIGS`` apply: no hooks, extensions, aliases, merge tools,
%include; subrepos off), and :func:`check_repo` refuses, before any command, what Mercurial
would act on beyond plain history: unknown or shared requirements, ``sharedpath``,
symlinks/devices/sparse files in ``.hg``, transaction files naming paths outside it (hg
unlinks and copies those unchecked). Commands on a U root see only :data:`U_SCOPE`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unionimg.entries import MAX_HG_PATH
from unionimg.errors import GuestDataRefused, MissingCapability, ToolFailed
from unionimg.fs import fsops
from unionimg.fs.fsops import write_beneath
from unionimg.runner import run
from unionimg.store.records import JsonObject

if TYPE_CHECKING:
    import hglib.client
    import hglib.error
# python-hglib (and with it socket) is imported where a command server is opened, not at import:
# most commands that load this module (instance create: hg init only) never open one

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
    # a guest may commit .hgsub into its history: never touch (or run git/svn for) a subrepo
    "subrepos.allowed=false",
    "ui.portablefilenames=ignore",
    # a lock a guest planted in .hg (unionimg holds the instance lock: no other hg runs)
    "ui.timeout=60",
]
# every hg process: no configuration from any repository (an instance's .hg is the guest's)
# and none from the host's files either (only _CONFIGS: the same behaviour on every host)
HG_ENV = {"HGRCSKIPREPO": "1", "HGRCPATH": "", "HGPLAIN": "1"}
# formats of the repositories unionimg creates: what check_repo accepts, and no format
# whose docket names other files (dirstate-v2, persistent nodemap)
_INIT_CONFIGS = [
    "format.use-share-safe=yes",
    "format.use-dirstate-v2=no",
    "format.use-persistent-nodemap=no",
]
# what .hg/requires and .hg/store/requires may list (requirements of plain revlog storage)
ALLOWED_REQUIREMENTS = frozenset(
    {
        "share-safe",
        "store",
        "fncache",
        "dotencode",
        "generaldelta",
        "revlogv1",
        "sparserevlog",
        "revlog-compression-zstd",
    }
)
# the only symlinks Mercurial itself makes in .hg (relative to the repository's root), which
# it never follows: it caches "this file system has symlinks" as a link it only lstat()s
# (tolerated with exactly its own target), and its locks are links to "host:pid" it only
# readlink()s (left behind by a crash mid-commit: tolerated with any target, so a crashed
# commit does not make the VM's U refused; check_repo clears a stale one)
HG_OWN_LINKS: dict[str, bytes | None] = {
    ".hg/wcache/checklink": b"checklink-target",
    ".hg/cache/checklink": b"checklink-target",
    ".hg/wlock": None,
    ".hg/lock": None,
    ".hg/store/lock": None,
}
# Mercurial's transaction files that name other files: it joins those names to .hg (no
# check for '..' or '/') to copy and unlink them, at every commit (undo.backupfiles) and
# on recover (journal*)
_TX_LISTS = ("store/undo.backupfiles", "store/journal.backupfiles", "undo.backupfiles")
_TX_JOURNALS = ("store/journal", "journal")
_SMALL = 16 << 20  # a requires file or transaction list longer than this is not Mercurial's
# what unionimg commits of a U root: the rest (work/, junk a guest put there) is never seen
U_SCOPE = ("upper", SIDECAR_DIR, ".hgignore")


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
        raise MissingCapability("Mercurial (hg) is not installed; run make setup")
    return found


def _b(*args: str | bytes) -> list[bytes]:
    return [a if isinstance(a, bytes) else os.fsencode(a) for a in args]


# -- what Mercurial would act on in a guest-written repository --------------------------------
def _refuser(root: Path, guest: str | None) -> Callable[[str, str], GuestDataRefused]:
    """The one-line refusal of a path in ``root``'s ``.hg`` ("" for ``.hg`` itself)."""
    who = f"instance '{guest}'" if guest else "repository"
    hg = root / ".hg"

    def refuse(rel: str, why: str) -> GuestDataRefused:
        where, fix = (f"{hg}/{rel}", ", or remove that path by hand") if rel else (str(hg), "")
        return GuestDataRefused(
            f"{who}: {where} {why}; unionimg lets Mercurial act on none of it (restore "
            f"the U image from a backup{fix})"
        )

    return refuse


def check_repo(root: Path, guest: str | None = None) -> None:
    """Refuse (:class:`GuestDataRefused`, naming ``guest`` and the path) a repository at
    ``root`` holding anything Mercurial would act on beyond plain history: requirements not
    in :data:`ALLOWED_REQUIREMENTS` (``shared``/``relshared`` would point it at another
    repository, ``largefiles``/``lfs``/``git`` load extensions, dockets name files),
    ``.hg/sharedpath``, a symlink (but Mercurial's own locks), device node, fifo, socket,
    sparse file or other filesystem in ``.hg``, and transaction files naming paths outside
    ``.hg``. Configuration files (``.hg/hgrc``, ``hgrc-not-shared``) are never read
    (:data:`HG_ENV`), so they are left alone."""
    hg = root / ".hg"
    refuse = _refuser(root, guest)
    try:
        st = os.lstat(hg)
    except FileNotFoundError:
        raise refuse("", "is missing: the instance's history is gone") from None
    if not stat.S_ISDIR(st.st_mode):
        raise refuse("", "is not a directory (a symlink?)")
    if os.fspath(root) not in _WALKED:
        try:
            walk_hg(root)
        except fsops.UnsafePath as exc:
            raise refuse(exc.rel.removeprefix(".hg").lstrip("/"), exc.why) from None
    if guest is not None:
        _clear_stale_locks(hg)
    wc = _read_list(hg, "requires", refuse)
    if wc is None:
        raise refuse("requires", "is missing")
    reqs = set(wc.decode("ascii", "replace").split())
    if "share-safe" in reqs:
        store = _read_list(hg, "store/requires", refuse)
        if store is None:
            raise refuse("store/requires", "is missing")
        reqs |= set(store.decode("ascii", "replace").split())
    for shared in ("shared", "relshared"):
        if shared in reqs:
            raise refuse("requires", f"makes it a share ({shared}) of another repository")
    unknown = sorted(reqs - ALLOWED_REQUIREMENTS)
    if unknown:
        raise refuse(
            "requires", f"lists requirements unionimg does not allow: {', '.join(unknown)}"
        )
    if os.path.lexists(hg / "sharedpath"):
        raise refuse("sharedpath", "exists: it would point Mercurial at another repository")
    check_transactions(root, guest)


def check_transactions(root: Path, guest: str | None = None) -> None:
    """Refuse transaction files (:data:`_TX_LISTS`, :data:`_TX_JOURNALS`) naming a path
    that is absolute or climbs out with ``..``: Mercurial would unlink or overwrite it."""
    hg = root / ".hg"
    refuse = _refuser(root, guest)

    for rel in _TX_LISTS:
        data = _read_list(hg, rel, refuse)
        for line in (data or b"").split(b"\n")[1:]:
            if not line:
                continue
            fields = line.split(b"\0")
            if len(fields) != 4 or fields[0] not in (b"", b"plain", b"store"):
                raise refuse(rel, "is not a transaction list Mercurial wrote")
            for name in fields[1:3]:
                if name and not _plain_rel(name):
                    raise refuse(rel, f"names {os.fsdecode(name)!r}, outside the repository")
    for rel in _TX_JOURNALS:
        data = _read_list(hg, rel, refuse)
        for line in (data or b"").split(b"\n"):
            name = line.split(b"\0", 1)[0]
            if name and not _plain_rel(name):
                raise refuse(rel, f"names {os.fsdecode(name)!r}, outside the repository")


def _plain_rel(name: bytes) -> bool:
    parts = name.split(b"/")
    return not name.startswith(b"/") and b".." not in parts and b"" not in parts


def _read_list(hg: Path, rel: str, refuse: Callable[[str, str], GuestDataRefused]) -> bytes | None:
    """The small regular file ``rel`` in ``hg`` (None when missing), read without
    following a symlink and refused when too large to be Mercurial's."""
    try:
        fd = os.open(hg / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise refuse(rel, f"cannot be read safely ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(rel, "is not a regular file")
        if st.st_size > _SMALL:
            raise refuse(rel, f"is {st.st_size} bytes long, not a file Mercurial wrote")
        return fh.read(_SMALL + 1)


def _clear_stale_locks(hg: Path) -> None:
    """Remove Mercurial lock links that no live process of this host holds: left by a crash
    mid-commit, or planted by the guest (which would make every host commit wait for
    ``ui.timeout`` and fail). A lock is a symlink to ``host[/ns]:pid`` that Mercurial only
    ``readlink()``s; ``unlink`` never follows it, and the walk just checked ``.hg`` and
    ``.hg/store`` are real directories on U."""
    me = os.uname().nodename  # what Mercurial's lock names hold (socket.gethostname)
    for rel in ("wlock", "lock", "store/lock"):
        path = hg / rel
        try:
            target = os.readlink(path)
        except OSError:
            continue  # absent, or not a link (then Mercurial treats it as held and says so)
        host, _, pid = target.rpartition(":")
        if host.split("/", 1)[0] == me and pid.isascii() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # held by a live process here (e.g. a concurrent read of this VM)
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# U roots whose whole .hg this process walked while it holds them (ucheck.check_layout,
# with the image mounted by this process or checked for this command): check_repo does not
# walk them again; ucheck forgets a root when it releases it
_WALKED: set[str] = set()


def walk_hg(root: Path, *, remember: bool = False) -> None:
    """Every entry of ``root``'s ``.hg`` (if any; :func:`fsops.check_tree_plain`):
    directories and regular files of the same filesystem, none sparse (Mercurial reads some
    files whole: a huge sparse one would take the host's memory); symlinks only where
    Mercurial makes its own (:data:`HG_OWN_LINKS`). Raises :class:`fsops.UnsafePath`.
    ``remember``: :func:`check_repo` skips this walk for ``root`` until :func:`forget_walk`."""
    fsops.check_tree_plain(root, ".hg", HG_OWN_LINKS)
    if remember:
        _WALKED.add(os.fspath(root))


def forget_walk(root: Path) -> None:
    _WALKED.discard(os.fspath(root))


# Patterns (bytes regexps, unanchored) for what Mercurial cannot hold by its very path (see
# entries.hg_unfit): a newline or CR anywhere; a path longer than entries.MAX_HG_PATH; a
# component its path auditor refuses (.hg in any case, with the code points HFS+ ignores
# anywhere, and the Windows short names). Ignored, Mercurial never walks into them, so it
# never aborts on them; files too large for it are excluded per commit instead.
_IGN = r"(?:\xe2\x80[\x8c-\x8f\xaa-\xae]|\xe2\x81[\xaa-\xaf]|\xef\xbb\xbf)*"
U_HGIGNORE_EXTRA = (
    r"[\x0a\x0d]",
    rf"^[\x00-\xff]{{{MAX_HG_PATH + 1}}}",
    rf"(?:^|/){_IGN}\.{_IGN}[hH]{_IGN}[gG]{_IGN}(?:\.{_IGN})?(?:/|$)",
    r"(?:^|/)(?:[hH][gG]|[hH][gG]8[bB]6[cC])~[0-9]+(?:/|$)",
)


# a U root's own entries that are never history
U_HGIGNORE = "syntax: regexp\n^work/\n^upper\\.(new|prev)/\n^lost\\+found/\n"

#: The guest's volatile paths (issue 12, item 5; docs/policy.md): never in a VM's history,
#: whatever the reconcile policy says. Everything below /tmp, /run, /var/tmp, /var/log and
#: /var/cache but debconf's three databases (state, merged by reconcile). Ignored, a new file
#: there is never added; a file tracked before is forgotten at the next commit
#: (:func:`volatile_roots`, passed as ``outside``).
VOLATILE_HGIGNORE = (
    r"^upper/(?:tmp|run|var/tmp|var/log)/",
    r"^upper/var/cache/(?!debconf(?:/(?:config|passwords|templates)\.dat)?$)",
)
_VOLATILE = re.compile("|".join(VOLATILE_HGIGNORE).encode())


def volatile_roots(paths: Iterable[str]) -> list[str]:
    """The topmost of ``paths`` (guest paths of the upper layer) :data:`VOLATILE_HGIGNORE`
    ignores, relative to U's root (``upper/var/log``'s files ...), for ``outside``."""
    found = sorted((p for p in paths if _VOLATILE.match(os.fsencode("upper" + p))), key=os.fsencode)
    out: list[str] = []
    for p in found:
        if not out or not p.startswith(out[-1] + "/"):
            out.append(p)
    return ["upper" + p for p in out]


def hgignore_text() -> str:
    """The ``.hgignore`` of a U root: unionimg's own patterns (``work/``, ...) and
    :data:`U_HGIGNORE_EXTRA`. Fixed text: whatever a guest wrote there is replaced."""
    return U_HGIGNORE + "".join(line + "\n" for line in (*U_HGIGNORE_EXTRA, *VOLATILE_HGIGNORE))


@dataclass(frozen=True)
class Changeset:
    rev: int
    node: str
    date: str
    desc: str
    files: int

    def to_json(self) -> JsonObject:
        """What ``log --json`` says of the changeset."""
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

    def __init__(
        self, client: hglib.client.hgclient, root: Path, scope: Sequence[str] | None = None
    ) -> None:
        self._c = client
        self.root = root
        # what of the working copy commands look at (U_SCOPE for a U root), None: all of it
        self.scope = tuple(scope) if scope is not None else None

    def _scope_args(self) -> list[bytes]:
        pats: list[bytes] = []
        for path in self.scope or ():
            pats += [b"-I", b"path:" + os.fsencode(path)]
        return pats

    def cmd(self, *args: str | bytes) -> bytes:
        import hglib.error

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

    def commit_all(
        self, message: str, paths: Sequence[str] | None = None, outside: Sequence[str] = ()
    ) -> str | None:
        """addremove + commit in one Mercurial command; the new node, or None when nothing
        changed. With ``paths`` (relative to the root; a directory stands for everything
        below it) only those are looked at: the caller knows nothing else changed, and
        Mercurial is spared comparing every file of the working copy. ``outside``: paths
        (relative to the root; directories with all below) Mercurial must not hold: files
        among them it tracks are forgotten (recorded as removed), none is added."""
        pats: list[bytes] = []
        for path in paths if paths is not None and len(paths) <= _MAX_PATHS else ():
            pats += [b"-I", b"path:" + os.fsencode(path)]  # -I: no abort on unchanged paths
        if not pats:
            pats = self._scope_args()
        try:
            return self._commit_outside(message, pats, outside)
        except _Abandoned:
            # a commit cut short (power loss, host crash) left its transaction behind:
            # roll it back (its changeset was never recorded) and commit again; what the
            # rollback touches was checked (a guest can plant a journal too)
            check_transactions(self.root)
            self.cmd("recover")
            return self._commit_outside(message, pats, outside)

    def _commit_outside(
        self, message: str, pats: list[bytes], outside: Sequence[str]
    ) -> str | None:
        if not outside:
            return self._commit(message, pats)
        # forget, add the rest, commit without --addremove (it would add the forgotten
        # files right back: the dirstate still knows them)
        import hglib.error

        with _excluded(outside) as excl:
            try:
                self._c.rawcommand(
                    _b("-R", str(self.root), "--cwd", str(self.root), "forget", excl[1])
                )
            except hglib.error.CommandError as exc:
                if exc.ret != 1:  # 1: some were not tracked, the usual case
                    raise _tool_failed("forget", self.root, exc) from exc
            self.cmd("addremove", "-q", *pats, *excl)
            return self._commit(message, pats, addremove=False)

    def addremove(self, outside: Sequence[str] = ()) -> None:
        """Mark new and missing files (of :attr:`scope`, but ``outside``) as added and
        removed."""
        with _excluded(outside) as excl:
            self.cmd("addremove", "-q", *self._scope_args(), *excl)

    def changed(self, outside: Sequence[str] = ()) -> bool:
        """Whether the working copy (of :attr:`scope`, but ``outside``) differs from its
        parent changeset."""
        with _excluded(outside) as excl:
            return bool(self.cmd("status", "-amrd", *self._scope_args(), *excl).strip())

    def changed_paths(self, outside: Sequence[str] = (), *, since: str | None = None) -> list[str]:
        """The paths (relative to the root, sorted) in which the working copy (of
        :attr:`scope`, but ``outside``) differs from changeset ``since`` (default: its
        parent); ``since`` unknown to the repository: from its parent."""
        with _excluded(outside) as excl:
            args: list[str | bytes] = ["status", "-amrd", "-n", "-0", *self._scope_args(), *excl]
            try:
                out = self.cmd(*args, *(["--rev", since] if since else []))
            except ToolFailed:
                if not since:
                    raise
                out = self.cmd(*args)
        return sorted({os.fsdecode(p) for p in out.split(b"\0") if p})

    def _commit(self, message: str, pats: list[bytes], *, addremove: bool = True) -> str | None:
        import hglib.error

        try:
            out: bytes = self._c.rawcommand(
                _b(
                    "-R",
                    str(self.root),
                    "--cwd",
                    str(self.root),
                    "commit",
                    *(["--addremove"] if addremove else []),
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


@contextlib.contextmanager
def _excluded(outside: Sequence[str]) -> Iterator[list[bytes]]:
    """``-X listfile0:FILE`` for the paths ``outside`` (names may hold newlines: the list
    is NUL-separated, in a private temporary directory of the host), or nothing."""
    if not outside:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="unionimg-hg-") as tmp:
        listfile = os.path.join(tmp, "outside")
        with open(listfile, "wb") as fh:
            fh.write(b"".join(b"path:" + os.fsencode(p) + b"\0" for p in outside))
        yield [b"-X", b"listfile0:" + os.fsencode(listfile)]


def _tool_failed(what: str, root: Path, exc: hglib.error.CommandError) -> ToolFailed:
    err = (exc.err or exc.out or b"").decode(errors="replace").strip().splitlines()
    return ToolFailed(f"hg {what} failed in {root}: {err[-1] if err else exc.ret}")


class Server:
    """One Mercurial command server; :meth:`repo` binds it to any repository.

    Started with :data:`HG_ENV`, so no command it runs reads a repository's configuration;
    ``anchor`` is checked (:func:`check_repo`) before the server opens it."""

    def __init__(self, anchor: Path, *, guest: str | None = None, trusted: bool = False) -> None:
        import hglib
        import hglib.client
        import hglib.error

        if not trusted:
            check_repo(anchor, guest)
        hglib.HGPATH = _hg_binary()
        self._checked = {anchor} if not trusted else set()
        try:
            # hglib.open, with HG_ENV added to the server's environment
            client = hglib.client.hgclient(os.fsencode(anchor), None, _CONFIGS, connect=False)
            client._env.update(HG_ENV)
            client.open()
            self._client = client
        except hglib.error.ServerError as exc:
            raise ToolFailed(f"cannot open Mercurial repository {anchor}: {exc}") from exc

    def repo(self, root: Path, *, guest: str | None = None, trusted: bool = False) -> Repo:
        """``root`` for commands; a guest's repository (``guest``: the instance's name) is
        checked first (once per server: the guest does not run while unionimg holds its U)
        and its commands see only :data:`U_SCOPE`."""
        if not trusted and root not in self._checked:
            check_repo(root, guest)
            self._checked.add(root)
        return Repo(self._client, root, U_SCOPE if guest is not None else None)

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def open_server(
    anchor: Path, *, guest: str | None = None, trusted: bool = False
) -> Iterator[Server]:
    """A command server started in ``anchor`` (a repository that stays mounted)."""
    server = Server(anchor, guest=guest, trusted=trusted)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def open_repo(path: Path, *, guest: str | None = None, trusted: bool = False) -> Iterator[Repo]:
    """A command server on the repository at ``path``, checked unless ``trusted`` (a
    base's history in the store); ``guest``: the instance whose U root ``path`` is."""
    with open_server(path, guest=guest, trusted=trusted) as server:
        yield server.repo(path, guest=guest, trusted=True)


def init_repo(path: Path, template: Path | None = None) -> None:
    """``hg init path``; with ``template`` (an empty repository made by ``hg init``) its
    ``.hg`` is copied instead: an empty repository is a few small files, and this saves a
    Mercurial start-up per instance."""
    path.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copytree(template / ".hg", path / ".hg", symlinks=True)
        return
    configs = [a for c in _INIT_CONFIGS for a in ("--config", c)]
    run([_hg_binary(), "init", *configs, str(path)], env=HG_ENV, what=f"making {path}")


def write_sidecar(tree: Path, text: str, extra: dict[str, str] | None = None) -> None:
    # beneath tree without following a symlink (a U root is the guest's): fsops refuses one
    write_beneath(tree, SIDECAR, text.encode("utf-8"))
    for name, content in (extra or {}).items():
        write_beneath(tree, f"{SIDECAR_DIR}/{name}", content.encode("utf-8"))


def commit_tree_into(
    history: Path, tree: Path, parent: str | None, message: str, outside: Sequence[str] = ()
) -> str:
    """Commit ``tree`` (a staging tree holding the sidecar) as a child of ``parent`` in the
    repository at ``history``, without copying the tree; returns the new node. ``outside``:
    paths (relative to the tree) Mercurial cannot hold, left out (forgotten if tracked).

    The tree gets a temporary ``.hg`` that shares ``history``'s store; the dirstate is
    rebuilt from ``parent`` so Mercurial records exactly what changed since then.
    """
    with open_repo(history, trusted=True) as repo:
        repo.cmd("share", "-U", str(history), str(tree))
    try:
        with open_repo(tree, trusted=True) as work:
            if parent:
                work.cmd("debugsetparents", parent)
                work.cmd("debugrebuilddirstate")
            with _excluded(outside) as excl:
                if excl:
                    with contextlib.suppress(ToolFailed):  # exit 1: none was tracked
                        work.cmd("forget", excl[1])
                work.cmd("addremove", "-q", *excl)
            work.cmd("commit", "-m", message, "-u", USER)
            node = work.tip()
    finally:
        shutil.rmtree(tree / ".hg")
    if node is None:
        raise ToolFailed(f"hg commit of {tree} recorded nothing")
    return node


def verify_node(root: Path, node: str, repo: Repo | None = None) -> None:
    """Check that the repository at ``root`` holds changeset ``node``, after the caller made
    the filesystem durable (syncfs checked), so what is read is what the disk holds.
    ``repo``: a command server to ask (reconcile's workers: no start-up, no extra read per
    instance); without it a fresh Mercurial process, and the changelog's cached pages
    (clean after the sync) are dropped first, so it is read from the disk again. Raises
    :class:`ToolFailed` otherwise."""
    for name in ("00changelog.i", "00changelog.d") if repo is None else ():
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
