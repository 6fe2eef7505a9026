"""A CNCF Distribution registry (Debian's ``docker-registry``) with unionimg's own config.

:func:`start` writes ``DIR/config.yml`` and starts ``docker-registry serve`` on one address:

- storage: the filesystem driver in ``DIR/data`` (blobs under
  ``data/docker/registry/v2/blobs/sha256/XX/HEX/data``, one file per blob whatever the number
  of repositories that hold it);
- listening on ``ADDR`` only (the packaged config listens on every interface);
- no TLS and no auth: unionimg starts it for a test, a demo or a deploy on a network it trusts
  (a loopback address, a lab bridge). A production registry adds TLS (``http.tls`` with a
  certificate, or a TLS-terminating proxy in front) and token auth (``auth.token`` with an
  authorization service, or htpasswd at least) — see ``docs/oci.md``;
- deletes enabled (``storage.delete``) so ``docker-registry garbage-collect`` can free the
  blobs of deleted manifests; upload purging off (a half-made upload is not removed under a
  slow client's feet);
- an ``http.secret`` of its own (random per start), and the environment cleared of
  ``REGISTRY_*`` variables, which would override the config.

``prefix`` is an argv put in front of the command, e.g. ``("ip", "netns", "exec", "NS")`` to
run it inside a network namespace. Readiness is read from the registry's own log ("listening
on ADDR") so it works whatever namespace the caller is in; a registry that exits first is one
line (the address taken, the binary missing).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from unionimg import poll
from unionimg.errors import Conflict, MissingCapability, ToolFailed, UsageError
from unionimg.runner import spawn, which

PROGRAM: Final = "docker-registry"
READY_TIMEOUT: Final = 15.0
_ADDR = re.compile(r"(?P<host>[0-9.]+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def check_listen(addr: str) -> str:
    """``HOST:PORT`` with a port of 1-65535 (``0.0.0.0`` and ``[::]`` are allowed but mean
    every interface)."""
    m = _ADDR.fullmatch(addr)
    if m is None or not 0 < int(m.group("port")) < 65536:
        raise UsageError(f"--listen {addr!r} is not HOST:PORT (e.g. 127.0.0.1:5000)")
    return addr


def config_text(data_dir: Path, listen: str, secret: str) -> str:
    """unionimg's registry config (YAML; every value is ours or checked, quoted as JSON)."""
    return (
        "# written by 'unionimg registry serve': a registry for a trusted network (no TLS, no\n"
        "# auth); see docs/oci.md for what a production registry adds\n"
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  accesslog:\n"
        "    disabled: true\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {json.dumps(str(data_dir))}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  maintenance:\n"
        "    uploadpurging:\n"
        "      enabled: false\n"
        "http:\n"
        f"  addr: {json.dumps(listen)}\n"
        f"  secret: {json.dumps(secret)}\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )


@dataclass
class Server:
    """A registry started by :func:`start`."""

    directory: Path
    listen: str
    pid: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host, _, port = self.listen.rpartition(":")
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"http://{host}:{port}"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps blob ``digest`` (for tests and fsck-like tools)."""
        hexd = digest.removeprefix("sha256:")
        return self.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, SIGKILL after ``timeout``) and remove its pid file."""
        if self.running():
            os.kill(self.pid, signal.SIGTERM)
            if not poll.until(lambda: not self.running(), timeout, 0.02):
                os.kill(self.pid, signal.SIGKILL)
                poll.until(lambda: not self.running(), 5.0, 0.02)
        if self.proc is not None:
            self.proc.poll()
        pid_file(self.directory).unlink(missing_ok=True)

    def wait(self) -> int:
        """Wait for the registry to exit (the foreground ``registry serve``)."""
        assert self.proc is not None
        return self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_file(directory: Path) -> Path:
    return directory / "registry.pid"


def start(
    directory: Path,
    listen: str,
    *,
    prefix: Sequence[str] = (),
    timeout: float = READY_TIMEOUT,
) -> Server:
    """Start a registry storing in ``directory`` and listening on ``listen``; return once it
    listens. ``prefix``: an argv in front (``ip netns exec NS``)."""
    check_listen(listen)
    try:
        which(PROGRAM)
    except MissingCapability:
        raise MissingCapability(
            f"program '{PROGRAM}' not found; install Debian's docker-registry package "
            "(scripts/setup.sh installs it)"
        ) from None
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(mode=0o700, exist_ok=True)
    old = pid_file(directory)
    if old.exists():
        try:
            pid = int(old.read_text().strip())
            os.kill(pid, 0)
            running = True
        except (ValueError, OSError):
            running = False
        if running:
            raise Conflict(
                f"a registry already runs on {directory} (pid {pid}); stop it first "
                f"(kill {pid}) or choose another --dir"
            )
        old.unlink()
    conf = directory / "config.yml"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a secret
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(config_text(directory / "data", listen, secrets.token_hex(16)))
    log_path = directory / "registry.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with log_path.open("ab") as out:
        start_at = out.tell()
        proc = spawn([*prefix, PROGRAM, "serve", str(conf)], out=out, env=env)
    server = Server(directory, listen, proc.pid, log_path, proc)

    def ready() -> str | None:
        text = _log_since(log_path, start_at)
        if proc.poll() is not None:
            return "exited"
        return "ready" if f"listening on {listen}" in text or "listening on " in text else None

    state = poll.until(ready, timeout, 0.01)
    if state != "ready":
        if state is None:
            server.stop()
            raise ToolFailed(
                f"{PROGRAM} did not listen on {listen} within {timeout:g} s; see {log_path}"
            )
        raise _exited(_log_since(log_path, start_at), listen, log_path)
    pid_file(directory).write_text(f"{proc.pid}\n")
    return server


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


def _exited(text: str, listen: str, log_path: Path) -> Exception:
    if "address already in use" in text:
        return Conflict(
            f"address {listen} is taken by another program; choose another --listen "
            "(or stop the program that listens there)"
        )
    if "cannot assign requested address" in text:
        return UsageError(
            f"address {listen} is not an address of this host; choose another --listen"
        )
    fatal = [ln for ln in text.splitlines() if "level=fatal" in ln or "level=panic" in ln]
    last = fatal[-1] if fatal else (text.strip().splitlines() or ["no output"])[-1]
    m = re.search(r'msg="([^"]*)"', last)
    return ToolFailed(
        f"{PROGRAM} exited at start: {(m.group(1) if m else last)[:200]} (log: {log_path})"
    )


def attach(directory: Path) -> Server | None:
    """The registry a ``registry serve --background`` left running on ``directory``."""
    directory = directory.absolute()
    try:
        pid = int(pid_file(directory).read_text().strip())
    except (OSError, ValueError):
        return None
    listen = ""
    conf = directory / "config.yml"
    if conf.exists():
        m = re.search(r'^  addr: "([^"]*)"', conf.read_text(), re.M)
        listen = m.group(1) if m else ""
    server = Server(directory, listen, pid, directory / "registry.log")
    return server if server.running() else None
