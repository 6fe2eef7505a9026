"""The CLI package: command groups loaded lazily, the map that names them, its help.

``unionimg/cli/__init__.py`` names every top-level command in ``COMMANDS`` (module, attribute,
first paragraph of its help) so that ``unionimg --help`` lists them without importing a command
module. These tests keep that map and the modules in step, and check what is (not) imported.
The help texts themselves are golden files (``tests/test_cli_golden.py::test_help_texts``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import unionimg.cli
from unionimg.cli import COMMANDS, LazyGroup, load, main

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
    assert len(COMMAND_MODULES) == 7, COMMAND_MODULES


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
