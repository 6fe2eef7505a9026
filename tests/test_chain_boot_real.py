"""End to end (issue 13, item 1): a VM whose image is a chain base -> A -> XA boots under kvm
(QEMU TCG through libvirt) and uml with every lower layer in its union.

The store holds the ``tiny`` base (plus the chain's base files, tests/chainlayers.py); a VM
changed through its mounted union and snapshotted twice with ``instance snapshot`` makes
layer A (adds a file, overrides one of BASE's) and XA over it (overrides that file again,
deletes one of BASE's files: a whiteout, replaces a directory: opaque). Each test VM is made
``instance create --from XA``; ``unionimg boot`` attaches both layer images read-only and
names them on the kernel command line; a boot hook in layer A prints what the guest sees.

Also: ``switch`` between the hypervisors keeps the chain (no disk copy); a layer image whose
label is not the one the chain names makes the guest's initramfs fail naming it and ``boot``
exit 9 with that line (never success); a layer image missing from the store is refused
before anything starts (exit 3).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import chainlayers
from tests.conftest import Cli
from tests.test_boot_real import cleanup_guest, guest_lines, need_guests
from unionimg.fs.mounts import unmount_tree
from unionimg.layers import layerstore
from unionimg.layers.instance import load
from unionimg.runner import run
from unionimg.store.layout import Store


@dataclass(frozen=True)
class ChainStore:
    cli: Cli
    store: Store
    top: layerstore.Layer  # XA
    mid: layerstore.Layer  # A

    @property
    def labels(self) -> tuple[str, str]:
        return (self.top.meta.label, self.mid.meta.label)


@pytest.fixture(scope="module")
def chain_store(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[ChainStore]:
    """The tiny base (with the chain's base files); VM ``src`` changed through its mounted
    union and snapshotted twice (``instance snapshot``): A, then XA over A."""
    need_guests()
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("chain")
    tree = tmp / "tiny-chain"
    run(["cp", "-a", str(build("tiny")), str(tree)])  # device nodes as nodes
    chainlayers.add_base_files(tree)
    cli = Cli(tmp / "store")
    cli.ok("base", "create", "tiny", "--from-dir", str(tree))
    store = Store(tmp / "store")
    cli.ok("instance", "create", "src", "--base", "tiny")
    mnt = tmp / "mnt"
    mnt.mkdir()
    for message, change in (("A", chainlayers.write_a), ("XA", chainlayers.write_xa_through_union)):
        cli.ok("mount", "src", str(mnt))
        try:
            change(mnt)
        finally:
            cli.ok("umount", str(mnt))
        made = json.loads(cli.ok("instance", "snapshot", "src", "-m", message, "--json").output)
        print(f"snapshot {message}: {made}")
    top_id, mid_id = load(store, "src").layers
    top, mid = layerstore.get(store, top_id), layerstore.get(store, mid_id)
    assert mid.parent is not None and top.parent == mid.diff_id
    try:
        yield ChainStore(cli, store, top, mid)
    finally:
        for inst in json.loads(cli.ok("instance", "list", "--json").output):
            cleanup_guest(cli, inst["name"])
        unmount_tree(tmp)


def chained_vm(cs: ChainStore, name: str, hypervisor: str) -> None:
    """A VM made from node XA (``instance create --from``): its chain is XA -> A -> base."""
    cs.cli.ok("instance", "create", name, "--from", cs.top.diff_id, "--hypervisor", hypervisor)
    assert load(cs.store, name).layers == (cs.top.diff_id, cs.mid.diff_id)


def check_chain_seen(cs: ChainStore, vm: str, device: str) -> list[str]:
    """The guest saw XA's file, not the whited-out one, A's own file and BASE's; its root is
    the overlay of both layers over BASE; the initramfs found each layer by label."""
    lines = guest_lines(cs.cli, vm)
    for expected in chainlayers.EXPECTED:
        assert expected in lines, lines
    top, mid = cs.labels
    lowerdir = f"lowerdir=/run/unionimg/layers/{top}:/run/unionimg/layers/{mid}:/run/unionimg/base,"
    assert any(ln.startswith("unionimg-guest: chain root ") and lowerdir in ln for ln in lines)
    console = cs.cli.ok("console", vm).output
    assert f"unionimg-init: layer {top} is /dev/{device}c" in console
    assert f"unionimg-init: layer {mid} is /dev/{device}d" in console
    return lines


def test_chain_boots_under_kvm_and_uml_and_switch_keeps_it(chain_store: ChainStore) -> None:
    cs, vm = chain_store, "chain1"
    chained_vm(cs, vm, "kvm")
    images = {la.image: la.image.read_bytes() for la in (cs.top, cs.mid)}
    try:
        started = time.monotonic()
        out = json.loads(cs.cli.ok("boot", vm, "--wait", "--timeout", "240", "--json").output)
        took = time.monotonic() - started
        print(f"kvm ({out['domain_type']}): chain boot to power-off {took:.1f} s")
        assert out["state"] == "stopped" and out["stopped"] and out["ready_s"] > 0
        check_chain_seen(cs, vm, "vd")
        assert "unionimg-guest: boot 1" in guest_lines(cs.cli, vm)
        show = json.loads(cs.cli.ok("instance", "show", vm, "--json").output)
        u_image = Path(show["upper_image"])
        u_size = u_image.stat().st_size

        started = time.monotonic()
        res = cs.cli.ok("switch", vm, "--to", "uml", "--boot", "--wait", "--json")
        print(f"uml: switch + chain boot to power-off {time.monotonic() - started:.1f} s")
        out = json.loads(res.output)
        assert out["from"] == "kvm" and out["to"] == "uml" and out["boot"]["stopped"]
        check_chain_seen(cs, vm, "ubd")
        assert "unionimg-guest: boot 2" in guest_lines(cs.cli, vm)  # the same U, no copy
        assert u_image.stat().st_size == u_size
    finally:
        cleanup_guest(cs.cli, vm)
    # the layers are read-only to the guest: byte for byte what the store made
    for image, content in images.items():
        assert image.read_bytes() == content


@pytest.mark.parametrize("hypervisor", ["uml", "kvm"])
def test_a_layer_the_guest_cannot_find_fails_the_boot(
    chain_store: ChainStore, hypervisor: str
) -> None:
    """A's image no longer carries the label the chain names: the initramfs waits its bounded
    time, says which label it lacks and what to attach, powers off; boot exits 9 quoting it."""
    cs, vm = chain_store, f"chainmiss-{hypervisor}"
    chained_vm(cs, vm, hypervisor)
    image, label = cs.mid.image, cs.mid.meta.label
    try:
        run(["tune2fs", "-L", "Lfffffffffffffff", str(image)])
        started = time.monotonic()
        res = cs.cli.fails(
            "boot", vm, "--wait", "--timeout", "240", "--append", "unionimg.timeout=2", code=9
        )
        print(f"{hypervisor}: failed boot reported in {time.monotonic() - started:.1f} s")
        line = res.output.strip()
        # boot's one line quotes the initramfs's error (shortened); the console has it whole
        assert (
            f"instance '{vm}' failed to boot: the initramfs failed: no disk with LABEL={label} "
        ) in line
        console = cs.cli.ok("console", vm).output
        error = re.search(r"^unionimg-init: error: (.*)$", console, re.MULTILINE)
        assert error is not None, console[-3000:]
        message = error.group(1).strip()
        assert message.startswith(f"no disk with LABEL={label} after 2 s (block devices: ")
        assert message.endswith(
            f"attach the layer images of its chain ({label}; unionimg layer show)"
        )
        assert cs.top.meta.label not in message  # XA was found
        show = json.loads(cs.cli.ok("instance", "show", vm, "--json").output)
        assert show["state"] != "running"
        assert not [ln for ln in guest_lines(cs.cli, vm) if "chain" in ln]
    finally:
        run(["tune2fs", "-L", label, str(image)])
        cleanup_guest(cs.cli, vm)


def test_a_layer_image_missing_from_the_store_is_refused_before_start(
    chain_store: ChainStore,
) -> None:
    cs, vm = chain_store, "chaingone"
    chained_vm(cs, vm, "uml")
    image = cs.top.image
    aside = image.with_name("layer.img.aside")
    image.rename(aside)
    try:
        res = cs.cli.fails("boot", vm, code=3)
        assert re.search(
            rf"instance {vm}: the image of its layer {cs.top.short} is missing", res.output
        )
        show = json.loads(cs.cli.ok("instance", "show", vm, "--json").output)
        assert show["state"] == "stopped"
    finally:
        aside.rename(image)
        cleanup_guest(cs.cli, vm)
