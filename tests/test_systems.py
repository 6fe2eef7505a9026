"""The system tree (issue 13, item 2) on the tiny fixture: real instances, real snapshots into
the layer store, a real registry (Debian's docker-registry on 127.0.0.1) for the manifests.

What it shows: ``system create`` snapshots every VM and points at each VM's new layer;
``system snapshot --as CHILD`` gives a changed VM a new layer on top of its old one and keeps
an unchanged VM's layer; ``system tree`` draws the tree and ``--json`` gives it; ``system show
--json`` says parent, VMs, what changed; bad names and missing VMs are one line each with
nothing made; ``system push`` gives deploy-ready OCI manifests: a system node (its own
artifactType, the record as config, every blob its VMs need, its parent's digest) over
image-tree nodes, read back with plain HTTP.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, free_port, need, need_programs
from unionimg.fs.mounts import unmount_tree
from unionimg.registry import server as server_mod
from unionimg.registry.manifests import (
    ARTIFACT_SYSTEM,
    MEDIA_LAYER,
    MEDIA_SYSTEM_CONFIG,
    SYSTEM_REPO,
)

pytestmark = pytest.mark.usefixtures("root")

MACS = {"web": "52:54:00:13:00:01", "db": "52:54:00:13:00:02", "dns": "52:54:00:13:00:03"}


def change(cli: Cli, vm: str, where: Path, files: dict[str, str]) -> None:
    """Write ``files`` (path -> text) into VM's union, through a real mount."""
    mnt = where / f"mnt-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        for rel, text in files.items():
            path = mnt / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    finally:
        cli.ok("umount", str(mnt))


def make_vms(cli: Cli, where: Path, names: list[str]) -> None:
    for vm in names:
        cli.ok(
            "instance", "create", vm, "--base", "tiny", "--mac", MACS[vm], "--hypervisor",
            "uml", "--size", "64M", "--memory", "96",
        )  # fmt: skip
        change(cli, vm, where, {f"etc/{vm}.conf": f"role {vm}\n", "etc/motd": f"this is {vm}\n"})


def tiny_store(tmp: Path) -> Cli:
    need(Path("/bin/busybox").exists(), "busybox-static not installed")
    from vm_fixtures import build

    cli = Cli(tmp / "store")
    cli.ok("base", "create", "tiny", "--from-dir", str(build("tiny")))
    return cli


def show(cli: Cli, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("system", "show", name, "--json").output)
    return data


def layers_of(data: dict[str, Any]) -> dict[str, str]:
    return {vm["name"]: vm["layer"] for vm in data["vms"]}


def layer_rows(cli: Cli) -> dict[str, dict[str, Any]]:
    return {r["diff_id"]: r for r in json.loads(cli.ok("layer", "list", "--json").output)}


@pytest.fixture(scope="module")
def sys_cli(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Cli]:
    tmp = tmp_path_factory.mktemp("systems")
    cli = tiny_store(tmp)
    try:
        make_vms(cli, tmp, ["web", "db"])
        yield cli
    finally:
        unmount_tree(tmp)


def test_create_snapshot_tree_show(sys_cli: Cli, tmp_path: Path) -> None:
    cli = sys_cli
    out = cli.ok("system", "create", "lab1", "--instance", "web", "--instance", "db", "-m", "v1")
    assert "system lab1" in out.output
    one = show(cli, "lab1")
    assert one["parent"] is None and one["message"] == "v1"
    assert sorted(one["changed"]) == ["db", "web"]
    l1 = layers_of(one)
    rows = layer_rows(cli)
    for vm, diff_id in l1.items():
        # the VM's layer is a snapshot of its changes, over the base generation's layer
        assert rows[diff_id]["kind"] == "snapshot", rows[diff_id]
        assert rows[rows[diff_id]["parent"]]["kind"] == "base"
        inst = json.loads(cli.ok("instance", "show", vm, "--json").output)
        assert inst["mac"] == MACS[vm]
        assert {v["mac"] for v in one["vms"] if v["name"] == vm} == {MACS[vm]}
    assert l1["web"] != l1["db"]

    # only web changes; the child keeps db's layer and puts web's new one over its old
    change(cli, "web", tmp_path, {"etc/web.conf": "role web, cleaned\n"})
    out = cli.ok("system", "snapshot", "lab1", "--as", "lab2", "-m", "malware removed")
    assert "changed: web" in out.output
    two = show(cli, "lab2")
    l2 = layers_of(two)
    assert two["parent"] == "lab1" and two["changed"] == ["web"]
    assert l2["db"] == l1["db"]
    assert l2["web"] != l1["web"]
    assert layer_rows(cli)[l2["web"]]["parent"] == l1["web"]
    assert show(cli, "lab1")["children"] == ["lab2"]

    # nothing changed at all: a third node points at the very same layers
    cli.ok("system", "snapshot", "lab2", "--as", "lab3")
    three = show(cli, "lab3")
    assert layers_of(three) == l2 and three["changed"] == []

    tree = cli.ok("system", "tree").output
    lines = tree.splitlines()
    assert lines[0].startswith("lab1") and "v1" in lines[0]
    assert any(ln.lstrip("│ ").startswith("└── lab2") for ln in lines), tree
    assert any("lab3" in ln and ln.index("lab3") > lines[1].index("lab2") for ln in lines[2:])
    assert "web*:" in lines[1] and "db*:" not in lines[1]  # what the node changed is marked
    data = json.loads(cli.ok("system", "tree", "--json").output)
    assert [n["name"] for n in data] == ["lab1"]
    assert data[0]["children"][0]["name"] == "lab2"
    assert data[0]["children"][0]["children"][0]["name"] == "lab3"
    sub = json.loads(cli.ok("system", "tree", "lab2", "--json").output)
    assert [n["name"] for n in sub] == ["lab2"]


def test_bad_input_one_line_nothing_made(sys_cli: Cli) -> None:
    cli = sys_cli
    systems_dir = cli.store / "systems"
    before = sorted(p.name for p in systems_dir.iterdir()) if systems_dir.is_dir() else []
    res = cli.fails("system", "create", "x1", "--instance", "web", "--instance", "nosuch", code=3)
    assert "nosuch" in res.output
    cli.fails("system", "create", "x2", "--instance", "web", "--instance", "web", code=2)
    cli.fails("system", "create", "bad/name", "--instance", "web", code=2)
    cli.fails("system", "snapshot", "nosuch", "--as", "x3", code=3)
    cli.fails("system", "show", "nosuch", code=3)
    cli.fails("system", "tree", "nosuch", code=3)
    if "lab1" in before:
        cli.fails("system", "create", "lab1", "--instance", "web", code=4)
        cli.fails("system", "snapshot", "lab1", "--as", "lab2", code=4)
    after = sorted(p.name for p in systems_dir.iterdir()) if systems_dir.is_dir() else []
    assert after == before


def _get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def test_push_gives_deploy_ready_manifests(sys_cli: Cli, tmp_path: Path) -> None:
    need_programs("docker-registry")
    cli = sys_cli
    if not (cli.store / "systems" / "lab2").is_dir():
        pytest.fail("test_create_snapshot_tree_show must run first (it makes lab1, lab2)")
    srv = server_mod.start(tmp_path / "registry", f"127.0.0.1:{free_port()}")
    try:
        url = srv.url
        pushed = json.loads(cli.ok("system", "push", "lab2", "--registry", url, "--json").output)
        assert set(pushed["nodes"]) == {"lab1", "lab2"}
        assert pushed["manifest"] == pushed["nodes"]["lab2"]
        again = json.loads(cli.ok("system", "push", "lab2", "--registry", url, "--json").output)
        assert again["manifest"] == pushed["manifest"]  # the same node, the same digest
        assert again["bytes_sent"] < 16 << 10  # manifests only: every blob was there

        # a standard client: plain HTTP, the OCI distribution API
        tags = json.loads(_get(f"{url}/v2/{SYSTEM_REPO}/tags/list"))["tags"]
        assert {"lab1", "lab2"} <= set(tags)
        accept = "application/vnd.oci.image.manifest.v1+json"
        man = json.loads(_get(f"{url}/v2/{SYSTEM_REPO}/manifests/lab2", accept))
        assert man["artifactType"] == ARTIFACT_SYSTEM
        assert man["config"]["mediaType"] == MEDIA_SYSTEM_CONFIG
        assert man["annotations"]["org.unionimg.parent"] == pushed["nodes"]["lab1"]
        assert man["annotations"]["org.opencontainers.image.title"] == "lab2"
        config = json.loads(_get(f"{url}/v2/{SYSTEM_REPO}/blobs/{man['config']['digest']}"))
        record = show(cli, "lab2")
        assert config["name"] == "lab2" and config["parent"] == "lab1"
        assert config["vms"] == record["vms"]
        diff_ids = [d["annotations"]["org.unionimg.diff_id"] for d in man["layers"]]
        assert all(d["mediaType"] == MEDIA_LAYER for d in man["layers"])
        rows = layer_rows(cli)
        for vm in record["vms"]:  # each VM's whole chain is among the node's blobs
            layer = vm["layer"]
            while layer is not None:
                assert layer in diff_ids
                layer = rows[layer]["parent"]
        assert len(diff_ids) == len(set(diff_ids))  # the shared base once
        for d in man["layers"]:  # every blob is fetchable from the system's repository
            req = urllib.request.Request(
                f"{url}/v2/{SYSTEM_REPO}/blobs/{d['digest']}", method="HEAD"
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert int(resp.headers["content-length"]) == d["size"]
    finally:
        srv.stop()


# -- what comes from elsewhere: a registry's record, a host's words ------------------------------
def _record(**over: Any) -> Any:
    from unionimg.store.fleet_records import SystemMeta, SystemVM

    vm = SystemVM("web", "sha256:" + "a" * 64, "52:54:00:13:00:01", "uml", 96, 1, 64 << 20)
    fields: dict[str, Any] = {
        "name": "lab", "parent": None, "created": "x", "message": "", "vms": (vm,),
    }  # fmt: skip
    fields.update(over)
    return SystemMeta(**fields)


def test_a_registry_record_is_checked() -> None:

    from unionimg import systems
    from unionimg.errors import ToolFailed

    good = _record()
    assert systems.parse_record(systems.record_json(good), "r@d") == good
    vm = good.vms[0]
    bad = [
        _record(name="../x"),
        _record(parent="a/b"),
        _record(vms=()),
        _record(vms=(vm, vm)),  # a name twice
        _record(vms=(vm, vm.replace(name="db"))),  # a MAC twice
        _record(vms=(vm.replace(name="-x"),)),
        _record(vms=(vm.replace(layer="sha256:zz"),)),
        _record(vms=(vm.replace(mac="ff:ff:ff:ff:ff:ff"),)),
        _record(vms=(vm.replace(hypervisor="bochs"),)),
        _record(vms=(vm.replace(nic_name="a/b"),)),
        _record(vms=(vm.replace(memory=1 << 40),)),
    ]
    for rec in bad:
        with pytest.raises(ToolFailed) as err:
            systems.parse_record(systems.record_json(rec), "r@d")
        assert "refused" in err.value.message and "\n" not in err.value.message
    for data in (b"", b"[]", b'{"name": 1}', b"\xff"):
        with pytest.raises(ToolFailed):
            systems.parse_record(data, "r@d")


def test_ssh_targets_and_remote_words(tmp_path: Path) -> None:
    from unionimg import hosts
    from unionimg.errors import (
        Conflict,
        MissingCapability,
        NotFound,
        StoreFull,
        ToolFailed,
        UsageError,
    )
    from unionimg.runner import Result
    from unionimg.store.fleet_records import HostMeta
    from unionimg.store.layout import Store

    assert hosts.parse_ssh("root@192.0.2.7") == hosts.Target("root", "192.0.2.7")
    assert hosts.parse_ssh("ops@[2001:db8::1]").addr == "2001:db8::1"
    for bad in ("root", "@host", "root@", "ro ot@h", "root@-oProxyCommand=x", "r@h;ls", "R@h"):
        with pytest.raises(UsageError):
            hosts.parse_ssh(bad)
    meta = HostMeta("h1", "root", "192.0.2.7", 22, "/srv/store x", "unionimg", "now")
    store = Store(tmp_path / "store")
    store.init()
    host = hosts.Host(store, meta)
    argv = ["system", "materialize", "a b'c", "--json"]
    words = ["unionimg", "--store", "/srv/store x", *argv]
    import shlex

    remote = host.remote_argv(argv)
    assert remote[-2] == "--" and shlex.split(remote[-1]) == words  # each argument intact

    def err(code: int, text: str) -> Exception:
        return host.error(Result(("ssh",), code, "", text), "x")

    e = err(
        255,
        "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.",
    )
    assert isinstance(e, Conflict) and "host key" in str(e)
    assert isinstance(err(255, "root@192.0.2.7: Permission denied (publickey)."), MissingCapability)
    assert isinstance(err(255, "ssh: connect to host 192.0.2.7 port 22: No route"), ToolFailed)
    e = err(3, "unionimg: error: no system named 'x'")
    assert isinstance(e, NotFound) and str(e).startswith("host h1: no system")
    assert isinstance(err(7, "unionimg: error: store full: ..."), StoreFull)
    assert isinstance(err(127, "bash: unionimg: command not found"), MissingCapability)


def test_a_host_report_is_reshaped() -> None:
    from unionimg import deploy
    from unionimg.errors import ToolFailed

    with pytest.raises(ToolFailed):
        deploy._checked("h1", ["not", "a", "dict"])
    out = deploy._checked(
        "h1",
        {
            "bytes_pulled": "1e99", "cache_hits": -3, "vms": "web", "booted": ["\x1b[2Jweb" * 50],
            "seconds": "soon", "imported": [1, 2], "extra": {"x": 1},
        },
    )  # fmt: skip
    assert out["bytes_pulled"] == 0 and out["cache_hits"] == 0 and out["vms"] == []
    assert len(out["booted"][0]) == 200 and out["seconds"] == 0.0
    assert out["imported"] == ["1", "2"] and "extra" not in out


# -- VMs on snapshot layers: status against the chain, identity from the chain ------------------
def edit(cli: Cli, vm: str, where: Path, fn: Any) -> None:
    """``fn(root)`` on VM's union, through a real mount."""
    mnt = where / f"mnt-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        fn(mnt)
    finally:
        cli.ok("umount", str(mnt))


def test_status_compares_against_the_chain(sys_cli: Cli, tmp_path: Path) -> None:
    """A VM on a snapshot layer that added /etc/layer.conf and deleted /etc/motd: its
    status compares its upper layer with what the layer shows, not with the base."""
    cli = sys_cli
    cli.ok("instance", "create", "chainsrc", "--base", "tiny", "--size", "64M")

    def first(root: Path) -> None:
        (root / "etc" / "layer.conf").write_text("from the layer\n")
        (root / "etc" / "same.conf").write_text("kept as is\n")
        (root / "etc" / "gone.conf").write_text("deleted later\n")
        (root / "etc" / "motd").unlink()

    edit(cli, "chainsrc", tmp_path, first)
    snap = json.loads(cli.ok("instance", "snapshot", "chainsrc", "--json").output)
    cli.ok("instance", "create", "onchain", "--from", snap["layer"], "--size", "64M")
    from vm_fixtures import build

    base_motd = (build("tiny") / "etc" / "motd").read_text()

    def second(root: Path) -> None:
        (root / "etc" / "layer.conf").write_text("changed in the VM\n")  # modified
        (root / "etc" / "same.conf").write_text("kept as is\n")  # rewritten, same content
        (root / "etc" / "gone.conf").unlink()  # deleted
        (root / "etc" / "motd").write_text(base_motd)  # the base's motd, which the layer deleted

    edit(cli, "onchain", tmp_path, second)
    st = json.loads(cli.ok("status", "onchain", "--json").output)
    assert st["modified"] == ["/etc/layer.conf"], st  # against the base: added
    assert "/etc/same.conf" in st["identical"], st  # against the base: added
    assert st["deleted"] == ["/etc/gone.conf"], st
    assert "/etc/motd" in st["added"], st  # against the base: identical
    assert "/etc/layer.conf" not in st["added"] and "/etc/same.conf" not in st["added"]


def test_vms_from_a_layer_with_sshd_get_their_own_identity(sys_cli: Cli, tmp_path: Path) -> None:
    """The tiny base has neither sshd nor systemd; a snapshot layer adds both (their marker
    files). Two VMs made --from that layer each get SSH host keys and a machine-id of their
    own (the layer holds none), as VMs on a base with sshd do."""
    cli = sys_cli
    cli.ok("instance", "create", "keysrc", "--base", "tiny", "--size", "64M")

    def install(root: Path) -> None:
        for rel in ("usr/sbin/sshd", "lib/systemd/systemd"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("#!/bin/sh\n")
        (root / "etc" / "ssh").mkdir(exist_ok=True)
        (root / "etc" / "ssh" / "sshd_config").write_text("Port 22\n")

    edit(cli, "keysrc", tmp_path, install)
    snap = json.loads(cli.ok("instance", "snapshot", "keysrc", "--json").output)
    seen: dict[str, tuple[str, str]] = {}
    for vm in ("keys1", "keys2"):
        cli.ok("instance", "create", vm, "--from", snap["layer"], "--size", "64M")
        got: dict[str, str] = {}

        def read(root: Path, got: dict[str, str] = got) -> None:
            for kind in ("rsa", "ecdsa", "ed25519"):
                key = root / "etc" / "ssh" / f"ssh_host_{kind}_key"
                assert key.is_file() and (root / "etc" / "ssh" / f"{key.name}.pub").is_file()
                assert key.stat().st_mode & 0o777 == 0o600
            pub = root / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
            got["key"] = pub.read_text()
            got["id"] = (root / "etc" / "machine-id").read_text().strip()

        edit(cli, vm, tmp_path, read)
        assert len(got["id"]) == 32 and int(got["id"], 16) != 0
        seen[vm] = (got["key"], got["id"])
    assert seen["keys1"][0] != seen["keys2"][0]
    assert seen["keys1"][1] != seen["keys2"][1]
    # a VM on the base alone gets none (the base has neither)
    cli.ok("instance", "create", "plain", "--base", "tiny", "--size", "64M")
    edit(cli, "plain", tmp_path, lambda r: _assert_no_identity(r))


def _assert_no_identity(root: Path) -> None:
    assert not (root / "etc" / "machine-id").exists()
    assert not list((root / "etc").glob("ssh/ssh_host_*"))


def test_chain_view_follows_overlayfs_rules(tmp_path: Path, root: None) -> None:
    """ChainView over real layer trees (a whiteout is a 0:0 character device, an opaque
    directory carries trusted.overlay.opaque=y): the top layer holding a path answers; a
    whiteout, an opaque directory or a non-directory hides what lies below it."""
    import os

    from unionimg.entries import DIR, FILE, Entry
    from unionimg.fs.manifest import scan_tree
    from unionimg.layers.chainview import ChainView

    base = {
        p: Entry(p, DIR if k == "d" else FILE, size=1, sha256="b" * 64)
        for p, k in [("/etc", "d"), ("/etc/a", "f"), ("/etc/b", "f"), ("/opt", "d"),
                     ("/opt/x", "f"), ("/srv", "d"), ("/srv/y", "f"), ("/usr", "d")]
    }  # fmt: skip
    top, mid = tmp_path / "top", tmp_path / "mid"
    for d in (top / "etc", mid / "opt", mid / "srv", mid / "etc"):
        d.mkdir(parents=True)
    (top / "etc" / "a").write_text("new a\n")  # answers over the base
    os.mknod(top / "etc" / "b", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    os.setxattr(mid / "opt", "trusted.overlay.opaque", b"y")  # opaque: hides /opt/x
    (mid / "opt" / "z").write_text("z\n")
    (mid / "srv").rmdir()
    (mid / "srv").write_text("a file now\n")  # a non-directory: hides /srv/y
    layers = []
    for r in (top, mid):
        entries = scan_tree(r, hash_files=False, digests=False)
        layers.append((r, {e.path: e for e in entries if e.path != "/"}))
    view = ChainView(base, layers)
    a = view.get("/etc/a")
    assert a is not None and a.size == 6 and a.sha256 is not None and a.sha256 != "b" * 64
    assert view.get("/etc/b") is None
    assert view.get("/opt/x") is None and view.get("/opt/z") is not None
    opt = view.get("/opt")
    assert opt is not None and opt.kind == DIR
    assert view.get("/srv/y") is None
    srv = view.get("/srv")
    assert srv is not None and srv.kind == FILE
    assert view.get("/usr") == base["/usr"] and view.get("/nothing") is None


def test_layer_extraction_falls_back_to_disk(
    tmp_path: Path, root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a size claim to make its image first (the other way of
    ``layerstore._import_build``), a layer is extracted on a tmpfs (never written to disk
    before mke2fs copies it into the image); one larger than the tmpfs may hold is
    extracted on disk instead, the same layer. Here the tmpfs gets 64 KiB for a 1 MiB file:
    the import still makes the layer, its image gives back its digest, and no tmpfs is left
    mounted."""
    import os

    from unionimg.fs.mounts import mountinfo
    from unionimg.layers import layerstore
    from unionimg.store.layout import Store

    store = Store(tmp_path / "store")
    Cli(store.root).ok("layer", "list")  # a store made by the CLI
    tree = tmp_path / "tree"
    (tree / "srv").mkdir(parents=True)
    (tree / "srv" / "data").write_bytes(os.urandom(1 << 20))
    avail = layerstore._available_memory()
    monkeypatch.setattr(layerstore, "_direct_geometry", lambda store, hint: None)
    monkeypatch.setattr(layerstore, "SCRATCH_MIN", 0)
    monkeypatch.setattr(layerstore, "SCRATCH_SHARE", max(avail // (64 << 10), 1))
    calls: list[Path] = []
    from unionimg.layers.layer import read_blob as real_read

    def counted(blob: Path, dest: Path, **kw: Any) -> Any:
        calls.append(dest)
        return real_read(blob, dest, **kw)

    monkeypatch.setattr(layerstore, "read_blob", counted)  # the real reader, counted
    layer, new = layerstore.put_tree(
        store, tree, parent=None, kind="base", origin=layerstore.Origin(text="test")
    )
    assert new and len(calls) == 2  # on the tmpfs (full), then on disk
    with store.staging("check") as stage, layerstore.mounted(store, layer, stage / "m") as t:
        assert (t / "srv" / "data").read_bytes() == (tree / "srv" / "data").read_bytes()
        assert layerstore.tree_digest(t, kind="base").diff_id == layer.diff_id
    assert not [m for m in mountinfo() if str(store.root) in m.target]


# -- a system's pull: every blob checked before the first import (pure: a registry stand-in) ----
class _FakeRegistry:
    """What :func:`unionimg.registry.transfer.pull_nodes` asks of a registry, in memory: the
    blob GET checks the sha256 on arrival and renames only a match, as the real client does;
    ``events`` says what was fetched, in order."""

    def __init__(self) -> None:
        from unionimg.registry.client import Counters

        self.url = "http://fake"
        self.counters = Counters()
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.events: list[str] = []

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        from unionimg.errors import NotFound
        from unionimg.registry.manifests import digest_of

        if ref not in self.manifests:
            raise NotFound(f"no manifest {ref}")
        data = self.manifests[ref]
        return data, digest_of(data)

    def get_small_blob(self, repo: str, digest: str, cap: int) -> bytes:
        return self.blobs[digest]

    def fetch_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        dest: Path,
        *,
        on_bytes: Any = None,
        follow: Any = None,
    ) -> int:
        from unionimg.errors import ToolFailed
        from unionimg.registry.manifests import digest_of

        self.events.append(f"fetch {digest[7:11]}")
        data = self.blobs[digest]
        self.counters.bytes_down += len(data)
        if digest_of(data) != digest:
            raise ToolFailed(f"blob {digest} has digest {digest_of(data)}: refused")
        dest.write_bytes(data)
        if follow is not None:
            follow.finish(dest)
        return len(data)


def _fake_chains() -> tuple[_FakeRegistry, dict[str, str], dict[str, bytes]]:
    """A base layer B and two layers over it, W and D (two VMs' chains), as image-tree nodes
    in a fake registry; (registry, name -> diff_id, name -> the right blob bytes)."""
    from unionimg.registry.manifests import digest_of, layer_blob, layer_manifest, layer_tag

    reg = _FakeRegistry()
    diff = {"B": "sha256:" + "b" * 64, "W": "sha256:" + "e" * 64, "D": "sha256:" + "d" * 64}
    blobs = {n: f"blob of {n} ".encode() * 100 for n in diff}
    descs = {n: layer_blob(digest_of(blobs[n]), len(blobs[n]), diff[n]) for n in diff}
    for n in diff:
        reg.blobs[digest_of(blobs[n])] = blobs[n]

    def node(name: str, chain: list[str], parent: str | None) -> str:
        meta = json.dumps({"diff_id": diff[name], "kind": "snapshot"}).encode()
        reg.blobs[digest_of(meta)] = meta
        data = layer_manifest(
            meta, [descs[c] for c in chain], title=name, parent=parent, created="2026-12-02"
        )
        reg.manifests[layer_tag(diff[name])] = data
        reg.manifests[digest_of(data)] = data
        return digest_of(data)

    base = node("B", ["B"], None)
    node("W", ["B", "W"], base)
    node("D", ["B", "D"], base)
    return reg, diff, blobs


class _FakeStaged:
    """A layer 'built' from its blob; publishing it is the import the events record."""

    def __init__(self, reg: _FakeRegistry, held: set[str], diff_id: str, parent: str | None,
                 fail: bool) -> None:  # fmt: skip
        self.reg, self.held, self.diff_id, self.parent, self.fail = reg, held, diff_id, parent, fail

    def publish(self) -> None:
        from unionimg.errors import ToolFailed

        assert self.parent is None or self.parent in self.held
        self.reg.events.append(f"import {self.diff_id[7:8]}")
        if self.fail:
            raise ToolFailed(f"layer {self.diff_id} refused")
        self.held.add(self.diff_id)

    def discard(self) -> None:
        pass


def _fake_host(reg: _FakeRegistry, held: set[str], fail_on: str | None = None) -> dict[str, Any]:
    def stage_blob(
        blob: Path, meta: bytes, diff_id: str, parent: str | None, d: str, /, *, follow: Any = None
    ) -> _FakeStaged:
        path = follow.wait() if follow is not None else blob  # its bytes arrived, checked
        assert path.read_bytes() == reg.blobs[d]
        return _FakeStaged(reg, held, diff_id, parent, diff_id == fail_on)

    def undo(diff_id: str) -> None:
        reg.events.append(f"undo {diff_id[7:8]}")
        held.remove(diff_id)

    return {"have": held.__contains__, "stage_blob": stage_blob, "undo": undo}


def _pull(reg: _FakeRegistry, refs: list[str], dl: Path, host: dict[str, Any]) -> Any:
    from typing import cast

    from unionimg.registry import transfer
    from unionimg.registry.client import Registry
    from unionimg.registry.manifests import LAYER_REPO

    return transfer.pull_nodes(cast(Registry, reg), LAYER_REPO, refs, download_dir=dl, **host)


def test_a_system_pull_fetches_every_blob_before_importing_any(tmp_path: Path) -> None:
    """Two VMs' chains pulled at once (what materialize does): the shared base fetched once,
    every blob fetched and checked before the first import; the report splits its seconds
    into fetching and importing. A tampered blob of the second VM: nothing imported (before,
    the first VM's layers were imported already), the verified blobs kept; once the registry
    serves the right bytes, only that blob travels. An import that fails undoes the ones
    before it (top first): the host holds what it held."""
    from unionimg.errors import ToolFailed
    from unionimg.registry.manifests import digest_of, layer_tag

    reg, diff, blobs = _fake_chains()
    refs = [layer_tag(diff["W"]), layer_tag(diff["D"])]
    tampered = digest_of(blobs["D"])
    reg.blobs[tampered] = blobs["D"][:-1] + b"X"
    held: set[str] = set()
    dl = tmp_path / "downloads"
    with pytest.raises(ToolFailed, match="refused"):
        _pull(reg, refs, dl, _fake_host(reg, held))
    assert held == set()
    assert not any(e.startswith("import") for e in reg.events), reg.events
    kept = sorted(p.name for p in dl.iterdir())
    assert kept == sorted(digest_of(blobs[n])[7:] + ".blob" for n in ("B", "W"))

    reg.blobs[tampered] = blobs["D"]  # the registry repaired
    reg.events.clear()
    before = reg.counters.bytes_down
    report = _pull(reg, refs, dl, _fake_host(reg, held))
    assert reg.events == ["fetch " + tampered[7:11], "import b", "import e", "import d"]
    assert report.bytes_pulled == reg.counters.bytes_down - before >= len(blobs["D"])
    assert report.imported == [diff["B"], diff["W"], diff["D"]] and report.cache_hits == 0
    assert report.layers == [diff["B"], diff["W"], diff["D"]] and not any(dl.iterdir())
    assert report.manifest == "" and report.ref == " ".join(refs)
    assert report.fetch_seconds >= 0 and report.import_seconds >= 0
    assert report.fetch_seconds + report.import_seconds <= report.seconds + 1e-6
    out = report.to_json()
    assert {"fetch_seconds", "import_seconds", "seconds"} <= set(out)

    # all held: nothing fetched, every layer a cache hit
    reg.events.clear()
    again = _pull(reg, refs, dl, _fake_host(reg, held))
    assert reg.events == [] and again.cache_hits == 3 and again.imported == []

    # an import that fails (D's): B and W, imported just before, are removed again
    held2: set[str] = set()
    dl2 = tmp_path / "downloads2"
    reg.events.clear()
    with pytest.raises(ToolFailed, match="refused"):
        _pull(reg, refs, dl2, _fake_host(reg, held2, diff["D"]))
    assert held2 == set()
    assert reg.events[-5:] == ["import b", "import e", "import d", "undo e", "undo b"]
    assert len(list(dl2.iterdir())) == 3  # verified, kept for the next pull


def test_the_deploy_report_splits_pull_seconds() -> None:
    """fetch_seconds (the network) and import_seconds (extracting the blobs) go from the
    host's materialize report through the controller's reshaping into the deploy JSON."""
    from unionimg import deploy, systems

    mat = systems.Materialized("lab", "sha256:" + "a" * 64, "http://r")
    mat.fetch_seconds, mat.import_seconds = 1.25, 2.5
    mat.pull_seconds = mat.fetch_seconds + mat.import_seconds
    host = json.loads(json.dumps(mat.to_json()))
    assert (host["fetch_seconds"], host["import_seconds"], host["pull_seconds"]) == (
        1.25,
        2.5,
        3.75,
    )
    out = deploy.HostOutcome("h1", ok=True, result=deploy._checked("h1", host)).to_json()
    assert out["fetch_seconds"] == 1.25 and out["import_seconds"] == 2.5
    assert out["fetch_seconds"] + out["import_seconds"] == out["pull_seconds"]


def test_a_vm_that_fails_undoes_the_vms_made_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy makes its VMs a few at once (:data:`systems.VM_WORKERS`); when one fails,
    the ones not started are not made, the ones made (before or beside it) are removed and
    the VM it was replacing is put back: the host holds what it held. The VM making itself
    is replaced here by one that makes a directory (its real work is tested above and in
    test_deploy_real): what is checked is the undoing around it."""
    from unionimg import systems
    from unionimg.errors import ToolFailed
    from unionimg.store.fleet_records import SystemMeta, SystemVM
    from unionimg.store.layout import Store

    store = Store(tmp_path / "store")
    store.tmp_dir.mkdir(parents=True)
    old = store.instance_dir("vm0")
    old.mkdir(parents=True)
    (old / "instance.json").write_text("the replaced VM\n")
    started: list[str] = []

    def make(_store: Store, name: str, _layer: str, **_kw: object) -> None:
        started.append(name)
        if name == "vm1":
            time.sleep(0.02)
            raise ToolFailed("mke2fs failed making vm1's U image")
        time.sleep(0.1)  # the ones beside it finish after it failed
        store.instance_dir(name).mkdir()

    monkeypatch.setattr("unionimg.layers.snapshot.create_from", make)
    monkeypatch.setattr("unionimg.boot.control.forget", lambda _store, _name: None)
    layer = "sha256:" + "a" * 64
    vms = tuple(
        SystemVM(
            name=f"vm{i}",
            layer=layer,
            mac=f"52:54:00:14:00:{i:02x}",
            hypervisor="uml",
            memory=96,
            vcpus=1,
            size=64 << 20,
        )
        for i in range(12)
    )
    meta = SystemMeta(name="s", parent=None, created="2026-12-03T00:00:00Z", message="", vms=vms)
    notes: list[tuple[str, int, int]] = []
    with pytest.raises(ToolFailed, match="vm1"):
        systems._make_vms(store, meta, ["vm0"], lambda *a: notes.append(a))
    assert sorted(p.name for p in store.instances_dir.iterdir()) == ["vm0"]
    assert (old / "instance.json").read_text() == "the replaced VM\n"
    assert len(started) < len(vms), started  # the failure stopped what had not started
    assert list(store.tmp_dir.iterdir()) == []
    assert notes[0] == ("vm", 0, 12) and all(n[2] == 12 for n in notes)
