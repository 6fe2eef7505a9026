"""unionimg's OCI manifests (pure): built canonically, read back, anything else refused."""

from __future__ import annotations

import json

import pytest

from unionimg.errors import ToolFailed, UsageError
from unionimg.registry import manifests as m

D = {c: "sha256:" + c * 64 for c in "abcdef0123"}
META = json.dumps({"diff_id": D["b"], "kind": "snapshot"}).encode()


def chain() -> list[m.Descriptor]:
    return [m.layer_blob(D["1"], 100, D["a"]), m.layer_blob(D["2"], 50, D["b"])]


def node(parent: str | None = D["f"]) -> bytes:
    return m.layer_manifest(
        META, chain(), title="web after patch", parent=parent, created="2026-12-02T00:00:00Z"
    )


def test_layer_node_is_an_oci_1_1_manifest_with_our_types() -> None:
    obj = json.loads(node())
    assert obj["schemaVersion"] == 2
    assert obj["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert obj["artifactType"] == "application/vnd.unionimg.layer.v1"
    assert obj["config"] == {
        "mediaType": "application/vnd.unionimg.layer.config.v1+json",
        "digest": m.digest_of(META),
        "size": len(META),
    }
    assert [x["digest"] for x in obj["layers"]] == [D["1"], D["2"]]  # bottom to top
    assert {x["mediaType"] for x in obj["layers"]} == {"application/vnd.unionimg.layer.v1.tar+zstd"}
    assert obj["layers"][1]["annotations"] == {"org.unionimg.diff_id": D["b"]}
    assert obj["annotations"] == {
        "org.opencontainers.image.title": "web after patch",
        "org.opencontainers.image.created": "2026-12-02T00:00:00Z",
        "org.unionimg.parent": D["f"],
    }


def test_canonical_bytes_same_node_same_digest() -> None:
    assert node() == node()
    assert b" " not in node().replace(b"web after patch", b"")
    assert m.digest_of(node()) != m.digest_of(node(parent=None))
    assert "org.unionimg.parent" not in json.loads(node(parent=None))["annotations"]


def test_parse_reads_back_what_was_built() -> None:
    parsed = m.parse_manifest(node(), where="x", expect=m.ARTIFACT_LAYER)
    assert parsed.digest == m.digest_of(node())
    assert parsed.parent == D["f"]
    assert parsed.title == "web after patch"
    assert parsed.diff_ids() == (D["a"], D["b"])
    assert parsed.layers[0].size == 100
    assert parsed.config.digest == m.digest_of(META)


def test_system_node_lists_each_blob_once() -> None:
    system = json.dumps({"vms": {"mail1": {"layer": D["b"]}}}).encode()
    blobs = [*chain(), chain()[0], m.layer_blob(D["3"], 7, D["c"])]
    data = m.system_manifest(
        system, blobs, title="lab initial", parent=None, created="2026-12-02T00:00:00Z"
    )
    obj = json.loads(data)
    assert obj["artifactType"] == "application/vnd.unionimg.system.v1"
    assert obj["config"]["mediaType"] == "application/vnd.unionimg.system.config.v1+json"
    assert [x["digest"] for x in obj["layers"]] == [D["1"], D["2"], D["3"]]
    parsed = m.parse_manifest(data, where="x", expect=m.ARTIFACT_SYSTEM)
    assert parsed.parent is None
    with pytest.raises(ToolFailed, match="artifactType"):
        m.parse_manifest(data, where="x", expect=m.ARTIFACT_LAYER)


def _mutated(change: object) -> bytes:
    obj = json.loads(node())
    assert callable(change)
    change(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda o: o.update(schemaVersion=1), "schemaVersion"),
        (
            lambda o: o.update(mediaType="application/vnd.docker.distribution.manifest.v2+json"),
            "media type",
        ),
        (lambda o: o.update(artifactType="application/vnd.other"), "artifactType"),
        (lambda o: o.pop("artifactType"), "artifactType"),
        (lambda o: o["config"].update(mediaType="application/json"), "config media type"),
        (lambda o: o["config"].update(digest="sha256:XYZ"), "digest"),
        (lambda o: o["config"].update(digest="md5:" + "a" * 32), "digest"),
        (lambda o: o["config"].update(size=-1), "size"),
        (lambda o: o["config"].update(size="12"), "size"),
        (lambda o: o["config"].update(size=True), "size"),
        (lambda o: o.update(layers=[]), "no layers"),
        (lambda o: o.update(layers={}), "no layers"),
        (
            lambda o: o["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar"),
            "media type",
        ),
        (lambda o: o["layers"][1].pop("annotations"), "diff_id"),
        (lambda o: o["layers"][1]["annotations"].update({"org.unionimg.diff_id": "x"}), "diff_id"),
        (lambda o: o["layers"][0].update(annotations={"a": 1}), "strings"),
        (lambda o: o["annotations"].update({"org.unionimg.parent": "../../etc"}), "parent"),
        (lambda o: o.update(annotations=[]), "strings"),
    ],
)
def test_anything_but_a_wellformed_unionimg_manifest_is_refused(change: object, why: str) -> None:
    with pytest.raises(ToolFailed, match=why) as exc:
        m.parse_manifest(_mutated(change), where="unionimg/layers@sha256:x")
    assert "\n" not in exc.value.message


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b"\xff\xfe", b"{" * 5000])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ToolFailed):
        m.parse_manifest(data, where="x")


def test_oversized_manifest_refused_before_parsing() -> None:
    with pytest.raises(ToolFailed, match="more than"):
        m.parse_manifest(b" " * (m.MAX_MANIFEST + 1), where="x")


def test_names() -> None:
    assert m.check_repo("unionimg/layers") == "unionimg/layers"
    assert m.check_repo("a.b-c__d/e_f") == "a.b-c__d/e_f"
    for bad in ("", "Upper/x", "a//b", "/a", "a/", "a..b", "-a", "a b", "../x", "a/" * 200 + "a"):
        with pytest.raises(UsageError):
            m.check_repo(bad)
    assert m.check_tag("lab-initial_1.0") == "lab-initial_1.0"
    for bad in ("", ".x", "-x", "a/b", "a:b", "x" * 129):
        with pytest.raises(UsageError):
            m.check_tag(bad)
    assert m.layer_tag(D["a"]) == "layer-" + "a" * 64
    assert len(m.layer_tag(D["a"])) <= 128
    with pytest.raises(UsageError):
        m.layer_tag("sha256:" + "A" * 64)
