"""Hypervisor profiles, one format at a time: golden files, escaping, what each profile
holds. What every driver must do (deterministic rendering, hostile input refused, its real
validators passing, a real boot where it can boot) is tests/test_hypervisor_conformance.py.

- Golden files: every profile's output for one fixed BootSpec is compared with
  ``tests/golden/<case>/<file>``; ``pytest --regenerate-output`` rewrites them all.
- Profile by profile: ``virt-xml-validate`` on the type-kvm XML (the suite validates the
  type-qemu one it boots), libvirt's in-process ``test:///default`` driver (define, read
  back), a small xl.cfg parser in place of ``xl`` (which cannot parse without a hypervisor),
  the VBoxManage script run against a recording VBoxManage stub, the VMDK extents, the
  SYSLINUX boot disk.
- A real boot (slow): the VirtualBox disk layout (SYSLINUX boot disk + two VMDKs on AHCI,
  e1000 NIC with the MAC) under QEMU-TCG, which VirtualBox is not here to boot.

A missing tool skips with its reason; under UNIONIMG_REQUIRE_REAL=1 it fails instead (a
libvirtd that is not running only skips: starting it is the driver's business).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from unionimg import hypervisors
from unionimg.boot.control import write_rendered
from unionimg.boot.initramfs import build_initramfs
from unionimg.errors import MissingCapability, NotFound, UsageError
from unionimg.hypervisors import kvm, profiles, uml, virtualbox, xen
from unionimg.hypervisors.spec import BootSpec, instance_uuid
from unionimg.runner import run
from vm_fixtures import build

from .conftest import Golden, need

ROOT = Path("/var/lib/unionimg")
SECTORS = {"boot": 40960, "base": 4194304, "upper": 2097152}

SPEC = BootSpec(
    name="web1",
    uuid=instance_uuid("web1"),
    mac="52:54:00:12:34:56",
    nic_name="eth0",
    memory_mib=256,
    vcpus=2,
    base_image=ROOT / "bases/debian/3/BASE.img",
    upper_image=ROOT / "instances/web1/U.img",
    kernel=ROOT / "bases/debian/3/vmlinuz",
    initrd=ROOT / "instances/web1/initrd.img",
    cmdline="quiet unionimg.timeout=20",
    console_log=ROOT / "instances/web1/run/console.log",
    workdir=ROOT / "instances/web1/run",
    domain_type="kvm",
    tap="uitap-web1",
)
UML_SPEC = dataclasses.replace(SPEC, kernel=Path("/usr/bin/linux.uml"))
UML_VECTOR_SPEC = dataclasses.replace(
    SPEC,
    kernel=Path("/var/cache/unionimg/uml/7.2.12-1~bpo13+1.20261201T210200Z/linux.uml"),
    uml_transport="vector",
)
QEMU_SPEC = dataclasses.replace(SPEC, domain_type="qemu")
# a chain base -> A -> XA (issue 13): the layers between U and BASE, top first
HEX_XA, HEX_A = (hashlib.sha256(n.encode()).hexdigest() for n in ("XA", "A"))
CHAIN_IMAGES = tuple(ROOT / f"layers/sha256/{h}/layer.img" for h in (HEX_XA, HEX_A))
CHAIN_LABELS = tuple(f"L{h[:15]}" for h in (HEX_XA, HEX_A))
CHAIN = {"layer_images": CHAIN_IMAGES, "layer_labels": CHAIN_LABELS}
LOWERS = f"unionimg.lowers=L{HEX_XA[:15]},L{HEX_A[:15]},BASE"
CHAIN_SECTORS = {**SECTORS, "layer0": 524288, "layer1": 262144}


def program(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def need_programs(*names: str) -> None:
    lacking = [n for n in names if program(n) is None]
    need(not lacking, f"programs not installed: {', '.join(lacking)}")


def rendered(case: str) -> dict[str, str]:
    if case == "kvm":
        return kvm.render(SPEC)
    if case == "kvm-qemu":
        return kvm.render(QEMU_SPEC)
    if case == "xen":
        return xen.render(SPEC)
    if case == "virtualbox":
        return virtualbox.render(SPEC, SECTORS)
    if case == "uml":
        return uml.render(UML_SPEC)
    if case == "uml-vector":
        return uml.render(UML_VECTOR_SPEC)
    if case == "net":
        return profiles.render_net_naming(SPEC)
    if case == "kvm-chain":
        return kvm.render(dataclasses.replace(QEMU_SPEC, **CHAIN))  # type: ignore[arg-type]
    if case == "xen-chain":
        return xen.render(dataclasses.replace(SPEC, **CHAIN))  # type: ignore[arg-type]
    if case == "virtualbox-chain":
        spec = dataclasses.replace(SPEC, **CHAIN)  # type: ignore[arg-type]
        return virtualbox.render(spec, CHAIN_SECTORS)
    if case == "uml-chain":
        return uml.render(dataclasses.replace(UML_VECTOR_SPEC, **CHAIN))  # type: ignore[arg-type]
    raise AssertionError(case)


CASES = (
    "kvm",
    "kvm-qemu",
    "xen",
    "virtualbox",
    "uml",
    "uml-vector",
    "net",
    "kvm-chain",
    "xen-chain",
    "virtualbox-chain",
    "uml-chain",
)


# --- golden files ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, golden_files: Golden) -> None:
    golden_files.check(case, rendered(case))


def test_every_template_has_a_format() -> None:
    folder = Path(str(profiles.template_dir()))
    # one folder per hypervisor (links into hypervisor_profiles/ and udev_rules/)
    on_disk = {f"{d.name}/{p.name}" for d in folder.iterdir() for p in d.glob("*.j2")}
    assert on_disk == set(profiles.TEMPLATES)
    # every hypervisor's templates sit in its own folder, the guest's NIC naming in net/
    assert {name.split("/")[0] for name in on_disk} == {*hypervisors.names(), "net"}


def test_templates_are_found_through_the_package(tmp_path: Path) -> None:
    """One lookup, through the package: from another working directory and a fresh
    interpreter (as the installed command runs), the templates are the package's own."""
    code = (
        "from unionimg.hypervisors import profiles, kvm; import sys; "
        "print(profiles.template_dir()); "
        "sys.stdout.write(kvm.render(__import__('tests.test_profiles', "
        "fromlist=['SPEC']).SPEC)['domain.xml'])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = run([sys.executable, "-c", code], cwd=str(tmp_path), env=env).stdout
    where, _, xml = out.partition("\n")
    assert Path(where) == Path(hypervisors.__file__).parent / "templates"
    assert xml == rendered("kvm")["domain.xml"]


# --- libvirt XML -----------------------------------------------------------------------------


def xml_of(case: str) -> str:
    return rendered(case)["domain.xml"]


def test_virt_xml_validate_type_kvm(tmp_path: Path) -> None:
    """The type-kvm domain (KVM hosts; the conformance suite validates the type-qemu one)."""
    need_programs("virt-xml-validate", "xmllint")
    path = tmp_path / "domain.xml"
    path.write_text(xml_of("kvm"))
    result = run(["virt-xml-validate", str(path), "domain"], check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "validates" in result.stdout + result.stderr


def test_kvm_cpu_only_for_type_kvm() -> None:
    typed_kvm = ET.fromstring(xml_of("kvm"))
    qemu = ET.fromstring(xml_of("kvm-qemu"))
    assert typed_kvm.get("type") == "kvm" and qemu.get("type") == "qemu"
    cpu = typed_kvm.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert qemu.find("cpu") is None


def test_kvm_rejects_other_domain_types() -> None:
    with pytest.raises(UsageError, match="domain type 'xen'"):
        kvm.render(dataclasses.replace(SPEC, domain_type="xen"))


def libvirt_test_connection() -> libvirt.virConnect:
    return libvirt.open("test:///default")


@dataclass(frozen=True)
class Readback:
    domain_type: str
    memory_kib: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str
    on_poweroff: str
    on_reboot: str
    mac: str
    disks: list[tuple[str, str, bool]]  # target, source, readonly


def read_back(xml: str) -> Readback:
    """Define ``xml`` in libvirt's test driver and parse what libvirt made of it."""
    conn = libvirt_test_connection()
    dom = conn.defineXML(xml)
    try:
        root = ET.fromstring(dom.XMLDesc())
    finally:
        dom.undefine()
    disks = []
    for disk in root.iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        assert source is not None and target is not None
        disks.append(
            (target.get("dev", ""), source.get("file", ""), disk.find("readonly") is not None)
        )
    mac = root.find("devices/interface/mac")
    assert mac is not None
    return Readback(
        domain_type=root.get("type", ""),
        memory_kib=int(root.findtext("memory", "0")),
        vcpus=int(root.findtext("vcpu", "0")),
        kernel=root.findtext("os/kernel", ""),
        initrd=root.findtext("os/initrd", ""),
        cmdline=root.findtext("os/cmdline", ""),
        on_poweroff=root.findtext("on_poweroff", ""),
        on_reboot=root.findtext("on_reboot", ""),
        mac=mac.get("address", ""),
        disks=disks,
    )


@pytest.mark.parametrize(
    ("case", "spec", "disk_names", "console"),
    [
        ("kvm", SPEC, ("vda", "vdb"), "console=ttyS0"),
        ("kvm-qemu", QEMU_SPEC, ("vda", "vdb"), "console=ttyS0"),
        ("xen", SPEC, ("xvda", "xvdb"), "console=hvc0"),
    ],
)
def test_libvirt_test_driver_reads_back(
    case: str, spec: BootSpec, disk_names: tuple[str, str], console: str
) -> None:
    back = read_back(xml_of(case))
    assert back.domain_type == {"kvm": "kvm", "kvm-qemu": "qemu", "xen": "xen"}[case]
    assert back.memory_kib == spec.memory_mib * 1024
    assert back.vcpus == spec.vcpus
    assert back.kernel == str(spec.kernel) and back.initrd == str(spec.initrd)
    assert back.cmdline == f"{console} {spec.cmdline}"
    assert (back.on_poweroff, back.on_reboot) == ("destroy", "destroy")
    assert back.mac == spec.mac
    assert back.disks == [
        (disk_names[0], str(spec.base_image), True),
        (disk_names[1], str(spec.upper_image), False),
    ]


# --- escaping --------------------------------------------------------------------------------

HOSTILE = "a'b\"c<d>&e"


def test_xml_escapes_every_special_character() -> None:
    spec = dataclasses.replace(
        SPEC, cmdline=HOSTILE, base_image=Path('/srv/it\'s <base> & "more"/BASE.img')
    )
    xml = kvm.render(spec)["domain.xml"]
    assert "<d>" not in xml and "&e" not in xml.replace("&amp;", "")
    root = ET.fromstring(xml)
    assert root.findtext("os/cmdline") == f"console=ttyS0 {HOSTILE}"
    source = root.find("devices/disk/source")
    assert source is not None and source.get("file") == str(spec.base_image)
    back = read_back(xml)  # libvirt reads the same values back
    assert back.cmdline == f"console=ttyS0 {HOSTILE}"
    assert back.disks[0][1] == str(spec.base_image)


def test_xml_refuses_characters_xml_cannot_hold() -> None:
    with pytest.raises(UsageError, match="libvirt XML"):
        kvm.render(dataclasses.replace(SPEC, base_image=Path("/srv/a\x01b")))


def test_net_naming_validates_the_name() -> None:
    with pytest.raises(UsageError, match="instance name"):
        profiles.render_net_naming(dataclasses.replace(SPEC, name=HOSTILE))


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("/srv/base.img", "'/srv/base.img'"),
        ("it's", '"it\'s"'),
        ('say "hi"', "'say \"hi\"'"),
        ("", "''"),
        (256, "'256'"),
    ],
)
def test_xl_quote(value: object, quoted: str) -> None:
    assert profiles.xl_quote(value) == quoted


@pytest.mark.parametrize("value", [HOSTILE, "a\nb", "a\rb", "tab\tx", "back\\slash"])
def test_xl_quote_refuses(value: str) -> None:
    with pytest.raises(UsageError) as info:
        profiles.xl_quote(value)
    assert "\n" not in info.value.message


def test_xen_profile_refuses_unquotable_path() -> None:
    with pytest.raises(UsageError, match=r"xl\.cfg"):
        xen.render(dataclasses.replace(SPEC, upper_image=Path("/srv/a'b\"c/U.img")))


@pytest.mark.parametrize("value", [HOSTILE, "a b", "$(reboot)", "`x`", "*", "", "ü ß"])
def test_sh_quote_is_one_word(value: str) -> None:
    assert shlex.split(profiles.sh_quote(value)) == [value]


@pytest.mark.parametrize("value", ['a"b', "a\nb", "a\\b", "\x00"])
def test_udev_value_refuses(value: str) -> None:
    with pytest.raises(UsageError, match="udev rule"):
        profiles.udev_value(value)


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "\x00"])
def test_link_value_refuses(value: str) -> None:
    with pytest.raises(UsageError, match=r"\.link"):
        profiles.link_value(value)


def test_udev_and_link_accept_plain_values() -> None:
    assert profiles.udev_value("52:54:00:12:34:56") == "52:54:00:12:34:56"
    assert profiles.link_value("eth0") == "eth0"


def test_a_value_without_its_filter_is_a_template_bug() -> None:
    for fmt in ("xl", "sh", "udev", "link", "argv", "vmdk", "syslinux"):
        template = profiles._environment(fmt).from_string("x = {{ value }}")
        with pytest.raises(profiles.TemplateBug):
            template.render(value="plain")
        assert template.render(value=7) == "x = 7"  # numbers need no quoting


def test_templates_have_no_builtin_filters() -> None:
    env = profiles._environment("xl")
    assert set(env.filters) == {"xl", "comment"}


# --- udev rule and .link ---------------------------------------------------------------------


def test_net_naming_lowercases_the_mac_and_names_the_link_file() -> None:
    files = profiles.render_net_naming(dataclasses.replace(SPEC, mac="52:54:00:AB:CD:EF"))
    assert sorted(files) == ["10-unionimg-eth0.link", "70-unionimg-net.rules"]
    rule = [ln for ln in files["70-unionimg-net.rules"].splitlines() if not ln.startswith("#")]
    assert rule == [
        'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="52:54:00:ab:cd:ef", NAME="eth0"'
    ]
    link = files["10-unionimg-eth0.link"]
    assert "MACAddress=52:54:00:ab:cd:ef\n" in link and "Name=eth0\n" in link
    assert "NamePolicy=\n" in link


@pytest.mark.parametrize("name", ["eth0", "ens3", "lan-1", "x", "a" * 15, "wan.10", "e_0"])
def test_good_nic_names(name: str) -> None:
    assert profiles.check_ifname(name) == name


@pytest.mark.parametrize(
    "name", ["", "a" * 16, ".", "..", "a/b", "a:b", "a b", "eth\n0", "123", 'a"b', "é", "t\tx"]
)
def test_bad_nic_names(name: str) -> None:
    with pytest.raises(UsageError) as info:
        profiles.render_net_naming(dataclasses.replace(SPEC, nic_name=name))
    assert "\n" not in info.value.message


# --- xl.cfg: a small parser in place of xl ---------------------------------------------------

_XL_TOKEN = re.compile(
    r"""(?P<space>[ \t]+)|(?P<comment>\#[^\n]*)|(?P<nl>\n)|(?P<ident>[a-z][_0-9a-z]*)
    |(?P<number>[0-9][0-9a-fx]*)|(?P<string>'[^'\n\\]*'|"[^"\n\\]*")|(?P<punct>[=\[\],;])""",
    re.VERBOSE,
)

XlValue = int | str | list["XlValue"]


def parse_xl(text: str) -> dict[str, XlValue]:
    """Parse xl.cfg's grammar: ``name = value`` settings, values are numbers, quoted strings
    or bracketed lists (newlines allowed inside, no trailing comma needed)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _XL_TOKEN.match(text, pos)
        assert match is not None, f"xl.cfg: bad character at {text[pos : pos + 20]!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
        pos = match.end()
    tokens.append(("eof", ""))
    index = 0

    def peek() -> tuple[str, str]:
        return tokens[index]

    def take(kind: str, value: str | None = None) -> str:
        nonlocal index
        got_kind, got = tokens[index]
        assert got_kind == kind and (value is None or got == value), (
            f"xl.cfg: expected {value or kind}, got {got!r}"
        )
        index += 1
        return got

    def skip_nl() -> None:
        while peek()[0] == "nl":
            take("nl")

    def value() -> XlValue:
        kind, _ = peek()
        if kind == "number":
            return int(take("number"), 0)
        if kind == "string":
            return take("string")[1:-1]
        take("punct", "[")
        items: list[XlValue] = []
        skip_nl()
        while peek() != ("punct", "]"):
            items.append(value())
            skip_nl()
            if peek() == ("punct", ","):
                take("punct", ",")
                skip_nl()
            else:
                break
        take("punct", "]")
        return items

    settings: dict[str, XlValue] = {}
    skip_nl()
    while peek()[0] != "eof":
        key = take("ident")
        assert key not in settings, f"xl.cfg: {key} set twice"
        take("punct", "=")
        settings[key] = value()
        if peek() == ("punct", ";"):
            take("punct", ";")
        if peek()[0] != "eof":
            take("nl")
        skip_nl()
    return settings


def xl_spec_items(item: XlValue) -> dict[str, str]:
    """A disk or vif spec: comma-separated key=value; a disk's target= must be last."""
    assert isinstance(item, str)
    head, sep, target = item.partition(",target=")
    pairs = dict(part.split("=", 1) for part in head.split(","))
    if sep:
        pairs["target"] = target
    return pairs


def test_xl_cfg_structure() -> None:
    text = rendered("xen")["xl.cfg"]
    for line in text.splitlines():  # every value is a number, a quoted string or a list
        setting = re.match(r"^([a-z_]+) = (.*)$", line)
        if setting:
            rhs = setting.group(2)
            assert rhs == "[" or rhs.isdigit() or rhs[0] in "'\"", line
    cfg = parse_xl(text)
    required = {
        "name": SPEC.name,
        "uuid": SPEC.uuid,
        "type": "pvh",
        "memory": SPEC.memory_mib,
        "vcpus": SPEC.vcpus,
        "kernel": str(SPEC.kernel),
        "ramdisk": str(SPEC.initrd),
        "cmdline": f"console=hvc0 {SPEC.cmdline}",
        "on_poweroff": "destroy",
        "on_reboot": "destroy",
        "on_crash": "destroy",
    }
    for key, expected in required.items():
        assert cfg.get(key) == expected, key
    disks, vifs = cfg["disk"], cfg["vif"]
    assert isinstance(disks, list) and isinstance(vifs, list)
    assert [xl_spec_items(d) for d in disks] == [
        {"format": "raw", "vdev": "xvda", "access": "ro", "target": str(SPEC.base_image)},
        {"format": "raw", "vdev": "xvdb", "access": "rw", "target": str(SPEC.upper_image)},
    ]
    assert [xl_spec_items(v) for v in vifs] == [{"mac": SPEC.mac, "bridge": xen.XEN_BRIDGE}]


def test_xl_parser_catches_malformed_configs() -> None:
    assert parse_xl("a = [ 'x',\n 'y' ]\nb = 1;\n") == {"a": ["x", "y"], "b": 1}
    for bad in ("a = 'x\n", "a = x\n", "a = [ 'x' 'y' ]\n", "a = 1 b = 2\n"):
        with pytest.raises(AssertionError):
            parse_xl(bad)


def test_xl_disk_target_with_a_comma_stays_whole() -> None:
    spec = dataclasses.replace(SPEC, base_image=Path("/srv/a,b/BASE.img"))
    disks = parse_xl(xen.render(spec)["xl.cfg"])["disk"]
    assert isinstance(disks, list)
    assert xl_spec_items(disks[0])["target"] == "/srv/a,b/BASE.img"


# --- VirtualBox ------------------------------------------------------------------------------

VBOX_SUBCOMMANDS = {
    "createvm",
    "modifyvm",
    "storagectl",
    "storageattach",
    "startvm",
    "controlvm",
    "unregistervm",
    "closemedium",
    "showvminfo",
    "setextradata",
}


def logical_lines(script: str) -> list[str]:
    return script.replace("\\\n", " ").splitlines()


def test_vbox_script_uses_known_subcommands() -> None:
    text = rendered("virtualbox")["create-vm.sh"]
    assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text
    calls = [shlex.split(ln) for ln in logical_lines(text) if ln.startswith("VBoxManage")]
    assert [c[1] for c in calls] == ["createvm", "modifyvm", "storagectl"] + 3 * ["storageattach"]
    assert all(c[1] in VBOX_SUBCOMMANDS for c in calls)
    for line in logical_lines(text):  # comments, set -eu, vm=NAME and VBoxManage calls only
        words = line.split()
        assert (
            not words
            or words[0].startswith("#")
            or words[0] in ("VBoxManage", "set")
            or line == "vm=web1"
        ), line


STUB = """#!{python}
import json, os, sys
with open(os.environ["VBOX_LOG"], "a", encoding="utf-8") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def run_vbox_script(tmp_path: Path, script_text: str) -> list[list[str]]:
    """Run the script with a VBoxManage stub that records each call's argv."""
    need_programs("sh")
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    stub = stub_dir / "VBoxManage"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    script = tmp_path / "create-vm.sh"
    script.write_text(script_text)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{stub_dir}:{os.environ.get('PATH', '')}", "VBOX_LOG": str(log)}
    run(["sh", str(script)], env=env)
    return [json.loads(line) for line in log.read_text().splitlines()]


def option(call: list[str], name: str, count: int = 1) -> list[str]:
    at = call.index(name)
    return call[at + 1 : at + 1 + count]


def test_vbox_script_passes_the_exact_values(tmp_path: Path) -> None:
    work = Path("/srv/vm's dir/$HOME `x` *;/run")  # no '"': a VMDK descriptor cannot hold it
    spec = dataclasses.replace(SPEC, workdir=work, console_log=work / 'the "console" log')
    calls = run_vbox_script(tmp_path, virtualbox.render(spec, SECTORS)["create-vm.sh"])
    create, modify, ctl, *attach = calls
    assert create[:2] == ["createvm", "--name"] and option(create, "--name") == ["web1"]
    assert option(create, "--uuid") == [SPEC.uuid]
    assert option(create, "--basefolder") == [str(work / "virtualbox")]
    assert "--register" in create
    assert modify[1] == "web1"
    assert option(modify, "--memory") == ["256"] and option(modify, "--cpus") == ["2"]
    assert option(modify, "--nic1") == ["nat"] and option(modify, "--nictype1") == ["82540EM"]
    assert option(modify, "--macaddress1") == ["525400123456"]
    assert option(modify, "--uart1", 2) == ["0x3F8", "4"]
    assert option(modify, "--uartmode1", 2) == ["file", str(spec.console_log)]
    assert option(modify, "--boot1") == ["disk"]
    assert option(ctl, "--add") == ["sata"] and option(ctl, "--controller") == ["IntelAhci"]
    media = [
        (option(a, "--port")[0], option(a, "--mtype")[0], option(a, "--medium")[0]) for a in attach
    ]
    assert media == [
        ("0", "normal", str(work / "boot.vmdk")),
        ("1", "immutable", str(work / "base.vmdk")),
        ("2", "normal", str(work / "upper.vmdk")),
    ]


def test_vbox_mac_format() -> None:
    assert virtualbox.vbox_mac("52:54:00:ab:CD:ef") == "525400ABCDEF"
    with pytest.raises(UsageError):
        virtualbox.vbox_mac("01:00:5e:00:00:01")  # multicast


def test_vmdk_descriptors_name_their_images() -> None:
    files = rendered("virtualbox")
    images = {
        "boot.vmdk": (SPEC.workdir / "boot.img", SECTORS["boot"]),
        "base.vmdk": (SPEC.base_image, SECTORS["base"]),
        "upper.vmdk": (SPEC.upper_image, SECTORS["upper"]),
    }
    uuids = set()
    for name, (image, sectors) in images.items():
        text = files[name]
        assert f'\nRW {sectors} FLAT "{image}" 0\n' in text
        assert 'createType="monolithicFlat"' in text
        uuid = re.search(r'ddb\.uuid\.image = "([0-9a-f-]{36})"', text)
        assert uuid is not None
        uuids.add(uuid.group(1))
    assert len(uuids) == 3  # VirtualBox registers media by UUID: they must differ


def test_vmdk_refuses_a_quote_in_the_path() -> None:
    with pytest.raises(UsageError, match="VMDK"):
        virtualbox.render(dataclasses.replace(SPEC, base_image=Path('/srv/"x"/BASE.img')), SECTORS)


def raw_image(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
        for at in range(0, size, size // 8):  # distinct content, so a wrong offset shows
            fh.seek(at)
            fh.write(hashlib.sha256(f"{path.name}{at}".encode()).digest())
    return path


@pytest.fixture
def vbox_spec(tmp_path: Path) -> BootSpec:
    work = tmp_path / "run dir"
    work.mkdir()
    raw_image(work / "boot.img", 3 << 20)
    return dataclasses.replace(
        SPEC,
        base_image=raw_image(tmp_path / "BASE.img", 8 << 20),
        upper_image=raw_image(tmp_path / "U'pper.img", 4 << 20),
        workdir=work,
        console_log=work / "console.log",
    )


def test_disk_sectors_stat_the_images(vbox_spec: BootSpec) -> None:
    assert virtualbox.disk_sectors(vbox_spec) == {"boot": 6144, "base": 16384, "upper": 8192}
    (vbox_spec.workdir / "boot.img").unlink()
    with pytest.raises(NotFound, match=r"boot\.img"):
        virtualbox.DRIVER.render(vbox_spec)
    (vbox_spec.workdir / "boot.img").write_bytes(b"x" * 1000)
    with pytest.raises(UsageError, match="whole number of sectors"):
        virtualbox.disk_sectors(vbox_spec)


# --- the VirtualBox boot disk ----------------------------------------------------------------


def need_boot_disk_tools() -> None:
    need_programs("mkfs.fat", "mcopy", "mdir", "syslinux")
    need(any(p.is_file() for p in virtualbox.MBR_CANDIDATES), "syslinux-common's mbr.bin missing")


def test_make_boot_disk(tmp_path: Path) -> None:
    need_boot_disk_tools()
    kernel = raw_image(tmp_path / "vmlinuz", 3 << 20)
    initrd = raw_image(tmp_path / "initrd", 1 << 20)
    started = time.monotonic()
    disk = virtualbox.make_boot_disk(tmp_path / "out/boot.img", kernel, initrd, "console=ttyS0 a=b")
    print(f"boot disk made in {time.monotonic() - started:.2f} s")
    assert disk.path.stat().st_size == disk.size == 17 << 20
    head = disk.path.read_bytes()[:512]
    assert head[510:] == b"\x55\xaa"
    assert head[:440] == virtualbox.mbr_code()
    entry = head[446:462]
    assert entry[0] == 0x80 and entry[4] == 0x0E
    assert int.from_bytes(entry[8:12], "little") == virtualbox.PART_START
    assert int.from_bytes(entry[12:16], "little") == disk.sectors - virtualbox.PART_START
    image = f"{disk.path}@@{virtualbox.PART_START * 512}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    cfg = run(["mtype", "-i", image, "::/syslinux.cfg"], env=env).stdout
    assert "  APPEND console=ttyS0 a=b\n" in cfg and "  INITRD /initrd.img\n" in cfg
    copied = run(["mtype", "-i", image, "::/vmlinuz"], env=env, check=False)
    assert copied.returncode == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["boot.img"]  # no temp left


def test_make_boot_disk_refuses(tmp_path: Path) -> None:
    kernel = raw_image(tmp_path / "vmlinuz", 1 << 20)
    with pytest.raises(NotFound, match="initramfs"):
        virtualbox.make_boot_disk(tmp_path / "b.img", kernel, tmp_path / "missing", "x")
    need_boot_disk_tools()
    with pytest.raises(UsageError, match="SYSLINUX"):
        virtualbox.make_boot_disk(tmp_path / "b.img", kernel, kernel, "a\nDEFAULT evil")
    assert not (tmp_path / "b.img").exists()


# --- UML -------------------------------------------------------------------------------------


def test_uml_argv_is_the_rendered_file() -> None:
    argv = uml.argv_of(UML_SPEC)
    assert argv == rendered("uml")["uml.argv"].splitlines()
    assert argv[0] == "/usr/bin/linux.uml"
    assert f"ubd0r={SPEC.base_image}" in argv and f"ubd1={SPEC.upper_image}" in argv
    assert f"eth0=tuntap,{SPEC.tap},{SPEC.mac}" in argv
    assert argv[-2:] == ["quiet", "unionimg.timeout=20"]
    vector = uml.argv_of(UML_VECTOR_SPEC)
    assert f"vec0:transport=tap,ifname={SPEC.tap},mac={SPEC.mac}" in vector
    assert not [a for a in vector if a.startswith("eth")]
    # the variants differ only in the kernel and the NIC argument
    assert [a for a in argv[1:] if not a.startswith("eth0=")] == [
        a for a in vector[1:] if not a.startswith("vec0:")
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base_image": Path("/srv/a,b/BASE.img")}, "COW"),
        ({"upper_image": Path("/srv/a:b/U.img")}, "COW"),
        ({"initrd": Path("/srv/with space/initrd")}, "blanks"),
        ({"tap": ""}, "tap device"),
        ({"tap": "tap/0"}, "tap device"),
        ({"kernel": Path("/boot/vmlinuz-6.1.0-56-amd64")}, "UML kernel"),
        ({"uml_transport": "slirp"}, "transport"),
    ],
)
def test_uml_refuses(change: Mapping[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        uml.render(dataclasses.replace(UML_SPEC, **change))  # type: ignore[arg-type]


# --- a VM whose image is a chain (issue 13) --------------------------------------------------


def test_chain_goes_on_the_kernel_command_line_last() -> None:
    """Every profile names the chain top to bottom, BASE last, after the spec's own arguments
    (the guest takes the last unionimg.lowers=, so the host's chain wins over --append)."""
    spec = dataclasses.replace(SPEC, cmdline="quiet unionimg.lowers=BASE", **CHAIN)  # type: ignore[arg-type]
    for case, console in (("kvm", "console=ttyS0"), ("xen", "console=hvc0")):
        render = {"kvm": kvm.render, "xen": xen.render}[case]
        back = read_back(render(spec)["domain.xml"])
        assert back.cmdline == f"{console} quiet unionimg.lowers=BASE {LOWERS}", case
    cfg = parse_xl(xen.render(spec)["xl.cfg"])
    assert cfg["cmdline"] == f"console=hvc0 quiet unionimg.lowers=BASE {LOWERS}"
    assert profiles.kernel_cmdline(spec, virtualbox.CONSOLE).endswith(f" {LOWERS}")
    argv = uml.argv_of(dataclasses.replace(spec, kernel=UML_SPEC.kernel))
    assert argv[-3:] == ["quiet", "unionimg.lowers=BASE", LOWERS]
    # no chain: no argument, the profiles as before
    assert "unionimg.lowers" not in profiles.kernel_cmdline(SPEC, "console=ttyS0")
    assert not [a for a in uml.argv_of(UML_SPEC) if "lowers" in a]


@pytest.mark.parametrize(
    ("case", "names"),
    [("kvm-chain", ("vda", "vdb", "vdc", "vdd")), ("xen-chain", ("xvda", "xvdb", "xvdc", "xvdd"))],
)
def test_chain_disks_read_back_read_only(case: str, names: tuple[str, ...]) -> None:
    """libvirt itself (test:///default) reads the layers back as read-only disks after BASE
    and U, top layer first."""
    back = read_back(xml_of(case))
    images = [SPEC.base_image, SPEC.upper_image, *CHAIN_IMAGES]
    assert back.disks == [
        (name, str(image), name[-1] != "b") for name, image in zip(names, images, strict=True)
    ]
    assert back.cmdline.endswith(f" {LOWERS}")


def test_chain_xl_cfg_attaches_layers_read_only() -> None:
    disks = parse_xl(rendered("xen-chain")["xl.cfg"])["disk"]
    assert isinstance(disks, list)
    assert [xl_spec_items(d) for d in disks][2:] == [
        {"format": "raw", "vdev": vdev, "access": "ro", "target": str(image)}
        for vdev, image in zip(("xvdc", "xvdd"), CHAIN_IMAGES, strict=True)
    ]


def test_chain_vbox_script_attaches_layers_immutable(tmp_path: Path) -> None:
    calls = run_vbox_script(tmp_path, rendered("virtualbox-chain")["create-vm.sh"])
    ctl = calls[2]
    assert option(ctl, "--portcount") == ["5"]
    media = [
        (option(a, "--port")[0], option(a, "--mtype")[0], option(a, "--medium")[0])
        for a in calls[3:]
    ]
    work = SPEC.workdir
    assert media[3:] == [
        ("3", "immutable", str(work / "layer0.vmdk")),
        ("4", "immutable", str(work / "layer1.vmdk")),
    ]
    files = rendered("virtualbox-chain")
    for i, image in enumerate(CHAIN_IMAGES):
        assert f'\nRW {CHAIN_SECTORS[f"layer{i}"]} FLAT "{image}" 0\n' in files[f"layer{i}.vmdk"]


@pytest.mark.parametrize("name", ["kvm", "xen", "virtualbox", "uml"])
def test_chain_profiles_pass_their_real_validators(name: str, tmp_path: Path) -> None:
    """What each driver prepares for a 2-layer chain passes the validators it names
    (virt-xml-validate, libvirt's test driver, qemu-img on every VMDK, sh -n); the uml argv,
    which has no validator, attaches each layer read-only."""
    from tests import test_hypervisor_conformance as conf

    driver = hypervisors.get(name)
    base = conf.paper_spec(driver, tmp_path)
    layers = tuple(
        conf.raw_file(tmp_path / "layers" / f"L{i}.img", (i + 1) << 20) for i in range(2)
    )
    spec = dataclasses.replace(base, layer_images=layers, layer_labels=CHAIN_LABELS)
    try:
        prepared = driver.prepare(spec)
    except MissingCapability as exc:  # SYSLINUX or mtools for the virtualbox boot disk
        need(False, exc.message)
        raise
    write_rendered(prepared.files, spec.workdir)
    for validator in driver.capabilities.validated_by:
        if validator == "libvirt-test-driver":
            for file in (n for n in prepared.files if n.endswith(".xml")):
                back = read_back(prepared.files[file])
                assert [d[1] for d in back.disks] == [
                    str(p) for p in (spec.base_image, spec.upper_image, *layers)
                ]
                assert [d[2] for d in back.disks] == [True, False, True, True]
        else:
            conf.VALIDATORS[validator](prepared)
    if name == "virtualbox":
        assert {"layer0.vmdk", "layer1.vmdk"} <= set(prepared.files)
    if name == "uml":
        argv = prepared.files["uml.argv"].splitlines()
        assert [a for a in argv if a.startswith("ubd")] == [
            f"ubd0r={spec.base_image}",
            f"ubd1={spec.upper_image}",
            f"ubd2r={layers[0]}",
            f"ubd3r={layers[1]}",
        ]
        assert uml.writable_disks(argv, tmp_path) == [spec.upper_image]


def long_chain(spec: BootSpec, count: int) -> BootSpec:
    hexes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]
    return dataclasses.replace(
        spec,
        layer_images=tuple(ROOT / f"layers/sha256/{h}/layer.img" for h in hexes),
        layer_labels=tuple(f"L{h[:15]}" for h in hexes),
    )


@pytest.mark.parametrize(
    ("name", "most", "last_device"),
    [("kvm", 24, "vdz"), ("xen", 24, "xvdz"), ("uml", 14, "ubd15r="), ("virtualbox", 27, "")],
)
def test_a_chain_too_long_for_the_hypervisor_is_refused(
    name: str, most: int, last_device: str
) -> None:
    """The longest chain each hypervisor can attach renders; one layer more is refused in one
    line that says the limit and why."""
    spec = UML_SPEC if name == "uml" else SPEC

    def render(count: int) -> dict[str, str]:
        chained = long_chain(spec, count)
        if name == "virtualbox":
            sizes = {**SECTORS, **{f"layer{i}": 2048 for i in range(count)}}
            return virtualbox.render(chained, sizes)
        return {"kvm": kvm.render, "xen": xen.render, "uml": uml.render}[name](chained)

    files = render(most)
    text = "".join(files.values())
    assert last_device in text
    if name == "virtualbox":
        assert f"layer{most - 1}.vmdk" in files and f"--portcount {most + 3} " in text
    with pytest.raises(UsageError) as err:
        render(most + 1)
    message = err.value.message
    assert "\n" not in message
    assert f"its chain has {most + 1} layers above BASE but {name} attaches at most {most}" in (
        message
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_labels": ("L" + "0" * 15,)}, "2 layer images but 1 layer labels"),
        ({"layer_labels": ("L" + "0" * 14, "L" + "1" * 15)}, "is not L and 15"),
        ({"layer_labels": ("L" + "A" * 15, "L" + "1" * 15)}, "is not L and 15"),
        ({"layer_labels": ("U" + "0" * 15, "L" + "1" * 15)}, "is not L and 15"),
        ({"layer_labels": ("L" + "0" * 15, "L" + "0" * 15)}, "names one layer twice"),
        ({"layer_images": (Path("rel/layer.img"), ROOT / "x.img")}, "absolute path"),
        ({"layer_images": (SPEC.base_image, ROOT / "x.img")}, "attached twice"),
        ({"layer_images": (ROOT / "x.img", ROOT / "x.img")}, "attached twice"),
    ],
)
def test_a_malformed_chain_is_refused(change: Mapping[str, object], message: str) -> None:
    spec = dataclasses.replace(SPEC, **{**CHAIN, **change})  # type: ignore[arg-type]
    for render in (kvm.render, xen.render, lambda s: virtualbox.render(s, CHAIN_SECTORS)):
        with pytest.raises(UsageError, match=message):
            render(spec)
    with pytest.raises(UsageError, match=message):
        uml.render(dataclasses.replace(spec, kernel=UML_SPEC.kernel))


def test_uml_refuses_a_layer_path_ubd_cannot_hold() -> None:
    images = (Path("/srv/a,b/layer.img"), CHAIN_IMAGES[1])
    spec = dataclasses.replace(UML_SPEC, layer_images=images, layer_labels=CHAIN_LABELS)
    with pytest.raises(UsageError, match="COW"):
        uml.render(spec)


# --- writing ---------------------------------------------------------------------------------


def test_write_rendered(tmp_path: Path) -> None:
    files = rendered("virtualbox")
    out = tmp_path / "run"
    written = write_rendered(files, out)
    assert sorted(p.name for p in written) == sorted(files)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temp files left
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.suffix == ".sh" else 0o600), path
        assert path.read_text() == files[path.name]
    write_rendered({"create-vm.sh": "#!/bin/sh\n"}, out)  # replaces in place
    assert (out / "create-vm.sh").read_text() == "#!/bin/sh\n"
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError):
            write_rendered({bad: ""}, out)


# --- real boots (slow) -----------------------------------------------------------------------


def guest_kernel() -> Path | None:
    """The newest /boot/vmlinuz-VERSION whose modules are installed."""
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        if (Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-") / "modules.dep").is_file():
            return vmlinuz
    return None


@dataclass(frozen=True)
class Guest:
    dir: Path
    initrd: Path
    base: Path
    base_sha256: str
    kernel: Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    """The tiny rootfs as BASE.img and the initramfs, in a directory libvirt's qemu user can
    traverse (pytest's tmp_path is 0700)."""
    need_programs("mke2fs", "cpio", "modprobe", "debugfs")
    need(Path("/bin/busybox").is_file(), "busybox-static not installed")
    kernel = guest_kernel()
    need(kernel is not None, "no Debian kernel in /boot with modules (linux-image-amd64)")
    assert kernel is not None
    folder = Path(tempfile.mkdtemp(prefix="unionimg-profiles-", dir="/var/tmp"))
    try:
        folder.chmod(0o755)
        rootfs = build("tiny")
        base = folder / "BASE.img"
        run(["mke2fs", "-q", "-t", "ext4", "-L", "BASE", "-d", str(rootfs), str(base), "64M"])
        info = build_initramfs(folder / "initrd.img")
        yield Guest(folder, info.path, base, sha256(base), kernel)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def guest_spec(guest: Guest, name: str, mac: str, **change: object) -> BootSpec:
    work = guest.dir / name
    work.mkdir(mode=0o755)
    layers = work / "u-tree"
    (layers / "upper").mkdir(parents=True)
    (layers / "work").mkdir()
    upper = work / "U.img"
    run(["mke2fs", "-q", "-t", "ext4", "-L", "U", "-d", str(layers), str(upper), "64M"])
    spec = BootSpec(
        name=name,
        uuid=instance_uuid(name),
        mac=mac,
        nic_name="eth0",
        memory_mib=256,
        vcpus=1,
        base_image=guest.base,
        upper_image=upper,
        kernel=guest.kernel,
        initrd=guest.initrd,
        cmdline="panic=-1",
        console_log=work / "console.log",
        workdir=work,
    )
    return dataclasses.replace(spec, **change)  # type: ignore[arg-type]


def check_console(console: str, guest: Guest, spec: BootSpec) -> None:
    tail = console[-3000:]
    assert "unionimg-init: error" not in console, tail
    assert re.search(rf"^unionimg-guest: nic \S+ mac {re.escape(spec.mac)}\s*$", console, re.M), (
        tail
    )
    assert re.search(r"^unionimg-guest: root overlay / overlay rw,", console, re.M), tail
    assert "unionimg-guest: boot 1" in console, tail
    boots = run(["debugfs", "-R", "cat /upper/var/log/boots", str(spec.upper_image)]).stdout
    assert len(boots.splitlines()) == 1  # the guest wrote to U
    assert sha256(guest.base) == guest.base_sha256  # and never to BASE


@pytest.mark.slow
def test_virtualbox_layout_boots_under_qemu(guest: Guest) -> None:
    """What VirtualBox's config gives the guest, under QEMU: the SYSLINUX boot disk and the
    two images through their VMDK descriptors on one AHCI controller (BASE as a throw-away
    snapshot, like VirtualBox's immutable type), an e1000 NIC with the instance's MAC."""
    need_programs("qemu-system-x86_64")
    need_boot_disk_tools()
    spec = guest_spec(guest, "vbox1", "52:54:00:0b:0c:01")
    prepared = virtualbox.DRIVER.prepare(spec)
    assert prepared.made == (spec.workdir / "boot.img",)
    write_rendered(prepared.files, spec.workdir)
    drives = [
        ("boot", "boot.vmdk", ""),
        ("base", "base.vmdk", ",snapshot=on"),
        ("upper", "upper.vmdk", ""),
    ]
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nographic"]
    argv += ["-no-reboot", "-device", "ahci,id=ahci"]
    for port, (drive, vmdk, extra) in enumerate(drives):
        argv += ["-drive", f"file={spec.workdir / vmdk},format=vmdk,if=none,id={drive}{extra}"]
        boot = ",bootindex=0" if port == 0 else ""
        argv += ["-device", f"ide-hd,bus=ahci.{port},drive={drive}{boot}"]
    argv += ["-netdev", "user,id=n0", "-device", f"e1000,netdev=n0,mac={spec.mac}"]
    started = time.monotonic()
    result = run(argv, check=False, timeout=300, input="")
    print(
        f"VirtualBox layout under QEMU-TCG, start to power-off: {time.monotonic() - started:.1f} s"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "SYSLINUX" in result.stdout
    check_console(result.stdout, guest, spec)
