"""The measurement behind the migration's choice between a patch-from delta, chunks and the
whole file (docs/migrate.md, "Which one, measured"): 16 and 66 MiB of random words, three
places overwritten with 200 bytes and one 315-byte insertion, zstd level 9. Run with ``-s``
to see the figures::

    .venv/bin/pytest -q -s tests/test_migrate_cdc_measure.py -p no:cacheprovider

It checks what the rule relies on: where a patch-from delta applies (the sender holds the
older version, up to 64 MiB) it is smaller than the chunks; past that it finds nothing,
while the chunks cost a few hundredths of the file compressed; and of the chunk sizes
tried, 2/8/32 KiB costs within 10 % of the least (chunks and answer together, over a few
edits and over scattered ones) with half the answer of the only cheaper one.
"""

from __future__ import annotations

import io
import random
import time

import zstandard
from pyfastcdc import FastCDC

from tests.test_migrate_cdc_real import words
from unionimg.migrate import cdc, delta


def edit(old: bytes, edits: int = 4, seed: int = 7) -> bytes:
    new = bytearray(old)
    rng = random.Random(seed)
    for _ in range(edits - 1):
        at = rng.randrange(len(new) - 1000)
        new[at : at + 200] = bytes(rng.randrange(97, 123) for _ in range(200))
    new[len(old) // 2 : len(old) // 2] = b"a row inserted on h1 " * 15
    return bytes(new)


def z9(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=9).compress(data))


def chunks_cost(old: bytes, new: bytes) -> tuple[int, int, cdc.Recipe, float]:
    """(recipe compressed, answer bytes, recipe, seconds for both sides' cutting)."""
    t = time.monotonic()
    have = [d for _o, _n, d in cdc.cut(io.BytesIO(old))]
    recipe = cdc.plan_recipe(cdc.cut(io.BytesIO(new)), have)
    payload = b"".join(cdc.pieces(recipe, have, lambda o, n: new[o : o + n]))
    took = time.monotonic() - t
    return z9(payload), len(cdc.encode_list(have)), recipe, took


def patch_from(old: bytes, new: bytes) -> int:
    wl = min(31, max(20, (len(old) + len(new)).bit_length() + 1))
    params = zstandard.ZstdCompressionParameters.from_level(9, window_log=wl)
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return len(zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new))


def test_which_method_costs_least() -> None:
    for size in (16 << 20, 66 << 20):
        old = words(size, seed=14)
        new = edit(old)
        t = time.monotonic()
        whole = z9(new)
        t_whole = time.monotonic() - t
        chunks, answer, recipe, t_chunks = chunks_cost(old, new)
        t = time.monotonic()
        pf = patch_from(old, new)
        t_pf = time.monotonic() - t
        print(
            f"\n{size >> 20} MiB: whole {whole:,} B ({t_whole:.2f} s); patch-from {pf:,} B "
            f"({t_pf:.2f} s); chunks {chunks:,} B ({recipe.sent} of {recipe.chunks:,} sent, "
            f"{t_chunks:.2f} s), answer {answer:,} B"
        )
        assert recipe.sent <= 8
        assert chunks < whole // 50
        if size <= delta.MAX_SIZE:
            assert pf < chunks  # where it applies, the delta wins: it is tried first
        else:
            assert pf > whole // 2  # past 64 MiB patch-from finds (next to) nothing


def scattered(old: bytes) -> bytes:
    """1 % of ``old`` rewritten in scattered page-aligned 4 KiB pieces of other words, 2 %
    more words appended (the benchmark's pair (d), ``bench/migrate.py``)."""
    rng = random.Random(3)
    pool = words(4 << 20, seed=5)
    new = bytearray(old)
    pages = len(old) // 4096
    for n, page in enumerate(sorted(rng.sample(range(pages), len(old) // 100 // 4096))):
        at = (n * 4096) % (len(pool) - 4096)
        new[page * 4096 : (page + 1) * 4096] = pool[at : at + 4096]
    return bytes(new) + words(len(old) // 50, seed=6)


def test_chunk_sizes() -> None:
    """Chunks sent (compressed) + the host's answer, for a few edits and for scattered
    ones, summed: smaller chunks resend less around each edit, larger ones make a shorter
    answer (16 bytes a chunk, base64). The sizes chosen cost least of those no smaller."""
    old = words(66 << 20, seed=14)
    profiles = {"4 edits": edit(old), "1 % in 4 KiB pieces + 2 %": scattered(old)}
    total: dict[tuple[int, int, int], int] = {}
    for name, new in profiles.items():
        for mn, avg, mx in ((1, 4, 16), (2, 8, 32), (4, 16, 64), (8, 32, 128), (16, 64, 256)):
            c = FastCDC(avg << 10, min_size=mn << 10, max_size=mx << 10)
            have = [cdc.digest(ch.data) for ch in c.cut_buf(old)]
            known = set(have)
            sent = [bytes(ch.data) for ch in c.cut_buf(new) if cdc.digest(ch.data) not in known]
            cost = z9(b"".join(sent)), len(cdc.encode_list(have))
            total[(mn, avg, mx)] = total.get((mn, avg, mx), 0) + sum(cost)
            print(f"\n{name}, {mn}/{avg}/{mx} KiB: {len(sent)} chunks sent, {cost[0]:,} B "
                  f"compressed; answer {cost[1]:,} B")  # fmt: skip
    ours = (cdc.MIN_CHUNK >> 10, cdc.AVG_CHUNK >> 10, cdc.MAX_CHUNK >> 10)
    print(f"\ntotals: {total}")
    # within 10 % of the cheapest (1/4/16 in this run, 5 % less), with half its answer
    # and half its chunks to hash and list per file
    assert total[ours] <= min(total.values()) * 1.1, total
    assert all(total[ours] < v for k, v in total.items() if k > ours), total


def test_scattered_edits_refined() -> None:
    """The bench's pair (d) profile: the changed regions asked again finer (1 KiB chunks
    of the host's chunks there) send a third less than the 8 KiB chunks alone, within 40 %
    of the limit (the distinct new 4 KiB blocks, compressed)."""
    old = words(66 << 20, seed=14)
    new = scattered(old)
    cs = list(cdc.cut(io.BytesIO(old)))
    have = [d for _o, _n, d in cs]
    coarse = cdc.plan_recipe(cdc.cut(io.BytesIO(new)), have)
    ranges = cdc.regions(coarse)
    fine: list[bytes] = []
    for a, b in ranges:
        region = b"".join(old[o : o + n] for o, n, _d in cs[a:b])
        fine += [cdc.digest(c.data) for c in cdc.fine_chunker().cut_buf(region)]
    refined = cdc.refine_recipe(coarse, fine, lambda o, n: new[o : o + n])

    def cost(recipe: cdc.Recipe, fine_list: list[bytes] | None) -> int:
        return z9(b"".join(cdc.pieces(recipe, have, lambda o, n: new[o : o + n], fine_list)))

    old_blocks = {old[i : i + 4096] for i in range(0, len(old), 4096)}
    fresh = dict.fromkeys(
        new[i : i + 4096] for i in range(0, len(new), 4096) if new[i : i + 4096] not in old_blocks
    )
    limit = z9(b"".join(fresh))
    c_cost, r_cost = cost(coarse, None), cost(refined, fine)
    answer = len(cdc.encode_list(have)) + len(cdc.encode_list(fine))
    print(
        f"\nscattered: {len(ranges)} regions; chunks alone {c_cost:,} B, refined {r_cost:,} B "
        f"(answers {len(cdc.encode_list(have)):,} + {len(cdc.encode_list(fine)):,} B), "
        f"limit {limit:,} B"
    )
    assert r_cost < c_cost * 0.7
    assert r_cost < limit * 1.4  # 34 % over here: fine chunks' edges, pieces' digests
    assert answer < r_cost // 4
