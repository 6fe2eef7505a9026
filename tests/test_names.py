"""Pure input validation and MAC derivation (no root)."""

from __future__ import annotations

import pytest

from unionimg.errors import UsageError
from unionimg.mac import derive_mac
from unionimg.names import (
    MAX_SIZE,
    check_hypervisor,
    check_name,
    check_nic_name,
    parse_int,
    parse_mac,
    parse_seconds,
    parse_size,
    shown,
)


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
        "web1\n",  # '$' of a regular expression matches before a trailing newline
        "web1 ",
        "web\u0661",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError) as exc:
        check_name(name, "instance")
    assert "\n" not in exc.value.message


def test_mac_normalised() -> None:
    assert parse_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    assert parse_mac("02:00:00:00:00:01") == "02:00:00:00:00:01"
    assert parse_mac("00:16:3E:00:00:01") == "00:16:3e:00:00:01"


@pytest.mark.parametrize(
    "mac",
    [
        "52:54:00:ab:cd",
        "zz:54:00:ab:cd:ef",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "525400abcdef",
        "52:54:00:ab:cd:ef\n",
        "52:54:00:ab:cd:ef\r",
        "\t52:54:00:ab:cd:ef",
        "52:54-00:ab:cd:ef",
        "52:54:00:ab:cd:e\u0660",
        "52:54:00:ab:cd:ef:00",
        "33:33:00:00:00:01",
    ],
)
def test_bad_macs(mac: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_mac(mac, of=" for instance vm1")
    assert "\n" not in exc.value.message and "\r" not in exc.value.message
    assert "for instance vm1" in exc.value.message


@pytest.mark.parametrize("nic", ["eth0", "vec0", "enp0s3", "br-lan", "wan.10", "a", "x" * 15])
def test_good_nic_names(nic: str) -> None:
    assert check_nic_name(nic) == nic


@pytest.mark.parametrize(
    "nic",
    [
        "",
        "x" * 16,
        "\u00e9",
        "a/b",
        "a b",
        "a\n",
        "a:1",
        "a%d",
        "a'b",
        ".",
        "..",
        "-a",
        "all",
        "007",
    ],
)
def test_bad_nic_names(nic: str) -> None:
    with pytest.raises(UsageError) as exc:
        check_nic_name(nic)
    assert "\n" not in exc.value.message


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
    [
        ("512M", 512 << 20),
        ("4G", 4 << 30),
        ("1.5GiB", 3 << 29),
        ("4096", 4096),
        ("8k", 8192),
        ("4KB", 4096),
        ("7B", 7),
        ("0.5K", 512),
        ("8T", MAX_SIZE),
        ("8192G", MAX_SIZE),
        ("1.00000000000000000001T", None),
    ],
)
def test_sizes(text: str, value: int | None) -> None:
    if value is None:  # exact arithmetic: 1.00000000000000000001 TiB is not whole bytes
        with pytest.raises(UsageError, match="whole number of bytes"):
            parse_size(text)
    else:
        assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "big",
        "-1G",
        "4X",
        "1..2G",
        "1\u0660G",
        "\u0664G",
        "4G\n",
        " 4G",
        "4 G",
        "4iB",
        "1e3",
        "1_000",
        "0",
        "0.0M",
        "1.5",
        "8193G",
        "8T1",
        "9" * 5000,
        "4\u212a",  # KELVIN SIGN: re.IGNORECASE would take it for a K
    ],
)
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_size(text, "--size", of=" for base b")
    assert "for base b" in exc.value.message and "\n" not in exc.value.message


def test_parse_int() -> None:
    assert parse_int("512", "--memory", 32, 1024) == 512
    assert parse_int("-3", "--x") == -3
    for bad in ("\u0665", "1_0", " 1", "1 ", "+1", "0x10", "", "1.0"):
        with pytest.raises(UsageError, match="not a whole number"):
            parse_int(bad, "--memory")
    for out in ("31", "1025", "9" * 5000):
        with pytest.raises(UsageError, match="out of range; give 32 to 1024"):
            parse_int(out, "--memory", 32, 1024)


def test_parse_seconds() -> None:
    assert parse_seconds("300", "--timeout") == 300.0
    assert parse_seconds("0.5", "--timeout") == 0.5
    for bad in ("nan", "inf", "-1", "1e3", "\u0661", "", " 1", "1.", ".5"):
        with pytest.raises(UsageError, match="not a number of seconds"):
            parse_seconds(bad, "--timeout")
    with pytest.raises(UsageError, match="more than 2678400 seconds"):
        parse_seconds("2678401", "--timeout")


def test_shown_escapes_controls() -> None:
    assert shown("a\nb\x1b[31m\u00e9\\") == "a\\nb\\e[31m\u00e9\\\\"
    assert len(shown("x" * 500)) == 60


def test_hypervisors() -> None:
    assert check_hypervisor("uml") == "uml"
    with pytest.raises(UsageError, match="unknown hypervisor 'vmware'"):
        check_hypervisor("vmware")
