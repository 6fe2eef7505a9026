"""What the registry client costs on loopback (issue 13, item 3): a real docker-registry
started by :func:`unionimg.registry.server.start`, one blob of random bytes (incompressible).

Prints: the registry's start-to-listening time, a chunked upload (POST, PATCH per
``--chunk``, PUT with the digest), a cross-repository mount of the same blob, a HEAD, and a
fetch with its sha256 checked as the bytes arrive. Usage::

    .venv/bin/python bench/registry.py [--mib 200] [--chunk-mib 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from unionimg.layers.layer import file_digest
from unionimg.registry import client, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--chunk-mib", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unionimg-bench-registry."))
    try:
        t = time.monotonic()
        srv = server.start(work / "registry", f"127.0.0.1:{free_port()}")
        print(f"docker-registry start to listening: {(time.monotonic() - t) * 1000:.0f} ms")
        blob = work / "blob"
        with blob.open("wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        digest, size = file_digest(blob), blob.stat().st_size
        with srv, client.Registry(srv.url, chunk_size=args.chunk_mib << 20) as reg:
            t = time.monotonic()
            reg.push_blob("bench/one", blob, digest)
            up = time.monotonic() - t
            print(
                f"upload {args.mib} MiB in {args.chunk_mib} MiB chunks: {up:.2f} s "
                f"({size / up / 2**20:.0f} MiB/s)"
            )
            t = time.monotonic()
            assert reg.push_blob("bench/two", blob, digest, mount_from=["bench/one"]) == "mounted"
            print(f"cross-repository mount: {(time.monotonic() - t) * 1000:.1f} ms, 0 bytes")
            t = time.monotonic()
            reg.blob_size("bench/two", digest)
            print(f"HEAD blob: {(time.monotonic() - t) * 1000:.1f} ms")
            t = time.monotonic()
            reg.fetch_blob("bench/two", digest, size, work / "fetched")
            down = time.monotonic() - t
            print(f"fetch with sha256 on arrival: {down:.2f} s ({size / down / 2**20:.0f} MiB/s)")
            print(f"counters: {reg.counters.to_json()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
