"""Operations that need several layers at once, so no single layer may hold them.

- which instances pin which base generations (instances on top of bases): ``base gc`` and
  ``base remove`` must not take a generation or a base from under an instance;
- removing an instance: its boot pieces (libvirt domain, taps, rendered files) go first;
- ``fsck``: an instance's U image is checked only while the instance is stopped.

Above :mod:`unionimg.layers` and :mod:`unionimg.boot`; only the CLI imports this module.
"""

from __future__ import annotations

import os

from unionimg.boot.control import forget
from unionimg.errors import Conflict
from unionimg.layers import ucheck
from unionimg.layers.base import generations, list_bases
from unionimg.layers.instance import list_instances, load, state
from unionimg.names import check_name
from unionimg.store.layout import Store
from unionimg.store.records import JsonObject


def base_users(store: Store) -> dict[tuple[str, int], list[str]]:
    """(base, generation) → the instances pinned to it."""
    out: dict[tuple[str, int], list[str]] = {}
    for inst in list_instances(store):
        out.setdefault((inst.base, inst.generation), []).append(inst.name)
    return out


def gc_bases(store: Store, name: str | None = None) -> list[tuple[str, int]]:
    """Remove generations that are not the latest of their base and no instance uses."""
    removed = []
    for bname in [name] if name else list_bases(store):
        with store.lock(f"base-{bname}", purpose="base gc"), store.lock("store"):
            used = base_users(store)
            gens = generations(store, bname)
            for g in gens[:-1]:
                if (bname, g.number) in used:
                    continue
                with store.staging(f"gc-{bname}-{g.number}") as stage:
                    os.rename(g.dir, stage / "gen")
                for cached in (store.base_dir(bname) / "deltas").glob("*.json"):
                    if str(g.number) in cached.stem.split("-"):
                        cached.unlink()  # saved deltas that involve it
                removed.append((bname, g.number))
    return removed


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
        forget(store, name)
        with store.lock("store"), store.staging(f"rm-{name}") as stage:
            os.rename(store.instance_dir(name), stage / "instance")


def fsck_instance(store: Store, name: str, *, repair: bool) -> JsonObject:
    """``unionimg fsck VM [--repair]``: see :func:`unionimg.layers.ucheck.fsck`."""
    load(store, name)
    with store.lock(f"instance-{name}", wait=False, purpose=f"fsck {name}"):
        _require_stopped(store, name, "before checking its U image")
        return ucheck.fsck(store, name, repair=repair)
