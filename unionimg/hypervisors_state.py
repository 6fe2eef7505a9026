"""Whether an instance's guest is running. Booting arrives with the hypervisor profiles;
until then nothing unionimg started can be running, and this says so from the record a
boot leaves (``instances/VM/running.json``) checked against the live process."""

from __future__ import annotations

import os

from .store import Store, read_json


def running_on(store: Store, name: str) -> str | None:
    """The hypervisor the instance runs on, or None."""
    path = store.instance_dir(name) / "running.json"
    if not path.is_file():
        return None
    rec = read_json(path)
    pid = rec.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
    return str(rec.get("hypervisor"))
