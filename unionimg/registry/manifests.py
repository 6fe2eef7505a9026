"""unionimg's OCI manifests: image-tree nodes and system nodes (pure: bytes in, bytes out).

Everything unionimg stores in a registry is an OCI image manifest (image-spec v1.1) whose
``artifactType`` says what it is; ``docs/oci.md`` is the reference for people and other tools.

An **image-tree node** (one layer and its ancestry), ``artifactType`` :data:`ARTIFACT_LAYER`:
    config       the layer's ``layer.json`` (a LayerMeta record), :data:`MEDIA_LAYER_META`
    layers       the chain's blobs, bottom (the base) to top (this layer), each a zstd-compressed
                 canonical layer tar, media type :data:`MEDIA_LAYER`, annotated with its
                 uncompressed digest (:data:`ANN_DIFF_ID`: a host's cache is keyed by it, so it
                 knows what it holds before fetching anything)
    annotations  ``org.opencontainers.image.title`` (what the node is), ``...created``,
                 :data:`ANN_PARENT`: the parent node's manifest digest (absent on a root)
A **system node**, ``artifactType`` :data:`ARTIFACT_SYSTEM`:
    config       the system JSON (its VMs: top layer, MAC, hypervisor, resources),
                 media type :data:`MEDIA_SYSTEM_CONFIG`
    layers       every distinct layer blob the system's VMs need (bottom-up, each once)
    annotations  title, created, :data:`ANN_PARENT`: the parent system node's manifest digest

Manifests are serialised canonically (sorted keys, no spaces) so the same node gives the same
manifest digest on every host. :func:`parse_manifest` is the one reader of manifests that came
from a registry: it refuses anything but a well-formed unionimg manifest (the registry is a
remote party; a host never trusts what it has not checked).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from unionimg.errors import ToolFailed, UsageError

MEDIA_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_LAYER: Final = "application/vnd.unionimg.layer.v1"
ARTIFACT_SYSTEM: Final = "application/vnd.unionimg.system.v1"
MEDIA_LAYER: Final = "application/vnd.unionimg.layer.v1.tar+zstd"
MEDIA_LAYER_META: Final = "application/vnd.unionimg.layer.config.v1+json"
MEDIA_SYSTEM_CONFIG: Final = "application/vnd.unionimg.system.config.v1+json"

ANN_TITLE: Final = "org.opencontainers.image.title"
ANN_CREATED: Final = "org.opencontainers.image.created"
ANN_PARENT: Final = "org.unionimg.parent"
ANN_DIFF_ID: Final = "org.unionimg.diff_id"

CONFIG_TYPES: Final = {ARTIFACT_LAYER: MEDIA_LAYER_META, ARTIFACT_SYSTEM: MEDIA_SYSTEM_CONFIG}

MAX_MANIFEST: Final = 4 << 20
"""A manifest larger than this is refused before it is parsed (distribution's own limit)."""
MAX_LAYERS: Final = 4096

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# distribution's reference grammar: path components of lowercase alphanumerics and separators
_REPO = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

LAYER_REPO: Final = "unionimg/layers"
"""Where ``push LAYER`` puts image-tree nodes unless ``--repo`` says otherwise."""
SYSTEM_REPO: Final = "unionimg/systems"
"""Where system nodes go unless told otherwise (tag = the system node's name)."""


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: str) -> bool:
    """Whether ``value`` is ``sha256:`` and 64 lowercase hex digits."""
    return _DIGEST.fullmatch(value) is not None


def check_digest(value: str, what: str = "digest") -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise UsageError(f"{what} {value!r} is not a sha256 digest (sha256: and 64 hex digits)")
    return value


def check_repo(value: str) -> str:
    if len(value) > 255 or not _REPO.fullmatch(value):
        raise UsageError(
            f"repository name {value!r} is not valid: lowercase letters, digits, '.', '_', "
            "'-' and '/' between components (e.g. unionimg/layers)"
        )
    return value


def check_tag(value: str) -> str:
    if not _TAG.fullmatch(value):
        raise UsageError(
            f"tag {value!r} is not valid: up to 128 letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-')"
        )
    return value


def layer_tag(diff_id: str) -> str:
    """The tag of the image-tree node whose top layer is ``diff_id``: ``layer-<64 hex>``."""
    return "layer-" + check_digest(diff_id, "diff_id").removeprefix("sha256:")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says of one blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def descriptor_of(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type, digest_of(data), len(data))


def layer_blob(blob_digest: str, size: int, diff_id: str) -> Descriptor:
    """The descriptor of one layer blob in a node's ``layers``."""
    check_digest(blob_digest, "blob digest")
    check_digest(diff_id, "diff_id")
    return Descriptor(MEDIA_LAYER, blob_digest, size, {ANN_DIFF_ID: diff_id})


def _serialise(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _manifest(
    artifact_type: str,
    config: bytes,
    blobs: Sequence[Descriptor],
    title: str,
    parent: str | None,
    created: str,
) -> bytes:
    annotations = {ANN_TITLE: title, ANN_CREATED: created}
    if parent is not None:
        annotations[ANN_PARENT] = check_digest(parent, "parent manifest digest")
    return _serialise(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor_of(CONFIG_TYPES[artifact_type], config).to_json(),
            "layers": [b.to_json() for b in blobs],
            "annotations": annotations,
        }
    )


def layer_manifest(
    meta: bytes, chain: Sequence[Descriptor], *, title: str, parent: str | None, created: str
) -> bytes:
    """An image-tree node: ``meta`` = the top layer's layer.json bytes, ``chain`` = the layer
    blobs bottom to top (the last one is this node's own layer), ``parent`` = the parent
    node's manifest digest (None for a root)."""
    if not chain:
        raise ValueError("an image-tree node has at least its own layer")
    return _manifest(ARTIFACT_LAYER, meta, chain, title, parent, created)


def system_manifest(
    system: bytes, blobs: Sequence[Descriptor], *, title: str, parent: str | None, created: str
) -> bytes:
    """A system node: ``system`` = the system JSON bytes, ``blobs`` = every distinct layer blob
    its VMs need (duplicates are dropped, first place kept)."""
    distinct = list({b.digest: b for b in blobs}.values())
    return _manifest(ARTIFACT_SYSTEM, system, distinct, title, parent, created)


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked unionimg manifest."""

    digest: str
    artifact_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]

    @property
    def parent(self) -> str | None:
        return self.annotations.get(ANN_PARENT)

    @property
    def title(self) -> str:
        return self.annotations.get(ANN_TITLE, "")

    def diff_ids(self) -> tuple[str, ...]:
        return tuple(d.annotations[ANN_DIFF_ID] for d in self.layers)


def _refuse(where: str, why: str) -> ToolFailed:
    return ToolFailed(
        f"manifest {where} from the registry refused: {why}; it is not a unionimg "
        "manifest or was damaged (push it again)"
    )


def _descriptor(obj: object, where: str, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise _refuse(where, f"{what} is not an object")
    media, dig, size, ann = (
        obj.get("mediaType"),
        obj.get("digest"),
        obj.get("size"),
        obj.get("annotations", {}),
    )
    if not isinstance(media, str) or not media or len(media) > 255:
        raise _refuse(where, f"{what} has no media type")
    if not isinstance(dig, str) or not _DIGEST.fullmatch(dig):
        raise _refuse(where, f"{what} has no sha256 digest")
    if type(size) is not int or size < 0 or size > 1 << 50:
        raise _refuse(where, f"{what} has no valid size")
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise _refuse(where, f"{what} has annotations that are not strings")
    return Descriptor(media, dig, size, dict(ann))


def parse_manifest(data: bytes, *, where: str, expect: str | None = None) -> Manifest:
    """Check and read one manifest fetched as ``where`` (``repo@digest``, for messages).
    ``expect`` = the artifact type the caller needs (None: either of unionimg's)."""
    if len(data) > MAX_MANIFEST:
        raise _refuse(where, f"{len(data)} bytes, more than {MAX_MANIFEST}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _refuse(where, "not JSON") from None
    if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
        raise _refuse(where, "no schemaVersion 2 object")
    if obj.get("mediaType", MEDIA_MANIFEST) != MEDIA_MANIFEST:
        raise _refuse(where, f"media type {str(obj.get('mediaType'))[:80]!r}")
    artifact = obj.get("artifactType")
    if artifact not in CONFIG_TYPES or (expect is not None and artifact != expect):
        raise _refuse(
            where, f"artifactType {str(artifact)[:80]!r}, expected {expect or 'a unionimg type'}"
        )
    config = _descriptor(obj.get("config"), where, "config")
    if config.media_type != CONFIG_TYPES[artifact]:
        raise _refuse(where, f"config media type {config.media_type[:80]!r}")
    layers_obj = obj.get("layers")
    if not isinstance(layers_obj, list) or not layers_obj or len(layers_obj) > MAX_LAYERS:
        raise _refuse(where, "no layers")
    layers = tuple(_descriptor(x, where, f"layer {i}") for i, x in enumerate(layers_obj))
    for i, d in enumerate(layers):
        if d.media_type != MEDIA_LAYER:
            raise _refuse(where, f"layer {i} has media type {d.media_type[:80]!r}")
        if not _DIGEST.fullmatch(d.annotations.get(ANN_DIFF_ID, "")):
            raise _refuse(where, f"layer {i} has no {ANN_DIFF_ID} annotation")
    ann = obj.get("annotations", {})
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise _refuse(where, "annotations are not strings")
    parent = ann.get(ANN_PARENT)
    if parent is not None and not _DIGEST.fullmatch(parent):
        raise _refuse(where, f"{ANN_PARENT} is not a sha256 digest")
    return Manifest(digest_of(data), artifact, config, layers, dict(ann))
