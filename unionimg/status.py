"""An instance's local changes, read from its upper directory (cost ∝ the upper layer)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import hgrepo
from .base import generations, get_generation
from .instance import Instance, load, u_layer
from .manifest import DIR, WHITEOUT, Entry, scan_tree, sidecar_text
from .store import Store


class Lookup(Protocol):
    def get(self, path: str) -> Entry | None: ...


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        return {k: sorted(v, key=os.fsencode) for k, v in self.__dict__.items()}


def classify(upper: Iterable[Entry], base: Lookup) -> Changes:
    """Sort the upper layer's entries against the base generation. Pure."""
    out = Changes()
    for e in upper:
        if e.path == "/":
            continue
        b = base.get(e.path)
        if e.kind == WHITEOUT:
            out.deleted.append(e.path)
            continue
        if e.redirect or e.metacopy:
            out.special.append(e.path)
        if e.kind == DIR:
            if e.opaque:
                out.opaque.append(e.path)
            if b is None:
                out.added.append(e.path)
            elif b.kind != DIR:
                out.modified.append(e.path)
            elif not e.same_meta(b):
                out.metadata.append(e.path)
            continue
        if e.link is not None or e.kind in ("sock", "chr", "blk", "fifo"):
            out.special.append(e.path)
        if b is None:
            out.added.append(e.path)
        elif not e.same_content(b):
            out.modified.append(e.path)
        elif not e.same_meta(b):
            out.metadata.append(e.path)
        else:
            out.identical.append(e.path)
    return out


def scan_upper(u_root: Path, *, hash_files: bool = True) -> list[Entry]:
    return scan_tree(u_root / "upper", hash_files=hash_files)


def status(store: Store, name: str) -> dict[str, Any]:
    inst = load(store, name)
    gen = get_generation(store, inst.base, inst.generation)
    latest = generations(store, inst.base)[-1].number
    with u_layer(store, name, write=False) as u, gen.manifest() as m:
        changes = classify(scan_upper(u), m)
    return {
        "name": name,
        "base": inst.base,
        "generation": inst.generation,
        "latest_generation": latest,
        "newer_generation": latest > inst.generation,
        **changes.to_json(),
    }


def commit(store: Store, name: str, message: str | None) -> str | None:
    inst = load(store, name)
    with (
        store.lock(f"instance-{name}", purpose=f"commit {name}"),
        u_layer(store, name, write=True) as u,
    ):
        return commit_u(u, inst, message)


def write_history_sidecar(u: Path, inst: Instance, entries: list[Entry] | None = None) -> None:
    """The sidecar of the upper layer (``entries``: a fresh scan of it, if the caller has
    one) and the base generation it sits on, ready to commit."""
    ref = {"instance": inst.name, "base": inst.base, "generation": inst.generation}
    hgrepo.write_sidecar(
        u,
        # the sidecar leaves content to Mercurial: no need to hash anything here
        sidecar_text(scan_upper(u, hash_files=False) if entries is None else entries),
        {"base.json": json.dumps(ref, sort_keys=True) + "\n"},
    )


def commit_u(u: Path, inst: Instance, message: str | None) -> str | None:
    """Record the upper layer (files in hg, the rest in the sidecar) as one changeset."""
    write_history_sidecar(u, inst)
    msg = message or f"local changes of {inst.name} on {inst.base} generation {inst.generation}"
    with hgrepo.open_repo(u) as repo:
        return repo.commit_all(msg)


def log(store: Store, name: str) -> list[hgrepo.Changeset]:
    load(store, name)
    with u_layer(store, name, write=False) as u, hgrepo.open_repo(u) as repo:
        return repo.log()
