"""Content-defined chunks for large changed files (issue 14): the recipe a sender plans
against the receiver's chunk list, and the receiver's strict rebuild of it (pure: no store,
no root). Hostile recipes are refused in one line and never yield a byte that was not
verified."""

from __future__ import annotations

import hashlib
import io
import random
import struct

import pytest

from unionimg.errors import ToolFailed
from unionimg.migrate import cdc
from unionimg.migrate.plan import Refused


def words(size: int, seed: int = 14) -> bytes:
    """Text of random words: compressible, but not trivially (a database of text)."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 11)))
        for _ in range(5000)
    ]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choices(vocab, k=12)) + "\n").encode()
    return bytes(out[:size])


OLD = words(3 << 20)


def edited(old: bytes) -> bytes:
    new = bytearray(old)
    new[100_000:100_200] = b"X" * 200  # overwritten in place
    new[2_000_000:2_000_000] = b"inserted " * 30  # the rest shifts
    del new[2_900_000:2_900_500]
    return bytes(new)


def chunks_of(data: bytes) -> list[cdc.Chunk]:
    return list(cdc.cut(io.BytesIO(data)))


def remake(
    recipe_bytes: bytes,
    have: list[bytes],
    seed: bytes,
    size: int,
    feed_by: int = 7919,
    listed: bytes | None = None,
) -> bytes:
    """The file ``recipe_bytes`` makes from ``seed`` (its chunks where they were when
    ``listed``, by default the seed itself, was cut)."""
    where = {i: (off, n) for i, (off, n, _d) in enumerate(chunks_of(listed or seed))}
    out = bytearray()

    def read(i: int) -> bytes:
        off, n = where[i]
        return seed[off : off + n]

    rb = cdc.Rebuild(have, size, read, out.extend, "f" * 64)
    for i in range(0, len(recipe_bytes), feed_by):  # any cut of the payload
        rb.feed(recipe_bytes[i : i + feed_by])
    rb.finish()
    return bytes(out)


def recipe_for(new: bytes, seed: bytes) -> tuple[cdc.Recipe, list[bytes], bytes]:
    have = [d for _o, _n, d in chunks_of(seed)]
    recipe = cdc.plan_recipe(chunks_of(new), have)
    payload = b"".join(cdc.pieces(recipe, have, lambda off, n: new[off : off + n]))
    assert len(payload) == recipe.payload
    return recipe, have, payload


def test_chunks_are_bounded_and_cover_the_file() -> None:
    cs = chunks_of(OLD)
    assert sum(n for _o, n, _d in cs) == len(OLD)
    assert all(cdc.MIN_CHUNK <= n <= cdc.MAX_CHUNK for _o, n, _d in cs[:-1])
    assert len(cs) <= cdc.max_chunks(len(OLD))
    assert 6_000 < len(OLD) / len(cs) < 20_000  # about 10 KiB on average


def test_a_few_edits_send_a_few_chunks_and_the_rebuild_is_exact() -> None:
    new = edited(OLD)
    recipe, have, payload = recipe_for(new, OLD)
    assert recipe.chunks >= 50
    assert 1 <= recipe.sent <= 8, (recipe.sent, recipe.chunks)  # three edits, their neighbours
    assert recipe.sent_bytes <= 8 * cdc.MAX_CHUNK
    assert len(payload) < recipe.sent_bytes + 2_000  # runs of references cost little
    got = remake(payload, have, OLD, len(new))
    assert hashlib.sha256(got).digest() == hashlib.sha256(new).digest()


def test_a_file_with_nothing_in_common_sends_every_chunk() -> None:
    other = words(2 << 20, seed=99)
    recipe, have, payload = recipe_for(other, OLD)
    assert recipe.reused == 0 and recipe.sent == recipe.chunks
    assert remake(payload, have, OLD, len(other)) == other


def test_a_prefix_as_seed_reuses_all_but_its_last_chunk() -> None:
    """What a broken transfer leaves (its partial arrival) is a prefix of the file: every
    chunk of it but the cut one is reused."""
    new = edited(OLD)
    prefix = new[: len(new) // 2]
    recipe, have, payload = recipe_for(new, prefix)
    assert recipe.reused >= len(have) - 1
    assert recipe.sent_bytes <= len(new) - len(prefix) + cdc.MAX_CHUNK
    assert remake(payload, have, prefix, len(new)) == new


def test_a_file_changed_while_sent_fails() -> None:
    new = edited(OLD)
    have = [d for _o, _n, d in chunks_of(OLD)]
    recipe = cdc.plan_recipe(chunks_of(new), have)
    changed = new[:100_000] + b"Y" * 200 + new[100_200:]
    with pytest.raises(ToolFailed, match="changed while it was sent"):
        b"".join(cdc.pieces(recipe, have, lambda off, n: changed[off : off + n]))


# -- hostile recipes ------------------------------------------------------------------------------
NEW = edited(OLD)
RECIPE, HAVE, PAYLOAD = recipe_for(NEW, OLD)
RUN = struct.Struct(">cII16s")
NEWP = struct.Struct(">cI16s")


def ref(start: int, count: int, have: list[bytes] = HAVE) -> bytes:
    return RUN.pack(b"R", start, count, cdc.run_check(have[start : start + count]))


def new_chunk(data: bytes) -> bytes:
    return NEWP.pack(b"N", len(data), cdc.digest(data)) + data


def refused(payload: bytes, size: int, why: str, seed: bytes = OLD) -> None:
    with pytest.raises(Refused, match=why) as info:
        remake(payload, HAVE, seed, size, listed=OLD)
    assert "\n" not in info.value.message and info.value.message.startswith("migration refused")


def test_a_recipe_that_makes_more_than_announced() -> None:
    refused(PAYLOAD + ref(0, 1), len(NEW), "more than the announced")
    refused(PAYLOAD, len(NEW) - 1, "more than the announced")
    big = new_chunk(OLD[: cdc.MAX_CHUNK])
    refused(big, cdc.MAX_CHUNK - 1, "more than the announced")


def test_a_recipe_that_makes_less_or_ends_inside_a_piece() -> None:
    refused(PAYLOAD, len(NEW) + 1, "not the announced|not the file.s last")
    refused(PAYLOAD[:-3], len(NEW), "ends inside a piece|not the announced")


def test_chunks_over_the_maximum_or_empty() -> None:
    data = words(cdc.MAX_CHUNK + 1, seed=3)
    refused(new_chunk(data), len(data), "at most")
    refused(NEWP.pack(b"N", 0, cdc.digest(b"")), 10, "a chunk of 0 bytes")
    # the announced length is checked before the bytes are waited for
    refused(NEWP.pack(b"N", 1 << 31, b"\0" * 16), 1 << 32, "at most")


def scattered(old: bytes, pages: int = 12) -> bytes:
    """``pages`` 4 KiB pieces rewritten at scattered, page-aligned places."""
    rng = random.Random(5)
    new = bytearray(old)
    for n, page in enumerate(sorted(rng.sample(range(len(old) // 4096), pages))):
        new[page * 4096 : (page + 1) * 4096] = words(4096, seed=100 + n)
    return bytes(new)


def fine_of(seed: bytes, ranges: list[tuple[int, int]]) -> tuple[list[bytes], list[bytes]]:
    """What the host answers when asked to look finer at ``ranges`` of its list: its fine
    chunks' digests and bytes, region after region."""
    cs = chunks_of(seed)
    digests, datas = [], []
    for a, b in ranges:
        region = b"".join(seed[o : o + n] for o, n, _d in cs[a:b])
        for c in cdc.fine_chunker().cut_buf(region):
            digests.append(cdc.digest(c.data))
            datas.append(bytes(c.data))
    return digests, datas


def test_scattered_edits_refined_send_little_more_than_the_edits() -> None:
    """Scattered 4 KiB edits: each resends one or two whole chunks (~10 KiB each); the
    changed regions asked again finer (1 KiB), only about the edited bytes travel, and the
    host rebuilds the file exactly from both of its lists."""
    new = scattered(OLD)
    have = [d for _o, _n, d in chunks_of(OLD)]
    coarse = cdc.plan_recipe(chunks_of(new), have)
    ranges = cdc.regions(coarse)
    assert cdc.decode_regions(cdc.encode_regions(ranges), len(have)) == ranges
    assert len(ranges) >= 6
    fine, fine_data = fine_of(OLD, ranges)
    recipe = cdc.refine_recipe(coarse, fine, lambda off, n: new[off : off + n])
    assert recipe.sent_bytes < coarse.sent_bytes * 0.7, (recipe.sent_bytes, coarse.sent_bytes)
    assert recipe.sent_bytes < 12 * 4096 * 2
    payload = b"".join(cdc.pieces(recipe, have, lambda off, n: new[off : off + n], fine))
    assert len(payload) == recipe.payload <= cdc.max_payload(len(new))
    where = {i: (o, n) for i, (o, n, _d) in enumerate(chunks_of(OLD))}
    out = bytearray()
    rb = cdc.Rebuild(
        have, len(new), lambda i: OLD[where[i][0] : where[i][0] + where[i][1]], out.extend,
        "f" * 64, fine, lambda i: fine_data[i],
    )  # fmt: skip
    for i in range(0, len(payload), 5000):
        rb.feed(payload[i : i + 5000])
    rb.finish()
    assert bytes(out) == new
    # a fine reference outside the fine list, or to the wrong run, is refused like a coarse
    bad = RUN.pack(b"F", len(fine), 1, bytes(16))
    with pytest.raises(Refused, match="lacks"):
        cdc.Rebuild(have, len(new), lambda i: b"", out.extend, "f" * 64, fine).feed(bad)


def test_regions_asked_are_checked() -> None:
    assert cdc.decode_regions("", 10) == []
    for text in ("3-2", "0-0", "1-5,4-6", "0-11", "x-2", "0-65", "-1-2", "1-2-3"):
        with pytest.raises(Refused, match="region"):
            cdc.decode_regions(text, 100 if text == "0-65" else 10)


def test_unknown_references_and_pieces() -> None:
    refused(RUN.pack(b"R", len(HAVE), 1, b"\0" * 16), len(NEW), "lacks")
    refused(RUN.pack(b"R", 0, 0, b"\0" * 16), len(NEW), "lacks")
    refused(RUN.pack(b"R", 2**32 - 1, 2**32 - 1, b"\0" * 16), len(NEW), "lacks")
    refused(b"Z" + b"\0" * 40, len(NEW), "unknown recipe piece")


def test_a_run_not_the_one_answered() -> None:
    bad = RUN.pack(b"R", 0, 2, cdc.run_check(HAVE[1:3]))
    refused(bad, len(NEW), "not the ones answered")


def test_a_new_chunk_that_does_not_match_its_digest() -> None:
    data = OLD[: cdc.MIN_CHUNK]
    bad = NEWP.pack(b"N", len(data), cdc.digest(data[::-1])) + data
    refused(bad, len(data), "does not match its digest")


def test_a_damaged_seed_is_never_used() -> None:
    damaged = bytearray(OLD)
    damaged[10] ^= 1  # the seed changed after its chunks were listed
    refused(PAYLOAD, len(NEW), "damaged", seed=bytes(damaged))


def test_chunk_lists_are_bounded() -> None:
    text = cdc.encode_list(HAVE)
    assert cdc.decode_list(text, len(HAVE)) == HAVE
    with pytest.raises(Refused, match="longer"):
        cdc.decode_list(text, len(HAVE) // 2)
    with pytest.raises(Refused, match="not base64"):
        cdc.decode_list("!!" + text, len(HAVE) * 2)
    with pytest.raises(Refused, match="ill-formed"):
        cdc.decode_list(cdc.encode_list([b"abc"]), 4)
    assert cdc.max_payload(len(NEW)) >= len(PAYLOAD)
