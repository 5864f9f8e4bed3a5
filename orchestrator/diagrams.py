"""Mermaid ``stateDiagram-v2`` text generated from the state tables, for ``docs/rollouts.md``.

Rules:

* A diagram is made from a table, never drawn by hand: ``docs/rollouts.md``
  holds the output of :func:`orchestrator.deployments.mermaid` and
  :func:`orchestrator.rollouts.mermaid`, and a test checks that it still does.
* Dense tables are drawn with boxes (composite states). An arrow from or to a
  box stands for every state inside it, so an arrow is drawn only where the
  table allows *every* such pair: the picture never claims a move the table
  refuses. A box whose states may all move among themselves (repeats
  included) gets a note instead of a tangle of arrows. :func:`drawn_pairs`
  expands a drawing back into pairs, so a test can check it equals the table.
* Arrows never join a box and a box or state inside it (Mermaid cannot lay
  those out).
* Output is deterministic: the same table gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: The text of the note on a box whose states move freely among themselves.
FREE_MOVES_NOTE = "any of these may follow any other, or repeat"


@dataclass(frozen=True)
class Box:
    """A composite state in a diagram: its own states and the boxes nested in it."""

    name: str
    states: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()

    def all_states(self) -> frozenset[str]:
        """Every state inside this box, nested boxes included."""
        found = set(self.states)
        for box in self.boxes:
            found |= box.all_states()
        return frozenset(found)

    def walk(self) -> list[Box]:
        """This box and every box inside it, outermost first."""
        out = [self]
        for box in self.boxes:
            out.extend(box.walk())
        return out


@dataclass(frozen=True)
class Drawn:
    """One arrow (or free-moves note) of a diagram, and the table pairs it stands for."""

    source: str
    target: str
    label: str | None
    pairs: frozenset[tuple[str, str]]
    note: bool = False


def cover(
    edges: Iterable[tuple[str, str]],
    order: Sequence[str],
    boxes: Sequence[Box],
    label: Callable[[str, str], str | None],
) -> list[Drawn]:
    """Arrows that together stand for exactly ``edges``, boxes first (greedy, deterministic).

    ``order`` lists every state in drawing order; ``label(source, target)``
    names an arrow (or None). Raises ValueError when some edge names a state
    not in ``order`` (a table and its drawing out of step).
    """
    wanted = set(edges)
    unknown = {s for pair in wanted for s in pair} - set(order)
    if unknown:
        raise ValueError(f"states {sorted(unknown)} are not in the drawing order")
    every_box = [b for box in boxes for b in box.walk()]
    members = {b.name: b.all_states() for b in every_box}
    candidates: list[tuple[str, frozenset[str]]] = [(b.name, members[b.name]) for b in every_box]
    candidates += [(s, frozenset({s})) for s in order]
    covered: set[tuple[str, str]] = set()
    drawn: list[Drawn] = []
    for source, sources in candidates:
        for target, targets in candidates:
            if source != target and (sources < targets or targets < sources):
                continue  # a box and what is inside it
            pairs = frozenset((a, b) for a in sources for b in targets)
            if not pairs <= wanted or pairs <= covered:
                continue
            is_note = source == target and len(sources) > 1
            name = None if is_note else label(source, target)
            drawn.append(Drawn(source, target, name, pairs, note=is_note))
            covered |= pairs
    return drawn


def drawn_pairs(drawn: Iterable[Drawn]) -> set[tuple[str, str]]:
    """Every (from, to) pair a drawing claims."""
    out: set[tuple[str, str]] = set()
    for d in drawn:
        out |= d.pairs
    return out


def render(drawn: Sequence[Drawn], boxes: Sequence[Box], initial: Sequence[str]) -> str:
    """The Mermaid text: boxes, then ``[*]`` arrows to ``initial``, then the arrows in order."""
    lines = ["stateDiagram-v2"]

    def box_lines(box: Box, depth: int) -> None:
        pad = "    " * depth
        lines.append(f"{pad}state {box.name} {{")
        lines.extend(f"{pad}    {state}" for state in box.states)
        for inner in box.boxes:
            box_lines(inner, depth + 1)
        lines.append(f"{pad}}}")

    for box in boxes:
        box_lines(box, 1)
    lines.extend(f"    [*] --> {state}" for state in initial)
    for d in drawn:
        if d.note:
            lines.append(f"    note right of {d.source} : {FREE_MOVES_NOTE}")
        elif d.label:
            lines.append(f"    {d.source} --> {d.target} : {d.label}")
        else:
            lines.append(f"    {d.source} --> {d.target}")
    return "\n".join(lines) + "\n"
