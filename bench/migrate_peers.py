"""The peers of ``bench/migrate.py``, each sent over the lab's limited link to a namespace host.

Every peer runs the way its users run it, its bytes counted like unionimg's: the kernel's
counters of the receiving host's ``eth0`` (``rx``: what reached the host, its protocol and
SSH/HTTP and TCP overhead included; ``tx``: what the host sent back), its time the wall time
of the transfer (the sender's preparation, ``casync make`` or ``zsyncmake``, timed apart):

- ``rsync image``: ``rsync --no-whole-file -z --compress-choice=zstd --sparse`` over SSH
  (the lab's client key, the host's own sshd) of the sender's flattened image onto a copy of
  the receiver's image under the same name (rsync's basis);
- ``rsync tree``: ``rsync -aAXH --numeric-ids --delete`` with the same options, of the
  sender's file tree onto a copy of the receiver's tree;
- ``casync --seed``: ``casync make`` (zstd chunks) of the sender's image here, its store and
  index served over HTTP from the controller's lab address (:class:`Served`), and ``casync
  extract --seed=RECEIVER_IMAGE http://.../x.caibx`` run inside the host's namespace: only
  the chunks the seed lacks cross the link;
- ``zsync``: ``zsyncmake`` of the sender's image served the same way, ``zsync -i
  RECEIVER_IMAGE http://.../x.zsync`` inside the host's namespace (HTTP range requests,
  several ranges per request: :class:`Served` answers ``multipart/byteranges``);
- ``zstd -3 copy``: ``zstd -3 -T2`` of the whole image piped through SSH into ``zstd -d``.

Each result is checked on the receiver: the rebuilt image's sha256 or the rebuilt tree's
digest (:func:`tree_digest`) must equal the sender's, else the peer is reported failed (its
bytes not compared). The receiver's copies (the basis) are made before the counters are read;
the host's directories share this machine's file system (a network namespace only).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import sh
from vm_fixtures.nethosts import Host

ZSTD_LEVEL = 3


@dataclass
class Outcome:
    """One peer's run: bytes the host received and sent, seconds, whether it rebuilt the
    sender's content."""

    name: str
    rx: int = 0
    tx: int = 0
    secs: float = 0.0
    prep: float = 0.0  # the sender's preparation (casync make, zsyncmake), not on the wire
    ok: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """One sha256 over every entry of ``root`` (sorted paths): kind, mode, owner, xattrs,
    a regular file's content and mtime (seconds), a link's target, a device's number."""
    h = hashlib.sha256()
    entries: list[str] = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in [*dirs, *files]:
            entries.append(os.path.relpath(os.path.join(top, name), root))
    for rel in sorted(entries):
        p = os.path.join(root, rel)
        st = os.lstat(p)
        h.update(
            f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode(errors="surrogateescape")
        )
        if stat.S_ISREG(st.st_mode):
            h.update(f"{int(st.st_mtime)}\0{file_sha256(Path(p))}".encode())
        elif stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(p)))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            h.update(f"{st.st_rdev}".encode())
        for name in sorted(os.listxattr(p, follow_symlinks=False)):
            h.update(name.encode() + b"=" + os.getxattr(p, name, follow_symlinks=False))
        h.update(b"\n")
    return h.hexdigest()


def on_wire(host: Host, out: Outcome, run: Callable[[], object]) -> None:
    """Run ``run`` and put the host's eth0 rx/tx growth and the wall time into ``out``;
    a failing command marks the outcome failed with its message."""
    before = host.counters()
    t = time.monotonic()
    try:
        run()
    except (SystemExit, subprocess.SubprocessError, OSError) as e:
        out.note = f"failed: {str(e)[-300:]}"
    out.secs = time.monotonic() - t
    after = host.counters()
    out.rx = after["rx_bytes"] - before["rx_bytes"]
    out.tx = after["tx_bytes"] - before["tx_bytes"]


def _check(out: Outcome, got: str, want: str) -> None:
    if out.note:
        return
    out.ok = got == want
    if not out.ok:
        out.note = "failed: the receiver's result differs from the sender's"


def ssh_command(host: Host) -> list[str]:
    """The lab's ssh to ``host`` without the destination (for ``rsync -e``)."""
    argv = host.ssh_argv()
    return argv[: argv.index(f"root@{host.addr}")]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def rsync_image(host: Host, src: Path, basis: Path, recv: Path) -> Outcome:
    out = Outcome("rsync image")
    dst = fresh(recv / "rsync-image") / src.name
    sh("cp", "--sparse=always", str(basis), str(dst))
    ssh = " ".join(ssh_command(host))
    on_wire(host, out, lambda: sh(
        "rsync", "--no-whole-file", "-z", "--compress-choice=zstd", "--sparse", "-e", ssh,
        str(src), f"root@{host.addr}:{dst}"))  # fmt: skip
    _check(out, file_sha256(dst) if dst.exists() else "", file_sha256(src))
    shutil.rmtree(dst.parent, ignore_errors=True)
    return out


def rsync_tree(host: Host, src: Path, basis: Path, recv: Path, want: str) -> Outcome:
    out = Outcome("rsync tree")
    dst = recv / "rsync-tree"
    shutil.rmtree(dst, ignore_errors=True)
    sh("cp", "-a", str(basis), str(dst))
    ssh = " ".join(ssh_command(host))
    on_wire(host, out, lambda: sh(
        "rsync", "-aAXH", "--numeric-ids", "--delete", "--no-whole-file", "-z",
        "--compress-choice=zstd", "-e", ssh, f"{src}/", f"root@{host.addr}:{dst}/"))  # fmt: skip
    _check(out, tree_digest(dst), want)
    shutil.rmtree(dst, ignore_errors=True)
    return out


def zstd_copy(host: Host, src: Path, recv: Path) -> Outcome:
    out = Outcome(f"zstd -{ZSTD_LEVEL} copy")
    dst = fresh(recv / "zstd") / src.name

    def run() -> None:
        comp = subprocess.Popen(["zstd", "-q", "-c", f"-{ZSTD_LEVEL}", "-T2", str(src)],
                                stdout=subprocess.PIPE)  # fmt: skip
        assert comp.stdout is not None
        done = subprocess.run(host.ssh_argv(f"zstd -d -q -f -o {dst}"), stdin=comp.stdout,
                              capture_output=True, check=False, timeout=3600)  # fmt: skip
        comp.stdout.close()
        if comp.wait() != 0 or done.returncode != 0:
            raise SystemExit(f"zstd through ssh: {done.stderr.decode(errors='replace')[-300:]}")

    on_wire(host, out, run)
    _check(out, file_sha256(dst) if dst.exists() else "", file_sha256(src))
    shutil.rmtree(dst.parent, ignore_errors=True)
    return out


def casync_seed(host: Host, src: Path, seed: Path, send: Path, recv: Path, addr: str) -> Outcome:
    out = Outcome("casync --seed")
    served = fresh(send / "casync")
    t = time.monotonic()
    sh("casync", "make", "--compression=zstd", f"--store={served / 'x.castr'}",
       str(served / "x.caibx"), str(src))  # fmt: skip
    out.prep = time.monotonic() - t
    dst = fresh(recv / "casync") / src.name
    with Served(served, addr) as url:
        on_wire(host, out, lambda: sh(
            *host.prefix, "casync", "extract", f"--store={url}/x.castr", f"--seed={seed}",
            f"{url}/x.caibx", str(dst)))  # fmt: skip
    _check(out, file_sha256(dst) if dst.exists() else "", file_sha256(src))
    shutil.rmtree(dst.parent, ignore_errors=True)
    shutil.rmtree(served, ignore_errors=True)
    return out


def zsync_seed(host: Host, src: Path, seed: Path, send: Path, recv: Path, addr: str) -> Outcome:
    out = Outcome("zsync -i")
    served = fresh(send / "zsync")
    os.link(src, served / "x.img")
    t = time.monotonic()
    sh("zsyncmake", "-u", "x.img", "-o", str(served / "x.zsync"), str(served / "x.img"))
    out.prep = time.monotonic() - t
    dst = fresh(recv / "zsync") / src.name
    with Served(served, addr) as url:
        on_wire(host, out, lambda: sh(
            *host.prefix, "zsync", "-q", "-i", str(seed), "-o", str(dst), f"{url}/x.zsync",
            cwd=dst.parent))  # fmt: skip
    _check(out, file_sha256(dst) if dst.exists() else "", file_sha256(src))
    shutil.rmtree(dst.parent, ignore_errors=True)
    shutil.rmtree(served, ignore_errors=True)
    return out


# -- a small static HTTP server with byte ranges (zsync asks several per request) --------

_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """``Range: bytes=...`` as (first, last) pairs within ``size``; None if not satisfiable
    or not a bytes range."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    out = []
    for part in spec.split(","):
        m = _RANGE.fullmatch(part)
        if not m or not (m.group(1) or m.group(2)):
            return None
        if m.group(1):
            first = int(m.group(1))
            last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            first, last = max(0, size - int(m.group(2))), size - 1
        if first > last or first >= size:
            continue
        out.append((first, last))
    return out or None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _file(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            return None
        p = self.root.joinpath(*parts)
        try:
            st = os.lstat(p)
        except OSError:
            return None
        return p if stat.S_ISREG(st.st_mode) else None

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        p = self._file()
        if p is None:
            self.send_error(404)
            return
        size = p.stat().st_size
        header = self.headers.get("Range")
        ranges = parse_ranges(header, size) if header else [(0, size - 1)] if size else []
        if header and ranges is None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        assert ranges is not None
        with open(p, "rb") as fh:
            if not header or len(ranges) == 1:
                first, last = ranges[0] if ranges else (0, -1)
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self._copy(fh, first, last)
                return
            boundary = "unionimgbenchboundary"
            heads = [
                (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n").encode()
                for a, b in ranges
            ]  # fmt: skip
            tail = f"\r\n--{boundary}--\r\n".encode()
            length = sum(len(h) + b - a + 1 for h, (a, b) in zip(heads, ranges, strict=True))
            length += len(tail)
            self.send_response(206)
            self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not body:
                return
            for h, (a, b) in zip(heads, ranges, strict=True):
                self.wfile.write(h)
                self._copy(fh, a, b)
            self.wfile.write(tail)

    def _copy(self, fh: Any, first: int, last: int) -> None:
        fh.seek(first)
        left = last - first + 1
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                raise OSError("file shrank while served")
            self.wfile.write(chunk)
            left -= len(chunk)


class Served:
    """``root`` served over HTTP on ``addr`` (a free port) while the block lasts: GET and
    HEAD of regular files below it, byte ranges (one, or several as multipart)."""

    def __init__(self, root: Path, addr: str) -> None:
        handler = type("Handler", (_Handler,), {"root": root})
        self.server = http.server.ThreadingHTTPServer((addr, 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def all_peers(host: Host, src: tuple[Path, Path], basis: tuple[Path, Path], want_tree: str,
              work: Path, addr: str) -> list[Outcome]:  # fmt: skip
    """Every peer in turn over ``host``'s link: ``src`` and ``basis`` are (image, tree) of
    the sender and of the receiver; ``want_tree`` the sender tree's :func:`tree_digest`;
    ``addr`` the controller's lab address (the HTTP server's)."""
    send, recv = work / "peer-send", work / "peer-recv"
    runs: list[Callable[[], Outcome]] = [
        lambda: rsync_image(host, src[0], basis[0], recv),
        lambda: rsync_tree(host, src[1], basis[1], recv, want_tree),
        lambda: casync_seed(host, src[0], basis[0], send, recv, addr),
        lambda: zsync_seed(host, src[0], basis[0], send, recv, addr),
        lambda: zstd_copy(host, src[0], recv),
    ]
    out = []
    for run in runs:
        o = run()
        print(f"  {o.name}: {o.rx:,} B to the host, {o.secs:.1f} s {o.note}".rstrip(), flush=True)
        out.append(o)
    shutil.rmtree(send, ignore_errors=True)
    shutil.rmtree(recv, ignore_errors=True)
    return out
