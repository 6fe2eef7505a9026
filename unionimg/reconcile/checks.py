"""The consistency guarantee checked before the swap (issue 12, item 1).

After a VM's plan is applied to ``upper.new`` and before the journal may say "swap",
:func:`check_staged` asks the host's own package and user tools whether the staged result
(the union of B1 and ``upper.new``) is consistent:

=================  ===========================================================================
check              command (the host's program, in the sandbox below)
=================  ===========================================================================
``dpkg --audit``   ``dpkg --root=/union --audit``: half-installed, unconfigured, broken packages
``apt-get check``  ``apt-get -o Dir=/union/ check`` with an apt configuration of ours only
                   (``APT_CONFIG``, absolute paths to empty sources/parts; no lists, no caches
                   written, no lock, no network): unmet dependencies of the installed packages
``pwck -r``        ``pwck -r /etc/passwd /etc/shadow`` on copies of the union's files
``grpck -r``       ``grpck -r /etc/group /etc/gshadow`` likewise
``dpkg --verify``  ``dpkg --root=/union --verify P...`` for the base packages the VM did not
                   change itself but whose files its layer can hide or whose database files it
                   holds (:func:`scope_of`)
=================  ===========================================================================

Only problems B1 itself does not have count: the same checks run once per generation on B1
alone (Debian's own minbase fails ``pwck -r``: system users whose home does not exist) and
are kept in the store (``bases/B/checks/N.json``, :class:`~unionimg.store.records.CheckBaseline`,
recomputed when the host's programs change). A check fails when it prints a line B1's run
does not print, or exits non-zero where B1's exits zero; its first new lines are the
reason the VM stays, whole, on B0 (:class:`Inconsistent`).

A VM is checked only when the programs could say something B1 does not: when ``upper.new``
holds part of dpkg's database (``/var/lib/dpkg``), apt's ``extended_states`` or a user
database (passwd, group, shadow, gshadow), or hides (opaque directory, a non-directory over a
directory) a path of a base package. Otherwise the union's package and user state *is* B1's
and the report says :data:`NOT_NEEDED` (no program, no mount; a scan of ``upper.new``).

A package the VM changed itself (it owns a non-directory entry of ``upper.new`` outside
dpkg's database, or its status paragraph differs from B1's) is not verified: its files are
the VM's to change. Every other base package reads B1's bytes wherever ``upper.new`` neither
hides nor holds them, so only those it hides or whose ``info`` files it holds are verified.

The guest is untrusted and the union holds its files. The checks run in a sandbox where the
union is only data (``docs/security.md``, rule 11):

* ``setpriv --pdeathsig KILL -- unshare --mount --pid --net --ipc --uts --fork --kill-child``
  (the pattern of :mod:`unionimg.layers.sandbox`, :func:`~unionimg.layers.sandbox.contained`):
  private mounts that vanish with the namespace, no network, no IPC, killed with unionimg.
* Its first process (:func:`unionimg.reconcile.checks_inside.main`, unionimg's Python, which
  imports only what it runs) mounts a tmpfs as the new root R with
  the host's ``/usr`` bound read-only (``nosuid,nodev``), the merged-usr links (``/bin ->
  usr/bin``...), ``/dev/null``, and the union — overlayfs of ``upper.new`` and B1 as two lower
  layers, no upper layer: read-only, ``nosuid,nodev,noexec`` — at ``/union``. R's ``/etc``
  is unionimg's: ``nsswitch.conf`` naming only ``files`` (built into glibc: no NSS module is
  ever loaded), the host's ``ld.so.cache``, an empty apt configuration, and copies of the
  union's user databases (read with no symlink followed, regular files of at most 64 MiB).
  The guest's ``/etc`` never is the programs' ``/etc``: not its ``ld.so.preload``,
  ``ld.so.cache``, ``nsswitch.conf``, ``apt.conf.d`` or ``dpkg.cfg.d``. The top-level
  directories of the union where its users' homes are (``/home``, ``/root``, ``/var``...) are
  bound read-only at R's top so ``pwck`` finds homes where the guest has them.
* Each program runs as ``chroot R setpriv --no-new-privs --bounding-set -all,+dac_read_search
  --inh-caps -all --ambient-caps -all -- PROGRAM``: the host's binary from R's ``/usr`` (the
  host's), its libraries from there, with no capability but reading, no new privileges
  (setuid or file capabilities), a clean environment, a time limit. No program runs from the
  union (noexec besides), none is given ``--root``/``-R`` of a tool that chroots into it
  (``pwck -R`` would load the tree's NSS modules), no host tool is pointed at a guest
  library. A guest symlink is resolved inside R, where the only host files are ``/usr`` and
  unionimg's ``/etc`` (``/var/lib/dpkg/status -> /etc/shadow`` reads the union's own shadow
  copy, never the host's).

Cost (Debian fixture, 2 cores, ``bench/checks_cost.py``): 0.25-0.5 s per checked VM (the
sandbox, its mounts, four or five programs), about 12 ms for a VM that needs none; B1's own
result once per generation 2-3 s (``dpkg --verify`` hashes every base file).
``reconcile --dry-run`` runs no check; ``reconcile --no-checks`` skips them.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from unionimg.entries import DIR, Entry
from unionimg.errors import EXIT_RECONCILE_FAILED, ToolFailed, UnionimgError
from unionimg.fs.manifest import scan_tree
from unionimg.layers import sandbox
from unionimg.reconcile.checks_inside import (
    APT,
    AUDIT,
    GRPCK,
    PROGRAM_TIMEOUT,
    PWCK,
    USER_DBS,
    read_db,
)
from unionimg.runner import run, which
from unionimg.store.reconcile_records import CheckBaseline, CheckOutcome
from unionimg.store.records import RecordError

if TYPE_CHECKING:  # the inside (python -S) imports only what it runs
    from unionimg.layers.base import Generation
    from unionimg.store.layout import Store

NOT_NEEDED = "not needed (no package or user data changed)"
SKIPPED = "skipped (--no-checks)"
#: what makes the programs needed when ``upper.new`` holds it (or hides it)
DPKG_DB = "/var/lib/dpkg"
APT_STATE = "/var/lib/apt/extended_states"
TRIGGERS = (DPKG_DB, APT_STATE, *(f"/etc/{n}" for n in USER_DBS))
WORDS = 5  # lines of a failing check quoted in the report
BASELINE_VERSION = 1  # bump when the checks' commands change


@dataclass(frozen=True)
class Problem:
    """One failing check, in its own words (the lines B1's run does not have)."""

    check: str
    words: tuple[str, ...]

    def text(self) -> str:
        return (
            f"{self.check}: "
            + " | ".join(self.words[:WORDS])
            + (
                f" | ... ({len(self.words) - WORDS} more line(s))"
                if len(self.words) > WORDS
                else ""
            )
        )


@dataclass(frozen=True)
class Verdict:
    """What the checks said of one staged result."""

    note: str  # for the report: NOT_NEEDED, "passed ...", "failed ..."
    problems: tuple[Problem, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class Inconsistent(UnionimgError):
    """The staged result fails a check B1 passes: the VM stays whole on its generation.
    The message's first line says so, one line per failing check follows."""

    exit_code = EXIT_RECONCILE_FAILED

    def __init__(self, verdict: Verdict, generation: int) -> None:
        super().__init__(
            "the staged result fails the consistency checks; the instance stays on "
            f"generation {generation}, untouched:"
            + "".join(f"\n  {p.text()}" for p in verdict.problems)
        )
        self.note = verdict.note


# -- what the base holds (trusted: the admin's generation) ----------------------------------
@dataclass(frozen=True)
class BaseFacts:
    """B1's packages (their paths, their status paragraphs) and user databases."""

    owners: Mapping[str, frozenset[str]] = field(default_factory=dict)  # path -> packages
    paragraphs: Mapping[str, str] = field(default_factory=dict)  # package -> paragraph
    has_dpkg: bool = False
    user_dbs: frozenset[str] = frozenset()  # which of USER_DBS B1 has

    @functools.cached_property
    def paths(self) -> tuple[str, ...]:
        """Every path a package owns, sorted: the ones beneath a prefix are one slice."""
        return tuple(sorted(self.owners))

    def beneath(self, prefix: str) -> Sequence[str]:
        """The owned paths strictly beneath ``prefix`` (``/a/b`` for ``/a``)."""
        lo = bisect.bisect_left(self.paths, prefix + "/")
        hi = bisect.bisect_left(self.paths, prefix + "0")  # "0" sorts right after "/"
        return self.paths[lo:hi]

    def checks(self) -> tuple[str, ...]:
        out = [AUDIT, APT] if self.has_dpkg else []
        if "passwd" in self.user_dbs:
            out.append(PWCK)
        if "group" in self.user_dbs:
            out.append(GRPCK)
        return tuple(out)


def paragraphs(status: bytes) -> dict[str, str]:
    """dpkg status paragraphs by package name (``Package:`` field; a name seen twice, as
    with several architectures, keeps both paragraphs under it)."""
    out: dict[str, str] = {}
    text = status.decode("utf-8", errors="surrogateescape").replace("\r\n", "\n")
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para:
            continue
        name = next((ln[8:].strip() for ln in para.split("\n") if ln.startswith("Package:")), None)
        if name is not None:
            out[name] = out[name] + "\n\n" + para if name in out else para
    return out


def _ident(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _base_facts(root: str, ident: tuple[int, int, int]) -> BaseFacts:
    del ident  # the cache key: the generation's manifest, so a new generation is read anew
    tree = Path(root)
    dbs = frozenset(n for n in USER_DBS if os.path.isfile(tree / "etc" / n))
    status = tree / DPKG_DB.lstrip("/") / "status"
    if not status.is_file():
        return BaseFacts(user_dbs=dbs)
    owners: dict[str, set[str]] = {}
    info = tree / DPKG_DB.lstrip("/") / "info"
    for name in sorted(os.listdir(info)) if info.is_dir() else ():
        if not name.endswith(".list"):
            continue
        package = name[: -len(".list")].split(":")[0]  # libc6:amd64 -> libc6
        for line in (info / name).read_bytes().decode("utf-8", "surrogateescape").splitlines():
            if line.startswith("/"):
                owners.setdefault(line.rstrip("/") or "/", set()).add(package)
    return BaseFacts(
        owners={p: frozenset(s) for p, s in owners.items()},
        paragraphs=paragraphs(status.read_bytes()),
        has_dpkg=True,
        user_dbs=dbs,
    )


def base_facts(gen: Generation, root: Path) -> BaseFacts:
    """B1's facts, read from its mounted tree once per generation (per process)."""
    return _base_facts(str(root), _ident(gen.manifest_path))


# -- what needs checking -------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    why: tuple[str, ...] = ()  # guest paths that make the programs needed
    verify: tuple[str, ...] = ()  # base packages to verify

    @property
    def needed(self) -> bool:
        return bool(self.why or self.verify)


def _ancestors(path: str) -> Iterable[str]:
    """``/a/b/c`` -> ``/a``, ``/a/b`` (not the path itself)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        yield "/" + "/".join(parts[:i])


def _hides(e: Entry) -> bool:
    """An upper entry that hides whatever B1 has beneath it."""
    return e.kind != DIR or e.opaque


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _package_of_info(path: str) -> str | None:
    """``/var/lib/dpkg/info/libc6:amd64.md5sums`` -> ``libc6:amd64``."""
    head = DPKG_DB + "/info/"
    if not path.startswith(head) or "/" in path[len(head) :]:
        return None
    name = path[len(head) :]
    return name.rsplit(".", 1)[0].split(":")[0] if "." in name else None


def scope_of(entries: Mapping[str, Entry], base: BaseFacts, union_status: bytes | None) -> Scope:
    """What the staged result needs checked (pure): ``entries`` are ``upper.new``'s by
    guest path, ``union_status`` the union's ``/var/lib/dpkg/status`` when ``upper.new``
    holds it (None: B1's shows, or there is none)."""
    why = sorted(
        p
        for p, e in entries.items()
        if p != "/"
        and (e.kind != DIR or e.opaque)
        and any(_under(p, t) or _under(t, p) for t in TRIGGERS)
    )
    if not base.has_dpkg:
        return Scope(tuple(why))
    changed: set[str] = set()  # the base packages the VM changed itself
    hiding = {p for p, e in entries.items() if p != "/" and _hides(e)}
    for p in hiding:
        if entries[p].kind != DIR and not _under(p, DPKG_DB):
            changed |= base.owners.get(p, frozenset())
    if union_status is not None:
        mine = paragraphs(union_status)
        changed |= {n for n, para in base.paragraphs.items() if mine.get(n) != para}
    affected: set[str] = set()
    for p in hiding:  # a package whose database files the layer holds
        pkg = _package_of_info(p)
        if pkg is not None and pkg in base.paragraphs:
            affected.add(pkg)
    for p in hiding:  # the base's paths the layer hides (not those it holds itself)
        for path in base.beneath(p):
            if path not in entries:
                affected |= base.owners[path]
    names = affected - changed
    return Scope(tuple(why), tuple(sorted(names)))


# -- the host side ---------------------------------------------------------------------------
_ISOLATE = ("--net", "--ipc", "--uts")
_TOOLS = ("dpkg", "apt-get", "pwck", "grpck", "setpriv", "chroot")
_locks: dict[tuple[str, int], threading.Lock] = {}
_locks_lock = threading.Lock()


def tools_signature() -> str:
    """What the host's programs are (path, size, mtime): B1's kept result is recomputed
    when they change (an upgraded dpkg may word things differently)."""
    out = [f"v{BASELINE_VERSION}"]
    for name in _TOOLS:
        try:
            path = os.path.realpath(which(name))
            st = os.stat(path)
            out.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except (UnionimgError, OSError):
            out.append(f"{name}:-")
    return ";".join(out)


def sandboxed(
    store: Store, lowers: Sequence[Path], checks: Sequence[str], verify: Sequence[str]
) -> tuple[CheckOutcome, ...]:
    """Run ``checks`` (and ``dpkg --verify`` of ``verify``; ``["*"]``: every package) on
    the read-only union of ``lowers`` (topmost first) in the sandbox; their outcomes."""
    with store.staging("checks") as scratch:
        root = scratch / "root"
        root.mkdir()
        layers = list(lowers)
        if len(layers) == 1:  # overlayfs wants two lower layers: an empty one on top
            (scratch / "empty").mkdir()
            layers.insert(0, scratch / "empty")
        spec = json.dumps(
            {
                "root": str(root),
                "lowers": [str(x) for x in layers],
                "checks": list(checks),
                "verify": list(verify),
            }
        )
        argv = sandbox.contained(
            "unionimg.reconcile.checks_inside", [spec, *sandbox.parent_args()], isolate=_ISOLATE
        )
        limit = PROGRAM_TIMEOUT * (len(checks) + 1) + 60
        res = run(argv, check=False, timeout=limit, what="checking the staged result")
    if res.returncode != 0:
        raise ToolFailed(
            "the consistency checks could not run: "
            f"{sandbox.why_failed(res.stderr, res.returncode)} (or reconcile with --no-checks)"
        )
    try:
        data = json.loads(res.stdout)
        if not isinstance(data, list):
            raise RecordError("not a list")
        return tuple(CheckOutcome.from_json(x) for x in data)
    except (ValueError, RecordError) as exc:
        raise ToolFailed(f"the consistency checks gave no result ({exc})") from exc


def baseline(store: Store, gen: Generation, root: Path, facts: BaseFacts) -> CheckBaseline:
    """The checks on the generation alone, kept in the store (once per generation, or
    again when the host's programs changed)."""
    from unionimg.store.layout import read_record, write_record

    path = store.base_dir(gen.base) / "checks" / f"{gen.number}.json"
    tools = tools_signature()
    with _locks_lock:
        lock = _locks.setdefault((str(path), 0), threading.Lock())
    with lock:
        if path.is_file():
            kept = read_record(path, CheckBaseline)
            if kept.node == gen.node and kept.tools == tools:
                return kept
        verify = ["*"] if facts.has_dpkg else []
        made = CheckBaseline(gen.node, tools, sandboxed(store, [root], facts.checks(), verify))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_record(path, made)
        return made


def judge(outcomes: Sequence[CheckOutcome], base: Sequence[CheckOutcome]) -> tuple[Problem, ...]:
    """The checks that fail where B1 passes: a line B1's run does not print, or a non-zero
    exit where B1's is zero."""
    by_check = {o.check: o for o in base}
    out = []
    for o in outcomes:
        b = by_check.get(o.check)
        seen = set(b.lines) if b is not None else set()
        new = tuple(ln for ln in o.lines if ln not in seen)
        if new or (o.code != 0 and (b is None or b.code == 0)):
            out.append(Problem(o.check, new or o.lines[-WORDS:] or (f"exit status {o.code}",)))
    return tuple(out)


def _layered(entries: Mapping[str, Entry], path: str) -> str:
    """Where the union's ``path`` comes from: "upper", "base" or "none" (hidden)."""
    for a in _ancestors(path):
        e = entries.get(a)
        if e is not None and _hides(e) and path not in entries:
            return "none"
    e = entries.get(path)
    if e is None:
        return "base"
    return "none" if e.kind == "whiteout" else "upper"


def check_staged(store: Store, b1: Generation, b1_root: Path, upper_new: Path) -> Verdict:
    """Check the union of B1 (mounted at ``b1_root``) and ``upper_new`` (see the module)."""
    start = time.monotonic()
    facts = base_facts(b1, b1_root)
    entries = {e.path: e for e in scan_tree(upper_new, hash_files=False, digests=False)}
    status: bytes | None = None
    refused: list[Problem] = []  # a status that is not a regular file: never read
    where = _layered(entries, DPKG_DB + "/status")
    if facts.has_dpkg and where != "base":
        data = read_db(upper_new, DPKG_DB + "/status") if where == "upper" else b""
        if isinstance(data, str):
            refused.append(Problem(AUDIT, (data,)))
        status = data if isinstance(data, bytes) else b""  # unreadable: every package differs
    scope = scope_of(entries, facts, status)
    checks = facts.checks()
    if refused:  # a status dpkg must not be given (a symlink, too large): reported as is
        checks = tuple(c for c in checks if c not in (AUDIT, APT))
        scope = Scope(scope.why)
    if not scope.needed or not (checks or scope.verify):
        return Verdict(NOT_NEEDED, seconds=time.monotonic() - start)
    base = baseline(store, b1, b1_root, facts)
    outcomes = sandboxed(store, [upper_new, b1_root], checks, scope.verify)
    problems = (*refused, *judge(outcomes, base.outcomes))
    seconds = time.monotonic() - start
    ran = ", ".join(o.check for o in outcomes)
    if problems:
        return Verdict(f"failed ({ran}; {seconds:.1f} s)", problems, seconds)
    return Verdict(f"passed ({ran}; {seconds:.1f} s)", seconds=seconds)
