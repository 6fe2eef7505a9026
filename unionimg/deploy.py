"""Deploy: the controller side of putting a system node on hosts.

``deploy SYSTEM --host H... --registry URL [--boot]`` (``redeploy`` the same, replacing the
VMs an earlier deploy made there):

1. for each host, at once (one thread per host, each its own SSH command over the host's
   shared connection), ``unionimg system materialize - --registry URL [--replace] [--boot]``
   is started there: the host's program starts, says ``ready`` and waits for the node on its
   standard input, so the SSH connection and the program's start happen while
2. the controller pushes the node (and its ancestors) to the registry
   (:func:`unionimg.systems.push`: blobs the registry holds are not sent again); then the
   pushed manifest's digest is handed to every waiting host (a failed push hands none: each
   host ends without touching its store, and the push's error is the deploy's);
3. each host (:func:`unionimg.systems.materialize`) pulls only the blobs it lacks straight
   from the registry, checks each, makes the VMs and boots them; its progress lines come back
   on SSH's stderr and drive one progress bar per host;
4. the result is one report: per host the bytes it pulled, its cache hits (from the host's
   own report), the layers it imported, the VMs made, seconds (the pull's split into
   fetching, the network, and importing, the host's extraction; making base generations;
   making VMs; the host's start, hidden behind the push); a host that failed has its error
   line (the others go on), and the command exits with the first failure's code.

The node is named to hosts by its manifest digest (what the controller pushed), never by a
tag another push may move meanwhile.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from unionimg import hosts as hosts_mod
from unionimg import systems
from unionimg.errors import ToolFailed, UnionimgError, UsageError
from unionimg.registry.client import Registry, check_url
from unionimg.store.layout import Store

PROGRESS_PREFIX = "unionimg-progress "
MAX_HOSTS = 1000
Watcher = Callable[[str, str, int, int], None]
"""``watch(host, phase, done, total)``: a host's progress (phases: cache, pull, vm, boot,
done, failed)."""


@dataclass
class HostOutcome:
    host: str
    ok: bool = False
    error: str = ""
    exit_code: int = 0
    result: dict[str, Any] = field(default_factory=dict)  # the host's materialize report
    seconds: float = 0.0  # from the node handed to the host to its report
    start_seconds: float | None = None  # from the SSH command to the host's "ready"

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "host": self.host,
            "ok": self.ok,
            "error": self.error or None,
            "cached_before": r.get("cached_before", 0),  # layers the host held before
            "cache_hits": r.get("cache_hits", 0),
            "layers": len(r.get("layers", [])),
            "imported": r.get("imported", []),
            "bytes_pulled": r.get("bytes_pulled", 0),
            "bytes_resumed": r.get("bytes_resumed", 0),
            "vms": r.get("vms", []),
            "created": r.get("created", []),
            "replaced": r.get("replaced", []),
            "booted": r.get("booted", []),
            "generations_made": r.get("generations_made", []),
            "pull_seconds": r.get("pull_seconds", 0.0),
            "fetch_seconds": r.get("fetch_seconds", 0.0),
            "import_seconds": r.get("import_seconds", 0.0),
            "base_seconds": r.get("base_seconds", 0.0),
            "vm_seconds": r.get("vm_seconds", 0.0),
            "host_seconds": r.get("seconds", 0.0),  # the host's own, from its start
            # the controller's, from the node handed over: SSH's part and the report's way back
            "seconds": round(self.seconds, 3),
            # SSH and the host's program starting, during the push (None: it never said ready)
            "start_seconds": None if self.start_seconds is None else round(self.start_seconds, 3),
        }


@dataclass
class DeployReport:
    system: str
    manifest: str
    registry: str
    pushed_bytes: int
    push_seconds: float
    hosts: list[HostOutcome]
    seconds: float = 0.0

    def failed(self) -> list[HostOutcome]:
        return [h for h in self.hosts if not h.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "manifest": self.manifest,
            "registry": self.registry,
            "pushed_bytes": self.pushed_bytes,
            "push_seconds": round(self.push_seconds, 3),
            "hosts": {h.host: h.to_json() for h in self.hosts},
            "bytes_pulled": sum(h.result.get("bytes_pulled", 0) for h in self.hosts),
            "seconds": round(self.seconds, 3),
        }


def _parse_progress(host: str, line: str, watch: Watcher) -> None:
    try:
        obj = json.loads(line[len(PROGRESS_PREFIX) :])
        phase, done, total = str(obj["phase"]), int(obj["done"]), int(obj["total"])
    except (ValueError, KeyError, TypeError):
        return  # a line of something else; the host is not trusted to print well
    watch(host, phase[:16], max(done, 0), max(total, 0))


_INTS = ("cache_hits", "cached_before", "bytes_pulled", "bytes_resumed")
_LISTS = ("vms", "created", "replaced", "booted", "layers", "imported", "generations_made")
_FLOATS = systems.SECONDS


def _checked(host: str, obj: object) -> dict[str, Any]:
    """The report a host printed, with the fields and types the controller uses (a host is
    another machine: what it says is counted and printed escaped, never trusted as shaped)."""
    if not isinstance(obj, dict):
        raise ToolFailed(f"host {host}: 'system materialize' printed no report")
    out: dict[str, Any] = {}
    for key in _INTS:
        value = obj.get(key, 0)
        out[key] = value if type(value) is int and value >= 0 else 0
    for key in _LISTS:
        value = obj.get(key, [])
        out[key] = [str(v)[:200] for v in value[:10000]] if isinstance(value, list) else []
    for key in _FLOATS:
        value = obj.get(key, 0.0)
        out[key] = float(value) if type(value) in (int, float) else 0.0
    for key in ("system", "manifest"):
        out[key] = str(obj.get(key, ""))[:200]
    return out


class Handoff:
    """The pushed node's digest, handed to one host's waiting ``system materialize -``
    through a pipe that is its SSH command's standard input: :meth:`pipe` (the host's
    thread, before it starts the command) and :meth:`give` (the controller, once the push
    ended; None: the push failed, the host gets end-of-file and ends) in either order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._digest: str | None = None
        self.given_at: float | None = None  # when give() was called

    def pipe(self) -> int:
        """A new pipe's read end, for the SSH command's stdin (the caller closes it)."""
        read, write = os.pipe()
        with self._lock:
            self._fd = write
            if self.given_at is not None:
                self._send()
        return read

    def give(self, digest: str | None) -> None:
        with self._lock:
            self._digest, self.given_at = digest, time.monotonic()
            if self._fd is not None:
                self._send()

    def _send(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._digest is not None:
                os.write(fd, f"{self._digest}\n".encode("ascii"))  # < PIPE_BUF: never blocks
        except OSError:
            pass  # the host's command has already ended: its own outcome says why
        finally:
            os.close(fd)


def deploy_one(
    host: hosts_mod.Host,
    handoff: Handoff,
    url: str,
    *,
    replace: bool,
    boot: bool,
    watch: Watcher,
) -> HostOutcome:
    """Materialize the node ``handoff`` gives on ``host`` (see the module docstring)."""
    out = HostOutcome(host.name)
    start = time.monotonic()
    try:
        args = ["system", "materialize", "-", "--registry", url, "--progress", "--json"]
        if replace:
            args.append("--replace")
        if boot:
            args.append("--boot")
        pending = bytearray()

        def on_progress(host_name: str, phase: str, done: int, total: int) -> None:
            if phase == "ready" and out.start_seconds is None:
                out.start_seconds = time.monotonic() - start
            watch(host_name, phase, done, total)

        def sink(fd: int, data: bytes) -> None:
            if fd != 2:
                return
            pending.extend(data)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                text = line.decode(errors="replace")
                if text.startswith(PROGRESS_PREFIX):
                    _parse_progress(host.name, text, on_progress)

        stdin = handoff.pipe()
        try:
            text = host.stream(args, sink, what="materializing the system", stdin=stdin)
        finally:
            os.close(stdin)
        try:
            result = json.loads(text)
        except ValueError:
            result = None
        out.result = _checked(host.name, result)
        out.ok = True
        watch(host.name, "done", 1, 1)
    except UnionimgError as exc:
        out.error = exc.message
        out.exit_code = exc.exit_code
        watch(host.name, "failed", 0, 1)
    given = handoff.given_at if handoff.given_at is not None else start
    out.seconds = time.monotonic() - max(start, given)
    return out


def deploy(
    store: Store,
    system: str,
    host_names: Sequence[str],
    registry: str,
    *,
    host_registry: str | None = None,
    replace: bool = False,
    boot: bool = False,
    watch: Watcher | None = None,
) -> DeployReport:
    """Push ``system`` to ``registry`` and materialize it on every host (see the module
    docstring). Hosts that fail are in the report; none stops the others."""
    start = time.monotonic()
    if not host_names:
        raise UsageError("name at least one host (--host H)")
    if len(set(host_names)) != len(host_names):
        raise UsageError("a host is named twice; name each host once")
    if len(host_names) > MAX_HOSTS:
        raise UsageError(f"at most {MAX_HOSTS} hosts per deploy")
    targets = [hosts_mod.get(store, h) for h in host_names]
    systems.get(store, system)
    url_for_hosts = check_url(host_registry or registry)
    lock = threading.Lock()

    def locked_watch(host: str, phase: str, done: int, total: int) -> None:
        if watch is not None:
            with lock:
                watch(host, phase, done, total)

    handoffs = [Handoff() for _ in targets]
    with ThreadPoolExecutor(max_workers=min(len(targets), 32)) as pool:
        futures = [
            pool.submit(
                deploy_one, h, hand, url_for_hosts, replace=replace, boot=boot,
                watch=locked_watch,
            )
            for h, hand in zip(targets, handoffs, strict=True)
        ]  # fmt: skip
        try:
            with Registry(registry) as reg:
                pushed = systems.push(store, reg, system)
        except BaseException:
            for hand in handoffs:
                hand.give(None)  # each host reads end-of-file and ends, its store untouched
            for fut in futures:
                fut.cancel()
            raise
        for hand in handoffs:
            hand.give(pushed.manifest)
        outcomes = [fut.result() for fut in futures]
    return DeployReport(
        system,
        pushed.manifest,
        url_for_hosts,
        pushed.bytes_sent,
        pushed.seconds,
        outcomes,
        time.monotonic() - start,
    )
