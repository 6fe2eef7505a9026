"""Hosts: other machines running unionimg, reached over OpenSSH (the one module running ssh).

A host is recorded with ``host add NAME --ssh USER@ADDR --store PATH``::

    STORE/hosts/
      id_ed25519, id_ed25519.pub   the store's own SSH key (made at the first ``host add``);
                                   the admin authorizes its public key on each host
                                   (``unionimg host key`` prints it)
      NAME/host.json               a HostMeta record: user, address, port, the host's store,
                                   the unionimg program there
      NAME/known_hosts             the host key recorded at ``host add``, under the alias
                                   ``unionimg-NAME`` (not the address: a host that moves keeps
                                   its key, another machine on the old address is refused)

Every command runs OpenSSH's ``ssh`` through :mod:`unionimg.runner`: ``-F /dev/null`` (no
user or system config), ``BatchMode`` (never a prompt), the store's key only
(``IdentitiesOnly``), the host's own known_hosts file with ``StrictHostKeyChecking=yes`` (a
changed key is refused, never learnt), connect and keep-alive timeouts, and a shared
connection (``ControlMaster=auto``, kept 60 s; its socket in a private directory of this
user, per store) so a deploy's several commands pay one handshake. The remote command is
``unionimg --store PATH ...`` with each argument quoted for the remote shell
(:func:`shlex.quote`); a remote ``unionimg: error:`` line comes back as the same kind of error
(same exit code) prefixed with the host's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionimg import errors
from unionimg.errors import (
    Conflict,
    MissingCapability,
    NotFound,
    ToolFailed,
    UnionimgError,
    UsageError,
)
from unionimg.names import check_name
from unionimg.runner import Result, run, stream
from unionimg.store.fleet_records import HostMeta
from unionimg.store.layout import Store, now_iso, read_record, write_atomic, write_record

CONNECT_TIMEOUT = 10
ALIVE_INTERVAL = 5
ALIVE_COUNT = 6  # a silent link is given up after 30 s
PERSIST = 60
QUERY_TIMEOUT = 120.0  # a query (layer list, version) that takes longer has hung
KEY_TYPES = "ed25519,ecdsa,rsa"

_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_ADDR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[?[0-9A-Fa-f:.]{2,45}\]?")
_KEY_RE = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) [A-Za-z0-9+/=]{16,}")
_ERROR_KINDS: dict[int, type[UnionimgError]] = {
    cls.exit_code: cls
    for cls in (
        errors.UsageError,
        errors.NotFound,
        errors.Conflict,
        errors.ToolFailed,
        errors.MissingCapability,
        errors.StoreFull,
        errors.GuestDataRefused,
        errors.GuestFailed,
    )
}


@dataclass(frozen=True)
class Target:
    user: str
    addr: str


def parse_ssh(text: str) -> Target:
    """``USER@ADDR`` (ADDR a name, an IPv4 or an IPv6 address) or a one-line usage error."""
    user, sep, addr = text.partition("@")
    addr = addr.removeprefix("[").removesuffix("]")
    if not sep or not _USER_RE.fullmatch(user) or not _ADDR_RE.fullmatch(addr):
        raise UsageError(
            f"--ssh {text[:80]!r} is not USER@ADDRESS (a login name, then a host name or an IP "
            "address), e.g. root@192.0.2.7"
        )
    return Target(user, addr)


def hosts_dir(store: Store) -> Path:
    return store.root / "hosts"


def host_dir(store: Store, name: str) -> Path:
    return hosts_dir(store) / check_name(name, "host")


def store_key(store: Store) -> Path:
    """The store's SSH private key, made (ed25519, no passphrase) when missing."""
    d = hosts_dir(store)
    key = d / "id_ed25519"
    if key.is_file() and key.with_suffix(".pub").is_file():
        return key
    d.mkdir(mode=0o700, exist_ok=True)
    with store.staging("sshkey") as stage:
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"unionimg@{store.root}",
             "-f", str(stage / "id_ed25519")],
            what="making the store's SSH key",
        )  # fmt: skip
        os.replace(stage / "id_ed25519.pub", d / "id_ed25519.pub")
        os.replace(stage / "id_ed25519", key)
    return key


def public_key(store: Store) -> str:
    return store_key(store).with_suffix(".pub").read_text(encoding="ascii").strip()


def _control_dir(store: Store) -> Path:
    """A directory of this user only for the control sockets (short: a socket path has at
    most 107 bytes), one name space per store."""
    base = Path(tempfile.gettempdir()) / f"unionimg-ssh-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    st = os.lstat(base)
    if not base.is_dir() or base.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise MissingCapability(
            f"{base} is not a private directory of this user (owner {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}); remove it and retry"
        )
    return base


class Host:
    """One recorded host: how to run unionimg there."""

    def __init__(self, store: Store, meta: HostMeta) -> None:
        self.store = store
        self.meta = meta
        self.dir = host_dir(store, meta.name)

    @property
    def name(self) -> str:
        return self.meta.name

    def ssh_base(self) -> list[str]:
        tag = hashlib.sha256(str(self.store.root).encode()).hexdigest()[:12]
        return [
            "ssh",
            "-F", "/dev/null",
            "-i", str(store_key(self.store)),
            "-p", str(self.meta.port),
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"HostKeyAlias=unionimg-{self.name}",
            "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o", f"ServerAliveInterval={ALIVE_INTERVAL}",
            "-o", f"ServerAliveCountMax={ALIVE_COUNT}",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={_control_dir(self.store)}/{tag}-%C",
            "-o", f"ControlPersist={PERSIST}",
            "-o", "LogLevel=ERROR",
            "-l", self.meta.user,
            self.meta.addr,
        ]  # fmt: skip

    def remote_argv(self, args: Sequence[str]) -> list[str]:
        """``ssh ... -- 'unionimg' '--store' 'PATH' args...`` (quoted for the remote shell)."""
        words = [self.meta.unionimg, "--store", self.meta.store, *args]
        return [*self.ssh_base(), "--", " ".join(shlex.quote(w) for w in words)]

    def run(self, args: Sequence[str], *, timeout: float | None = QUERY_TIMEOUT,
            what: str = "") -> str:  # fmt: skip
        """Run ``unionimg --store PATH ARGS`` on the host; its stdout, or its error as ours."""
        res = run(self.remote_argv(args), check=False, timeout=timeout, what=what or None)
        return self.outcome(res, what or " ".join(args[:2]))

    def stream(self, args: Sequence[str], sink: Callable[[int, bytes], None], *,
               what: str = "", stdin: int | None = None) -> str:  # fmt: skip
        """:meth:`run` with the remote output handed to ``sink`` as it comes; ``stdin``: a
        file descriptor the remote command reads (else this process's own stdin)."""
        res = stream(self.remote_argv(args), sink, stdin=stdin)
        return self.outcome(res, what or " ".join(args[:2]))

    def run_json(self, args: Sequence[str], *, timeout: float | None = QUERY_TIMEOUT,
                 what: str = "") -> Any:  # fmt: skip
        out = self.run([*args, "--json"], timeout=timeout, what=what)
        try:
            return json.loads(out)
        except ValueError:
            raise ToolFailed(
                f"host {self.name}: 'unionimg {' '.join(args[:2])}' printed no JSON (is "
                f"{self.meta.unionimg} there a unionimg of this version?)"
            ) from None

    def outcome(self, res: Result, what: str) -> str:
        if res.returncode == 0:
            return res.stdout
        raise self.error(res, what)

    def error(self, res: Result, what: str) -> UnionimgError:
        lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {res.returncode}"
        text = "\n".join(lines)
        if res.returncode == 255:  # ssh's own failure: no remote command ran
            if "IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
                return Conflict(
                    f"host {self.name} ({self.meta.addr}) shows an SSH host key other than the "
                    "one recorded at 'host add'; nothing was run there. If the host was "
                    f"reinstalled, check its key and run 'unionimg host remove {self.name}' "
                    "and 'host add' again"
                )
            if "Permission denied" in text:
                return MissingCapability(
                    f"host {self.name}: {self.meta.user}@{self.meta.addr} refused the store's "
                    "SSH key; authorize the line 'unionimg host key' prints in that user's "
                    "~/.ssh/authorized_keys"
                )
            return ToolFailed(f"host {self.name} ({self.meta.addr}) unreachable: {last}")
        for line in reversed(lines):
            if line.startswith("unionimg: error: "):
                kind = _ERROR_KINDS.get(res.returncode, ToolFailed)
                return kind(f"host {self.name}: {line.removeprefix('unionimg: error: ')}")
        if res.returncode == 127 or "not found" in last:
            return MissingCapability(
                f"host {self.name}: '{self.meta.unionimg}' does not run there ({last}); install "
                "unionimg on the host or give its path with 'host add --unionimg'"
            )
        return ToolFailed(f"host {self.name}: {what} failed (exit {res.returncode}): {last}")

    def close(self) -> None:
        """End the shared connection, if one is open."""
        base = self.ssh_base()  # ends with the address: the control command goes before it
        run([*base[:-1], "-O", "exit", base[-1]], check=False, timeout=10)


def get(store: Store, name: str) -> Host:
    path = host_dir(store, name) / HostMeta.FILE
    try:
        meta = read_record(path, HostMeta)
    except FileNotFoundError:
        raise NotFound(f"no host named {name!r}; 'unionimg host list' shows them") from None
    return Host(store, meta)


def list_hosts(store: Store) -> list[HostMeta]:
    d = hosts_dir(store)
    if not d.is_dir():
        return []
    out = []
    for sub in sorted(d.iterdir()):
        if (sub / HostMeta.FILE).is_file():
            out.append(read_record(sub / HostMeta.FILE, HostMeta))
    return out


def _scan_keys(addr: str, port: int) -> list[str]:
    res = run(
        ["ssh-keyscan", "-T", str(CONNECT_TIMEOUT), "-p", str(port), "-t", KEY_TYPES, addr],
        check=False,
        timeout=CONNECT_TIMEOUT * 4,
    )
    keys = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and _KEY_RE.fullmatch(f"{parts[1]} {parts[2]}"):
            keys.append(f"{parts[1]} {parts[2]}")
    if not keys:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("#")]
        why = lines[-1].strip() if lines else "no SSH server answered"
        raise ToolFailed(f"host at {addr} port {port}: no SSH host key read ({why})")
    return keys


def _read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--host-key {path}: cannot read it ({exc})") from None
    keys = []
    for line in text.splitlines():
        m = _KEY_RE.search(line)
        if m:
            keys.append(m.group(0))
    if not keys:
        raise UsageError(f"--host-key {path} holds no SSH public key (ssh-ed25519 AAAA...)")
    return keys


def add(
    store: Store,
    name: str,
    ssh: str,
    remote_store: str,
    *,
    port: int = 22,
    unionimg: str = "unionimg",
    host_key: Path | None = None,
) -> tuple[HostMeta, str]:
    """Record host ``name`` after checking it: its host key (``host_key``'s, which the host
    must show; without it, the keys it shows now are trusted from here on) and that
    unionimg runs there with the store's key. Returns the record and unionimg's version
    there. Nothing is recorded when a check fails."""
    check_name(name, "host")
    target = parse_ssh(ssh)
    if not remote_store.startswith("/") or "\n" in remote_store or len(remote_store) > 1024:
        raise UsageError(
            f"--store {remote_store[:80]!r}: give the host's store as an absolute path"
        )
    if not unionimg or "\n" in unionimg or len(unionimg) > 1024:
        raise UsageError("--unionimg: give the program's name or absolute path on the host")
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: give a TCP port, 1-65535")
    final = host_dir(store, name)
    if final.exists():
        raise Conflict(f"host {name} exists; 'unionimg host remove {name}' first to replace it")
    meta = HostMeta(name, target.user, target.addr, port, remote_store, unionimg, now_iso())
    keys = _read_key_file(host_key) if host_key is not None else _scan_keys(target.addr, port)
    store_key(store)
    hosts_dir(store).mkdir(mode=0o700, exist_ok=True)
    with (
        store.lock(f"host-{name}", wait=False, purpose="host add"),
        store.staging(f"host-{name}") as stage,
    ):
        d = stage / name
        d.mkdir(mode=0o700)
        write_atomic(d / "known_hosts", "".join(f"unionimg-{name} {k}\n" for k in keys).encode())
        write_record(d / HostMeta.FILE, meta)
        # checked from the staging directory: the host must show a recorded key and run
        # unionimg; only then is the host recorded
        probe = Host(store, meta)
        probe.dir = d
        version = probe.run(["--version"], what="unionimg --version").strip()
        if final.exists():
            raise Conflict(f"host {name} exists; 'unionimg host remove {name}' first")
        os.rename(d, final)
    return meta, version


def remove(store: Store, name: str) -> None:
    host = get(store, name)
    host.close()
    with store.lock(f"host-{name}", wait=False, purpose="host remove"):
        shutil.rmtree(host.dir)


_DIFF_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")


def cache(host: Host) -> list[dict[str, Any]]:
    """The layers ``host`` holds: ``unionimg layer list --json`` run there, each row checked
    (a diff_id, its kind, blob size, origin); sorted by diff_id."""
    data = host.run_json(["layer", "list"], what="listing its layers")
    if not isinstance(data, list):
        raise ToolFailed(f"host {host.name}: 'layer list --json' gave no list")
    rows = []
    for item in data:
        if not isinstance(item, dict) or not _DIFF_ID_RE.fullmatch(str(item.get("diff_id"))):
            raise ToolFailed(f"host {host.name}: 'layer list --json' gave a row without diff_id")
        size = item.get("blob_size", 0)
        rows.append(
            {
                "diff_id": item["diff_id"],
                "kind": str(item.get("kind", "")),
                "blob_size": size if type(size) is int else 0,
                "origin": str(item.get("origin", "")),
                "parent": item.get("parent") if isinstance(item.get("parent"), str) else None,
            }
        )
    return sorted(rows, key=lambda r: str(r["diff_id"]))
