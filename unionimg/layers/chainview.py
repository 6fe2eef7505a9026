"""A VM's image below its U as one lookup: its base generation's manifest with its snapshot
layers (``Instance.layers``, top to bottom) laid over it, as overlayfs lays them.

What the union shows below the VM's upper layer is its top snapshot layer's view, not the
base generation's: ``status`` compares the upper layer with it, and ``instance create``
gives a VM its own identity where that view has sshd or systemd (a layer may have
installed them over a base that has neither).

:func:`chain_lookup` mounts each snapshot layer read-only (guest data: ``nosuid,nodev,
noexec``) and scans it once, without reading file contents; a file's sha256 is read from
its layer only when a lookup returns it (:meth:`ChainView.get`), so the cost is the layers'
entries, not their bytes, and the base is never read (its manifest answers). The rules are
overlayfs's (``Documentation/filesystems/overlayfs.rst``): the topmost layer holding a path
answers; a whiteout (a 0:0 character device) hides the path below; an opaque directory, or
anything that is not a directory, hides everything below that path in lower layers.
Redirected directories (``redirect_dir``) are read as plain directories: a snapshot's tar
does not carry the redirect, so a layer never holds one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from unionimg.entries import DIR, FILE, WHITEOUT, Entry
from unionimg.fs import fsops
from unionimg.fs.manifest import scan_tree
from unionimg.store.layout import Store


class Lookup(Protocol):
    def get(self, path: str) -> Entry | None: ...


def _ancestors(path: str) -> Iterator[str]:
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        if path != "/":
            yield path


class ChainView:
    """``get(path)``: the entry the chain shows at ``path`` (None: nothing there)."""

    def __init__(self, base: Lookup, layers: Sequence[tuple[Path, dict[str, Entry]]]) -> None:
        self.base = base
        self.layers = list(layers)  # (mounted root, its entries by path), top first
        self._hashed: dict[tuple[int, str], str] = {}

    def _hidden_below(self, entries: dict[str, Entry], path: str) -> bool:
        """Whether this layer hides ``path`` in every layer under it (it has nothing at the
        path itself): an ancestor here is a whiteout, an opaque directory or no directory."""
        for a in _ancestors(path):
            e = entries.get(a)
            if e is not None and (e.kind != DIR or e.opaque):
                return True
        return False

    def get(self, path: str) -> Entry | None:
        for i, (root, entries) in enumerate(self.layers):
            e = entries.get(path)
            if e is not None:
                if e.kind == WHITEOUT:
                    return None
                if e.kind == FILE and e.sha256 is None:
                    key = (i, path)
                    if key not in self._hashed:
                        self._hashed[key] = fsops.sha256_of(root, path)
                    e = replace(e, sha256=self._hashed[key])
                return replace(e, opaque=False)
            if self._hidden_below(entries, path):
                return None
        return self.base.get(path)


@contextlib.contextmanager
def chain_lookup(
    store: Store, base: Lookup, layers: Sequence[str], where: Path | None = None
) -> Iterator[Lookup]:
    """``base`` (a generation's manifest) as it is, when ``layers`` is empty; else a
    :class:`ChainView` of ``layers`` (diff_ids, top first) over it, their images mounted
    below ``where`` (default: a staging directory of the store) while the context lasts."""
    if not layers:
        yield base
        return
    from unionimg.layers import layerstore  # the layer cache: only for VMs on layers

    with contextlib.ExitStack() as stack:
        if where is None:
            where = stack.enter_context(store.staging("chain-view"))
        scanned: list[tuple[Path, dict[str, Entry]]] = []
        for i, diff_id in enumerate(layers):
            layer = layerstore.get(store, diff_id)
            root = stack.enter_context(layerstore.mounted(store, layer, where / str(i)))
            entries = scan_tree(root, hash_files=False, digests=False)
            scanned.append((root, {e.path: e for e in entries if e.path != "/"}))
        yield ChainView(base, scanned)
