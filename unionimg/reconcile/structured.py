"""Structured mergers by path: files reconcile merges by their meaning, not as text. Pure.

A text merge of a database (``/etc/passwd``, dpkg's status file, debconf's templates) is
wrong both ways: two additions at its end conflict, two additions of one ID do not. The
planner (:mod:`unionimg.reconcile.plan`) asks :data:`MERGERS` for the path of every regular
file whose content both sides changed; a merger found there replaces the line merge. The
policy still comes first: ``keep-local``, ``take-base`` and ``fail`` rules apply to these
paths like to any other, only ``merge`` calls the merger.

A merger gets a :class:`MergeInput` (the three versions of its file, a way to read the
three versions of a related file, the VM's upper entries) and returns a
:class:`StructuredResult`:

* ``merged``: the file's new content (case 5, "merged by name" or whatever the merger says);
* ``conflict``: ``data`` is the ``merged`` artefact (both entries shown, with markers: never
  written to the live file), ``artifacts`` adds the merger's own (``proposal`` ...) (case 6);
  ``live`` is what the live file holds while the conflict is pending (``None``: the VM's
  version stays). dpkg's ``status`` and apt's ``extended_states`` give their proposal
  (every package merged, the conflicting ones the VM's, so the package database matches
  the files of the union); the user databases give both sides' entries except B1's ones
  whose ID (or range) clashes with the VM's entry, which keeps it (:func:`_live`: never two
  names with one ID, never a VM file given to B1's user; their proposal renumbers IDs and
  implies chowns, which ``resolve --take proposal`` applies; a clash of system
  accounts alone is taken at once, below);
* ``merged`` with ``owners``: the user databases when every clash is one of system accounts
  (:func:`_auto`): the proposal is taken at once, and ``owners`` lists the VM's files whose
  owner it changes (the planner chowns them in the staging tree);
* ``keep-local``: the VM's own version stays (the tools' ``-`` backups: ``/etc/passwd-`` is
  what ``useradd`` saved before its last change, meaningful only with the VM's own
  ``/etc/passwd``).

Registered here: the user databases (:mod:`unionimg.reconcile.userdb`) and their backups;
debconf's databases (:mod:`unionimg.reconcile.debconf`), merged record by record; dpkg's
database and apt's ``extended_states`` (:mod:`unionimg.reconcile.dpkgdb`), per package, with
the patterns ``/var/lib/dpkg/info/PKG.*`` and ``alternatives/NAME`` (:func:`merger_for`:
exact paths, then patterns).
passwd, group, shadow and gshadow are one unit for ``pwck``/``grpck`` (users name their
primary group, groups their members, shadow and gshadow their users and groups): a conflict in
one makes the other three conflicts too, and their live versions leave out the same users and
groups (:func:`_left_out`), so the live set is consistent until resolved.
A VM's system account given the same ID as a new system account of B1 (``useradd --system``
counts down from 999 on both sides) needs no person: when every conflict of the four files
is such a clash (both IDs in B1's ``SYS_UID_MIN..SYS_UID_MAX``, or the GID pair, with a
proposal in that range) and ``MergeInput.renumber_system`` holds (the policy's setting,
:data:`RENUMBER_SYSTEM`), the four files take their proposal (B1's account keeps its ID, the
VM's moves to a free system ID no side uses) and the files of the VM the move concerns are
listed to chown (:func:`_auto`). A hardlinked file, a device node, fifo or socket, or a file
too large to copy among them leaves the clash to the admin, as a login account's always is.
Mergers of one planner run share ``MergeInput.memo`` (each file merged once).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from unionimg.display import shown
from unionimg.entries import BLK, CHR, FIFO, FILE, LARGE_FILE, SOCK, SYMLINK, Entry
from unionimg.reconcile import debconf, dpkgdb, userdb

__all__ = [
    "CONFLICT",
    "KEEP_LOCAL",
    "MERGED",
    "MERGERS",
    "RENUMBER_SYSTEM",
    "USER_UNIT",
    "MergeInput",
    "Merger",
    "StructuredResult",
    "Versions",
    "keep_local",
    "merger_for",
]

Outcome = Literal["merged", "conflict", "keep-local"]
MERGED: Outcome = "merged"
CONFLICT: Outcome = "conflict"
KEEP_LOCAL: Outcome = "keep-local"


@dataclass(frozen=True, slots=True)
class Versions:
    """One file as B0 had it, as the VM sees it, as B1 has it (``None``: no such file)."""

    old: bytes | None
    local: bytes | None
    new: bytes | None
    too_large: bool = False  # a version exists but is too large to read (the merge refuses)


@dataclass(frozen=True, slots=True)
class MergeInput:
    path: str
    versions: Versions
    related: Callable[[str], Versions]  # the three versions of another file
    upper: Callable[[], Iterable[Entry]]  # every entry of the VM's upper layer
    memo: dict[str, object] = field(default_factory=dict)  # shared by one planner's mergers
    # the VM's system accounts clashing with B1's are renumbered at once (RENUMBER_SYSTEM)
    renumber_system: bool = True


@dataclass(frozen=True, slots=True)
class StructuredResult:
    outcome: Outcome
    data: bytes = b""  # merged: the new content; conflict: the 'merged' artefact
    reason: str = ""  # one line
    artifacts: Mapping[str, bytes] = field(default_factory=dict)  # conflict: more artefacts
    # conflict: written live while the conflict is pending; None = the VM's version stays
    live: bytes | None = None
    # merged: the VM's files whose owner the merge renumbered (the planner chowns them),
    # and which owner field ("uid", "gid"; "": none renumbered here) they move
    owners: tuple[userdb.OwnerChange, ...] = ()
    renumbered: str = ""


Merger = Callable[[MergeInput], StructuredResult]


RENUMBERED: Final = "the VM's system accounts renumbered"
"""What a user database's reason says when the merge renumbered the VM's system accounts
(the CLI's text output lists those paths)."""


def keep_local(inp: MergeInput) -> StructuredResult:
    """The VM's version stays (a tool's own backup of a file)."""
    return StructuredResult(
        KEEP_LOCAL, reason=f"a tool's backup ({inp.path}): the VM's own kept, not merged"
    )


# -- the user databases --------------------------------------------------------------------------
PASSWD, GROUP, SHADOW, GSHADOW, SUBUID, SUBGID = (
    "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/subuid", "/etc/subgid",
)  # fmt: skip
_FORMATS = {
    PASSWD: userdb.PASSWD,
    GROUP: userdb.GROUP,
    SHADOW: userdb.SHADOW,
    GSHADOW: userdb.GSHADOW,
    SUBUID: userdb.SUBUID,
    SUBGID: userdb.SUBGID,
}
# One unit for pwck/grpck: users name their primary group, groups their members, shadow and
# gshadow their users and groups. A conflict in one makes all four conflicts, their live
# versions consistent (the same B1 users and groups left out of each).
_UNIT = (PASSWD, GROUP, SHADOW, GSHADOW)
USER_UNIT = _UNIT
# Not a file (nothing can be below /etc/passwd): the policy's action for this path is the
# setting of the automatic renumbering of system accounts (``merge``: on, the shipped rule;
# any other action: off, the clash stays a conflict for ``resolve --take proposal``).
RENUMBER_SYSTEM = "/etc/passwd/renumber-system-ids"


def _ranges(inp: MergeInput) -> userdb.IdRanges:
    """B1's ID ranges (the base is trusted; the VM's login.defs is not read)."""
    return userdb.id_ranges(
        inp.related("/etc/login.defs").new, inp.related("/etc/adduser.conf").new
    )


def _db(
    inp: MergeInput,
    path: str,
    v: Versions,
    *,
    follows: str = "",
    gid_moves: Mapping[int, int] | None = None,
) -> userdb.DbMerge:
    return userdb.merge(
        _FORMATS[path],
        v.old,
        v.local,
        v.new,
        ranges=_ranges(inp),
        upper=inp.upper(),
        gid_moves=gid_moves,
        follows=follows,
    )


def _own(inp: MergeInput, path: str) -> userdb.DbMerge:
    """``path``'s merge on its own entries (passwd: with group's renumberings of the VM's
    primary groups), computed once per planner run (``inp.memo``)."""
    key = f"userdb:{path}"
    done = inp.memo.get(key)
    if isinstance(done, userdb.DbMerge):
        return done
    v = inp.versions if path == inp.path else inp.related(path)
    if path == PASSWD:
        group = _own(inp, GROUP)
        moves = {r.old: r.new for r in group.renumberings if r.field == "gid"}
        result = _db(inp, path, v, gid_moves=moves)
    else:
        result = _db(inp, path, v)
    inp.memo[key] = result
    return result


def _merge_db(inp: MergeInput, path: str) -> userdb.DbMerge:
    """The merge of ``path``; one of passwd, group, shadow, gshadow is a conflict whenever
    another of them is (their live versions consistent until resolved: :func:`_live`)."""
    own = _own(inp, path)
    if path not in _UNIT:
        return own
    others = [
        p for p in _UNIT if p != path and (inp.related(p).too_large or not _own(inp, p).clean)
    ]
    if not others:
        return own
    them = "them" if len(others) > 1 else "it"
    follows = f"follows {', '.join(others)} (in conflict): resolve {them} too"
    v = inp.versions
    gid_moves = None
    if path == PASSWD:
        gid_moves = {r.old: r.new for r in _own(inp, GROUP).renumberings if r.field == "gid"}
    return _db(inp, path, v, follows=follows, gid_moves=gid_moves)


def _fields(line: userdb.LiveLine) -> list[bytes]:
    return line.raw.split(b":")


def _left_out(inp: MergeInput) -> tuple[frozenset[bytes], frozenset[bytes]] | None:
    """The users and groups of B1 left out of the live files while a conflict of the unit is
    pending (None: a file of the unit is too large to merge; the VM's files stay whole).

    Left out: B1's entries whose ID the VM's entry keeps (``DbMerge.clashing``), then, until
    nothing changes, B1's users whose primary group is left out (they would belong to the
    VM's group of that GID) and a left-out user's own group (B1's group of its name and
    primary GID, when no kept user has it as primary group)."""
    done = inp.memo.get("userdb:left-out")
    if isinstance(done, tuple):
        return done
    if any(inp.related(p).too_large for p in _UNIT if p != inp.path) or (
        inp.path in _UNIT and inp.versions.too_large
    ):
        return None
    passwd, group = _own(inp, PASSWD), _own(inp, GROUP)
    users, groups = set(passwd.clashing), set(group.clashing)
    pw = [(ln, _fields(ln)) for ln in passwd.lines if ln.key[0]]
    # only B1's lines can be left out: the loops below run over those (B1, trusted, is
    # small; a guest's file of any size is read once)
    theirs_pw = [(ln.key[1], f[3]) for ln, f in pw if ln.theirs and len(f) > 3]
    theirs_gr = {
        (ln.key[1], f[2]): ln
        for ln in group.lines
        if ln.key[0] and ln.theirs and len(f := _fields(ln)) > 2
    }
    primary = Counter(f[3] for ln, f in pw if len(f) > 3)  # users of each primary GID
    for name, gid in theirs_pw:
        if name in users:
            primary[gid] -= 1
    changed = True
    while changed:
        changed = False
        gone_gids = {gid for name, gid in theirs_gr if name in groups}
        for name, gid in theirs_pw:
            if name not in users and gid in gone_gids:  # B1's user of a left-out group
                users.add(name)
                primary[gid] -= 1
                changed = True
        for name, gid in theirs_pw:  # a left-out user's own group, when no one else's
            own = name in users and name not in groups and (name, gid) in theirs_gr
            if own and primary[gid] <= 0:
                groups.add(name)
                changed = True
    out = (frozenset(users), frozenset(groups))
    inp.memo["userdb:left-out"] = out
    return out


def _live(inp: MergeInput) -> bytes | None:
    """The live file while the conflict is pending: both sides' entries that do not clash,
    for a clash the VM's entry (never two names with one ID, never the VM's files given
    to B1's user), consistent across passwd, group, shadow and gshadow."""
    left = None if inp.versions.too_large else _left_out(inp)
    if left is None:
        return None
    users, groups = left
    if isinstance(_auto(inp), _Auto):  # the unit took its proposal: no user is left out
        users = groups = frozenset()
    own = _own(inp, inp.path)
    if inp.path in (PASSWD, SHADOW):
        return userdb.live(own, users)
    if inp.path in (GROUP, GSHADOW):
        return userdb.live(own, groups, users)
    return userdb.live(own, own.clashing | users)  # subuid/subgid: their names are users'


@dataclass(frozen=True, slots=True)
class _Auto:
    """The unit's proposal taken at once: what moves, and the files it concerns."""

    moves: str  # "foo uid 999 → 100, foo gid 999 → 100", shortened


def _unsafe(entry: Entry) -> str:
    """Why reconcile does not chown ``entry`` itself ("": it does). The chown is a copy
    renamed over the staging tree's entry (its inode is shared with the live layer)."""
    if entry.kind in (CHR, BLK, FIFO, SOCK):
        return f"{entry.kind} node"
    if entry.link is not None and entry.kind in (FILE, SYMLINK):
        return "hardlinked file"
    if entry.kind == FILE and entry.size >= LARGE_FILE:
        return f"file of {entry.size >> 20} MiB"
    return ""


def _auto(inp: MergeInput) -> _Auto | str | None:
    """Whether the unit's proposal is taken at once: an :class:`_Auto` when every conflict
    of passwd, group, shadow and gshadow is a clash of system accounts with a proposal
    (:attr:`userdb.DbMerge.system_only`), the setting is on and every file to chown can be;
    else why not (a string, when some clash is one of system accounts), or ``None``."""
    key = "userdb:auto"
    if key in inp.memo:
        done = inp.memo[key]
        return done if isinstance(done, _Auto | str) else None
    out: _Auto | str | None = None
    if not any(inp.related(p).too_large for p in _UNIT if p != inp.path) and not (
        inp.path in _UNIT and inp.versions.too_large
    ):
        merges = [_own(inp, p) for p in _UNIT]
        dirty = [m for m in merges if not m.clean]
        if any(c.system for m in dirty for c in m.conflicts):
            out = _auto_why(inp, dirty, merges)
    inp.memo[key] = out
    return out


def _auto_why(
    inp: MergeInput, dirty: list[userdb.DbMerge], merges: list[userdb.DbMerge]
) -> _Auto | str:
    if not inp.renumber_system:
        return f"the policy turns it off ({RENUMBER_SYSTEM})"
    if not all(m.system_only for m in dirty):
        return "other entries of the user databases conflict too"
    owned = {o.path for m in merges for o in m.owners}
    for entry in inp.upper():
        if entry.path in owned and (why := _unsafe(entry)):
            return f"{shown(entry.path, 200)} is a {why}"
    moves = [r.describe() for m in merges for r in m.renumberings]
    named = ", ".join(moves[:_AUTO_SHOWN]) + (
        f" (+{len(moves) - _AUTO_SHOWN} more)" if len(moves) > _AUTO_SHOWN else ""
    )
    return _Auto(named)


_AUTO_SHOWN = 4  # renumberings named in one reason


def user_database(inp: MergeInput) -> StructuredResult:
    """passwd, group, shadow, gshadow, subuid, subgid merged by name (:mod:`userdb`); a
    conflict gives the live content of :func:`_live` while it is pending, or, when it is
    only a clash of system accounts (:func:`_auto`), its proposal at once."""
    result = _merge_db(inp, inp.path)
    if result.clean:
        return StructuredResult(MERGED, result.data, result.reason())
    auto = _auto(inp) if inp.path in _UNIT else None
    if isinstance(auto, _Auto):
        own = _own(inp, inp.path)
        data = own.data if own.clean else own.proposal
        assert data is not None  # system_only: a complete proposal
        why = (
            f"{own.fmt.name} merged by name, {RENUMBERED} where B1's new ones took their "
            f"IDs: {auto.moves}"
        )
        which = own.fmt.owner if own.fmt.id_field is not None else ""
        return StructuredResult(MERGED, data, why, owners=own.owners, renumbered=which)
    artifacts: dict[str, bytes] = {}
    if result.proposal is not None:
        artifacts["proposal"] = result.proposal
    if result.owners:
        artifacts["proposal-owners"] = result.owners_json()
    reason = result.reason()
    if isinstance(auto, str):
        reason += f" (system accounts not renumbered automatically: {auto})"
    return StructuredResult(CONFLICT, result.data, reason, artifacts, live=_live(inp))


MERGERS: dict[str, Merger] = {path: user_database for path in _FORMATS}
MERGERS.update({path + "-": keep_local for path in _FORMATS})


def debconf_database(inp: MergeInput) -> StructuredResult:
    """debconf's config, passwords and templates merged record by record (:mod:`debconf`)."""
    v = inp.versions
    result = debconf.merge(debconf.FORMATS[inp.path], v.old, v.local, v.new)
    return StructuredResult(MERGED if result.clean else CONFLICT, result.data, result.reason)


MERGERS.update({path: debconf_database for path in debconf.FORMATS})


# -- dpkg's database (issue 12, item 2) ------------------------------------------------------------
def _triple(v: Versions) -> dpkgdb.Triple:
    return (None, None, None) if v.too_large else (v.old, v.local, v.new)


def dpkg_database(inp: MergeInput) -> StructuredResult:
    """dpkg's status and info files per package, alternatives, diversions, statoverride,
    apt's extended_states (:mod:`unionimg.reconcile.dpkgdb`)."""
    result = dpkgdb.merge_file(
        inp.path, _triple(inp.versions), lambda p: _triple(inp.related(p)), inp.memo
    )
    return StructuredResult(
        result.outcome, result.data, result.reason, result.artifacts, live=result.live
    )


MERGERS.update({path: dpkg_database for path in dpkgdb.EXACT})
MERGERS.update({path: keep_local for path in dpkgdb.BACKUPS})


def merger_for(path: str) -> Merger | None:
    """The structured merger of ``path``: an exact path of :data:`MERGERS`, then the patterns
    (dpkg's ``info/PKG.*`` files and ``alternatives/NAME``)."""
    merger = MERGERS.get(path)
    if merger is None and dpkgdb.handles(path):
        return dpkg_database
    return merger
