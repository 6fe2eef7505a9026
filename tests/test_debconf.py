"""debconf's databases merged record by record (issue 12, item 5): pure tests."""

from __future__ import annotations

from unionimg.reconcile import debconf
from unionimg.reconcile.debconf import CONFIG, TEMPLATES, merge, parse
from unionimg.reconcile.structured import MERGERS, MergeInput, Versions


def rec(name: str, *lines: str) -> str:
    return "\n".join([f"Name: {name}", *lines]) + "\n\n"


TZ = rec("tzdata/Areas", "Template: tzdata/Areas", "Value: Etc", "Owners: tzdata", "Flags: seen")
PAM = rec(
    "libpam-runtime/profiles",
    "Template: libpam-runtime/profiles",
    "Value: unix",
    "Owners: libpam-runtime",
    "Variables:",
    " profile_names = unix, mkhomedir",
    " profiles = Unix authentication",
)
OLD = (PAM + TZ).encode()


def test_additions_of_both_sides_are_kept_in_name_order() -> None:
    """Both installed a package: the base's questions and the VM's, sorted as debconf."""
    nginx = rec("nginx/x", "Template: nginx/x", "Owners: nginx")
    sshd = rec("openssh-server/permit-root-login", "Template: o/p", "Owners: openssh-server")
    local = (PAM + nginx + TZ).encode()
    new = (PAM + sshd + TZ).encode()
    result = merge(CONFIG, OLD, local, new)
    assert result.clean, result.reason
    assert result.data == (PAM + nginx + sshd + TZ).encode()
    assert list(parse(result.data)) == sorted(parse(result.data))


def test_unchanged_input_is_byte_identical() -> None:
    result = merge(CONFIG, OLD, OLD, OLD)
    assert result.clean and result.data == OLD


def test_one_side_changes_take_that_side() -> None:
    changed_tz = TZ.replace("Value: Etc", "Value: Europe")
    new = (PAM + changed_tz).encode()
    assert merge(CONFIG, OLD, OLD, new).data == new  # B1's change
    assert merge(CONFIG, OLD, new, OLD).data == new  # the VM's change
    removed = PAM.encode()  # a package purged on one side: its question goes
    assert merge(CONFIG, OLD, OLD, removed).data == removed
    assert merge(CONFIG, OLD, removed, OLD).data == removed


def test_deleted_on_one_side_modified_on_the_other_is_kept() -> None:
    changed_tz = TZ.replace("Value: Etc", "Value: Europe")
    result = merge(CONFIG, OLD, PAM.encode(), (PAM + changed_tz).encode())
    assert result.clean and result.data == (PAM + changed_tz).encode()


def test_both_changed_one_question_owners_joined_vm_answer_kept() -> None:
    """The VM answered Europe, the base added an owner: both kept; the VM's answer wins
    over the base's different one."""
    local = TZ.replace("Value: Etc", "Value: Europe")
    new = TZ.replace("Value: Etc", "Value: America").replace(
        "Owners: tzdata", "Owners: tzdata, tzdata-legacy"
    )
    result = merge(CONFIG, OLD, (PAM + local).encode(), (PAM + new).encode())
    assert result.clean and "1 merged" in result.reason
    merged = parse(result.data)[b"tzdata/Areas"]
    assert merged.get(b"value") == b"Europe"
    assert merged.get(b"owners") == b"tzdata, tzdata-legacy"
    assert merged.get(b"flags") == b"seen"


def test_templates_prefer_the_base_text_and_keep_continuations() -> None:
    old = rec("t/q", "Type: string", "Description: old", " more").encode()
    local = rec("t/q", "Type: string", "Description: vm", " more", "Owners: a").encode()
    new = rec("t/q", "Type: string", "Description: base", " more", "Owners: b").encode()
    result = merge(TEMPLATES, old, local, new)
    r = parse(result.data)[b"t/q"]
    assert r.get(b"description") == b"base\n more"
    assert r.get(b"owners") == b"a, b"
    assert b"Description: base\n more\n" in result.data


def test_variables_field_without_inline_value_is_written_as_debconf_does() -> None:
    local = PAM.replace("Value: unix", "Value: unix, mkhomedir").replace(
        "Owners: libpam-runtime", "Owners: libpam-runtime, x"
    )
    new = PAM.replace("Owners: libpam-runtime", "Owners: libpam-runtime, y").replace(
        " profiles = Unix authentication", " profiles = Unix auth"
    )
    result = merge(CONFIG, PAM.encode(), local.encode(), new.encode())
    assert b"Variables:\n profile_names = unix, mkhomedir\n profiles = Unix auth\n" in result.data
    assert b"Owners: libpam-runtime, x, y\n" in result.data


def test_owner_removed_by_both_sides_drops_the_question() -> None:
    old = rec("a/q", "Owners: a, b").encode()
    result = merge(CONFIG, old, rec("a/q", "Owners: b").encode(), rec("a/q", "Owners: a").encode())
    assert result.clean and result.data == b""


def test_added_on_both_sides_without_ancestor() -> None:
    """No B0 file (both installed debconf's first user): merged, owners joined."""
    local = rec("x/q", "Template: x/q", "Owners: vm").encode()
    new = rec("x/q", "Template: x/q", "Owners: base").encode() + TZ.encode()
    result = merge(CONFIG, None, local, new)
    assert result.clean
    assert parse(result.data)[b"x/q"].get(b"owners") == b"vm, base"
    assert b"tzdata/Areas" in parse(result.data)


def test_malformed_database_is_refused_in_one_line() -> None:
    for bad in (b"Name: a\nthis is no field\n\n", b"Template: x\n\n", b"Name: a\n\nName: a\n\n"):
        result = merge(CONFIG, OLD, bad, OLD)
        assert not result.clean and result.data == bad
        assert "\n" not in result.reason and "the VM's version line" in result.reason


def test_registered_as_structured_mergers() -> None:
    for path in debconf.FORMATS:
        merger = MERGERS[path]
        nginx = rec("nginx/x", "Owners: nginx")
        sshd = rec("ssh/x", "Owners: ssh")
        v = Versions(OLD, (OLD.decode() + nginx).encode(), (OLD.decode() + sshd).encode())
        inp = MergeInput(path, v, lambda p: Versions(None, None, None), lambda: ())
        out = merger(inp)
        assert out.outcome == "merged" and b"nginx/x" in out.data and b"ssh/x" in out.data
