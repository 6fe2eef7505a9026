"""Debian VMs for ``tests/test_debian_reconcile_real.py`` and ``bench/debian_reconcile.py``
(issue 12): local changes made in a VM's union, and the consistency of a result read back
with the HOST's own tools, never with unionimg's code.

* :func:`exec_union` — a VM's union mounted through ``unionimg mount`` and then remounted
  ``exec`` (a test's or benchmark's own step: unionimg mounts guest data ``noexec`` and never
  runs its programs), so that ``dpkg --root`` (maintainer scripts chrooted in it) and
  :func:`sandboxed` (a command chrooted in it: the guest's own apt-get) work there.
* :func:`check` — what item 1 of the issue asks of a result, measured on a tree with host
  tools: ``dpkg --audit``, ``apt-get check`` (no network: the status file and no lists),
  ``pwck -r``/``grpck -r`` and ``dpkg --verify``, the last two against a baseline (the base
  generation's own findings: Debian's minbase has system users without a home, and its
  ``path-exclude`` filters leave man pages and docs "missing" for the host's dpkg). A tree
  that fails gives the failing checks' words.
* :func:`is_noise` — whether a conflicted path is a generated or volatile file (the noise of
  issue 12's report), not a real conflict.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 600

#: Generated and volatile files (issue 12, item 5): conflicts on them are noise.
NOISE_GLOBS = (
    "/tmp/*",
    "/run/*",
    "/var/tmp/*",
    "/var/log/*",
    "/var/cache/*",
    "/var/lib/apt/lists/*",
    "/var/lib/apt/extended_states",
    "/var/lib/dpkg/*-old",
    "/var/lib/dpkg/triggers/*",
    "/var/lib/ucf/*.[0-9]",
    "/var/lib/systemd/catalog/database",
    "/var/lib/systemd/deb-systemd-helper-enabled/*",
    "/etc/ld.so.cache",
    "/var/lib/ldconfig/*",
    "/etc/*-",
    "/etc/.pwd.lock",
)


def is_noise(path: str) -> bool:
    """A conflict on ``path`` is noise: the file is generated or volatile."""
    return any(fnmatch.fnmatchcase(path, g) for g in NOISE_GLOBS)


def run(args: list[str], *, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, errors="replace"
    )


# -- changes made in a VM ----------------------------------------------------------------------
@contextlib.contextmanager
def exec_union(unionimg: Callable[..., object], vm: str, mnt: Path) -> Iterator[Path]:
    """VM's union at ``mnt`` (``unionimg mount``), remounted ``exec`` for the caller's own
    programs; ``unionimg umount`` after. ``unionimg`` runs one unionimg command (and raises
    when it fails)."""
    mnt.mkdir(parents=True, exist_ok=True)
    unionimg("mount", vm, str(mnt))
    try:
        done = run(["mount", "-o", "remount,bind,exec", str(mnt)])
        if done.returncode != 0:
            raise RuntimeError(f"remount exec {mnt}: {done.stderr.strip()}")
        yield mnt
    finally:
        unionimg("umount", str(mnt))


@contextlib.contextmanager
def generation_root(store: Path, base: str, number: int, where: Path) -> Iterator[Path]:
    """Generation ``number`` of ``base``'s whole tree, read-only (a delta generation is the
    overlay of its chain: :func:`unionimg.layers.base.generation_tree`)."""
    from unionimg.layers import base as bases
    from unionimg.store.layout import Store

    st = Store(store)
    with bases.generation_tree(st, bases.get_generation(st, base, number), where) as root:
        yield root


@contextlib.contextmanager
def guest_chroot(unionimg: Callable[..., object], vm: str, where: Path) -> Iterator[Path]:
    """VM's union as its guest sees it, for running the guest's own programs (a test's step):
    ``unionimg mount --readonly`` (noexec), a throwaway overlay over it (exec; its upper a
    tmpfs, so nothing is written to the VM), a tmpfs on /run and the host's /dev."""
    ro, scratch, root = where / "ro", where / "scratch", where / "root"
    for d in (ro, scratch, root):
        d.mkdir(parents=True, exist_ok=True)
    unionimg("mount", vm, str(ro), "--readonly")
    done: list[Path] = []

    def mount(*args: str) -> None:
        res = run(["mount", *args])
        if res.returncode != 0:
            raise RuntimeError(f"mount {' '.join(args)}: {res.stderr.strip()}")
        done.append(Path(args[-1]))

    try:
        mount("-t", "tmpfs", "tmpfs", str(scratch))
        (scratch / "up").mkdir()
        (scratch / "wk").mkdir()
        opts = f"lowerdir={ro},upperdir={scratch}/up,workdir={scratch}/wk"
        mount("-t", "overlay", "overlay", "-o", opts, str(root))
        mount("-t", "tmpfs", "tmpfs", str(root / "run"))
        mount("--bind", "/dev", str(root / "dev"))
        yield root
    finally:
        for target in reversed(done):
            run(["umount", str(target)])
        unionimg("umount", str(ro))


def sandboxed(
    tree: Path, command: str, *, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``command`` run by ``tree``'s own ``/bin/sh`` chrooted in it, contained as ``base
    update --run`` contains the admin's command (:mod:`unionimg.layers.sandbox`: its own PID
    and mount namespaces, /proc, /sys, /dev and the host's resolver; nothing of it outlives
    the call). ``tree`` must be mounted exec (:func:`exec_union`)."""
    from unionimg.layers import sandbox

    return run(sandbox.argv(tree, command), timeout=timeout)


def cache_command(*debs: Path) -> str:
    """Shell for ``base update --run``: ``debs`` put in the tree's apt cache, not installed
    (as apt keeps what a base installed before an upgrade); carried base64 in the command."""
    parts = ["mkdir -p /var/cache/apt/archives"]
    for deb in debs:
        data = base64.b64encode(deb.read_bytes()).decode()
        parts.append(f"echo {data} | base64 -d > /var/cache/apt/archives/{shlex.quote(deb.name)}")
    return " && ".join(parts)


# -- the checks of a result ---------------------------------------------------------------------
def _path_filters(root: Path) -> list[tuple[bool, str]]:
    """``root``'s dpkg ``path-exclude``/``path-include`` options, in order (True: exclude)."""
    out: list[tuple[bool, str]] = []
    conf = root / "etc/dpkg/dpkg.cfg.d"
    files = sorted(conf.iterdir()) if conf.is_dir() else []
    for f in [root / "etc/dpkg/dpkg.cfg", *files]:
        if not f.is_file() or f.is_symlink():
            continue
        for line in f.read_text(errors="replace").splitlines():
            key, _, glob = line.strip().partition("=")
            if key in ("path-exclude", "path-include") and glob:
                out.append((key == "path-exclude", glob.strip()))
    return out


def _filtered(path: str, filters: list[tuple[bool, str]]) -> bool:
    """Whether dpkg of ``root`` never unpacked ``path`` (its last matching filter excludes)."""
    excluded = False
    for exclude, glob in filters:
        if fnmatch.fnmatchcase(path, glob):
            excluded = exclude
    return excluded


VERIFY = re.compile(r"^(\S+)\s+(c\s+)?(/.*)$")


def verify_lines(root: Path) -> set[str]:
    """``dpkg --verify`` of every package of ``root``, without the files ``root``'s own
    ``path-exclude`` options kept from being unpacked (the host's dpkg does not read them)."""
    done = run(["dpkg", f"--root={root}", "--verify"])
    filters = _path_filters(root)
    lines = set()
    for line in done.stdout.splitlines():
        m = VERIFY.match(line)
        if m and m.group(1) == "missing" and _filtered(m.group(3), filters):
            continue
        if line.strip():
            lines.add(line.strip())
    if done.returncode not in (0, 1) or done.stderr.strip():
        lines.add(f"dpkg --verify: exit {done.returncode}: {done.stderr.strip()}")
    return lines


def verify_path(line: str) -> str:
    m = VERIFY.match(line)
    return m.group(3) if m else ""


def shadow_lines(root: Path) -> set[str]:
    """What ``pwck -r`` and ``grpck -r`` (``--root``) report on ``root``."""
    out: set[str] = set()
    for tool in ("pwck", "grpck"):
        done = run([tool, "--root", str(root), "-r"])
        lines = {x.strip() for x in (done.stdout + done.stderr).splitlines() if x.strip()}
        lines.discard(f"{tool}: no changes")
        if done.returncode not in (0, 2):
            lines.add(f"{tool} -r: exit {done.returncode}")
        out |= {f"{tool}: {x}" for x in lines}
    return out


def dpkg_audit(root: Path) -> str:
    """``dpkg --audit`` of ``root``: empty when dpkg finds nothing."""
    done = run(["dpkg", f"--root={root}", "--audit"])
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and not text:
        text = f"exit {done.returncode}"
    return text


def apt_check(root: Path) -> str:
    """``apt-get check`` of ``root``'s status file, read-only (no cache files written, no
    locks, no network): empty when apt finds every dependency satisfied."""
    done = run(
        [
            "apt-get",
            "-q",
            "-o", f"Dir={root}",
            "-o", f"Dir::State::status={root}/var/lib/dpkg/status",
            "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",
            "check",
        ]
    )  # fmt: skip
    if done.returncode == 0:
        return ""
    keep = [ln for ln in (done.stdout + done.stderr).splitlines() if not ln.startswith("Reading")]
    return "\n".join(ln for ln in keep if not ln.startswith("Building")).strip()


def packages(root: Path) -> dict[str, tuple[str, str]]:
    """Every package ``root``'s dpkg database knows: name -> (``dpkg -l`` state, version)."""
    done = run(
        [
            "dpkg-query", f"--root={root}", "-W",
            "-f", "${Package}\t${db:Status-Abbrev}\t${Version}\n",
        ]
    )  # fmt: skip
    out = {}
    for line in done.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            out[parts[0]] = (parts[1].strip(), parts[2])
    return out


@dataclass
class Baseline:
    """What the checks find on the base generation itself (not the VM's doing)."""

    shadow: set[str] = field(default_factory=set)
    verify: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, root: Path) -> Baseline:
        return cls(shadow_lines(root), verify_lines(root))


@dataclass
class Checked:
    """The checks of one result: each failing check with its words (none: consistent)."""

    failures: dict[str, str]
    packages: dict[str, tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        return "; ".join(f"{k}: {v[:300]}" for k, v in self.failures.items()) or "consistent"


def check(root: Path, baseline: Baseline, own: frozenset[str] = frozenset()) -> Checked:
    """Item 1's checks on the tree at ``root`` (read-only). ``own``: files the VM changed
    itself (its edited conffiles: ``dpkg --verify`` may call them changed)."""
    failures = {}
    audit = dpkg_audit(root)
    if audit:
        failures["dpkg --audit"] = audit
    apt = apt_check(root)
    if apt:
        failures["apt-get check"] = apt
    shadow = shadow_lines(root) - baseline.shadow
    if shadow:
        failures["pwck/grpck -r"] = "\n".join(sorted(shadow))
    verify = {v for v in verify_lines(root) - baseline.verify if verify_path(v) not in own}
    if verify:
        failures["dpkg --verify"] = "\n".join(sorted(verify))
    return Checked(failures, packages(root))
