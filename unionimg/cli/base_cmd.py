"""``unionimg base ...``: named OS images with numbered, immutable generations."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from unionimg import ops
from unionimg.cli._common import ASCII_INT, Ctx, emit, json_option, pass_ctx, print_log, size_type
from unionimg.fs.image import disk_usage
from unionimg.layers import base as base_mod
from unionimg.names import human_size


@click.group()
def base() -> None:
    """Bases: named OS images with numbered, immutable generations."""


def _stored_as(kind: str, parent: int | None, on_disk: int) -> str:
    if kind == "delta":
        return f"a delta over generation {parent}, {human_size(on_disk)} on disk"
    return f"a whole image, {human_size(on_disk)} on disk"


def _history(g: base_mod.Generation) -> str:
    node = base_mod.history_node(g)
    return f"hg {node[:12]}" if node else f"made from layer {g.node[7:19]}, no history here"


def _print_generation(g: base_mod.Generation, verb: str) -> None:
    click.echo(
        f"{verb} base {g.base} generation {g.number}: {g.image} "
        f"({human_size(g.size)}, {g.files} paths, {_history(g)}; "
        f"{_stored_as(g.kind, g.parent, disk_usage(g.image))})"
    )


@base.command("create")
@click.argument("name")
@click.option(
    "--from-dir",
    "from_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory holding exactly the OS tree.",
)
@click.option(
    "--size", default=None, help="Image size (e.g. 2G, at most 8T); default fits the tree."
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    default=None,
    help="x86 bzImage (vmlinuz) to boot this base with (default: the tree's /boot/vmlinuz-*).",
)
@pass_ctx
def base_create(c: Ctx, name: str, from_dir: Path, size: str | None, kernel: Path | None) -> None:
    """Create base NAME, generation 1, from DIR (owners, modes, xattrs, devices kept)."""
    g = base_mod.create(
        c.store, name, from_dir, size=size_type(size, f" for base {name}"), kernel=kernel
    )
    _print_generation(g, "created")


@base.command("update")
@click.argument("name")
@click.option(
    "--from-dir",
    "from_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The new generation is exactly this directory.",
)
@click.option(
    "--apply-dir",
    "apply_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="This directory's files laid over the latest generation.",
)
@click.option(
    "--run",
    "command",
    default=None,
    help="Run this with the base's /bin/sh -c, chrooted in a copy of the latest.",
)
@click.option("--size", default=None, help="Image size (at most 8T); default fits the tree.")
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    default=None,
    help="x86 bzImage (vmlinuz) to boot this generation with (default: the tree's, else "
    "the previous generation's).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Store a whole image, even where a delta from the latest would be smaller.",
)
@pass_ctx
def base_update(
    c: Ctx,
    name: str,
    from_dir: Path | None,
    apply_dir: Path | None,
    command: str | None,
    size: str | None,
    kernel: Path | None,
    full: bool,
) -> None:
    """Make generation N+1 of NAME; existing generations are never modified.

    A --run command's output is shown as it runs and kept with the generation (run.log,
    see 'base show'); a command that changes nothing makes no generation ("no change").
    SSH host keys, machine-id and random seeds are kept out of every generation (each
    instance gets its own: docs/identity.md). The generation is stored as a delta layer
    over the latest when that holds under half the bytes of a whole image (at most 6
    deltas over one whole image); a delta keeps the generations below it from 'base gc'."""
    done = base_mod.update_base(
        c.store,
        name,
        from_dir=from_dir,
        apply_dir=apply_dir,
        command=command,
        size=size_type(size, f" for base {name}"),
        kernel=kernel,
        echo=_echo,
        full=full,
    )
    if not done.changed:
        click.echo(f"no change: base {name} stays at generation {done.generation.number}")
        return
    _print_generation(done.generation, "made")
    if done.generation.run_log is not None:
        click.echo(f"the command's output is kept in {done.generation.run_log}")


def _echo(fd: int, data: bytes) -> None:
    """--run's output, as it comes, to unionimg's own stdout (fd 1) or stderr (fd 2)."""
    text = sys.stdout if fd == 1 else sys.stderr
    text.flush()  # what unionimg printed before goes first
    text.buffer.write(data)
    text.buffer.flush()


@base.command("list")
@json_option
@pass_ctx
def base_list(c: Ctx, as_json: bool) -> None:
    """List bases and their latest generation."""
    rows = [base_mod.show(c.store, n) for n in base_mod.list_bases(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            click.echo(f"{r['name']}\tlatest {r['latest']}\t{len(r['generations'])} generation(s)")

    emit(rows, as_json, human)


@base.command("show")
@click.argument("name")
@json_option
@pass_ctx
def base_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show a base and its generations."""
    data = base_mod.show(c.store, name)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"base {d['name']} (latest generation {d['latest']})")
        for g in d["generations"]:
            click.echo(
                f"  {g['number']}\t{g['created']}\t{human_size(g['size'])}\t"
                f"{g['files']} paths\t{g['image']}\t"
                f"{_stored_as(g['kind'], g['parent'], g['disk_usage'])}"
            )
            if g.get("run_log"):
                click.echo(f"    --run output: {g['run_log']}")

    emit(data, as_json, human)


@base.command("log")
@click.argument("name")
@json_option
@pass_ctx
def base_log(c: Ctx, name: str, as_json: bool) -> None:
    """The base's Mercurial history: one changeset per generation."""
    print_log(base_mod.log(c.store, name), as_json)


@base.command("diff")
@click.argument("name")
@click.option(
    "--from", "from_gen", type=ASCII_INT, default=None, help="Generation (default: to-1)."
)
@click.option("--to", "to_gen", type=ASCII_INT, default=None, help="Generation (default: latest).")
@json_option
@pass_ctx
def base_diff(c: Ctx, name: str, from_gen: int | None, to_gen: int | None, as_json: bool) -> None:
    """Paths added, modified and deleted between two generations."""
    data = base_mod.diff(c.store, name, from_gen, to_gen)

    def human(d: dict[str, Any]) -> None:
        meta = set(d["metadata_only"])
        for key, mark in (("added", "A"), ("modified", "M"), ("deleted", "D")):
            for p in d[key]:
                click.echo(f"{'m' if p in meta else mark} {p}")

    emit(data, as_json, human)


@base.command("gc")
@click.argument("name", required=False)
@click.option(
    "--dry-run", is_flag=True, help="Say what would be removed and what is kept, and why."
)
@json_option
@pass_ctx
def base_gc(c: Ctx, name: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove generations that are not the latest, that no instance uses and that no
    instance's 'reconcile --undo' returns to (each such generation kept is named)."""
    out = ops.gc_bases(c.store, name, dry_run=dry_run)
    removed = [{"base": b, "generation": g} for b, g in out.removed]
    kept = [{"base": k.base, "generation": k.generation, "why": k.why} for k in out.kept]
    if dry_run:
        data: Any = {"dry_run": True, "would_remove": removed, "keep": kept}

        def human(d: Any) -> None:
            for r in d["would_remove"]:
                click.echo(f"would remove {r['base']} generation {r['generation']}")
            for r in d["keep"]:
                click.echo(f"keep {r['base']} generation {r['generation']}: {r['why']}")
            if not d["would_remove"]:
                click.echo("nothing to remove")

        emit(data, as_json, human)
        return
    # kept for an undo record: said per generation (on stderr beside --json's list)
    for k in out.kept:
        if k.for_reconcile:
            click.echo(f"kept {k.base} generation {k.generation}: {k.why}", err=as_json)
    emit(
        removed,
        as_json,
        lambda rows: click.echo(
            "\n".join(f"removed {r['base']} generation {r['generation']}" for r in rows)
            or "nothing to remove"
        ),
    )


@base.command("remove")
@click.argument("name")
@pass_ctx
def base_remove(c: Ctx, name: str) -> None:
    """Remove a base no instance uses (all generations and history)."""
    ops.remove_base(c.store, name)
    click.echo(f"removed base {name}")
