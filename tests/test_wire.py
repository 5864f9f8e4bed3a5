"""The pacing relay: bytes cross unchanged and no faster than the line, faults are counted
and reproducible, ends survive restarts, and close() leaves nothing behind.

Nothing here sleeps to wait: data is awaited with select and a deadline, events with
a timeout. Where pacing is not under test the baud is high, to keep the file fast.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator

import pytest

from otaio.wire import PacedWire, WireConfig, WireStats, line_rate_bytes_per_s
from otaproto.errors import LinkClosed, UsageError

FAST_BAUD = 2_000_000
CHUNK_BYTES = 4096

MakeWire = Callable[[WireConfig], PacedWire]
OpenEnd = Callable[[str], int]


@pytest.fixture
def make_wire() -> Iterator[MakeWire]:
    """Started wires, all closed after the test."""
    wires: list[PacedWire] = []

    def make(config: WireConfig) -> PacedWire:
        wire = PacedWire(config)
        wires.append(wire)
        wire.start()
        return wire

    yield make
    for wire in wires:
        wire.close()


@pytest.fixture
def open_end() -> Iterator[OpenEnd]:
    """Opens a pty end as a program would (raw, non-blocking); all closed after the test."""
    fds: list[int] = []

    def open_(path: str) -> int:
        fd = _open_raw(path)
        fds.append(fd)
        return fd

    yield open_
    for fd in fds:
        os.close(fd)


def _open_raw(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)  # the default, TCSAFLUSH, would discard bytes waiting
    os.set_blocking(fd, False)
    return fd


def exchange(
    sends: dict[int, bytes],
    expect_bytes: dict[int, int | None],
    timeout_s: float = 5.0,
    quiet_s: float = 0.3,
) -> dict[int, bytes]:
    """Write each of ``sends`` while reading until each fd of ``expect_bytes`` has its count.

    A count of None reads until everything is sent and nothing has come for
    ``quiet_s``. One select loop does all, so a full pty never stalls the test.
    """
    offsets = dict.fromkeys(sends, 0)
    received = {fd: bytearray() for fd in expect_bytes}
    deadline = time.monotonic() + timeout_s
    while True:
        to_write = [fd for fd, data in sends.items() if offsets[fd] < len(data)]
        to_read = [
            fd for fd, want in expect_bytes.items() if want is None or len(received[fd]) < want
        ]
        only_draining = not to_write and all(expect_bytes[fd] is None for fd in to_read)
        if only_draining and (not to_read or not select.select(to_read, [], [], quiet_s)[0]):
            return {fd: bytes(data) for fd, data in received.items()}
        left_s = deadline - time.monotonic()
        got = {fd: len(data) for fd, data in received.items()}
        assert left_s > 0, f"timed out: received {got} of {expect_bytes}"
        readable, writable, _ = select.select(to_read, to_write, [], min(left_s, quiet_s))
        for fd in writable:
            at = offsets[fd]
            with contextlib.suppress(BlockingIOError):
                offsets[fd] += os.write(fd, sends[fd][at : at + CHUNK_BYTES])
        for fd in readable:
            received[fd] += os.read(fd, 65536)


def assert_nothing_arrives(fd: int, within_s: float = 0.3) -> None:
    readable, _, _ = select.select([fd], [], [], within_s)
    assert not readable, f"unexpected bytes: {os.read(fd, 64)!r}"


def send_through(config: WireConfig, payload: bytes) -> tuple[bytes, WireStats]:
    """What side B receives when side A sends ``payload`` over a fresh wire that drops nothing."""
    with PacedWire(config) as wire:
        a, b = _open_raw(wire.a_path), _open_raw(wire.b_path)
        try:
            received = exchange({a: payload}, {b: len(payload)})[b]
            stats = wire.stats()
        finally:
            os.close(a)
            os.close(b)
    return received, stats


def test_bytes_cross_both_ways_unchanged(make_wire: MakeWire, open_end: OpenEnd) -> None:
    wire = make_wire(WireConfig(baud=FAST_BAUD))
    a, b = open_end(wire.a_path), open_end(wire.b_path)
    rng = random.Random(1)
    a_to_b, b_to_a = rng.randbytes(20 * 1024), rng.randbytes(20 * 1024)

    got = exchange({a: a_to_b, b: b_to_a}, {b: len(a_to_b), a: len(b_to_a)})

    assert got[b] == a_to_b
    assert got[a] == b_to_a
    assert wire.stats() == WireStats(
        delivered_a_to_b_bytes=len(a_to_b),
        delivered_b_to_a_bytes=len(b_to_a),
        corrupted_bytes=0,
        dropped_bytes=0,
        injected_bytes=0,
        overflowed_bytes=0,
        discarded_bytes=0,
        disconnects=0,
    )


def test_bytes_take_at_least_the_line_time(make_wire: MakeWire, open_end: OpenEnd) -> None:
    baud = 115200
    size = 23_040  # two seconds at 11,520 B/s
    assert line_rate_bytes_per_s(baud) == 11_520
    wire = make_wire(WireConfig(baud=baud))
    a, b = open_end(wire.a_path), open_end(wire.b_path)
    payload = random.Random(2).randbytes(size)

    started = time.monotonic()
    got = exchange({a: payload}, {b: size})
    elapsed_s = time.monotonic() - started

    assert got[b] == payload
    assert elapsed_s >= 1.95


def test_an_end_closed_and_reopened_still_works(make_wire: MakeWire) -> None:
    wire = make_wire(WireConfig(baud=FAST_BAUD))
    ends = {"a": _open_raw(wire.a_path), "b": _open_raw(wire.b_path)}
    try:
        a, b = ends["a"], ends["b"]
        assert exchange({a: b"before"}, {b: 6})[b] == b"before"

        os.close(ends.pop("b"))  # the node restarts
        exchange({a: b"while away"}, {})
        b = ends["b"] = _open_raw(wire.b_path)
        # Bytes sent while nobody listened waited in the pty, as documented.
        assert exchange({}, {b: 10})[b] == b"while away"
        assert exchange({a: b"ping", b: b"pong"}, {b: 4, a: 4}) == {b: b"ping", a: b"pong"}

        os.close(ends.pop("a"))  # now the gateway restarts
        a = ends["a"] = _open_raw(wire.a_path)
        got = exchange({a: b"again", b: b"still here"}, {b: 5, a: 10})
        assert got == {b: b"again", a: b"still here"}
    finally:
        for fd in ends.values():
            os.close(fd)


def test_bit_errors_are_counted_and_reproducible() -> None:
    payload = random.Random(3).randbytes(50 * 1024)
    config = WireConfig(baud=FAST_BAUD, bit_error_rate=1e-3, seed=7)

    received, stats = send_through(config, payload)

    assert len(received) == len(payload)
    damaged = sum(1 for sent, got in zip(payload, received, strict=True) if sent != got)
    # About 1 - (1 - 1e-3) ** 8 = 0.8 % of 51,200 bytes: 408 expected.
    assert 250 < damaged < 600
    assert stats.corrupted_bytes == damaged
    assert stats.delivered_a_to_b_bytes == len(payload)
    assert stats.dropped_bytes == stats.injected_bytes == stats.overflowed_bytes == 0

    again, _ = send_through(config, payload)
    assert again == received
    other_seed, _ = send_through(WireConfig(baud=FAST_BAUD, bit_error_rate=1e-3, seed=8), payload)
    assert other_seed != received


def test_dropped_bytes_are_counted(make_wire: MakeWire, open_end: OpenEnd) -> None:
    wire = make_wire(WireConfig(baud=FAST_BAUD, drop_byte_rate=0.01, seed=4))
    a, b = open_end(wire.a_path), open_end(wire.b_path)
    payload = bytes(range(256)) * 80

    received = exchange({a: payload}, {b: None})[b]

    stats = wire.stats()
    assert 100 < stats.dropped_bytes < 330  # 1 % of 20,480 is 205
    assert len(received) == len(payload) - stats.dropped_bytes == stats.delivered_a_to_b_bytes
    assert stats.corrupted_bytes == 0


def test_noise_bursts_arrive_on_an_idle_line(make_wire: MakeWire, open_end: OpenEnd) -> None:
    wire = make_wire(WireConfig(baud=FAST_BAUD, noise_burst_rate_hz=100, noise_burst_bytes=8))
    a, b = open_end(wire.a_path), open_end(wire.b_path)

    first = exchange({}, {a: 8, b: 8})  # about 100 bursts a second each way

    stats = wire.stats()
    assert stats.injected_bytes >= 16
    assert stats.injected_bytes % 8 == 0
    assert len(first[a]) >= 8
    assert len(first[b]) >= 8
    assert stats.delivered_a_to_b_bytes == stats.delivered_b_to_a_bytes == 0


def test_disconnect_stops_delivery_until_reconnect(make_wire: MakeWire, open_end: OpenEnd) -> None:
    wire = make_wire(WireConfig(baud=FAST_BAUD, disconnect_after_bytes=1000))
    a, b = open_end(wire.a_path), open_end(wire.b_path)
    payload = random.Random(5).randbytes(1000)

    assert exchange({a: payload}, {b: 1000})[b] == payload
    assert wire.disconnected.wait(timeout=2.0)

    exchange({a: b"lost", b: b"also lost"}, {})
    assert_nothing_arrives(b)
    assert_nothing_arrives(a)
    stats = wire.stats()
    assert stats.disconnects == 1
    assert stats.discarded_bytes == len(b"lost") + len(b"also lost")
    assert stats.delivered_a_to_b_bytes == 1000

    wire.reconnect()
    assert not wire.disconnected.is_set()
    got = exchange({a: b"hello", b: b"world"}, {b: 5, a: 5})
    assert got == {b: b"hello", a: b"world"}

    # Re-armed: the link dies again after another 1000 bytes, counted both ways.
    assert exchange({a: bytes(600)}, {b: 600})[b] == bytes(600)
    assert exchange({b: b"\x01" * 600}, {a: 1000 - 10 - 600})[a] == b"\x01" * 390
    assert wire.disconnected.wait(timeout=2.0)
    assert_nothing_arrives(a)
    assert wire.stats().disconnects == 2


def test_close_leaves_no_fd_and_no_thread() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()

    wire = PacedWire(WireConfig(baud=FAST_BAUD))
    with wire:
        assert threading.active_count() == threads_before + 1
        a, b = _open_raw(wire.a_path), _open_raw(wire.b_path)
        assert exchange({a: b"x" * 100}, {b: 100})[b] == b"x" * 100
        os.close(a)
        os.close(b)
    wire.close()  # idempotent

    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
    assert not any(t.name.startswith("PacedWire") for t in threading.enumerate())


def test_a_wire_never_started_closes_cleanly() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    PacedWire(WireConfig()).close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_misuse_of_the_lifecycle() -> None:
    wire = PacedWire(WireConfig(baud=FAST_BAUD))
    with wire, pytest.raises(UsageError, match="already started"):
        wire.start()
    with pytest.raises(LinkClosed, match="closed"):
        wire.start()
    with pytest.raises(LinkClosed, match="closed"):
        wire.reconnect()


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"baud": 0}, "baud"),
        ({"baud": -9600}, "baud"),
        ({"baud": 115200.0}, "baud"),
        ({"baud": True}, "baud"),
        ({"bit_error_rate": -0.1}, "bit_error_rate"),
        ({"bit_error_rate": 1.5}, "bit_error_rate"),
        ({"bit_error_rate": float("nan")}, "bit_error_rate"),
        ({"drop_byte_rate": 2}, "drop_byte_rate"),
        ({"noise_burst_rate_hz": -1.0}, "noise_burst_rate_hz"),
        ({"noise_burst_rate_hz": float("inf")}, "noise_burst_rate_hz"),
        ({"noise_burst_bytes": 0}, "noise_burst_bytes"),
        ({"disconnect_after_bytes": 0}, "disconnect_after_bytes"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_nonsense_configuration_is_refused(settings: dict[str, object], field: str) -> None:
    with pytest.raises(UsageError, match=field):
        WireConfig(**settings)  # type: ignore[arg-type]


def test_line_rate_is_a_tenth_of_the_baud() -> None:
    assert line_rate_bytes_per_s(921600) == 92_160
    with pytest.raises(UsageError, match="baud"):
        line_rate_bytes_per_s(0)
