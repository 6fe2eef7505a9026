"""``unionimg layer ...``: the image tree, the store's layers (list, show, tree, gc)."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from unionimg.cli._common import Ctx, emit, json_option, json_text, pass_ctx
from unionimg.display import shown
from unionimg.layers import layerstore, snapshot
from unionimg.layers.layerstore import Layer
from unionimg.names import human_size


@click.group()
def layer() -> None:
    """The image tree: immutable, content-addressed layers, each over a parent."""


def _row(la: Layer, refs: dict[str, list[str]], users: dict[str, list[str]]) -> dict[str, Any]:
    out = la.to_json()
    out["short"] = la.short
    out["used_by"] = refs.get(la.diff_id, [])
    out["instances"] = sorted(users.get(la.diff_id, []))
    return out


def _what(m: dict[str, Any]) -> str:
    origin = shown(str(m["origin"])) if m["origin"] else m["kind"]
    return f"{m['kind']}, {origin}"


@layer.command("list")
@json_option
@pass_ctx
def layer_list(c: Ctx, as_json: bool) -> None:
    """List the store's layers, oldest first: digest, kind, size, parent, what made it."""
    refs = layerstore.references(c.store)
    users = snapshot.users(c.store)
    rows = [_row(la, refs, users) for la in layerstore.list_layers(c.store)]

    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            parent = r["parent"].removeprefix("sha256:")[:12] if r["parent"] else "-"
            click.echo(
                f"{r['short']}\t{r['kind']}\t{human_size(r['blob_size'] or r['tar_size'])}\t"
                f"parent {parent}\t{shown(r['origin']) or '-'}"
            )

    emit(rows, as_json, human)


@layer.command("show")
@click.argument("layer_ref", metavar="LAYER")
@json_option
@pass_ctx
def layer_show(c: Ctx, layer_ref: str, as_json: bool) -> None:
    """Show one layer (LAYER: its digest, a unique prefix of 4+ hex digits, or its label),
    its chain of parents and what uses it."""
    la = layerstore.get(c.store, layer_ref)
    data = _row(la, layerstore.references(c.store), snapshot.users(c.store))
    data["chain"] = [x.diff_id for x in layerstore.chain(c.store, la.diff_id)]
    emit(
        data,
        as_json,
        lambda d: click.echo("\n".join(f"{k}: {shown(str(v))}" for k, v in sorted(d.items()))),
    )


def _tree_data(c: Ctx) -> list[dict[str, Any]]:
    """Every layer as a node: its fields, its children's digests and the VMs on it."""
    refs = layerstore.references(c.store)
    users = snapshot.users(c.store)
    layers = layerstore.list_layers(c.store)
    nodes = {la.diff_id: _row(la, refs, users) for la in layers}
    for n in nodes.values():
        n["children"] = []
    for la in layers:
        if la.parent in nodes:
            nodes[la.parent]["children"].append(la.diff_id)
    return list(nodes.values())


def _dot(nodes: list[dict[str, Any]]) -> str:
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [
        "digraph unionimg_layers {",
        "  rankdir=TB;",
        "  node [shape=box, fontname=monospace];",
    ]
    for n in nodes:
        label = f"{n['label']}\n{n['kind']} {human_size(n['blob_size'] or n['tar_size'])}"
        if n["origin"]:
            label += "\n" + shown(str(n["origin"]))
        lines.append(f"  {q(n['short'])} [label={q(label)}];")
    for n in nodes:
        for child in n["children"]:
            lines.append(f"  {q(n['short'])} -> {q(child.removeprefix('sha256:')[:12])};")
        for vm in n["instances"]:
            lines.append(f"  {q('vm ' + vm)} [shape=ellipse, label={q(shown(vm))}];")
            lines.append(f"  {q(n['short'])} -> {q('vm ' + vm)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


@layer.command("tree")
@json_option
@click.option("--dot", "as_dot", is_flag=True, help="Print the tree in Graphviz's dot language.")
@pass_ctx
def layer_tree(c: Ctx, as_json: bool, as_dot: bool) -> None:
    """Draw the image tree: each layer under its parent, with the VMs whose image node it is
    (their top layer) after it."""
    nodes = _tree_data(c)
    if as_json:
        click.echo(json_text(nodes, sort_keys=True))
        return
    if as_dot:
        click.echo(_dot(nodes), nl=False)
        return
    if not nodes:
        click.echo("no layers in this store")
        return
    by_id = {n["diff_id"]: n for n in nodes}

    def text(n: dict[str, Any]) -> str:
        size = human_size(n["blob_size"] or n["tar_size"])
        out = f"[bold]{n['short']}[/bold] {escape(_what(n))} ({size})"
        if n["instances"]:
            out += " [green]← " + escape(", ".join(shown(v) for v in n["instances"])) + "[/green]"
        return out

    def grow(branch: Tree, n: dict[str, Any]) -> None:
        for child in n["children"]:
            grow(branch.add(text(by_id[child])), by_id[child])

    top = Tree("[dim]image tree[/dim]", guide_style="dim")
    for n in nodes:
        if n["parent"] not in by_id:
            grow(top.add(text(n)), n)
    console = Console(file=sys.stdout, soft_wrap=True, highlight=False)
    console.print(top)


@layer.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
@pass_ctx
def layer_gc(c: Ctx, dry_run: bool, as_json: bool) -> None:
    """Remove the layers nothing uses: no instance's chain, no child layer, no base
    generation, no system node."""
    gone = layerstore.gc(c.store, dry_run=dry_run)
    freed = sum(la.meta.image_size + la.meta.blob_size for la in gone)
    data = {
        "dry_run": dry_run,
        "removed": [la.diff_id for la in gone],
        "bytes": freed,
    }

    def human(d: dict[str, Any]) -> None:
        verb = "would remove" if dry_run else "removed"
        for la in gone:
            click.echo(f"{verb} {la.short} ({la.meta.kind}, {shown(la.meta.origin) or '-'})")
        click.echo(f"{verb} {len(gone)} layer(s), {human_size(freed)}")

    emit(data, as_json, human)
