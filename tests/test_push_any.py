"""``unionimg push NAME``: NAME a layer or a system node (issue 13, item 3), against a real
registry (Debian's docker-registry on 127.0.0.1) and a real store (layers made by the layer
store from trees; a system node recorded over them as ``system create`` records one).

What it shows: a layer reference pushes the layer's chain (``"kind": "layer"``); a system
node's name pushes the node as ``system push`` does (the same manifest digest, ``system push``
still works); a name that is both a layer reference and a system node is refused in one line
that names ``--layer``/``--system`` (exit 2, nothing sent), and each option pushes its kind;
an unknown name is one line naming both kinds looked for (exit 3); a forced kind that does not
fit is that kind's own error. The registry is asked afterwards what it holds (plain HTTP).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, free_port, make_tree, need_programs
from unionimg import systems
from unionimg.layers import layerstore
from unionimg.layers.layerstore import Layer, Origin
from unionimg.registry import server as server_mod
from unionimg.registry.manifests import LAYER_REPO, SYSTEM_REPO, layer_tag
from unionimg.store.fleet_records import SystemMeta, SystemVM
from unionimg.store.layout import Store, now_iso

pytestmark = pytest.mark.usefixtures("root")


@dataclass
class Src:
    cli: Cli
    store: Store
    base: Layer
    a: Layer
    b: Layer


def _node(store: Store, name: str, layer: Layer) -> None:
    """A root system node with one VM on ``layer`` (the record ``system create`` writes)."""
    vm = SystemVM("web", layer.diff_id, "52:54:00:13:0a:01", "uml", 96, 1, 64 << 20)
    meta = SystemMeta(name=name, parent=None, created=now_iso(), message="", vms=(vm,))
    systems.write_node(store, meta)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, root: None) -> Src:
    need_programs("docker-registry", "zstd")
    tmp = tmp_path_factory.mktemp("push-any")
    store = Store(tmp / "store")
    store.init()
    base, _ = layerstore.put_tree(
        store, make_tree(tmp / "base"), parent=None, kind="base",
        origin=Origin("test base", base="b", generation=1),
    )  # fmt: skip
    layers = []
    for name in ("a", "b"):
        (tmp / name / "etc").mkdir(parents=True)
        (tmp / name / "etc" / f"{name}.conf").write_text(f"{name}\n")
        layer, _ = layerstore.put_tree(
            store, tmp / name, parent=base.diff_id, kind="snapshot",
            origin=Origin(f"instance v{name}", instance=f"v{name}", message=f"layer {name}"),
        )  # fmt: skip
        layers.append(layer)
    a, b = layers
    _node(store, "lab1", a)
    _node(store, b.short, b)  # a system node whose name is also a reference to layer B
    return Src(Cli(store.root), store, base, a, b)


@pytest.fixture
def url(tmp_path: Path, src: Src) -> Iterator[str]:
    del src  # its programs were checked
    srv = server_mod.start(tmp_path / "registry", f"127.0.0.1:{free_port()}")
    try:
        yield srv.url
    finally:
        srv.stop()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def tags(url: str, repo: str) -> set[str]:
    try:
        return set(_get(f"{url}/v2/{repo}/tags/list")["tags"] or [])
    except urllib.error.HTTPError as exc:  # 404: the repository does not exist (yet)
        assert exc.code == 404, exc
        return set()


def test_push_a_layer_by_label_and_a_system_by_name(src: Src, url: str) -> None:
    out = json.loads(src.cli.ok("push", src.a.meta.label, "--registry", url, "--json").output)
    assert out["kind"] == "layer" and out["repo"] == LAYER_REPO
    assert [n["diff_id"] for n in out["nodes"]] == [src.base.diff_id, src.a.diff_id]
    assert tags(url, LAYER_REPO) == {layer_tag(src.base.diff_id), layer_tag(src.a.diff_id)}
    assert tags(url, SYSTEM_REPO) == set()

    out = json.loads(src.cli.ok("push", "lab1", "--registry", url, "--json").output)
    assert out["kind"] == "system" and out["repo"] == SYSTEM_REPO and out["system"] == "lab1"
    assert set(out["nodes"]) == {"lab1"} and out["manifest"] == out["nodes"]["lab1"]
    assert tags(url, SYSTEM_REPO) == {"lab1"}
    # ``system push`` still works and makes the very same node (nothing new to send)
    again = json.loads(src.cli.ok("system", "push", "lab1", "--registry", url, "--json").output)
    assert again["manifest"] == out["manifest"]
    assert again["bytes_sent"] < 16 << 10
    human = src.cli.ok("push", "lab1", "--registry", url).output
    assert human.startswith(f"pushed system lab1 to {url}/{SYSTEM_REPO}:lab1 as {out['manifest']}")


def test_a_name_that_is_both_is_refused_until_told_which(src: Src, url: str) -> None:
    both = src.b.short
    res = src.cli.fails("push", both, "--registry", url, code=2)
    assert f"push --system {both}" in res.output and f"push --layer {both}" in res.output
    assert f"layer {src.b.short}" in res.output
    assert _get(f"{url}/v2/_catalog")["repositories"] == []  # nothing sent

    out = json.loads(src.cli.ok("push", both, "--layer", "--registry", url, "--json").output)
    assert out["kind"] == "layer" and out["nodes"][-1]["diff_id"] == src.b.diff_id
    assert tags(url, SYSTEM_REPO) == set()
    out = json.loads(src.cli.ok("push", both, "--system", "--registry", url, "--json").output)
    assert out["kind"] == "system" and set(out["nodes"]) == {both}
    assert tags(url, SYSTEM_REPO) == {both}

    src.cli.fails("push", both, "--layer", "--system", "--registry", url, code=2)


def test_unknown_or_misforced_names_are_one_line(src: Src, url: str) -> None:
    for name in ("nosuch", "cafe0000", "sha256:" + "0" * 64):
        res = src.cli.fails("push", name, "--registry", url, code=3)
        assert f"nothing named '{name}'" in res.output, res.output
        assert "no layer" in res.output and "no system node" in res.output, res.output
    res = src.cli.fails("push", "nosuch", "--system", "--registry", url, code=3)
    assert "no system named 'nosuch'" in res.output
    res = src.cli.fails("push", "lab1", "--layer", "--registry", url, code=2)
    assert "not a layer reference" in res.output
    src.cli.fails("push", "lab1", "--registry", url, "--repo", "Bad Repo", code=2)
    assert _get(f"{url}/v2/_catalog")["repositories"] == []
