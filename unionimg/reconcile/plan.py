"""The reconcile plan of one instance: what to do with each path of its upper layer. Pure.

Given the instance's upper layer U (its entries), the base delta B0→B1 (computed once per pair
of generations), point lookups into B1's manifest, the policy, and a way to read file
contents, :func:`plan_instance` returns an :class:`InstancePlan`: one :class:`Action` per
upper entry (plus case-16 reports), each naming its case of the reconcile table in
``docs/design.md``. Nothing here touches a file system, a mount or Mercurial; the executor applies
the plan, and a dry run prints the same plan.

What the executor does for each action (apply in list order; a directory's ``drop`` comes
after everything below it):

* ``keep`` / ``report`` / ``conflict`` / ``error``: leave U's path alone. A conflict carries
  ``artifacts`` (merged-with-markers, both base versions, the local copy) to store aside,
  never in the live file. An ``error`` (policy ``fail``) makes the whole instance fail.
  A conflict whose structured merger gives a live content (dpkg's ``status``, apt's
  ``extended_states``: :attr:`StructuredResult.live`) has ``entry`` and ``data`` too: they
  are written like a ``write`` while the conflict stays pending (its ``proposal``); one
  with ``entry`` but no ``data`` keeps U's file with ``entry``'s owner (``set-meta``: a
  system account the merge renumbered).
* ``drop``: remove U's entry (file, symlink, whiteout, or a directory that is then empty) so
  the base shows through.
* ``write``: replace U's entry by ``entry`` (kind, mode, uid, gid, xattrs, symlink target)
  with content ``data`` for a regular file (a clean merge, or B1's content).
* ``set-meta``: keep U's content, set mode/uid/gid/xattrs to those of ``entry``.

Cost: O(|U| + |delta|). The base is never iterated: B0's and B1's entries of a changed path
come from the delta itself, base changes hidden below a whiteout or an opaque directory are
found by walking the ancestors of delta paths through U, and B1 is asked (``get``) only about
U directories emptied by this plan and the few files a structured merger relates to its own.
Content is read only for regular files whose content both sides changed (cases 5-7, and for
a structured merger the files it relates, e.g. ``/etc/group`` and ``/etc/login.defs`` for
``/etc/passwd``), to compare files whose manifest entry lacks a sha256, and to take B1's
content for a ``write`` (case 12, and replacing a copy below an opaque directory, where a
``drop`` would not let the base show).

Choices beyond the table:

* A whiteout for a path B0 did not have, when B1 adds it, is case 11 (conflict) too.
* Base changes below an opaque directory of U are hidden from the guest: additions and
  modifications are both listed in the case-16 report (deletions hide nothing).
* An opaque directory of U where B0 had nothing and B1 adds a directory (overlayfs marks a
  directory the VM made inside a merged one opaque) is made transparent: ``set-meta`` with
  ``entry.opaque`` false (case 16), so B1's entries below it show; the VM's entries there
  are decided like any path both sides added (a name both added differently: a conflict).
* A local file or symlink replacing a base directory in which B1 changed something is case
  15 (type change vs change), like a whiteout over a changed directory is case 11.
* A regular file both sides changed whose path has a structured merger
  (:func:`unionimg.reconcile.structured.merger_for`: the user databases ``/etc/passwd`` & co
  merged by name, their ``-`` backups kept local) is merged by it instead of line by line:
  case 5 when clean, case 6 with the merger's artefacts (``proposal`` ...) when not, and its
  live content (dpkg's proposal) as the conflict's ``entry``/``data`` when it gives one.
* A structured merge that renumbers the VM's system accounts itself (the user databases,
  :func:`unionimg.reconcile.structured.user_database`: a VM's system user given the ID of
  B1's new one) lists the VM's files of the old ID: after every path is decided, the ones
  whose action keeps the VM's owner (``keep``, ``set-meta``, ``write``, a conflict) get the
  new ID (``keep`` becomes ``set-meta``; a conflict keeps U's file with an ``entry`` of the
  new owner and no ``data``, which the executor applies as a ``set-meta``); a dropped path,
  or one whose B1 entry has the old ID too (B1's account's), is left alone. The policy's
  action for :data:`~unionimg.reconcile.structured.RENUMBER_SYSTEM` and the four files is
  the setting (``merge``: on).
* A text file both sides added (no B0 version) that B1's dpkg status lists as a conffile of
  a package the VM has in the same version is merged against that conffile's pristine
  version (:func:`unionimg.reconcile.dpkgdb.pristine_ancestor`: B1's or the VM's copy when its
  md5 is the one of B1's ``Conffiles:`` line, else the content reader's optional
  ``pristine`` lookup in the apt caches), so only really overlapping lines conflict.
* A package both sides changed to two versions (dpkg's status merged per package,
  :mod:`unionimg.reconcile.dpkgdb`) is settled by the newer version where the losing side's
  copy is pristine, before any path is decided (:meth:`_Planner._settle_packages`): the
  winner's paragraph, info files and files together — B1's: the VM's copies of the
  package's files and info files dropped (or B1's written below an opaque directory),
  whiteouts over B1's files of it dropped, a conffile the VM edited decided as any path
  both sides changed (merged against its pristine version, else a conflict on it alone),
  an obsolete conffile kept; the VM's: kept. A package left in conflict lists its paths in
  the status conflict's ``packages`` artefact (``resolve --package``).
* Metadata merges per field (mode, uid, gid) and per extended attribute name.
* Hardlinked files, sockets, fifos and device nodes are reported and left alone; their case
  is 2 when the base did not touch them, else 0 (outside the table).
* A path both sides changed is governed by the policy (:mod:`unionimg.reconcile.policy`) after it is
  classified; ``take-base`` makes the path what B1 has (drop U's copy, or write B1's entry
  below an opaque directory; a directory whose base counterpart is gone or is no directory
  is dropped with everything of U below it). Binary files with the rule ``merge`` follow the
  policy's ``binary`` setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar

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
from unionimg.reconcile import dpkgdb
from unionimg.reconcile.merge import is_binary, merge3
from unionimg.reconcile.policy import FAIL, KEEP_LOCAL, MERGE, TAKE_BASE, Policy
from unionimg.reconcile.structured import CONFLICT as STRUCTURED_CONFLICT
from unionimg.reconcile.structured import KEEP_LOCAL as STRUCTURED_KEEP_LOCAL
from unionimg.reconcile.structured import (
    RENUMBER_SYSTEM,
    USER_UNIT,
    MergeInput,
    Merger,
    Versions,
    merger_for,
)
from unionimg.reconcile.userdb import OwnerChange

__all__ = [
    "ACTIONS",
    "PACKAGES",
    "Action",
    "BaseView",
    "ContentReader",
    "InstancePlan",
    "check_upper",
    "plan_instance",
]

KEEP, DROP, WRITE, SET_META, CONFLICT, REPORT, ERROR = (
    "keep", "drop", "write", "set-meta", "conflict", "report", "error",
)  # fmt: skip
ACTIONS = (KEEP, DROP, WRITE, SET_META, CONFLICT, REPORT, ERROR)
CHANGING = (DROP, WRITE, SET_META)
OUTSIDE_TABLE = 0  # case number of reports about what the table does not cover
SPECIAL_KINDS = frozenset((CHR, BLK, FIFO, SOCK))
PACKAGES = "packages"  # a status conflict's artefact: its pending packages (resolve --package)
_LIST_LIMIT = 5  # paths named in one reason line

Source = Literal["upper", "b0", "b1"]


class BaseView(Protocol):
    """A generation's manifest (:class:`unionimg.fs.manifest.Manifest` satisfies it)."""

    def get(self, path: str) -> Entry | None: ...

    def children(self, directory: str, *, limit: int | None = None) -> list[Entry]: ...


class ContentReader(Protocol):
    def upper(self, path: str) -> bytes:
        """Content of U's copy of ``path``."""
        ...

    def base(self, which: Literal["b0", "b1"], path: str) -> bytes:
        """Content of ``path`` in generation B0 or B1."""
        ...


@dataclass(frozen=True, slots=True)
class Action:
    path: str
    case: int  # row of the reconcile table (1-17); 0 for what the table does not cover
    action: str  # one of ACTIONS
    reason: str = ""  # one line, human readable
    entry: Entry | None = None  # write / set-meta: the final metadata (and kind, target)
    data: bytes | None = None  # write of a regular file: the final content
    artifacts: Mapping[str, bytes] = field(default_factory=dict)  # conflict: files to set aside
    paths: tuple[str, ...] = ()  # report / conflict: other paths concerned (hidden changes)
    # dpkg's status: the packages the newer version settled, one line each
    packages: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "path": self.path,
            "case": self.case,
            "action": self.action,
            "reason": self.reason,
        }
        if self.paths:
            out["paths"] = list(self.paths)
        if self.artifacts:
            out["artifacts"] = sorted(self.artifacts)
        if self.packages:
            out["packages"] = list(self.packages)
        return out


@dataclass
class InstancePlan:
    actions: list[Action] = field(default_factory=list)
    unaffected: int = 0  # case 1: delta paths U does not have (the new base simply shows)

    @property
    def conflicts(self) -> list[Action]:
        return [a for a in self.actions if a.action == CONFLICT]

    @property
    def errors(self) -> list[Action]:
        return [a for a in self.actions if a.action == ERROR]

    @property
    def changes(self) -> list[Action]:
        """Actions that modify U: drop, write, set-meta."""
        return [a for a in self.actions if a.action in CHANGING]

    @property
    def status(self) -> str:
        """``error`` > ``conflict`` > ``changed`` > ``unchanged``."""
        if self.errors:
            return "error"
        if self.conflicts:
            return "conflict"
        return "changed" if self.changes else "unchanged"

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ACTIONS, 0)
        for action in self.actions:
            out[action.action] += 1
        return out

    def to_json(self, *, include_keep: bool = False) -> dict[str, object]:
        """The plan as JSON data (no file contents); ``keep`` actions only if asked."""
        return {
            "status": self.status,
            "unaffected": self.unaffected,
            "counts": self.counts(),
            "actions": [
                a.to_json() for a in self.actions if include_keep or a.action != KEEP or a.packages
            ],
        }


# -- helpers ----------------------------------------------------------------------------
def _show(path: str) -> str:
    """A path fit for a one-line message (control characters escaped)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return repr(path)
    return path


def _list(paths: Sequence[str]) -> str:
    shown = ", ".join(_show(p) for p in paths[:_LIST_LIMIT])
    more = len(paths) - _LIST_LIMIT
    return shown + (f" (+{more} more)" if more > 0 else "")


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_hardlink(entry: Entry) -> bool:
    # overlayfs links whiteouts to one shared inode: their nlink > 1 means nothing
    return entry.link is not None and entry.kind in (FILE, SYMLINK)


def _kind_name(entry: Entry | None) -> str:
    return "nothing" if entry is None else entry.kind


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Meta:
    """Result of the 3-way merge of mode, uid, gid and each xattr."""

    mode: int
    uid: int
    gid: int
    xattrs: tuple[tuple[str, str], ...]
    conflicts: tuple[str, ...]

    def key(self) -> tuple[object, ...]:
        return (self.mode, self.uid, self.gid, self.xattrs)

    def apply(self, entry: Entry) -> Entry:
        return replace(entry, mode=self.mode, uid=self.uid, gid=self.gid, xattrs=self.xattrs)


def _merge_meta(o: Entry | None, u: Entry, n: Entry) -> _Meta:
    """Per field: a change on one side wins, the same change on both is fine, different
    changes conflict. Without a B0 entry, differing fields conflict (xattrs: an attribute
    only one side has is taken)."""
    conflicts: list[str] = []

    def pick(label: str, ov: _T | None, uv: _T, nv: _T, fmt: Callable[[_T], str]) -> _T:
        if uv == nv:
            return uv
        if o is not None and uv == ov:
            return nv
        if o is not None and nv == ov:
            return uv
        conflicts.append(f"{label} local {fmt(uv)} / B1 {fmt(nv)}")
        return uv

    mode = pick("mode", o.mode if o else None, u.mode, n.mode, lambda v: f"{v:04o}")
    uid = pick("uid", o.uid if o else None, u.uid, n.uid, str)
    gid = pick("gid", o.gid if o else None, u.gid, n.gid, str)
    ox, ux, nx = dict(o.xattrs) if o else {}, dict(u.xattrs), dict(n.xattrs)
    merged: dict[str, str] = {}
    for name in sorted(set(ox) | set(ux) | set(nx)):
        ov, uv, nv = ox.get(name), ux.get(name), nx.get(name)
        if uv == nv or nv == ov:
            value = uv
        elif uv == ov:
            value = nv
        else:
            conflicts.append(f"xattr {name}")
            value = uv
        if value is not None:
            merged[name] = value
    return _Meta(mode, uid, gid, tuple(sorted(merged.items())), tuple(conflicts))


def check_upper(upper: Iterable[Entry], *, strict: bool = True) -> list[str]:
    """Problems that make an upper layer impossible to reconcile, one line each.

    overlayfs ``redirect_dir`` (a renamed directory pointing at its lower original) and
    ``metacopy`` (a copy-up of metadata only, the data still in the lower layer) make U's
    entries depend on B0's layout, which reconcile is about to replace. With ``strict`` the
    first problem is raised as :class:`UsageError`; else all are returned.
    """
    problems = []
    for entry in upper:
        if entry.redirect is not None:
            problems.append(
                f"upper entry {_show(entry.path)} is an overlayfs redirect to "
                f"{_show(entry.redirect)} (directory renamed with redirect_dir=on), which "
                "reconcile cannot merge: mount the instance with redirect_dir=off, copy the "
                "directory to its new name (cp -a) and remove the old one, then reconcile again"
            )
        elif entry.metacopy:
            problems.append(
                f"upper entry {_show(entry.path)} is a metadata-only copy-up (metacopy=on) "
                "whose data is still in the base, which reconcile cannot merge: mount the "
                "instance with metacopy=off and rewrite the file (cp -p it aside and back), "
                "then reconcile again"
            )
    if strict and problems:
        more = f" (and {len(problems) - 1} more such entries)" if len(problems) > 1 else ""
        raise UsageError(problems[0] + more)
    return problems


def plan_instance(
    upper: Sequence[Entry],
    delta: Mapping[str, Change],
    b0: BaseView,
    b1: BaseView,
    policy: Policy,
    content: ContentReader,
) -> InstancePlan:
    """Plan the reconcile of one instance from B0 to B1 (see the module docstring).

    ``upper``: every entry of U (parents before or after children, any order). ``delta``:
    the changes B0→B1 keyed by path (any number of generations apart). ``b0`` is accepted for
    symmetry; B0's entries of changed paths come from the delta. Raises :class:`UsageError`
    for an upper layer using overlayfs redirects or metacopy (see :func:`check_upper`).
    """
    del b0  # everything needed of B0 is in the delta
    if not delta:
        return InstancePlan([Action("/", 17, KEEP, "base unchanged: nothing to reconcile")])
    entries = list(upper)
    check_upper(entries)
    return _Planner(entries, delta, b1, policy, content).run()


class _Planner:
    def __init__(
        self,
        upper: list[Entry],
        delta: Mapping[str, Change],
        b1: BaseView,
        policy: Policy,
        content: ContentReader,
    ) -> None:
        self.u = {e.path: e for e in upper}
        self.delta = delta
        self.b1 = b1
        self.policy = policy
        self.content = content
        self.kids: dict[str, list[str]] = {}
        for path in self.u:
            if path != "/":
                self.kids.setdefault(parent_of(path), []).append(path)
        self.actions: dict[str, Action] = {}
        self.reports: list[Action] = []
        self.hidden: dict[str, list[Change]] = {}
        self.unaffected = 0
        self._cache: dict[tuple[Source, str], bytes] = {}
        self._opaque_memo: dict[str, bool] = {}
        self._merge_memo: dict[str, object] = {}  # structured mergers' shared results
        # the VM's system accounts renumbered by a merge: (its path, the owner field, the
        # files to chown)
        self._renumbered: list[tuple[str, str, tuple[OwnerChange, ...]]] = []
        self._renumber_system: bool | None = None  # the policy's setting, asked once
        # paths of packages the newer version settled: "base" (B1's shows) or "keep"
        self._package_paths: dict[str, tuple[Literal["base", "keep"], str]] = {}
        self._settled: dict[dpkgdb.Key, dpkgdb.Newer] = {}
        self._settled_notes: dict[dpkgdb.Key, dpkgdb.Newer] = {}  # with their unowned files
        self._unsettled: list[dict[str, object]] = []  # pending package conflicts (resolve)
        self._infos: dict[str, list[tuple[str | None, str]]] | None = None  # U's, by package
        self.transparent = self._opaque_over_nothing()

    # -- driving -------------------------------------------------------------------------
    def run(self) -> InstancePlan:
        self._find_hidden()
        self._settle_packages()
        # deepest first: a directory is decided after everything of U below it
        for path in sorted(self.u, key=lambda p: (-_depth(p), p)):
            self._decide(path)
        self._made_transparent()
        self._chown_renumbered()
        self._name_settled()
        ordered = sorted([*self.actions.values(), *self.reports], key=lambda a: self._order(a))
        return InstancePlan(ordered, self.unaffected)

    def _order(self, action: Action) -> tuple[object, ...]:
        comps: tuple[tuple[int, str], ...] = tuple((0, c) for c in action.path.split("/") if c)
        entry = self.u.get(action.path)
        if action.action == DROP and entry is not None and entry.kind == DIR:
            comps += ((1, ""),)  # after its descendants
        return (comps, action.action == REPORT)

    # -- opaque directories over nothing (issue 12, item 6) ----------------------------------
    def _opaque_over_nothing(self) -> set[str]:
        """U's opaque directories where B0 had nothing and B1 adds a directory: overlayfs
        marks a directory the VM made inside a merged one opaque (an optimisation: there was
        nothing below to hide), which would hide whatever B1 adds there for good. The plan
        treats them as transparent (B1's entries show, a name both added is decided as
        any path both sides added) and :meth:`_made_transparent` clears the marker."""
        out = set()
        for path, entry in list(self.u.items()):
            if path == "/" or entry.kind != DIR or not entry.opaque:
                continue
            change = self.delta.get(path)
            if change is None or change.old is not None or change.new is None:
                continue  # over a B0 entry (rm -rf and mkdir): it hides B0, it stays
            if change.new.kind != DIR:
                continue  # B1 adds a file there: a type conflict (case 15), decided as such
            self.u[path] = replace(entry, opaque=False)
            out.add(path)
        return out

    def _made_transparent(self) -> None:
        """The marker of each directory of :meth:`_opaque_over_nothing` is cleared: its
        action becomes ``set-meta`` (``entry.opaque`` false) unless the directory is dropped;
        when the directory is left as it is (a conflict), what B1 adds below stays hidden
        and is reported (case 16)."""
        why = "opaque directory the VM made where B0 had none: made transparent for B1's entries"
        for path in sorted(self.transparent):
            action = self.actions[path]
            if action.action in (DROP, SET_META, WRITE):
                if action.action == SET_META:
                    self._put(replace(action, reason=f"{action.reason}; {why}"))
                continue
            if action.action == KEEP:
                self._put(Action(path, 16, SET_META, why, entry=self.u[path]))
                continue
            prefix = path + "/"
            hidden = tuple(
                p for p, c in self.delta.items()
                if p.startswith(prefix) and p not in self.u and c.new is not None
            )  # fmt: skip
            if hidden:
                self.reports.append(
                    Action(
                        path,
                        16,
                        REPORT,
                        f"opaque directory hides {len(hidden)} paths B1 adds or changes "
                        f"(it stays opaque until its {action.action} is resolved): "
                        f"{_list(hidden)}",
                        paths=hidden,
                    )
                )

    # -- a package both sides changed: the newer version wins (issue 12, item 2) ------------
    def _settle_packages(self) -> None:
        """Package conflicts of dpkg's status the newer version settles, as apt would (it
        upgrades to the newer version, never downgrades an installed newer one): the rule
        is :func:`dpkgdb.newer_side`; the losing side's copy must be pristine
        (:meth:`_vm_pristine`, :meth:`_base_pristine`). A settled package's paths in U are
        claimed (``_package_paths``): B1's version wins → the VM's copies of its files and
        its info files are dropped (B1's show), except conffiles the VM edited (merged as
        any path both sides changed: against the pristine conffile) and obsolete ones
        (kept, as dpkg keeps them); the VM's wins → they are kept. The status merge of the
        memo has the settled paragraphs. Runs only when the status file is both sides'
        change under ``merge`` and the policy's :data:`dpkgdb.NEWER_WINS` is ``merge``."""
        u, change = self.u.get(dpkgdb.STATUS), self.delta.get(dpkgdb.STATUS)
        if u is None or u.kind != FILE or change is None or change.new is None:
            return
        if change.new.kind != FILE or self.policy.decide(dpkgdb.STATUS).action != MERGE:
            return
        status = self._versions(dpkgdb.STATUS)
        if status.too_large or status.local is None or status.new is None:
            return
        merge = dpkgdb.merge_status((status.old, status.local, status.new))
        if merge.error or not merge.conflicts:
            return
        switch = self.policy.decide(dpkgdb.NEWER_WINS)
        off = "" if switch.action == MERGE else f"{dpkgdb.NEWER_WINS_SAYS} off: {switch.describe()}"
        unsettled: dict[dpkgdb.Key, str] = {}
        for key in merge.conflicts:
            choice = merge.choices[key]
            found, why = dpkgdb.newer_side(key, choice.local, choice.new) if not off else (None, "")
            if found is not None:
                claims, why = self._package_claims(found, choice.local or b"", choice.new or b"")
                if claims is not None:
                    self._settled[key] = self._settled_notes.get(key, found)
                    self._package_paths.update(claims)
                    continue
            if why:
                unsettled[key] = why
            self._unsettled.append(self._package_conflict(key, choice.local, choice.new))
        self._merge_memo["dpkgdb:status"] = dpkgdb.settle(merge, self._settled, unsettled, off)

    def _package_conflict(
        self, key: dpkgdb.Key, local: bytes | None, new: bytes | None
    ) -> dict[str, object]:
        """What ``resolve --package`` needs of a package conflict left pending (the status
        conflict's ``packages`` artefact, :class:`~unionimg.store.reconcile_records.
        PackageConflicts`): U's entries of the package (its files and info files; a
        conffile the VM edited apart: ``resolve --take base`` keeps it, as dpkg keeps a
        modified conffile on an upgrade) and both versions."""

        def exists(path: str) -> bool:
            return path in self.u or self._b1_entry(path) is not None

        listed = self._versions(dpkgdb.info_path(key, "list", exists))
        mine = {c.path: c.md5 for c in dpkgdb.conffiles(local).values()}
        files: list[str] = []
        edited: list[str] = []
        for path in dict.fromkeys(
            [*dpkgdb.list_paths(listed.local), *dpkgdb.list_paths(listed.new)]
        ):
            entry = self.u.get(path)
            if entry is None or entry.kind == DIR:
                continue
            if (
                path in mine
                and entry.kind == FILE
                and entry.size < LARGE_FILE
                and dpkgdb.md5_of(self._read("upper", path)) != mine[path]
            ):
                edited.append(path)
                continue
            files.append(path)

        def version(data: bytes | None) -> str:
            found = dpkgdb.version_of(data, *key) if data is not None else None
            return found if found is not None else "removed"

        return {
            "package": key[0],
            "architecture": key[1],
            "local": version(local),
            "base": version(new),
            "files": [*self._info_files(key), *files],
            "edited_conffiles": edited,
        }

    def _package_claims(
        self, found: dpkgdb.Newer, local: bytes, new: bytes
    ) -> tuple[dict[str, tuple[Literal["base", "keep"], str]] | None, str]:
        """U's paths of a package the newer version settles and what becomes of them, or
        ``None`` and why the losing side's copy is not pristine (a conflict stays)."""
        key, what = found.key, found.describe()

        def exists(path: str) -> bool:
            return path in self.u or self._b1_entry(path) is not None

        list_path = dpkgdb.info_path(key, "list", exists)
        listed = self._versions(list_path)
        vm_paths = dpkgdb.list_paths(listed.local)
        b1_paths = dpkgdb.list_paths(listed.new)
        if listed.local is None or listed.new is None:
            return None, f"{'the VM' if listed.local is None else 'B1'} has no {list_path}"
        infos = self._info_files(key)
        if found.side == "local":
            why = self._base_pristine(key, exists, b1_paths, vm_paths, infos)
            if why:
                return None, why
            mine = set(vm_paths)
            unowned = tuple(
                p for p in b1_paths
                if p not in mine and p not in self.u and self._added_by_b1(p)
            )  # fmt: skip
            if unowned:
                found = replace(found, unowned=unowned)
                self._settled_notes[key] = found
                what = found.describe()
            keep = f"of {what}"
            return {p: ("keep", keep) for p in (*vm_paths, *infos) if self._held(p)}, ""
        claims: dict[str, tuple[Literal["base", "keep"], str]] = {}
        why = self._vm_pristine(key, exists, local, new, vm_paths, b1_paths, claims, what)
        if why:
            return None, why
        for path in infos:
            claims[path] = ("base", f"info file of {what}: B1's version shows")
        return claims, ""

    def _added_by_b1(self, path: str) -> bool:
        """Did B1 add or change a non-directory at ``path`` (so it shows in the union)?"""
        change = self.delta.get(path)
        return change is not None and change.new is not None and change.new.kind != DIR

    def _held(self, path: str) -> bool:
        """Does U hold something at ``path`` other than a directory?"""
        entry = self.u.get(path)
        return entry is not None and entry.kind != DIR

    def _info_files(self, key: dpkgdb.Key) -> list[str]:
        """U's non-directory entries of the info files of package ``key``."""
        if self._infos is None:
            self._infos = {}
            for path in self.u:
                if path.startswith(dpkgdb.INFO) and self._held(path):
                    found = dpkgdb.package_of_info(path)
                    if found is not None:
                        self._infos.setdefault(found[0], []).append((found[1], path))
        return [p for arch, p in self._infos.get(key[0], []) if arch is None or arch == key[1]]

    def _vm_pristine(
        self,
        key: dpkgdb.Key,
        exists: Callable[[str], bool],
        local: bytes,
        new: bytes,
        vm_paths: list[str],
        b1_paths: list[str],
        claims: dict[str, tuple[Literal["base", "keep"], str]],
        what: str,
    ) -> str:
        """B1's newer version wins: every file of the VM's version its upper layer holds
        must match the VM's ``md5sums`` (conffiles: their ``Conffiles:`` md5, an edited
        one is merged like any path both sides changed); fills ``claims`` and returns
        ``""``, else why not."""
        sums_path = dpkgdb.info_path(key, "md5sums", exists)
        sums = dpkgdb.md5sums(self._versions(sums_path).local)
        mine = {c.path: c.md5 for c in dpkgdb.conffiles(local).values()}
        theirs = set(dpkgdb.conffiles(new))
        take = f"file of {what}: the VM's copy unmodified, B1's version shows"
        for path in dict.fromkeys(vm_paths):
            entry = self.u.get(path)
            if entry is None or entry.kind in (DIR, SYMLINK):
                continue  # not held; a directory is decided as such; dpkg checks no link
            if entry.kind == WHITEOUT:
                return f"the VM deleted {_show(path)} of its version"
            if entry.kind != FILE or _is_hardlink(entry):
                return f"the VM's {_show(path)} is a {entry.kind} (hardlinked or special)"
            if entry.size >= LARGE_FILE:
                return f"the VM's {_show(path)} is too large to check"
            md5 = dpkgdb.md5_of(self._read("upper", path))
            if path in mine:
                if md5 == mine[path] and path in theirs:
                    claims[path] = ("base", f"conffile of {what}: unmodified, B1's shows")
                continue  # edited (merged as any path), or obsolete (kept, as dpkg does)
            if path not in sums:
                return f"the VM's {_show(path)} is not in its {_show(sums_path)}"
            if sums[path] != md5:
                return f"the VM changed {_show(path)} of its version (md5sums)"
            claims[path] = ("base", take)
        for path in b1_paths:  # B1's files the VM hides: a whiteout goes, anything else stays
            entry = self.u.get(path)
            if path in claims or entry is None or entry.kind == DIR or path in vm_paths:
                continue
            if entry.kind != WHITEOUT:
                return f"the VM has {_show(path)} of B1's version from elsewhere"
            claims[path] = ("base", f"file of {what}: the VM's deletion undone, B1's shows")
        return ""

    def _base_pristine(
        self,
        key: dpkgdb.Key,
        exists: Callable[[str], bool],
        b1_paths: list[str],
        vm_paths: list[str],
        infos: list[str],
    ) -> str:
        """The VM's newer version wins: B1's files of its version that B1 changed must match
        B1's ``md5sums`` (conffiles aside), every file of the VM's version B1 changed must
        be the VM's own copy, and no info file of B1's version the VM lacks may show;
        ``""``, else why not."""
        sums_path = dpkgdb.info_path(key, "md5sums", exists)
        sums = dpkgdb.md5sums(self._versions(sums_path).new)
        for path in b1_paths:
            change = self.delta.get(path)
            n = change.new if change is not None else None
            if n is None or n.kind != FILE or path not in sums:
                continue  # unchanged since B0, no file, or a conffile (not in md5sums)
            if n.size >= LARGE_FILE or dpkgdb.md5_of(self._read("b1", path)) != sums[path]:
                return f"B1 changed {_show(path)} of its version (md5sums)"
        for path in vm_paths:
            change = self.delta.get(path)
            if (
                change is not None
                and change.new is not None
                and change.new.kind != DIR
                and path not in self.u
            ):
                return f"{_show(path)} of the VM's version is B0's, which B1 changed"
        held = set(infos)
        for path, change in self.delta.items():
            if not path.startswith(dpkgdb.INFO) or path in held or change.new is None:
                continue
            found = dpkgdb.package_of_info(path)
            if found is not None and found[0] == key[0] and found[1] in (None, key[1]):
                return f"B1's version has {_show(path)}, which the VM's lacks"
        return ""

    def _name_settled(self) -> None:
        """The status action names each package the newer version settled; a status
        conflict sets aside its pending packages for ``resolve --package``."""
        action = self.actions.get(dpkgdb.STATUS)
        if action is not None and self._settled:
            lines = tuple(n.describe() for n in self._settled.values())
            action = replace(action, packages=lines)
            self._put(action)
        if action is not None and action.action == CONFLICT and self._unsettled:
            listed = json.dumps(self._unsettled, ensure_ascii=True, sort_keys=True)
            aside = {**action.artifacts, PACKAGES: listed.encode("ascii") + b"\n"}
            self._put(replace(action, artifacts=aside))

    # -- system accounts renumbered by the user databases' merge (structured._auto) ---------
    def _chown_renumbered(self) -> None:
        """The VM's files owned by an ID its system account gave up (B1's account has it
        now) get the account's new ID: an action that leaves the VM's owner in place
        becomes (or stays) a ``set-meta``/``write`` with the new owner, so the executor
        chowns a copy in the staging tree, never the live layer's inode. A path dropped
        (B1's version shows) or whose owner is no longer the old one is left alone. The
        user database's action names how many files moved."""
        for source, what, changes in self._renumbered:
            moved = 0
            for change in changes:
                moved += self._chown(change)
            action = self.actions.get(source)
            if action is not None:
                self._put(
                    replace(
                        action,
                        reason=f"{action.reason}; {what} of {moved} of the "
                        "VM's files changed to match",
                    )
                )

    def _chown(self, change: OwnerChange) -> int:
        """Give ``change.path`` its new owner in the plan; 1 if it did, else 0."""
        action = self.actions.get(change.path)
        u = self.u.get(change.path)
        if action is None or u is None or action.action in (DROP, REPORT, ERROR):
            return 0
        base = u if action.entry is None or action.action == KEEP else action.entry
        if (base.uid if change.field == "uid" else base.gid) != change.old:
            return 0
        if action.action != KEEP:  # B1's entry with that owner: B1's account's, left so
            n = self._b1_entry(change.path)
            if n is not None and (n.uid if change.field == "uid" else n.gid) == change.old:
                return 0
        entry = (
            replace(base, uid=change.new)
            if change.field == "uid"
            else replace(base, gid=change.new)
        )
        why = (
            f"owner {change.field} {change.old} → {change.new}: the VM's system account renumbered"
        )
        if action.action == KEEP:
            self._put(
                Action(change.path, action.case, SET_META, f"{action.reason}; {why}", entry=entry)
            )
        else:  # set-meta, write, a conflict (its live entry, or U's kept: set-meta'd)
            self._put(replace(action, entry=entry, reason=f"{action.reason}; {why}"))
        return 1

    def _find_hidden(self) -> None:
        """Sort the delta paths U lacks: case 1, or hidden below a whiteout, an opaque
        directory or a non-directory of U (recorded for that entry when B1 has the path)."""
        memo: dict[str, str | None] = {}
        for path, change in self.delta.items():
            if path in self.u:
                continue
            blocker = self._blocker(parent_of(path), memo) if path != "/" else None
            if blocker is None or change.new is None:
                self.unaffected += 1
            else:
                self.hidden.setdefault(blocker, []).append(change)

    def _blocker(self, directory: str, memo: dict[str, str | None]) -> str | None:
        """The nearest U entry at or above ``directory`` that hides the base below it."""
        chain = []
        found: str | None = None
        current = directory
        while True:
            if current in memo:
                found = memo[current]
                break
            chain.append(current)
            entry = self.u.get(current)
            if entry is not None and (entry.kind != DIR or entry.opaque):
                found = current
                break
            if current == "/":
                break
            current = parent_of(current)
        for path in chain:
            memo[path] = found
        return found

    def _under_opaque(self, path: str) -> bool:
        """Is some directory of U strictly above ``path`` opaque (so a drop hides B1)?"""
        if path == "/":
            return False
        chain = []
        current = parent_of(path)
        result = False
        while True:
            if current in self._opaque_memo:
                result = self._opaque_memo[current]
                break
            chain.append(current)
            entry = self.u.get(current)
            if entry is not None and entry.kind == DIR and entry.opaque:
                result = True
                break
            if current == "/":
                break
            current = parent_of(current)
        for p in chain:
            self._opaque_memo[p] = result
        return result

    def _put(self, action: Action) -> None:
        self.actions[action.path] = action

    def _decide(self, path: str) -> None:
        u = self.u[path]
        change = self.delta.get(path)
        claimed = self._package_paths.get(path)
        if claimed is not None:  # a file of a package the newer version settled
            how, why = claimed
            if how == "keep":
                self._put(Action(path, 2, KEEP, why))
            else:
                self._take_base(path, 3, why)
            return
        if u.kind == DIR:
            self._decide_dir(path, u, change)
        elif u.kind in SPECIAL_KINDS or _is_hardlink(u):
            self._report_special(path, u, change)
        elif u.kind == WHITEOUT:
            self._decide_whiteout(path, change)
        elif u.kind in (FILE, SYMLINK):
            self._decide_leaf(path, u, change)
        else:
            self._put(Action(path, OUTSIDE_TABLE, REPORT, f"unknown kind {u.kind!r}; left alone"))

    # -- content -------------------------------------------------------------------------
    def _read(self, source: Source, path: str) -> bytes:
        key = (source, path)
        if key not in self._cache:
            if source == "upper":
                self._cache[key] = self.content.upper(path)
            else:
                self._cache[key] = self.content.base(source, path)
        return self._cache[key]

    def _same_content(self, x: Entry, xs: Source, y: Entry, ys: Source) -> bool:
        if x.kind != y.kind:
            return False
        if x.kind != FILE:
            return x.content_key() == y.content_key()
        if x.sha256 is not None and y.sha256 is not None:
            return x.sha256 == y.sha256
        if x.size != y.size:
            return False
        return self._read(xs, x.path) == self._read(ys, y.path)

    def _same(self, x: Entry | None, xs: Source, y: Entry | None, ys: Source) -> bool:
        if x is None or y is None:
            return x is y
        return x.meta_key() == y.meta_key() and self._same_content(x, xs, y, ys)

    # -- outcomes ------------------------------------------------------------------------
    def _both_changed(
        self,
        path: str,
        case: int,
        what: str,
        resolve: Callable[[], None],
        paths: tuple[str, ...] = (),
    ) -> None:
        """Both sides changed ``path``: the policy decides, ``merge`` means ``resolve()``."""
        decision = self.policy.decide(path)
        if decision.action == MERGE:
            resolve()
        elif decision.action == KEEP_LOCAL:
            self._put(Action(path, case, KEEP, f"{what}; {decision.describe()}", paths=paths))
        elif decision.action == TAKE_BASE:
            self._take_base(path, case, f"{what}; {decision.describe()}")
        else:
            assert decision.action == FAIL
            self._put(
                Action(
                    path,
                    case,
                    ERROR,
                    f"{what}; {decision.describe()}: resolve it by hand, then reconcile again",
                    paths=paths,
                )
            )

    def _b1_entry(self, path: str) -> Entry | None:
        change = self.delta.get(path)
        return change.new if change is not None else self.b1.get(path)

    def _take_base(self, path: str, case: int, reason: str) -> None:
        """Make ``path`` what B1 has: drop U's copy (with U's subtree when B1 has no
        directory there), or write B1's entry where a drop would not let B1 show."""
        u = self.u[path]
        n = self._b1_entry(path)
        if u.kind == DIR and n is not None and n.kind == DIR:
            if self._dir_droppable(path, u):
                self._put(Action(path, case, DROP, reason))
            else:
                self._put(Action(path, case, SET_META, reason, entry=self._meta_of(u, n)))
            return
        if n is not None and self._under_opaque(path):
            if u.kind == DIR or n.kind == DIR:
                self._put(
                    Action(
                        path,
                        case,
                        CONFLICT,
                        f"{reason}, which cannot be done inside an opaque directory: "
                        "resolve it by hand",
                    )
                )
            else:
                self._write_b1(path, case, n, reason)
            return
        if u.kind == DIR:
            for below in self._subtree(path):
                self._put(Action(below, case, DROP, f"below {_show(path)}: {reason}"))
        self._put(Action(path, case, DROP, reason))

    def _subtree(self, path: str) -> list[str]:
        out: list[str] = []
        stack = list(self.kids.get(path, []))
        while stack:
            below = stack.pop()
            out.append(below)
            stack.extend(self.kids.get(below, []))
        return out

    @staticmethod
    def _meta_of(u: Entry, n: Entry) -> Entry:
        return replace(u, mode=n.mode, uid=n.uid, gid=n.gid, xattrs=n.xattrs)

    def _write_b1(
        self, path: str, case: int, n: Entry, reason: str, meta: _Meta | None = None
    ) -> None:
        entry = replace(n, path=path) if meta is None else meta.apply(replace(n, path=path))
        data = self._read("b1", path) if n.kind == FILE else None
        self._put(Action(path, case, WRITE, reason, entry=entry, data=data))

    def _conflict(
        self,
        path: str,
        case: int,
        reason: str,
        artifacts: Mapping[str, bytes] | None = None,
        paths: tuple[str, ...] = (),
        *,
        entry: Entry | None = None,
        data: bytes | None = None,
    ) -> None:
        """A conflict; ``entry``/``data``: what the live path holds while it is pending (a
        structured merger's ``live``), else U's path stays."""
        self._put(
            Action(
                path,
                case,
                CONFLICT,
                reason,
                entry=entry,
                data=data,
                artifacts=artifacts or {},
                paths=paths,
            )
        )

    def _report_special(self, path: str, u: Entry, change: Change | None) -> None:
        what = (
            f"hardlinked {u.kind} (link group {_show(u.link)})"
            if _is_hardlink(u) and u.link is not None
            else f"{u.kind} node"
        )
        if change is None and path not in self.hidden:
            self._put(Action(path, 2, REPORT, f"{what} in U; base unchanged; left alone"))
        else:
            self._put(
                Action(
                    path,
                    OUTSIDE_TABLE,
                    REPORT,
                    f"{what} in U and B1 changed this path; reconcile leaves it alone: "
                    "check it by hand",
                )
            )

    # -- whiteouts -----------------------------------------------------------------------
    def _decide_whiteout(self, path: str, change: Change | None) -> None:
        hidden = tuple(c.path for c in self.hidden.get(path, ()))
        if change is None and not hidden:
            self._put(Action(path, 10, KEEP, "deleted locally; base unchanged"))
            return
        if change is not None and change.new is None:
            self._put(Action(path, 4, DROP, "deleted locally and in B1"))
            return
        if change is None:
            what = f"deleted locally, but B1 changed {len(hidden)} paths below it: {_list(hidden)}"
        elif change.old is None:
            what = "a local whiteout hides it and B1 adds it"
        else:
            what = f"deleted locally, but B1 changed it ({change.status})"
        self._both_changed(
            path, 11, what, lambda: self._conflict(path, 11, what, paths=hidden), paths=hidden
        )

    # -- files and symlinks --------------------------------------------------------------
    def _decide_leaf(self, path: str, u: Entry, change: Change | None) -> None:
        if change is None:
            hidden = tuple(c.path for c in self.hidden.get(path, ()))
            if not hidden:
                self._put(Action(path, 2, KEEP, "changed locally only"))
                return
            what = (
                f"local {u.kind} replaces a base directory in which B1 changed "
                f"{len(hidden)} paths: {_list(hidden)}"
            )
            self._both_changed(
                path, 15, what, lambda: self._conflict(path, 15, what, paths=hidden), paths=hidden
            )
            return
        o, n = change.old, change.new
        opaque = self._under_opaque(path)
        if n is not None and self._same(u, "upper", n, "b1"):
            if opaque:
                self._put(Action(path, 4, KEEP, "already equal to B1 (inside an opaque dir)"))
            else:
                self._put(Action(path, 4, DROP, "same change locally and in B1"))
        elif o is not None and self._same(u, "upper", o, "b0"):
            if n is None:
                self._put(Action(path, 8, DROP, "unmodified copy; B1 deletes it"))
            elif opaque:
                self._write_b1(path, 3, n, "unmodified copy inside an opaque dir; B1's version")
            else:
                self._put(Action(path, 3, DROP, f"unmodified copy; B1 {change.status} it"))
        else:
            self._leaf_both(path, o, u, n)

    def _leaf_both(self, path: str, o: Entry | None, u: Entry, n: Entry | None) -> None:
        if n is None:
            what = "B1 deletes it but the local copy is modified"
            self._both_changed(path, 9, what, lambda: self._conflict(path, 9, what))
            return
        if u.kind != n.kind or (o is not None and o.kind != u.kind):
            what = (
                f"type changed: B0 has {_kind_name(o)}, local {u.kind}, B1 {n.kind}; "
                "cannot be merged"
            )
            self._both_changed(path, 15, what, lambda: self._conflict(path, 15, what))
            return
        meta = _merge_meta(o, u, n)
        if u.kind == SYMLINK:
            self._symlink_both(path, o, u, n, meta)
        else:
            self._file_both(path, o, u, n, meta)

    def _meta_conflict(
        self, path: str, meta: _Meta, artifacts: Mapping[str, bytes] | None = None
    ) -> None:
        reason = "metadata changed differently: " + "; ".join(meta.conflicts)
        self._conflict(path, 13, reason, artifacts)

    def _finish(
        self,
        path: str,
        case: int,
        u: Entry,
        n: Entry,
        source: Literal["upper", "b1"] | bytes,
        meta: _Meta,
        reason: str,
    ) -> None:
        """Record the merged result: content from U, from B1 or merged bytes, with ``meta``."""
        if meta.conflicts:
            self._meta_conflict(path, meta)
            return
        opaque = self._under_opaque(path)
        if source == "upper":
            if meta.key() == u.meta_key():
                self._put(Action(path, case, KEEP, reason))
            elif (
                meta.key() == n.meta_key()
                and self._same_content(u, "upper", n, "b1")
                and (not opaque)
            ):
                self._put(Action(path, case, DROP, reason + "; equal to B1"))
            else:
                self._put(Action(path, case, SET_META, reason, entry=meta.apply(u)))
        elif source == "b1":
            if meta.key() == n.meta_key() and not opaque:
                self._put(Action(path, case, DROP, reason + "; equal to B1"))
            else:
                self._write_b1(path, case, n, reason, meta)
        else:
            data = source
            entry = meta.apply(replace(u, sha256=_sha256(data), size=len(data)))
            if data == self._read("b1", path) and meta.key() == n.meta_key() and not opaque:
                self._put(Action(path, case, DROP, reason + "; the merge equals B1"))
            elif data == self._read("upper", path) and meta.key() == u.meta_key():
                self._put(Action(path, case, KEEP, reason + "; U already has B1's changes"))
            else:
                self._put(Action(path, case, WRITE, reason, entry=entry, data=data))

    def _symlink_both(self, path: str, o: Entry | None, u: Entry, n: Entry, meta: _Meta) -> None:
        ot = o.target if o is not None else None
        if u.target == n.target:
            case, source, why = 13, "upper", "same target; metadata merged"
        elif o is not None and u.target == ot:
            case, source, why = 14, "b1", f"B1 retargets it to {_show(n.target or '')}"
        elif o is not None and n.target == ot:
            case, source, why = 14, "upper", "retargeted locally; B1 metadata merged"
        else:
            what = (
                f"symlink retargeted differently: local -> {_show(u.target or '')}, "
                f"B1 -> {_show(n.target or '')}"
            )
            self._both_changed(path, 14, what, lambda: self._conflict(path, 14, what))
            return
        if meta.conflicts:
            case = 13
        src: Literal["upper", "b1"] = "upper" if source == "upper" else "b1"
        self._both_changed(path, case, why, lambda: self._finish(path, case, u, n, src, meta, why))

    def _file_both(self, path: str, o: Entry | None, u: Entry, n: Entry, meta: _Meta) -> None:
        if self._same_content(u, "upper", n, "b1"):
            why = "same content; metadata changed on both sides, merged per field"
            case = 13
            self._both_changed(
                path, case, why, lambda: self._finish(path, case, u, n, "upper", meta, why)
            )
            return
        local_changed = o is None or not self._same_content(u, "upper", o, "b0")
        base_changed = o is None or not self._same_content(n, "b1", o, "b0")
        if not local_changed:  # metadata changed locally, content in B1
            why = "metadata changed locally, content in B1: B1's content, local metadata"
            case = 13 if meta.conflicts else 12
            self._both_changed(
                path, case, why, lambda: self._finish(path, case, u, n, "b1", meta, why)
            )
            return
        if not base_changed:  # content changed locally, metadata in B1
            why = "content changed locally, metadata in B1: local content, B1's metadata"
            case = 13 if meta.conflicts else 12
            self._both_changed(
                path, case, why, lambda: self._finish(path, case, u, n, "upper", meta, why)
            )
            return
        # both changed the content: the only place file contents are read for a merge
        if max(e.size for e in (o, u, n) if e is not None) >= LARGE_FILE:
            # never read whole into memory (a guest's sparse file may claim terabytes)
            self._binary(path, {}, "file too large to merge changed on both sides")
            return
        old = self._read("b0", path) if o is not None else b""
        local, new = self._read("upper", path), self._read("b1", path)
        aside = {"base-new": new, "local": local}
        if o is not None:
            aside["base-old"] = old
        merger = merger_for(path)
        if merger is not None:  # merged by meaning, not as text (NUL bytes included)
            versions = Versions(old if o is not None else None, local, new)
            self._structured(path, merger, u, n, meta, versions, aside)
            return
        if is_binary(old) or is_binary(local) or is_binary(new):
            self._binary(path, aside)
            return
        note = ""
        if o is None:  # no common ancestor: a conffile's pristine version is one (item 4)
            found, note = self._pristine(path, local, new)
            if found is not None:
                old = aside["pristine"] = found
        result = merge3(old, local, new)
        if not result.clean:
            blocks = f"{result.conflicts} conflict block{'s' if result.conflicts != 1 else ''}"
            what = f"text changed on both sides in overlapping lines ({blocks}){note}"
            artifacts = {"merged": result.data, **aside}
            self._both_changed(
                path, 6, what, lambda: self._conflict(path, 6, what, artifacts=artifacts)
            )
            return
        why = f"text changed on both sides in separate lines: merged{note}"
        if meta.conflicts:
            artifacts = {"merged": result.data, **aside}
            self._both_changed(
                path, 13, why, lambda: self._meta_conflict(path, meta, artifacts=artifacts)
            )
            return
        self._both_changed(
            path, 5, why, lambda: self._finish(path, 5, u, n, result.data, meta, why)
        )

    def _pristine(self, path: str, local: bytes, new: bytes) -> tuple[bytes | None, str]:
        """A conffile's pristine version (B1's ``Conffiles:`` md5, the content reader's
        ``pristine`` lookup of the package's .deb): :func:`dpkgdb.pristine_ancestor`."""
        status = self._versions(dpkgdb.STATUS)
        if status.new is None or status.too_large:
            return None, ""
        fetch = getattr(self.content, "pristine", None)
        triple = (status.old, status.local, status.new)
        ucf = self._versions(dpkgdb.UCF_HASHFILE)  # files ucf manages (sshd_config)
        hashes = (None, None, None) if ucf.too_large else (ucf.old, ucf.local, ucf.new)
        return dpkgdb.pristine_ancestor(
            path, triple, local, new, fetch, self._merge_memo, ucf=hashes
        )

    def _structured(
        self,
        path: str,
        merger: Merger,
        u: Entry,
        n: Entry,
        meta: _Meta,
        versions: Versions,
        aside: dict[str, bytes],
    ) -> None:
        """A file both sides changed that a structured merger knows (``MERGERS``): case 5
        when it merges, case 6 with its artefacts when it conflicts; the policy first."""
        if self._renumber_system is None:  # the policy's setting (structured.RENUMBER_SYSTEM)
            self._renumber_system = all(
                self.policy.decide(p).action == MERGE for p in (RENUMBER_SYSTEM, *USER_UNIT)
            )
        inp = MergeInput(
            path,
            versions,
            self._versions,
            self.u.values,
            self._merge_memo,
            renumber_system=self._renumber_system,
        )
        result = merger(inp)
        why = result.reason
        if result.outcome == STRUCTURED_KEEP_LOCAL:
            self._both_changed(
                path, 5, why, lambda: self._finish(path, 5, u, n, "upper", meta, why)
            )
        elif result.outcome == STRUCTURED_CONFLICT:
            artifacts = {"merged": result.data, **aside, **result.artifacts}
            live, entry = result.live, None
            if live is not None and live != versions.local:  # written while pending
                base = u if meta.conflicts else meta.apply(u)
                entry = replace(base, sha256=_sha256(live), size=len(live))
            else:
                live = None
            self._both_changed(
                path,
                6,
                why,
                lambda: self._conflict(path, 6, why, artifacts=artifacts, entry=entry, data=live),
            )
        elif meta.conflicts:
            artifacts = {"merged": result.data, **aside}
            self._both_changed(
                path, 13, why, lambda: self._meta_conflict(path, meta, artifacts=artifacts)
            )
        else:
            data, owners, which = result.data, result.owners, result.renumbered

            def merged() -> None:
                self._finish(path, 5, u, n, data, meta, why)
                if which:  # the VM's files to chown (system accounts renumbered)
                    self._renumbered.append((path, which, owners))

            self._both_changed(path, 5, why, merged)

    def _versions(self, path: str) -> Versions:
        """Another file's three versions as the guest sees them, for a structured merger
        (``None``: no regular file there, or too large to read)."""
        change = self.delta.get(path)
        if change is not None:
            entries: tuple[Entry | None, ...] = (change.old, change.new)
            old = self._file_of(change.old, "b0", path)
            new = self._file_of(change.new, "b1", path)
        else:  # unchanged from B0 to B1: one lookup into B1
            entries = (self.b1.get(path),)
            old = new = self._file_of(entries[0], "b1", path)
        u = self.u.get(path)
        if u is not None:
            local = self._file_of(u, "upper", path)
        elif path != "/" and self._blocker(parent_of(path), {}) is not None:
            local = None  # hidden by a whiteout, an opaque directory or a non-directory
        else:
            local = old
        too_large = any(
            e is not None and e.kind == FILE and e.size >= LARGE_FILE for e in (*entries, u)
        )
        return Versions(old, local, new, too_large)

    def _file_of(self, entry: Entry | None, source: Source, path: str) -> bytes | None:
        if entry is None or entry.kind != FILE or entry.size >= LARGE_FILE:
            return None
        return self._read(source, path)

    def _binary(
        self, path: str, aside: dict[str, bytes], what: str = "binary file changed on both sides"
    ) -> None:

        def resolve() -> None:
            binary = self.policy.binary
            if binary == KEEP_LOCAL:
                self._put(Action(path, 7, KEEP, f"{what}; policy binary = keep-local"))
            elif binary == TAKE_BASE:
                self._take_base(path, 7, f"{what}; policy binary = take-base")
            else:
                self._conflict(path, 7, what, artifacts=aside)

        self._both_changed(path, 7, what, resolve)

    # -- directories ---------------------------------------------------------------------
    def _dir_droppable(self, path: str, u: Entry, remaining: Sequence[str] | None = None) -> bool:
        if remaining is None:
            remaining = self._remaining(path)
        return path != "/" and not u.opaque and not remaining and not self._under_opaque(path)

    def _remaining(self, path: str) -> list[str]:
        return [k for k in self.kids.get(path, []) if self.actions[k].action != DROP]

    def _decide_dir(self, path: str, u: Entry, change: Change | None) -> None:
        kids = self.kids.get(path, [])
        remaining = self._remaining(path)
        hidden = tuple(c.path for c in self.hidden.get(path, ()))
        if hidden:
            self.reports.append(
                Action(
                    path,
                    16,
                    REPORT,
                    f"opaque directory hides {len(hidden)} paths B1 adds or changes: "
                    f"{_list(hidden)}",
                    paths=hidden,
                )
            )
        if change is None:
            if len(remaining) < len(kids) and self._dir_droppable(path, u, remaining):
                n = self.b1.get(path)
                if n is not None and n.kind == DIR and n.meta_key() == u.meta_key():
                    self._put(Action(path, 3, DROP, "directory emptied by this reconcile"))
                    return
            self._put(Action(path, 2, KEEP, "directory kept" if kids else "changed locally only"))
            return
        o, n = change.old, change.new
        local_changed = (
            bool(remaining)
            or u.opaque
            or o is None
            or o.kind != DIR
            or u.meta_key() != o.meta_key()
        )
        if n is None:
            if not local_changed:
                self._put(Action(path, 8, DROP, "unmodified directory; B1 deletes it"))
                return
            what = f"B1 deletes this directory but it holds local changes{self._dir_what(u, o)}"
            paths = tuple(remaining)
            self._both_changed(
                path, 9, what, lambda: self._conflict(path, 9, what, paths=paths), paths=paths
            )
            return
        if n.kind != DIR:
            if not local_changed:
                if self._under_opaque(path):
                    self._write_b1(path, 3, n, f"unmodified directory; B1 has a {n.kind}")
                else:
                    self._put(Action(path, 3, DROP, f"unmodified directory; B1 has a {n.kind}"))
                return
            what = f"local directory, B1 turns it into a {n.kind}; cannot be merged"
            self._both_changed(path, 15, what, lambda: self._conflict(path, 15, what))
            return
        droppable = self._dir_droppable(path, u, remaining)
        if u.meta_key() == n.meta_key():
            if droppable:
                self._put(Action(path, 4, DROP, "directory equal to B1's"))
            else:
                self._put(Action(path, 4, KEEP, "directory metadata already equal to B1's"))
        elif o is not None and o.kind == DIR and u.meta_key() == o.meta_key():
            if droppable:
                self._put(Action(path, 3, DROP, "unmodified directory; B1 changes its metadata"))
            else:
                self._put(
                    Action(path, 3, SET_META, "B1's directory metadata", entry=self._meta_of(u, n))
                )
        else:
            meta = _merge_meta(o if o is not None and o.kind == DIR else None, u, n)
            why = "directory metadata changed on both sides, merged per field"

            def resolve() -> None:
                if meta.conflicts:
                    self._meta_conflict(path, meta)
                else:
                    self._put(Action(path, 13, SET_META, why, entry=meta.apply(u)))

            self._both_changed(path, 13, why, resolve)

    @staticmethod
    def _dir_what(u: Entry, o: Entry | None) -> str:
        if u.opaque:
            return " (it is opaque)"
        if o is not None and u.meta_key() != o.meta_key():
            return " (its metadata changed)"
        return ""
