"""Shared test fixtures.

Integration tests use real components: ext4 images, loop devices, overlayfs, Mercurial.
A missing capability skips with its reason locally and FAILS when UNIONIMG_REQUIRE_REAL=1
(set by ``make test`` under CI=true).

Root: a test that needs root says so by requesting the ``root`` fixture (itself, or through a
fixture that requests it, or ``pytestmark = pytest.mark.usefixtures("root")``);
:func:`pytest_collection_modifyitems` then marks it ``root``, so ``-m "not root"`` selects the
tests a non-root user can run. :func:`need_root` fails a test that calls it without that
mark, so a new root-needing test cannot slip out of the marker.

Disk: a whole run makes dozens of Debian-fixture stores (1-3 GiB each) and pytest keeps every
temporary directory until the next run; so a passing test's ``tmp_path`` is reclaimed at its
teardown, and the directories a test module made (its module-scoped stores) when the module
ends without a failure (:func:`reclaim`: unmounted and detached first, never followed into a
mount). A failing test or module keeps its directories for inspection.

Golden files (``tests/golden/``): ``pytest --regenerate-output`` rewrites them instead of
comparing (:class:`Golden`; ``UNIONIMG_REGEN_GOLDEN=1`` does the same); review the diff.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from unionimg.boot.umlprobe import UmlKernel
from unionimg.cli import main
from unionimg.fs.mounts import mountinfo, unmount_tree

REQUIRE_REAL = os.environ.get("UNIONIMG_REQUIRE_REAL") == "1"
REPO = Path(__file__).resolve().parent.parent
UNIONIMG = REPO / ".venv" / "bin" / "unionimg"
GOLDEN = Path(__file__).resolve().parent / "golden"
ROOT_FIXTURE = "root"

_running: list[pytest.Item] = []  # the test being set up, run or torn down (for need_root)
_PASSED = pytest.StashKey[bool]()  # every phase of the test so far passed


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-output",
        action="store_true",
        default=False,
        help="unionimg: rewrite the golden files under tests/golden/ instead of comparing them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``root`` every test whose fixture closure holds the ``root`` fixture."""
    del config
    for item in items:
        if ROOT_FIXTURE in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "root"
        ):
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[_PASSED] = False
    elif report.when == "call":
        item.stash[_PASSED] = item.stash.get(_PASSED, report.passed)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """After the test's fixtures are finalized (``store`` unmounts its tree): clear
    :data:`_running`; reclaim a passing test's ``tmp_path`` (a teardown that raised keeps it)."""
    try:
        yield
    finally:
        _running.clear()
    funcargs = getattr(item, "funcargs", None) or {}
    if item.stash.get(_PASSED, False) and isinstance(funcargs.get("tmp_path"), Path):
        reclaim(funcargs["tmp_path"])


def reclaim(path: Path) -> None:
    """Remove a test's directory: whatever is still mounted below it unmounted and loop
    devices on its files detached first; left whole if a mount stays (rmtree never descends
    into a file system the test did not make)."""
    if not path.exists():
        return
    unmount_tree(path)
    if os.geteuid() == 0:
        for dev in sorted(_loop_devices(path)):
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    prefix = str(path) + "/"
    if any(m.target == str(path) or m.target.startswith(prefix) for m in mountinfo()):
        return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _reclaim_module_dirs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The directories a module's fixtures made (``tmp_path_factory.mktemp``: its Debian
    stores), reclaimed when the module ends with no test failed. Autouse, so set up before
    and finalized after the module's own fixtures."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for name in sorted(set(os.listdir(base)) - before):
            reclaim(base / name)


def need(condition: object, reason: str) -> None:
    """Skip (printing the reason) unless the real component is required, then fail."""
    if condition:
        return
    if REQUIRE_REAL:
        pytest.fail(f"UNIONIMG_REQUIRE_REAL=1 but {reason}")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def program(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def need_programs(*names: str) -> None:
    lacking = [n for n in names if program(n) is None]
    need(not lacking, f"programs not installed: {', '.join(lacking)}")


def need_ssh_hosts(*more: str) -> None:
    """What namespace hosts with their own sshd (vm_fixtures.nethosts) need, and ``more``."""
    need_programs("ssh", "ssh-keygen", "nsenter", "ip", *more)
    need(Path("/usr/sbin/sshd").exists(), "openssh-server (sshd) not installed")


def need_root() -> None:
    item = _running[0] if _running else None
    if item is not None and item.get_closest_marker("root") is None:
        pytest.fail(
            f"{item.nodeid} needs root but is not marked root: request the 'root' fixture "
            "(in the test or in the fixture that needs root) instead of calling need_root()"
        )
    need(os.geteuid() == 0, "needs root for loop devices and mounts")
    need(shutil.which("mke2fs") is not None, "mke2fs (e2fsprogs) not installed")
    with open("/proc/filesystems", encoding="ascii") as fh:
        need("overlay" in fh.read(), "kernel has no overlayfs")


def need_uml_kernel() -> UmlKernel:
    """The UML kernel unionimg boots on this host (:func:`unionimg.boot.umlprobe.select`: Debian's
    linux.uml, or the project-built one where that one panics), or skip/fail saying why."""
    from unionimg.boot import umlprobe
    from unionimg.errors import UnionimgError

    try:
        return umlprobe.select()
    except UnionimgError as exc:
        need(False, str(exc))
        raise


def uml_nic_arg(kernel: UmlKernel, tap: str, mac: str) -> str:
    """TEST FIXTURE: the UML argument putting the guest's NIC (MAC ``mac``) on host ``tap``,
    in the transport ``kernel`` has (the legacy eth0=tuntap, or the vector driver)."""
    if kernel.transport == "tuntap":
        return f"eth0=tuntap,{tap},{mac}"
    return f"vec0:transport=tap,ifname={tap},mac={mac}"


@pytest.fixture(scope="session")
def root() -> None:
    """Skip (fail under UNIONIMG_REQUIRE_REAL=1) unless root; marks its users ``root``.
    Session-scoped so that module-scoped fixtures can request it."""
    need_root()


class Golden:
    """Compare files with ``tests/golden/<case>/``, or rewrite them with --regenerate-output."""

    def __init__(self, regenerate: bool) -> None:
        self.regenerate = regenerate

    def check(self, case: str, files: dict[str, str]) -> None:
        folder = GOLDEN / case
        if self.regenerate:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for name, content in files.items():
                (folder / name).write_text(content, encoding="utf-8")
            print(f"regenerated {folder}")
            return
        assert folder.is_dir(), f"no golden files for {case}; run pytest --regenerate-output"
        expected = {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir()}
        assert sorted(files) == sorted(expected), f"{case}: files differ from {folder}"
        for name, content in files.items():
            assert content == expected[name], (
                f"{case}/{name} differs from {folder / name}; if the change is intended, "
                "regenerate with pytest --regenerate-output and review the diff"
            )


@pytest.fixture
def golden_files(request: pytest.FixtureRequest) -> Golden:
    regenerate = bool(request.config.getoption("--regenerate-output"))
    return Golden(regenerate or os.environ.get("UNIONIMG_REGEN_GOLDEN") == "1")


def _loop_devices(below: Path) -> set[str]:
    """Loop devices whose backing file lies below ``below`` (other work on the machine may
    attach its own meanwhile)."""
    out = subprocess.run(
        ["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True, check=False
    ).stdout
    rows = [line.split(None, 1) for line in out.splitlines() if line.strip()]
    prefix = str(below).rstrip("/") + "/"  # below /x/test_a1, not /x/test_a10
    return {row[0] for row in rows if len(row) == 2 and row[1].strip().startswith(prefix)}


def loops_left(below: Path, timeout: float = 10.0) -> set[str]:
    """The loop devices still attached below ``below`` once the kernel had ``timeout``
    seconds to detach the auto-clear ones (it does after their last user went)."""
    deadline = time.monotonic() + timeout
    while (loops := _loop_devices(below)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return loops


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """A fresh store; afterwards nothing may stay mounted or attached below it."""
    path = tmp_path / "store"
    yield path
    leaked = [m.target for m in mountinfo() if m.target.startswith(str(tmp_path))]
    unmount_tree(tmp_path)
    loops = _loop_devices(tmp_path) if os.geteuid() == 0 else set()
    assert not leaked, f"test left mounts behind: {leaked}"
    assert not loops, f"test left loop devices attached: {loops}"


class Cli:
    """Runs the CLI in-process against one store; ``ok``/``fails`` check exit codes."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(main, ["--store", str(self.store), *args], catch_exceptions=False)

    def ok(self, *args: str) -> Result:
        res = self(*args)
        assert res.exit_code == 0, f"unionimg {' '.join(args)} failed: {res.output}"
        return res

    def fails(self, *args: str, code: int | None = None) -> Result:
        res = self(*args)
        assert res.exit_code != 0, f"unionimg {' '.join(args)} should have failed"
        if code is not None:
            assert res.exit_code == code, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("unionimg: error: "), res.output
        assert "Traceback" not in res.output
        return res


@pytest.fixture
def cli(store: Path) -> Cli:
    return Cli(store)


def make_tree(root: Path) -> Path:
    """A small OS-like tree with everything hg cannot hold."""
    for d in ("etc/app", "bin", "dev", "empty", "usr/lib", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("base\n")
    (root / "etc/app/app.conf").write_text("".join(f"option{i} = {i}\n" for i in range(20)))
    (root / "etc/motd").write_text("welcome\n")
    (root / "usr/lib/libfoo.so").write_bytes(b"\x7fELF\x00\x01binary")
    (root / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "bin/tool", 0o4755)
    os.symlink("../etc/hostname", root / "bin/hostlink")
    os.link(root / "etc/motd", root / "etc/motd.hard")
    os.chmod(root / "empty", 0o1777)
    os.setxattr(root / "etc/app/app.conf", "user.unionimg-test", b"v1")
    if os.geteuid() == 0:  # a non-root user gets the same tree with its own owner, no nodes
        os.chown(root / "etc/app/app.conf", 123, 456)
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "dev/fifo", 0o600 | stat.S_IFIFO)
    (root / "dir with space").mkdir(exist_ok=True)
    (root / "dir with space" / "näme.txt").write_text("unicode\n")
    return root


@pytest.fixture
def src_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a registry or server the test starts takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def flip_byte(path: Path, at: int) -> None:
    """Invert byte ``at`` of ``path`` (a blob tampered with in a registry's storage)."""
    os.chmod(path, 0o644)
    with path.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (``fincore``: util-linux-extra, in setup.sh)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "PAGES", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[0])


def on_a_page_cache_fs(path: Path) -> None:
    """Skip (fail under UNIONIMG_REQUIRE_REAL=1) where ``path`` is on a tmpfs: its pages
    are its data, never dropped."""
    fstype = subprocess.run(
        ["findmnt", "--noheadings", "--output", "FSTYPE", "--target", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    need(fstype not in ("tmpfs", "ramfs"), f"{path} is on a {fstype}, whose pages stay")
