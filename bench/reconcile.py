"""Reconcile benchmark: ``reconcile --all`` vs one full Mercurial clone per VM (the seed's way).

Data (deterministic, seeded): a base of ``--files`` small config-like text files (20-40 lines,
about 1 KiB each) spread over a few hundred directories; ``--instances`` VMs, each with 50
copied-up files made through its mounted union (one line edited in each): 40 files the base
update does not touch, and 10 files it does, of which 8 edit other lines than the update
(clean 3-way merges) and 2 edit the same line (real conflicts); then a base update (generation
1 → 2) that edits one line in each of 200 files, among which every VM's 10 overlapping files.

OURS: ``unionimg reconcile --all --json`` as an admin runs it (default ``--jobs``: one
more than the CPUs, at most 8), timed, then checked path by path against what the data implies
(every instance at generation 2, 8 clean merges and 2 conflicts each, the other 190 changed
files showing through). This first run also commits each VM's 50 local changes to its
history before merging (nobody committed them). The store is saved before it, and the first
run is repeated ``--repeat`` times (default 3) from that same state, also with ``--jobs 1``;
medians are used. Unless ``--no-again``, every instance is then put back with ``reconcile
--undo`` and ``reconcile --all`` is timed once more: local changes are then already in the
history.

NAIVE (the seed paper's method), on the same data: a Mercurial repository with changeset B0
(the base tree) and B1 (the updated tree); per VM a full ``hg clone --pull -r B0`` whose
working copy is the VM's tree, settled by one untimed ``hg status`` (a VM that has lived a
while: its dirstate knows every file); the VM's 50 local changes are written into it; then,
timed:
``hg commit`` of those changes (``hg merge`` refuses to run over uncommitted changes, so the
method cannot take an update without it), ``hg pull`` + ``hg merge --tool internal:merge``
+ ``hg resolve --mark --all`` (conflicted files keep their markers) + ``hg commit``. Figures:
(a) local commit + pull + merge + commit, the per-VM cost of taking one base update — the
goal is checked against it; (b) (a) plus the clone; (c) pull + merge + commit alone, shown
against our run after ``--undo`` (history committed on both sides). ``--naive-vms 0``
(default) runs every VM unless that takes longer than ``--naive-budget`` seconds, then
reports per-VM averages of the VMs it measured (times ``--instances``, labeled as
extrapolated).

The step with ``--big-files`` (default 200,000) repeats OURS only: the naive method walks the
whole tree per VM (clone, working-copy status, update), so its cost growing with the base is
known; the point of the step is that ours does not.

Goals (medians of the default ``reconcile --all``; the ``--jobs 1`` figures are printed
beside them): ours ≥ 20× faster than (a); ours with the big base ≤ 1.3× the time with the
small one. Exit 0 when both are met, 1 when not, 2 when the benchmark itself failed.

Run as root: ``.venv/bin/python bench/reconcile.py [--files 20000] [--instances 100]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
HG = REPO / ".venv" / "bin" / "hg"

SEED = 20240601
BASE_NAME = "os"
UPDATE_FILES = 200
LOCAL_FILES = 50
OVERLAP = 10
CONFLICTS = 2
CLEAN = OVERLAP - CONFLICTS
UPDATE_LINE = 2  # the line the base update edits in each of its files
TOPS = ("etc", "usr/share", "usr/lib", "opt", "var/lib", "srv")
SUBS = ("conf.d", "defaults", "profiles", "rules.d", "templates")
STEMS = ("daemon", "module", "site", "service", "policy", "filter", "host", "unit")
KEYS = ("listen", "timeout", "max_conn", "log_level", "user", "cache", "retries", "path")

MERGE_LINE = re.compile(
    r"(\d+) files updated, (\d+) files merged, (\d+) files removed, (\d+) files unresolved"
)


class BenchError(Exception):
    """The benchmark could not run or measured something other than what it meant to."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the data ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    index: int  # file number in the base
    line: int
    text: str


@dataclass
class Dataset:
    files: int
    paths: list[str]  # relative, index = file number
    update: list[Edit]  # the base update, one per changed file
    local: list[list[Edit]]  # per instance: its 50 local edits
    clean: list[list[int]] = field(default_factory=list)  # per instance: cleanly merged files
    conflicting: list[list[int]] = field(default_factory=list)  # per instance: conflicts


def make_paths(n: int) -> list[str]:
    rng = random.Random(SEED)
    ndirs = max(8, int(2 * math.sqrt(n)))  # 283 directories for 20k files, 894 for 200k
    dirs = []
    for k in range(ndirs):
        d = f"{TOPS[k % len(TOPS)]}/pkg{k:04d}"
        if rng.random() < 0.4:
            d += "/" + rng.choice(SUBS)
        dirs.append(d)
    return [f"{dirs[rng.randrange(ndirs)]}/{rng.choice(STEMS)}{i:06d}.conf" for i in range(n)]


def base_lines(i: int) -> list[str]:
    rng = random.Random(SEED * 1_000_003 + i)
    lines = [f"# configuration {i:06d}, generated for the reconcile benchmark"]
    for j in range(rng.randint(19, 39)):
        lines.append(f"{rng.choice(KEYS)}_{j:02d} = {rng.getrandbits(64):016x}")
    return lines


def render(lines: Sequence[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def edited(i: int, edits: Sequence[Edit]) -> bytes:
    lines = base_lines(i)
    for e in edits:
        assert e.index == i
        lines[e.line] = lines[e.line].split(" = ")[0] + " = " + e.text
    return render(lines)


def make_dataset(files: int, instances: int) -> Dataset:
    if files < UPDATE_FILES + 4 * LOCAL_FILES:
        raise BenchError(f"--files must be at least {UPDATE_FILES + 4 * LOCAL_FILES}")
    rng = random.Random(SEED + files)
    upd_idx = sorted(rng.sample(range(files), UPDATE_FILES))
    upd_set = set(upd_idx)
    update = [Edit(i, UPDATE_LINE, "base-generation-2-security-fix") for i in upd_idx]
    ds = Dataset(files, make_paths(files), update, [])
    for vm in range(instances):
        r = random.Random(SEED * 7 + vm)
        overlap = r.sample(upd_idx, OVERLAP)
        others: set[int] = set()
        while len(others) < LOCAL_FILES - OVERLAP:
            i = r.randrange(files)
            if i not in upd_set:
                others.add(i)
        edits = []
        for k, i in enumerate(overlap):
            if k < CONFLICTS:  # the same line as the update, other text: a real conflict
                edits.append(Edit(i, UPDATE_LINE, f"local-vm{vm:03d}-override"))
            else:  # the second to last line: far from the update's line, a clean merge
                edits.append(Edit(i, len(base_lines(i)) - 2, f"local-vm{vm:03d}-tuning"))
        for i in sorted(others):
            edits.append(Edit(i, r.randrange(1, len(base_lines(i))), f"local-vm{vm:03d}"))
        ds.local.append(edits)
        ds.conflicting.append(overlap[:CONFLICTS])
        ds.clean.append(overlap[CONFLICTS:])
    return ds


def write_tree(root: Path, ds: Dataset) -> None:
    made: set[str] = set()
    for i, rel in enumerate(ds.paths):
        parent = rel.rsplit("/", 1)[0]
        if parent not in made:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        (root / rel).write_bytes(render(base_lines(i)))


def write_files(root: Path, ds: Dataset, edits: Sequence[Edit], *, mkdir: bool) -> None:
    for e in edits:
        path = root / ds.paths[e.index]
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(edited(e.index, [e]))


# -- running programs ---------------------------------------------------------------------------
def run(
    args: Sequence[str | Path],
    *,
    ok: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, env=env, cwd=cwd
    )
    if proc.returncode not in ok:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(
            f"{' '.join(str(a) for a in args)} exited {proc.returncode}: " + " | ".join(tail)
        )
    return proc.stdout


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def cli(self, *args: str | Path, ok: Sequence[int] = (0,)) -> str:
        return run([UNIONIMG, "--store", self.root, *args], ok=ok)

    def mount(self, vm: str, where: Path, *, readonly: bool = False) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.cli("mount", *(["--readonly"] if readonly else []), vm, where)
        self.mounted.append(where)

    def umount(self, where: Path) -> None:
        self.cli("umount", where)
        self.mounted.remove(where)

    def cleanup(self) -> None:
        for where in list(self.mounted):
            try:
                self.umount(where)
            except BenchError as exc:
                log(f"cleanup: {exc}")


def vm_name(k: int) -> str:
    return f"vm{k:03d}"


# -- OURS -------------------------------------------------------------------------------------
@dataclass
class Ours:
    files: int
    instances: int
    setup_s: float
    first: list[float]  # reconcile --all (default --jobs), each from the same fresh state
    first_j1: list[float]  # the same with --jobs 1
    again_s: float | None  # after reconcile --undo: local changes already in the history
    clean: int
    conflicts: int
    unaffected: int

    @property
    def seconds(self) -> float:
        """The figure the goals use: median of the default-jobs first runs."""
        return statistics.median(self.first)

    @property
    def seconds_j1(self) -> float:
        return statistics.median(self.first_j1)


def check_reports(out: str, ds: Dataset, instances: int) -> tuple[int, int, int]:
    """Every instance reconciled 1 → 2 with exactly the merges and conflicts the data implies."""
    data = json.loads(out)
    reports = {r["name"]: r for r in data["instances"]}
    want = {vm_name(k) for k in range(instances)}
    if set(reports) != want:
        raise BenchError(f"reconcile reported {len(reports)} instances, expected {len(want)}")
    clean = conflicts = unaffected = 0
    for k in range(instances):
        r = reports[vm_name(k)]
        where = f"{r['name']}: "
        if r["error"] or r["status"] != "conflicts" or not r["applied"]:
            raise BenchError(where + f"status {r['status']}, applied {r['applied']}: {r['error']}")
        if (r["from_generation"], r["to_generation"]) != (1, 2):
            raise BenchError(where + f"generation {r['from_generation']} -> {r['to_generation']}")
        kinds = Counter((a["case"], a["action"]) for a in r["actions"])
        if kinds != Counter({(5, "write"): CLEAN, (6, "conflict"): CONFLICTS}):
            raise BenchError(where + f"unexpected actions {dict(kinds)}")
        writes = {a["path"] for a in r["actions"] if a["action"] == "write"}
        if writes != {"/" + ds.paths[i] for i in ds.clean[k]}:
            raise BenchError(where + f"merged the wrong files: {sorted(writes)}")
        confl = {c["path"] for c in r["conflicts"]}
        if confl != {"/" + ds.paths[i] for i in ds.conflicting[k]}:
            raise BenchError(where + f"conflicts on the wrong files: {sorted(confl)}")
        if r["unaffected"] < UPDATE_FILES - OVERLAP:
            raise BenchError(where + f"only {r['unaffected']} delta paths shown through")
        clean += len(writes)
        conflicts += len(confl)
        unaffected += r["unaffected"]
    return clean, conflicts, unaffected


def spot_check(store: Store, work: Path, ds: Dataset) -> None:
    """What vm000 sees after the reconcile, read through its union."""
    mnt = work / "check"
    store.mount(vm_name(0), mnt, readonly=True)
    try:
        edits = {e.index: e for e in ds.local[0]}
        upd = {e.index: e for e in ds.update}
        for i in ds.clean[0]:
            want = edited(i, [upd[i], edits[i]])
            if (mnt / ds.paths[i]).read_bytes() != want:
                raise BenchError(f"vm000: {ds.paths[i]} is not the 3-way merge")
        for i in ds.conflicting[0]:
            if (mnt / ds.paths[i]).read_bytes() != edited(i, [edits[i]]):
                raise BenchError(f"vm000: conflicting {ds.paths[i]} is not the local version")
        shown = next(i for i in upd if i not in edits)
        if (mnt / ds.paths[shown]).read_bytes() != edited(shown, [upd[shown]]):
            raise BenchError(f"vm000: {ds.paths[shown]} does not show the base update")
        local = next(i for i in edits if i not in upd)
        if (mnt / ds.paths[local]).read_bytes() != edited(local, [edits[local]]):
            raise BenchError(f"vm000: {ds.paths[local]} lost its local change")
    finally:
        store.umount(mnt)


def settle(where: Path, limit: float = 180.0) -> float:
    """Wait until the disk has written back what the benchmark's own set-up wrote (GBs at
    200k files): ``sync`` returns once the guest has handed the data over, but a flush can
    then still wait for the host, and every reconcile flushes each U image. Settled when
    three syncs in a row of a small file take under 20 ms. Returns the seconds waited."""
    probe = where / ".settle"
    t0 = time.perf_counter()
    fast = 0
    while fast < 3 and time.perf_counter() - t0 < limit:
        t = time.perf_counter()
        with open(probe, "wb") as fh:
            fh.write(os.urandom(4096))
            fh.flush()
            os.fsync(fh.fileno())
        os.sync()
        fast = fast + 1 if time.perf_counter() - t < 0.02 else 0
        if fast < 3:
            time.sleep(0.2)
    probe.unlink(missing_ok=True)
    return time.perf_counter() - t0


def reconcile_all(store: Store, jobs: int | None) -> tuple[float, str]:
    """``reconcile --all`` (``jobs`` None: unionimg's default)."""
    waited = settle(store.root.parent)
    if waited > 2:
        log(f"waited {waited:.0f} s for the disk to settle before timing")
    t0 = time.perf_counter()
    extra = [] if jobs is None else ["--jobs", str(jobs)]
    out = store.cli("reconcile", "--all", *extra, "--json", ok=(0, 1, 2))
    seconds = time.perf_counter() - t0
    failed = [r for r in json.loads(out)["instances"] if r["status"] == "error"]
    if failed:
        raise BenchError(
            f"reconcile --all: {len(failed)} instance(s) failed, e.g. "
            + "; ".join(f"{r['name']}: {r['error']}" for r in failed[:3])
        )
    return seconds, out


def restore(snapshot: Path, store: Store) -> None:
    """Put the store back as it was before the first reconcile (a sparse copy; the timed run
    that follows waits for it to reach the disk)."""
    shutil.rmtree(store.root)
    run(["cp", "-a", "--sparse=always", snapshot, store.root])


NOTES: list[str] = []  # unionimg misbehaviour seen during the run, printed with the table


def undo_all(store: Store, instances: int) -> float:
    """``reconcile --undo`` every instance (retried when its U image is still in use)."""
    t0 = time.perf_counter()
    for k in range(instances):
        for attempt in range(3):
            try:
                back = json.loads(store.cli("reconcile", "--undo", vm_name(k), "--json"))
                break
            except BenchError as exc:
                if "still in use" not in str(exc) or attempt == 2:
                    raise
                held = run(["losetup", "-a"], ok=(0, 1)).strip()
                NOTES.append(f"reconcile --undo {vm_name(k)} failed, retried: {exc}")
                log(f"unionimg: {exc}; losetup -a: {held or '(nothing)'}; retrying")
                time.sleep(5)
        if back["generation"] != 1:
            raise BenchError(f"{vm_name(k)}: undo went back to {back['generation']}")
    return time.perf_counter() - t0


def bench_ours(
    work: Path, ds: Dataset, instances: int, again: bool, tree: Path, repeat: int
) -> Ours:
    t_setup = time.perf_counter()
    store = Store(work / f"store-{ds.files}")
    try:
        log(f"[{ds.files}] base create")
        store.cli("base", "create", BASE_NAME, "--from-dir", tree)
        log(f"[{ds.files}] {instances} × instance create + 50 local changes through the union")
        mnt = work / "mnt"
        for k in range(instances):
            vm = vm_name(k)
            store.cli("instance", "create", vm, "--base", BASE_NAME)
            store.mount(vm, mnt)
            write_files(mnt, ds, ds.local[k], mkdir=False)
            store.umount(mnt)
        log(f"[{ds.files}] base update (200 files)")
        upd = work / f"update-{ds.files}"
        write_files(upd, ds, ds.update, mkdir=True)
        store.cli("base", "update", BASE_NAME, "--apply-dir", upd)
        setup_s = time.perf_counter() - t_setup

        snapshot = work / f"store-{ds.files}.before"
        run(["cp", "-a", "--sparse=always", store.root, snapshot])
        first: list[float] = []
        first_j1: list[float] = []
        clean = conflicts = unaffected = 0
        for rep in range(repeat):
            for jobs, into in ((None, first), (1, first_j1)):
                if first or first_j1:
                    restore(snapshot, store)
                what = "reconcile --all" + ("" if jobs is None else f" --jobs {jobs}")
                seconds, out = reconcile_all(store, jobs)
                clean, conflicts, unaffected = check_reports(out, ds, instances)
                into.append(seconds)
                log(
                    f"[{ds.files}] {what} (run {rep + 1}/{repeat}): {seconds:.2f} s; "
                    f"{clean} merges, {conflicts} conflicts"
                )
        spot_check(store, work, ds)

        again_s = None
        if again:
            try:  # an optional figure: a failure is reported, the run goes on
                undo_s = undo_all(store, instances)
                log(f"[{ds.files}] reconcile --undo × {instances}: {undo_s:.1f} s")
                again_s, out = reconcile_all(store, None)
                check_reports(out, ds, instances)
                log(f"[{ds.files}] reconcile --all again (history committed): {again_s:.2f} s")
            except BenchError as exc:
                again_s = None
                NOTES.append(f"[{ds.files} files] the run after --undo was abandoned: {exc}")
                log(NOTES[-1])
        return Ours(
            ds.files,
            instances,
            setup_s,
            first,
            first_j1,
            again_s,
            clean,
            conflicts,
            unaffected,
        )
    finally:
        store.cleanup()


# -- NAIVE: one full hg clone per VM -----------------------------------------------------------
@dataclass
class Naive:
    measured: int
    clone: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)  # commit of the VM's local changes
    update: list[float] = field(default_factory=list)  # pull + merge + resolve + commit

    @property
    def per_vm_a(self) -> float:
        """What taking one base update costs the naive method per VM: its working copy
        holds the VM's changes, which must be committed before ``hg merge`` will run."""
        return statistics.mean(lo + u for lo, u in zip(self.local, self.update, strict=True))

    @property
    def per_vm_update(self) -> float:
        return statistics.mean(self.update)

    @property
    def per_vm_b(self) -> float:
        return self.per_vm_a + statistics.mean(self.clone)


def hg_env(work: Path) -> dict[str, str]:
    rc = work / "hgrc"
    rc.write_text(
        "[ui]\nusername = bench <bench@localhost>\ninteractive = false\nmerge = internal:merge\n"
    )
    env = dict(os.environ)
    env.update({"HGRCPATH": str(rc), "HGPLAIN": "1", "HGMERGE": "internal:merge"})
    return env


Hg = Callable[..., str]  # hg(*args, ok=(0,), cwd=None): run hg, its stdout


def naive_clone(hg: Hg, base: Path, vm: Path) -> float:
    """The naive method's copy of the base for one VM: a full ``hg clone --pull -r 0`` of
    ``base`` at ``vm`` (its seconds), then settled by one untimed ``hg status``."""
    os.sync()
    t0 = time.perf_counter()
    hg("clone", "-q", "--pull", "-r", "0", base, vm)
    clone_s = time.perf_counter() - t0
    # a VM that has lived a while: its dirstate knows every file's size and mtime, so the
    # timed commit below pays the walk of the tree, not a first look at every file
    time.sleep(1.1)
    hg("status", "-q", cwd=vm)
    return clone_s


def naive_update(
    hg: Hg,
    base: Path,
    vm: Path,
    name: str,
    *,
    addremove: bool = False,
    unresolved: list[str] | None = None,
) -> tuple[float, float, str]:
    """The naive method taking base generation 2 into the working copy ``vm`` that holds the
    VM's local changes: the commit of those changes (``hg merge`` refuses to run over
    uncommitted changes; ``addremove``: with its new and removed files), then ``hg pull`` +
    ``hg merge --tool internal:merge`` + ``hg resolve --mark --all`` (conflicted files keep
    their markers) + ``hg commit``. Returns (local commit s, update s, hg merge's output);
    ``unresolved`` gets the paths the merge left conflicted (listed outside the timing)."""
    os.sync()
    t0 = time.perf_counter()
    hg("commit", "-q", *(["-A"] if addremove else []), "-m", f"local changes of {name}", cwd=vm)
    local_s = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    hg("pull", "-q", base, cwd=vm)
    out = hg("merge", "--tool", "internal:merge", cwd=vm, ok=(0, 1))
    if unresolved is not None:
        t1 = time.perf_counter()
        listed = hg("resolve", "--list", "-T", "{mergestatus} {path}\n", cwd=vm)
        unresolved += ["/" + ln[2:] for ln in listed.splitlines() if ln.startswith("U ")]
        t0 += time.perf_counter() - t1  # not part of the method
    hg("resolve", "--mark", "--all", "-q", cwd=vm)
    hg("commit", "-q", "-m", "merge base generation 2", cwd=vm)
    return local_s, time.perf_counter() - t0, out


def bench_naive(
    work: Path, ds: Dataset, tree: Path, instances: int, limit: int, budget: float
) -> Naive:
    env = hg_env(work)

    def hg(*args: str | Path, ok: Sequence[int] = (0,), cwd: Path | None = None) -> str:
        return run([HG, *args], ok=ok, env=env, cwd=cwd)

    base = work / "naive-base"
    log("[naive] base repository: B0 = the base tree, B1 = the updated tree")
    shutil.copytree(tree, base)
    hg("init", base)
    hg("commit", "-q", "-A", "-m", "B0", cwd=base)
    write_files(base, ds, ds.update, mkdir=False)
    hg("commit", "-q", "-m", "B1", cwd=base)

    result = Naive(0)
    todo = limit if limit > 0 else instances
    started = time.perf_counter()
    for k in range(todo):
        if limit == 0 and k >= 5 and time.perf_counter() - started > budget:
            log(f"[naive] budget of {budget:.0f} s spent: stopping after {k} VMs")
            break
        vm = work / "naive-vm"
        clone_s = naive_clone(hg, base, vm)
        write_files(vm, ds, ds.local[k], mkdir=False)  # the VM's life: its local changes
        local_s, update_s, out = naive_update(hg, base, vm, vm_name(k))
        m = MERGE_LINE.search(out)
        counts = tuple(int(x) for x in m.groups()) if m else None
        want = (UPDATE_FILES - OVERLAP, CLEAN, 0, CONFLICTS)
        if counts != want:
            raise BenchError(f"naive {vm_name(k)}: hg merge said {out.strip()!r}, expected {want}")
        result.clone.append(clone_s)
        result.local.append(local_s)
        result.update.append(update_s)
        result.measured += 1
        shutil.rmtree(vm)
        if k % 10 == 0:
            log(
                f"[naive] {vm_name(k)}: clone {clone_s:.2f} s, local commit {local_s:.2f} s, "
                f"pull+merge+commit {update_s:.2f} s"
            )
    shutil.rmtree(base)
    return result


# -- main ---------------------------------------------------------------------------------------
def one_size(
    work: Path,
    files: int,
    instances: int,
    again: bool,
    repeat: int,
    naive: tuple[int, float] | None,
    keep: bool,
) -> tuple[Ours, Naive | None]:
    log(f"[{files}] generating the base tree and the data set")
    ds = make_dataset(files, instances)
    tree = work / f"tree-{files}"
    write_tree(tree, ds)
    ours = bench_ours(work, ds, instances, again, tree, repeat)
    shutil.rmtree(work / f"store-{files}")
    if not keep:  # the store as it was before the first reconcile: for profiling
        shutil.rmtree(work / f"store-{files}.before")
    result = None
    if naive is not None:
        result = bench_naive(work, ds, tree, instances, *naive)
    shutil.rmtree(tree)
    return ours, result


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--files", type=int, default=20000, help="files in the base")
    ap.add_argument("--big-files", type=int, default=200000, help="files in the big base")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument(
        "--naive-vms",
        type=int,
        default=0,
        help="VMs to run the naive method on (0: all, unless --naive-budget runs out first)",
    )
    ap.add_argument("--naive-budget", type=float, default=600.0, help="seconds, for --naive-vms 0")
    ap.add_argument("--skip-big", action="store_true", help="no --big-files step")
    ap.add_argument(
        "--no-again",
        action="store_true",
        help="skip the run after reconcile --undo of every VM (history already committed)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="first runs per --jobs setting, each from the same saved state (median used)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the run")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory, with store-N.before: each store as it was just before "
        "its first reconcile (to profile one: copy it, then run reconcile on the copy)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/reconcile.py needs root (images are loop-mounted)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="unionimg-bench-reconcile-"))
    t_start = time.perf_counter()
    try:
        small, naive = one_size(
            work,
            args.files,
            args.instances,
            not args.no_again,
            args.repeat,
            (args.naive_vms, args.naive_budget),
            args.keep,
        )
        big = None
        if not args.skip_big:
            big, _ = one_size(
                work,
                args.big_files,
                args.instances,
                not args.no_again,
                args.repeat,
                None,
                args.keep,
            )
    except BenchError as exc:
        print(f"bench/reconcile.py: benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    assert naive is not None
    report(args, small, big, naive, time.perf_counter() - t_start)
    ratio = naive.per_vm_a * small.instances / small.seconds
    ok = ratio >= 20
    if big is not None:
        ok &= big.seconds / small.seconds <= 1.3
    return 0 if ok else 1


def secs(x: float | None) -> str:
    return f"{x:>8.2f} s" if x is not None else f"{'-':>10}"


def report(
    args: argparse.Namespace, small: Ours, big: Ours | None, naive: Naive, wall: float
) -> None:
    n = args.instances
    cpus = os.cpu_count() or 1
    jobs = min(cpus + 1, 8)  # as unionimg reconcile --help says
    print()
    print(
        f"reconcile benchmark: {n} instances; the base update changes {UPDATE_FILES} files; "
        f"{LOCAL_FILES} copied-up files per instance, {OVERLAP} of them also updated "
        f"({CLEAN} clean merges + {CONFLICTS} conflicts each); {cpus} CPUs here, so "
        f"reconcile's default is --jobs {jobs}"
    )
    print()
    print(
        f"{'base files':>10} {'reconcile --all':>16} {'per VM':>9} {'--jobs 1':>10} "
        f"{'per VM':>9} {'again [2]':>10} {'merged':>7} {'conflicts':>9}"
    )
    for o in (small, big):
        if o is None:
            continue
        print(
            f"{o.files:>10} {o.seconds:>14.2f} s {o.seconds / o.instances * 1000:>6.0f} ms "
            f"{o.seconds_j1:>8.2f} s {o.seconds_j1 / o.instances * 1000:>6.0f} ms "
            f"{secs(o.again_s)} {o.clean:>7} {o.conflicts:>9}"
        )
    print(
        f"[1] medians of {args.repeat} first runs each, every one from the same saved state "
        "(runs: "
        + "; ".join(
            f"{o.files}: "
            + ", ".join(f"{x:.2f}" for x in o.first)
            + " | --jobs 1: "
            + ", ".join(f"{x:.2f}" for x in o.first_j1)
            for o in (small, big)
            if o is not None
        )
        + ")\n    A first run also commits each VM's 50 never-committed local changes."
    )
    print(
        "[2] default --jobs, after 'reconcile --undo' of every instance: local changes "
        "already in the history"
    )
    label = (
        f"all {naive.measured} VMs"
        if naive.measured == n
        else f"{naive.measured} of {n} VMs (time budget); × {n} = per-VM mean × {n}, extrapolated"
    )
    print()
    print(f"naive (one full hg clone per VM), {small.files}-file base, measured on {label}:")
    print(
        f"  local commit {statistics.mean(naive.local):.3f} s (hg merge refuses to run over "
        f"uncommitted changes), pull + merge + resolve + commit "
        f"{naive.per_vm_update:.3f} s, clone {statistics.mean(naive.clone):.2f} s per VM"
    )
    print(
        f"{'':>2}{'naive method, per VM':<40} {'× ' + str(n) + ' VMs':>10} "
        f"{'ours':>9} {'ratio':>7} {'--jobs 1':>9} {'ratio':>7}"
    )
    rows = (
        (
            "(a) local commit + pull + merge + commit",
            naive.per_vm_a,
            small.seconds,
            small.seconds_j1,
        ),
        ("(b) (a) + the clone", naive.per_vm_b, small.seconds, small.seconds_j1),
        (
            "(c) pull + merge + commit vs ours [2]",
            naive.per_vm_update,
            small.again_s,
            None,
        ),
    )
    for what, per, ours, ours_j1 in rows:
        if ours is None:
            continue
        j1 = f"{ours_j1:>7.2f} s {per * n / ours_j1:>6.1f}×" if ours_j1 else ""
        print(f"{'':>2}{what:<40} {per * n:>8.1f} s {ours:>7.2f} s {per * n / ours:>6.1f}× {j1}")
    print()
    ratio = naive.per_vm_a * n / small.seconds
    ratio_j1 = naive.per_vm_a * n / small.seconds_j1
    print(
        f"goal ≥ 20× faster than naive (a), reconcile --all: "
        f"{'met' if ratio >= 20 else 'NOT met'} ({ratio:.1f}×; with --jobs 1: {ratio_j1:.1f}×, "
        f"{'met' if ratio_j1 >= 20 else 'not met'})"
    )
    if big is not None:
        growth = big.seconds / small.seconds
        growth_j1 = big.seconds_j1 / small.seconds_j1
        print(
            f"goal {small.files} → {big.files} files ≤ 1.3× slower: "
            f"{'met' if growth <= 1.3 else 'NOT met'} ({growth:.2f}×; with --jobs 1: "
            f"{growth_j1:.2f}×)"
        )
    else:
        print("goal base-size growth ≤ 1.3×: not measured (--skip-big)")
    for note in NOTES:
        print(f"note: {note}")
    print(f"(benchmark wall time {wall / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
