"""Whether an instance's guest runs (a thin door into :mod:`unionimg.boot`, so the modules
that only need the answer do not import the hypervisor drivers)."""

from __future__ import annotations

from .store import Store


def running_on(store: Store, name: str) -> str | None:
    """The hypervisor the instance runs on now, or None."""
    if not (store.instance_dir(name) / "running.json").is_file():
        return None
    from .boot import running_on as live

    return live(store, name)
