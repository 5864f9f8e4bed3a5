"""docs/serial-protocol.md must stay true: its tables and hex examples against the code.

The page marks each hex example with the Python expression that produces it::

    <!-- example: nl.hello(1) -->
    ```hex
    82 01 01
    ```

and the expression is evaluated with ``nl`` = :mod:`otaproto.nodelink` and
``framing`` = :mod:`otaproto.framing`. Tables are found by their header row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otaproto import framing
from otaproto import nodelink as nl
from otaproto.node_receiver import TRANSITIONS as NODE_TRANSITIONS
from otaproto.node_receiver import Event, TransferState
from otaproto.node_sender import TRANSITIONS as SENDER_TRANSITIONS
from otaproto.node_sender import UpdateState

DOC = Path(__file__).resolve().parent.parent / "docs" / "serial-protocol.md"
TEXT = DOC.read_text(encoding="utf-8")

_EXAMPLE = re.compile(r"<!-- example: (.+?) -->\n```hex\n(.*?)```", re.DOTALL)
EXAMPLES = _EXAMPLE.findall(TEXT)
_SEPARATOR = re.compile(r"^\|[\s:|-]+\|$")

Row = list[str]


def _cells(line: str) -> Row:
    return [cell.replace("`", "").strip() for cell in line.strip().strip("|").split("|")]


def _tables() -> list[tuple[Row, list[Row]]]:
    """Every markdown table of the page: (header cells, body rows)."""
    lines = TEXT.splitlines()
    found: list[tuple[Row, list[Row]]] = []
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and _SEPARATOR.match(lines[i + 1].strip()):
            rows: list[Row] = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            found.append((_cells(lines[i]), rows))
    return found


def _table(*header: str) -> list[Row]:
    """The body rows of the one table whose header starts with ``header``."""
    matches = [rows for head, rows in _tables() if tuple(head[: len(header)]) == header]
    assert len(matches) == 1, f"expected one table with header {header}, found {len(matches)}"
    return matches[0]


def test_the_page_names_the_protocol_version() -> None:
    assert TEXT.startswith(f"# Serial update protocol (version {nl.PROTOCOL_VERSION})\n")


def test_message_table_lists_every_type_with_its_value() -> None:
    rows = _table("type", "name", "direction")
    documented = {row[1]: int(row[0], 16) for row in rows}
    assert len(rows) == len(documented), "a message type is listed twice"
    assert documented == {member.name: member.value for member in nl.MsgType}


def test_error_table_lists_every_code() -> None:
    rows = _table("code", "name")
    documented = {row[1]: int(row[0]) for row in rows}
    assert len(rows) == len(documented), "an error code is listed twice"
    assert documented == {member.name: member.value for member in nl.ErrorCode}


def test_info_table_lists_the_keys_the_node_sends() -> None:
    info = nl.Info(
        protocol_version=nl.PROTOCOL_VERSION,
        device_type="nrf52840",
        limits=nl.NodeLimits(2200, 1024, 4, 256 * 1024),
        boot_state="confirmed",
        primary=None,
        secondary=None,
        receive_digest=None,
        receive_offset=0,
        confirmed_sequence=0,
        last_reverted=False,
    )
    sent = nl.decode(nl.info(1, info)).fields[0]
    assert isinstance(sent, dict)
    assert [int(row[0]) for row in _table("key", "name", "CBOR type")] == sorted(sent)


def test_node_state_table_is_the_receiver_transitions() -> None:
    rows = _table("state", "event", "next")
    documented = {(TransferState(r[0]), Event(r[1])): TransferState(r[2]) for r in rows}
    assert len(rows) == len(documented), "a (state, event) pair is listed twice"
    assert documented == NODE_TRANSITIONS


def test_gateway_state_table_is_the_sender_transitions() -> None:
    documented: dict[UpdateState, frozenset[UpdateState]] = {}
    for state, targets in (row[:2] for row in _table("state", "may move to")):
        names = [] if targets == "—" else [name.strip() for name in targets.split(",")]
        documented[UpdateState(state)] = frozenset(UpdateState(name) for name in names)
    assert documented == dict(SENDER_TRANSITIONS)


def test_every_hex_block_is_a_marked_example() -> None:
    assert TEXT.count("```hex") == len(EXAMPLES)
    expressions = [expression for expression, _ in EXAMPLES]
    for required in (
        "nl.hello(",
        "nl.encode(nl.MsgType.BEGIN_OK,",
        "nl.data(",
        "nl.ack(",
        "framing.encode_frame(",
    ):
        assert any(e.startswith(required) for e in expressions), f"no example of {required}"


@pytest.mark.parametrize(("expression", "hex_text"), EXAMPLES, ids=[e for e, _ in EXAMPLES])
def test_hex_example_is_what_the_code_produces(expression: str, hex_text: str) -> None:
    namespace = {"nl": nl, "framing": framing, "__builtins__": {"bytes": bytes, "range": range}}
    produced = eval(expression, namespace)
    assert isinstance(produced, bytes)
    assert bytes.fromhex(hex_text) == produced, f"{expression} = {produced.hex(' ')}"


def test_ram_table_adds_up_and_uses_the_framing_bounds() -> None:
    rows = _table("state", "bytes", "why that size")
    *items, total = rows
    assert total[0].strip("*") == "total"

    def number(cell: str) -> int:
        return int(cell.strip("*≈ ").replace(",", ""))

    assert sum(number(row[1]) for row in items) == number(total[1])
    sizes = {row[0]: number(row[1]) for row in items}
    longest_data = len(nl.data(nl.MAX_ID, nl.MAX_OFFSET, bytes(1024)))
    assert sizes["UART receive ring (DMA target)"] == 4 * framing.max_encoded_bytes(longest_data)
    assert sizes["frame buffer"] == framing.max_encoded_bytes(2200) - 1
