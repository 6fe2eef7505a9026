"""Reconcile: bring instances from base generation B0 to B1, merging into their upper layers.

The base delta B0→B1 is computed once per pair of generations (a join of their two SQLite
manifests; ``base update`` saves each new generation's delta from its parent, so usually it
is only read) and shared by every instance; each instance then costs O(|U| + |delta|): its
upper layer is scanned, the pure planner (:mod:`unionimg.reconcile.plan`) decides every path,
and the plan is applied like this::

    lock instance-VM; mount U read-write (the instance must be neither mounted nor running)
    (no journal yet)   → commit U's current state to its hg repository (nothing local is
                         lost), while beside it upper.new = hardlink copy of upper gets the
                         plan applied and conflict artefacts go aside in the store; syncfs
    journal "swap"     → renameat2(RENAME_EXCHANGE) upper <-> upper.new   (the atomic step)
                         upper.new (now the old tree) becomes upper.prev (for --undo)
    instance.json generation = B1; conflicts.json updated
    commit "reconcile ...: generation B0 -> B1" (only the paths the plan touched + the
    sidecar); journal removed; last-reconcile.json kept

A crash (SIGKILL) anywhere is repaired by the next run from the journal: before the swap
the staging tree is thrown away and planning starts again; after it (the journal records the
inode number of upper.new, so the swap is recognised even if the journal was not updated)
the run rolls forward. Live files are only ever replaced by ``rename(2)`` of complete files
built in upper.new, and conflict markers only ever go into the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Literal

from unionimg.display import shown
from unionimg.entries import DIR, FILE, LARGE_FILE, Change, Entry
from unionimg.errors import (
    EXIT_CONFLICTS,
    EXIT_OK,
    EXIT_RECONCILE_FAILED,
    Conflict,
    NotFound,
    StoreFull,
    ToolFailed,
    UnionimgError,
    UsageError,
)
from unionimg.faults import checkpoint
from unionimg.fs import fsops
from unionimg.fs.space import WriteWatch, require_space, write_failure
from unionimg.layers import history, identity
from unionimg.layers.base import (
    Generation,
    generations,
    get_generation,
    hg_template,
    mount_generation,
    unmount_layers,
)
from unionimg.layers.base import delta as base_delta
from unionimg.layers.instance import Instance, durable, load, save, state, u_layer
from unionimg.layers.snapshot import refuse_reconcile
from unionimg.layers.status import (
    blame_space,
    commit_estimate,
    require_u_space,
    scan_upper,
    write_history_sidecar,
)
from unionimg.layers.ucheck import sync_image
from unionimg.reconcile import checks as consistency
from unionimg.reconcile import dpkgdb, ldcache
from unionimg.reconcile.dpkgdb import Conffile
from unionimg.reconcile.merge import is_binary, merge3
from unionimg.reconcile.plan import (
    CONFLICT,
    DROP,
    ERROR,
    KEEP,
    PACKAGES,
    SET_META,
    WRITE,
    Action,
    plan_instance,
)
from unionimg.reconcile.policy import KEEP_LOCAL, TAKE_BASE, Policy, Rule
from unionimg.reconcile.pristine import PRISTINE_GENERATIONS, PristineFinder
from unionimg.reconcile.proposal import PROPOSAL, apply_owner_changes
from unionimg.store.layout import (
    Store,
    now_iso,
    read_record,
    write_atomic,
    write_record,
)
from unionimg.store.reconcile_records import (
    HeldResolution,
    HeldResolutions,
    LastReconcile,
    PackageConflict,
    PackageConflicts,
    ReconcileReport,
    ReportAction,
    ReportConflict,
)
from unionimg.store.reconcile_records import InstanceReport as InstanceReport  # what run() returns
from unionimg.store.records import (
    ConflictRecord,
    Conflicts,
    JsonObject,
    ReconcileJournal,
    Resolution,
    compact,
    sorted_conflicts,
)

REPORTS_KEPT = 50


class _Draft:
    """The report of one instance as far as its reconcile got: a failure reports what was
    found before it (generations, the plan's actions) with the error."""

    __slots__ = ("report",)

    def __init__(self, name: str) -> None:
        self.report = InstanceReport(name)


def exit_code(reports: Sequence[InstanceReport]) -> int:
    failed = [r for r in reports if r.status == "error"]
    if failed and all(r.full for r in failed):
        return StoreFull.exit_code  # only space was lacking: free it and rerun
    if failed:
        return EXIT_RECONCILE_FAILED
    if any(r.status == "conflicts" for r in reports):
        return EXIT_CONFLICTS
    return EXIT_OK


# -- per-instance files in the store ------------------------------------------------------
def _journal(store: Store, name: str) -> Path:
    return store.instance_dir(name) / ReconcileJournal.FILE


def _last(store: Store, name: str) -> Path:
    return store.instance_dir(name) / LastReconcile.FILE


def conflicts_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / Conflicts.FILE


def conflicts_dir(store: Store, name: str) -> Path:
    return store.instance_dir(name) / "conflicts"


def conflicts(store: Store, name: str) -> tuple[ConflictRecord, ...]:
    """The instance's conflicts still unresolved."""
    path = conflicts_path(store, name)
    return read_record(path, Conflicts).items if path.is_file() else ()


def _write_conflicts(store: Store, name: str, items: Sequence[ConflictRecord]) -> None:
    write_record(conflicts_path(store, name), Conflicts(tuple(items)))


def _held_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / HeldResolutions.FILE


def held_resolutions(store: Store, name: str) -> tuple[HeldResolution, ...]:
    """How the admin settled conflicts policy ``fail`` held (for the next reconcile)."""
    path = _held_path(store, name)
    return read_record(path, HeldResolutions).items if path.is_file() else ()


def _literal_glob(path: str) -> str:
    """A policy glob that matches exactly ``path`` (its glob characters made literal)."""
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in path)


def with_held(policy: Policy, held: Sequence[HeldResolution], generation: int) -> Policy:
    """``policy`` with the admin's resolutions of held conflicts (for a reconcile to
    ``generation``) as first rules: each decides exactly its path."""
    rules = tuple(
        Rule(0, _literal_glob(h.path), h.action, note=f"resolved, took {h.took}")
        for h in held
        if h.generation == generation
    )
    return replace(policy, rules=rules + policy.rules) if rules else policy


def generations_kept(store: Store, name: str) -> list[tuple[int, str]]:
    """The base generations the instance's reconcile records still need, with why: both of
    an interrupted reconcile (its journal) and the one ``reconcile --undo`` returns to.
    The journal is read first: a reconcile writes the undo record before it drops the
    journal, so a reader in between misses neither."""
    out = []
    journal = _journal(store, name)
    if journal.is_file():
        j = read_record(journal, ReconcileJournal)
        why = f"the interrupted reconcile of instance {name} needs it"
        out += [(j.from_generation, why), (j.to_generation, why)]
    last = _last(store, name)
    if last.is_file():
        out.append(
            (
                read_record(last, LastReconcile).from_generation,
                f"'reconcile --undo {name}' returns to it",
            )
        )
    return out


def list_conflicts(store: Store, name: str) -> list[JsonObject]:
    """``unionimg conflicts VM --json``: the instance's conflicts, as JSON."""
    load(store, name)
    return [c.to_json() for c in conflicts(store, name)]


def _conflict_key(path: str) -> str:
    return hashlib.sha256(os.fsencode(path)).hexdigest()[:16]


class _Content:
    """Reads for the planner: U's copies and files of the two generations (mounted lazily)."""

    def __init__(
        self,
        upper: Path,
        gens: Callable[[Literal["b0", "b1"]], Path],
        between: Callable[[], Iterator[Path]] = lambda: iter(()),
    ) -> None:
        self._upper = upper
        self._gens = gens
        self._between = between  # the generations between B0 and B1, mounted as reached

    def upper(self, path: str) -> bytes:
        return fsops.read_file(self._upper, path)

    def base(self, which: Literal["b0", "b1"], path: str) -> bytes:
        return fsops.read_file(self._gens(which), path)

    def pristine(self, conffile: Conffile) -> bytes | None:
        """A conffile's pristine content (md5-checked, :mod:`unionimg.reconcile.pristine`):
        the apt caches of B1, U, B0, then the generations between (their file or cache)."""

        def roots() -> Iterator[tuple[Path, bool]]:  # (tree, is it the base's)
            yield self._gens("b1"), True
            yield self._upper, False
            yield self._gens("b0"), True
            yield from ((root, True) for root in self._between())

        return PristineFinder(roots())(conffile)


class Reconciler:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        dry_run: bool = False,
        to_generation: int | None = None,
        checks: bool = True,
        progress: Callable[[InstanceReport], None] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.dry_run = dry_run
        self.checks = checks  # the consistency checks before the swap (checks.py)
        self.to_generation = to_generation
        self.progress = progress
        self._deltas: dict[tuple[str, int, int], dict[str, Change]] = {}
        self._mounts: dict[tuple[str, int], Path] = {}
        self._wheres: list[Path] = []  # where each generation's layers are mounted
        self._lock = threading.Lock()
        self._local = threading.local()
        self._servers: list[history.Server] = []
        self._pools: list[ThreadPoolExecutor] = []
        self._stage_ctx: contextlib.AbstractContextManager[Path] | None = None
        self._stage: Path | None = None

    # -- shared, per run ------------------------------------------------------------------
    def delta(self, b0: Generation, b1: Generation) -> dict[str, Change]:
        """The changes B0 -> B1 by path, read (or computed) once per run for all instances."""
        key = (b0.base, b0.number, b1.number)
        with self._lock:
            if key not in self._deltas:
                self._deltas[key] = {c.path: c for c in base_delta(self.store, b0, b1)}
            return self._deltas[key]

    def gen_root(self, gen: Generation) -> Path:
        key = (gen.base, gen.number)
        with self._lock:
            if key not in self._mounts:
                if self._stage is None:
                    # a pid-tagged staging dir: a killed run's mounts are swept by the next
                    self._stage_ctx = self.store.staging("reconcile-generations")
                    self._stage = self._stage_ctx.__enter__()
                where = self._stage / f"{gen.base}-{gen.number}"
                self._mounts[key] = mount_generation(self.store, gen, where)  # its chain
                self._wheres.append(where)
            return self._mounts[key]

    def hg(self, root: Path, guest: str | None = None) -> history.Repo:
        server = getattr(self._local, "server", None)
        if server is None:
            template = hg_template(self.store)
            # any repository will do to start a server, but not the template itself: a
            # server may write caches into its repository, and the template is copied
            anchor = self.store.publish(
                template.with_name("hg-anchor"),
                lambda tmp: history.init_repo(tmp, template=template),
            )
            server = history.Server(anchor)
            self._local.server = server
            with self._lock:
                self._servers.append(server)
        repo: history.Repo = server.repo(root, guest=guest)  # guest's .hg: checked first
        return repo

    def _committer(self) -> ThreadPoolExecutor:
        """This worker's helper thread for Mercurial commits (its server is the worker's)."""
        pool: ThreadPoolExecutor | None = getattr(self._local, "committer", None)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hg-commit")
            self._local.committer = pool
            with self._lock:
                self._pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown()
        for server in self._servers:
            server.close()
        for where in self._wheres:
            unmount_layers(where)
        self._mounts.clear()
        self._wheres.clear()
        if self._stage_ctx is not None:
            self._stage_ctx.__exit__(None, None, None)
            self._stage_ctx = self._stage = None

    # -- the fleet --------------------------------------------------------------------------
    def run(self, names: Sequence[str], jobs: int = 1) -> list[InstanceReport]:
        if not self.dry_run:  # a full store: one line, not one failure per instance
            require_space(self.store.root, 0, "reconcile")
        try:
            if jobs <= 1:
                return [self._report(n) for n in names]
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                return list(pool.map(self._report, names))
        finally:
            self.close()

    def _report(self, name: str) -> InstanceReport:
        draft = _Draft(name)
        try:
            self.one(name, draft)
        except UnionimgError as exc:
            draft.report = draft.report.replace(
                status="error",
                error=exc.message,
                full=isinstance(exc, StoreFull),
                checks=exc.note if isinstance(exc, consistency.Inconsistent) else None,
            )
        except OSError as exc:
            full = write_failure(
                exc,
                exc.filename or self.store.root,
                f"reconcile {name}",
                store_path=self.store.root,
            )
            draft.report = draft.report.replace(
                status="error",
                error=full.message if full else f"{exc.strerror or exc} ({exc.filename or name})",
                full=full is not None,
            )
        report = draft.report
        if self.progress:
            self.progress(report)
        return report

    def one(self, name: str, draft: _Draft) -> None:
        """Reconcile one instance; ``draft.report`` says how far it got."""
        inst = load(self.store, name)
        refuse_reconcile(self.store, inst, self.to_generation)  # snapshot layers (issue 13)
        draft.report = draft.report.replace(from_generation=inst.generation)
        st = state(self.store, name)
        if st != "stopped":
            raise Conflict(
                f"instance '{name}' is {st}; "
                f"{'umount it' if st == 'mounted' else 'stop it'} before reconciling"
            )
        with self.store.lock(f"instance-{name}", purpose=f"reconcile {name}"):
            journal = _journal(self.store, name)
            if journal.is_file() and not self.dry_run:
                with u_layer(self.store, name, write=True) as u:
                    try:
                        self._recover(inst, u)
                    except (OSError, ToolFailed) as exc:
                        raise blame_space(exc, self.store, u, name, f"reconcile {name}") from exc
                inst = load(self.store, name)
                draft.report = draft.report.replace(from_generation=inst.generation)
            elif journal.is_file():
                raise Conflict(
                    f"instance '{name}' has an interrupted reconcile; run reconcile "
                    "without --dry-run to finish it"
                )
            b0 = get_generation(self.store, inst.base, inst.generation)
            b1 = get_generation(self.store, inst.base, self.to_generation)
            draft.report = draft.report.replace(to_generation=b1.number)
            if b0.number == b1.number:  # case 17
                draft.report = self._pending(name, draft.report)
                return
            delta = self.delta(b0, b1)
            # the admin's resolutions of conflicts policy ``fail`` held for this generation
            policy = with_held(self.policy, held_resolutions(self.store, name), b1.number)
            with u_layer(self.store, name, write=not self.dry_run) as u:
                upper = u / "upper"

                def gens(which: Literal["b0", "b1"]) -> Path:
                    return self.gen_root(b0 if which == "b0" else b1)

                def between() -> Iterator[Path]:  # item 4: the generation that installed it
                    gens_ = generations(self.store, b1.base)
                    older = [g for g in gens_ if b0.number < g.number < b1.number]
                    older.sort(key=lambda g: -g.number)
                    for gen in older[:PRISTINE_GENERATIONS]:
                        yield self.gen_root(gen)

                entries = _hash_files_in(upper, scan_upper(u, hash_files=False), delta)
                content = _Content(upper, gens, between)
                with b0.manifest() as m0, b1.manifest() as m1:
                    plan = plan_instance(entries, delta, m0, m1, policy, content)
                draft.report = draft.report.replace(
                    unaffected=plan.unaffected,
                    actions=tuple(
                        ReportAction(a.path, a.case, a.action, a.reason, a.packages)
                        for a in plan.actions
                        if a.action != KEEP or a.packages  # a kept status names its packages
                    ),
                    conflicts=tuple(
                        ReportConflict(a.path, a.reason, a.case) for a in plan.conflicts
                    ),
                    status="conflicts" if plan.conflicts else "clean",
                )
                if plan.errors:
                    error = "; ".join(f"{a.path}: {a.reason}" for a in plan.errors)
                    if not self.dry_run:  # recorded: 'resolve' settles them, then reconcile
                        self._hold(name, b1, plan.errors, entries, delta, content)
                        error += (
                            f" (instance stays on generation {b0.number}; held conflict(s) "
                            f"listed by 'unionimg conflicts {name}')"
                        )
                    draft.report = draft.report.replace(status="error", error=error)
                    return
                if self.dry_run:
                    return
                self._require_space(name, u, plan.actions, entries)
                try:
                    checked = self._apply(inst, u, b0, b1, plan.actions, entries)
                except (OSError, ToolFailed) as exc:
                    raise blame_space(exc, self.store, u, name, f"reconcile {name}") from exc
                draft.report = draft.report.replace(applied=True, checks=checked)
            draft.report = self._pending(name, draft.report)

    def _pending(self, name: str, report: InstanceReport) -> InstanceReport:
        """Conflicts of earlier runs still unresolved keep the instance in 'conflicts'."""
        seen = {c.path for c in report.conflicts}
        earlier = tuple(
            ReportConflict.earlier(c) for c in conflicts(self.store, name) if c.path not in seen
        )
        if not earlier:
            return report
        status = "conflicts" if report.status == "clean" else report.status
        return report.replace(conflicts=report.conflicts + earlier, status=status)

    def _hold(
        self,
        name: str,
        b1: Generation,
        errors: Sequence[Action],
        entries: list[Entry],
        delta: dict[str, Change],
        content: _Content,
    ) -> None:
        """Record the paths policy ``fail`` stopped at as held conflicts, with their versions
        set aside (the instance stays where it is): they replace the held conflicts of
        earlier runs; the other pending conflicts stay."""
        by_path = {e.path: e for e in entries}
        root = conflicts_dir(self.store, name)
        held = []
        for action in errors:
            artifacts = _held_artifacts(by_path.get(action.path), delta.get(action.path), content)
            final = root / f"{_conflict_key(action.path)}-{b1.number}-held"
            fsops.remove_tree(final)  # an earlier run's copy: U may have changed since
            final = self.store.publish(final, _artifact_writer(artifacts))
            held.append(
                ConflictRecord(
                    path=action.path,
                    reason=action.reason,
                    generation=b1.number,
                    dir=str(final),
                    files=tuple(sorted(artifacts)),
                    case=action.case,
                    held=True,
                )
            )
        paths = {c.path for c in held}
        kept = [c for c in conflicts(self.store, name) if not c.held and c.path not in paths]
        write_record(conflicts_path(self.store, name), sorted_conflicts([*kept, *held]))

    # -- applying -------------------------------------------------------------------------
    def _require_space(
        self, name: str, u: Path, actions: Sequence[Action], entries: list[Entry]
    ) -> None:
        """Room, in U and in the store (U is sparse there), for what applying the plan
        writes: the local commit, upper.new (new directories and inodes; files are
        hardlinks), the files the plan writes and their commit, and in the store the
        conflict versions set aside and the report."""
        written = [
            len(a.data) for a in actions if a.action in (WRITE, CONFLICT) and a.data is not None
        ]
        # a file's set-meta is a copy (its inode is shared with the live layer): owners
        # renumbered, metadata merged
        written += [
            a.entry.size
            for a in actions
            if a.action in (SET_META, CONFLICT)
            and a.data is None
            and a.entry is not None
            and a.entry.kind == FILE
        ]
        dirs = sum(1 for e in entries if e.kind == DIR)
        u_need = (
            dirs * 4096
            + len(entries) * 256
            + sum((n + 4095) // 4096 * 4096 for n in written)
            + commit_estimate(u, entries, written)
        )
        aside = sum(
            len(data) + 4096
            for a in actions
            if a.action == CONFLICT
            for data in a.artifacts.values()
        )
        require_u_space(
            self.store, u, name, u_need, f"reconcile {name}", store_extra=aside + (64 << 10)
        )

    def _apply(
        self,
        inst: Instance,
        u: Path,
        b0: Generation,
        b1: Generation,
        actions: Sequence[Action],
        entries: list[Entry],
    ) -> str:
        """Stage, check, swap and commit; returns the consistency checks' verdict."""
        # opened before any write: its sync reports every write-back error; closed on every
        # way out (an open descriptor on U pins the union, and U's loop device, after umount)
        with WriteWatch(u) as watch:
            return self._apply_watched(inst, u, b0, b1, actions, entries, watch)

    def _apply_watched(
        self,
        inst: Instance,
        u: Path,
        b0: Generation,
        b1: Generation,
        actions: Sequence[Action],
        entries: list[Entry],
        watch: WriteWatch,
    ) -> str:
        name = inst.name
        repo = self.hg(u, name)
        new, prev = u / "upper.new", u / "upper.prev"
        fsops.remove_tree(new)  # a crash while staging leaves only this: no journal needed
        # Mercurial records the upper layer as it is (in its own process) while upper.new
        # is staged beside it: staging never changes an inode of upper/ (fsops replaces
        # what it changes), and .hgignore keeps upper.new out of the commit
        pre_commit = self._committer().submit(
            _commit,
            repo,
            u,
            inst,
            f"local state of {name} before reconcile to {inst.base} generation {b1.number}",
            entries,  # the scan the plan was made from: the upper layer as it is now
        )
        try:
            fsops.link_copy(u / "upper", new)
            for action in actions:
                _apply_action(new, action)
            # its own machine-id / SSH host keys where B1 brings what needs them (identity.py)
            made = identity.ensure_staged(self.store, new, b1.manifest_path, name)
            # B1's ld.so.cache made again where the VM has libraries of its own (ldcache.py)
            taken = next((a.action for a in actions if a.path == ldcache.CACHE), None)
            if ldcache.needed(entries, self.delta(b0, b1), taken) and ldcache.regenerate(
                self.store, self.gen_root(b1), new
            ):
                made = [*made, ldcache.CACHE]
            # the staged union of B1 and upper.new, checked by the host's dpkg, apt, pwck
            verdict = (
                consistency.check_staged(self.store, b1, self.gen_root(b1), new)
                if self.checks
                else None
            )
            failed = verdict is not None and not verdict.ok
            conflicted = [a for a in actions if a.action == CONFLICT]
            aside = () if failed else self._set_aside(name, b1, conflicted)
        finally:
            wait([pre_commit])  # never leave Mercurial running on a U about to be unmounted
        pre = pre_commit.result()
        checkpoint("reconcile:pre-committed")
        # upper.new (and the commit) durable before the journal may say swap
        sync_image(watch, self.store.root, name, f"reconcile {name}")
        if verdict is not None and not verdict.ok:  # stays whole on B0: nothing swapped
            fsops.remove_tree(new)
            raise consistency.Inconsistent(verdict, b0.number)
        checkpoint("reconcile:staged")
        fsops.remove_tree(prev)
        journal = ReconcileJournal(
            phase="swap",
            from_generation=b0.number,
            to_generation=b1.number,
            pre_node=pre,
            started=now_iso(),
            new_ino=os.lstat(new).st_ino,
            commit_paths=tuple(sorted({*_commit_paths(actions), *("upper" + p for p in made)})),
            conflicts=aside,
            conflicts_before=conflicts(self.store, name),
        )
        write_record(_journal(self.store, name), journal)
        checkpoint("reconcile:swap-journaled")
        fsops.exchange(u / "upper", new)
        checkpoint("reconcile:swapped")
        self._finish(inst, u, journal, watch)
        return verdict.note if verdict is not None else consistency.SKIPPED

    def _finish(
        self, inst: Instance, u: Path, journal: ReconcileJournal, watch: WriteWatch | None = None
    ) -> None:
        """Everything after the swap; idempotent, so recovery can run it again. The journal
        goes only once the post-reconcile changeset is on disk (U synced, node re-read)."""
        own = watch is None
        watch = watch or WriteWatch(u)
        try:
            self._finish_watched(inst, u, journal, watch)
        finally:
            if own:
                watch.close()

    def _finish_watched(
        self, inst: Instance, u: Path, journal: ReconcileJournal, watch: WriteWatch
    ) -> None:
        name = inst.name
        new, prev = u / "upper.new", u / "upper.prev"
        if new.exists():
            fsops.remove_tree(prev)
            os.rename(new, prev)
        if inst.generation != journal.to_generation:
            inst = inst.replace(generation=journal.to_generation)
            save(self.store, inst)
        checkpoint("reconcile:generation")
        # conflicts policy 'fail' held are settled: this reconcile went past them
        write_record(
            conflicts_path(self.store, name),
            sorted_conflicts(
                [*(c for c in journal.conflicts_before if not c.held), *journal.conflicts]
            ),
        )
        _held_path(self.store, name).unlink(missing_ok=True)  # the resolutions were used
        repo = self.hg(u, name)
        post = _commit(
            repo,
            u,
            inst,
            f"reconcile {name}: base {inst.base} generation "
            f"{journal.from_generation} -> {journal.to_generation}"
            + (f" ({len(journal.conflicts)} conflict(s) kept aside)" if journal.conflicts else ""),
            paths=journal.commit_paths,
        )
        sync_image(watch, self.store.root, name, f"reconcile {name}")
        if post is not None:
            history.verify_node(u, post, repo)
        durable(u)  # nothing more is written into U: no second flush when it is unmounted
        checkpoint("reconcile:committed")
        write_record(
            _last(self.store, name),
            LastReconcile(
                from_generation=journal.from_generation,
                to_generation=journal.to_generation,
                pre_node=journal.pre_node,
                post_node=post,
                conflicts_before=journal.conflicts_before,
                finished=now_iso(),
            ),
        )
        _journal(self.store, name).unlink(missing_ok=True)

    def _recover(self, inst: Instance, u: Path) -> None:
        journal = read_record(_journal(self.store, inst.name), ReconcileJournal)
        new = u / "upper.new"
        swapped = journal.phase == "swap" and (
            not new.exists() or os.lstat(u / "upper").st_ino == journal.new_ino
        )
        if swapped:
            self._finish(inst, u, journal)
            return
        fsops.remove_tree(new)  # not swapped: the live upper is the old one, untouched
        if inst.generation != journal.from_generation:
            # the swap was made, then lost with U's writes after a write error (a full
            # store aborted U's journal): the store follows U back to the old generation
            save(self.store, inst.replace(generation=journal.from_generation))
            _write_conflicts(self.store, inst.name, journal.conflicts_before)
        _journal(self.store, inst.name).unlink(missing_ok=True)

    def _set_aside(
        self, name: str, b1: Generation, conflicts: Sequence[Action]
    ) -> tuple[ConflictRecord, ...]:
        """Write each conflict's artefacts to conflicts/KEY-G/ (built in the store's staging,
        then renamed into place: a crash leaves nothing half-written there)."""
        out = []
        root = conflicts_dir(self.store, name)
        for action in conflicts:
            key = f"{_conflict_key(action.path)}-{b1.number}"
            final = self.store.publish(root / key, _artifact_writer(action.artifacts))
            out.append(
                ConflictRecord(
                    path=action.path,
                    reason=action.reason,
                    generation=b1.number,
                    dir=str(final),
                    files=tuple(sorted(action.artifacts)),
                    case=action.case,
                    live=action.data is not None,  # its proposal is live while pending
                )
            )
        return tuple(out)


def _artifact_writer(artifacts: Mapping[str, bytes]) -> Callable[[Path], None]:
    """Builds a conflict's directory: one durable file per version (merged, base, ...), its
    name durable in the directory too, before the journal may point at it."""

    def build(tmp: Path) -> None:
        tmp.mkdir(mode=0o700)
        for label, data in artifacts.items():
            write_atomic(tmp / label, data)

    return build


def _held_artifacts(
    local: Entry | None, change: Change | None, content: _Content
) -> dict[str, bytes]:
    """The versions of a path policy ``fail`` held, as a conflict keeps them aside: the
    local copy, both base versions and, for text, their 3-way merge (with markers where
    they overlap) — regular files only, and none too large to read."""
    old = change.old if change is not None else None
    new = change.new if change is not None else None
    out: dict[str, bytes] = {}
    if local is None or local.kind != FILE or local.size >= LARGE_FILE:
        return out
    out["local"] = content.upper(local.path)
    if new is not None and new.kind == FILE and new.size < LARGE_FILE:
        out["base-new"] = content.base("b1", new.path)
    if old is not None and old.kind == FILE and old.size < LARGE_FILE:
        out["base-old"] = content.base("b0", old.path)
    if "base-new" in out and not any(is_binary(v) for v in out.values()):
        out["merged"] = merge3(out.get("base-old", b""), out["local"], out["base-new"]).data
    return out


def _hash_files_in(upper: Path, entries: list[Entry], delta: dict[str, Change]) -> list[Entry]:
    """Content hashes for the upper layer's regular files the base delta touches: the only
    ones the planner compares with the base (it reads any other it needs) — and of those
    only files as large as a base version (another size differs already: a guest's huge
    sparse file is never read)."""

    def same_size(e: Entry) -> bool:
        c = delta.get(e.path)
        return c is not None and any(
            x is not None and x.kind == FILE and x.size == e.size for x in (c.old, c.new)
        )

    return [
        replace(e, sha256=fsops.sha256_of(upper, e.path))
        if e.kind == FILE and e.sha256 is None and same_size(e)
        else e
        for e in entries
    ]


def _commit_paths(actions: Sequence[Action]) -> tuple[str, ...]:
    """What a reconcile changes in U, relative to U's root (for :meth:`Repo.commit_all`)."""
    paths = {history.SIDECAR_DIR}
    for a in actions:
        if a.action in (WRITE, DROP, SET_META) or (a.action == CONFLICT and a.entry is not None):
            paths.add("upper" + a.path if a.path != "/" else "upper")
    return tuple(sorted(paths))


def _commit(
    repo: history.Repo,
    u: Path,
    inst: Instance,
    message: str,
    entries: list[Entry] | None = None,
    paths: Sequence[str] | None = None,
) -> str | None:
    outside = write_history_sidecar(u, inst, entries)  # what Mercurial cannot hold: kept out
    node = repo.commit_all(message, paths, outside)
    return node or repo.tip()


def _apply_action(tree: Path, action: Action) -> None:
    if action.action == DROP:
        fsops.remove_entry(tree, action.path)
    elif action.action == WRITE or (action.action == CONFLICT and action.data is not None):
        # a conflict with data: what the live file holds while it is pending (plan.py)
        assert action.entry is not None
        fsops.write_entry(tree, action.path, action.entry, action.data)
    elif action.action == SET_META or (action.action == CONFLICT and action.entry is not None):
        # a conflict with an entry but no data: U's copy stays, its owner renumbered (plan.py)
        assert action.entry is not None
        fsops.set_meta(tree, action.path, action.entry)
        if action.entry.kind == DIR and not action.entry.opaque:  # item 6 (plan.py)
            fsops.clear_opaque(tree, action.path)
    elif action.action == ERROR:
        raise UsageError(f"{action.path}: {action.reason}")


# -- undo, conflicts, resolve ---------------------------------------------------------------
def undo(store: Store, name: str) -> JsonObject:
    inst = load(store, name)
    st = state(store, name)
    if st != "stopped":
        raise Conflict(f"instance '{name}' is {st}; stop or umount it before undoing")
    with store.lock(f"instance-{name}", purpose=f"reconcile --undo {name}"):
        if _journal(store, name).is_file():
            raise Conflict(
                f"instance '{name}' has an interrupted reconcile; run "
                f"'unionimg reconcile {name}' first"
            )
        last_path = _last(store, name)
        if not last_path.is_file():
            raise NotFound(f"instance '{name}' has no reconcile to undo")
        last = read_record(last_path, LastReconcile)
        if last.from_generation not in {g.number for g in generations(store, inst.base)}:
            # NotFound (3): what undo needs no longer exists; nothing is changed
            raise NotFound(
                f"instance '{name}' cannot be undone: base '{inst.base}' generation "
                f"{last.from_generation} it would return to was removed; it stays on "
                f"generation {inst.generation} as it is"
            )
        require_space(store.root, 0, f"undo the reconcile of {name}")
        with u_layer(store, name, write=True) as u, history.open_repo(u, guest=name) as repo:
            prev = u / "upper.prev"
            if not prev.is_dir():
                raise NotFound(f"instance '{name}' has no saved upper layer to go back to")
            outside = write_history_sidecar(u, inst)
            repo.addremove(outside)
            if repo.changed(outside) or repo.tip() != last.post_node:
                since = repo.changed_paths(outside, since=last.post_node)
                raise Conflict(
                    f"instance '{name}' changed since its reconcile ({_some_paths(since)}); "
                    "undo would lose those changes (commit them with "
                    f"'unionimg commit {name}' and revert by hand)"
                )
            fsops.exchange(u / "upper", prev)
            inst = inst.replace(generation=last.from_generation)
            save(store, inst)
            _write_conflicts(store, name, last.conflicts_before)
            node = _commit(
                repo,
                u,
                inst,
                f"undo reconcile of {name}: back to base {inst.base} generation "
                f"{last.from_generation}",
            )
            fsops.remove_tree(prev)
        last_path.unlink()
    return {"name": name, "generation": last.from_generation, "node": node}


_PATHS_NAMED = 3  # paths an undo refusal names before it counts the rest


def _some_paths(paths: Sequence[str]) -> str:
    """``/etc/a, /etc/b and 4 more`` for U's changed paths (as hg names them: the upper
    layer's as guest paths); the names come from the guest and are shown escaped."""
    guest = [p for p in paths if not p.startswith(history.SIDECAR_DIR + "/")]
    paths = guest or paths  # the sidecar follows the upper layer: named only when alone
    if not paths:
        return "its history moved on"
    shown_paths = [
        "/" + p[len("upper/") :] if p.startswith("upper/") else p for p in paths[:_PATHS_NAMED]
    ]
    text = ", ".join(shown(p) for p in shown_paths)
    more = len(paths) - _PATHS_NAMED
    return f"{text} and {more} more" if more > 0 else text


def resolve(
    store: Store, name: str, path: str, *, take: str | None, file: Path | None
) -> JsonObject:
    inst = load(store, name)
    if (take is None) == (file is None):
        raise UsageError("give exactly one of --take local|base|merged|proposal or --file F")
    st = state(store, name)
    if st != "stopped":
        raise Conflict(f"instance '{name}' is {st}; stop or umount it before resolving")
    with store.lock(f"instance-{name}", purpose=f"resolve {name}"):
        pending = conflicts(store, name)
        match = [c for c in pending if c.path == path]
        if not match:
            raise NotFound(
                f"instance '{name}' has no conflict at {path}; see 'unionimg conflicts {name}'"
            )
        c = match[0]
        if take == "base":
            _refuse_half_state(name, path, pending)
        aside = Path(c.dir)
        how = take or f"file {file}"
        what = f"resolve {path} in {name}"
        with (
            u_layer(store, name, write=True) as u,
            WriteWatch(u) as watch,
            history.open_repo(u, guest=name) as repo,
        ):
            upper = u / "upper"
            gen = get_generation(store, inst.base, c.generation)
            with gen.manifest() as m:
                b1 = m.get(path)
            local = _upper_entry(upper, path)
            # the file written (its data, then its revlog) and whatever else the commit adds
            sizes = {"merged": aside / "merged", "base": aside / "base-new", None: file}
            if c.live:  # --take local writes the VM's version back over the live proposal
                sizes["local"] = aside / "local"
            sizes[PROPOSAL] = aside / PROPOSAL
            incoming = _size_of(sizes.get(take))
            entries = scan_upper(u, hash_files=False)
            require_u_space(store, u, name, commit_estimate(u, entries, [incoming] * 2), what)
            checkpoint("resolve:checked")
            if take == "local" and c.live:  # the proposal is live: the VM's own file back
                source = aside / "local"
                if not source.is_file() or local is None or local.kind != "file":
                    raise NotFound(
                        f"conflict at {path} has no local version to take back; use "
                        "--take base|proposal or --file"
                    )
                fsops.write_entry(upper, path, local, source.read_bytes())
            elif take == "local" or (take == "base" and c.held):
                pass  # held: the reconcile to c.generation takes B1's version
            elif take == "base":
                if local is not None and local.kind == "dir":
                    raise UsageError(
                        f"{path} is a directory in the upper layer; remove or "
                        "replace it by hand, then use --take local"
                    )
                if b1 is not None and _under_opaque(upper, path):
                    data = (aside / "base-new").read_bytes() if b1.kind == "file" else None
                    fsops.write_entry(upper, path, b1, data)
                else:
                    fsops.remove_entry(upper, path)  # the base's version shows through
            else:
                if take == PROPOSAL:
                    source = aside / PROPOSAL
                    if not source.is_file():
                        raise NotFound(
                            f"conflict at {path} has no complete proposal; use "
                            "--take local|base|merged or --file"
                        )
                elif take == "merged":
                    source = aside / "merged"
                    if not source.is_file():
                        raise NotFound(
                            f"conflict at {path} has no merged file (binary or "
                            "structural conflict); use --take local|base or --file"
                        )
                else:
                    assert file is not None
                    source = file
                    if not source.is_file():
                        raise UsageError(f"file {source} does not exist")
                data = source.read_bytes()
                if take == "merged" and _has_markers(data):
                    raise UsageError(
                        f"{source} still holds conflict markers; edit it first "
                        "or use --take local|base"
                    )
                meta = local if local is not None and local.kind == "file" else b1
                if meta is None or meta.kind != "file":
                    raise UsageError(
                        f"{path} is not a regular file on either side; use --take local|base"
                    )
                fsops.write_entry(upper, path, replace(meta, kind="file"), data)
                if take == PROPOSAL:  # the renumbered entries' files: their new owner
                    how = f"proposal ({apply_owner_changes(upper, aside).describe()})"
            fsops.syncfs(upper)
            record = Resolution(path=path, took=how, generation=c.generation, resolved=now_iso())
            fsops.write_beneath(  # no symlink followed beneath U (fsops refuses one)
                u,
                f"{history.SIDECAR_DIR}/{Resolution.FILE}",
                compact(record).encode("utf-8"),
                append=True,
            )
            try:
                node = _commit(repo, u, inst, f"resolve {path} in {name}: took {how}")
                sync_image(watch, store.root, name, what)
            except (OSError, ToolFailed) as exc:
                raise blame_space(exc, store, u, name, what) from exc
            if node is not None:  # on disk: only now is the conflict settled
                history.verify_node(u, node, repo)
            durable(u)
            if c.held:  # the next reconcile to c.generation decides the path this way
                ahead = [h for h in held_resolutions(store, name) if h.path != path]
                ahead.append(
                    HeldResolution(
                        path=path,
                        action=TAKE_BASE if take == "base" else KEEP_LOCAL,
                        generation=c.generation,
                        took=how,
                        resolved=now_iso(),
                    )
                )
                write_record(_held_path(store, name), HeldResolutions(tuple(ahead)))
            _write_conflicts(store, name, [x for x in pending if x.path != path])
        fsops.remove_tree(aside)
    out: JsonObject = {"name": name, "path": path, "took": how, "node": node}
    if c.held:
        out["applied_by"] = f"unionimg reconcile {name} --to-generation {c.generation}"
    return out


# -- a package conflict as one unit (issue 12, item 2) -------------------------------------------
def _pending_packages(
    pending: Sequence[ConflictRecord],
) -> tuple[ConflictRecord | None, PackageConflicts]:
    """The pending status conflict and its packages (none: no such conflict, or one
    recorded without them)."""
    status = next((c for c in pending if c.path == dpkgdb.STATUS), None)
    if status is None:
        return None, PackageConflicts()
    source = Path(status.dir) / PACKAGES
    if not source.is_file():
        return status, PackageConflicts()
    return status, read_record(source, PackageConflicts)


def _refuse_half_state(name: str, path: str, pending: Sequence[ConflictRecord]) -> None:
    """``--take base`` of the status file, or of a file of a package still in conflict,
    would put B1's paragraph over the VM's files of another version (or the reverse):
    refused, naming ``--package``."""
    _, packages = _pending_packages(pending)
    hit = [
        p for p in packages.items
        if path == dpkgdb.STATUS or path in p.files or path in p.edited_conffiles
    ]  # fmt: skip
    if hit:
        labels = ", ".join(shown(p.label) for p in hit[:_PATHS_NAMED])
        more = f" (+{len(hit) - _PATHS_NAMED} more)" if len(hit) > _PATHS_NAMED else ""
        raise UsageError(
            f"--take base of {shown(path)} would leave a package half B1's, half the VM's "
            f"(pending package conflict: {labels}{more}); take each package whole: 'unionimg "
            f"resolve {name} --package {shown(hit[0].package)} --take base|local'"
        )


def _with_paragraph(live: bytes, base: bytes, conflict: PackageConflict) -> bytes:
    """The live status with the package's paragraph made B1's (from B1's whole status, the
    conflict's ``base-new``), or left out where B1 has none; sorted as dpkg writes it."""
    key = (conflict.package, conflict.architecture)
    try:
        mine = {p.key: p for p in dpkgdb.parse(live)}
        theirs = {p.key: p for p in dpkgdb.parse(base, what="B1's status")}
    except dpkgdb.DbError as err:
        raise UsageError(
            f"{dpkgdb.STATUS} cannot be read per package ({err}); resolve it by path"
        ) from None
    if key in theirs:
        mine[key] = theirs[key]
    else:
        mine.pop(key, None)
    return b"".join(mine[k].text + b"\n" for k in sorted(mine))


def resolve_package(store: Store, name: str, package: str, *, take: str) -> JsonObject:
    """``resolve VM --package P --take base|local``: a pending package conflict of dpkg's
    status settled as one unit. ``base``: B1's paragraph written into the live status, and
    U's entries of the package (its files, info files, whiteouts over B1's) removed so B1's
    version shows — a conffile the VM edited stays (dpkg keeps a modified conffile on an
    upgrade; ``dpkg --verify`` then flags it as any edited conffile). ``local``: the VM's
    version, already live, stays. The package's pending path conflicts are settled with it;
    the status conflict when its last package is. Everything is read and checked before
    U changes; each change is a rename or an unlink, the conflict records are rewritten
    only after the commit, so a failure part-way leaves the conflict pending and the same
    command finishes it."""
    if take not in ("base", "local"):
        raise UsageError("--package takes --take base or --take local")
    inst = load(store, name)
    st = state(store, name)
    if st != "stopped":
        raise Conflict(f"instance '{name}' is {st}; stop or umount it before resolving")
    with store.lock(f"instance-{name}", purpose=f"resolve {name}"):
        pending = conflicts(store, name)
        status, packages = _pending_packages(pending)
        if status is None or not packages.items:
            raise NotFound(
                f"instance '{name}' has no pending package conflict; "
                f"see 'unionimg conflicts {name}'"
            )
        if status.held:
            raise UsageError(
                f"{dpkgdb.STATUS} of {name} is held by policy fail; resolve it by path"
            )
        if status.generation != inst.generation:  # its base-new is another generation's
            raise UsageError(
                f"the package conflicts of {name} are of generation {status.generation}, the "
                f"VM is on {inst.generation}; resolve {dpkgdb.STATUS} by path"
            )
        found = [p for p in packages.items if package in (p.package, p.label)]
        if len(found) != 1:
            names = ", ".join(shown(p.label) for p in packages.items)
            raise (NotFound if not found else UsageError)(
                f"instance '{name}' has {'no' if not found else 'more than one'} pending package "
                f"conflict {shown(package)} (pending: {names})"
            )
        conflict = found[0]
        aside = Path(status.dir)
        how = f"{take} (package {conflict.label}: local {conflict.local}, B1 {conflict.base})"
        what = f"resolve package {conflict.label} in {name}"
        with (
            u_layer(store, name, write=True) as u,
            WriteWatch(u) as watch,
            history.open_repo(u, guest=name) as repo,
        ):
            upper = u / "upper"
            live_entry = _upper_entry(upper, dpkgdb.STATUS)
            data = None
            if take == "base":
                if live_entry is None or live_entry.kind != "file":
                    raise UsageError(f"{dpkgdb.STATUS} is no regular file in {name}'s layer")
                for path in conflict.files:  # each removed whole below: no directory
                    entry = _upper_entry(upper, path)
                    if entry is not None and entry.kind == DIR:
                        raise UsageError(
                            f"{shown(path)} of {shown(conflict.label)} is a directory in "
                            f"{name}'s layer now; resolve its paths by hand"
                        )
                if any(_under_opaque(upper, p) for p in conflict.files):
                    raise UsageError(
                        f"a file of {shown(conflict.label)} is below an opaque directory of "
                        "the VM, where B1's cannot show; resolve its paths by hand"
                    )
                base = (aside / "base-new").read_bytes()
                live = fsops.read_file(upper, dpkgdb.STATUS)
                data = _with_paragraph(live, base, conflict)
            entries = scan_upper(u, hash_files=False)
            require_u_space(
                store, u, name, commit_estimate(u, entries, [len(data or b"")] * 2), what
            )
            checkpoint("resolve:checked")
            if data is not None and live_entry is not None:
                for path in conflict.files:
                    fsops.remove_entry(upper, path)
                fsops.write_entry(upper, dpkgdb.STATUS, replace(live_entry, size=len(data)), data)
            fsops.syncfs(upper)
            settled = {*conflict.files, *(() if take == "base" else conflict.edited_conffiles)}
            left = tuple(p for p in packages.items if p is not conflict)
            record = Resolution(
                path=dpkgdb.STATUS, took=how, generation=status.generation, resolved=now_iso()
            )
            fsops.write_beneath(
                u,
                f"{history.SIDECAR_DIR}/{Resolution.FILE}",
                compact(record).encode("utf-8"),
                append=True,
            )
            try:
                node = _commit(
                    repo, u, inst, f"resolve package {conflict.label} in {name}: took {how}"
                )
                sync_image(watch, store.root, name, what)
            except (OSError, ToolFailed) as exc:
                raise blame_space(exc, store, u, name, what) from exc
            if node is not None:
                history.verify_node(u, node, repo)
            durable(u)
            done = [
                c for c in pending if c.path in settled or (c.path == dpkgdb.STATUS and not left)
            ]
            if left:
                write_record(aside / PACKAGES, PackageConflicts(left))
            _write_conflicts(store, name, [c for c in pending if c not in done])
        for c in done:
            fsops.remove_tree(Path(c.dir))
    return {
        "name": name,
        "package": conflict.label,
        "took": how,
        "node": node,
        "settled": sorted(c.path for c in done),
        "kept_conffiles": list(conflict.edited_conffiles) if take == "base" else [],
        "pending_packages": [p.label for p in left],
    }


def _size_of(path: Path | None) -> int:
    try:
        return os.stat(path).st_size if path is not None else 0
    except OSError:
        return 0


def _upper_entry(upper: Path, path: str) -> Entry | None:
    return fsops.entry_at(upper, path)  # no symlink in the guest's upper followed


def _under_opaque(upper: Path, path: str) -> bool:
    """Whether a directory above ``path`` in the upper layer is opaque (hides the base)."""
    return fsops.opaque_above(upper, path)


def _has_markers(data: bytes) -> bool:
    return any(line.startswith((b"<<<<<<< ", b">>>>>>> ")) for line in data.splitlines())


# -- reports kept in the store ---------------------------------------------------------------
def save_report(store: Store, reports: Sequence[InstanceReport], *, dry_run: bool) -> Path:
    rdir = store.root / "reports"
    rdir.mkdir(mode=0o700, exist_ok=True)
    stamp = now_iso().replace(":", "")
    path = rdir / ReconcileReport.file_name(f"{stamp}-{time.time_ns() % 10**9:09d}-{os.getpid()}")
    write_record(path, ReconcileReport(now_iso(), dry_run, tuple(reports)))
    with open(rdir / "reconcile.log", "a", encoding="utf-8") as log:
        for r in reports:
            log.write(
                f"{now_iso()} {r.name} {r.from_generation}->{r.to_generation} "
                f"{r.status} actions={len(r.actions)} conflicts={len(r.conflicts)}"
                f"{' dry-run' if dry_run else ''}{' error=' + repr(r.error) if r.error else ''}"
                "\n"
            )
    kept = sorted(rdir.glob(ReconcileReport.GLOB))
    for old in kept[:-REPORTS_KEPT]:
        old.unlink(missing_ok=True)
    return path
