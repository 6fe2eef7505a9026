"""Line-level 3-way merge (merge3 underneath): clean merges, markers, newlines, CRLF."""

from __future__ import annotations

from unionimg.reconcile.merge import MergeResult, is_binary, merge3, split_lines

BASE = b"a\nb\nc\nd\ne\n"


def test_separate_changes_merge_cleanly() -> None:
    result = merge3(BASE, b"A\nb\nc\nd\ne\n", b"a\nb\nc\nd\nE\n")
    assert result == MergeResult(True, b"A\nb\nc\nd\nE\n", 0)


def test_insertions_and_deletions_on_both_sides() -> None:
    local = b"a\nlocal-added\nb\nc\nd\ne\n"
    other = b"a\nb\nc\ne\nother-added\n"
    result = merge3(BASE, local, other)
    assert result.clean and result.data == b"a\nlocal-added\nb\nc\ne\nother-added\n"


def test_identical_changes_are_clean() -> None:
    same = b"a\nB\nc\nd\ne\n"
    assert merge3(BASE, same, same) == MergeResult(True, same, 0)
    # the same change plus one change more on one side
    result = merge3(BASE, b"a\nB\nc\nd\ne\n", b"a\nB\nc\nd\nE\n")
    assert result.clean and result.data == b"a\nB\nc\nd\nE\n"


def test_one_side_unchanged_takes_the_other() -> None:
    assert merge3(BASE, BASE, b"x\n").data == b"x\n"
    assert merge3(BASE, b"y\n", BASE).data == b"y\n"


def test_overlap_gives_markers_with_base() -> None:
    result = merge3(BASE, b"a\nLOCAL\nc\nd\ne\n", b"a\nOTHER\nc\nd\ne\n")
    assert not result.clean and result.conflicts == 1
    assert result.data == (
        b"a\n<<<<<<< local\nLOCAL\n||||||| base\nb\n=======\nOTHER\n>>>>>>> B1\nc\nd\ne\n"
    )
    plain = merge3(BASE, b"a\nLOCAL\nc\nd\ne\n", b"a\nOTHER\nc\nd\ne\n", show_base=False)
    assert b"|||||||" not in plain.data


def test_labels_and_several_conflicts() -> None:
    local = b"1\nb\nc\nd\n5\n"
    other = b"one\nb\nc\nd\nfive\n"
    result = merge3(BASE, local, other, labels=("vm1", "gen 3", "gen 4"))
    assert result.conflicts == 2
    assert result.data.count(b"<<<<<<< vm1\n") == 2 and b">>>>>>> gen 4\n" in result.data
    assert b"||||||| gen 3\n" in result.data


def test_conflict_block_is_minimised() -> None:
    # both sides insert the same first line at the same place, then differ
    result = merge3(BASE, b"a\nnew\nmine\nb\nc\nd\ne\n", b"a\nnew\ntheirs\nb\nc\nd\ne\n")
    assert not result.clean
    assert b"a\nnew\n<<<<<<< local\nmine\n" in result.data


def test_no_trailing_newline() -> None:
    base = b"a\nb\nc"
    assert merge3(base, b"A\nb\nc", b"a\nb\nC").data == b"A\nb\nC"
    # a side adding the final newline is a change of the last line like any other
    assert merge3(base, b"A\nb\nc", b"a\nb\nc\n").data == b"A\nb\nc\n"
    result = merge3(base, b"a\nb\nlocal", b"a\nb\nother")
    assert not result.clean
    # every marker starts its own line even though the sides end without a newline
    assert result.data == (
        b"a\nb\n<<<<<<< local\nlocal\n||||||| base\nc\n=======\nother\n>>>>>>> B1\n"
    )


def test_crlf_files_merge_and_keep_crlf() -> None:
    base = b"a\r\nb\r\nc\r\n"
    result = merge3(base, b"A\r\nb\r\nc\r\n", b"a\r\nb\r\nC\r\n")
    assert result == MergeResult(True, b"A\r\nb\r\nC\r\n", 0)
    conflict = merge3(base, b"x\r\nb\r\nc\r\n", b"y\r\nb\r\nc\r\n")
    assert conflict.data.startswith(b"<<<<<<< local\r\nx\r\n||||||| base\r\na\r\n=======\r\n")
    assert b"\n" not in conflict.data.replace(b"\r\n", b"")


def test_empty_base_both_added() -> None:
    assert merge3(b"", b"same\n", b"same\n").clean
    result = merge3(b"", b"mine\n", b"theirs\n")
    assert not result.clean and b"||||||| base\n=======\n" in result.data


def test_split_lines_and_binary() -> None:
    assert split_lines(b"") == []
    assert split_lines(b"a\r\nb\nc") == [b"a\r\n", b"b\n", b"c"]
    assert split_lines(b"a\rb\n") == [b"a\rb\n"]  # a lone CR is not a line break
    assert is_binary(b"ELF\0") and not is_binary("é\n".encode())
