"""One conformance suite for every hypervisor driver (:mod:`unionimg.hypervisors`).

Each test runs once per registered driver, so a new driver is held to all of it by being
registered (like containers/storage's ``graphtest``, which every graph driver's tests call):

- the registry: every name the CLI accepts has a driver, and nothing else;
- capabilities tell the truth: a driver that can start guests can boot here (this lab must
  run kvm and uml; under UNIONIMG_REQUIRE_REAL=1 anything less fails), one that cannot says
  why and names the real validators that check its files instead;
- render is deterministic (the same bytes twice, and in another interpreter with another hash
  seed), writes nothing, and refuses hostile names and values in one line; hostile paths are
  either refused in one line or rendered into files that still pass the validators;
- what ``prepare`` makes passes each of the driver's real validators (``virt-xml-validate``,
  libvirt's in-process test driver, ``qemu-img info``/``compare`` on the VMDKs, ``sh -n`` and
  ``bash -n``);
- the running record round-trips through JSON; ``stop``, ``release`` and ``forget`` are
  idempotent on a guest that is not there;
- what can boot here boots, once per driver: kvm through libvirt (QEMU TCG on this lab: the
  domain type its probe picks), uml with the kernel ``umlprobe.select`` picks, through
  :func:`unionimg.boot.control.launch` as ``boot`` does; the guest reaches the initramfs's
  hand-over to the union root with the instance's fixed MAC on a NIC named by the rendered
  udev rule; it is found running, stopped through the driver, and leaves nothing behind;
  what cannot boot here refuses to start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from tests import test_drivers
from tests.conftest import need, need_programs, need_root, need_uml_kernel
from unionimg import hypervisors
from unionimg.boot import kernel as boot_kernel
from unionimg.boot.control import launch, write_rendered
from unionimg.errors import MissingCapability, UsageError
from unionimg.hypervisors import KERNEL_KINDS, Driver, Prepared, Running, kvm, uml
from unionimg.hypervisors.profiles import render_net_naming
from unionimg.hypervisors.spec import BootSpec, instance_uuid
from unionimg.layers.running import READY, console_verdict
from unionimg.names import HYPERVISORS
from unionimg.poll import until
from unionimg.runner import run

REPO = Path(__file__).resolve().parent.parent
NAMES = hypervisors.names()
BOOTABLE = tuple(n for n in NAMES if hypervisors.get(n).capabilities.can_start)
MAC = "52:54:00:c0:4f:01"
HOSTILE = "a'b\"c<d>&e"
BOOT_TIMEOUT = 240.0  # TCG on 2 busy cores

# the lab of the driver tests: the tiny BASE, an empty U tree, the initramfs; libvirt
lab = test_drivers.lab
conn = test_drivers.conn


def each_driver(*, root_for_bootable: bool = False) -> pytest.MarkDecorator:
    """Parametrize a test over every registered driver (``name``)."""
    params = [
        pytest.param(n, marks=pytest.mark.root if root_for_bootable and n in BOOTABLE else ())
        for n in NAMES
    ]
    return pytest.mark.parametrize("name", params)


# --- a spec on paper (files that exist, no guest) --------------------------------------------


def raw_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)
        fh.seek(size // 2)
        fh.write(path.name.encode())  # distinct content, so a wrong extent shows
    return path


def paper_spec(driver: Driver, where: Path, name: str = "conf1") -> BootSpec:
    """A spec whose images, kernel and initramfs exist as small files under ``where``, and
    whose workdir holds a boot disk placeholder (the virtualbox profile stats it)."""
    work = where / "run"
    kernel = "linux.uml" if driver.capabilities.kernel == "uml" else "vmlinuz-conformance"
    raw_file(work / "boot.img", 1 << 20)
    return BootSpec(
        name=name,
        uuid=instance_uuid(name),
        mac=MAC,
        nic_name="eth0",
        memory_mib=256,
        vcpus=1,
        base_image=raw_file(where / "images" / "BASE.img", 2 << 20),
        upper_image=raw_file(where / "images" / "U.img", 1 << 20),
        kernel=raw_file(where / "boot" / kernel, 1 << 20),
        initrd=raw_file(where / "boot" / "initrd.img", 1 << 20),
        cmdline="panic=-1 unionimg.timeout=20",
        console_log=work / "console.log",
        workdir=work,
        tap=driver.host_tap(name),
    )


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


# --- the real validators, by the names drivers declare ---------------------------------------


def _of(prepared: Prepared, suffix: str) -> list[str]:
    found = sorted(n for n in prepared.files if n.endswith(suffix))
    assert found, f"no *{suffix} file to validate in {sorted(prepared.files)}"
    return found


def virt_xml_validate(prepared: Prepared) -> None:
    need_programs("virt-xml-validate", "xmllint")
    for name in _of(prepared, ".xml"):
        path = prepared.spec.workdir / name
        result = run(["virt-xml-validate", str(path), "domain"], check=False)
        assert result.returncode == 0 and "validates" in result.stdout + result.stderr, (
            name,
            result.stdout + result.stderr,
        )


def libvirt_test_driver(prepared: Prepared) -> None:
    """libvirt itself defines each domain in-process and reads back what identifies it."""
    test_conn = libvirt.open("test:///default")
    try:
        for name in _of(prepared, ".xml"):
            dom = test_conn.defineXML(prepared.files[name])
            try:
                back = ET.fromstring(dom.XMLDesc())
            finally:
                dom.undefine()
            assert back.findtext("name") == prepared.spec.name
            assert back.findtext("uuid") == prepared.spec.uuid
            mac = back.find("devices/interface/mac")
            assert mac is not None and mac.get("address") == prepared.spec.mac
            sources = [d.get("file") for d in back.iterfind("devices/disk/source")]
            assert sources == [str(prepared.spec.base_image), str(prepared.spec.upper_image)]
    finally:
        test_conn.close()


def qemu_img(prepared: Prepared) -> None:
    """Each VMDK descriptor is a disk QEMU reads as exactly the raw image it points at."""
    need_programs("qemu-img")
    images: set[Path] = set()
    for name in _of(prepared, ".vmdk"):
        vmdk = prepared.spec.workdir / name
        info = json.loads(run(["qemu-img", "info", "--output=json", str(vmdk)]).stdout)
        assert info["format"] == "vmdk"
        data = info["format-specific"]["data"]
        assert data["create-type"] == "monolithicFlat"
        (extent,) = data["extents"]
        image = Path(extent["filename"])
        assert info["virtual-size"] == image.stat().st_size
        compared = run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(vmdk), str(image)])
        assert "identical" in compared.stdout
        images.add(image)
    assert {prepared.spec.base_image, prepared.spec.upper_image} <= images


def sh_n(prepared: Prepared) -> None:
    need_programs("sh", "bash")
    for name in _of(prepared, ".sh"):
        for shell in ("sh", "bash"):
            result = run([shell, "-n", str(prepared.spec.workdir / name)], check=False)
            assert result.returncode == 0, (shell, name, result.stderr)


VALIDATORS: dict[str, Callable[[Prepared], None]] = {
    "virt-xml-validate": virt_xml_validate,
    "libvirt-test-driver": libvirt_test_driver,
    "qemu-img": qemu_img,
    "sh-n": sh_n,
}


def validate(driver: Driver, prepared: Prepared) -> None:
    for validator in driver.capabilities.validated_by:
        VALIDATORS[validator](prepared)


# --- the registry and the capabilities -------------------------------------------------------


def test_registry_has_a_driver_for_every_name_the_cli_accepts() -> None:
    assert NAMES == HYPERVISORS
    for name in NAMES:
        driver = hypervisors.get(name)
        assert isinstance(driver, Driver) and driver.name == name
        assert hypervisors.get(name) is driver  # one driver object per hypervisor
        assert driver.capabilities.kernel in KERNEL_KINDS
    # every kind of kernel a driver may ask for, the boot layer can choose
    assert set(boot_kernel.CHOOSERS) == set(KERNEL_KINDS)
    with pytest.raises(UsageError) as info:
        hypervisors.get("vmware\n")
    assert info.value.message == (
        "unknown hypervisor 'vmware\\n'; choose one of kvm, uml, xen, virtualbox"
    )


@each_driver(root_for_bootable=True)
def test_capabilities_tell_the_truth(name: str) -> None:
    driver = hypervisors.get(name)
    caps = driver.capabilities
    assert set(caps.validated_by) <= set(VALIDATORS), "a validator this suite does not know"
    can, why = driver.can_boot_here()
    print(f"{name}: can boot here: {can}: {why}")
    assert why and "\n" not in why
    if not caps.can_start:
        # rendered only: the files must be proven by real validators instead of a boot
        assert not can and caps.validated_by
        return
    need_root()
    need(can, f"{name} cannot boot here: {why}")  # this lab runs kvm and uml
    assert caps.poll_interval > 0


# --- rendering -------------------------------------------------------------------------------


@each_driver()
def test_render_is_deterministic_and_writes_nothing(name: str, tmp_path: Path) -> None:
    driver = hypervisors.get(name)
    spec = paper_spec(driver, tmp_path)
    before = tree(tmp_path)
    first = driver.render(spec)
    assert first == driver.render(spec)
    assert tree(tmp_path) == before, "render wrote or touched a file"
    assert first and all(text.endswith("\n") for text in first.values())
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", f) for f in first), sorted(first)
    # another interpreter with another hash seed renders the same bytes
    code = (
        "import json, pickle, sys; from unionimg import hypervisors; "
        "spec = pickle.loads(bytes.fromhex(sys.argv[2])); "
        "print(json.dumps(hypervisors.get(sys.argv[1]).render(spec)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, name, pickle.dumps(spec).hex()],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=60,
    )
    assert json.loads(out.stdout) == first


HOSTILE_NAMES = [HOSTILE, "../etc", "a b", "x\ny", "-rf", "", ".hidden", "a" * 65, "é"]


@each_driver()
@pytest.mark.parametrize("bad", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_names_are_refused(name: str, bad: str, tmp_path: Path) -> None:
    driver = hypervisors.get(name)
    spec = dataclasses.replace(paper_spec(driver, tmp_path), name=bad)
    with pytest.raises(UsageError, match="instance name") as info:
        driver.prepare(spec)
    assert "\n" not in info.value.message


HOSTILE_VALUES: list[tuple[dict[str, object], str]] = [
    ({"cmdline": "quiet\ninit=/bin/sh"}, "kernel command line"),
    ({"cmdline": "a\x1b[2Jb"}, "kernel command line"),
    ({"memory_mib": 0}, "memory"),
    ({"memory_mib": True}, "memory"),
    ({"vcpus": 0}, "vcpus"),
    ({"uuid": "not-a-uuid"}, "UUID"),
    ({"mac": "01:02"}, "MAC"),
    ({"mac": "01:00:5e:00:00:01"}, "MAC"),  # multicast
    ({"base_image": Path("relative/BASE.img")}, "absolute path"),
    ({"kernel": Path("relative/kernel")}, "absolute path"),
    ({"console_log": Path("console.log")}, "absolute path"),
    ({"workdir": Path("run")}, "absolute path"),
]


@each_driver()
@pytest.mark.parametrize(("change", "message"), HOSTILE_VALUES, ids=[m for _, m in HOSTILE_VALUES])
def test_hostile_values_are_refused(
    name: str, change: dict[str, object], message: str, tmp_path: Path
) -> None:
    driver = hypervisors.get(name)
    spec = dataclasses.replace(paper_spec(driver, tmp_path), **change)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=message) as info:
        driver.prepare(spec)
    assert "\n" not in info.value.message


@each_driver()
@pytest.mark.parametrize("dirname", ["it's <dir> & $HOME;`id`", "a,b:c", "ctl\x01char", 'say "hi"'])
def test_hostile_paths_are_refused_or_still_valid(name: str, dirname: str, tmp_path: Path) -> None:
    """Images under a directory named by someone else: the driver refuses in one line what
    its formats cannot hold, or its files hold the path exactly and pass its validators."""
    driver = hypervisors.get(name)
    spec = paper_spec(driver, tmp_path / dirname)
    try:
        prepared = driver.prepare(spec)
    except UsageError as exc:
        print(f"{name} refuses {dirname!r}: {exc.message}")
        assert "\n" not in exc.message and "cannot be written into" in exc.message
        return
    write_rendered(prepared.files, spec.workdir)
    for file, text in prepared.files.items():
        if file.endswith(".xml"):  # escaped, and parsed back exactly
            sources = [d.get("file") for d in ET.fromstring(text).iterfind("devices/disk/source")]
            assert sources == [str(spec.base_image), str(spec.upper_image)], file
    validate(driver, prepared)


# --- what prepare makes passes the real validators -------------------------------------------


@each_driver()
def test_prepared_files_pass_their_real_validators(name: str, tmp_path: Path) -> None:
    driver = hypervisors.get(name)
    caps = driver.capabilities
    spec = paper_spec(driver, tmp_path)
    try:
        prepared = driver.prepare(spec)
    except MissingCapability as exc:  # a program the preparation needs (SYSLINUX, mtools)
        need(False, exc.message)
        raise
    assert prepared.spec == spec  # without boot=True nothing depends on the host
    assert all(p.is_file() and p.parent == spec.workdir for p in prepared.made)
    written = write_rendered(prepared.files, spec.workdir)
    assert sorted(p.name for p in written) == sorted(prepared.files)
    if not caps.validated_by:
        assert caps.can_start, f"{name} is proven by nothing: no validator and no boot"
    validate(driver, prepared)


# --- records, stop and forget without a guest ------------------------------------------------


def record_of(name: str, console: Path) -> Running:
    """A record of a guest that is not there, every field set: each driver reads its own."""
    return Running(
        hypervisor=name,
        started="2026-12-01T10:00:00Z",
        console=str(console),
        stopping=True,
        domain=f"uiconf-absent-{os.getpid()}",
        domain_type="qemu",
        pid=2**22 + 17,  # above any pid_max default: no process has it
        umid=f"uiconf-absent-{os.getpid()}",
        tap="uiabsent0",
    )


@each_driver()
def test_running_record_round_trips(name: str, tmp_path: Path) -> None:
    rec = record_of(name, tmp_path / "console.log")
    assert Running.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    minimal = Running(hypervisor=name, started=rec.started, console=rec.console)
    assert minimal.to_json() == {"hypervisor": name, "started": rec.started, "console": rec.console}
    assert Running.from_json(minimal.to_json()) == minimal
    # a field a later version adds is ignored, as by every record of the store
    assert Running.from_json({**rec.to_json(), "added_later": 1}) == rec
    for broken in (
        {**rec.to_json(), "pid": "17"},
        {**rec.to_json(), "pid": True},
        {**rec.to_json(), "stopping": "yes"},
        {k: v for k, v in rec.to_json().items() if k != "hypervisor"},
        [rec.to_json()],
    ):
        with pytest.raises(ValueError):
            Running.from_json(broken)


@pytest.fixture
def libvirt_when(request: pytest.FixtureRequest) -> Iterator[None]:
    """libvirtd for the kvm case (the driver tests' module fixture starts it and, if it did,
    stops it after the module)."""
    if request.node.callspec.params["name"] == "kvm":
        request.getfixturevalue("conn")
    yield


@each_driver(root_for_bootable=True)
def test_stop_release_forget_are_idempotent_without_a_guest(
    name: str, tmp_path: Path, libvirt_when: None
) -> None:
    driver = hypervisors.get(name)
    if driver.capabilities.can_start:
        need_root()  # kvm asks libvirtd (started if need be), uml looks for taps
    rec = record_of(name, tmp_path / "console.log")
    for _ in range(2):
        assert driver.is_running(rec).running is False
        assert driver.stop(rec, force=False, timeout=1) == "gone"
        assert driver.stop(rec, force=True) == "gone"
        driver.release(rec)
        driver.forget(rec.domain or "")
        assert driver.mac_user(rec.domain or "", MAC) is None


# --- a real boot where it can boot, once per driver ------------------------------------------

STAY_UP = "#!/bin/sh\nsleep 600\n"  # a boot hook that keeps the tiny guest up


def booting_spec(driver: Driver, lab: test_drivers.Lab, name: str) -> BootSpec:
    """BASE from the lab, a fresh U whose boot hook keeps the guest up, the kernel the boot
    layer would pick for the driver's kernel kind, the lab's initramfs followed by the
    instance's NIC naming files (as ``boot`` makes it)."""
    work = lab.dir / name
    udir = work / "u-tree"
    hooks = udir / "upper" / "etc" / "unionimg-boot.d"
    hooks.mkdir(parents=True)
    (udir / "work").mkdir()
    (hooks / "50-stay-up").write_text(STAY_UP)
    (hooks / "50-stay-up").chmod(0o755)
    upper = work / "U.img"
    run(["mke2fs", "-q", "-t", "ext4", "-L", "U", "-d", str(udir), str(upper), "64M"])
    work.chmod(0o755)  # QEMU runs as libvirt-qemu
    if driver.capabilities.kernel == "uml":
        chosen = need_uml_kernel()
        need(
            chosen.modules_dir is None or chosen.release in {k.version for k in lab.initrd.kernels},
            f"no modules for UML kernel {chosen.release} in /usr/lib/uml/modules",
        )
        kernel, transport = chosen.path, chosen.transport
    else:
        kernel, transport = test_drivers.guest_kernel(), "tuntap"
    spec = BootSpec(
        name=name,
        uuid=instance_uuid(name),
        mac=MAC,
        nic_name="eth0",
        memory_mib=256,
        vcpus=1,
        base_image=lab.base,
        upper_image=upper,
        kernel=kernel,
        initrd=work / "initrd.img",
        cmdline="panic=-1",
        console_log=work / "console.log",
        workdir=work,
        domain_type="qemu",
        tap=driver.host_tap(name),
        uml_transport=transport,
    )
    with tempfile.TemporaryDirectory(prefix="unionimg-conf-") as stage:
        boot_kernel.instance_initramfs(
            lab.initrd.path, render_net_naming(spec), spec.initrd, Path(stage)
        )
    return spec


def kvm_leftovers(spec: BootSpec, rec: Running) -> list[str]:
    del rec
    c = kvm.connect()
    try:
        st = kvm.state(c, spec.name)
    finally:
        c.close()
    Path(f"/var/log/libvirt/qemu/{spec.name}.log").unlink(missing_ok=True)  # libvirt's own
    return [] if st == "absent" else [f"libvirt domain {spec.name} is {st}"]


def uml_leftovers(spec: BootSpec, rec: Running) -> list[str]:
    left = []
    if uml.tap_exists(spec.tap):
        left.append(f"tap {spec.tap}")
    if rec.umid and test_drivers.uml_processes(rec.umid):
        left.append(f"processes {test_drivers.uml_processes(rec.umid)}")
    if rec.umid and (Path(uml.UML_DIR) / rec.umid).exists():
        left.append(f"{uml.UML_DIR}/{rec.umid}")
    return left


#: What a bootable driver could leave behind, looked for from the host after forget.
LEFTOVERS: dict[str, Callable[[BootSpec, Running], list[str]]] = {
    "kvm": kvm_leftovers,
    "uml": uml_leftovers,
}


def kvm_save_restore(spec: BootSpec) -> None:
    """can_snapshot, shown: libvirt saves the running guest to a file and resumes it."""
    c = kvm.connect()
    saved = spec.workdir / "saved.state"
    try:
        dom = c.lookupByName(spec.name)
        started = time.monotonic()
        dom.save(str(saved))
        assert kvm.state(c, spec.name) == "shutoff"
        c.restore(str(saved))
        print(f"libvirt save + restore: {time.monotonic() - started:.1f} s")
        assert kvm.state(c, spec.name) == "running"
    finally:
        saved.unlink(missing_ok=True)
        c.close()


#: A real save and resume for each bootable driver that says it can snapshot.
SNAPSHOTS: dict[str, Callable[[BootSpec], None]] = {"kvm": kvm_save_restore}


def console_has(spec: BootSpec) -> bool:
    text = (
        spec.console_log.read_bytes().decode(errors="replace") if spec.console_log.exists() else ""
    )
    lines = [ln.strip() for ln in text.splitlines()]
    return any(READY.match(ln) for ln in lines) and f"unionimg-guest: nic eth0 mac {MAC}" in lines


@each_driver(root_for_bootable=True)
@pytest.mark.slow
def test_boots_to_the_hand_over_with_its_mac(
    name: str, lab: test_drivers.Lab, libvirt_when: None
) -> None:
    driver = hypervisors.get(name)
    caps = driver.capabilities
    records: list[Running] = []
    if not caps.can_start:
        spec = paper_spec(driver, lab.dir / f"paper-{name}")
        with pytest.raises(MissingCapability, match=f"does not start {name} guests"):
            driver.start(Prepared(spec, driver.render(spec)), records.append)
        assert records == []
        return
    need_root()
    can, why = driver.can_boot_here()
    need(can, f"{name} cannot boot here: {why}")
    assert name in LEFTOVERS, f"say what {name} could leave behind"
    vm = f"uiconf-{name}-{os.getpid()}"
    spec = booting_spec(driver, lab, vm)
    started = time.monotonic()
    try:
        prepared, rec = launch(driver, spec, records.append)
        assert records == [rec] and rec.hypervisor == name
        assert Running.from_json(json.loads(json.dumps(rec.to_json()))) == rec
        assert (spec.workdir / next(iter(prepared.files))).is_file()
        print(f"{name}: {dict(prepared.facts)}")
        reached = until(
            lambda: console_has(spec) or not driver.is_running(rec).running,
            BOOT_TIMEOUT,
            caps.poll_interval,
        )
        tail = spec.console_log.read_text(errors="replace")[-3000:]
        assert reached and console_has(spec), tail
        print(f"{name}: start to the hand-over with MAC {MAC}: {time.monotonic() - started:.1f} s")
        verdict = console_verdict(spec.console_log)
        assert verdict.ready and verdict.failure is None, tail
        assert driver.is_running(rec).running, tail
        assert driver.mac_user(spec.name, spec.mac) is None  # its own guest is not a foreign user
        if caps.can_snapshot:
            assert name in SNAPSHOTS, f"show that {name} can snapshot"
            SNAPSHOTS[name](spec)
            assert driver.is_running(rec).running
        t0 = time.monotonic()
        how = driver.stop(rec, force=False, timeout=5)
        print(f"{name}: stop: {how} in {time.monotonic() - t0:.1f} s")
        assert how in ("clean", "hard")  # the tiny guest ignores kvm's ACPI power button
        assert until(lambda: not driver.is_running(rec).running, 15, 0.2)
    finally:
        for left in records:  # whatever happened: no guest, tap or definition stays
            if driver.is_running(left).running:
                driver.stop(left, force=True)
            driver.release(left)
        driver.forget(spec.name)
    assert driver.stop(rec, force=False, timeout=1) == "gone"
    driver.release(rec)
    driver.forget(spec.name)
    assert LEFTOVERS[name](spec, rec) == []
    assert test_drivers.sha256(lab.base) == lab.base_sha256 and lab.base.stat().st_uid == 0
