"""Operations that need several layers at once, so no single layer may hold them.

- which instances pin which base generations (instances on top of bases): ``base gc`` and
  ``base remove`` must not take a generation or a base from under an instance, nor ``base
  gc`` one that an instance's ``reconcile --undo`` (or interrupted reconcile) returns to,
  nor one a kept delta generation lies on (its chain, :func:`unionimg.layers.base.chain`);
- removing an instance: its boot pieces (libvirt domain, taps, rendered files) go first;
- ``fsck``: an instance's U image is checked only while the instance is stopped.

Above :mod:`unionimg.layers`, :mod:`unionimg.boot` and :mod:`unionimg.reconcile`; only the
CLI imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from unionimg.errors import Conflict
from unionimg.layers import ucheck
from unionimg.layers.base import delta_dependents, generations, list_bases
from unionimg.layers.instance import Instance, list_instances, load, state
from unionimg.names import check_name
from unionimg.store.layout import Store
from unionimg.store.records import JsonObject


def base_users(
    store: Store, instances: list[Instance] | None = None
) -> dict[tuple[str, int], list[str]]:
    """(base, generation) → the instances pinned to it."""
    out: dict[tuple[str, int], list[str]] = {}
    for inst in list_instances(store) if instances is None else instances:
        out.setdefault((inst.base, inst.generation), []).append(inst.name)
    return out


@dataclass(frozen=True, slots=True)
class Kept:
    """A generation ``base gc`` keeps: ``why`` (one line); ``for_reconcile``: only because
    an instance's undo record (or interrupted reconcile) needs it."""

    base: str
    generation: int
    why: str
    for_reconcile: bool


@dataclass(frozen=True, slots=True)
class GcResult:
    """What ``base gc`` removed (or, in a dry run, would remove) and what it kept, and why."""

    removed: list[tuple[str, int]] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)


def _keep_reasons(store: Store) -> dict[tuple[str, int], tuple[list[str], list[str]]]:
    """(base, generation) → why it must stay: (instances sit on it, their reconcile records
    need it: undo or an interrupted run). Instances are read before their records."""
    # deferred on purpose: the reconcile executor (planner, mergers) costs ~0.1 s to import,
    # and every base, instance and mount command imports this module
    from unionimg.reconcile.apply import generations_kept

    out: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
    instances = list_instances(store)
    for key, names in base_users(store, instances).items():
        out.setdefault(key, ([], []))[0].append(f"used by instance(s) {', '.join(names)}")
    for inst in instances:
        for number, why in generations_kept(store, inst.name):
            reasons = out.setdefault((inst.base, number), ([], []))[1]
            if why not in reasons:
                reasons.append(why)
    return out


def gc_bases(store: Store, name: str | None = None, *, dry_run: bool = False) -> GcResult:
    """Remove generations that are not the latest of their base, that no instance sits on
    and that no instance's undo record (or interrupted reconcile) needs. ``dry_run``:
    remove nothing, say what would go."""
    result = GcResult()
    for bname in [name] if name else list_bases(store):
        with store.lock(f"base-{bname}", purpose="base gc"), store.lock("store"):
            keep = _keep_reasons(store)
            gens = generations(store, bname)
            kept = {g.number for g in gens if g is gens[-1] or (bname, g.number) in keep}
            # a kept delta generation needs every generation of its chain, down to a full one
            under = delta_dependents(store, [g for g in gens if g.number in kept])
            for g in gens:
                used, records = keep.get((bname, g.number), ([], []))
                if g is gens[-1]:
                    used = ["the latest generation", *used]
                if g.number in under:
                    above = ", ".join(str(n) for n in under[g.number])
                    used = [*used, f"delta generation(s) {above} lie on it"]
                if used or records:
                    why = "; ".join([*used, *records])
                    result.kept.append(Kept(bname, g.number, why, for_reconcile=not used))
                    continue
                if not dry_run:
                    with store.staging(f"gc-{bname}-{g.number}") as stage:
                        os.rename(g.dir, stage / "gen")
                    for cached in (store.base_dir(bname) / "deltas").glob("*.json"):
                        if str(g.number) in cached.stem.split("-"):
                            cached.unlink()  # saved deltas that involve it
                result.removed.append((bname, g.number))
    return result


def remove_base(store: Store, name: str) -> None:
    """Remove a base no instance uses (every generation, its history)."""
    check_name(name, "base")
    with store.lock(f"base-{name}", purpose="base remove"), store.lock("store"):
        generations(store, name)
        using = sorted({v for (b, _), vs in base_users(store).items() if b == name for v in vs})
        if using:
            raise Conflict(
                f"base '{name}' is used by instance(s) {', '.join(using)}; "
                "remove those instances first"
            )
        with store.staging(f"rm-{name}") as stage:
            os.rename(store.base_dir(name), stage / "base")


def _require_stopped(store: Store, name: str, before: str) -> None:
    st = state(store, name)
    if st != "stopped":
        raise Conflict(
            f"instance '{name}' is {st}; {'umount it' if st == 'mounted' else 'stop it'} {before}"
        )


def remove_instance(store: Store, name: str) -> None:
    """Remove a stopped, unmounted instance: its boot pieces, then its directory."""
    load(store, name)
    with store.lock(f"instance-{name}", wait=False, purpose="instance remove"):
        _require_stopped(store, name, "first")
        # deferred on purpose: the boot layer (drivers, Jinja2, libvirt) costs ~0.2 s to
        # import, and every base, instance and mount command imports this module
        from unionimg.boot.control import forget

        forget(store, name)
        with store.lock("store"), store.staging(f"rm-{name}") as stage:
            os.rename(store.instance_dir(name), stage / "instance")


def fsck_instance(store: Store, name: str, *, repair: bool) -> JsonObject:
    """``unionimg fsck VM [--repair]``: see :func:`unionimg.layers.ucheck.fsck`."""
    load(store, name)
    with store.lock(f"instance-{name}", wait=False, purpose=f"fsck {name}"):
        _require_stopped(store, name, "before checking its U image")
        return ucheck.fsck(store, name, repair=repair)
