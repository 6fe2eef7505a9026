"""The CLI package: command groups loaded lazily, the map that names them, its help.

``unionimg/cli/__init__.py`` names every top-level command in ``COMMANDS`` (module, attribute,
first paragraph of its help) so that ``unionimg --help`` lists them without importing a command
module. These tests keep that map and the modules in step, and check what is (not) imported.
The help texts themselves are golden files (``tests/test_cli_golden.py::test_help_texts``);
the exit codes ``unionimg --help`` and README.md show are checked against unionimg.errors.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import pkgutil
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import unionimg.cli
from tests.conftest import UNIONIMG, Cli
from tests.test_boot_real import cleanup_guest, guest_store
from tests.test_boot_truth import add_hook
from unionimg import errors
from unionimg.cli import COMMANDS, LazyGroup, load, main
from unionimg.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PIPE_CLOSED,
    EXIT_STILL_RUNNING,
)

CLI_DIR = Path(unionimg.cli.__file__).parent
COMMAND_MODULES = sorted(
    f"unionimg.cli.{m.name}"
    for m in pkgutil.iter_modules([str(CLI_DIR)])
    if m.name.endswith("_cmd")
)


def first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_map_help_is_the_commands_help(name: str) -> None:
    cmd = load(name, COMMANDS[name])
    assert cmd.help is not None
    assert COMMANDS[name].help == first_paragraph(cmd.help)
    stand_in = click.Command(name, help=COMMANDS[name].help)
    for limit in range(10, 130):  # the listing cuts the short help to the terminal's width
        assert stand_in.get_short_help_str(limit) == cmd.get_short_help_str(limit), limit


def test_map_names_every_command_of_the_modules() -> None:
    """Each top-level command a ``*_cmd`` module defines is in the map, and nothing else:
    a command written but not named there would be missing from ``unionimg``."""
    found = set()
    for modname in COMMAND_MODULES:
        module = importlib.import_module(modname)
        commands = {a: v for a, v in vars(module).items() if isinstance(v, click.Command)}
        nested = {
            id(sub)
            for v in commands.values()
            if isinstance(v, click.Group)
            for sub in v.commands.values()
        }
        found |= {f"{modname}:{a}" for a, v in commands.items() if id(v) not in nested}
    assert found == {lazy.target for lazy in COMMANDS.values()}
    assert len(COMMAND_MODULES) >= 15, COMMAND_MODULES  # the glob found every group module


def _imported_after(*args: str) -> set[str]:
    """unionimg's modules imported by a fresh interpreter that ran ``unionimg ARGS``."""
    code = (
        "import json, sys\n"
        "from unionimg.cli import main\n"
        f"code = main({list(args)!r}, prog_name='unionimg', standalone_mode=False)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_help_imports_no_command_module() -> None:
    loaded = _imported_after("--help")
    assert "unionimg.cli._common" in loaded
    heavy = {
        m
        for m in loaded
        if m.endswith("_cmd")
        or m.split(".")[0] in ("hglib", "mercurial", "jinja2", "libvirt", "rich", "pyudev")
        or m.startswith(("unionimg.layers", "unionimg.reconcile", "unionimg.boot", "unionimg.ops"))
        or m.startswith("unionimg.hypervisors")
    }
    assert heavy == set()


def test_a_command_loads_its_own_module_only() -> None:
    loaded = _imported_after("uml-kernel", "--help")
    cli_modules = {m for m in loaded if m.startswith("unionimg.cli.")}
    assert cli_modules == {"unionimg.cli._common", "unionimg.cli.boot_cmd"}


def test_instance_commands_do_not_load_the_layer_cache() -> None:
    """The instance group (what a plain 'instance create' loads) pays for neither the layer
    cache (zstandard, the layer records), nor the reconcile or fleet records, nor the
    removal checks, nor the drivers' registry (bench/provision.py times a create through
    the CLI; issue 11)."""
    loaded = _imported_after("instance", "--help")
    assert "unionimg.layers.instance" in loaded
    assert {
        "unionimg.layers.layerstore",
        "unionimg.layers.layer",
        "unionimg.layers.gendelta",
        "unionimg.layers.snapshot",
        "unionimg.store.reconcile_records",
        "unionimg.store.fleet_records",
        "unionimg.ops",
        "unionimg.layers.running",
        "unionimg.hypervisors",
        "zstandard",
    } & loaded == set()


def test_unknown_command_suggests_a_lazy_one() -> None:
    """click suggests close names from the loaded commands; the group loads them first."""
    res = CliRunner().invoke(main, ["inst"], prog_name="unionimg")
    assert res.exit_code == 2
    assert "No such command 'inst'. Did you mean 'instance'?" in res.output
    res = CliRunner().invoke(main, ["instance", "crea"], prog_name="unionimg")
    assert res.exit_code == 2 and "No such command 'crea'" in res.output


def test_main_is_a_lazy_group_and_runs_as_module() -> None:
    assert isinstance(main, LazyGroup)
    out = subprocess.run(
        [sys.executable, "-m", "unionimg.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.startswith("python -m unionimg.cli, version ")  # as click names it


def test_no_exit_with_a_literal_code() -> None:
    """Exit codes come from unionimg.errors by name, never a number written in the CLI."""
    literal = re.compile(r"\b(?:sys\.exit|\.exit|exit_with)\(\s*\d")
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(CLI_DIR.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert hits == []


def test_no_function_level_imports() -> None:
    """A lazily loaded module is the deferral; the one import deferred on purpose says so."""
    hits = []
    for path in sorted(CLI_DIR.glob("*.py")):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if re.match(r"\s+(from \S+ )?import ", line) and not line.startswith("    from ."):
                if "TYPE_CHECKING" in lines[n - 1]:
                    continue
                if "deferred on purpose" in "\n".join(lines[max(0, n - 3) : n]):
                    continue
                hits.append(f"{path.name}:{n + 1}: {line.strip()}")
    assert hits == []


# -- the exit codes: one table (unionimg.errors.EXIT_CODES), shown by --help and README ------
def _table_rows(lines: list[str]) -> list[tuple[int, str]]:
    """(code, meaning) of a click definition list: a row starts with its code, a wrapped
    meaning goes on below it, indented."""
    rows: list[tuple[int, str]] = []
    for line in lines:
        m = re.match(r"  (\d+)\s+(.*)", line)
        if m:
            rows.append((int(m.group(1)), m.group(2).strip()))
        else:
            assert line.startswith("       ") and rows, line
            rows[-1] = (rows[-1][0], f"{rows[-1][1]} {line.strip()}")
    return rows


def test_help_ends_with_the_exit_codes() -> None:
    res = CliRunner().invoke(main, ["--help"], prog_name="unionimg")
    assert res.exit_code == 0
    head, _, table = res.output.partition("\nExit codes:\n")
    assert table, res.output
    assert "\nCommands:\n" in head  # the last section
    assert _table_rows(table.rstrip("\n").splitlines()) == list(EXIT_CODES)


def test_only_the_top_level_help_has_the_exit_codes() -> None:
    for args in (["base", "--help"], ["reconcile", "--help"], ["timer", "install", "--help"]):
        res = CliRunner().invoke(main, args, prog_name="unionimg")
        assert res.exit_code == 0 and "Exit codes:" not in res.output, args


def test_readme_table_is_the_errors_table() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = text.splitlines()
    start = lines.index("| code | meaning |")
    assert lines[start + 1] == "|---|---|"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        code, meaning = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append((int(code), meaning.replace("`", "")))  # README may set options as code
    assert rows == list(EXIT_CODES)


def test_every_error_class_and_exit_constant_is_in_the_table() -> None:
    codes = [code for code, _ in EXIT_CODES]
    assert codes == sorted(set(codes)), "one row per code, in order"

    def subclasses(cls: type[errors.UnionimgError]) -> list[type[errors.UnionimgError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(errors.UnionimgError):
        assert cls.exit_code in codes, cls
    constants = {
        n: v for n, v in vars(errors).items() if n.startswith("EXIT_") and n != "EXIT_CODES"
    }
    assert len(constants) >= 7, constants
    for name, value in constants.items():
        assert value in codes, name


# -- the codes the CLI itself gives (not an error class): real processes ---------------------
def _store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    subprocess.run([UNIONIMG, "--store", store, "instance", "list"], check=True, timeout=60)
    return store


def test_interrupt_exits_130(tmp_path: Path) -> None:
    """Ctrl-C while a command waits for a lock another process holds: one line, 130."""
    store = _store(tmp_path)
    fd = os.open(store / "locks" / "base-ghost.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with subprocess.Popen(
            [UNIONIMG, "--store", store, "base", "log", "ghost"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            assert ready, "base log never said it waits for the lock"
            assert "waiting for base-ghost" in proc.stderr.readline()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert (proc.returncode, out, err) == (EXIT_INTERRUPTED, "", "unionimg: interrupted\n")


def test_closed_stdout_exits_141(tmp_path: Path) -> None:
    """The reader of stdout went away (``unionimg ... | head``): quiet, 141."""
    store = _store(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [UNIONIMG, "--store", store, "timer", "install", "--root", tmp_path / "root"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (EXIT_PIPE_CLOSED, "")
    assert (tmp_path / "root").is_dir()  # it ran, and only its output was lost


def test_boot_wait_that_runs_out_exits_1(guests: Cli, tmp_path: Path) -> None:
    """boot/switch --wait whose --timeout runs out while the guest runs on: EXIT_STILL_RUNNING
    (1, as before the table), the guest left running. The guest must reach its init within
    the timeout (else it is exit 9): 15 s, not 3, for a loaded machine (the test run beside a
    benchmark once took longer than 3 s)."""
    cli, vm = guests, "lingers"
    cli.ok("instance", "create", vm, "--base", "tiny", "--hypervisor", "uml", "--memory", "256")
    try:
        add_hook(cli, vm, tmp_path, "sleep 600")
        res = cli("boot", vm, "--wait", "--timeout", "15")
        assert res.exit_code == EXIT_STILL_RUNNING == 1, res.output
        assert res.stderr.splitlines()[-1] == f"unionimg: error: {vm} still runs after 15 s"
        assert f"{vm} still runs after " in res.stdout
        cli.ok("stop", vm, "--force")
        res = cli("switch", vm, "--to", "uml", "--boot", "--wait", "--timeout", "15")
        assert res.exit_code == EXIT_STILL_RUNNING, res.output
        assert f"switched {vm} from uml to uml" in res.stdout
    finally:
        cleanup_guest(cli, vm)


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    yield from guest_store(tmp_path_factory, "cli-exit")


def test_unforeseen_os_error_is_an_internal_error(tmp_path: Path) -> None:
    """An OSError that is no full disk (here: --store below a regular file) is a bug like any
    other: one line and 70, its traceback only with --debug."""
    (tmp_path / "file").write_text("")
    store = str(tmp_path / "file" / "store")
    res = CliRunner().invoke(main, ["--store", store, "instance", "list"], prog_name="unionimg")
    assert res.exit_code == EXIT_INTERNAL, res.output
    assert res.stderr == (
        f"unionimg: internal error: NotADirectoryError: [Errno 20] Not a directory: {store!r} "
        "(rerun with --debug for the traceback)\n"
    )
    res = CliRunner().invoke(main, ["--store", store, "--debug", "instance", "list"])
    assert isinstance(res.exception, NotADirectoryError)
