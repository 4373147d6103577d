"""Draws the package's import graph with its subpackages as rooms, floor by floor, and counts what a reader of the
layering rule wants to know: rooms, floors, arrows, arrows that run back up, and circles (one is named).

    python scripts/draw_rooms.py            # the drawing and the counts
    python scripts/draw_rooms.py --dot      # Graphviz DOT of the rooms (dot -Tsvg -o rooms.svg)

The graph comes from grimp (import-linter's own graph, so type-only and function-level imports count as the
contracts count them). A room is a subpackage (`io`, `model`, ...); the ground modules (errors, validate, files,
config, config_read, config_keys) are one room, "ground"; the faces and the CLI are rooms of their own. Floors are
counted from the bottom: a room stands one floor above the highest room it imports. An arrow runs back up when it
goes from a room to one of the same or a higher floor of the declared layers in pyproject.toml
([tool.importlinter] "Rooms in layers"), or between rooms of one layer that the layer declares independent ("|").
"""

from __future__ import annotations

import argparse
import graphlib
import tomllib
from pathlib import Path

import grimp

PACKAGE = "llama_lens"
GROUND = {"errors", "validate", "files", "config", "config_read", "config_keys"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def room_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else "__init__"
    return "ground" if part in GROUND else part


def room_edges(graph: grimp.ImportGraph) -> set[tuple[str, str]]:
    edges = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] != PACKAGE:
                continue
            source, target = room_of(module), room_of(imported)
            if source != target:
                edges.add((source, target))
    return edges


def declared_layers() -> list[tuple[set[str], bool]]:
    """[(rooms of a layer, independent?)], bottom layer first, from the `layers` contract."""
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    out = []
    for line in reversed(layers):
        independent = "|" in line
        names = {name.strip() for name in line.replace(":", "|").split("|")}
        out.append(({"ground" if name in GROUND else name for name in names}, independent))
    return out


def floors(rooms: set[str], edges: set[tuple[str, str]]) -> tuple[dict[str, int], list[str]]:
    """Floor 1 for rooms that import no room, else one above the highest room imported; and a circle of rooms
    ([] when there is none, as the rule wants; with a circle there are no floors to count)."""
    imports = {room: {t for s, t in edges if s == room} for room in rooms}
    try:
        order = list(graphlib.TopologicalSorter(imports).static_order())  # imported rooms first
        circle: list[str] = []
    except graphlib.CycleError as error:
        circle = error.args[1]
        order = []
    floor: dict[str, int] = {}
    for room in order:
        floor[room] = 1 + max((floor[t] for t in imports[room]), default=0)
    return floor, circle


def upward(edges: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Arrows to a higher declared layer, or sideways inside a layer declared independent."""
    layer_of, independent = {}, {}
    for number, (names, is_independent) in enumerate(declared_layers()):
        for name in names:
            layer_of[name], independent[name] = number, is_independent
    bad = []
    for source, target in sorted(edges):
        if source not in layer_of or target not in layer_of:
            bad.append((source, target))  # a room the contract does not place
        elif layer_of[target] > layer_of[source] or (layer_of[target] == layer_of[source] and independent[source]):
            bad.append((source, target))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of the drawing")
    args = parser.parse_args()
    graph = grimp.build_graph(PACKAGE, include_external_packages=False)
    edges = room_edges(graph)
    rooms = {room_of(module) for module in graph.modules}
    if args.dot:
        print("digraph rooms {\n  rankdir=BT;")
        print("\n".join(f'  "{s}" -> "{t}";' for s, t in sorted(edges)))
        print("}")
        return
    floor, circle = floors(rooms, edges)
    if circle:
        print(f"circle: {' -> '.join(circle)}")
    for number in range(max(floor.values(), default=0), 0, -1):
        for room in sorted(r for r in rooms if floor.get(r) == number):
            targets = sorted(t for s, t in edges if s == room)
            print(f"floor {number}  {room:<13} -> {', '.join(targets) or '(nothing)'}")
    print(
        f"\n{len(rooms)} rooms, {max(floor.values(), default=0)} floors, {len(edges)} arrows, "
        f"{len(upward(edges))} back up, {'a circle' if circle else '0 circles'}"
    )
    for source, target in upward(edges):
        print(f"back up: {source} -> {target}")


if __name__ == "__main__":
    main()
