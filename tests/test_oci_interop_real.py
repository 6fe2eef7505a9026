"""What unionimg pushes, read by standard OCI tools (issue 13, item 3): ``skopeo`` (Debian's
package) and ``oras`` (oras-py, the ORAS project's Python client), against a real registry
(Debian's docker-registry with unionimg's config on 127.0.0.1), with no unionimg code
between the tool and the registry.

unionimg pushes a layer chain (base -> A -> XA) and a system node (VM web on XA, VM db on B,
B over the base) with ``unionimg push``. Then:

* ``skopeo list-tags --tls-verify=false docker://ADDR/unionimg/layers`` lists exactly the
  ``layer-<diff_id hex>`` tags of the four layers, ``.../unionimg/systems`` the node's name;
* ``skopeo inspect --raw`` of the system node and of the XA node gives the very bytes
  unionimg pushed (their sha256 is the manifest digest unionimg reported), with unionimg's
  artifactType, config and layer media types, and the parent's digest (a parent fetched by
  digest, ``@sha256:...``, too); plain ``skopeo inspect`` refuses an artifact (skopeo 1.9:
  "unsupported image-specific operation on artifact with type ...") and says so;
* ``skopeo copy`` of the system node into a local ``oci:`` layout keeps its manifest digest
  and every blob; the three nodes of the chain copied through an ``oci:`` layout into another
  repository of the registry are pulled from there by ``unionimg pull`` into an empty store
  (the copies are byte-faithful: every digest checks);
* oras-py lists the same tags, gets the same manifests, pulls the system node (every layer
  blob, saved under its digest), and downloads each layer blob of XA's chain: its sha256 is
  its digest and unionimg's layer store imports it (zstd'ed tar read by its defensive
  reader, diff_id checked) as the layer the source store holds.

Under UNIONIMG_REQUIRE_REAL=1 a missing skopeo, oras-py or docker-registry fails the test.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, free_port, make_tree, need, need_programs
from unionimg import systems
from unionimg.layers import layerstore
from unionimg.layers.layerstore import Layer, Origin
from unionimg.registry import server as server_mod
from unionimg.registry.manifests import (
    ANN_DIFF_ID,
    ANN_PARENT,
    ANN_TITLE,
    ARTIFACT_LAYER,
    ARTIFACT_SYSTEM,
    LAYER_REPO,
    MEDIA_LAYER,
    MEDIA_LAYER_META,
    MEDIA_MANIFEST,
    MEDIA_SYSTEM_CONFIG,
    SYSTEM_REPO,
    layer_tag,
)
from unionimg.store.fleet_records import SystemMeta, SystemVM
from unionimg.store.layout import Store, now_iso

try:  # a standard client, not unionimg's: checked by need() (fails under REQUIRE_REAL=1)
    oras_client: Any = importlib.import_module("oras.client")
except ImportError:
    oras_client = None

pytestmark = pytest.mark.usefixtures("root")

MIRROR = "mirror/layers"


@dataclass
class Pushed:
    cli: Cli
    addr: str  # HOST:PORT, what skopeo and oras are given
    url: str
    base: Layer
    a: Layer
    xa: Layer
    b: Layer
    nodes: dict[str, str]  # diff_id -> manifest digest of its image-tree node
    system: str  # the system node's manifest digest


def _layer(store: Store, tmp: Path, name: str, parent: Layer, size: int) -> Layer:
    tree = tmp / name
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / f"{name}.conf").write_text(f"{name}\n")
    (tree / "srv").mkdir()
    (tree / "srv" / f"{name}.bin").write_bytes(os.urandom(size))
    layer, _ = layerstore.put_tree(
        store, tree, parent=parent.diff_id, kind="snapshot",
        origin=Origin(f"instance {name}", instance=name, message=f"layer {name}"),
    )  # fmt: skip
    return layer


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Pushed]:
    need_programs("docker-registry", "skopeo", "zstd")
    need(oras_client is not None, "oras-py is not installed (.venv/bin/pip install oras)")
    tmp = tmp_path_factory.mktemp("interop")
    store = Store(tmp / "store")
    store.init()
    tree = make_tree(tmp / "base")
    (tree / "big.bin").write_bytes(os.urandom(300_000))
    base, _ = layerstore.put_tree(
        store, tree, parent=None, kind="base", origin=Origin("test base", base="b", generation=1)
    )
    a = _layer(store, tmp, "a", base, 200_000)
    xa = _layer(store, tmp, "xa", a, 50_000)
    b = _layer(store, tmp, "b", base, 100_000)
    vms = (
        SystemVM("web", xa.diff_id, "52:54:00:13:0b:01", "uml", 96, 1, 64 << 20),
        SystemVM("db", b.diff_id, "52:54:00:13:0b:02", "kvm", 128, 1, 64 << 20),
    )
    systems.write_node(store, SystemMeta("lab1", None, now_iso(), "initial", vms))
    srv = server_mod.start(tmp / "registry", f"127.0.0.1:{free_port()}")
    try:
        cli = Cli(store.root)
        chain = json.loads(cli.ok("push", xa.meta.label, "--registry", srv.url, "--json").output)
        system = json.loads(cli.ok("push", "lab1", "--registry", srv.url, "--json").output)
        assert chain["kind"] == "layer" and system["kind"] == "system"
        nodes = {n["diff_id"]: n["manifest"] for n in chain["nodes"]}
        yield Pushed(
            cli, srv.url.removeprefix("http://"), srv.url, base, a, xa, b, nodes,
            system["manifest"],
        )  # fmt: skip
    finally:
        srv.stop()


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert res.returncode == 0, f"skopeo {' '.join(args)}: {res.stderr}"
    return res


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_skopeo_lists_tags_and_inspects_raw_manifests(pushed: Pushed) -> None:
    p = pushed
    layer_tags = {layer_tag(la.diff_id) for la in (p.base, p.a, p.xa, p.b)}
    out = json.loads(
        skopeo("list-tags", "--tls-verify=false", f"docker://{p.addr}/{LAYER_REPO}").stdout
    )
    assert set(out["Tags"]) == layer_tags and out["Repository"] == f"{p.addr}/{LAYER_REPO}"
    out = json.loads(
        skopeo("list-tags", "--tls-verify=false", f"docker://{p.addr}/{SYSTEM_REPO}").stdout
    )
    assert out["Tags"] == ["lab1"]

    # the system node: the bytes unionimg pushed, unionimg's types
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{p.addr}/{SYSTEM_REPO}:lab1")
    data = raw.stdout.encode()
    assert sha256(data) == p.system
    man = json.loads(data)
    assert man["mediaType"] == MEDIA_MANIFEST and man["artifactType"] == ARTIFACT_SYSTEM
    assert man["config"]["mediaType"] == MEDIA_SYSTEM_CONFIG
    assert man["annotations"][ANN_TITLE] == "lab1" and ANN_PARENT not in man["annotations"]
    assert {d["mediaType"] for d in man["layers"]} == {MEDIA_LAYER}
    assert sorted(d["annotations"][ANN_DIFF_ID] for d in man["layers"]) == sorted(
        la.diff_id for la in (p.base, p.a, p.xa, p.b)
    )

    # an image-tree node: its whole chain bottom to top, its parent by digest
    ref = f"docker://{p.addr}/{LAYER_REPO}:{layer_tag(p.xa.diff_id)}"
    data = skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout.encode()
    assert sha256(data) == p.nodes[p.xa.diff_id]
    man = json.loads(data)
    assert man["artifactType"] == ARTIFACT_LAYER and man["config"]["mediaType"] == MEDIA_LAYER_META
    assert [d["annotations"][ANN_DIFF_ID] for d in man["layers"]] == [
        p.base.diff_id, p.a.diff_id, p.xa.diff_id,
    ]  # fmt: skip
    parent = man["annotations"][ANN_PARENT]
    assert parent == p.nodes[p.a.diff_id]
    by_digest = f"docker://{p.addr}/{LAYER_REPO}@{parent}"
    data = skopeo("inspect", "--raw", "--tls-verify=false", by_digest).stdout.encode()
    assert sha256(data) == parent

    # plain inspect reads an image's config: skopeo says an artifact is not one
    res = skopeo("inspect", "--tls-verify=false", ref, check=False)
    if res.returncode != 0:  # skopeo 1.9.3 (docs/oci.md quotes it)
        assert "unsupported image-specific operation on artifact" in res.stderr, res.stderr


def _blobs_check(layout: Path) -> dict[str, bytes]:
    """Every blob of an OCI layout, each checked against its file name."""
    out = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert sha256(data) == f"sha256:{path.name}", path
        out[f"sha256:{path.name}"] = data
    return out


def test_skopeo_copies_nodes_through_an_oci_layout(pushed: Pushed, tmp_path: Path) -> None:
    p = pushed
    layout = tmp_path / "oci-system"
    skopeo(
        "copy", "--src-tls-verify=false", f"docker://{p.addr}/{SYSTEM_REPO}:lab1",
        f"oci:{layout}:lab1",
    )  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == p.system  # the manifest copied as it is
    blobs = _blobs_check(layout)
    man = json.loads(blobs[p.system])
    assert {d["digest"] for d in man["layers"]} | {man["config"]["digest"]} <= set(blobs)

    # the chain base -> A -> XA through a layout into another repository; unionimg pulls it
    chain = tmp_path / "oci-chain"
    for la in (p.base, p.a, p.xa):
        tag = layer_tag(la.diff_id)
        skopeo(
            "copy", "--src-tls-verify=false", f"docker://{p.addr}/{LAYER_REPO}:{tag}",
            f"oci:{chain}:{tag}",
        )  # fmt: skip
        skopeo(
            "copy", "--dest-tls-verify=false", f"oci:{chain}:{tag}",
            f"docker://{p.addr}/{MIRROR}:{tag}",
        )  # fmt: skip
    _blobs_check(chain)
    empty = Cli(tmp_path / "empty-store")
    out = json.loads(
        empty.ok(
            "pull", layer_tag(p.xa.diff_id), "--registry", p.url, "--repo", MIRROR, "--json"
        ).output
    )
    assert out["manifest"] == p.nodes[p.xa.diff_id]  # the same node, byte for byte
    got = {r["diff_id"] for r in json.loads(empty.ok("layer", "list", "--json").output)}
    assert got == {p.base.diff_id, p.a.diff_id, p.xa.diff_id}


def test_oras_lists_gets_and_downloads_what_unionimg_imports(
    pushed: Pushed, tmp_path: Path
) -> None:
    p = pushed
    client = oras_client.OrasClient(hostname=p.addr, insecure=True)
    skopeo_tags = json.loads(
        skopeo("list-tags", "--tls-verify=false", f"docker://{p.addr}/{LAYER_REPO}").stdout
    )["Tags"]
    assert sorted(client.get_tags(f"{p.addr}/{LAYER_REPO}")) == sorted(skopeo_tags)
    assert client.get_tags(f"{p.addr}/{SYSTEM_REPO}") == ["lab1"]

    system = client.get_manifest(f"{p.addr}/{SYSTEM_REPO}:lab1")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{p.addr}/{SYSTEM_REPO}:lab1")
    assert system == json.loads(raw.stdout)
    assert system["artifactType"] == ARTIFACT_SYSTEM
    # oras pull of the whole system node: every layer blob, saved under its digest (no title)
    files = client.pull(target=f"{p.addr}/{SYSTEM_REPO}:lab1", outdir=str(tmp_path / "pull"))
    assert sorted(Path(f).name for f in files) == sorted(d["digest"] for d in system["layers"])
    for f in files:
        assert sha256(Path(f).read_bytes()) == Path(f).name

    node = client.get_manifest(f"{p.addr}/{LAYER_REPO}:{layer_tag(p.xa.diff_id)}")
    assert node["artifactType"] == ARTIFACT_LAYER
    cfg = client.get_blob(f"{p.addr}/{LAYER_REPO}", node["config"]["digest"])
    cfg.raise_for_status()
    assert json.loads(cfg.content)["diff_id"] == p.xa.diff_id  # the top layer's layer.json

    # each layer blob of XA's chain: downloaded by oras, imported by unionimg's layer store
    target = Store(tmp_path / "store")
    target.init()
    parent: str | None = None
    for d in node["layers"]:
        out = tmp_path / "blobs" / d["digest"].removeprefix("sha256:")
        client.download_blob(f"{p.addr}/{LAYER_REPO}", d["digest"], str(out))
        data = out.read_bytes()
        assert sha256(data) == d["digest"] and len(data) == d["size"]
        assert data[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
        diff_id = d["annotations"][ANN_DIFF_ID]
        layer, new = layerstore.import_blob(
            target, out, diff_id, parent, kind="base" if parent is None else "snapshot",
            expected_blob_digest=d["digest"],
        )  # fmt: skip
        assert new and layer.diff_id == diff_id
        parent = diff_id
    assert parent == p.xa.diff_id
    assert [la.diff_id for la in layerstore.chain(target, p.xa.diff_id)] == [
        p.xa.diff_id, p.a.diff_id, p.base.diff_id,
    ]  # fmt: skip
