"""A pacing relay that stands in for a UART between two programs, for tests and benchmarks.

Rules it keeps:

* Bytes cross at the line rate and never faster. 8N1 puts 10 bit-times on the
  line per byte, so a direction carries ``baud / 10`` bytes a second. Each
  direction keeps its own ``time.monotonic()`` schedule from the start of its
  busy period: byte ``k`` is handed over when its stop bit would end,
  ``(k + 1) * 10 / baud`` seconds in. Bytes go out in slices about a millisecond
  apart, and because every slice is computed from the schedule, not from the
  previous slice, rounding never accumulates. A byte that finds the line idle
  starts at once.
* The relay never waits for a reader. Bytes whose time has come are written
  into the other pty at once; bytes that pty cannot hold are lost and counted as
  ``overflowed_bytes``, as a UART overrun loses them. A writer meets
  back-pressure as on a real port: the relay reads ahead at most
  ``_READ_AHEAD_BYTES`` a direction, then the sender's pty fills and its write
  blocks.
* Each end outlives its program. The relay keeps its own fd on both pty slaves,
  so a program closing and reopening its end (a gateway or node restart) never
  gives the master EIO or a hangup. Bytes delivered while no program has an end
  open *wait* in that pty's input queue (20 KiB on Linux 6), and the next
  program to open it reads them first; once the queue is full, further bytes
  overflow as above. A real port that is closed loses them instead, so a
  program that wants a clean start flushes its input
  (``termios.tcflush(fd, termios.TCIFLUSH)``, pyserial's ``reset_input_buffer()``;
  ``tty.setraw`` does it too unless given ``termios.TCSANOW``).
* Faults are reproducible. Every random draw comes from a ``random.Random``
  seeded from ``WireConfig.seed``, one stream per direction and per fault, and
  bit errors and drops are placed by position in the byte stream, never by
  time, so the same bytes with the same seed are damaged in the same places
  however the slices fall. Noise bursts come at Poisson times, so only their
  contents and spacing are reproducible, not where they land in the stream.
* No pyserial here: ptys come from ``os.openpty``, raw mode from ``termios``,
  waiting from ``select``. Only Linux ptys are supported.
* ``close()`` stops the relay thread and closes every fd the relay opened; it is
  idempotent.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import select
import termios
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from otaproto.errors import LinkBroken, LinkClosed, UsageError

#: Target spacing of delivery slices once a direction is busy. Small enough that
#: a byte waits at most about a millisecond past its due time, large enough that
#: the relay loop is not the bottleneck even at several megabaud.
_SLICE_S = 0.001
#: Most bytes a direction reads ahead of the line; beyond that the sender waits.
_READ_AHEAD_BYTES = 4096
#: Bytes read at once from a direction while the link is dead and discarding.
_DISCARD_READ_BYTES = 65536
#: Largest gap a geometric draw returns, so a vanishing probability stays finite.
_MAX_GAP = 1 << 62


def line_rate_bytes_per_s(baud: int) -> float:
    """Bytes a second an 8N1 line carries at ``baud``: ten bit-times per byte.

    Raises UsageError when ``baud`` is not a positive integer.
    """
    _check_baud(baud)
    return baud / 10


@dataclass(frozen=True, slots=True)
class WireConfig:
    """How the emulated line behaves; frozen so a running relay cannot drift.

    Every fault defaults to off. Raises UsageError on a setting that can never
    make sense (a baud that is not positive, a probability outside [0, 1]).
    """

    #: Line speed in bits a second; a very high baud gives an unpaced link.
    baud: int = 115200
    #: Probability that any one delivered data bit is flipped.
    bit_error_rate: float = 0.0
    #: Probability that any one byte is lost on the line.
    drop_byte_rate: float = 0.0
    #: Mean bursts of line noise a second, per direction (Poisson arrivals).
    noise_burst_rate_hz: float = 0.0
    #: Random bytes in one noise burst.
    noise_burst_bytes: int = 8
    #: Bytes carried, both directions together, before the link goes dead;
    #: None for a link that never does.
    disconnect_after_bytes: int | None = None
    #: Seed of every random draw, so a faulty run can be repeated exactly.
    seed: int = 0

    def __post_init__(self) -> None:
        _check_baud(self.baud)
        _check_probability("bit_error_rate", self.bit_error_rate)
        _check_probability("drop_byte_rate", self.drop_byte_rate)
        rate = self.noise_burst_rate_hz
        if not _is_number(rate) or not 0.0 <= rate < math.inf:
            raise UsageError(f"noise_burst_rate_hz must be finite and >= 0, not {rate!r}")
        if not _is_int(self.noise_burst_bytes) or self.noise_burst_bytes < 1:
            raise UsageError(
                f"noise_burst_bytes must be a positive integer, not {self.noise_burst_bytes!r}"
            )
        limit = self.disconnect_after_bytes
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise UsageError(
                f"disconnect_after_bytes must be None or a positive integer, not {limit!r}"
            )
        if not _is_int(self.seed):
            raise UsageError(f"seed must be an integer, not {self.seed!r}")


@dataclass(frozen=True, slots=True)
class WireStats:
    """What the relay has done since it was made; a snapshot, not a live view.

    Bytes arriving at the two ends add up to ``delivered_a_to_b_bytes +
    delivered_b_to_a_bytes + injected_bytes``.
    """

    #: Bytes from side A written into side B (corrupted ones included).
    delivered_a_to_b_bytes: int
    #: Bytes from side B written into side A (corrupted ones included).
    delivered_b_to_a_bytes: int
    #: Delivered bytes with at least one flipped bit.
    corrupted_bytes: int
    #: Bytes lost on the line by ``drop_byte_rate``.
    dropped_bytes: int
    #: Noise bytes written into either end.
    injected_bytes: int
    #: Bytes (real or noise) lost because the receiving pty was full.
    overflowed_bytes: int
    #: Bytes thrown away because the link was dead when they were sent.
    discarded_bytes: int
    #: Times the link has gone dead by ``disconnect_after_bytes``.
    disconnects: int


class PacedWire:
    """Two pty pairs joined by a relay that delivers bytes at a UART's pace.

    The gateway opens :attr:`a_path`, the node opens :attr:`b_path`; both are in
    raw mode. ``with PacedWire(config) as wire:`` starts the relay and closes it.
    """

    def __init__(self, config: WireConfig | None = None) -> None:
        """Create both pty pairs (the relay starts with :meth:`start`).

        Raises LinkBroken when the ptys cannot be created or set up.
        """
        self._config = config if config is not None else WireConfig()
        self._rate_bytes_per_s = line_rate_bytes_per_s(self._config.baud)
        self._fds: list[int] = []
        try:
            a_master, a_slave = os.openpty()
            self._fds += [a_master, a_slave]
            b_master, b_slave = os.openpty()
            self._fds += [b_master, b_slave]
            wake_r, wake_w = os.pipe()
            self._fds += [wake_r, wake_w]
            for slave in (a_slave, b_slave):
                _make_raw(slave)
            for fd in (a_master, b_master, wake_r, wake_w):
                os.set_blocking(fd, False)
            self._a_path = os.ttyname(a_slave)
            self._b_path = os.ttyname(b_slave)
        except (OSError, termios.error) as exc:
            self._close_fds()
            raise LinkBroken(f"cannot set up the paced wire's ptys: {exc}") from exc
        self._wake_r = wake_r
        self._wake_w = wake_w
        self._directions = (
            _Direction("a_to_b", a_master, b_master, self._config),
            _Direction("b_to_a", b_master, a_master, self._config),
        )
        self._lock = threading.Lock()
        self._disconnected = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._failure: OSError | None = None
        self._limit_bytes = self._config.disconnect_after_bytes
        self._dead = False
        self._carried_since_connect_bytes = 0
        self._dropped_bytes = 0
        self._corrupted_bytes = 0
        self._injected_bytes = 0
        self._overflowed_bytes = 0
        self._discarded_bytes = 0
        self._disconnects = 0

    @property
    def a_path(self) -> str:
        """Path of side A's pty, for the gateway to open."""
        return self._a_path

    @property
    def b_path(self) -> str:
        """Path of side B's pty, for the node to open."""
        return self._b_path

    @property
    def config(self) -> WireConfig:
        """The configuration this wire was made with."""
        return self._config

    @property
    def disconnected(self) -> threading.Event:
        """Set when ``disconnect_after_bytes`` kills the link; cleared by :meth:`reconnect`."""
        return self._disconnected

    def start(self) -> None:
        """Start relaying in a background thread.

        Raises UsageError when already started, LinkClosed after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise LinkClosed("the paced wire is closed; it cannot be started")
            if self._thread is not None:
                raise UsageError("the paced wire is already started")
            now = time.monotonic()
            for direction in self._directions:
                direction.schedule_first_burst(now)
            self._thread = threading.Thread(
                target=self._run, name=f"PacedWire({self._a_path}<->{self._b_path})", daemon=True
            )
            self._thread.start()

    def reconnect(self, *, rearm: bool = True) -> None:
        """Bring a dead link back; with ``rearm`` it dies again after another N bytes.

        The count of ``disconnect_after_bytes`` starts over either way; without
        ``rearm`` the link never dies again. Bytes a sender wrote just before
        this call may not yet have been read and discarded, and then are
        delivered. Raises LinkClosed after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise LinkClosed("the paced wire is closed; it cannot be reconnected")
            self._dead = False
            self._carried_since_connect_bytes = 0
            self._limit_bytes = self._config.disconnect_after_bytes if rearm else None
            self._disconnected.clear()
            self._wake()

    def stats(self) -> WireStats:
        """A snapshot of what the relay has carried, damaged and lost so far."""
        with self._lock:
            return WireStats(
                delivered_a_to_b_bytes=self._directions[0].delivered_bytes,
                delivered_b_to_a_bytes=self._directions[1].delivered_bytes,
                corrupted_bytes=self._corrupted_bytes,
                dropped_bytes=self._dropped_bytes,
                injected_bytes=self._injected_bytes,
                overflowed_bytes=self._overflowed_bytes,
                discarded_bytes=self._discarded_bytes,
                disconnects=self._disconnects,
            )

    def close(self) -> None:
        """Stop the relay and close every fd it opened; a second call does nothing.

        Programs holding an end open then see a hangup. Raises LinkBroken
        (after cleaning up) when the relay thread had died of an OS error.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            thread = self._thread
            if thread is not None:
                self._wake()
        if thread is not None:
            thread.join()
        self._close_fds()
        if self._failure is not None:
            raise LinkBroken(f"the paced wire's relay failed: {self._failure}") from self._failure

    def __enter__(self) -> PacedWire:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # The relay thread. Everything below runs with self._lock held, except the wait.

    def _run(self) -> None:
        try:
            self._relay()
        except OSError as exc:
            self._failure = exc

    def _relay(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                timeout_s = self._timeout_s(time.monotonic())
                watched = [self._wake_r] + [
                    d.src_fd
                    for d in self._directions
                    if self._dead or len(d.pending) < _READ_AHEAD_BYTES
                ]
            readable, _, _ = select.select(watched, [], [], timeout_s)
            with self._lock:
                if self._stopping:
                    return
                if self._wake_r in readable:
                    _read_available(self._wake_r, 4096)
                now = time.monotonic()
                for direction in self._directions:
                    if direction.src_fd in readable:
                        self._take_in(direction, now)
                for direction in self._directions:
                    self._inject_noise(direction, now)
                    self._deliver(direction, now)

    def _timeout_s(self, now: float) -> float | None:
        """How long the relay may wait before a byte or a noise burst falls due."""
        deadline = math.inf
        for direction in self._directions:
            if direction.pending and not self._dead:
                due = direction.t0 + (direction.sent_bytes + 1) / self._rate_bytes_per_s
                if direction.sent_bytes > 0:
                    due = max(due, direction.last_slice_at + _SLICE_S)
                deadline = min(deadline, due)
            if direction.next_burst_at is not None:
                deadline = min(deadline, direction.next_burst_at)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

    def _take_in(self, direction: _Direction, now: float) -> None:
        if self._dead:
            self._discarded_bytes += len(_read_available(direction.src_fd, _DISCARD_READ_BYTES))
            return
        room = _READ_AHEAD_BYTES - len(direction.pending)
        if room <= 0:
            return
        data = _read_available(direction.src_fd, room)
        if not data:
            return
        line_free_at = direction.t0 + direction.sent_bytes / self._rate_bytes_per_s
        if not direction.pending and now >= line_free_at:
            direction.t0 = now
            direction.sent_bytes = 0
        direction.pending += data

    def _deliver(self, direction: _Direction, now: float) -> None:
        if self._dead or not direction.pending:
            return
        finished = int((now - direction.t0) * self._rate_bytes_per_s)
        count = min(finished - direction.sent_bytes, len(direction.pending))
        if self._limit_bytes is not None:
            count = min(count, self._limit_bytes - self._carried_since_connect_bytes)
        if count <= 0:
            return
        chunk = bytes(direction.pending[:count])
        del direction.pending[:count]
        direction.sent_bytes += count
        direction.last_slice_at = now
        self._carried_since_connect_bytes += count
        chunk, dropped = direction.drop(chunk)
        self._dropped_bytes += dropped
        chunk, corrupted = direction.corrupt(chunk)
        self._corrupted_bytes += corrupted
        direction.delivered_bytes += self._write(direction.dst_fd, chunk)
        if self._limit_bytes is not None and (
            self._carried_since_connect_bytes >= self._limit_bytes
        ):
            self._go_dead()

    def _inject_noise(self, direction: _Direction, now: float) -> None:
        rate_hz = self._config.noise_burst_rate_hz
        while direction.next_burst_at is not None and direction.next_burst_at <= now:
            if not self._dead:
                burst = direction.noise_rng.randbytes(self._config.noise_burst_bytes)
                self._injected_bytes += self._write(direction.dst_fd, burst)
            direction.next_burst_at += direction.noise_rng.expovariate(rate_hz)

    def _write(self, fd: int, data: bytes) -> int:
        """Write what the receiving pty takes now; the rest overflows, as in a UART."""
        if not data:
            return 0
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        self._overflowed_bytes += len(data) - written
        return written

    def _go_dead(self) -> None:
        self._dead = True
        self._disconnects += 1
        for direction in self._directions:
            self._discarded_bytes += len(direction.pending)
            direction.pending.clear()
        self._disconnected.set()

    def _wake(self) -> None:
        # A full pipe means the relay has a wake-up pending already.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


class _Direction:
    """One direction of the line: its read-ahead, its schedule and its fault streams."""

    def __init__(self, name: str, src_fd: int, dst_fd: int, config: WireConfig) -> None:
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.pending = bytearray()
        #: Start of the current busy period, and bytes taken off the line since.
        self.t0 = 0.0
        self.sent_bytes = 0
        self.last_slice_at = 0.0
        self.delivered_bytes = 0
        self._bit_error_rate = config.bit_error_rate
        self._drop_byte_rate = config.drop_byte_rate
        self._noise_rate_hz = config.noise_burst_rate_hz
        # String seeds are hashed with SHA-512, so they do not depend on PYTHONHASHSEED.
        self._bit_rng = random.Random(f"shoal.wire/{config.seed}/{name}/bits")
        self._drop_rng = random.Random(f"shoal.wire/{config.seed}/{name}/drops")
        self.noise_rng = random.Random(f"shoal.wire/{config.seed}/{name}/noise")
        self._clean_bits_left = (
            _gap(self._bit_rng, self._bit_error_rate) if self._bit_error_rate > 0 else 0
        )
        self._kept_bytes_left = (
            _gap(self._drop_rng, self._drop_byte_rate) if self._drop_byte_rate > 0 else 0
        )
        self.next_burst_at: float | None = None

    def schedule_first_burst(self, now: float) -> None:
        if self._noise_rate_hz > 0:
            self.next_burst_at = now + self.noise_rng.expovariate(self._noise_rate_hz)

    def drop(self, chunk: bytes) -> tuple[bytes, int]:
        """``chunk`` without the bytes the line loses, and how many it lost."""
        if self._drop_byte_rate <= 0:
            return chunk, 0
        if self._kept_bytes_left >= len(chunk):
            self._kept_bytes_left -= len(chunk)
            return chunk, 0
        kept = bytearray()
        start = 0
        at = self._kept_bytes_left
        while at < len(chunk):
            kept += chunk[start:at]
            start = at + 1
            at = start + _gap(self._drop_rng, self._drop_byte_rate)
        kept += chunk[start:]
        self._kept_bytes_left = at - len(chunk)
        return bytes(kept), len(chunk) - len(kept)

    def corrupt(self, chunk: bytes) -> tuple[bytes, int]:
        """``chunk`` with its bit errors (LSB first, as a UART sends), and bytes hit."""
        bits = len(chunk) * 8
        if self._bit_error_rate <= 0:
            return chunk, 0
        if self._clean_bits_left >= bits:
            self._clean_bits_left -= bits
            return chunk, 0
        out = bytearray(chunk)
        hit = 0
        last_index = -1
        at = self._clean_bits_left
        while at < bits:
            index = at >> 3
            out[index] ^= 1 << (at & 7)
            if index != last_index:
                hit += 1
                last_index = index
            at += 1 + _gap(self._bit_rng, self._bit_error_rate)
        self._clean_bits_left = at - bits
        return bytes(out), hit


def _gap(rng: random.Random, probability: float) -> int:
    """Trials that pass before the next that fails, each failing with ``probability``.

    Drawing the gap (a geometric variate) instead of one number per bit keeps
    a faulty link fast and places faults by stream position alone.
    """
    if probability >= 1.0:
        return 0
    gap = math.log(1.0 - rng.random()) / math.log1p(-probability)
    return int(gap) if gap < _MAX_GAP else _MAX_GAP


def _make_raw(fd: int) -> None:
    """Put a tty in raw mode, as cfmakeraw(3) does, and without XON/XOFF either way.

    Binary frames must pass unchanged: no echo, no CR/LF translation, no
    signals, no flow-control characters swallowed or sent.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(
        termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
        | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
        | termios.IXOFF | termios.IXANY
    )  # fmt: skip
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


def _read_available(fd: int, most_bytes: int) -> bytes:
    """Up to ``most_bytes`` that ``fd`` (non-blocking) has now; b"" when it has none."""
    try:
        return os.read(fd, most_bytes)
    except BlockingIOError:
        return b""


def _check_baud(baud: int) -> None:
    if not _is_int(baud) or baud <= 0:
        raise UsageError(f"baud must be a positive integer, not {baud!r}")


def _check_probability(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be a probability in [0, 1], not {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
