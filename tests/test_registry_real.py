"""The image repository against a real registry: Debian's docker-registry (CNCF Distribution)
on 127.0.0.1 with a free port and a temporary directory, real layers of the layer store.

What it shows (issue 13, items 3 and 6): a parent's blob uploaded once for two children; a
second repository mounts instead of re-uploading (bytes counted on a loopback proxy); a pull
fetches only the layers a store lacks; a transfer cut mid-blob resumes from its partial file
sending only the rest; a tampered or truncated blob in the registry is refused with nothing
imported; a manifest naming a missing parent, a registry that is down: one line each; a
standard client (plain HTTP with urllib, zstd and tar) lists and fetches what unionimg
pushed; ``unionimg registry serve`` in the foreground and in the background.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    UNIONIMG,
    Cli,
    flip_byte,
    free_port,
    make_tree,
    need_programs,
    resident_pages,
)
from unionimg import poll
from unionimg.errors import NotFound, ToolFailed
from unionimg.layers import layerstore
from unionimg.layers.layerstore import Layer, Origin
from unionimg.registry import hostcache
from unionimg.registry import server as server_mod
from unionimg.registry.client import Registry
from unionimg.registry.manifests import (
    ARTIFACT_LAYER,
    MEDIA_LAYER,
    MEDIA_LAYER_META,
    MEDIA_MANIFEST,
    layer_tag,
)
from unionimg.runner import run
from unionimg.store.layout import Store

pytestmark = pytest.mark.usefixtures("root")

REPO = "unionimg/layers"
OVERHEAD = 32 << 10
"""Manifests, configs and HTTP framing a push or pull may add to the layers' blob bytes."""


# -- a store with a chain: base -> A, base -> B ------------------------------------------------
@dataclass
class Src:
    store: Store
    base: Layer
    a: Layer
    b: Layer


def _upper(path: Path, name: str, size: int) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / f"{name}.conf").write_text(f"{name}\n")
    (path / "srv").mkdir()
    (path / "srv" / f"{name}.bin").write_bytes(os.urandom(size))  # incompressible
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, root: None) -> Src:
    need_programs("docker-registry", "zstd", "tar")
    tmp = tmp_path_factory.mktemp("src")
    store = Store(tmp / "store")
    store.init()
    tree = make_tree(tmp / "base")
    (tree / "big.bin").write_bytes(os.urandom(1 << 20))
    base, _ = layerstore.put_tree(
        store, tree, parent=None, kind="base", origin=Origin("test base", base="b", generation=1)
    )
    a, _ = layerstore.put_tree(
        store,
        _upper(tmp / "ua", "a", 600_000),
        parent=base.diff_id,
        kind="snapshot",
        origin=Origin("instance va", instance="va", message="layer A"),
    )
    b, _ = layerstore.put_tree(
        store,
        _upper(tmp / "ub", "b", 300_000),
        parent=base.diff_id,
        kind="snapshot",
        origin=Origin("instance vb", instance="vb", message="layer B"),
    )
    return Src(store, base, a, b)


@pytest.fixture
def registry(tmp_path: Path, src: Src) -> Iterator[server_mod.Server]:
    del src  # its programs were checked
    srv = server_mod.start(tmp_path / "registry", f"127.0.0.1:{free_port()}")
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.running()


def empty_store(path: Path) -> Store:
    store = Store(path)
    store.init()
    return store


def held(store: Store) -> set[str]:
    return {la.diff_id for la in layerstore.list_layers(store)}


RANGE_HEADER = re.compile(rb"(?im)^range: [^\r\n]*\r\n")


# -- a loopback TCP proxy that counts bytes and can cut a connection -------------------------
class Proxy:
    """Forwards 127.0.0.1:port to the registry; counts bytes each way; the first ``cuts``
    connections whose answer passes ``cut_after`` bytes are closed right there; the first
    ``busy`` requests whose bytes hold ``busy_on`` are answered 503 with Retry-After: 1 (what
    a registry behind a load balancer answers while it restarts) instead of forwarded; the
    first ``unrange`` requests asking a Range lose that header (the registry answers 200 with
    the whole blob, as a cache or server that ignores Range does)."""

    def __init__(
        self,
        upstream: str,
        *,
        cut_after: int = 0,
        cuts: int = 0,
        busy_on: bytes = b"",
        busy: int = 0,
        unrange: int = 0,
    ) -> None:
        host, _, port = upstream.removeprefix("http://").rpartition(":")
        self.upstream = (host, int(port))
        self.cut_after, self.cuts = cut_after, cuts
        self.busy_on, self.busy = busy_on, busy
        self.unrange = unrange
        self.up = 0  # client -> registry
        self.down = 0  # registry -> client
        self.requests = bytearray()  # the first 64 KiB each connection sent
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.closed = False
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        passed = 0
        kept = 0
        try:
            while data := src.recv(65536):
                with self.lock:
                    if upward and self.busy and self.busy_on in data:
                        self.busy -= 1
                        dst = src  # answered here, never forwarded; the connection closes
                        data = (
                            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        dst.sendall(data)
                        break
                    if upward and self.unrange and RANGE_HEADER.search(data):
                        self.unrange -= 1
                        data = RANGE_HEADER.sub(b"", data)
                    if upward:
                        self.up += len(data)
                        if kept < 65536:
                            self.requests += data[: 65536 - kept]
                            kept += len(data)
                    else:
                        if self.cuts and passed + len(data) > self.cut_after:
                            data = data[: self.cut_after - passed]
                            self.cuts -= 1
                            self.down += len(data)
                            dst.sendall(data)
                            break
                        self.down += len(data)
                passed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- pushing -----------------------------------------------------------------------------------
def test_two_layers_sharing_a_parent_upload_the_parent_once(
    src: Src, registry: server_mod.Server
) -> None:
    with Registry(registry.url) as reg:
        first = hostcache.push_layers(src.store, reg, src.a.short)
        second = hostcache.push_layers(src.store, reg, src.b.short)
        again = hostcache.push_layers(src.store, reg, src.b.short)
        tags = reg.tags(REPO)
    base_blob, a_blob, b_blob = (x.meta.blob_digest for x in (src.base, src.a, src.b))
    assert first.blobs == {base_blob: "uploaded", a_blob: "uploaded"}
    assert second.blobs == {base_blob: "present", b_blob: "uploaded"}
    assert again.blobs == {base_blob: "present", b_blob: "present"}
    size = {x.meta.blob_digest: x.meta.blob_size for x in (src.base, src.a, src.b)}
    assert size[base_blob] > 1 << 20 and size[a_blob] > 600_000
    # the second push sent B's blob and a few small manifests and configs, not the base
    assert size[b_blob] <= second.bytes_sent < size[b_blob] + OVERHEAD
    assert again.bytes_sent < OVERHEAD
    assert first.bytes_sent >= size[base_blob] + size[a_blob]
    assert tags == sorted(layer_tag(x.diff_id) for x in (src.base, src.a, src.b))
    # the base's node is the same manifest in both chains (canonical bytes), B's parent
    assert first.nodes[0] == second.nodes[0]
    # one file per blob in the registry's storage
    for digest in (base_blob, a_blob, b_blob):
        stored = registry.blob_file(digest)
        assert stored.stat().st_size == size[digest]


def test_a_second_repository_mounts_instead_of_uploading(
    src: Src, registry: server_mod.Server
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short, repo="team1/layers")
    blobs = src.base.meta.blob_size + src.a.meta.blob_size
    with Proxy(registry.url) as p, Registry(p.url) as reg:
        report = hostcache.push_layers(src.store, reg, src.a.short, repo="team2/layers")
        assert reg.counters.blobs_mounted == 2 and reg.counters.blobs_uploaded == 2  # configs
    assert set(report.blobs.values()) == {"mounted"}
    # counted on the wire: the manifests and configs, none of the 1.6 MB of layer blobs
    assert p.up < OVERHEAD < blobs, (p.up, blobs)
    assert b"mount=" in p.requests and b"from=team1%2Flayers" in p.requests
    with Registry(registry.url) as reg:
        assert reg.blob_size("team2/layers", src.a.meta.blob_digest) == src.a.meta.blob_size


# -- pulling -----------------------------------------------------------------------------------
def test_pull_fetches_only_the_layers_a_store_lacks(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    pushed = Cli(src.store.root).ok("push", src.a.short, "--registry", registry.url, "--json")
    report = json.loads(pushed.output)
    assert [n["diff_id"] for n in report["nodes"]] == [src.base.diff_id, src.a.diff_id]
    assert report["repo"] == REPO and report["bytes_sent"] > src.base.meta.blob_size
    pushed = Cli(src.store.root).ok("push", src.b.meta.label, "--registry", registry.url)
    assert "1 blob(s) uploaded, 0 mounted, 1 already there" in pushed.output
    assert f"tag {layer_tag(src.b.diff_id)}" in pushed.output
    host = tmp_path / "host"
    cli = Cli(host)
    out = json.loads(cli.ok("pull", src.a.diff_id, "--registry", registry.url, "--json").output)
    assert out["imported"] == [src.base.diff_id, src.a.diff_id] and out["cache_hits"] == 0
    blobs_a = src.base.meta.blob_size + src.a.meta.blob_size
    assert blobs_a <= out["bytes_pulled"] < blobs_a + OVERHEAD
    # a store that has the parent fetches only the child
    out = json.loads(
        cli.ok("pull", layer_tag(src.b.diff_id), "--registry", registry.url, "--json").output
    )
    assert out["imported"] == [src.b.diff_id] and out["cache_hits"] == 1
    assert src.b.meta.blob_size <= out["bytes_pulled"] < src.b.meta.blob_size + OVERHEAD
    assert out["seconds"] > 0
    # nothing at all the second time
    for ref in (src.b.diff_id, src.b.diff_id.removeprefix("sha256:")):  # the hex alone too
        out = json.loads(cli.ok("pull", ref, "--registry", registry.url, "--json").output)
        assert out["imported"] == [] and out["cache_hits"] == 2
        assert out["bytes_pulled"] < OVERHEAD
    store = Store(host)
    got = layerstore.chain(store, src.b.diff_id)
    assert [la.diff_id for la in got] == [src.b.diff_id, src.base.diff_id]
    for la, orig in zip(got, (src.b, src.base), strict=True):
        assert resident_pages(la.blob) == 0  # fetched, extracted once, kept: not cached
        assert la.meta.blob_digest == orig.meta.blob_digest
        assert la.meta.kind == orig.meta.kind and la.meta.message == orig.meta.message
        assert la.meta.label == orig.meta.label
    assert not any(hostcache.download_dir(store).iterdir())


def test_two_nodes_over_one_parent_ask_for_the_parent_once(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """A client keeps the manifests and small blobs it fetched and checked, by digest: a
    pull of two nodes over one parent asks for the parent's manifest and layer.json once.
    A tag is asked each time (it may move); content fetched by digest is never stale."""
    for layer in (src.a, src.b):
        Cli(src.store.root).ok("push", layer.short, "--registry", registry.url)
    store = empty_store(tmp_path / "host")
    with Registry(registry.url) as reg:
        hostcache.pull_nodes(store, reg, [layer_tag(src.a.diff_id), layer_tag(src.b.diff_id)])
        # two tops by tag, each with its layer.json; the parent node and its layer.json once
        assert reg.counters.requests == 2 * 2 + 2 + 3, reg.counters  # + the three blobs
        before = reg.counters.requests
        top, digest = reg.get_manifest(REPO, layer_tag(src.a.diff_id))
        assert reg.counters.requests == before + 1  # by tag: asked again
        assert reg.get_manifest(REPO, digest) == (top, digest)
        assert reg.counters.requests == before + 1  # by digest: known
    assert held(store) == {src.base.diff_id, src.a.diff_id, src.b.diff_id}


def test_a_cut_transfer_resumes_from_its_partial_file(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.base.short)
    store = empty_store(tmp_path / "host")
    size = src.base.meta.blob_size
    cut = 400_000
    # the connection is cut 400 kB into the answer; no retry: one line, the partial file kept
    with (
        Proxy(registry.url, cut_after=cut, cuts=1) as p,
        Registry(p.url, retries=0) as reg,
        pytest.raises(ToolFailed, match=r"broke after .* pull again to resume") as exc,
    ):
        hostcache.pull_node(store, reg, src.base.diff_id)
    assert "\n" not in exc.value.message
    assert held(store) == set()
    (partial,) = hostcache.download_dir(store).glob("*.partial")
    have = partial.stat().st_size
    assert cut - OVERHEAD < have <= cut
    # the next pull asks for the rest only (Range), and checks the whole file's sha256
    with Proxy(registry.url) as p, Registry(p.url) as reg:
        report = hostcache.pull_node(store, reg, src.base.diff_id)
    assert f"range: bytes={have}-".encode() in p.requests.lower()
    assert report.bytes_resumed == have
    assert size - have <= report.bytes_pulled < size - have + OVERHEAD
    assert p.down < size - have + OVERHEAD  # on the wire, too
    assert held(store) == {src.base.diff_id}
    assert not partial.exists()


def test_a_cut_transfer_is_retried_within_one_pull(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short)
    store = empty_store(tmp_path / "host")
    blobs = src.base.meta.blob_size + src.a.meta.blob_size
    with Proxy(registry.url, cut_after=700_000, cuts=2) as p, Registry(p.url, backoff=0.01) as reg:
        report = hostcache.pull_node(store, reg, src.a.diff_id)
    assert report.bytes_resumed > 0
    assert p.requests.lower().count(b"range: bytes=") == 2
    assert blobs <= p.down < blobs + OVERHEAD  # every byte sent once
    assert held(store) == {src.base.diff_id, src.a.diff_id}


def test_a_resume_answered_with_the_whole_blob_rebuilds_from_the_file(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """A pull extracts each blob while it arrives. The base's transfer is cut 700 kB in; the
    retry asks the rest (Range) but gets the whole blob again (200: the proxy drops the
    header): the file starts over beneath the extraction, which is thrown away and done again
    from the complete, verified file. The layers are the pushed ones."""
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short)
    store = empty_store(tmp_path / "host")
    blobs = src.base.meta.blob_size + src.a.meta.blob_size
    with (
        Proxy(registry.url, cut_after=700_000, cuts=1, unrange=1) as p,
        Registry(p.url, backoff=0.5) as reg,
    ):
        report = hostcache.pull_node(store, reg, src.a.diff_id)
    assert p.unrange == 0 and report.bytes_resumed == 0  # it did start over
    assert blobs + 600_000 < p.down < blobs + 700_000 + OVERHEAD
    assert report.rebuilt == 1, report
    assert held(store) == {src.base.diff_id, src.a.diff_id}
    for la in (src.base, src.a):
        got = layerstore.get(store, la.diff_id)
        assert got.meta.blob_digest == la.meta.blob_digest
        assert layerstore.blob_path(store, got).stat().st_size == la.meta.blob_size
    assert list(hostcache.download_dir(store).iterdir()) == []


def test_a_busy_registry_is_asked_again_after_its_retry_after(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.base.short)
    store = empty_store(tmp_path / "host")
    blob = f"/blobs/{src.base.meta.blob_digest}".encode()
    # the blob's GET answered 503 twice: the pull waits the asked second each time, then gets it
    with Proxy(registry.url, busy_on=blob, busy=2) as p, Registry(p.url, backoff=0.01) as reg:
        t0 = time.monotonic()
        hostcache.pull_node(store, reg, src.base.diff_id)
        waited = time.monotonic() - t0
        assert reg.counters.retried == 2 and p.busy == 0
    assert waited >= 2.0
    assert held(store) == {src.base.diff_id}
    # busier than the retries: one line with the registry's own answer, nothing imported
    store2 = empty_store(tmp_path / "host2")
    with (
        Proxy(registry.url, busy_on=blob, busy=9) as p,
        Registry(p.url, retries=1, backoff=0.01) as reg,
        pytest.raises(ToolFailed, match=r"HTTP 503") as exc,
    ):
        hostcache.pull_node(store2, reg, src.base.diff_id)
    assert "\n" not in exc.value.message and p.busy == 7
    assert held(store2) == set()


def _manifest_link(registry: server_mod.Server, repo: str, digest: str) -> Path:
    hexpart = digest.removeprefix("sha256:")
    return (
        registry.data
        / f"docker/registry/v2/repositories/{repo}/_manifests/revisions/sha256/{hexpart}/link"
    )


def test_a_read_racing_a_rewrite_is_retried_and_a_same_push_writes_nothing(
    src: Src, registry: server_mod.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distribution rewrites a manifest's files in place, so a GET racing a PUT of the same
    manifest reads an empty link and answers 500 (distribution issue #4489; two deploys of
    one system at once hit it in CI). Here the empty link is made by hand, the real registry
    answers the real 500, and the file is back before the client's second attempt."""
    with Registry(registry.url) as reg:
        report = hostcache.push_layers(src.store, reg, src.base.short)
    digest = report.nodes[0]["manifest"]
    link = _manifest_link(registry, REPO, digest)
    saved = link.read_bytes()
    assert saved.startswith(b"sha256:")
    link.write_bytes(b"")  # what a concurrent PUT leaves for a moment
    with Registry(registry.url, retries=0) as reg, pytest.raises(ToolFailed) as exc:
        reg.get_manifest(REPO, digest)
    assert "HTTP 500" in exc.value.message and "\n" not in exc.value.message
    answers: list[int | None] = []
    pause = Registry._pause

    def restoring(self: Registry, attempt: int, resp: httpx.Response | None = None) -> None:
        answers.append(None if resp is None else resp.status_code)
        link.write_bytes(saved)  # the concurrent PUT finished
        pause(self, attempt, resp)

    monkeypatch.setattr(Registry, "_pause", restoring)
    with Registry(registry.url) as reg:
        _, got = reg.get_manifest(REPO, digest)
        assert got == digest and reg.counters.retried == 1
    assert answers == [500]
    # pushing the same chain again writes no manifest: its tags already name these bytes
    log_before = registry.log.read_text()
    inode = link.stat().st_ino, link.stat().st_mtime_ns
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.base.short)
    new_log = registry.log.read_text()[len(log_before) :]
    assert "http.request.method=HEAD" in new_log
    assert not re.search(r"method=PUT[^\n]*/manifests/", new_log), new_log[-2000:]
    assert (link.stat().st_ino, link.stat().st_mtime_ns) == inode


def test_a_tampered_blob_is_refused_nothing_imported(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short)
    flip_byte(registry.blob_file(src.a.meta.blob_digest), 1000)
    cli = Cli(tmp_path / "host")
    res = cli.fails("pull", src.a.diff_id, "--registry", registry.url, code=5)
    assert (
        f"blob {src.a.meta.blob_digest}" in res.output and "refused, nothing imported" in res.output
    )
    store = Store(tmp_path / "host")
    assert held(store) == set()  # not even the base, whose blob was fine
    downloads = hostcache.download_dir(store)
    assert not list(downloads.glob("*.partial"))
    # the base's blob arrived whole and checked: the next pull of the base uses it
    assert [p.name for p in downloads.iterdir()] == [src.base.meta.blob_digest[7:] + ".blob"]
    stale = downloads / ("0" * 64 + ".blob.partial")  # a pull never retried, 8 days ago
    stale.write_bytes(b"x")
    os.utime(stale, (stale.stat().st_atime, stale.stat().st_mtime - 8 * 86400))
    out = json.loads(cli.ok("pull", src.base.diff_id, "--registry", registry.url, "--json").output)
    assert out["imported"] == [src.base.diff_id] and out["bytes_pulled"] < OVERHEAD
    assert held(store) == {src.base.diff_id}
    assert not any(downloads.iterdir())  # used, and the stale one swept


def test_a_truncated_blob_in_the_registry_is_refused(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.b.short)
    stored = registry.blob_file(src.b.meta.blob_digest)
    os.truncate(stored, 1000)
    cli = Cli(tmp_path / "host")
    res = cli.fails("pull", src.b.diff_id, "--registry", registry.url, code=5)
    assert "serves blob" in res.output and "refused, nothing imported" in res.output
    assert held(Store(tmp_path / "host")) == set()


def test_a_node_naming_a_missing_parent_fetches_nothing(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        report = hostcache.push_layers(src.store, reg, src.a.short)
        base_node = report.nodes[0]["manifest"]
        resp = reg._http.delete(f"/v2/{REPO}/manifests/{base_node}")  # deletes are enabled
        assert resp.status_code == 202
    store = empty_store(tmp_path / "host")
    with Registry(registry.url) as reg:
        with pytest.raises(NotFound, match=r"names parent node .* lacks; nothing was pulled"):
            hostcache.pull_node(store, reg, src.a.diff_id)
        assert reg.counters.bytes_down < OVERHEAD  # manifests and a config, no layer blob
    assert held(store) == set()
    cli = Cli(tmp_path / "host")
    cli.fails("pull", src.a.diff_id, "--registry", registry.url, code=3)


def test_registry_down_is_one_line(src: Src, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cli = Cli(tmp_path / "host")
    res = cli.fails("pull", src.a.diff_id, "--registry", url, code=5)
    assert f"registry {url} does not answer" in res.output and "registry serve" in res.output
    res = Cli(src.store.root).fails("push", src.a.short, "--registry", url, code=5)
    assert f"registry {url} does not answer" in res.output
    res = cli.fails("pull", "x", "--registry", "ftp://127.0.0.1/x", code=2)
    assert "http(s)://HOST[:PORT]" in res.output


# -- a standard client ---------------------------------------------------------------------------
def _get(url: str, accept: str = "*/*") -> tuple[bytes, str]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), resp.headers.get("Content-Type", "")


def test_a_standard_client_lists_and_fetches_with_plain_http(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """What docs/oci.md shows with curl, done with urllib, zstd and tar: no unionimg code."""
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short)
    base = registry.url + "/v2"
    catalog = json.loads(_get(f"{base}/_catalog")[0])
    assert catalog == {"repositories": [REPO]}
    tags = json.loads(_get(f"{base}/{REPO}/tags/list")[0])["tags"]
    tag = "layer-" + src.a.hex
    assert tag in tags
    body, ctype = _get(f"{base}/{REPO}/manifests/{tag}", MEDIA_MANIFEST)
    assert ctype == MEDIA_MANIFEST
    manifest = json.loads(body)
    assert manifest["artifactType"] == ARTIFACT_LAYER
    assert manifest["config"]["mediaType"] == MEDIA_LAYER_META
    assert [x["mediaType"] for x in manifest["layers"]] == [MEDIA_LAYER, MEDIA_LAYER]
    assert manifest["annotations"]["org.opencontainers.image.title"] == "instance va: layer A"
    parent = manifest["annotations"]["org.unionimg.parent"]
    # the parent node, fetched by digest, is the base's
    pbody, _ = _get(f"{base}/{REPO}/manifests/{parent}", MEDIA_MANIFEST)
    assert "sha256:" + hashlib.sha256(pbody).hexdigest() == parent
    assert json.loads(pbody)["layers"] == manifest["layers"][:1]
    config = json.loads(_get(f"{base}/{REPO}/blobs/{manifest['config']['digest']}")[0])
    assert config["diff_id"] == src.a.diff_id and config["parent"] == src.base.diff_id
    # the top layer's blob: its digest, then zstd and tar read it
    top = manifest["layers"][-1]
    blob, _ = _get(f"{base}/{REPO}/blobs/{top['digest']}")
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == top["digest"]
    (tmp_path / "a.tar.zst").write_bytes(blob)
    run(["zstd", "-d", "-q", str(tmp_path / "a.tar.zst"), "-o", str(tmp_path / "a.tar")])
    tar_bytes = (tmp_path / "a.tar").read_bytes()
    assert (
        "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
        == top["annotations"]["org.unionimg.diff_id"]
    )
    names = run(["tar", "-tf", str(tmp_path / "a.tar")]).stdout.split()
    assert "etc/a.conf" in names and "srv/a.bin" in names
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert tf.getmember("srv/a.bin").size == 600_000


# -- unionimg registry serve -----------------------------------------------------------------
def test_registry_serve_foreground_background_and_taken_address(src: Src, tmp_path: Path) -> None:
    del src
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [UNIONIMG, "registry", "serve", "--dir", str(tmp_path / "r1"), "--listen", addr],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"registry http://{addr} serving"), line
        pid = int((tmp_path / "r1" / "registry.pid").read_text())
        conf = (tmp_path / "r1" / "config.yml").read_text()
        assert (tmp_path / "r1" / "config.yml").stat().st_mode & 0o777 == 0o600  # its secret
        assert f'addr: "{addr}"' in conf and "enabled: true" in conf and "\nauth:" not in conf
        with Registry(f"http://{addr}") as reg:
            reg.ping()
        # the address is taken: one line, exit 4
        taken = subprocess.run(
            [UNIONIMG, "registry", "serve", "--dir", str(tmp_path / "r2"), "--listen", addr],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert taken.returncode == 4
        assert taken.stderr.strip().splitlines() == [
            f"unionimg: error: address {addr} is taken by another program; choose another "
            "--listen (or stop the program that listens there)"
        ]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out.strip() == f"registry http://{addr} stopped"
        assert poll.until(lambda: not _alive(pid), 10, 0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = server_mod.attach(tmp_path / "r1")  # the registry of a killed 'serve'
        if left is not None:
            left.stop()
    # in the background, then stopped
    addr = f"127.0.0.1:{free_port()}"
    try:
        res = subprocess.run(
            [UNIONIMG, "registry", "serve", "--dir", str(tmp_path / "r3"), "--listen", addr,
             "--background"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        srv = server_mod.attach(tmp_path / "r3")
        assert srv is not None and srv.running()
        with Registry(f"http://{addr}") as reg:
            reg.ping()
        res = subprocess.run(
            [UNIONIMG, "registry", "stop", "--dir", str(tmp_path / "r3")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert poll.until(lambda: not _alive(srv.pid), 10, 0.05)
        res = subprocess.run(
            [UNIONIMG, "registry", "stop", "--dir", str(tmp_path / "r3")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 3 and res.stderr.count("\n") == 1
    finally:
        left = server_mod.attach(tmp_path / "r3")
        if left is not None:
            left.stop()


def test_registry_binary_missing_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [UNIONIMG, "registry", "serve", "--dir", str(tmp_path / "r"), "--listen",
         "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PATH": str(Path(UNIONIMG).parent)},
    )  # fmt: skip
    assert res.returncode == 6
    assert res.stderr.strip().splitlines() == [
        "unionimg: error: program 'docker-registry' not found; install Debian's "
        "docker-registry package (scripts/setup.sh installs it)"
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of a finished Popen counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def test_a_second_pull_into_one_store_at_once_is_a_conflict(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.base.short)
    store = empty_store(tmp_path / "host")
    with store.lock(hostcache.PULL_LOCK, purpose="another pull"):
        res = Cli(store.root).fails("pull", src.base.diff_id, "--registry", registry.url, code=4)
    assert "another pull" in res.output
    assert held(store) == set()


def test_a_registry_inside_a_network_namespace(src: Src, tmp_path: Path) -> None:
    """The argv prefix: the registry listens on the namespace's loopback only."""
    del src
    need_programs("ip")
    ns = f"uimgreg{os.getpid() % 100000}"
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        port = free_port()
        srv = server_mod.start(
            tmp_path / "registry", f"127.0.0.1:{port}", prefix=("ip", "netns", "exec", ns)
        )
        try:
            inside = run(
                ["ip", "netns", "exec", ns, str(Path(UNIONIMG).parent / "python"), "-c",
                 "import urllib.request as u; "
                 f"print(u.urlopen('http://127.0.0.1:{port}/v2/_catalog').read().decode())"],
            ).stdout  # fmt: skip
            assert json.loads(inside) == {"repositories": []}
            with (
                Registry(f"http://127.0.0.1:{port}", retries=0) as reg,  # not out here
                pytest.raises(ToolFailed, match="does not answer"),
            ):
                reg.ping()
        finally:
            srv.stop()
        assert not srv.running()
    finally:
        run(["ip", "netns", "delete", ns])


def test_a_store_too_small_for_the_pull_fetches_nothing(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.base.short)
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(small)])
    try:
        store = empty_store(small / "host")
        res = Cli(store.root).fails("pull", src.base.diff_id, "--registry", registry.url, code=7)
        assert "store full" in res.output and "pull 1 layer(s)" in res.output
        assert held(store) == set()
        assert not hostcache.download_dir(store).exists() or not any(
            hostcache.download_dir(store).iterdir()
        )
    finally:
        run(["umount", str(small)])


def test_a_tampered_parent_manifest_is_refused(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """A parent node is fetched by its digest: bytes changed in the registry's storage are
    refused before any blob is fetched."""
    with Registry(registry.url) as reg:
        report = hostcache.push_layers(src.store, reg, src.a.short)
    stored = registry.blob_file(report.nodes[0]["manifest"])
    stored.write_bytes(stored.read_bytes().replace(b"test base", b"evil base"))
    store = empty_store(tmp_path / "host")
    res = Cli(store.root).fails("pull", src.a.diff_id, "--registry", registry.url, code=5)
    assert f"manifest {REPO}@{report.nodes[0]['manifest']}" in res.output
    assert "tampered" in res.output
    assert held(store) == set()
    assert not hostcache.download_dir(store).exists()


# -- several nodes at once (a system's VMs): every blob checked before the first import --------
def test_pulling_two_nodes_imports_nothing_when_a_blob_of_the_second_is_tampered(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """``hostcache.pull_nodes`` (what a deploy's host runs for a system's VMs): nodes A and B
    over one base, B's blob altered in the registry's storage. Nothing is imported — not the
    base nor A, whose blobs arrived checked (before, A's chain was imported first); those
    wait in downloads/. The blob repaired, the next pull fetches only B's and imports all
    three; its seconds split into fetching and importing."""
    with Registry(registry.url) as reg:
        hostcache.push_layers(src.store, reg, src.a.short)
        hostcache.push_layers(src.store, reg, src.b.short)
    stored = registry.blob_file(src.b.meta.blob_digest)
    saved = stored.read_bytes()
    flip_byte(stored, 1000)
    store = empty_store(tmp_path / "host")
    refs = [layer_tag(src.a.diff_id), layer_tag(src.b.diff_id)]
    with Registry(registry.url) as reg, pytest.raises(ToolFailed, match="nothing imported"):
        hostcache.pull_nodes(store, reg, refs)
    assert held(store) == set()
    downloads = hostcache.download_dir(store)
    assert sorted(p.name for p in downloads.iterdir()) == sorted(
        la.meta.blob_digest[7:] + ".blob" for la in (src.base, src.a)
    )
    stored.write_bytes(saved)
    with Registry(registry.url) as reg:
        report = hostcache.pull_nodes(store, reg, refs)
    assert report.imported == [src.base.diff_id, src.a.diff_id, src.b.diff_id]
    size = src.b.meta.blob_size
    assert size <= report.bytes_pulled < size + OVERHEAD  # the base's and A's blobs not again
    assert held(store) == {src.base.diff_id, src.a.diff_id, src.b.diff_id}
    assert not any(downloads.iterdir())
    assert report.fetch_seconds > 0 and report.import_seconds > 0
    assert report.fetch_seconds + report.import_seconds <= report.seconds
    out = json.loads(json.dumps(report.to_json()))
    assert abs(out["fetch_seconds"] + out["import_seconds"] - out["seconds"]) < 0.01, out


def test_an_import_that_fails_removes_the_layers_imported_before_it(
    src: Src, registry: server_mod.Server, tmp_path: Path
) -> None:
    """A node whose blobs are right but whose layer.json names another parent than the
    layer below it: the base imports, A's import is refused, and the base is removed again
    (the store holds what it held); both verified blobs stay for the next pull."""
    from unionimg.registry.manifests import layer_blob, layer_manifest
    from unionimg.store.records import LayerMeta

    with Registry(registry.url) as reg:
        report = hostcache.push_layers(src.store, reg, src.a.short)
        meta = json.loads((src.a.dir / LayerMeta.FILE).read_bytes())
        meta["parent"] = None
        bad = json.dumps(meta).encode()
        reg.push_bytes(REPO, bad)
        chain = [layer_blob(la.meta.blob_digest, la.meta.blob_size, la.diff_id)
                 for la in (src.base, src.a)]  # fmt: skip
        manifest = layer_manifest(
            bad, chain, title="bad", parent=report.nodes[0]["manifest"], created="2026-12-02"
        )
        reg.put_manifest(REPO, "bad-parent", manifest)
    store = empty_store(tmp_path / "host")
    with Registry(registry.url) as reg, pytest.raises(ToolFailed, match="names parent none"):
        hostcache.pull_node(store, reg, "bad-parent")
    assert held(store) == set()
    assert len(list(hostcache.download_dir(store).iterdir())) == 2
