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


def test_a_short_chunk_that_is_not_the_last() -> None:
    small = new_chunk(b"x" * 100)
    refused(small + new_chunk(OLD[: cdc.MIN_CHUNK]), 100 + cdc.MIN_CHUNK, "not the file's last")


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
