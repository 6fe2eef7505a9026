"""Namespace hosts on this machine: test and benchmark fixtures for deploys over SSH.

A :class:`Lab` is one private network on this machine:

- a bridge ``br0`` in a network namespace of its own (``uinh-ID-br``), so nothing of the
  root namespace (its firewall, its bridges) sees the lab's traffic;
- the controller's link: a veth pair from the root namespace (``uinhIDc``, address ``.1``)
  to the bridge, so the test process itself (the controller) reaches every host;
- one network namespace per host (``uinh-ID-NAME``) with a veth pair to the bridge (``eth0``
  inside, address ``.10`` and up on the lab's private /24) and its own store directory;
  :meth:`Lab.add_host` starts a real OpenSSH ``sshd -D -e -f CONF`` in it (its own host key,
  listening only on the host's address, a lab-made client key authorized for root);
- :meth:`Lab.add_namespace` for a namespace without sshd (the registry's): its
  :attr:`Netns.prefix` is the argument list that runs a program inside it.

:attr:`Netns.prefix` runs a program inside a namespace with ``nsenter --net=/run/netns/NS``
(the network namespace only; the registry needs no more). A host's sshd runs under ``ip
netns exec``: the namespace's own ``/sys`` (a guest's tap device is looked up there) in a
mount namespace of its own, a slave copy of the machine's (a host's own mounts, such as a
booted guest's, stay in it and go with its processes at teardown). A host's directory is
bind-mounted on itself as a shared mount before its sshd starts, so what the tests mount
under it later (a small tmpfs as a full store) reaches the host even where ``/`` is a
private mount (a machine without systemd; unionimg makes ``/`` shared only once it boots a
guest).
Bytes on the wire are the kernel's counters of each host's ``eth0`` (``rx_bytes`` is what the
host received), read with ``ip -n NS -s -j link show``: the namespace's own
``/sys/class/net/eth0/statistics`` as ``ip`` reads them.

Teardown (:meth:`Lab.close`, also on an exception in a ``with`` block) kills every process
left in the lab's namespaces (sshd, what ran under it, a booted guest) and deletes every
namespace, which deletes their links; a lab whose owner died (a crashed run) is swept by the
next :class:`Lab` (:func:`sweep`). Every wait is bounded. Independent of unionimg (the
benchmark imports it too). Measured here: about 60 ms per host with its sshd ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "uinh"
STATE_DIR = Path("/run/unionimg-nethosts")
SSHD = "/usr/sbin/sshd"
WAIT = 10.0  # seconds for sshd to listen


class LabError(RuntimeError):
    """The lab could not be built (a program failed, sshd did not listen in time)."""


def _run(args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(args), input=input, capture_output=True, text=True, check=False, timeout=60
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args[:4])} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).strip()
    try:
        return [row["name"] for row in json.loads(out or "[]")]
    except (ValueError, KeyError, TypeError):
        return []


def _kill_netns(ns: str) -> None:
    """Kill every process in namespace ``ns`` (bounded), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)
    _run(["ip", "netns", "delete", ns], check=False)


def sweep() -> list[str]:
    """Delete the namespaces of labs whose owner process is gone (a crashed run); returns
    the namespaces deleted."""
    owners: dict[str, bool] = {}
    gone: list[str] = []
    for ns in _netns_list():
        if not ns.startswith(PREFIX + "-"):
            continue
        lab = ns.split("-")[1]
        if lab not in owners:
            owners[lab] = _owner_alive(lab)
        if not owners[lab]:
            _kill_netns(ns)
            gone.append(ns)
    for lab, alive in owners.items():
        if not alive:
            (STATE_DIR / f"{lab}.pid").unlink(missing_ok=True)
            _run(["ip", "link", "delete", f"{PREFIX}{lab}c"], check=False)
    return gone


def _owner_alive(lab: str) -> bool:
    try:
        pid, start = (STATE_DIR / f"{lab}.pid").read_text().split()
    except (OSError, ValueError):
        return False
    return _proc_start(int(pid)) == start


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Netns:
    """One namespace of the lab on the bridge: its name, address and veth."""

    name: str  # the host's name in the lab
    ns: str  # the network namespace
    addr: str
    lab: Lab = field(repr=False)

    @property
    def prefix(self) -> list[str]:
        """The argument list that runs a program in this namespace (network only)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def counters(self) -> dict[str, int]:
        """``rx_bytes``/``tx_bytes``/``rx_packets``/``tx_packets`` of the namespace's eth0."""
        out = _run(["ip", "-n", self.ns, "-s", "-j", "link", "show", "dev", "eth0"])
        stats = json.loads(out)[0]["stats64"]
        return {
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_packets": int(stats["rx"]["packets"]),
            "tx_packets": int(stats["tx"]["packets"]),
        }

    def link(self, up: bool) -> None:
        """Take the namespace's link down (a lost link) or up again."""
        _run(["ip", "-n", self.ns, "link", "set", "eth0", "up" if up else "down"])

    def limit(self, rate: str | None) -> None:
        """Limit what the namespace receives to ``rate`` (tc tbf on the bridge side of its
        veth, e.g. ``"100mbit"``), or lift the limit with None."""
        dev = self.lab.bridge_port(self)
        if rate is None:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.lab.bridge_ns,
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    dev,
                    "root",
                ],
                check=False,
            )
            return
        _run(
            [
                "ip",
                "netns",
                "exec",
                self.lab.bridge_ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "400ms",
            ]
        )


@dataclass
class Host(Netns):
    """A namespace host: its sshd, its store directory, how to reach it."""

    store: Path = Path()
    dir: Path = Path()  # sshd's files: config, host key, log
    sshd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    def known_hosts_line(self) -> str:
        return f"{self.addr} {self.host_key_pub.read_text().split(' ')[0]} " + (
            self.host_key_pub.read_text().split(" ")[1].strip()
        )

    def ssh_argv(self, *command: str) -> list[str]:
        """ssh as root to this host with the lab's client key (for the tests' own checks)."""
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.lab.client_key), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
            f"root@{self.addr}", "--", *command,
        ]  # fmt: skip

    def authorize(self, public_key: str) -> None:
        """Let ``public_key`` (one ``ssh-ed25519 ...`` line) log in as root."""
        with (self.dir / "authorized_keys").open("a") as fh:
            fh.write(public_key.strip() + "\n")

    def new_host_key(self) -> None:
        """Give the host a new host key and restart its sshd (a reinstalled host): every
        sshd of the namespace ends, its sessions too (a client's shared connection dies)."""
        self.stop_sshd()
        self.kill_sessions()
        for p in self.dir.glob("ssh_host_ed25519_key*"):
            p.unlink()
        self.lab._start_sshd(self)

    def kill_sessions(self) -> None:
        """End every sshd session process of the host (its connections drop)."""
        for pid in _run(["ip", "netns", "pids", self.ns], check=False).split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if comm == "sshd":
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def stop_sshd(self) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(5)
        self.sshd = None


class Lab:
    """A bridge, the controller's link and namespace hosts; a context manager whose exit
    tears everything down (see the module docstring)."""

    def __init__(self, workdir: Path, *, subnet: int | None = None) -> None:
        if os.geteuid() != 0:
            raise LabError("namespace hosts need root")
        for prog in ("ip", "nsenter", "ssh-keygen", "ssh"):
            if shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
                raise LabError(f"program '{prog}' not installed")
        sweep()
        self.id = secrets.token_hex(3)
        # a /24 of 10.213.0.0/16 per lab, from its id (two live labs rarely share one; the
        # controller's route then goes to the newer one, which only the tests' parallel
        # runs could hit)
        self.subnet = subnet if subnet is not None else 1 + int(self.id, 16) % 250
        self.net = f"10.213.{self.subnet}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bridge_ns = f"{PREFIX}-{self.id}-br"
        self.ctl_if = f"{PREFIX}{self.id}c"
        self.ctl_addr = f"{self.net}.1"
        self.hosts: dict[str, Netns] = {}
        self._ports: dict[str, str] = {}
        self._next = 10
        self._mounted: list[Path] = []  # the hosts' directories, bound on themselves
        self.client_key = self.workdir / "client_ed25519"
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        (STATE_DIR / f"{self.id}.pid").write_text(f"{os.getpid()} {_proc_start(os.getpid())}")
        try:
            self._build_bridge()
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab", "-f",
                  str(self.client_key)])  # fmt: skip
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build_bridge(self) -> None:
        br = self.bridge_ns
        _run(["ip", "-batch", "-"], input="\n".join([
            f"netns add {br}",
            f"link add {self.ctl_if} type veth peer name ctl netns {br}",
            f"addr add {self.ctl_addr}/24 dev {self.ctl_if}",
            f"link set {self.ctl_if} up",
        ]) + "\n")  # fmt: skip
        _run(["ip", "-n", br, "-batch", "-"], input="\n".join([
            "link set lo up",
            "link add br0 type bridge",
            "link set br0 type bridge forward_delay 0",
            "link set br0 up",
            "link set ctl master br0",
            "link set ctl up",
        ]) + "\n")  # fmt: skip

    def bridge_port(self, host: Netns) -> str:
        return self._ports[host.name]

    def _add_ns(self, name: str, cls: type[Netns], **kw: object) -> Netns:
        if name in self.hosts or not name.isalnum() or len(name) > 8:
            raise LabError(f"bad or duplicate lab host name {name!r}")
        index = self._next
        self._next += 1
        ns = f"{PREFIX}-{self.id}-{name}"
        port = f"p{index}"
        addr = f"{self.net}.{index}"
        _run(["ip", "-batch", "-"], input="\n".join([
            f"netns add {ns}",
            f"link add eth0 netns {ns} type veth peer name {port} netns {self.bridge_ns}",
        ]) + "\n")  # fmt: skip
        _run(["ip", "-n", self.bridge_ns, "-batch", "-"],
             input=f"link set {port} master br0\nlink set {port} up\n")  # fmt: skip
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join([
            "link set lo up",
            f"addr add {addr}/24 dev eth0",
            "link set eth0 up",
        ]) + "\n")  # fmt: skip
        host = cls(name=name, ns=ns, addr=addr, lab=self, **kw)
        self.hosts[name] = host
        self._ports[name] = port
        return host

    def add_namespace(self, name: str) -> Netns:
        """A namespace on the bridge without sshd (the registry's)."""
        return self._add_ns(name, Netns)

    def add_host(self, name: str) -> Host:
        """A namespace host with its sshd listening and its own empty store directory."""
        hdir = self.workdir / f"host-{name}"
        hdir.mkdir(mode=0o700, exist_ok=True)
        # shared (peer group of its own), so later mounts under it reach the host's copy
        _run(["mount", "--bind", str(hdir), str(hdir)])
        self._mounted.append(hdir)
        _run(["mount", "--make-shared", str(hdir)])
        host = self._add_ns(name, Host, store=hdir / "store", dir=hdir)
        assert isinstance(host, Host)
        (hdir / "authorized_keys").write_text(
            Path(f"{self.client_key}.pub").read_text(), encoding="ascii"
        )
        self._start_sshd(host)
        return host

    def _start_sshd(self, host: Host) -> None:
        key = host.dir / "ssh_host_ed25519_key"
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f",
                  str(key)])  # fmt: skip
        (host.dir / "known_hosts").write_text(host.known_hosts_line() + "\n")
        conf = host.dir / "sshd_config"
        conf.write_text(
            "\n".join([
                f"ListenAddress {host.addr}:22",
                f"HostKey {key}",
                f"PidFile {host.dir / 'sshd.pid'}",
                f"AuthorizedKeysFile {host.dir / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "UseDNS no",
                "MaxStartups 100:30:200",
                "MaxSessions 50",
                "ClientAliveInterval 2",  # a client whose link died is dropped in ~6 s
                "ClientAliveCountMax 3",
                "LogLevel ERROR",
                "",
            ])
        )  # fmt: skip
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = (host.dir / "sshd.log").open("ab")
        # ip netns exec: the namespace's own /sys (a guest's tap is looked up there), in a
        # mount namespace of its own whose mounts are the machine's (received, not sent)
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, SSHD, "-D", "-e", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection((host.addr, 22), timeout=1.0) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if host.sshd.poll() is not None or time.monotonic() > deadline:
                tail = (host.dir / "sshd.log").read_text(errors="replace").strip()[-300:]
                raise LabError(f"sshd of lab host {host.name} did not listen: {tail}")
            time.sleep(0.005)

    def close(self) -> None:
        """Kill every process of the lab's namespaces and delete them (and their links)."""
        for host in self.hosts.values():
            if isinstance(host, Host):
                host.stop_sshd()
        for host in list(self.hosts.values()):
            _kill_netns(host.ns)
        self.hosts.clear()
        while self._mounted:  # what a test mounted under one goes with it (lazily: busy is ok)
            _run(["umount", "--recursive", "--lazy", str(self._mounted.pop())], check=False)
        if self.bridge_ns in _netns_list():
            _kill_netns(self.bridge_ns)
        _run(["ip", "link", "delete", self.ctl_if], check=False)
        (STATE_DIR / f"{self.id}.pid").unlink(missing_ok=True)
