"""Split layers as byte ranges of a blob (:mod:`unionimg.placement.parts`): the ranges cover
the blob in order, a damaged record is one line, and a blob is assembled only from all of
its parts in order (checked before anything is read or fetched)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from unionimg.errors import UsageError
from unionimg.placement import apply as apply_mod
from unionimg.placement import parts
from unionimg.store.layout import Store

BLOB = "sha256:" + "ab" * 32
SHA = "sha256:" + "cd" * 32


@pytest.mark.parametrize(("size", "count"), [(10, 3), (6293158, 2), (7, 7), (1 << 40, 8)])
def test_ranges_cover_the_blob_in_order(size: int, count: int) -> None:
    rs = parts.ranges(size, count)
    assert len(rs) == count and rs[0][0] == 0 and rs[-1][1] == size
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(rs))
    assert max(e - s for s, e in rs) - min(e - s for s, e in rs) <= 1


def part(index: int, count: int = 2, size: int = 10) -> dict[str, Any]:
    s, e = parts.ranges(size, count)[index]
    return {"diff_id": SHA, "blob": BLOB, "blob_size": size, "index": index, "count": count,
            "start": s, "end": e, "sha256": SHA}  # fmt: skip


def test_parts_arg_round_trip_and_damage() -> None:
    got = apply_mod.parts_from_arg(apply_mod._parts_arg([parts.BlobPart(**part(0))]))
    assert got == [parts.BlobPart(**part(0))]
    for bad, why in (
        ("{", "not JSON"),
        ('{"a": 1}', "a JSON list"),
        ('[{"blob": 1}]', "damaged"),
        (json.dumps([{**part(0), "end": 11}]), "out of"),
    ):
        with pytest.raises(UsageError, match=why):
            apply_mod.parts_from_arg(bad)
    with pytest.raises(UsageError, match="no sha256"):
        parts.BlobPart.from_json({**part(0), "sha256": "../x"}, "--parts")


def test_assemble_needs_every_part_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(UsageError, match="all of its parts"):
        parts.assemble_here(store, [parts.BlobPart(**part(1))], "http://127.0.0.1:9")
    gap = {**part(1), "start": 6}
    with pytest.raises(UsageError, match="do not cover"):
        parts.assemble_here(
            store, [parts.BlobPart(**part(0)), parts.BlobPart(**gap)], "http://127.0.0.1:9"
        )
