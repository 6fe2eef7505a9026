"""Golden files for the CLI's JSON: ``reconcile --dry-run --json`` and ``instance show --json``.

The scenario is :mod:`tests.scenario` (one path per case of the reconcile table in
docs/design.md, made for real through a mounted union), so the dry run's JSON names every
case. The JSON is compared with ``tests/golden/cli/<case>/`` after normalising the fields that
differ from run to run and say nothing about the contract (see :func:`normalise`); every other
key and value must match exactly, so a renamed key, a changed case number, action or reason
fails here. ``pytest --regenerate-output tests/test_cli_golden.py`` rewrites the files.

``--help`` of every command path (``tests/golden/cli/help/``, 80 columns as CliRunner sets)
holds the rest of the contract: command names, options, their defaults and help texts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tests.conftest import Cli, Golden
from tests.scenario import build
from unionimg.cli import main
from unionimg.fs.mounts import unmount_tree

_HEX = re.compile(r"\b[0-9a-f]{40}\b|\b[0-9a-f]{64}\b")
_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?\b")


def normalise(data: Any, store: Path, tmp: Path) -> Any:
    """What is normalised, and why (everything else is compared as it is):

    * the store's and the test's absolute temporary paths (``STORE``, ``TMP``): pytest picks
      a new directory each run;
    * ISO timestamps (``<time>``) and 40/64-hex Mercurial nodes or sha256 (``<hex>``): they
      depend on the clock (a changeset's node hashes its date);
    * ``upper_disk_usage`` (``<bytes>``, after checking it is a positive int): the blocks
      ext4 allocates for the sparse U image vary with the kernel and mke2fs defaults.
    """
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key == "upper_disk_usage":
                assert isinstance(value, int) and value > 0, value
                out[key] = "<bytes>"
            else:
                out[key] = normalise(value, store, tmp)
        return out
    if isinstance(data, list):
        return [normalise(v, store, tmp) for v in data]
    if isinstance(data, str):
        text = data.replace(str(store), "STORE").replace(str(tmp), "TMP")
        return _TIME.sub("<time>", _HEX.sub("<hex>", text))
    return data


def as_golden(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class Scenario:
    def __init__(self, cli: Cli, tmp: Path) -> None:
        self.cli = cli
        self.tmp = tmp

    def json_of(self, *args: str, code: int = 0) -> Any:
        res = self.cli(*args)
        assert res.exit_code == code, res.output
        return normalise(json.loads(res.output), self.cli.store, self.tmp)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("cli-golden")
    cli = Cli(tmp / "store")
    build(cli, tmp)
    try:
        yield Scenario(cli, tmp)
    finally:
        unmount_tree(tmp)


def test_reconcile_dry_run_json(scenario: Scenario, golden_files: Golden) -> None:
    # the scenario holds real conflicts (cases 6, 7, 9, 11, 13-15): exit 1, plan printed
    data = scenario.json_of("reconcile", "vm1", "--dry-run", "--json", code=1)
    # keep actions are not printed (cases 10, and 2 but for the special nodes' report), case 1
    # is only counted in "unaffected", 17 needs B0 = B1: every other case shows
    cases = {a["case"] for inst in data["instances"] for a in inst["actions"]}
    assert {2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16} <= cases, sorted(cases)
    assert data["instances"][0]["unaffected"] > 0
    golden_files.check("cli/reconcile-dry-run", {"vm1.json": as_golden(data)})


def test_instance_show_json(scenario: Scenario, golden_files: Golden) -> None:
    data = scenario.json_of("instance", "show", "vm1", "--json")
    golden_files.check("cli/instance-show", {"vm1.json": as_golden(data)})


def command_paths(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the click tree (groups too), loading lazy groups as it goes."""
    yield path
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1] if path else "unionimg")
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, (path, name)
            yield from command_paths(sub, (*path, name))


def test_help_texts(golden_files: Golden) -> None:
    runner = CliRunner()
    files = {}
    for path in command_paths(main):
        res = runner.invoke(main, [*path, "--help"], prog_name="unionimg", catch_exceptions=False)
        assert res.exit_code == 0, (path, res.output)
        files["_".join(("unionimg", *path)) + ".txt"] = res.output
    assert len(files) > 30, sorted(files)
    golden_files.check("cli/help", files)
