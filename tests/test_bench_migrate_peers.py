"""bench/migrate_peers.py's own pieces (no root, no network beyond 127.0.0.1): the HTTP
server's byte ranges as zsync asks them (several per request, answered as
multipart/byteranges) and the tree digest the peers' results are checked with."""

from __future__ import annotations

import http.client
import os
import re
from pathlib import Path

import pytest

from bench.migrate_peers import Served, parse_ranges, tree_digest


def test_parse_ranges() -> None:
    assert parse_ranges("bytes=0-9", 100) == [(0, 9)]
    assert parse_ranges("bytes=90-", 100) == [(90, 99)]
    assert parse_ranges("bytes=-5", 100) == [(95, 99)]
    assert parse_ranges("bytes=0-1,10-19, 95-200", 100) == [(0, 1), (10, 19), (95, 99)]
    assert parse_ranges("bytes=100-", 100) is None  # nothing satisfiable
    assert parse_ranges("items=0-1", 100) is None
    assert parse_ranges("bytes=a-b", 100) is None


def _get(url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_served_ranges_single_and_multipart(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    (tmp_path / "x.img").write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.cacnk").write_bytes(b"chunk")
    os.symlink("/etc/passwd", tmp_path / "link")
    with Served(tmp_path, "127.0.0.1") as url:
        status, _h, body = _get(url, "/x.img", {})
        assert (status, body) == (200, data)
        assert _get(url, "/sub/c.cacnk", {})[2] == b"chunk"
        for bad in ("/link", "/../x.img", "/sub/../x.img", "/missing", "/"):
            assert _get(url, bad, {})[0] == 404, bad
        status, h, body = _get(url, "/x.img", {"Range": "bytes=100-199"})
        assert (status, h["content-range"], body) == (206, "bytes 100-199/50000", data[100:200])
        assert _get(url, "/x.img", {"Range": "bytes=60000-"})[0] == 416
        status, h, body = _get(url, "/x.img", {"Range": "bytes=0-9,4096-8191,49990-"})
        assert status == 206
        m = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", h["content-type"])
        assert m
        assert int(h["content-length"]) == len(body)
        # every part follows a CRLF, then its boundary line (zsync reads it so)
        parts = body.split(b"\r\n--" + m.group(1).encode())
        assert parts[0] == b"" and parts[-1] == b"--\r\n"
        got = []
        for part in parts[1:-1]:
            head, _, payload = part.partition(b"\r\n\r\n")
            r = re.search(rb"Content-Range: bytes (\d+)-(\d+)/50000", head)
            assert r
            got.append((int(r.group(1)), int(r.group(2)), payload))
        assert got == [(0, 9, data[0:10]), (4096, 8191, data[4096:8192]),
                       (49990, 49999, data[49990:])]  # fmt: skip


@pytest.mark.parametrize("change", ["content", "mode", "link", "new", "mtime"])
def test_tree_digest_sees_each_change(tmp_path: Path, change: str) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"one")
    os.symlink("f", root / "d" / "l")
    before = tree_digest(root)
    assert tree_digest(root) == before
    if change == "content":
        (root / "d" / "f").write_bytes(b"two")
    elif change == "mode":
        os.chmod(root / "d" / "f", 0o600)
    elif change == "link":
        os.unlink(root / "d" / "l")
        os.symlink("g", root / "d" / "l")
    elif change == "new":
        (root / "d" / "e").touch()
    else:
        os.utime(root / "d" / "f", (1, 1))
    assert tree_digest(root) != before
