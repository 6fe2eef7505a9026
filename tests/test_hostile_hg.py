"""Nothing a guest writes into its repository makes the host run code or touch host files.

The guest owns its U image, so it owns the instance's ``.hg``. Planted here by loop-mounting
the U image (what a guest with its own kernel can do): an ``hgrc`` with a hook for every
command and transaction step, python hooks, an extension, shell aliases over the commands
unionimg runs and an ``%include``; a share pointing at the base's history; unknown
requirements; transaction files naming host paths (Mercurial unlinks those at every
commit); a sparse giant in ``.hg``; a subrepository and a hostile ``.hgignore``. Then every
command that runs Mercurial on the instance: nothing executes (no canary file appears, no
host file changes), and each command works or refuses with one line (exit 8).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Cli
from tests.scenario import build

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")
SAFE_ENV = {**os.environ, "HGRCSKIPREPO": "1", "HGRCPATH": "", "HGPLAIN": "1"}

# every hook Mercurial knows of that the commands unionimg runs could fire, as pre-/post-
# command hooks and as transaction hooks
COMMANDS = ("commit", "log", "status", "addremove", "forget", "recover", "files", "verify")
TX_HOOKS = (
    "precommit",
    "pretxncommit",
    "commit",
    "pretxnopen",
    "pretxnclose",
    "txnopen",
    "txnclose",
    "txnabort",
    "preupdate",
    "update",
    "pretag",
    "tag",
    "prelistkeys",
    "listkeys",
    "prepushkey",
    "pushkey",
)


@pytest.fixture
def vm(cli: Cli, tmp_path: Path) -> Iterator[str]:
    """The reconcile scenario (base 'os' generations 1 and 2, vm1 with local changes on 1,
    conflicts included)."""
    build(cli, tmp_path)
    yield "vm1"


@pytest.fixture
def canaries(tmp_path: Path) -> Path:
    d = tmp_path / "canaries"
    d.mkdir()
    return d


def u_image(cli: Cli) -> Path:
    return cli.store / "instances/vm1/upper.img"


class Planted:
    """The U image of vm1 loop-mounted read-write, as a guest's kernel would see it."""

    def __init__(self, cli: Cli, tmp: Path) -> None:
        self.mnt = tmp / "u-guest"
        self.mnt.mkdir(exist_ok=True)
        self.img = u_image(cli)

    def __enter__(self) -> Path:
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)


def hostile_hgrc(u: Path, canaries: Path) -> None:
    """Write every way an hgrc can run code; ``u`` is the mounted U root."""
    hg = u / ".hg"
    hooks = [f"{h} = touch {canaries}/hook-{h}" for h in TX_HOOKS]
    for cmd in COMMANDS:
        hooks += [
            f"pre-{cmd} = touch {canaries}/hook-pre-{cmd}",
            f"post-{cmd} = touch {canaries}/hook-post-{cmd}",
            f"fail-{cmd} = touch {canaries}/hook-fail-{cmd}",
        ]
    hooks.append("pretxncommit.py = python:.hg/evil.py:hook")
    hooks.append(f"precommit.abs = python:{u}/.hg/evil.py:hook")
    evil = (
        "import os\n"
        f"open({str(canaries / 'extension-loaded')!r}, 'w').close()\n"
        "def hook(**kwargs):\n"
        f"    open({str(canaries / 'python-hook')!r}, 'w').close()\n"
        "def uisetup(ui):\n"
        f"    open({str(canaries / 'extension-uisetup')!r}, 'w').close()\n"
    )
    (hg / "evil.py").write_text(evil)
    aliases = [f"{cmd} = !touch {canaries}/alias-{cmd}" for cmd in COMMANDS]
    (hg / "more.rc").write_text(
        f"[hooks]\npre-commit.inc = touch {canaries}/include-hook\n"
        f"[extensions]\nevilinc = {u}/.hg/evil.py\n"
    )
    (hg / "hgrc").write_text(
        "[hooks]\n"
        + "\n".join(hooks)
        + "\n[extensions]\nevil = .hg/evil.py\nevilabs = "
        + f"{u}/.hg/evil.py\n"
        + "[alias]\n"
        + "\n".join(aliases)
        + f"\n[ui]\nmerge = evilmerge\nssh = touch {canaries}/ssh\n"
        + f"[merge-tools]\nevilmerge.executable = touch\nevilmerge.args = {canaries}/merge\n"
        + "[paths]\ndefault = /nonexistent\n"
        + "%include more.rc\n"
    )
    (hg / "hgrc-not-shared").write_text(f"[hooks]\npre-log = touch {canaries}/not-shared\n")


def tip_of(repo: Path) -> str:
    """The tip node of a (trusted, store) repository, read by plain hg."""
    return subprocess.run(
        [HG, "-R", str(repo), "log", "-r", "tip", "-T", "{node}"],
        env=SAFE_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def ran(canaries: Path) -> list[str]:
    return sorted(p.name for p in canaries.iterdir())


def test_planted_hgrc_would_run_but_never_does(
    cli: Cli, vm: str, tmp_path: Path, canaries: Path
) -> None:
    with Planted(cli, tmp_path) as u:
        hostile_hgrc(u, canaries)
        # the planted configuration is live: a plain hg run by an admin executes it
        subprocess.run([HG, "--cwd", str(u), "log", "-l", "1"], capture_output=True, check=False)
        assert ran(canaries), "the hostile hgrc should have run something under plain hg"
        for p in canaries.iterdir():
            p.unlink()
        (u / "upper/new-file").write_text("from the guest\n")

    # every command unionimg runs Mercurial for
    assert cli.ok("commit", "vm1", "-m", "with a hostile hgrc").output.startswith("committed ")
    log = json.loads(cli.ok("log", "vm1", "--json").output)
    assert log[0]["message"] == "with a hostile hgrc"
    cli.ok("status", "vm1")
    assert cli("reconcile", "vm1").exit_code == 1  # the scenario's conflicts
    cli.ok("reconcile", "--undo", "vm1")
    assert cli("reconcile", "vm1").exit_code == 1
    cli.ok("resolve", "vm1", "/c09/file", "--take", "local")
    assert ran(canaries) == []

    # an interrupted transaction (host crash): the next commit recovers it, still inert
    with Planted(cli, tmp_path) as u:
        store = u / ".hg/store"
        size = (store / "00changelog.i").stat().st_size
        with open(store / "00changelog.i", "ab") as fh:
            fh.write(b"\0" * 64)
        (store / "journal").write_bytes(b"00changelog.i\0" + str(size).encode() + b"\n")
        (u / "upper/after-crash").write_text("x\n")
    assert cli.ok("commit", "vm1", "-m", "after a crash").output.startswith("committed ")
    assert ran(canaries) == []
    with Planted(cli, tmp_path) as u:
        subprocess.run([HG, "--cwd", str(u), "verify", "-q"], env=SAFE_ENV, check=True)
        files = subprocess.run(
            [HG, "--cwd", str(u), "files"], env=SAFE_ENV, capture_output=True, check=True
        ).stdout.decode()
    assert "upper/after-crash" in files and "upper/new-file" in files


def test_share_of_a_host_repository_refused(cli: Cli, vm: str, tmp_path: Path) -> None:
    """requires 'shared' + sharedpath at the base's history: a commit would write the
    guest's changesets into a store repository."""
    history = cli.store / "bases/os/history/.hg"
    tip = tip_of(history.parent)
    with Planted(cli, tmp_path) as u:
        (u / ".hg/requires").write_text("share-safe\nshared\n")
        (u / ".hg/sharedpath").write_text(str(history))
        (u / "upper/x").write_text("x\n")
    for args in (("commit", "vm1"), ("log", "vm1"), ("reconcile", "vm1")):
        res = cli(*args)
        assert res.exit_code in (8, 10), res.output
        line = res.output.strip().splitlines()[-1]
        assert "vm1" in line and ("requires" in line or "sharedpath" in line), line
    after = tip_of(history.parent)
    assert after == tip


@pytest.mark.parametrize("req", ["largefiles", "lfs", "git", "exp-sparse", "dirstate-v2", "x"])
def test_unknown_requirements_refused(cli: Cli, vm: str, tmp_path: Path, req: str) -> None:
    with Planted(cli, tmp_path) as u, open(u / ".hg/store/requires", "a") as fh:
        fh.write(req + "\n")
    res = cli.fails("commit", "vm1", code=8)
    assert "instance 'vm1'" in res.output and req in res.output and "requires" in res.output
    cli.fails("log", "vm1", code=8)


def test_transaction_files_naming_host_paths_refused(cli: Cli, vm: str, tmp_path: Path) -> None:
    """Mercurial unlinks every backup undo.backupfiles lists at each commit, joined to .hg
    unchecked: an absolute path there deletes a host file. journal.backupfiles makes
    'hg recover' copy over and unlink host files."""
    victim = tmp_path / "host-file"
    victim.write_text("precious\n")
    with Planted(cli, tmp_path) as u:
        (u / ".hg/store/undo.backupfiles").write_bytes(
            b"2\nplain\0branch\0" + os.fsencode(victim) + b"\0\n"
        )
        (u / "upper/x").write_text("x\n")
    # the attack is real: plain Mercurial deletes the host file on commit
    probe = tmp_path / "probe"
    subprocess.run([HG, "init", str(probe)], env=SAFE_ENV, check=True)
    probe_victim = tmp_path / "probe-victim"
    probe_victim.write_text("x")
    (probe / ".hg/store/undo.backupfiles").write_bytes(
        b"2\nplain\0branch\0" + os.fsencode(probe_victim) + b"\0\n"
    )
    (probe / "f").write_text("f\n")
    subprocess.run(
        [HG, "-R", str(probe), "commit", "-qAm", "x", "-u", "t"], env=SAFE_ENV, check=True
    )
    assert not probe_victim.exists()

    res = cli.fails("commit", "vm1", code=8)
    assert "undo.backupfiles" in res.output and "vm1" in res.output
    assert cli("reconcile", "vm1").exit_code == 10
    assert victim.read_text() == "precious\n"

    with Planted(cli, tmp_path) as u:
        (u / ".hg/store/undo.backupfiles").unlink()
        (u / ".hg/store/journal").write_bytes(b"00changelog.i\0" + b"0\n")
        (u / ".hg/store/journal.backupfiles").write_bytes(
            b"2\nplain\0../../../../../../../../../../" + os.fsencode(victim) + b"\0x\0\n"
        )
    res = cli.fails("commit", "vm1", code=8)
    assert "journal.backupfiles" in res.output
    assert victim.read_text() == "precious\n"


def test_sparse_giant_in_hg_refused(cli: Cli, vm: str, tmp_path: Path) -> None:
    """Mercurial reads its dirstate whole: a 64 GiB sparse one would take the host's
    memory."""
    with Planted(cli, tmp_path) as u, open(u / ".hg/dirstate", "ab") as fh:
        fh.truncate(64 << 30)
    res = cli.fails("commit", "vm1", code=8)
    assert "dirstate" in res.output and "sparse" in res.output


def test_subrepo_and_hgignore_at_u_root_neutralised(
    cli: Cli, vm: str, tmp_path: Path, canaries: Path
) -> None:
    """Junk at U's root is never committed (a .hgsub there would make Mercurial touch or
    run git for a subrepository); a .hgignore hiding the upper layer is replaced."""
    with Planted(cli, tmp_path) as u:
        (u / ".hgsub").write_text(f"sub = [git]file://{canaries}\n")
        (u / ".hgsubstate").write_text("0" * 40 + " sub\n")
        (u / "sub").mkdir()
        (u / ".hgignore").write_text("syntax: regexp\n^upper/\n")
        (u / "upper/hidden-by-guest").write_text("x\n")
    assert cli.ok("commit", "vm1", "-m", "junk at the root").output.startswith("committed ")
    with Planted(cli, tmp_path) as u:
        files = (
            subprocess.run(
                [HG, "--cwd", str(u), "files"], env=SAFE_ENV, capture_output=True, check=True
            )
            .stdout.decode()
            .splitlines()
        )
        ignore = (u / ".hgignore").read_text()
    assert "upper/hidden-by-guest" in files
    assert not [f for f in files if f.startswith((".hgsub", "sub"))]
    assert "^upper/" not in ignore.splitlines() and "^work/" in ignore
    assert ran(canaries) == []


def test_nested_repository_in_upper_is_inert(
    cli: Cli, vm: str, tmp_path: Path, canaries: Path
) -> None:
    """A repository inside the guest's own file system (/opt/app/.hg with hooks): kept out
    of the history (recorded in the sidecar), its hooks never run."""
    mnt = tmp_path / "guest"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        app = mnt / "opt/app/.hg"
        app.mkdir(parents=True)
        (app / "requires").write_text("shared\n")
        (app / "sharedpath").write_text(str(cli.store / "bases/os/history/.hg"))
        (app / "hgrc").write_text(f"[hooks]\npre-commit = touch {canaries}/nested\n")
    finally:
        cli.ok("umount", str(mnt))
    cli.ok("commit", "vm1", "-m", "nested repo")
    assert cli("reconcile", "vm1").exit_code == 1
    assert ran(canaries) == []


def test_stale_and_planted_locks_never_stall_a_commit(cli: Cli, vm: str, tmp_path: Path) -> None:
    """A crash mid-commit leaves Mercurial's lock links; a guest can plant them naming another
    host (Mercurial would wait ``ui.timeout`` and fail). Neither makes the U refused nor the
    commit wait: no live process of this host holds them, so they are removed unfollowed."""
    target = tmp_path / "lock-target"
    target.write_text("host file\n")
    with Planted(cli, tmp_path) as u:
        os.symlink(f"{os.uname().nodename}:999999999", u / ".hg/wlock")
        os.symlink("guest-host:1", u / ".hg/store/lock")
        os.symlink(str(target), u / ".hg/lock")
    res = cli.ok("commit", "vm1", "-m", "after a crash")
    assert "committed" in res.output
    assert target.read_text() == "host file\n"
    with Planted(cli, tmp_path) as u:
        for rel in ("wlock", "lock", "store/lock"):
            assert not os.path.lexists(u / ".hg" / rel)
    log = json.loads(cli.ok("log", "vm1", "--json").output)
    assert any("after a crash" in str(entry) for entry in log)
