"""Pure input validation and MAC derivation (no root)."""

from __future__ import annotations

import pytest

from unionimg.errors import UsageError
from unionimg.mac import derive_mac
from unionimg.names import check_hypervisor, check_name, parse_mac, parse_size


@pytest.mark.parametrize("name", ["web1", "a", "db-2.prod_x", "A" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name, "instance") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "..",
        ".hidden",
        "-x",
        "with space",
        "tab\there",
        "nl\nx",
        "ctl\x01",
        "A" * 65,
        "é",
        "a;b",
        "a'b",
        "a<b>",
        "a$b",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError) as exc:
        check_name(name, "instance")
    assert "\n" not in exc.value.message


def test_mac_normalised() -> None:
    assert parse_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize(
    "mac",
    [
        "52:54:00:ab:cd",
        "zz:54:00:ab:cd:ef",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "525400abcdef",
    ],
)
def test_bad_macs(mac: str) -> None:
    with pytest.raises(UsageError):
        parse_mac(mac)


def test_derived_mac_is_unicast_local_and_deterministic() -> None:
    mac = derive_mac("web1")
    assert mac == derive_mac("web1")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert derive_mac("web2") != mac


def test_derived_mac_avoids_taken() -> None:
    mac = derive_mac("web1")
    other = derive_mac("web1", taken=[mac])
    assert other != mac
    assert int(other[:2], 16) & 3 == 2


@pytest.mark.parametrize(
    ("text", "value"),
    [("512M", 512 << 20), ("4G", 4 << 30), ("1.5GiB", 3 << 29), ("4096", 4096), ("8k", 8192)],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "big", "-1G", "4X", "1..2G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_hypervisors() -> None:
    assert check_hypervisor("uml") == "uml"
    with pytest.raises(UsageError, match="unknown hypervisor 'vmware'"):
        check_hypervisor("vmware")
