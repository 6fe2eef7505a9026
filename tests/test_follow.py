"""unionimg.fs.follow: a file read while another thread writes it (a pulled blob extracted as
it arrives). Real files and threads; no root needed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from unionimg.fs.follow import Abandoned, Growing, Restarted

DATA = os.urandom(300_000)


def _write(g: Growing, partial: Path, dest: Path, parts: int = 30, pause: float = 0.005) -> None:
    """What the registry client does: begin, each part written and flushed, then the rename
    and finish."""
    step = len(DATA) // parts
    with partial.open("wb") as fh:
        g.begin(partial, 0)
        for i in range(0, len(DATA), step):
            fh.write(DATA[i : i + step])
            fh.flush()
            g.wrote(min(i + step, len(DATA)))
            time.sleep(pause)
    os.replace(partial, dest)
    g.finish(dest)


def test_a_reader_follows_the_writer_and_sees_only_what_was_written(tmp_path: Path) -> None:
    g = Growing(len(DATA))
    seen: list[int] = []  # how far the writer had written at each read
    reader = g.reader()  # opened before the writer even named its file
    writer = threading.Thread(target=_write, args=(g, tmp_path / "b.partial", tmp_path / "b"))
    writer.start()
    got = bytearray()
    while data := reader.read(7_000):
        got += data
        seen.append(len(got))
    writer.join()
    reader.close()
    assert bytes(got) == DATA
    assert g.finished and g.wait() == tmp_path / "b"
    assert len(seen) > 10  # it read while the file grew, not once at the end
    # a reader started after the end reads the complete file through its final name
    with g.reader() as late:
        assert late.read() == DATA
        assert late.read(10) == b""


def test_a_restart_below_what_was_read_raises_restarted(tmp_path: Path) -> None:
    g = Growing(len(DATA))
    partial = tmp_path / "b.partial"
    partial.write_bytes(DATA[:100_000])
    g.begin(partial, 0)
    g.wrote(100_000)
    ahead, behind = g.reader(), g.reader()
    assert ahead.read(50_000) == DATA[:50_000]
    # the whole blob again from byte 0 (a 200 to a resumed GET): the file is truncated
    with partial.open("wb") as fh:
        g.begin(partial, 0)
        fh.write(DATA[:20_000])
        fh.flush()
        g.wrote(20_000)
    with pytest.raises(Restarted):
        ahead.read(10)
    assert behind.read(20_000) == DATA[:20_000]  # it had read nothing: it may go on
    # a resume at the byte the file ends (a Range GET answered 206) is no restart
    with partial.open("ab") as fh:
        g.begin(partial, 20_000)
        fh.write(DATA[20_000:])
        fh.flush()
        g.wrote(len(DATA))
    os.replace(partial, tmp_path / "b")
    g.finish(tmp_path / "b")
    assert behind.read() == DATA[20_000:]
    ahead.close()
    behind.close()


def test_a_writer_that_gives_up_wakes_every_reader(tmp_path: Path) -> None:
    g = Growing(len(DATA))
    partial = tmp_path / "b.partial"
    partial.write_bytes(DATA[:1000])
    g.begin(partial, 0)
    g.wrote(1000)
    errors: list[BaseException] = []

    def consume() -> None:
        with g.reader() as r:
            try:
                while r.read(4096):
                    pass
            except Abandoned as exc:
                errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert all(t.is_alive() for t in threads)  # waiting for bytes that do not come
    g.fail("the transfer broke")
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
    assert [str(e) for e in errors] == ["the transfer broke"] * 3
    with pytest.raises(Abandoned):
        g.wait()


def test_a_reader_never_reads_past_what_the_writer_announced(tmp_path: Path) -> None:
    g = Growing(len(DATA))
    partial = tmp_path / "b.partial"
    partial.write_bytes(DATA)  # on disk already, but announced only up to 10,000
    g.begin(partial, 0)
    g.wrote(10_000)
    r = g.reader()
    assert len(r.read(50_000)) == 10_000
    # the file shorter than announced (truncated behind the writer's back): not a silent EOF
    partial.write_bytes(DATA[:5_000])
    g.wrote(20_000)
    with pytest.raises(Restarted):
        r.read(50_000)
    r.close()


def test_a_file_renamed_before_the_reader_opened_it_is_found_at_its_new_name(
    tmp_path: Path,
) -> None:
    """The reader was told of ``b.partial``; the writer finished and renamed it before the
    reader's first read opened it (8 hosts pulling at once met this): the reader waits for
    the writer's next word and reads the file where it is now."""
    g = Growing(len(DATA))
    partial, dest = tmp_path / "b.partial", tmp_path / "b"
    partial.write_bytes(DATA)
    g.begin(partial, 0)
    g.wrote(len(DATA))
    r = g.reader()
    path, end, _restarts, news = g._await(0, 0)  # what the reader was told
    assert (path, end) == (partial, len(DATA))
    os.replace(partial, dest)  # renamed; finish() not said yet
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(r.read()))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # waiting for the writer's word, not failing on the old name
    g.finish(dest)
    t.join(timeout=5)
    assert got == [DATA]
    assert news < g._await(0, 0)[3]
    r.close()
