"""Guest-controlled text printed for a human: every control made visible, nothing lost."""

from __future__ import annotations

import os

from unionimg.display import shown


def test_printable_text_unchanged() -> None:
    for text in ("/etc/hostname", "/dir with space/näme.txt", "/srv/日本語", "a-b_c.d"):
        assert shown(text) == text


def test_controls_escaped_visibly() -> None:
    assert shown("/etc/new\nline") == "/etc/new\\nline"
    assert shown("/x\rOK  /etc/passwd") == "/x\\rOK  /etc/passwd"
    assert shown("\x1b[2J\x1b]0;title\x07") == "\\e[2J\\e]0;title\\x07"
    assert shown("tab\there\x00\x7f") == "tab\\there\\x00\\x7f"
    assert shown("c1\x85\x9b") == "c1\\u0085\\u009b"  # C1 controls (NEL, CSI)
    assert shown("bidi\u202eevil\u2066") == "bidi\\u202eevil\\u2066"
    assert shown("zw\u200bj\u2028p\u2029\ufeff") == "zw\\u200bj\\u2028p\\u2029\\ufeff"
    assert shown("nbsp\u00a0") == "nbsp\\u00a0"
    assert shown("\U000e0041tag") == "\\U000e0041tag"


def test_undecodable_bytes_and_backslashes() -> None:
    name = os.fsdecode(b"latin1-\xe9\xff")
    assert shown(name) == "latin1-\\xe9\\xff"
    assert shown("back\\slash") == "back\\\\slash"  # unambiguous: a literal \n stays apart
    assert shown("a\\nb") != shown("a\nb")
    assert shown("back\\slash\n", backslash=False) == "back\\slash\\n"


def test_one_line_always() -> None:
    for ch in map(chr, range(0x110000)):
        out = shown(f"x{ch}y")
        assert out.isprintable(), repr(ch)
        assert "\n" not in out and "\r" not in out and "\x1b" not in out
