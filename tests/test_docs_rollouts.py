"""docs/rollouts.md holds exactly what the code generates: diagrams and tables of its tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import deployments, operators, rollouts
from orchestrator.diagrams import drawn_pairs

DOC = Path(__file__).resolve().parent.parent / "docs" / "rollouts.md"
BLOCK = re.compile(
    r"<!-- generated: (?P<name>[\w.]+) \(do not edit; tests/test_docs_rollouts.py checks it\) -->\n"
    r"(?P<body>.*?)<!-- end generated -->\n",
    re.DOTALL,
)


def _mermaid(make: Callable[[], str]) -> Callable[[], str]:
    return lambda: "```mermaid\n" + make() + "```\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "rollouts.mermaid": _mermaid(rollouts.mermaid),
    "deployments.mermaid": _mermaid(deployments.mermaid),
    "operators.roles_markdown": operators.roles_markdown,
    "rollouts.timeouts_markdown": rollouts.timeouts_markdown,
    "deployments.retry_markdown": deployments.retry_markdown,
}


def _blocks() -> dict[str, str]:
    found: dict[str, str] = {}
    for match in BLOCK.finditer(DOC.read_text()):
        assert match["name"] not in found, f"{match['name']} appears twice"
        found[match["name"]] = match["body"]
    return found


def test_every_generated_block_is_in_the_doc_once() -> None:
    assert sorted(_blocks()) == sorted(GENERATORS)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_the_doc_block_equals_what_the_code_generates(name: str) -> None:
    assert _blocks()[name] == GENERATORS[name](), (
        f"docs/rollouts.md is out of date: paste the output of {name}() between its markers"
    )


def test_the_deployment_diagram_claims_every_move_of_the_table_and_no_other() -> None:
    table = {(str(a), str(b)) for a, targets in deployments.TRANSITIONS.items() for b in targets}
    assert drawn_pairs(deployments.diagram()) == table


def test_every_rollout_state_and_event_is_in_the_diagram() -> None:
    text = rollouts.mermaid()
    for state in rollouts.RolloutState:
        assert re.search(rf"\b{state}\b", text), state
    for event in rollouts.RolloutEvent:
        assert re.search(rf": .*\b{event}\b", text), event
