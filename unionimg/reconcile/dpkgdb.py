"""dpkg's database merged per package, apt's ``extended_states`` per package. Pure.

A text merge of ``/var/lib/dpkg/status`` is wrong both ways: two packages added in the same
place conflict as lines, and two versions of one package can mix lines of both paragraphs.
Here the three versions (B0 = ancestor, local = the VM's, B1 = the new base) are merged
**per package paragraph**, keyed by ``Package`` + ``Architecture``, as dpkg itself sees them:

* a paragraph both sides kept stays; added, changed or removed on one side takes that side
  (B1's packages plus the VM's local installs, removals and changes); the same change on both
  sides (both installed one same version) is taken once;
* a package both sides changed to two versions, both fully installed, is settled as apt
  settles it — it upgrades to the newer version and never downgrades an installed newer
  one — when the losing side's copy is pristine (:func:`newer_side` here, Debian's version
  order by :func:`compare_versions`; the files are the planner's part, see
  :meth:`unionimg.reconcile.plan._Planner._settle_packages`): ``base-newer`` takes B1's
  paragraph, ``local-newer`` keeps the VM's, each named in the reason ("openssh-server:
  base 1:9.2p1-2+deb12u3 supersedes VM's 1:9.2p1-2 (taken)", "... (kept (newer))"). The
  policy's action for :data:`NEWER_WINS` is the setting (``merge``: on);
* any other package both sides changed differently (removed on one side and changed on
  the other, the same version with other fields, a malformed version, a losing copy that
  is not pristine, or the setting off) is a **package-level conflict** whose reason names
  the package, both versions and why the newer version did not settle it. Its
  ``proposal`` artefact is the merge that keeps the VM's version of each conflicting
  package (its changed files are in the upper layer, which wins over the base's; its
  ``info/`` files stay the VM's, below) with everything else merged, and the proposal is
  also what the live file holds while the conflict is pending (``FileResult.live``): every
  package B1 added or changed that the VM did not touch has its paragraph with its files and
  ``info/`` from B1, the VM's own packages theirs — never a half state (files of a package
  without its paragraph). The conflict stays pending with its artefacts (``merged`` with
  both paragraphs between markers, ``local`` = the VM's whole file before, ``base-new``...):
  ``resolve --package P --take base|local`` settles one package whole (its paragraph,
  info files and files: the status conflict's ``packages`` artefact lists them),
  ``resolve --take local`` writes the VM's own file back, ``--take proposal`` keeps what is
  live; ``--take base`` of the file is refused while a package is pending (B1's paragraph
  over the VM's files of another version would be a half state);
* a file that cannot be parsed (a hostile or damaged guest's status: a line that is no
  field, a paragraph without ``Package``, a package named twice) is a conflict saying which
  side and which line, never an exception;
* output: paragraphs sorted by package name and architecture (as dpkg writes them).

What depends on a paragraph follows it (:func:`merge_file` dispatches on the path):

* ``/var/lib/dpkg/info/PKG[:ARCH].EXT`` (``list``, ``md5sums``, ``conffiles``, maintainer
  scripts...) is one unit with its package's paragraph: the side whose paragraph was taken
  gives the file (the VM's: kept; B1's, or the same change on both sides: B1's, trusted); a
  package in conflict makes its info files conflicts too (the VM's stay, matching the VM's
  status). Never a half state (status of one side, ``list``/``md5sums`` of the other).
  B1's ``list`` leaves out the paths another package of the VM took over (``Replaces``: the
  VM's list of the unchanged package lacks them).
  Where neither side changed the paragraph (another package took over some paths:
  ``Replaces``), ``list`` and ``md5sums`` merge as line sets.
* ``/var/lib/dpkg/triggers/File``, ``Unincorp`` and ``NAME`` (interests, pending
  triggers): sets of lines, merged as sets (a line removed on one side is removed).
* ``/var/lib/dpkg/alternatives/NAME``: one group per file; both sides changed it
  differently → a conflict naming the group (the VM's kept).
* ``/var/lib/apt/extended_states``: per package paragraph like the status file.
* ucf's ``hashfile`` and ``registry`` (``/var/lib/ucf``): one line per managed file, merged
  by its path.
* ``/var/lib/dpkg/diversions`` (three lines per diversion, keyed by the diverted path) and
  ``statoverride`` (one line per path) by entry; their ``-old`` backups, ``status-old`` and
  ``available`` are the VM's own (registered as keep-local by
  :mod:`unionimg.reconcile.structured`).

The package's FILES are not merged here: they are paths of the upper layer like any other.
When the VM's change to a package wins, its files in the upper layer win over the base's
(the union shows them); when B1's wins, the VM had not changed the package, so its upper
holds only its own edits (merged per path). A package both sides changed is a conflict:
never B1's paragraph over the VM's files of another version.

Deliberately NOT done: re-applying the VM's package operations (``dpkg -i`` of the VM's own
cached ``.deb``s, their maintainer scripts) on the new base. That would run guest-controlled
code on the host, as root. Where the sides differ, the newer version (a whole side's copy of
the package, as it is) wins where that is unambiguous; elsewhere a package-level conflict
with both versions is the answer. Maintainer scripts of the winning version are not run:
a B1 that wins was configured by them in the base, a VM's newer one in the VM.

Conffiles (issue 12, item 4): :func:`pristine_ancestor` gives the planner the merge
ancestor of a conffile both sides added: from B1's ``Conffiles:`` (the base is trusted; the
VM's status only says which version the VM has), the md5 of B1's line is the check of any
candidate content (B1's copy, the VM's copy, or what the executor's lookup finds:
:mod:`unionimg.reconcile.pristine`).

Cost: well-formed paragraphs are checked by one regular expression each and a paragraph
another side has byte for byte is checked once (three 3,059-package status files, 8.4 MB:
0.28 s here); the line-by-line parse runs only to word an error.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = [
    "ALTERNATIVES",
    "AVAILABLE",
    "BACKUPS",
    "DIVERSIONS",
    "EXTENDED_STATES",
    "INFO",
    "NEWER_WINS",
    "NEWER_WINS_SAYS",
    "STATOVERRIDE",
    "STATUS",
    "UCF_CACHE",
    "UCF_HASHFILE",
    "UCF_REGISTRY",
    "Conffile",
    "DbError",
    "FileResult",
    "Newer",
    "Paragraph",
    "StatusMerge",
    "compare_versions",
    "conffiles",
    "handles",
    "info_path",
    "list_paths",
    "md5_of",
    "md5sums",
    "merge_file",
    "merge_status",
    "newer_side",
    "package_of_info",
    "parse",
    "parse_version",
    "pristine_ancestor",
    "settle",
    "ucf_hashes",
    "version_of",
]

STATUS = "/var/lib/dpkg/status"
INFO = "/var/lib/dpkg/info/"
ALTERNATIVES = "/var/lib/dpkg/alternatives/"
DIVERSIONS = "/var/lib/dpkg/diversions"
STATOVERRIDE = "/var/lib/dpkg/statoverride"
AVAILABLE = "/var/lib/dpkg/available"
EXTENDED_STATES = "/var/lib/apt/extended_states"
#: the tools' own backups: meaningful only with the VM's own database (kept local)
BACKUPS = (
    "/var/lib/dpkg/status-old",
    "/var/lib/dpkg/diversions-old",
    "/var/lib/dpkg/statoverride-old",
    AVAILABLE,
    "/var/lib/apt/extended_states.orig",
)
UCF_HASHFILE = "/var/lib/ucf/hashfile"  # MD5  PATH: each ucf-managed file's pristine md5
UCF_REGISTRY = "/var/lib/ucf/registry"  # PACKAGE  PATH: who registered each file
UCF_CACHE = "/var/lib/ucf/cache/"  # :etc:ssh:sshd_config: the pristine copies
EXACT = (STATUS, EXTENDED_STATES, DIVERSIONS, STATOVERRIDE, UCF_HASHFILE, UCF_REGISTRY)

_SHOW = 64  # characters of a name shown in a reason line
_SHOW_CONFLICTS = 3  # packages named in one reason line
_NAME = re.compile(rb"[a-z0-9][a-z0-9+.\-]*")
_FIELD = re.compile(rb"([!-9;-~][!-9;-~]*):(.*)")
_INFO = re.compile(r"/var/lib/dpkg/info/([a-z0-9][a-z0-9+.\-]*)(?::([a-z0-9\-]+))?\.([a-z0-9_\-]+)")
_ALTERNATIVE = re.compile(r"/var/lib/dpkg/alternatives/[^/]+")
_TRIGGERS = re.compile(r"/var/lib/dpkg/triggers/(?!Lock$)[^/]+")  # File, Unincorp, NAME
_LINE_SETS = frozenset({"list", "md5sums"})

Outcome = Literal["merged", "conflict", "keep-local"]
Key = tuple[str, str]  # (package, architecture) of a paragraph; (path, "") of an entry
Triple = tuple[bytes | None, bytes | None, bytes | None]  # B0, local, B1 (None: no such file)


class DbError(ValueError):
    """A database that cannot be parsed (its message says where)."""


def _show(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > _SHOW:
        text = text[:_SHOW] + "..."
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return repr(text)
    return text


def md5_of(data: bytes) -> str:
    """The md5 dpkg records for a conffile (hex)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# -- paragraphs ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Paragraph:
    key: Key
    text: bytes  # the paragraph's lines, each ending with a newline; no blank line

    @property
    def fields(self) -> dict[str, bytes]:
        """Lower-cased field name -> value (continuation lines joined with newlines)."""
        out: dict[str, bytes] = {}
        last = ""
        for line in self.text.split(b"\n")[:-1]:
            if line[:1] in (b" ", b"\t"):
                if last:
                    out[last] += b"\n" + line
                continue
            name, _, value = line.partition(b":")
            last = name.decode("ascii", "replace").lower()
            out.setdefault(last, value.rstrip(b"\r"))
        return out

    def field(self, name: str) -> str:
        return self.fields.get(name.lower(), b"").decode("utf-8", "replace").strip()

    def describe(self) -> str:
        """``VERSION`` (and the state when not installed)."""
        fields = self.fields
        if "version" not in fields and "auto-installed" in fields:  # apt's extended_states
            auto = fields["auto-installed"].decode("utf-8", "replace").strip()
            return f"Auto-Installed {_show(auto)}"
        version = fields.get("version", b"").decode("utf-8", "replace").strip() or "(no version)"
        state = fields.get("status", b"").decode("utf-8", "replace").strip()
        words = state.split()
        if words and words[-1] != "installed":
            return f"{_show(version)} ({_show(state)})"
        return _show(version)


def _show_key(key: Key) -> str:
    return _show(f"{key[0]}:{key[1]}" if key[1] else key[0])


_SEP = re.compile(rb"\n(?:[ \t\r]*\n)+")  # a blank (or whitespace) line between paragraphs
_CHUNK = re.compile(rb"[!-9;-~]+:[^\n]*(?:\n(?:[!-9;-~]+:[^\n]*|[ \t]+[^ \t\r\n][^\n]*))*")
_FIELD_NAMES = re.compile(rb"^([!-9;-~]+):", re.M)
_PACKAGE = re.compile(rb"^package:(.*)$(?!\n[ \t])", re.M | re.I)  # one line only
_ARCHITECTURE = re.compile(rb"^architecture:(.*)$", re.M | re.I)
_MULTI_ARCHITECTURE = re.compile(rb"^architecture:.*\n[ \t]", re.M | re.I)


def _parse_fast(data: bytes, seen_chunks: dict[bytes, Key] | None = None) -> list[Paragraph] | None:
    """The paragraphs of a well-formed database, each checked by one regular expression
    (C speed: a 3,000-package status in a fraction of the line-by-line time); ``None`` on
    anything unusual, which :func:`parse` then examines line by line for its message."""
    out: list[Paragraph] = []
    seen: set[Key] = set()
    known = {} if seen_chunks is None else seen_chunks  # a paragraph the other sides have too
    for chunk in _SEP.split(data):
        if chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        if not chunk:
            continue
        key = known.get(chunk)
        if key is not None:
            if key in seen:
                return None
            seen.add(key)
            out.append(Paragraph(key, chunk + b"\n"))
            continue
        if _CHUNK.fullmatch(chunk) is None:
            return None
        names = _FIELD_NAMES.findall(chunk)
        if len({n.lower() for n in names}) != len(names):
            return None
        package = _PACKAGE.search(chunk)
        if package is None or not _NAME.fullmatch(name := package.group(1).strip()):
            return None
        arch = _ARCHITECTURE.search(chunk)
        if arch is not None and _MULTI_ARCHITECTURE.search(chunk):
            return None
        key = (
            name.decode("ascii"),
            arch.group(1).strip().decode("utf-8", "replace") if arch else "",
        )
        if key in seen:
            return None
        seen.add(key)
        known[chunk] = key
        out.append(Paragraph(key, chunk + b"\n"))
    return out


def parse(
    data: bytes, *, what: str = "status", seen_chunks: dict[bytes, Key] | None = None
) -> list[Paragraph]:
    """The paragraphs of a dpkg/apt database; :class:`DbError` on anything else.
    ``seen_chunks``, shared by the parses of one merge, skips the checks of a paragraph
    another side has byte for byte."""
    fast = _parse_fast(data, seen_chunks)
    return fast if fast is not None else _parse_lines(data, what)


def _parse_lines(data: bytes, what: str) -> list[Paragraph]:
    """:func:`parse` line by line: the same paragraphs, or the error with its line."""
    out: list[Paragraph] = []
    seen: set[Key] = set()
    lines: list[bytes] = []
    fields: dict[str, bytes] = {}
    last = ""
    start = 0

    def close() -> None:
        if not lines:
            return
        for name in ("package", "architecture"):
            if b"\n" in fields.get(name, b""):
                raise DbError(f"{what}: the paragraph at line {start} has a multi-line {name}")
        package = fields.get("package", b"").strip()
        if not package:
            raise DbError(f"{what}: the paragraph at line {start} has no Package field")
        if not _NAME.fullmatch(package):
            raise DbError(f"{what}: line {start}: {_show(package)!r} is no package name")
        arch = fields.get("architecture", b"").strip().decode("utf-8", "replace")
        key = (package.decode("ascii"), arch)
        if key in seen:
            raise DbError(f"{what}: package {_show_key(key)} appears twice (line {start})")
        seen.add(key)
        out.append(Paragraph(key, b"".join(line + b"\n" for line in lines)))
        lines.clear()
        fields.clear()

    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            close()
            continue
        if not lines:
            start = number
        if line[:1] in (b" ", b"\t"):
            if not lines:
                raise DbError(f"{what}: line {number} continues no field")
            fields[last] += b"\n" + line
        else:
            match = _FIELD.fullmatch(line)
            if match is None:
                raise DbError(f"{what}: line {number} is not a 'Field: value' line")
            last = match.group(1).decode("ascii").lower()
            if last in fields:
                raise DbError(f"{what}: line {number} repeats the field {_show(last)}")
            fields[last] = match.group(2)
        lines.append(raw)
    close()
    return out


# -- the 3-way merge by key --------------------------------------------------------------------
Decision = Literal[
    "unchanged", "local", "new", "same", "conflict", "base-newer", "local-newer"
]  # base-newer / local-newer: a package conflict the newer version settled (settle())


@dataclass(frozen=True, slots=True)
class Choice:
    decision: Decision
    old: bytes | None
    local: bytes | None
    new: bytes | None

    @property
    def result(self) -> bytes | None:
        """The merged value (a conflict: the VM's)."""
        if self.decision in ("new", "same", "base-newer"):
            return self.new
        return self.local


def _decide(old: bytes | None, local: bytes | None, new: bytes | None) -> Decision:
    if local == new:
        return "unchanged" if local == old else "same"
    if local == old:
        return "new"
    if new == old:
        return "local"
    return "conflict"


def _merge_keyed(
    old: Mapping[Key, bytes], local: Mapping[Key, bytes], new: Mapping[Key, bytes]
) -> dict[Key, Choice]:
    """Every key of the three sides with its decision, B1's order then the VM's additions."""
    out: dict[Key, Choice] = {}
    for key in (*new, *local, *old):
        if key not in out:
            o, u, n = old.get(key), local.get(key), new.get(key)
            out[key] = Choice(_decide(o, u, n), o, u, n)
    return out


# -- the status file and extended_states --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StatusMerge:
    """The merge of a per-package database (status, extended_states)."""

    what: str
    choices: Mapping[Key, Choice] = field(default_factory=dict)
    paragraphs: Mapping[Key, tuple[Paragraph | None, Paragraph | None]] = field(
        default_factory=dict
    )  # (local, new) of every conflicting key
    error: str = ""  # a side could not be parsed
    by_name: Mapping[str, tuple[Key, ...]] = field(default_factory=dict)  # keys of a package
    # the package conflicts the newer version settled: one line each (settle())
    settled: Mapping[Key, str] = field(default_factory=dict)
    # why a package conflict was not settled by the newer version (settle()), by key
    unsettled: Mapping[Key, str] = field(default_factory=dict)
    off: str = ""  # why the newer-version rule did not run at all (the policy's setting)

    @property
    def clean(self) -> bool:
        return not self.error and not self.conflicts

    @property
    def conflicts(self) -> list[Key]:
        return [k for k, c in self.choices.items() if c.decision == "conflict"]

    def decision(self, name: str, arch: str | None = None) -> tuple[Decision | None, str]:
        """What the merge did with package ``name`` (any architecture unless ``arch``): the
        strongest decision (conflict > local > new/same > unchanged) and its description."""
        rank: dict[Decision, int] = {
            "conflict": 4, "local": 3, "local-newer": 3, "new": 2, "base-newer": 2, "same": 1
        }  # fmt: skip
        found = [
            (rank.get(self.choices[key].decision, 0), key)
            for key in self.by_name.get(name, ())
            if arch is None or key[1] == arch
        ]
        if not found:
            return None, ""
        _, key = max(found)
        return self.choices[key].decision, self._versions(key)

    def _versions(self, key: Key) -> str:
        local, new = self.paragraphs.get(key, (None, None))
        choice = self.choices[key]
        if local is None and choice.local is not None:
            local = _one(choice.local, key)
        if new is None and choice.new is not None:
            new = _one(choice.new, key)
        lv = local.describe() if local is not None else "removed"
        nv = new.describe() if new is not None else "removed"
        if lv == nv and local is not None and new is not None:  # same version: what differs
            ls, ns = local.field("Status"), new.field("Status")
            if ls != ns:
                return f"local {lv} ({_show(ls)}), B1 {nv} ({_show(ns)})"
            return f"local {lv}, B1 {nv}, other fields differ"
        return f"local {lv}, B1 {nv}"

    def merged(self, *, markers: bool = False) -> bytes:
        """The merged file; conflicting keys: the VM's paragraph (``markers``: both)."""
        parts: list[bytes] = []
        for key in sorted(self.choices):
            choice = self.choices[key]
            if markers and choice.decision == "conflict":
                parts.append(
                    b"<<<<<<< local\n"
                    + (choice.local or b"")
                    + b"=======\n"
                    + (choice.new or b"")
                    + b">>>>>>> base-new\n"
                )
                continue
            value = choice.result
            if value is not None:
                parts.append(value)
        return b"".join(p + b"\n" for p in parts)

    def reason(self) -> str:
        if self.error:
            return f"{self.what} cannot be merged per package: {self.error}; the VM's kept"
        conflicts = self.conflicts
        if conflicts:
            shown = "; ".join(
                f"{_show_key(k)} ({self._versions(k)}"
                + (
                    f"; not settled by the newer version: {self.unsettled[k]}"
                    if k in self.unsettled
                    else ""
                )
                + ")"
                for k in conflicts[:_SHOW_CONFLICTS]
            )
            more = len(conflicts) - _SHOW_CONFLICTS
            extra = f" (+{more} more)" if more > 0 else ""
            off = f" ({self.off})" if self.off else ""
            return (
                f"{self.what}: {len(conflicts)} package(s) changed on both sides: {shown}{extra}"
                f"{off}; live until resolved: the proposal (the VM's versions of these packages, "
                "everything else merged"
                + ("; their info files stay the VM's)" if self.what == STATUS else ")")
                + self._settled_note()
            )
        counts = {d: 0 for d in ("local", "new", "same")}
        for choice in self.choices.values():
            if choice.decision in counts:
                counts[choice.decision] += 1
        return (
            f"{self.what} merged per package: {counts['new']} changed by B1, "
            f"{counts['local']} by the VM, {counts['same']} the same on both sides"
            + self._settled_note()
        )

    def _settled_note(self) -> str:
        if not self.settled:
            return ""
        lines = list(self.settled.values())
        more = len(lines) - _SHOW_CONFLICTS
        extra = f" (+{more} more)" if more > 0 else ""
        return f"; {NEWER_WINS_SAYS}: " + "; ".join(lines[:_SHOW_CONFLICTS]) + extra


def _one(text: bytes, key: Key) -> Paragraph | None:
    try:
        found = parse(text)
    except DbError:
        return None
    return found[0] if found and found[0].key == key else None


def _side(data: bytes | None, what: str, side: str, chunks: dict[bytes, Key]) -> dict[Key, bytes]:
    if data is None:
        return {}
    return {p.key: p.text for p in parse(data, what=f"{side}'s {what}", seen_chunks=chunks)}


def merge_status(versions: Triple, *, what: str = STATUS) -> StatusMerge:
    """``status`` or ``extended_states`` merged per package paragraph (module docstring)."""
    old, local, new = versions
    try:
        chunks: dict[bytes, Key] = {}
        sides = [
            _side(d, what, s, chunks) for d, s in ((new, "B1"), (old, "B0"), (local, "the VM"))
        ]
        sides = [sides[1], sides[2], sides[0]]  # B1 first: the trusted side's checks run
    except DbError as err:
        return StatusMerge(what, error=str(err))
    except UnicodeDecodeError:  # pragma: no cover - names are checked ASCII above
        return StatusMerge(what, error="a package name is not ASCII")
    choices = _merge_keyed(*sides)
    paragraphs = {
        k: (
            _one(c.local, k) if c.local is not None else None,
            _one(c.new, k) if c.new is not None else None,
        )
        for k, c in choices.items()
        if c.decision == "conflict"
    }
    by_name: dict[str, list[Key]] = {}
    for key in choices:
        by_name.setdefault(key[0], []).append(key)
    return StatusMerge(what, choices, paragraphs, by_name={n: tuple(k) for n, k in by_name.items()})


# -- the newer version wins (issue 12, item 2) ----------------------------------------------------
NEWER_WINS = "/var/lib/dpkg/status/newer-version-wins"
"""The policy path whose action is the setting of :func:`newer_side` (``merge``: on)."""
NEWER_WINS_SAYS = "newer version wins"  # what a status reason says before its package lines
_VERSION_MAX = 256  # characters of a version string (a guest's may be anything)
_EPOCH = re.compile(r"[0-9]{1,9}")
_UPSTREAM = re.compile(r"[0-9][A-Za-z0-9.+~\-]*")
_REVISION = re.compile(r"[A-Za-z0-9.+~]+")


def parse_version(text: str) -> tuple[int, str, str]:
    """``[epoch:]upstream[-revision]`` as Debian policy 5.6.12 defines it: the epoch a number,
    the upstream version starting with a digit (letters, digits, ``. + ~ -``), the revision
    (after the last hyphen) letters, digits and ``. + ~``. Anything else (a guest's status
    may hold any bytes) is a :class:`DbError` saying why."""
    if not text or len(text) > _VERSION_MAX:
        raise DbError(f"version {_show(text)!r} is empty or too long")
    epoch, colon, rest = text.partition(":")
    if not colon:
        epoch, rest = "0", text
    elif not _EPOCH.fullmatch(epoch):
        raise DbError(f"version {_show(text)!r}: its epoch is not a number")
    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        upstream, revision = rest, ""
    if not _UPSTREAM.fullmatch(upstream):
        raise DbError(
            f"version {_show(text)!r}: the upstream version must start with a digit and hold "
            "only letters, digits and . + ~ -"
        )
    if hyphen and not _REVISION.fullmatch(revision):
        raise DbError(f"version {_show(text)!r}: the revision holds only letters, digits, . + ~")
    return int(epoch), upstream, revision


def _order(ch: str) -> int:
    """dpkg's weight of a non-digit character: ``~`` before the end, the end before
    letters, letters before anything else."""
    if "0" <= ch <= "9":
        return 0
    if ch.isascii() and ch.isalpha():
        return ord(ch)
    if ch == "~":
        return -1
    return ord(ch) + 256


def _compare_part(a: str, b: str) -> int:
    """Debian's comparison of two upstream versions or two revisions: alternately the
    longest non-digit prefixes (by :func:`_order`, character by character, the end counting
    0) and the longest digit prefixes (as numbers)."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not "0" <= a[i] <= "9") or (j < len(b) and not "0" <= b[j] <= "9"):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        k = i
        while k < len(a) and "0" <= a[k] <= "9":
            k += 1
        m = j
        while m < len(b) and "0" <= b[m] <= "9":
            m += 1
        x, y = int(a[i:k] or "0"), int(b[j:m] or "0")
        if x != y:
            return -1 if x < y else 1
        i, j = k, m
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` sorts before, equal to or after ``b`` (``dpkg
    --compare-versions``); :class:`DbError` for a malformed version (:func:`parse_version`)."""
    (ea, ua, ra), (eb, ub, rb) = parse_version(a), parse_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    found = _compare_part(ua, ub) or _compare_part(ra, rb)
    return (found > 0) - (found < 0)


@dataclass(frozen=True, slots=True)
class Newer:
    """A package both sides changed to two versions, settled as apt would: the newer wins."""

    key: Key
    side: Literal["new", "local"]  # B1's version wins, or the VM's
    base: str  # B1's version
    vm: str  # the VM's version
    # the VM's kept: files only B1's version has, which show in the union, owned by no
    # package (dpkg would remove them on an upgrade; the planner cannot hide what U lacks)
    unowned: tuple[str, ...] = ()

    def describe(self) -> str:
        name = _show(self.key[0])
        if self.side == "new":
            return f"{name}: base {_show(self.base)} supersedes VM's {_show(self.vm)} (taken)"
        left = ""
        if self.unowned:
            left = (
                f"; {len(self.unowned)} file(s) only the base's version has stay, unowned: "
                f"{_show(self.unowned[0])}" + (" ..." if len(self.unowned) > 1 else "")
            )
        return (
            f"{name}: VM's {_show(self.vm)} supersedes base {_show(self.base)} (kept (newer){left})"
        )


def newer_side(key: Key, local: bytes | None, new: bytes | None) -> tuple[Newer | None, str]:
    """Which version of a package both sides changed wins by apt's rule (an upgrade to the
    newer version, never a downgrade of an installed newer one), or ``None`` and why the
    rule does not decide: a side removed it or has it not fully installed, the two
    versions are equal (other fields differ) or one is malformed. Whether the losing
    side's copy is pristine is the planner's part (it needs the files)."""
    paragraphs = [_one(x, key) if x is not None else None for x in (local, new)]
    vm, base = paragraphs
    if vm is None or base is None:
        return None, f"{'the VM' if vm is None else 'B1'} removed it"
    for who, p in (("the VM", vm), ("B1", base)):
        if p.field("Status").split() != ["install", "ok", "installed"]:
            return None, f"{who} has it {_show(p.field('Status')) or 'without a status'}"
    try:
        order = compare_versions(vm.field("Version"), base.field("Version"))
    except DbError as err:
        return None, str(err)
    if order == 0:
        return None, "the same version, other fields differ"
    side: Literal["new", "local"] = "new" if order < 0 else "local"
    return Newer(key, side, base.field("Version"), vm.field("Version")), ""


def settle(
    merge: StatusMerge,
    newer: Mapping[Key, Newer],
    unsettled: Mapping[Key, str],
    off: str = "",
) -> StatusMerge:
    """``merge`` with the package conflicts in ``newer`` settled (``base-newer``: B1's
    paragraph, ``local-newer``: the VM's) and the reasons of the others kept for its
    reason line (``off``: why the rule did not run)."""
    choices = dict(merge.choices)
    for key, found in newer.items():
        choice = choices[key]
        decision: Decision = "base-newer" if found.side == "new" else "local-newer"
        choices[key] = Choice(decision, choice.old, choice.local, choice.new)
    return replace(
        merge,
        choices=choices,
        settled={k: n.describe() for k, n in newer.items()},
        unsettled=dict(unsettled),
        off=off,
    )


def md5sums(data: bytes | None) -> dict[str, str]:
    """A package's ``info/PKG.md5sums`` (``MD5  PATH`` per line, the path without its
    leading ``/``): absolute path -> md5; lines of another form are left out."""
    out: dict[str, str] = {}
    for line in (data or b"").split(b"\n"):
        words = line.split(None, 1)
        if len(words) == 2 and re.fullmatch(rb"[0-9a-f]{32}", words[0]):
            path = "/" + words[1].strip().decode("utf-8", "surrogateescape").lstrip("/")
            out[path] = words[0].decode()
    return out


def list_paths(data: bytes | None) -> list[str]:
    """A package's ``info/PKG.list``: its absolute paths (directories included)."""
    out = []
    for line in (data or b"").split(b"\n"):
        path = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
        if path.startswith("/") and path != "/":
            out.append(path)
    return out


def info_path(key: Key, ext: str, exists: Callable[[str], bool]) -> str:
    """The info file of package ``key`` with extension ``ext``: ``NAME:ARCH.EXT`` (a
    Multi-Arch: same package) when ``exists`` says it is there, else ``NAME.EXT``."""
    qualified = f"{INFO}{key[0]}:{key[1]}.{ext}"
    return qualified if key[1] and exists(qualified) else f"{INFO}{key[0]}.{ext}"


# -- entries: diversions, statoverride ----------------------------------------------------------
def _diversions(data: bytes, side: str) -> dict[Key, bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) % 3:
        raise DbError(f"{side}'s diversions: {len(lines)} lines, not three per diversion")
    out: dict[Key, bytes] = {}
    for i in range(0, len(lines), 3):
        key = (lines[i].decode("utf-8", "surrogateescape"), "")
        if key in out:
            raise DbError(f"{side}'s diversions: {_show(lines[i])} diverted twice")
        out[key] = b"".join(line + b"\n" for line in lines[i : i + 3])
    return out


def _keyed_lines(
    data: bytes,
    side: str,
    what: str,
    split: Callable[[bytes], list[bytes] | None],
    form: str,
    twice: str,
) -> dict[Key, bytes]:
    """A file of one entry per line, keyed by the line's last word (a path): ``split`` cuts a
    line into its words (``form`` says what a line must be); a path twice is an error."""
    out: dict[Key, bytes] = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        words = split(line)
        if words is None:
            raise DbError(f"{side}'s {what}: line {number} is not '{form}'")
        key = (words[-1].decode("utf-8", "surrogateescape"), "")
        if key in out:
            raise DbError(f"{side}'s {what}: {_show(words[-1])} {twice}")
        out[key] = line + b"\n"
    return out


def _statoverride(data: bytes, side: str) -> dict[Key, bytes]:
    """dpkg's statoverride: ``user group mode path`` per line, keyed by the path."""

    def split(line: bytes) -> list[bytes] | None:
        words = line.split(b" ", 3)
        return words if len(words) == 4 else None

    return _keyed_lines(
        data, side, "statoverride", split, "user group mode path", "overridden twice"
    )


def _ucf_lines(data: bytes, side: str) -> dict[Key, bytes]:
    """ucf's hashfile or registry: ``WORD  PATH`` per line, keyed by the path."""

    def split(line: bytes) -> list[bytes] | None:
        words = line.split(None, 1)
        return [words[0], words[1].strip()] if len(words) == 2 else None

    return _keyed_lines(data, side, "ucf file", split, "WORD PATH", "listed twice")


def _merge_entries(
    versions: Triple, parse_side: Callable[[bytes, str], dict[Key, bytes]], what: str
) -> FileResult:
    try:
        sides = [
            parse_side(d, s) if d is not None else {}
            for d, s in zip(versions, ("B0", "the VM", "B1"), strict=True)
        ]
    except DbError as err:
        return FileResult("conflict", versions[1] or b"", f"{what} cannot be merged: {err}")
    choices = _merge_keyed(*sides)
    conflicts = [k for k, c in choices.items() if c.decision == "conflict"]
    data = b"".join(c.result or b"" for c in choices.values())
    if conflicts:
        shown = ", ".join(_show(k[0]) for k in conflicts[:_SHOW_CONFLICTS])
        more = len(conflicts) - _SHOW_CONFLICTS
        extra = f" (+{more} more)" if more > 0 else ""
        return FileResult(
            "conflict",
            data,
            f"{what}: {len(conflicts)} entr(ies) changed on both sides: {shown}{extra}; "
            "the VM's kept",
        )
    return FileResult("merged", data, f"{what} merged by entry")


# -- info files, alternatives --------------------------------------------------------------------
def package_of_info(path: str) -> tuple[str, str | None, str] | None:
    """``(package, arch or None, extension)`` of an info file path, else ``None``."""
    match = _INFO.fullmatch(path)
    if match is None:
        return None
    return match.group(1), match.group(2), match.group(3)


def handles(path: str) -> bool:
    """Is ``path`` a dpkg/apt database file merged here (exact paths and patterns)?"""
    return (
        path in EXACT
        or package_of_info(path) is not None
        or _ALTERNATIVE.fullmatch(path) is not None
        or _TRIGGERS.fullmatch(path) is not None
    )


def _line_set(versions: Triple) -> bytes | None:
    """A 3-way merge of two line sets (B1's order, then the VM's additions); ``None`` when a
    side is missing."""
    old, local, new = versions
    if local is None or new is None:
        return None
    old = old or b""
    o, u, n = (set(x.splitlines()) for x in (old, local, new))
    removed = (o - u) | (o - n)
    out = [line for line in new.splitlines() if line not in removed]
    seen = set(out)
    out += [line for line in local.splitlines() if line not in seen and line not in o]
    return b"".join(line + b"\n" for line in out)


def _taken_over(versions: Triple) -> set[bytes]:
    """Lines of B0's ``.list`` the VM's lacks while its paragraph is B0's: paths another
    package took over (dpkg drops them from the old owner's list on ``Replaces``)."""
    old, local, _ = versions
    if old is None or local is None:
        return set()
    return set(old.splitlines()) - set(local.splitlines())


def _status_memo(
    related: Callable[[str], Triple], memo: MutableMapping[str, object]
) -> StatusMerge:
    done = memo.get("dpkgdb:status")
    if isinstance(done, StatusMerge):
        return done
    versions = related(STATUS)
    if versions[1] is None or versions[2] is None:
        side = "the VM" if versions[1] is None else "B1"
        result = StatusMerge(
            STATUS, error=f"{side} has no readable {STATUS} (missing or too large)"
        )
    else:
        result = merge_status(versions)
    memo["dpkgdb:status"] = result
    return result


def _info(
    path: str, versions: Triple, related: Callable[[str], Triple], memo: MutableMapping[str, object]
) -> FileResult:
    found = package_of_info(path)
    assert found is not None
    name, arch, ext = found
    local = versions[1] or b""
    status = _status_memo(related, memo)
    follows = f"dpkg info file of {_show(name)}"
    if status.error:
        return FileResult(
            "conflict",
            local,
            f"{follows}: follows {STATUS}, which cannot be merged ({status.error})",
        )
    decision, described = status.decision(name, arch)
    if decision == "conflict":
        return FileResult(
            "conflict",
            local,
            f"{follows}: package changed on both sides ({described}); follows its "
            f"paragraph of {STATUS}: the VM's kept until resolved",
        )
    if decision in ("local", "local-newer"):
        return FileResult("keep-local", reason=f"{follows}: follows the VM's paragraph")
    if decision == "base-newer" and versions[2] is not None:  # the planner drops the VM's
        return FileResult("merged", versions[2], f"{follows}: follows B1's newer version")
    if decision in ("new", "same"):
        if versions[2] is None:
            return FileResult(
                "conflict", local, f"{follows}: B1's paragraph taken but B1 has no such file"
            )
        new = versions[2]
        taken = _taken_over(versions) if decision == "new" and ext == "list" else set()
        kept = [line for line in new.splitlines() if line not in taken]
        if taken and len(kept) < len(new.splitlines()):  # taken over by another (Replaces)
            left = len(new.splitlines()) - len(kept)
            return FileResult(
                "merged",
                b"".join(line + b"\n" for line in kept),
                f"{follows}: follows B1's paragraph ({described}); {left} path(s) "
                "another package of the VM took over left out",
            )
        return FileResult("merged", new, f"{follows}: follows B1's paragraph ({described})")
    if decision == "unchanged" and ext in _LINE_SETS:
        merged = _line_set(versions)
        if merged is not None:
            return FileResult(
                "merged", merged, f"{follows}: package unchanged, {ext} merged as a line set"
            )
    what = "no paragraph on either side" if decision is None else "its paragraph unchanged"
    return FileResult("conflict", local, f"{follows} changed on both sides, {what}: the VM's kept")


def _alternative(path: str, versions: Triple) -> FileResult:
    name = path.rsplit("/", 1)[1]

    def describe(data: bytes | None) -> str:
        if data is None:
            return "none"
        lines = data.split(b"\n")
        mode = _show(lines[0]) if lines else "?"
        # alternatives follow the header and its blank line, each a path then a priority
        try:
            body = lines[lines.index(b"") + 1 :]
        except ValueError:
            return f"{mode}, unreadable"
        paths = [line for line in body if line.startswith(b"/")]
        return f"{mode}, {len(paths)} path line(s)"

    return FileResult(
        "conflict",
        versions[1] or b"",
        f"dpkg alternatives group {_show(name)} changed on both sides (local: "
        f"{describe(versions[1])}; B1: {describe(versions[2])}): the VM's kept; "
        "update-alternatives --config after resolving",
    )


# -- the dispatcher -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FileResult:
    """A merge of one database file (like :class:`structured.StructuredResult`)."""

    outcome: Outcome
    data: bytes = b""
    reason: str = ""
    artifacts: Mapping[str, bytes] = field(default_factory=dict)
    live: bytes | None = None  # conflict: the live content while pending (None: the VM's)


def _from_status(merge: StatusMerge, local: bytes | None) -> FileResult:
    if merge.error:
        return FileResult("conflict", local or b"", merge.reason())
    if merge.conflicts:
        proposal = merge.merged()  # live while pending: the database matches the union's files
        return FileResult(
            "conflict",
            merge.merged(markers=True),
            merge.reason(),
            {"proposal": proposal},
            live=proposal,
        )
    return FileResult("merged", merge.merged(), merge.reason())


def merge_file(
    path: str,
    versions: Triple,
    related: Callable[[str], Triple],
    memo: MutableMapping[str, object],
) -> FileResult:
    """Merge the database file ``path`` (:func:`handles` it) from its three versions;
    ``related`` gives another file's three versions (the status file, for an info file);
    ``memo`` is shared by one planner run (the status merge is computed once)."""
    if path == STATUS:
        return _from_status(_status_memo(lambda _: versions, memo), versions[1])
    if path == EXTENDED_STATES:
        return _from_status(merge_status(versions, what=path), versions[1])
    if path == DIVERSIONS:
        return _merge_entries(versions, _diversions, path)
    if path == STATOVERRIDE:
        return _merge_entries(versions, _statoverride, path)
    if path in (UCF_HASHFILE, UCF_REGISTRY):
        return _merge_entries(versions, _ucf_lines, path)
    if package_of_info(path) is not None:
        return _info(path, versions, related, memo)
    if _ALTERNATIVE.fullmatch(path):
        return _alternative(path, versions)
    if _TRIGGERS.fullmatch(path):
        merged = _line_set(versions)
        if merged is None:
            return FileResult("conflict", versions[1] or b"", f"{path}: a side is unreadable")
        return FileResult("merged", merged, f"dpkg triggers {path} merged as a line set")
    raise ValueError(f"not a dpkg database path: {path}")


# -- conffiles ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Conffile:
    """One ``Conffiles:`` line of B1's status: ``path`` belongs to ``package`` ``version``,
    whose pristine copy has ``md5``."""

    path: str
    package: str
    architecture: str
    version: str
    md5: str
    base_only: bool = False  # its md5 comes from the VM's status: only the base's copies count
    cache: str = ""  # where a tree may keep a pristine copy of its own (ucf's cache)


def conffiles(status: bytes | None) -> dict[str, Conffile]:
    """The conffiles of every package of a (trusted) status file, by path; obsolete ones and
    a file that cannot be parsed give nothing."""
    if status is None:
        return {}
    try:
        paragraphs = parse(status)
    except DbError:
        return {}
    out: dict[str, Conffile] = {}
    for p in paragraphs:
        raw = p.fields.get("conffiles")
        if raw is None:
            continue
        for line in raw.split(b"\n"):
            words = line.split()
            if len(words) < 2 or (
                len(words) > 2 and words[2] in (b"obsolete", b"remove-on-upgrade")
            ):
                continue
            md5 = words[1].decode("ascii", "replace")
            if not re.fullmatch(r"[0-9a-f]{32}", md5):
                continue
            where = words[0].decode("utf-8", "surrogateescape")
            out[where] = Conffile(where, p.key[0], p.key[1], p.field("Version"), md5)
    return out


def _versions(status: bytes | None) -> dict[Key, str]:
    """The version of every package a status file has installed (or with its conffiles
    left); nothing when it cannot be parsed."""
    if status is None:
        return {}
    try:
        paragraphs = parse(status)
    except DbError:
        return {}
    out: dict[Key, str] = {}
    for p in paragraphs:
        state = p.field("Status").split()
        if not state or state[-1] in ("installed", "config-files"):
            out[p.key] = p.field("Version")
    return out


def version_of(status: bytes | None, package: str, architecture: str) -> str | None:
    """``package``'s version in a status file (``None``: not there, or unparseable)."""
    return _versions(status).get((package, architecture))


def pristine_ancestor(
    path: str,
    status: Triple,
    local: bytes,
    new: bytes,
    fetch: Callable[[Conffile], bytes | None] | None,
    memo: MutableMapping[str, object],
    ucf: Triple = (None, None, None),
) -> tuple[bytes | None, str]:
    """The merge ancestor of a conffile both sides added (item 4), and a note for the reason.

    ``path`` must be a conffile of B1's status (trusted). When the VM has the same version:
    candidates, each accepted only when its md5 is the one of B1's ``Conffiles:`` line, are
    B1's file itself, the VM's file itself, then ``fetch`` (the ``.deb`` in an apt cache).
    When the VM has another version, the pristine conffile of the VM's version, from the
    base's copies only (:func:`_vm_version_ancestor`). A file no package lists but ucf
    manages (``ucf``: the three versions of ``/var/lib/ucf/hashfile``): :func:`_ucf_ancestor`."""
    known = memo.get("dpkgdb:conffiles")
    if not isinstance(known, dict):
        known = conffiles(status[2])
        memo["dpkgdb:conffiles"] = known
    conffile = known.get(path)
    if not isinstance(conffile, Conffile):
        return _ucf_ancestor(path, ucf, local, new, fetch, memo)
    package = f"{_show(conffile.package)} {_show(conffile.version)}"
    versions = memo.get("dpkgdb:vm-versions")
    if not isinstance(versions, dict):
        versions = _versions(status[1])
        memo["dpkgdb:vm-versions"] = versions
    vm_version = versions.get((conffile.package, conffile.architecture))
    if vm_version is None:
        return None, f" (conffile of {package} in B1, not installed in the VM: no ancestor)"
    if vm_version != conffile.version:
        return _vm_version_ancestor(conffile, vm_version, status[1], fetch, memo)
    if md5_of(new) == conffile.md5:
        return new, f" (ancestor: {package}'s pristine conffile, B1's copy unmodified)"
    if md5_of(local) == conffile.md5:
        return local, f" (ancestor: {package}'s pristine conffile, the VM's copy unmodified)"
    data = fetch(conffile) if fetch is not None else None
    if data is not None and md5_of(data) == conffile.md5:
        return data, f" (ancestor: {package}'s pristine conffile, md5 checked against B1's)"
    return None, f" (conffile of {package}: no pristine copy found)"


def _vm_version_ancestor(
    conffile: Conffile,
    vm_version: str,
    vm_status: bytes | None,
    fetch: Callable[[Conffile], bytes | None] | None,
    memo: MutableMapping[str, object],
) -> tuple[bytes | None, str]:
    """The VM has another version of the package than B1: the ancestor of its edit is the
    pristine conffile of ITS version (as dpkg and ucf take it on an upgrade). The md5 of that
    version comes from the VM's status (untrusted), so only the base's copies count (its
    generations' files and apt caches: ``base_only``), never the VM's own cache."""
    package = f"{_show(conffile.package)} {_show(vm_version)}"
    theirs = memo.get("dpkgdb:vm-conffiles")
    if not isinstance(theirs, dict):
        theirs = conffiles(vm_status)
        memo["dpkgdb:vm-conffiles"] = theirs
    mine = theirs.get(conffile.path)
    if not isinstance(mine, Conffile) or (mine.package, mine.version) != (
        conffile.package,
        vm_version,
    ):
        return (
            None,
            f" (conffile of {package} in the VM, {_show(conffile.version)} in B1: no ancestor)",
        )
    wanted = Conffile(
        conffile.path, conffile.package, conffile.architecture, vm_version, mine.md5, True
    )
    data = fetch(wanted) if fetch is not None else None
    if data is not None and md5_of(data) == mine.md5:
        return data, (
            f" (ancestor: {package}'s pristine conffile, the VM's version — B1 has "
            f"{_show(conffile.version)} — from the base's copies)"
        )
    return None, (
        f" (conffile of {package} in the VM, {_show(conffile.version)} in B1: no pristine copy "
        "of the VM's version in the base)"
    )


# -- ucf -----------------------------------------------------------------------------------------


def ucf_hashes(data: bytes | None) -> dict[str, str]:
    """ucf's hashfile (``MD5  PATH`` per line): the md5 of each file's pristine version."""
    out: dict[str, str] = {}
    for line in (data or b"").split(b"\n"):
        words = line.split(None, 1)
        if len(words) == 2 and re.fullmatch(rb"[0-9a-f]{32}", words[0]):
            out[words[1].strip().decode("utf-8", "surrogateescape")] = words[0].decode()
    return out


def _ucf_ancestor(
    path: str,
    ucf: Triple,
    local: bytes,
    new: bytes,
    fetch: Callable[[Conffile], bytes | None] | None,
    memo: MutableMapping[str, object],
) -> tuple[bytes | None, str]:
    """A file ucf manages (``sshd_config``: a package's postinst hands it to ``ucf``, which
    keeps the pristine copy in ``/var/lib/ucf/cache/:etc:ssh:sshd_config`` and its md5 in
    ``/var/lib/ucf/hashfile``): the pristine copy is the ancestor, as ``ucf --three-way``
    takes it. B1's hashfile is the reference; the VM's names the VM's pristine version: the
    same md5 lets any copy count (B1's, the VM's, a cache's), another one only the base's."""
    hashes = memo.get("dpkgdb:ucf")
    if not isinstance(hashes, tuple):
        hashes = (ucf_hashes(ucf[1]), ucf_hashes(ucf[2]))
        memo["dpkgdb:ucf"] = hashes
    vm_hashes, b1_hashes = hashes
    md5, vm_md5 = b1_hashes.get(path), vm_hashes.get(path)
    if md5 is None:
        return None, ""
    if vm_md5 is None:
        return None, " (managed by ucf in B1, not in the VM: no common ancestor)"
    cache = UCF_CACHE + path.replace("/", ":")
    if vm_md5 == md5:
        if md5_of(new) == md5:
            return new, " (ancestor: ucf's pristine copy, B1's file unmodified)"
        if md5_of(local) == md5:
            return local, " (ancestor: ucf's pristine copy, the VM's file unmodified)"
    wanted = Conffile(path, "", "", "", vm_md5, base_only=vm_md5 != md5, cache=cache)
    data = fetch(wanted) if fetch is not None else None
    if data is not None and md5_of(data) == vm_md5:
        whose = "" if vm_md5 == md5 else " of the VM's version, from the base"
        return data, f" (ancestor: ucf's pristine copy{whose}, md5 checked)"
    return None, " (managed by ucf: no pristine copy found)"
