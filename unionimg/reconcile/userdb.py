"""User databases merged by name: passwd, group, shadow, gshadow, subuid, subgid. Pure.

A line-level text merge of ``/etc/passwd`` sees two users appended at the same end of the
file as overlapping lines (a conflict), and two users given the same UID as separate lines (a
silent duplicate: the base's files then belong to the VM's user). Here the three versions
(B0 = the ancestor, local = the VM's, B1 = the new base) are merged **by name**, as
systemd-sysusers allocates by name:

* Every line is kept. A line is an *entry* when it has a ``:`` and a name before it (not a
  comment, not a NIS ``+``/``-`` line); any other line (comment, blank, odd) is merged as an
  opaque line by its text. A name that occurs twice (a guest's passwd can hold anything)
  keys its second line as its second occurrence: nothing is dropped, nothing is assumed.
* An entry both sides kept stays; an entry added, changed or removed on one side takes that
  side; the same name changed on both sides merges per field where a field differs on one
  side only, member lists (``group`` members, ``gshadow`` admins and members) merge as sets;
  any other difference is a conflict on that entry (removed on one side and changed on the
  other is one too).
* An ID (UID, GID) that the merge would give to two names, one side's each, is a conflict
  carrying a proposal: the VM's entry renumbered to the next free ID of the same range
  (system below ``UID_MIN``/``GID_MIN``, login from there up, as ``/etc/login.defs`` or
  ``adduser.conf`` of B1 define them), with the ownership changes it implies for the VM's
  own files (all of the VM's names holding that ID move together, their files listed once).
  An ID both sides give to one same name (root's 0) is shared on purpose: other names with
  it are aliases, not collisions. The same name given different IDs by both sides proposes
  B1's ID (when no other name of the VM has it) and the same ownership changes. At most
  256 renumberings are proposed per file (a guest's file may hold any number of entries).
  A clash of an ID in the system range (``SYS_UID_MIN..SYS_UID_MAX``) whose proposal stays
  there is marked ``EntryConflict.system``; a merge whose conflicts are all such is
  ``DbMerge.system_only``, and reconcile may take its proposal itself (structured.py).
* subuid/subgid ranges of different names that the merge would make overlap are a conflict
  proposing the VM's range moved to the first free place (from ``SUB_UID_MIN``).
* A file that *follows* another (``follows``: the caller,
  :mod:`unionimg.reconcile.structured`, makes passwd, group, shadow and gshadow follow each
  other; passwd follows group's renumberings of the primary groups its VM entries use) is a
  conflict when the one it follows is, so the live set stays the VM's consistent one.
* Order: B1's lines in B1's order, then the VM's additions in the VM's order.
* While a conflict is pending, :func:`live` gives the live file: every line of the merge,
  each conflicting entry the VM's own, without B1's entries whose ID or range clashes with
  the VM's (``DbMerge.clashing``) and what the caller leaves out with them (the structured
  merger keeps the four files consistent).

Nothing here reads a file: :func:`merge` takes bytes (``None``: no such file) and the VM's
upper entries (for the ownership changes) and returns a :class:`DbMerge`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Literal

from unionimg.entries import WHITEOUT, Entry

__all__ = [
    "FORMATS",
    "GROUP",
    "GSHADOW",
    "PASSWD",
    "SHADOW",
    "SUBGID",
    "SUBUID",
    "DbMerge",
    "EntryConflict",
    "Format",
    "IdRanges",
    "Line",
    "LiveLine",
    "OwnerChange",
    "Renumbering",
    "id_ranges",
    "live",
    "merge",
    "parse",
]

ID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to chown
_SHOW_NAME = 64  # characters of a name shown in a reason line
_SHOW_CONFLICTS = 3  # entries named in one reason line
_PROPOSALS_MAX = 256  # renumberings proposed for one file; further conflicts get none


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    fields: tuple[str, ...]
    id_field: int | None = None  # index of the UID/GID field
    sets: frozenset[int] = frozenset()  # comma-separated member lists, merged as sets
    secret: frozenset[int] = frozenset()  # never shown in a reason line
    ranges: bool = False  # subuid/subgid: name:start:count
    owner: Literal["uid", "gid"] = "uid"  # which owner its IDs (or ranges) are


PASSWD = Format(
    "passwd", ("name", "password", "uid", "gid", "gecos", "home", "shell"), 2,
    secret=frozenset({1}), owner="uid",
)  # fmt: skip
GROUP = Format(
    "group", ("name", "password", "gid", "members"), 2,
    sets=frozenset({3}), secret=frozenset({1}), owner="gid",
)  # fmt: skip
SHADOW = Format(
    "shadow",
    ("name", "password", "lastchg", "min", "max", "warn", "inactive", "expire", "reserved"),
    secret=frozenset({1}),
)
GSHADOW = Format(
    "gshadow", ("name", "password", "admins", "members"),
    sets=frozenset({2, 3}), secret=frozenset({1}), owner="gid",
)  # fmt: skip
SUBUID = Format("subuid", ("name", "start", "count"), ranges=True, owner="uid")
SUBGID = Format("subgid", ("name", "start", "count"), ranges=True, owner="gid")
FORMATS = {f.name: f for f in (PASSWD, GROUP, SHADOW, GSHADOW, SUBUID, SUBGID)}


# -- the ID ranges of login.defs / adduser.conf ------------------------------------------------
@dataclass(frozen=True, slots=True)
class IdRanges:
    """Inclusive ranges new IDs are taken from (Debian's defaults unless B1 says otherwise)."""

    uid_system: tuple[int, int] = (100, 999)
    uid_login: tuple[int, int] = (1000, 60000)
    gid_system: tuple[int, int] = (100, 999)
    gid_login: tuple[int, int] = (1000, 60000)
    subuid: tuple[int, int] = (100000, 600100000)
    subgid: tuple[int, int] = (100000, 600100000)

    def for_id(self, owner: Literal["uid", "gid"], old: int) -> tuple[int, int]:
        """The range a renumbered ``old`` stays in: system below the login range, else login."""
        system, login = (
            (self.uid_system, self.uid_login)
            if owner == "uid"
            else (self.gid_system, self.gid_login)
        )
        return system if old < login[0] else login

    def system(self, owner: Literal["uid", "gid"]) -> tuple[int, int]:
        """SYS_UID_MIN..SYS_UID_MAX (or the GID pair): the IDs of system accounts."""
        return self.uid_system if owner == "uid" else self.gid_system


def _login_defs(data: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for raw in data.split(b"\n"):
        words = raw.split()
        if len(words) >= 2 and not words[0].startswith(b"#"):
            value = _number(words[1])
            if value is not None:
                out[words[0].decode("ascii", "replace")] = value
    return out


def _adduser_conf(data: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for raw in data.split(b"\n"):
        line = raw.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        key, _, value = line.partition(b"=")
        number = _number(value.strip().strip(b"\"'"))
        if number is not None:
            out[key.strip().decode("ascii", "replace")] = number
    return out


_DEFS_KEYS = {  # IdRanges field -> (login.defs min, max), (adduser.conf first, last)
    "uid_system": (("SYS_UID_MIN", "SYS_UID_MAX"), ("FIRST_SYSTEM_UID", "LAST_SYSTEM_UID")),
    "uid_login": (("UID_MIN", "UID_MAX"), ("FIRST_UID", "LAST_UID")),
    "gid_system": (("SYS_GID_MIN", "SYS_GID_MAX"), ("FIRST_SYSTEM_GID", "LAST_SYSTEM_GID")),
    "gid_login": (("GID_MIN", "GID_MAX"), ("FIRST_GID", "LAST_GID")),
    "subuid": (("SUB_UID_MIN", "SUB_UID_MAX"), ("", "")),
    "subgid": (("SUB_GID_MIN", "SUB_GID_MAX"), ("", "")),
}


def id_ranges(login_defs: bytes | None = None, adduser_conf: bytes | None = None) -> IdRanges:
    """The ranges of B1's ``/etc/login.defs`` (useradd's), then ``/etc/adduser.conf`` for what
    login.defs leaves unset, then Debian's defaults. A bound that makes no sense (min > max)
    leaves that range at its default."""
    defs = _login_defs(login_defs) if login_defs else {}
    conf = _adduser_conf(adduser_conf) if adduser_conf else {}
    default = IdRanges()
    values: dict[str, tuple[int, int]] = {}
    for attr, ((dmin, dmax), (cmin, cmax)) in _DEFS_KEYS.items():
        lo, hi = getattr(default, attr)
        lo = defs.get(dmin, conf.get(cmin, lo))
        hi = defs.get(dmax, conf.get(cmax, hi))
        values[attr] = (lo, hi) if lo <= hi else getattr(default, attr)
    return IdRanges(**values)


# -- parsing -----------------------------------------------------------------------------------
Key = tuple[bool, bytes, int]  # (is an entry, its name or the whole line, occurrence number)


@dataclass(frozen=True, slots=True)
class Line:
    raw: bytes  # without its newline
    key: Key

    @property
    def is_entry(self) -> bool:
        return self.key[0]

    @property
    def name(self) -> bytes:
        return self.key[1] if self.key[0] else b""

    @property
    def fields(self) -> list[bytes]:
        return self.raw.split(b":")


def _entry_name(raw: bytes) -> bytes | None:
    name, colon, _ = raw.partition(b":")
    if not colon or not name.strip():
        return None
    if name.lstrip().startswith((b"#", b"+", b"-")):  # comment, NIS include/exclude
        return None
    return name


def parse(data: bytes | None) -> list[Line]:
    """Every line of ``data`` (``None``: no file), each with its merge key. The newline of
    the last line is optional; ``\\r`` and NUL bytes are kept as part of the line."""
    if not data:
        return []
    raws = data.split(b"\n")
    if raws[-1] == b"":
        raws.pop()
    seen: dict[tuple[bool, bytes], int] = {}
    out = []
    for raw in raws:
        name = _entry_name(raw)
        base = (True, name) if name is not None else (False, raw)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.append(Line(raw, (base[0], base[1], count)))
    return out


def _number(text: bytes) -> int | None:
    """A decimal ID (ASCII digits only, at most ID_MAX), else None."""
    if not text or len(text) > 10 or not text.isdigit():
        return None
    value = int(text)
    return value if value <= ID_MAX else None


def _id_of(fmt: Format, line: Line | None) -> int | None:
    if line is None or fmt.id_field is None or not line.is_entry:
        return None
    fields = line.fields
    return _number(fields[fmt.id_field]) if len(fields) > fmt.id_field else None


def _range_of(line: Line | None) -> tuple[int, int] | None:
    """(start, end exclusive) of a subuid/subgid line, None if malformed or empty."""
    if line is None or not line.is_entry:
        return None
    fields = line.fields
    if len(fields) != 3:
        return None
    start, count = _number(fields[1]), _number(fields[2])
    if start is None or not count:
        return None
    return start, start + count


# -- results -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OwnerChange:
    """chown one path of the VM's upper layer: its ``field`` from ``old`` to ``new``."""

    path: str
    field: Literal["uid", "gid"]
    old: int
    new: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True, slots=True)
class Renumbering:
    """The VM's entry ``name`` moved from ``old`` to ``new`` (for ranges: start, ``count``)."""

    name: bytes
    field: str  # uid, gid, subuid, subgid
    old: int
    new: int
    count: int = 1

    def describe(self) -> str:
        if self.count > 1:
            return f"{_show(self.name)} {self.field} range {self.old}+{self.count} → {self.new}"
        return f"{_show(self.name)} {self.field} {self.old} → {self.new}"


@dataclass(frozen=True, slots=True)
class EntryConflict:
    key: Key
    why: str  # one phrase, names shown escaped
    local: Line | None
    old: Line | None
    new: Line | None
    proposal: Line | None = None  # the VM's entry as proposed (None: no proposal)
    # an ID both sides gave a system account (in SYS_UID_MIN..SYS_UID_MAX, or the GID
    # pair), the proposal a free system ID: reconcile may take it itself (structured.py)
    system: bool = False


@dataclass(frozen=True, slots=True)
class LiveLine:
    """One line of the merge as the live file holds it while a conflict is pending: the
    merged line, or the VM's own for a conflicting entry. ``theirs``: the line is B1's alone
    (the VM does not have it as it is), so it may be left out (:func:`live`)."""

    key: Key
    raw: bytes
    theirs: bool


@dataclass(frozen=True, slots=True)
class DbMerge:
    fmt: Format
    clean: bool
    data: bytes  # clean: the merged file; else the ``merged`` artefact (marker blocks)
    proposal: bytes | None = None  # not clean: the file with every proposal applied, if any
    conflicts: tuple[EntryConflict, ...] = ()
    renumberings: tuple[Renumbering, ...] = ()
    owners: tuple[OwnerChange, ...] = ()
    follows: str = ""  # not clean only because the file it follows conflicts
    summary: str = ""  # clean: what was merged, one phrase
    lines: tuple[LiveLine, ...] = ()  # the merge with each conflicting entry the VM's own
    clashing: frozenset[bytes] = frozenset()  # B1's names whose ID/range a VM entry keeps

    def reason(self) -> str:
        """One line: what conflicts and what is proposed (or what was merged)."""
        if self.clean:
            return f"{self.fmt.name} merged by name: {self.summary}"
        parts = []
        if self.conflicts:
            shown = "; ".join(c.why for c in self.conflicts[:_SHOW_CONFLICTS])
            more = len(self.conflicts) - _SHOW_CONFLICTS
            n = len(self.conflicts)
            parts.append(
                f"{self.fmt.name}: {n} entr{'y' if n == 1 else 'ies'} conflict by name: {shown}"
                + (f" (+{more} more)" if more > 0 else "")
            )
        if self.follows:
            parts.append(self.follows)
        if self.renumberings:
            moves = ", ".join(r.describe() for r in self.renumberings[:_SHOW_CONFLICTS])
            more = len(self.renumberings) - _SHOW_CONFLICTS
            owners = f"; {len(self.owners)} of the VM's files to chown" if self.owners else ""
            parts.append(f"proposal: {moves}{f' (+{more} more)' if more > 0 else ''}{owners}")
        if self.proposal is not None:
            parts.append("take it with the 'proposal' file")
        else:
            parts.append("no complete proposal: edit 'merged'")
        return "; ".join(parts)

    @property
    def system_only(self) -> bool:
        """A conflict only because system accounts of both sides were given one ID (or
        because of a group renumbering passwd follows), every clash with a proposal: the
        proposal renumbers the VM's system accounts to free system IDs."""
        return (
            not self.clean
            and self.proposal is not None
            and all(c.system for c in self.conflicts)
            and not self.fmt.ranges
        )

    def owners_json(self) -> bytes:
        """The ownership changes as a JSON list (the ``proposal-owners`` artefact)."""
        return (json.dumps([o.to_json() for o in self.owners], indent=1) + "\n").encode()


def _show(name: bytes) -> str:
    """A name fit for a one-line message: escaped, cut to _SHOW_NAME characters."""
    text = name[: _SHOW_NAME * 4].decode("utf-8", "backslashreplace")
    text = "".join(
        ch if ch.isprintable() and ch not in "\\'" else ch.encode("unicode_escape").decode()
        for ch in text
    )
    return text[:_SHOW_NAME] + ("…" if len(text) > _SHOW_NAME else "")


# -- merging -----------------------------------------------------------------------------------
Origin = Literal["both", "local", "b1", "fields"]


@dataclass(slots=True)
class _Outcome:
    line: bytes | None  # None: the entry is gone
    origin: Origin
    conflict: EntryConflict | None = None
    proposed: bytes | None = None  # an adjustment proposed for a clean line (renumbering)


def _set_merge(o: bytes | None, local: bytes, new: bytes) -> bytes:
    def items(v: bytes | None) -> list[bytes]:
        return [x for x in v.split(b",") if x] if v else []

    oi, li, ni = items(o), items(local), items(new)
    os_, ls, ns = set(oi), set(li), set(ni)
    keep = [x for x in ni if x in ls or x not in os_]  # B1's, minus the VM's removals
    keep += [x for x in li if x not in ns and x not in os_]  # the VM's additions
    return b",".join(dict.fromkeys(keep))


def _field_merge(
    fmt: Format, o: Line | None, local: Line, new: Line
) -> tuple[list[bytes] | None, list[int], str]:
    """Merge one entry changed on both sides per field: (fields, conflicting indexes, why)."""
    of = o.fields if o is not None else None
    lf, nf = local.fields, new.fields
    if len(lf) != len(nf) or (of is not None and len(of) != len(lf)):
        return None, [], "changed on both sides with different numbers of fields"
    out: list[bytes] = []
    bad: list[int] = []
    for i, (lv, nv) in enumerate(zip(lf, nf, strict=True)):
        ov = of[i] if of is not None else None
        if lv == nv:
            out.append(lv)
        elif i in fmt.sets:
            out.append(_set_merge(ov, lv, nv))
        elif ov is not None and lv == ov:
            out.append(nv)
        elif ov is not None and nv == ov:
            out.append(lv)
        else:
            out.append(lv)
            bad.append(i)
    return out, bad, ""


def _field_why(fmt: Format, bad: Sequence[int], local: Line, new: Line, added: bool) -> str:
    names = []
    for i in bad:
        label = fmt.fields[i] if i < len(fmt.fields) else f"field {i + 1}"
        if i in fmt.secret or (i != fmt.id_field and not fmt.ranges):
            names.append(label)
        else:
            names.append(f"{label} local {_show(local.fields[i])} / B1 {_show(new.fields[i])}")
    how = "added differently on both sides" if added else "changed differently on both sides"
    return f"{how}: " + ", ".join(names)


class _Merger:
    def __init__(
        self,
        fmt: Format,
        old: bytes | None,
        local: bytes | None,
        new: bytes | None,
        ranges: IdRanges,
        upper: Iterable[Entry],
        gid_moves: Mapping[int, int],
    ) -> None:
        self.fmt = fmt
        self.ranges = ranges
        self.upper = upper
        self.gid_moves = gid_moves
        self.o = {ln.key: ln for ln in parse(old)}
        self.local_lines = parse(local)
        self.new_lines = parse(new)
        self.l = {ln.key: ln for ln in self.local_lines}
        self.n = {ln.key: ln for ln in self.new_lines}
        self.out: dict[Key, _Outcome] = {}
        self.renumberings: list[Renumbering] = []
        self.owners: list[OwnerChange] = []
        self._index: dict[str, list[tuple[int, str]]] = {}
        self.clashing: set[bytes] = set()

    # -- per key -----------------------------------------------------------------------------
    def order(self) -> list[Key]:
        keys = [ln.key for ln in self.new_lines]
        keys += [ln.key for ln in self.local_lines if ln.key not in self.n]
        return keys  # keys only B0 had are gone on both sides

    def decide(self, key: Key) -> _Outcome:
        o, local, new = self.o.get(key), self.l.get(key), self.n.get(key)
        lr, nr, orr = (x.raw if x else None for x in (local, new, o))
        if lr == nr:
            return _Outcome(lr, "both")
        if lr == orr:
            return _Outcome(nr, "b1")
        if nr == orr:
            return _Outcome(lr, "local")
        name = _show(key[1]) if key[0] else "a line"
        if local is None or new is None:
            side = "removed in B1, changed locally" if local else "removed locally, changed in B1"
            conflict = EntryConflict(key, f"{name}: {side}", local, o, new)
            return _Outcome(lr, "local", conflict)
        fields, bad, why = _field_merge(self.fmt, o, local, new)
        if fields is None:
            return _Outcome(lr, "local", EntryConflict(key, f"{name}: {why}", local, o, new))
        if not bad:
            return _Outcome(b":".join(fields), "fields")
        conflict = EntryConflict(
            key, f"{name}: {_field_why(self.fmt, bad, local, new, o is None)}", local, o, new
        )
        proposal = self._same_name_proposal(key, fields, bad, local, new)
        if proposal is not None:
            conflict = EntryConflict(
                key, conflict.why, local, o, new, Line(b":".join(proposal), key)
            )
        return _Outcome(lr, "fields", conflict)

    def _same_name_proposal(
        self, key: Key, fields: list[bytes], bad: list[int], local: Line, new: Line
    ) -> list[bytes] | None:
        """Both sides gave this name different IDs (and agree or merge on the rest): propose
        B1's ID for the VM's entry, when no other name of the VM uses it."""
        fmt, idf = self.fmt, self.fmt.id_field
        out = list(fields)
        moves = []
        for i in bad:
            lid, nid = _number(local.fields[i]), _number(new.fields[i])
            if lid is None or nid is None:
                return None
            if i == idf:
                if any(_id_of(fmt, ln) == nid and k != key for k, ln in self.l.items()):
                    return None
                moves.append((lid, nid))
            elif not (fmt is PASSWD and i == 3 and self.gid_moves.get(lid) == nid):
                return None  # (a primary GID group's proposal moves to B1's is fine)
            out[i] = new.fields[i]
        if not self._may_propose():
            return None
        for lid, nid in moves:
            self._renumber([key[1]], fmt.owner, lid, nid)
        return out

    # -- IDs -----------------------------------------------------------------------------
    def _renumber(
        self,
        names: Sequence[bytes],
        owner: Literal["uid", "gid"],
        old: int,
        new: int,
        count: int = 1,
    ) -> None:
        """Record the move of ``names`` (the VM's entries holding ``old``) and the VM's
        files whose owner it changes (listed once, whichever of the names owns them)."""
        label = f"sub{owner}" if self.fmt.ranges else owner
        for name in names:
            self.renumberings.append(Renumbering(name, label, old, new, count))
        index = self._owned(owner)
        at = bisect.bisect_left(index, (old, ""))
        while at < len(index) and index[at][0] < old + count:
            value, path = index[at]
            self.owners.append(OwnerChange(path, owner, value, value - old + new))
            at += 1

    def _owned(self, owner: Literal["uid", "gid"]) -> list[tuple[int, str]]:
        """(owner ID, path) of the VM's upper entries, sorted (built once per field)."""
        if owner not in self._index:
            self._index[owner] = sorted(
                (e.uid if owner == "uid" else e.gid, e.path)
                for e in self.upper
                if e.kind != WHITEOUT
            )
        return self._index[owner]

    def _may_propose(self) -> bool:
        """A guest's file can hold any number of colliding entries: past _PROPOSALS_MAX
        the rest are conflicts without a proposal (the cost stays bounded)."""
        return len(self.renumberings) < _PROPOSALS_MAX

    def used_ids(self) -> set[int]:
        used = set()
        for table in (self.o, self.l, self.n):
            for ln in table.values():
                value = _id_of(self.fmt, ln)
                if value is not None:
                    used.add(value)
        return used

    def check_ids(self, keys: Sequence[Key]) -> None:
        """Two names given one ID by different sides: renumber the VM's."""
        fmt, idf = self.fmt, self.fmt.id_field
        assert idf is not None
        by_id: dict[int, list[Key]] = {}
        for key in keys:
            out = self.out[key]
            if out.conflict is None and out.line is not None and key[0]:
                value = _id_of(fmt, Line(out.line, key))
                if value is not None:
                    by_id.setdefault(value, []).append(key)
        alloc = _Allocator(self.used_ids())
        lid = {k: _id_of(fmt, ln) for k, ln in self.l.items()}  # each line split once
        nid = {k: _id_of(fmt, ln) for k, ln in self.n.items()}
        for value, holders in sorted(by_id.items()):
            if len({k[1] for k in holders}) < 2:
                continue
            mine = [k for k in holders if lid.get(k) == value and nid.get(k) != value]
            names = {k[1] for k in mine}
            others = list(dict.fromkeys(
                k[1] for k in holders
                if k[1] not in names and nid.get(k) == value and lid.get(k) != value
            ))  # fmt: skip
            if not mine or not others:
                continue  # one side's own duplicates: not the merge's doing
            if any(lid.get(k) == value == nid.get(k) for k in holders):
                continue  # both sides give it to one name (root's 0): the others are aliases
            self.clashing.update(others)  # left out of the live file: the VM's entry keeps it
            lo, hi = self.ranges.for_id(fmt.owner, value)
            new = alloc.take(value, lo, hi) if self._may_propose() else None
            sys_lo, sys_hi = self.ranges.system(fmt.owner)
            system = new is not None and sys_lo <= value <= sys_hi and sys_lo <= new <= sys_hi
            who = ", ".join(_show(name) for name in others[:_SHOW_CONFLICTS])
            for key in mine:
                why = f"{_show(key[1])}: {fmt.owner} {value} is also {who}'s in B1"
                out = self.out[key]
                assert out.line is not None
                proposal = None
                if new is None:
                    why += (
                        f" and no {fmt.owner} is free in {lo}-{hi}"
                        if self._may_propose()
                        else " (too many conflicts to propose more)"
                    )
                else:
                    fields = Line(out.line, key).fields
                    fields[idf] = str(new).encode()
                    proposal = Line(b":".join(fields), key)
                out.conflict = EntryConflict(
                    key, why, self.l.get(key), self.o.get(key), self.n.get(key), proposal, system
                )
            if new is not None:
                self._renumber(list(dict.fromkeys(k[1] for k in mine)), fmt.owner, value, new)

    def move_groups(self, keys: Sequence[Key]) -> list[str]:
        """passwd: the VM's entries whose primary group the group merge renumbers."""
        moved = []
        for key in keys:
            out = self.out[key]
            local = self.l.get(key)
            if out.line is None or local is None or not key[0]:
                continue
            line = Line(
                out.conflict.proposal.raw
                if out.conflict and out.conflict.proposal
                else out.proposed or out.line,
                key,
            )
            fields = line.fields
            lf, nn = local.fields, self.n.get(key)
            if len(fields) < 4 or len(lf) < 4:
                continue
            gid = _number(lf[3])
            if gid is None or gid not in self.gid_moves or _number(fields[3]) != gid:
                continue
            if nn is not None and len(nn.fields) >= 4 and _number(nn.fields[3]) == gid:
                continue  # B1's entry of this name has that GID: not the VM's group
            fields[3] = str(self.gid_moves[gid]).encode()
            if out.conflict is not None:
                if out.conflict.proposal is not None:
                    out.conflict = replace(out.conflict, proposal=Line(b":".join(fields), key))
            else:
                out.proposed = b":".join(fields)
            moved.append(f"{_show(key[1])} gid {gid} → {self.gid_moves[gid]}")
        return moved

    def check_ranges(self, keys: Sequence[Key]) -> None:
        """subuid/subgid: the VM's range overlapping another name's range from B1."""
        mine: list[tuple[Key, tuple[int, int]]] = []
        theirs: list[tuple[bytes, tuple[int, int]]] = []
        for key in keys:
            out = self.out[key]
            if out.conflict is not None or out.line is None or not key[0]:
                continue
            rng = _range_of(Line(out.line, key))
            if rng is None:
                continue
            local, b1 = self.l.get(key), self.n.get(key)
            lr, nr = (local.raw if local else None), (b1.raw if b1 else None)
            if out.line == lr and out.line != nr:
                mine.append((key, rng))
            elif out.line == nr and out.line != lr:
                theirs.append((key[1], rng))
        if not mine or not theirs:
            return
        taken = [r for t in (self.o, self.l, self.n) for r in map(_range_of, t.values()) if r]
        lo, hi = self.ranges.subuid if self.fmt.owner == "uid" else self.ranges.subgid
        for key, (start, end) in mine:
            hit = [name for name, (s, e) in theirs if name != key[1] and s < end and start < e]
            if not hit:
                continue
            count = end - start
            self.clashing.update(hit)
            who = ", ".join(_show(h) for h in hit[:_SHOW_CONFLICTS])
            why = f"{_show(key[1])}: range {start}+{count} overlaps {who}'s in B1"
            moved = _free_range(count, lo, hi, taken) if self._may_propose() else None
            out = self.out[key]
            assert out.line is not None
            proposal = None
            if moved is None:
                why += (
                    f" and no free range of {count} in {lo}-{hi}"
                    if self._may_propose()
                    else " (too many conflicts to propose more)"
                )
            else:
                taken.append((moved, moved + count))
                fields = Line(out.line, key).fields
                fields[1] = str(moved).encode()
                proposal = Line(b":".join(fields), key)
                self._renumber([key[1]], self.fmt.owner, start, moved, count)
            out.conflict = EntryConflict(
                key, why, self.l.get(key), self.o.get(key), self.n.get(key), proposal
            )

    # -- driving -------------------------------------------------------------------------
    def run(self, follows: str) -> DbMerge:
        keys = self.order()
        for key in dict.fromkeys([*keys, *self.o]):
            self.out[key] = self.decide(key)
        if self.fmt.id_field is not None:
            self.check_ids(keys)
        if self.fmt.ranges:
            self.check_ranges(keys)
        moved = self.move_groups(keys) if self.fmt is PASSWD and self.gid_moves else []
        # keys only B0 had are gone on both sides: never a conflict, not in ``keys``
        conflicts = tuple(c for k in keys if (c := self.out[k].conflict) is not None)
        if moved:
            more = len(moved) - _SHOW_CONFLICTS
            shown = ", ".join(moved[:_SHOW_CONFLICTS]) + (f" (+{more} more)" if more > 0 else "")
            follows = "; ".join(x for x in (follows, f"follows group's renumbering: {shown}") if x)
        clean = not conflicts and not follows
        merged = self._render(keys, proposal=False)
        proposal = None
        if not clean and all(c.proposal is not None for c in conflicts):
            proposal = self._render(keys, proposal=True)
        return DbMerge(
            self.fmt,
            clean,
            merged,
            proposal,
            conflicts,
            tuple(self.renumberings),
            tuple(self.owners),
            follows,
            self._summary(keys),
            self._live_lines(keys),
            frozenset(self.clashing),
        )

    def _live_lines(self, keys: Sequence[Key]) -> tuple[LiveLine, ...]:
        out = []
        for key in keys:
            line = self.out[key].line  # a conflicting entry: the VM's (or its merged) line
            if line is None:
                continue
            new, local = self.n.get(key), self.l.get(key)
            theirs = new is not None and new.raw == line and (local is None or local.raw != line)
            out.append(LiveLine(key, line, theirs))
        return tuple(out)

    def _render(self, keys: Sequence[Key], *, proposal: bool) -> bytes:
        out: list[bytes] = []
        for key in keys:
            res = self.out[key]
            c = res.conflict
            if c is None:
                line = res.proposed if proposal and res.proposed is not None else res.line
                if line is not None:
                    out.append(line + b"\n")
            elif proposal:
                assert c.proposal is not None
                out.append(c.proposal.raw + b"\n")
            else:
                out.append(b"<<<<<<< local\n")
                if c.local is not None:
                    out.append(c.local.raw + b"\n")
                if c.proposal is not None:
                    out.append(b"=======\n" + c.proposal.raw + b"\n>>>>>>> proposal\n")
                else:
                    out.append(b"||||||| base\n")
                    if c.old is not None:
                        out.append(c.old.raw + b"\n")
                    out.append(b"=======\n")
                    if c.new is not None:
                        out.append(c.new.raw + b"\n")
                    out.append(b">>>>>>> B1\n")
        return b"".join(out)

    def _summary(self, keys: Sequence[Key]) -> str:
        counts = {"b1": 0, "local": 0, "fields": 0}
        for key in keys:
            origin = self.out[key].origin
            if origin in counts and key[0]:
                counts[origin] += 1
        gone = sum(1 for k in self.o if k[0] and self.out[k].line is None)
        return (
            f"{counts['b1']} entries from B1, {counts['local']} local, "
            f"{counts['fields']} merged per field, {gone} removed"
        )


class _Allocator:
    """Free IDs: the first after ``old`` in [lo, hi] no entry uses, wrapping to ``lo``. A
    later ask for the same ``old`` resumes where the last one stopped (IDs only get used)."""

    def __init__(self, used: set[int]) -> None:
        self.used = used
        self.resume: dict[tuple[int, int, int], int] = {}

    def take(self, old: int, lo: int, hi: int) -> int | None:
        span = hi - lo + 1
        start = old + 1 if lo <= old < hi else lo
        key = (old, lo, hi)
        pos = self.resume.get(key, 0)
        while pos < span:
            candidate = start + pos if start + pos <= hi else lo + (start + pos - hi - 1)
            pos += 1
            if candidate not in self.used:
                self.used.add(candidate)
                self.resume[key] = pos
                return candidate
        self.resume[key] = pos
        return None


def _free_range(count: int, lo: int, hi: int, taken: Sequence[tuple[int, int]]) -> int | None:
    """The lowest start >= lo of ``count`` IDs within [lo, hi] overlapping no taken range."""
    start = lo
    for s, e in sorted(taken):
        if e <= start:
            continue
        if s >= start + count:
            break
        start = max(start, e)
    return start if start + count - 1 <= hi else None


def live(
    result: DbMerge, leave_out: AbstractSet[bytes], members: AbstractSet[bytes] = frozenset()
) -> bytes:
    """The live file while ``result``'s conflict is pending: every line of the merge, each
    conflicting entry the VM's own, without B1's entries named in ``leave_out`` (those whose
    ID or range clashes with one the VM keeps, and what must go with them: the caller keeps
    passwd, group, shadow and gshadow consistent) and without the names in ``members`` in
    member lists (group members, gshadow admins and members naming a left-out user)."""
    fmt = result.fmt
    out: list[bytes] = []
    for ln in result.lines:
        if ln.key[0] and ln.theirs and ln.key[1] in leave_out:
            continue
        raw = ln.raw
        if ln.key[0] and fmt.sets and members:
            fields = raw.split(b":")
            for i in fmt.sets:
                if i < len(fields) and fields[i]:
                    kept = [m for m in fields[i].split(b",") if m not in members]
                    fields[i] = b",".join(kept)
            raw = b":".join(fields)
        out.append(raw + b"\n")
    return b"".join(out)


def merge(
    fmt: Format,
    old: bytes | None,
    local: bytes | None,
    new: bytes | None,
    *,
    ranges: IdRanges | None = None,
    upper: Iterable[Entry] = (),
    gid_moves: Mapping[int, int] | None = None,
    follows: str = "",
) -> DbMerge:
    """Merge B0 → B1 into the VM's ``local`` by name (see the module docstring).

    ``upper``: the VM's upper entries, for the ownership changes a renumbering implies.
    ``gid_moves``: for passwd, the group merge's renumberings (old GID → proposed GID) of the
    VM's groups. ``follows``: non-empty when the file this one follows conflicts (the
    phrase says which); the result is then a conflict too, its proposal the clean merge.
    """
    merger = _Merger(fmt, old, local, new, ranges or IdRanges(), list(upper), gid_moves or {})
    return merger.run(follows)
