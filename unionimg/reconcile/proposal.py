"""``resolve VM PATH --take proposal``: a structured conflict's proposal, applied.

A user-database conflict (:mod:`unionimg.reconcile.userdb`) sets aside ``proposal`` (the whole
file with the VM's colliding entries renumbered) and ``proposal-owners`` (the VM's files whose
owner that renumbering changes, an :class:`~unionimg.store.records.OwnerChanges` record).
``resolve`` writes ``proposal`` like a merged file, then :func:`apply_owner_changes` chowns
each listed file of the upper layer: without following a symlink beneath U (``fsops``), and
only where the owner is still the old one (a file changed since keeps its owner and is
counted as skipped). Files of the base are never touched: an ID the VM's entry gives up is
the base's user's from then on, which is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from unionimg.fs import fsops
from unionimg.store.layout import read_record
from unionimg.store.reconcile_records import OwnerChanges

__all__ = ["PROPOSAL", "PROPOSAL_OWNERS", "Chowned", "apply_owner_changes"]

PROPOSAL = "proposal"
PROPOSAL_OWNERS = OwnerChanges.FILE


@dataclass(frozen=True, slots=True)
class Chowned:
    changed: int
    skipped: int  # gone, or its owner no longer the old one

    def describe(self) -> str:
        skipped = f", {self.skipped} skipped (changed since)" if self.skipped else ""
        return f"{self.changed} file(s) chowned{skipped}"


def apply_owner_changes(upper: Path, aside: Path) -> Chowned:
    """Apply the conflict's ``proposal-owners`` (in ``aside``) to the upper tree ``upper``."""
    source = aside / PROPOSAL_OWNERS
    if not source.is_file():
        return Chowned(0, 0)
    changed = skipped = 0
    for change in read_record(source, OwnerChanges).items:
        entry = fsops.entry_at(upper, change.path)
        current = None if entry is None else (entry.uid if change.which == "uid" else entry.gid)
        if entry is None or current != change.old or entry.kind == "whiteout":
            skipped += 1
            continue
        if change.which == "uid":
            fsops.set_meta(upper, change.path, replace(entry, uid=change.new))
        else:
            fsops.set_meta(upper, change.path, replace(entry, gid=change.new))
        changed += 1
    return Chowned(changed, skipped)
