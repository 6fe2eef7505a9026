"""A VM's own large file, edited a little on the other host, comes back as content-defined
chunks (issue 14), for real: namespace hosts with sshd (:mod:`vm_fixtures.nethosts`, the
world of ``tests/test_migrate_real.py``), bytes counted on the receiving host's eth0.

The file (66 MiB of random words: compressible, not trivially; beyond the patch-from
deltas' 64 MiB) lies in the VM's upper layer, so no base holds any version of it and the
sender, on the way back, does not hold the controller's version (it was kept here when the
VM left): only the rsync model helps — the controller chunks its kept copy, answers the
chunk digests, the sender sends the chunks it lacks and a recipe. Without that the file
travels whole (~25 MB compressed). Then a transfer of such a file killed half-way leaves
the host what arrived (its partial arrival); the rerun chunks it and sends only the rest.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.conftest import UNIONIMG, Cli, need_ssh_hosts
from tests.test_migrate_real import Env, hcli, migrate, names, share_base, wait_receivers_gone
from tests.test_systems import tiny_store
from unionimg.fs.mounts import unmount_tree
from unionimg.migrate import cdc
from vm_fixtures.nethosts import Lab

pytestmark = pytest.mark.usefixtures("root")

SIZE = 66 << 20  # beyond delta.MAX_SIZE (64 MiB): a patch-from delta is not tried
EDITS = 4  # places edited on the host


def words(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 11)))
        for _ in range(20000)
    ]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choices(vocab, k=12)) + "\n").encode()
    return bytes(out[:size])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Env]:
    need_ssh_hosts("mke2fs")
    tmp = tmp_path_factory.mktemp("mcdc")
    lab = Lab(tmp / "lab")
    try:
        ctl = tiny_store(tmp / "ctl")
        h1 = lab.add_host("h1")
        share_base(ctl, hcli(h1), "tiny")
        e = Env(tmp, lab, ctl, {"h1": h1})
        e.add_host(ctl, "h1", h1)
        back = lab.add_host("back")  # h1 reaches the controller's store through it
        back.store = ctl.store
        e.hosts["back"] = back
        e.add_host(hcli(h1), "ctl", back)
        yield e
    finally:
        lab.close()
        unmount_tree(tmp)


def make_big_vm(cli: Cli, where: Path, name: str, mac: str, rel: str, data: bytes) -> None:
    cli.ok("instance", "create", name, "--base", "tiny", "--mac", mac, "--hypervisor", "uml",
           "--size", "256M", "--memory", "96")  # fmt: skip
    write_in(cli, where, name, {rel: data})


def write_in(cli: Cli, where: Path, vm: str, files: dict[str, bytes]) -> None:
    mnt = where / f"mnt-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        for rel, data in files.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(data)
    finally:
        cli.ok("umount", str(mnt))


def sha_in(cli: Cli, where: Path, vm: str, rel: str) -> str:
    mnt = where / f"look-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        with open(mnt / rel, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    finally:
        cli.ok("umount", str(mnt))


def row(report: dict[str, Any], path: str) -> dict[str, Any]:
    rows = [r for r in report["files"] if r["path"] == path]
    assert len(rows) == 1, report["files"]
    out: dict[str, Any] = rows[0]
    return out


def test_a_large_own_file_edited_there_comes_back_as_chunks(env: Env) -> None:
    ctl, h1, back = env.ctl, hcli(env.hosts["h1"]), env.hosts["back"]
    old = words(SIZE, seed=14)
    whole = len(zstandard.ZstdCompressor(level=9).compress(old))
    make_big_vm(ctl, env.tmp, "cdb", "52:54:00:14:0c:01", "srv/db.words", old)
    out = migrate(ctl, "cdb", "h1")  # the first trip: h1 has no version of it
    assert row(out, "/srv/db.words")["method"] == "whole", out["files"]
    print(f"\nfirst trip (whole): stream {out['stream_bytes']} B, stages {out['stages']}")
    assert "cdb" in names(h1) and "cdb" not in names(ctl)

    # edited on h1 in a few places: three overwritten, one insertion (the rest shifts)
    new = bytearray(old)
    rng = random.Random(7)
    for _ in range(EDITS - 1):
        at = rng.randrange(len(new) - 1000)
        new[at : at + 200] = bytes(rng.randrange(97, 123) for _ in range(200))
    new[SIZE // 2 : SIZE // 2] = b"a row inserted on h1 " * 15
    new_sha = hashlib.sha256(new).hexdigest()
    write_in(h1, env.tmp, "cdb", {"srv/db.words": bytes(new)})

    dry = migrate(h1, "cdb", "ctl", "--dry-run")
    r = row(dry, "/srv/db.words")
    assert r["method"] == "chunks" and r["nearest"] == "kept copy of vm cdb", r
    assert r["chunks_sent"] <= 2 * EDITS and r["chunks"] > 1000, r
    # the changed regions were asked again finer: only about the edited bytes are sent
    assert r["refined"] is True and r["chunk_bytes_sent"] < EDITS * 3 * cdc.FINE_MAX, r
    assert r["why"].startswith(f"chunks: {r['chunks_sent']} of {r['chunks']:,} sent"), r
    assert dry["chunked"] == 1 and dry["methods"]["chunks"]["contents"] == 1

    rx0 = back.counters()["rx_bytes"]
    out = migrate(h1, "cdb", "ctl")
    wire = back.counters()["rx_bytes"] - rx0
    r = row(out, "/srv/db.words")
    # each edit changes at most two chunks (the one it lies in, and a boundary it moves);
    # what else travels: the offer, the recipe (runs of references), SSH
    bound = 2 * EDITS * cdc.MAX_CHUNK + 300_000
    print(
        f"way back with chunks: {wire} B on the wire ({r['chunks_sent']} of {r['chunks']} "
        f"chunks, {r['chunk_bytes_sent']} B raw), whole compressed {whole} B; "
        f"stages {out['stages']}"
    )
    assert wire < bound, (wire, bound, r)
    assert wire < whole // 20, (wire, whole)
    assert "cdb" in names(ctl) and "cdb" not in names(h1)
    assert sha_in(ctl, env.tmp, "cdb", "srv/db.words") == new_sha


def test_a_transfer_killed_inside_a_large_file_resumes_with_its_chunks(env: Env) -> None:
    """Killed half-way through the large file: the host keeps what arrived (its partial
    arrival, ``migrate/partial/SHA``; no object, no instance); the rerun chunks it as the
    nearest version and sends only the chunks beyond it."""
    ctl, h1 = env.ctl, env.hosts["h1"]
    data = words(SIZE, seed=41)
    sha = hashlib.sha256(data).hexdigest()
    whole = len(zstandard.ZstdCompressor(level=9).compress(data))
    make_big_vm(ctl, env.tmp, "cdr", "52:54:00:14:0c:02", "srv/log.words", data)
    rx0 = h1.counters()["rx_bytes"]
    res = subprocess.run(
        [str(UNIONIMG), "--store", str(ctl.store), "migrate", "cdr", "--to", "h1", "--json"],
        env={**os.environ, "UNIONIMG_CRASH_AT": "migrate:half-sent"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    first = h1.counters()["rx_bytes"] - rx0
    wait_receivers_gone(h1)
    assert "cdr" not in names(hcli(h1)) and "cdr" in names(ctl)
    partial = h1.store / "migrate" / "partial" / sha
    assert partial.is_file() and partial.stat().st_size >= SIZE // 4, first
    assert not (h1.store / "migrate" / "objects" / sha).exists()
    assert data.startswith(partial.read_bytes())  # only what arrived, in order

    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "cdr", "h1")
    second = h1.counters()["rx_bytes"] - rx0
    r = row(out, "/srv/log.words")
    print(
        f"killed inside the file: {first} B before the kill, {second} B on the rerun "
        f"({r['chunks_sent']} of {r['chunks']} chunks), whole compressed {whole} B"
    )
    assert r["method"] == "chunks" and r["nearest"].startswith("partial arrival"), r
    held = partial.stat().st_size if partial.exists() else 0
    assert held == 0  # gone once the content arrived whole
    # the rerun sends what had not arrived, not the whole file again
    assert first + second < whole * 1.25, (first, second, whole)
    assert second < whole * 0.8, (second, whole)
    assert (h1.store / "migrate" / "objects" / sha).is_file()
    assert sha_in(hcli(h1), env.tmp, "cdr", "srv/log.words") == sha
