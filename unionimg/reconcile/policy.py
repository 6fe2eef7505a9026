"""Reconcile policy: per-glob overrides for paths both the base and a VM changed. Pure.

A policy is a TOML file (documented with examples in ``docs/policy.md``)::

    default = "merge"        # action when no rule matches
    binary = "conflict"      # case 7 (binary file changed on both sides)

    [[rule]]
    glob = "/etc/ssh/*"
    action = "keep-local"

    [[rule]]
    glob = "/lib/**"
    action = "take-base"

Rules are tried in order; the first whose glob matches the whole path wins. Globs are
absolute guest paths: ``*`` matches any run of characters inside one path component, ``?``
one character, ``[abc]``/``[a-z]``/``[!abc]`` one character of a set (never ``/``), ``**`` as
a whole component any number of components (``/lib/**`` is everything below ``/lib``;
``/**/x`` is every ``x``, ``/x`` included), and ``\\`` makes the next character literal.

The policy only governs paths the base delta touches AND the VM's upper layer changed too;
everything else follows the reconcile table whatever the policy says.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from unionimg.errors import UsageError

__all__ = [
    "ACTIONS",
    "BINARY_ACTIONS",
    "Decision",
    "Policy",
    "Rule",
    "compile_glob",
    "load_policy",
    "parse_policy",
]

MERGE, KEEP_LOCAL, TAKE_BASE, FAIL, CONFLICT = (
    "merge", "keep-local", "take-base", "fail", "conflict",
)  # fmt: skip
ACTIONS = (MERGE, KEEP_LOCAL, TAKE_BASE, FAIL)
BINARY_ACTIONS = (CONFLICT, KEEP_LOCAL, TAKE_BASE)
_TOP_KEYS = ("default", "binary", "rule")
_RULE_KEYS = ("glob", "action", "note")


class GlobError(ValueError):
    """A glob that cannot be compiled; the message says why."""


def _char_class(glob: str, start: int) -> tuple[str, int]:
    """Translate the ``[...]`` starting at ``glob[start]``; return (regex, index after it)."""
    i = start + 1
    negate = i < len(glob) and glob[i] in "!^"
    if negate:
        i += 1
    body_start = i
    if i < len(glob) and glob[i] == "]":  # a leading ']' is literal
        i += 1
    while i < len(glob) and glob[i] != "]":
        i += 1
    if i >= len(glob):
        raise GlobError("'[' is never closed")
    body = glob[body_start:i]
    escaped = "".join("\\" + ch if ch in "\\[]^&~|" else ch for ch in body)
    return ("[^/" if negate else "[") + escaped + "]", i + 1


def _component(comp: str) -> str:
    if "**" in comp:
        raise GlobError("'**' must be a whole path component, as in /lib/** or /**/x")
    out = []
    i = 0
    while i < len(comp):
        ch = comp[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            regex, end = _char_class(comp, i)
            out.append(regex)
            i = end
            continue
        elif ch == "\\":
            if i + 1 >= len(comp):
                raise GlobError("'\\' at the end of a component escapes nothing")
            i += 1
            out.append(re.escape(comp[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def compile_glob(glob: str) -> re.Pattern[str]:
    """The regex (for ``fullmatch``) of a policy glob; :class:`GlobError` if malformed."""
    if not glob.startswith("/"):
        raise GlobError("a glob is an absolute guest path and starts with '/'")
    if glob == "/":
        return re.compile("/")
    if glob.endswith("/"):
        raise GlobError("a glob does not end with '/'; use /dir/** for what is below /dir")
    comps = glob[1:].split("/")
    parts: list[str] = []
    for index, comp in enumerate(comps):
        if not comp:
            raise GlobError("empty path component ('//')")
        if comp == "**":
            last = index == len(comps) - 1
            parts.append("(?:/[^/]+)+" if last else "(?:/[^/]+)*")
        else:
            parts.append("/" + _component(comp))
    try:
        return re.compile("".join(parts), re.DOTALL)
    except re.error as exc:
        raise GlobError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Rule:
    number: int  # 1-based position in the file, as error messages and plans name it
    glob: str
    action: str
    note: str = ""
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # raises GlobError for a malformed glob
        object.__setattr__(self, "regex", compile_glob(self.glob))

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None

    def describe(self) -> str:
        text = f"rule {self.number} ({self.glob})"
        return f"{text}: {self.note}" if self.note else text


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # one of ACTIONS
    rule: Rule | None  # None: the policy's default

    def describe(self) -> str:
        by = self.rule.describe() if self.rule else "the default"
        return f"policy {self.action} by {by}"


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default: str = MERGE
    binary: str = CONFLICT
    source: str = "<built-in>"

    def decide(self, path: str) -> Decision:
        for rule in self.rules:
            if rule.matches(path):
                return Decision(rule.action, rule)
        return Decision(self.default, None)

    def action_for(self, path: str) -> str:
        """``merge``, ``keep-local``, ``take-base`` or ``fail`` for a path both sides changed."""
        return self.decide(path).action

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "default": self.default,
            "binary": self.binary,
            "rules": [
                {"glob": r.glob, "action": r.action, **({"note": r.note} if r.note else {})}
                for r in self.rules
            ],
        }


def _choice(source: str, where: str, key: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise UsageError(
            f"policy {source}: {where}{key} = {value!r} is not one of {', '.join(allowed)}"
        )
    return value


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate policy TOML; any mistake is a one-line :class:`UsageError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"policy {source}: not valid TOML: {exc}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise UsageError(
                f"policy {source}: unknown key {key!r} (known: {', '.join(_TOP_KEYS)})"
            )
    default = _choice(source, "", "default", data.get("default", MERGE), ACTIONS)
    binary = _choice(source, "", "binary", data.get("binary", CONFLICT), BINARY_ACTIONS)
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise UsageError(f"policy {source}: 'rule' must be written as [[rule]] tables")
    rules = []
    for number, raw in enumerate(raw_rules, 1):
        where = f"rule {number}: "
        for key in raw:
            if key not in _RULE_KEYS:
                raise UsageError(
                    f"policy {source}: {where}unknown key {key!r} (known: {', '.join(_RULE_KEYS)})"
                )
        for key in ("glob", "action"):
            if key not in raw:
                raise UsageError(f"policy {source}: {where}'{key}' is missing")
        glob, note = raw["glob"], raw.get("note", "")
        if not isinstance(glob, str):
            raise UsageError(f"policy {source}: {where}glob must be a string")
        if not isinstance(note, str):
            raise UsageError(f"policy {source}: {where}note must be a string")
        action = _choice(source, where, "action", raw["action"], ACTIONS)
        try:
            rules.append(Rule(number, glob, action, note))
        except GlobError as exc:
            raise UsageError(f"policy {source}: {where}bad glob {glob!r}: {exc}") from None
    return Policy(tuple(rules), default, binary, source)


def load_policy(path: Path | None) -> Policy:
    """The policy in the TOML file ``path``; ``None`` gives the built-in one (merge all,
    binary files conflict)."""
    if path is None:
        return Policy()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"policy {path}: no such file; give an existing TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"policy {path}: cannot read it: {exc}") from None
    return parse_policy(text, str(path))
