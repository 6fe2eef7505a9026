"""The text output of ``migrate``: one line per content sent as a delta or as chunks."""

from __future__ import annotations

import pytest

from unionimg.cli import migrate_cmd


def _row(path: str, size: int, method: str = "chunks") -> dict[str, object]:
    return {"path": path, "size": size, "payload": size // 100, "method": method,
            "why": "chunks: 4 of 6,928 sent, nearest = kept copy of vm cdb"}  # fmt: skip


def test_rows_largest_first_whole_files_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    files = [_row("/small", 2 << 20, "delta"), _row("/big", 66 << 20),
             _row("/whole", 90 << 20, "whole")]  # fmt: skip
    migrate_cmd._file_rows(files)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines] == ["/big", "/small"]
    assert "nearest = kept copy of vm cdb" in lines[0]


def test_a_hostile_path_is_escaped_and_the_list_is_cut(
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = [_row(f"/f{i}", (1 << 20) + i) for i in range(migrate_cmd.FILE_ROWS + 3)]
    files.append(_row("/evil\n\x1b[2Jname", 1 << 30))
    migrate_cmd._file_rows(files)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\x1b" not in out and lines[0].startswith("    /evil\\n\\e[2Jname:")
    assert len(lines) == migrate_cmd.FILE_ROWS + 1
    assert lines[-1] == "    ... and 4 more (--json lists them all)"
