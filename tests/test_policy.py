"""Reconcile policy: TOML parsing, validation messages, glob matching, first match wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionimg.errors import UsageError
from unionimg.reconcile.policy import GlobError, Policy, compile_glob, load_policy, parse_policy

EXAMPLE = """
default = "merge"
binary = "keep-local"

[[rule]]
glob = "/etc/ssh/*"
action = "keep-local"
note = "host keys and sshd_config are per VM"

[[rule]]
glob = "/lib/**"
action = "take-base"

[[rule]]
glob = "/etc/**"
action = "merge"

[[rule]]
glob = "/**/*.db"
action = "fail"
"""


def test_parse_example_and_first_match_wins() -> None:
    policy = parse_policy(EXAMPLE, "site.toml")
    assert (policy.default, policy.binary, len(policy.rules)) == ("merge", "keep-local", 4)
    assert policy.action_for("/etc/ssh/sshd_config") == "keep-local"
    assert policy.action_for("/etc/ssh/keys/host") == "merge"  # '*' stays in one component
    assert policy.action_for("/lib/x86_64-linux-gnu/libc.so.6") == "take-base"
    assert policy.action_for("/lib") == "merge"  # '/lib/**' is what is below /lib
    assert policy.action_for("/etc/app/users.db") == "merge"  # rule 3 comes before rule 4
    assert policy.action_for("/var/lib/rpm/Packages.db") == "fail"
    assert policy.action_for("/users.db") == "fail"  # '/**/' matches zero components too
    decision = policy.decide("/etc/ssh/moduli")
    assert decision.rule is not None and decision.rule.number == 1
    assert "rule 1 (/etc/ssh/*): host keys" in decision.describe()
    assert policy.decide("/usr/bin/x").rule is None
    note = "host keys and sshd_config are per VM"
    assert policy.to_json()["rules"] == [
        {"glob": "/etc/ssh/*", "action": "keep-local", "note": note},
        {"glob": "/lib/**", "action": "take-base"},
        {"glob": "/etc/**", "action": "merge"},
        {"glob": "/**/*.db", "action": "fail"},
    ]


def test_builtin_policy() -> None:
    """Without a file: the shipped rules (tests/test_volatile.py), anything else merged."""
    policy = load_policy(None)
    assert policy.rules and all(r.shipped for r in policy.rules)
    assert (policy.default, policy.binary) == (Policy().default, Policy().binary)
    assert (policy.action_for("/etc/passwd"), policy.binary) == ("merge", "conflict")


def test_default_action_applies_when_nothing_matches() -> None:
    policy = parse_policy('default = "keep-local"\n[[rule]]\nglob = "/etc/*"\naction = "merge"')
    assert policy.action_for("/etc/fstab") == "merge"
    assert policy.action_for("/usr/lib/os-release") == "keep-local"


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/etc/ssh/*", "/etc/ssh/sshd_config", True),
        ("/etc/ssh/*", "/etc/ssh", False),
        ("/etc/*.conf", "/etc/a b.conf", True),
        ("/etc/*.conf", "/etc/sub/a.conf", False),
        ("/etc/host?", "/etc/hosts", True),
        ("/etc/host?", "/etc/host", False),
        ("/etc/rc[0-6].d/*", "/etc/rc3.d/S01x", True),
        ("/etc/rc[0-6].d/*", "/etc/rcS.d/S01x", False),
        ("/etc/[!s]*", "/etc/passwd", True),
        ("/etc/[!s]*", "/etc/shadow", False),
        ("/a/[]]", "/a/]", True),
        ("/**", "/anything/at/all", True),
        ("/**/x", "/x", True),
        ("/**/x", "/a/b/x", True),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/zz", False),
        ("/réglages/été *", "/réglages/été 2024", True),
        ("/lit\\*", "/lit*", True),
        ("/lit\\*", "/lits", False),
        ("/etc/a.b", "/etc/aXb", False),  # '.' is literal
        ("/", "/", True),
    ],
)
def test_glob_semantics(glob: str, path: str, matches: bool) -> None:
    assert (compile_glob(glob).fullmatch(path) is not None) is matches


@pytest.mark.parametrize(
    ("glob", "why"),
    [
        ("etc/*", "starts with '/'"),
        ("/etc/[abc", "never closed"),
        ("/etc/a**", "whole path component"),
        ("/etc//x", "empty path component"),
        ("/etc/", "does not end with '/'"),
        ("/etc/[z-a]", "range"),
        ("/etc/x\\", "escapes nothing"),
    ],
)
def test_bad_globs(glob: str, why: str) -> None:
    with pytest.raises(GlobError, match=why):
        compile_glob(glob)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nglob = "/a"\naction = "merge"\n[[rule]]\nglob = "/b"\naction = "keep"',
         r"^policy p\.toml: rule 2: action = 'keep' is not one of merge, keep-local, take-base, "
         r"fail$"),
        ('[[rule]]\nglob = "/etc/[x"\naction = "merge"',
         r"^policy p\.toml: rule 1: bad glob '/etc/\[x': .*never closed"),
        ('[[rule]]\nglob = "/a"\naction = "merge"\npattern = "x"',
         r"^policy p\.toml: rule 1: unknown key 'pattern' \(known: glob, action, note\)$"),
        ('defaults = "merge"', r"^policy p\.toml: unknown key 'defaults'"),
        ('binary = "merge"', r"^policy p\.toml: binary = 'merge' is not one of conflict, "),
        ('default = 3', r"^policy p\.toml: default = 3 is not one of"),
        ('[[rule]]\naction = "merge"', r"^policy p\.toml: rule 1: 'glob' is missing$"),
        ('[[rule]]\nglob = 5\naction = "merge"', r"^policy p\.toml: rule 1: glob must be a string"),
        ('rule = "x"', r"^policy p\.toml: 'rule' must be written as \[\[rule\]\] tables$"),
        ('[[rule]\n', r"^policy p\.toml: not valid TOML: "),
    ],
)  # fmt: skip
def test_validation_errors_name_file_and_rule(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_policy(text, "p.toml")
    assert "\n" not in info.value.message


def test_load_policy_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    policy = load_policy(path)
    assert policy.source == str(path) and policy.action_for("/lib/a") == "take-base"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nglob = "/a"\naction = "drop"\n', encoding="utf-8")
    with pytest.raises(UsageError, match=f"policy {bad}: rule 1: action"):
        load_policy(bad)
    with pytest.raises(UsageError, match="no such file"):
        load_policy(tmp_path / "missing.toml")
