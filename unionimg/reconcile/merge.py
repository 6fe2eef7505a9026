"""Line-level 3-way merge of text files, for ``reconcile`` (cases 5 and 6). Pure.

The merge itself is the PyPI package ``merge3`` (breezy's ``Merge3``, the ancestor of
Mercurial's ``simplemerge``): it finds the regions where base, local and other agree and
classifies every region in between as unchanged / taken from one side / the same change on
both sides / conflict. This module only splits the bytes into lines and renders the regions.

Why ``merge3`` and not ``mercurial.simplemerge`` in-process: ``merge3``'s classes are its
public, documented API, stable across releases and typed (``py.typed``, so ``mypy --strict``
checks our calls), and it is one small pure-Python module. Mercurial's ``simplemerge`` is an
internal module whose API changed within the 6.x series (``merge_lines`` became
``render_minimized``/``render_merge3``, ``simplemerge()`` now takes ``MergeInput``
objects tied to file contexts) and has no type hints. Both are GPL-2.0-or-later, so the
choice adds no new licence to the dependency set (Mercurial is already a dependency).

Details handled here:

* lines are split on ``\\n`` only, each keeping its ending, so CRLF files merge line by line
  and come out CRLF (markers use the local file's line ending);
* a last line without a newline merges like any other line; inside a conflict block a
  newline is added after it so the next marker starts its own line;
* identical changes on both sides are clean; in a conflict block, lines both sides agree on
  at its start and end are moved out of the block (like git's ``zdiff3``), and the base's
  lines are shown between ``|||||||`` and ``=======`` (diff3 style);
* the line matcher is ``difflib.SequenceMatcher`` with ``autojunk`` off, so frequent lines
  (blank lines, ``}``) are never ignored and a result does not depend on file length.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from merge3 import Merge3, SequenceMatcherProtocol

__all__ = ["MergeResult", "is_binary", "merge3", "split_lines"]


@dataclass(frozen=True, slots=True)
class MergeResult:
    clean: bool
    data: bytes
    conflicts: int = 0  # number of conflict blocks in ``data`` (0 when clean)


def is_binary(data: bytes) -> bool:
    """Binary means a NUL byte anywhere, as Mercurial decides it."""
    return b"\0" in data


def split_lines(data: bytes) -> list[bytes]:
    """Lines of ``data``, each with its ``\\n`` (``\\r\\n`` stays whole); the last may lack one."""
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


class _Matcher(difflib.SequenceMatcher[bytes]):
    """SequenceMatcher without the "popular lines are junk" heuristic."""

    def __init__(
        self,
        isjunk: Callable[[bytes], bool] | None = None,
        a: Sequence[bytes] = (),
        b: Sequence[bytes] = (),
        autojunk: bool = False,
    ) -> None:
        super().__init__(isjunk, a, b, autojunk=False)


# merge3 types get_matching_blocks() as list[tuple]; difflib returns list[Match] (a NamedTuple).
_MATCHER = cast("type[SequenceMatcherProtocol[bytes]]", _Matcher)


def _newline(*texts: Sequence[bytes]) -> bytes:
    for lines in texts:
        if lines:
            return b"\r\n" if lines[0].endswith(b"\r\n") else b"\n"
    return b"\n"


def _common_ends(a: Sequence[bytes], b: Sequence[bytes]) -> tuple[int, int]:
    """Lengths of the common prefix and (non-overlapping) common suffix of a and b."""
    limit = min(len(a), len(b))
    pre = 0
    while pre < limit and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < limit - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    return pre, suf


def merge3(
    base: bytes,
    local: bytes,
    other: bytes,
    labels: tuple[str, str, str] = ("local", "base", "B1"),
    *,
    show_base: bool = True,
) -> MergeResult:
    """Merge the change base→other into local, line by line.

    ``labels`` name (local, base, other) in the conflict markers. Clean: ``data`` is the merged
    text. Not clean: ``data`` has one ``<<<<<<< / ||||||| / ======= / >>>>>>>`` block per
    conflict (the ``|||||||`` part only with ``show_base``); it must never be written to a
    live file.
    """
    if local == other or other == base:
        return MergeResult(True, local)
    if local == base:
        return MergeResult(True, other)
    base_l, local_l, other_l = split_lines(base), split_lines(local), split_lines(other)
    m3 = Merge3(base_l, local_l, other_l, sequence_matcher=_MATCHER)
    nl = _newline(local_l, base_l, other_l)
    start, sep, mid, end = (
        b"<<<<<<< " + labels[0].encode(),
        b"||||||| " + labels[1].encode(),
        b"=======",
        b">>>>>>> " + labels[2].encode(),
    )

    def block(lines: Sequence[bytes]) -> list[bytes]:
        out = list(lines)
        if out and not out[-1].endswith(b"\n"):
            out[-1] += nl
        return out

    out: list[bytes] = []
    conflicts = 0
    for region in m3.merge_regions():
        what = region[0]
        if what == "unchanged":
            out.extend(base_l[region[1] : region[2]])
        elif what in ("a", "same"):
            out.extend(local_l[region[1] : region[2]])
        elif what == "b":
            out.extend(other_l[region[1] : region[2]])
        else:
            _, zs, ze, as_, ae, bs, be = region  # type: ignore[misc]
            a, b, z = local_l[as_:ae], other_l[bs:be], base_l[zs:ze]
            pre, suf = _common_ends(a, b)
            out.extend(a[:pre])
            conflicts += 1
            out.append(start + nl)
            out.extend(block(a[pre : len(a) - suf]))
            if show_base:
                out.append(sep + nl)
                out.extend(block(z))
            out.append(mid + nl)
            out.extend(block(b[pre : len(b) - suf]))
            out.append(end + nl)
            out.extend(a[len(a) - suf :])
    return MergeResult(conflicts == 0, b"".join(out), conflicts)
