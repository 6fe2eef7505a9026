"""Guest-controlled text made safe to print for a human (like ``ls -b`` or Python's repr).

A file name, a commit message or a symlink target written by a guest may hold a newline (a
forged extra line), a carriage return (overwrites what the admin sees), ESC sequences (the
terminal acts on them), bidi overrides or bytes that are no UTF-8 at all. :func:`shown`
renders every such character visibly as an escape; printable text (any script) stays as
it is. JSON output is left alone: ``json.dumps`` escapes control characters itself. Pure.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def shown(text: str, limit: int | None = None, *, backslash: bool = True) -> str:
    """``text`` with every non-printable character escaped: ``\\n``, ``\\r``, ``\\t``,
    ``\\e`` (ESC), ``\\xHH`` for other ASCII controls and for bytes that were not UTF-8
    (Python's surrogateescape: os.fsdecode of a file name), ``\\uHHHH``/``\\UHHHHHHHH``
    for the rest (C1 controls, bidi and zero-width formatting, line separators,
    unassigned code points). ``backslash`` escapes ``\\`` too, so that the output is
    unambiguous (a name holding a literal ``\\n`` shows as ``\\\\n``); a sentence quoting
    such text may leave it off. ``limit`` cuts the result (``...`` at its end) to that many
    characters, for one line of a message."""
    if text.isprintable() and (not backslash or "\\" not in text):
        return _cut(text, limit)  # the common case, in C
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\" if backslash else ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        else:
            code = ord(ch)
            if code < 0x80:
                out.append(f"\\x{code:02x}")
            elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return _cut("".join(out), limit)


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[: max(limit - 3, 0)] + "..."
