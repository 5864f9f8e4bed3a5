"""The NOR flash of a simulated MCU, kept in a file so that a node outlives its process.

Rules:

* The file is the flash. Every completed operation reaches it through
  ``os.pwrite`` on a kept-open descriptor before the call returns, so a node
  process that dies (the simulation's power cut) leaves a file holding exactly
  the operations completed, plus the torn half of the one it interrupted when
  torn writes are on. There is no fsync: the OS page cache outlives the
  process, and a host crash is not part of the model.
* NOR rules are enforced, not emulated: a write is word-aligned and lands only
  on erased (0xFF) bytes. Anything else is :class:`UsageError`, because Shoal's
  own code must always erase first.
* Who is at fault picks the error: a bad offset, length or page from the
  caller is :class:`UsageError`; a file from outside with the wrong size or a
  foreign wear record is :class:`InvalidInput`. :class:`PowerCut` is not an
  error: it is how the simulation stops a node, so it stays out of the
  :class:`ShoalError` family.
* Wear lives in a sidecar, ``<path>.wear``, with a fixed layout. Each completed
  operation updates one 8-byte counter in it with one ``os.pwrite``, after
  the data; a kill between the two loses that operation's count, never its
  data. The total erase count is the sum of the per-page counts, so no second
  counter can disagree with them. An interrupted operation is not counted.
* Modeled time goes to an injected ``stall`` callable, once per operation, so
  tests and fast simulations never sleep.
* One simulated CPU drives one Flash: nothing here is thread-safe, and nothing
  stops two Flash objects from opening the same file.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

from otaio.files import write_atomic
from otaproto.errors import InvalidInput, UsageError

ERASED_BYTE = 0xFF

#: Sidecar layout: magic, page_bytes (u32), page_count (u32), total_write_ops
#: (u64), then one u64 erase count per page, all little-endian.
_WEAR_MAGIC = b"SHOALWR1"
_WEAR_HEADER = struct.Struct("<8sIIQ")
_WEAR_WRITE_OPS_AT = 16
_COUNTER = struct.Struct("<Q")


class PowerCut(Exception):
    """The simulated power went off; the node must stop as if its process died.

    Not a :class:`ShoalError`: nothing failed, the simulation is ending this
    node's lifetime. Once raised, every further call on the same Flash raises
    it again; a new Flash opened on the file is the next lifetime.
    """


def _check_duration(name: str, value_s: float) -> None:
    if not (math.isfinite(value_s) and value_s >= 0.0):
        raise UsageError(f"{name} must be a finite number of seconds >= 0, not {value_s!r}")


@dataclass(frozen=True, slots=True)
class FlashTiming:
    """How long flash operations take; defaults are the nRF52840 datasheet figures.

    A 4 KiB page erase takes about 85 ms and a 32-bit word write about 41 us,
    and the CPU is stalled meanwhile. With ``enabled`` false the flash still
    models the time (see :attr:`Flash.busy_s`) but never stalls.
    Raises UsageError for a negative or non-finite duration.
    """

    page_erase_s: float = 0.085
    word_write_s: float = 41e-6
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_duration("page_erase_s", self.page_erase_s)
        _check_duration("word_write_s", self.word_write_s)

    @classmethod
    def off(cls) -> FlashTiming:
        """A timing that never stalls, for tests and fast simulations."""
        return cls(enabled=False)


@dataclass(frozen=True, slots=True)
class FlashFaults:
    """What goes wrong with the flash; the default is nothing.

    ``cut_after_ops=K`` lets K operations (erases or writes) complete in one
    Flash lifetime and cuts the power on the next. ``random_cut_probability``
    cuts each operation with that probability, drawn from a generator seeded
    with ``seed`` so a run is reproducible. ``torn_writes`` makes the
    interrupted operation half done, as a real power cut can: a write
    programs its first half of words, an erase clears the first half of the
    page. ``erase_slowdown`` multiplies the page erase time (a worn or cold
    part). Raises UsageError for a value that cannot work.
    """

    cut_after_ops: int | None = None
    random_cut_probability: float = 0.0
    erase_slowdown: float = 1.0
    torn_writes: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cut_after_ops is not None and self.cut_after_ops < 0:
            raise UsageError(f"cut_after_ops must be >= 0 or None, not {self.cut_after_ops}")
        if not 0.0 <= self.random_cut_probability <= 1.0:
            raise UsageError(
                f"random_cut_probability must be in [0, 1], not {self.random_cut_probability!r}"
            )
        if not (math.isfinite(self.erase_slowdown) and self.erase_slowdown >= 0.0):
            raise UsageError(f"erase_slowdown must be finite and >= 0, not {self.erase_slowdown!r}")


DEFAULT_TIMING = FlashTiming()
NO_FAULTS = FlashFaults()


class Flash:
    """NOR flash of ``size_bytes`` in pages of ``page_bytes``, stored in the file ``path``.

    A missing file is created erased (all 0xFF), with zeroed wear counters.
    An existing file must be exactly ``size_bytes`` long. Raises UsageError
    for a geometry that cannot work (sizes not positive, a page that is not
    whole words, a size that is not whole pages), and InvalidInput when the
    file or its wear record has another size or geometry, or cannot be
    opened or created.
    """

    def __init__(
        self,
        path: Path,
        size_bytes: int,
        page_bytes: int = 4096,
        word_bytes: int = 4,
        timing: FlashTiming = DEFAULT_TIMING,
        faults: FlashFaults = NO_FAULTS,
        stall: Callable[[float], None] = time.sleep,
    ) -> None:
        if word_bytes <= 0 or page_bytes <= 0 or size_bytes <= 0:
            raise UsageError(
                f"flash sizes must be positive: size_bytes={size_bytes}, "
                f"page_bytes={page_bytes}, word_bytes={word_bytes}"
            )
        if page_bytes % word_bytes:
            raise UsageError(f"page_bytes={page_bytes} is not whole {word_bytes}-byte words")
        if size_bytes % page_bytes:
            raise UsageError(f"size_bytes={size_bytes} is not whole {page_bytes}-byte pages")
        self._path = path
        self._wear_path = path.with_suffix(path.suffix + ".wear")
        self._size_bytes = size_bytes
        self._page_bytes = page_bytes
        self._word_bytes = word_bytes
        self._page_count = size_bytes // page_bytes
        self._timing = timing
        self._faults = faults
        self._stall = stall
        # Seeded once per lifetime so a reopened node replays the same cuts.
        self._rng = random.Random(faults.seed)
        self._erased_page = bytes([ERASED_BYTE]) * page_bytes
        self._ops_done = 0
        self._busy_s = 0.0
        self._power_off_reason: str | None = None
        self._fd = -1
        self._wear_fd = -1
        try:
            self._open_files()
        except BaseException:
            self._close_fds()
            raise

    # -- opening ---------------------------------------------------------------

    def _open_files(self) -> None:
        if not self._path.exists():
            # Flash first: a death before the sidecar exists leaves an erased
            # flash with no wear record, which opens as zero wear.
            write_atomic(self._path, self._erased_page * self._page_count)
            write_atomic(self._wear_path, self._fresh_wear_record())
        elif not self._wear_path.exists():
            write_atomic(self._wear_path, self._fresh_wear_record())
        self._fd = _open_rw(self._path, "flash file")
        actual = _file_size(self._fd, self._path)
        if actual != self._size_bytes:
            raise InvalidInput(
                f"flash file {self._path} is {actual} bytes, expected {self._size_bytes}"
            )
        self._wear_fd = _open_rw(self._wear_path, "wear record")
        self._page_erase_counts, self._total_write_ops = self._load_wear()
        self._total_erases = sum(self._page_erase_counts)

    def _fresh_wear_record(self) -> bytes:
        header = _WEAR_HEADER.pack(_WEAR_MAGIC, self._page_bytes, self._page_count, 0)
        return header + bytes(_COUNTER.size * self._page_count)

    def _load_wear(self) -> tuple[list[int], int]:
        """Per-page erase counts and total write ops from the sidecar.

        Raises InvalidInput when it is not a wear record for this geometry.
        """
        where = f"wear record {self._wear_path}"
        expected = _WEAR_HEADER.size + _COUNTER.size * self._page_count
        actual = _file_size(self._wear_fd, self._wear_path)
        if actual < _WEAR_HEADER.size:
            raise InvalidInput(f"{where} is {actual} bytes, too short for its header")
        if actual > expected:  # bounded before reading, whatever the file holds
            raise InvalidInput(f"{where} is {actual} bytes, expected {expected}")
        record = _pread_exact(self._wear_fd, actual, 0, self._wear_path)
        magic, page_bytes, page_count, write_ops = _WEAR_HEADER.unpack_from(record)
        if magic != _WEAR_MAGIC:
            raise InvalidInput(f"{where} does not start with {_WEAR_MAGIC!r}")
        if (page_bytes, page_count) != (self._page_bytes, self._page_count):
            raise InvalidInput(
                f"{where} is for {page_count} pages of {page_bytes} bytes, "
                f"not {self._page_count} of {self._page_bytes}"
            )
        if actual != expected:
            raise InvalidInput(f"{where} is {actual} bytes, expected {expected}")
        counts = [count for (count,) in _COUNTER.iter_unpack(record[_WEAR_HEADER.size :])]
        return counts, write_ops

    # -- operations ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The ``length`` bytes at ``offset``; a read is not a flash operation.

        Raises UsageError when the range is outside the flash or the flash is
        closed, and PowerCut when the power is off.
        """
        self._check_usable()
        self._check_range("read", offset, length)
        return _pread_exact(self._fd, length, offset, self._path)

    def is_erased(self, offset: int, length: int) -> bool:
        """Whether every byte in the range is 0xFF, i.e. writable without an erase.

        Raises like :meth:`read`.
        """
        return self.read(offset, length).count(ERASED_BYTE) == length

    def page_of(self, offset: int) -> int:
        """The index of the page holding the byte at ``offset``.

        Raises UsageError when ``offset`` is outside the flash.
        """
        if not 0 <= offset < self._size_bytes:
            raise UsageError(f"offset {offset:#x} is outside the {self._size_bytes}-byte flash")
        return offset // self._page_bytes

    def erase_page(self, page_index: int) -> None:
        """Set page ``page_index`` to 0xFF: one operation of ``page_erase_s`` * slowdown.

        Raises UsageError for a page outside the flash or a closed flash,
        PowerCut when the fault model cuts the power (the page then keeps its
        old bytes, or has its first half erased with torn writes).
        """
        self._check_usable()
        if not 0 <= page_index < self._page_count:
            raise UsageError(f"page {page_index} is outside the flash's {self._page_count} pages")
        start = page_index * self._page_bytes
        if self._cut_now():
            if self._faults.torn_writes:
                self._pwrite(self._erased_page[: self._page_bytes // 2], start)
            self._power_off(f"erase of page {page_index}")
        self._pwrite(self._erased_page, start)
        self._page_erase_counts[page_index] += 1
        self._total_erases += 1
        count_at = _WEAR_HEADER.size + _COUNTER.size * page_index
        self._pwrite_wear(_COUNTER.pack(self._page_erase_counts[page_index]), count_at)
        self._complete(self._timing.page_erase_s * self._faults.erase_slowdown)

    def write(self, offset: int, data: bytes) -> None:
        """Program ``data`` at ``offset``: one operation of words * ``word_write_s``.

        Raises UsageError, changing nothing, when ``data`` is empty, the
        range is outside the flash or not whole words, any target byte is not
        erased (NOR can only clear bits, so Shoal must erase first), or the
        flash is closed. Raises PowerCut when the fault model cuts the power
        (nothing programmed, or the first half of the words with torn writes).
        """
        self._check_usable()
        length = len(data)
        if length == 0:
            raise UsageError(f"flash write at {offset:#x} has no data")
        self._check_range("write", offset, length)
        if offset % self._word_bytes or length % self._word_bytes:
            raise UsageError(
                f"flash write of {length} bytes at {offset:#x} is not aligned "
                f"to {self._word_bytes}-byte words"
            )
        current = _pread_exact(self._fd, length, offset, self._path)
        if current.count(ERASED_BYTE) != length:
            first = length - len(current.lstrip(bytes([ERASED_BYTE])))
            address = offset + first
            raise UsageError(
                f"flash write over unerased byte {current[first]:#04x} at {address:#x}: "
                f"erase page {address // self._page_bytes} first"
            )
        words = length // self._word_bytes
        if self._cut_now():
            torn_bytes = (words // 2) * self._word_bytes
            if self._faults.torn_writes and torn_bytes:
                self._pwrite(bytes(data[:torn_bytes]), offset)
            self._power_off(f"write of {length} bytes at {offset:#x}")
        self._pwrite(data, offset)
        self._total_write_ops += 1
        self._pwrite_wear(_COUNTER.pack(self._total_write_ops), _WEAR_WRITE_OPS_AT)
        self._complete(words * self._timing.word_write_s)

    def close(self) -> None:
        """Release the files; idempotent. Nothing is buffered, so nothing is lost."""
        self._close_fds()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def wear_path(self) -> Path:
        """The sidecar that persists the wear counters."""
        return self._wear_path

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def page_bytes(self) -> int:
        return self._page_bytes

    @property
    def word_bytes(self) -> int:
        return self._word_bytes

    @property
    def page_count(self) -> int:
        return self._page_count

    @property
    def timing(self) -> FlashTiming:
        return self._timing

    @property
    def faults(self) -> FlashFaults:
        return self._faults

    @property
    def ops_done(self) -> int:
        """Erases and writes completed by this object (this power-on lifetime)."""
        return self._ops_done

    @property
    def total_write_ops(self) -> int:
        """Writes completed over the file's whole life, across restarts."""
        return self._total_write_ops

    @property
    def total_erases(self) -> int:
        """Page erases completed over the file's whole life, across restarts."""
        return self._total_erases

    @property
    def page_erase_counts(self) -> tuple[int, ...]:
        """Erases completed per page over the file's whole life: the wear."""
        return tuple(self._page_erase_counts)

    @property
    def busy_s(self) -> float:
        """Modeled time of the operations completed by this object, stalled or not."""
        return self._busy_s

    @property
    def powered_off(self) -> bool:
        """Whether a PowerCut ended this object's lifetime."""
        return self._power_off_reason is not None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # -- internals -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._power_off_reason is not None:
            raise PowerCut(
                f"power is off since the {self._power_off_reason}; open a new Flash on {self._path}"
            )
        if self._fd < 0:
            raise UsageError(f"flash {self._path} is closed")

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size_bytes:
            raise UsageError(
                f"flash {what} of {length} bytes at {offset:#x} is outside "
                f"the {self._size_bytes}-byte flash"
            )

    def _cut_now(self) -> bool:
        """Whether the fault model cuts the power during the operation about to run."""
        faults = self._faults
        if faults.cut_after_ops is not None and self._ops_done >= faults.cut_after_ops:
            return True
        probability = faults.random_cut_probability
        return probability > 0.0 and self._rng.random() < probability

    def _power_off(self, interrupted: str) -> NoReturn:
        """End this lifetime: later calls raise PowerCut, and the files are released."""
        self._power_off_reason = f"{interrupted} (after {self._ops_done} operations)"
        self._close_fds()
        raise PowerCut(f"power cut during the {self._power_off_reason}")

    def _complete(self, modeled_s: float) -> None:
        self._ops_done += 1
        self._busy_s += modeled_s
        if self._timing.enabled:
            self._stall(modeled_s)

    def _pwrite(self, data: bytes, offset: int) -> None:
        _pwrite_all(self._fd, data, offset, self._path)

    def _pwrite_wear(self, data: bytes, offset: int) -> None:
        _pwrite_all(self._wear_fd, data, offset, self._wear_path)

    def _close_fds(self) -> None:
        for fd in (self._fd, self._wear_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = -1
        self._wear_fd = -1


def _open_rw(path: Path, what: str) -> int:
    """A read-write descriptor on ``path``; raises InvalidInput when it cannot be opened."""
    try:
        return os.open(path, os.O_RDWR)
    except OSError as exc:
        raise InvalidInput(f"cannot open {what} {path}: {exc.strerror or exc}") from exc


def _file_size(fd: int, path: Path) -> int:
    """The size of the open file; raises InvalidInput when it cannot be stat'ed."""
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise InvalidInput(f"cannot stat {path}: {exc.strerror or exc}") from exc


def _pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    """Exactly ``length`` bytes at ``offset``.

    Raises InvalidInput when the read fails or comes back short (the file
    was truncated behind our back).
    """
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) != length:
        raise InvalidInput(f"{path} ended at {offset + len(data):#x}, expected {length} bytes")
    return data


def _pwrite_all(fd: int, data: bytes, offset: int, path: Path) -> None:
    """Write all of ``data`` at ``offset``, resuming a short write.

    Raises InvalidInput when the file cannot take it (disk full, I/O error),
    as :func:`otaio.files.write_atomic` does.
    """
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise InvalidInput(f"cannot write {path}: no progress at {offset:#x}")
            view = view[written:]
            offset += written
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc
