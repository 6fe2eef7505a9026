"""Bytes a host writes once and does not read again leave its page cache
(:mod:`unionimg.fs.pagecache`, issue 13): a pulled blob behind the writer, and behind a
reader that follows it as it arrives; the small files extracted into a layer's image once
a sync put them on the disk. Checked with ``fincore`` (what the kernel holds of each file),
against the same bytes written the ordinary way, which stay.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import on_a_page_cache_fs, resident_pages
from unionimg.fs.follow import Growing
from unionimg.fs.pagecache import DROP_EVERY, DropBehind, Recycler, drop

MIB = 1 << 20
PAGES_PER_MIB = MIB // 4096


def _write(path: Path, mib: int, *, behind: bool) -> bytes:
    """``mib`` MiB of random bytes written to ``path`` 1 MiB at a time, fsynced; with
    ``behind``, as the pull's writer does (dropped behind it, and all of it at the end)."""
    data = os.urandom(mib * MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        trail = DropBehind(fd)
        for i in range(mib):
            os.write(fd, data[i * MIB : (i + 1) * MIB])
            if behind:
                trail.at((i + 1) * MIB)
        os.fsync(fd)
        if behind:
            drop(fd)
    finally:
        os.close(fd)
    return data


def test_a_stream_written_once_leaves_no_page_behind(tmp_path: Path) -> None:
    on_a_page_cache_fs(tmp_path)
    mib = 3 * DROP_EVERY // MIB
    _write(tmp_path / "kept", mib, behind=False)
    _write(tmp_path / "dropped", mib, behind=True)
    # the control: written the ordinary way, the pages stay (most of them: the kernel may
    # reclaim some meanwhile, a balloon asking this VM for memory, other work's pressure)
    assert resident_pages(tmp_path / "kept") >= mib * PAGES_PER_MIB // 2
    assert resident_pages(tmp_path / "dropped") <= 1
    assert (tmp_path / "dropped").stat().st_size == mib * MIB  # advice only: nothing lost


def test_a_reader_following_a_file_drops_what_it_read(tmp_path: Path) -> None:
    """A :class:`Growing` reader reads every byte, in order, and leaves at most the last
    :data:`DROP_EVERY` bytes it read in the page cache; a plain read leaves them all."""
    on_a_page_cache_fs(tmp_path)
    mib = 3 * DROP_EVERY // MIB + 5
    path = tmp_path / "blob"
    data = _write(path, mib, behind=True)  # nothing of it cached now: read from the disk
    growing = Growing(len(data))
    growing.finish(path)
    got = bytearray()
    with growing.reader() as reader:
        while part := reader.read(MIB):
            got += part
    assert got == data
    assert resident_pages(path) <= DROP_EVERY // 4096
    assert path.read_bytes() == data
    assert resident_pages(path) >= mib * PAGES_PER_MIB // 2  # a plain read: kept (the control)


def test_small_files_leave_the_page_cache_once_synced(tmp_path: Path) -> None:
    """:class:`Recycler`: the files said before a sync are dropped after it; one said after
    the take stays (the next round takes it); a path that is gone, or a symlink, is passed
    over (never followed)."""
    on_a_page_cache_fs(tmp_path)
    recycle = Recycler()
    files = [tmp_path / f"f{i}" for i in range(20)]
    for f in files:
        f.write_bytes(os.urandom(20_000))
        recycle.wrote(os.fsencode(f))
    (tmp_path / "gone").write_bytes(b"x")
    recycle.wrote(os.fsencode(tmp_path / "gone"))
    (tmp_path / "gone").unlink()
    target = tmp_path / "target"
    target.write_bytes(os.urandom(20_000))
    (tmp_path / "link").symlink_to(target)
    recycle.wrote(os.fsencode(tmp_path / "link"))
    batch = recycle.take()
    late = tmp_path / "late"
    late.write_bytes(os.urandom(20_000))
    recycle.wrote(os.fsencode(late))
    os.sync()
    recycle.drop(batch)
    assert all(resident_pages(f) == 0 for f in files)
    assert resident_pages(late) > 0 and resident_pages(target) > 0
    assert recycle.take() == [os.fsencode(late)]
    assert all(f.stat().st_size == 20_000 for f in files)
