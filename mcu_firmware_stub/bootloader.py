"""The A/B bootloader of the simulated node: test boot, confirm or revert, anti-rollback.

It swaps whole slots page by page through a scratch page, as MCUboot's scratch
mode does (field notes §6), but keeps its state in a journal of its own
instead of slot trailers. Rules:

* **Layout** (page = ``flash.page_bytes``, see :class:`Layout`): the primary
  slot at 0, the secondary slot at ``slot_bytes``, one scratch page, then two
  journal pages. A slot is one header page (``u32 LE length || COSE_Sign1``,
  the rest 0xFF) followed by image pages, so an image is at most
  ``slot_bytes - page_bytes`` and a swap of whole pages moves every image
  together with its signed manifest.
* **What runs**: the primary slot, and only when it is *valid*: its signature
  checks with the trusted keys and the SHA-256 of its image bytes is the
  signed digest. The node verifies again on its own (architecture, security
  model): nothing reaches the primary slot by a test swap unless, at that
  reset, the secondary passed signature, device type, anti-rollback (sequence
  above ``confirmed_sequence``) and digest; a revert brings back only a valid
  image not below that floor.
* **States** are :class:`BootState` values stored by name; every change is a
  row of :data:`TRANSITIONS`, and an illegal (state, event) pair is a
  UsageError naming both. ``confirmed`` and ``testing`` run the primary;
  ``test_pending`` waits for the next reset; ``swapping`` and ``reverting``
  exist only inside :meth:`Bootloader.boot`, or after a power cut in it.

The journal (what is persisted, and when)
-----------------------------------------

1. The whole persisted state is one :class:`BootRecord`. Every change appends
   a fresh 128-byte record to a journal page (layout in :func:`encode_record`:
   magic, record sequence, state name, anti-rollback floor, receive progress,
   swap progress, flags, CRC-32). A change is durable exactly when its record
   write completes. A record either announces the operations that follow it
   (a swap step is recorded *before* its destination page is erased, a new
   receive before the secondary header is rewritten, a provisioning before
   the primary is erased), so that an interrupted operation is always one a
   record announced; or it reports operations completed before it (a durable
   offset, a verified image, a confirm), so that it never claims more than
   the flash holds.
2. On start every record slot of both pages is read; a record with a wrong
   magic or CRC (erased, or torn by a cut) is ignored, and the valid record
   with the highest sequence wins. Records go into a page in slot order
   after it was erased, so after the winner there are only erased slots and
   the slots of torn appends, which the next append skips (never rewrites).
3. When the active page is full, the next record goes to slot 0 of the other
   page, after erasing it. Until that write completes, the full page still
   holds the winner, and the page being erased holds only records older than
   it: a cut during the erase (even one that leaves half the page erased and
   half old records) or during the write (a torn record fails its CRC) leaves
   the same winner, and the next append erases the other page again. Once the
   write completes, the new record has the highest sequence and wins.
   (Sequences are u32: four billion records outlive any flash endurance.)

The swap (a test boot) and the revert
-------------------------------------

A swap exchanges the first ``page_count`` pages of the two slots, where
``page_count`` covers the header page and the image pages of the larger of
the two images; the pages beyond hold nothing either image's digest covers.
It is computed once, from both headers, when the swap starts and persisted in
every swap record, because the headers themselves move during the swap (a cut
can leave the secondary header page erased). For each page ``i`` in order:

1. record ``(i, 1)``; erase scratch, copy ``secondary[i] -> scratch``;
2. record ``(i, 2)``; erase ``secondary[i]``, copy ``primary[i] -> secondary[i]``;
3. record ``(i, 3)``; erase ``primary[i]``, copy ``scratch -> primary[i]``;

and the record of ``(i + 1, 1)``, or of the end state after the last page,
says that page ``i`` is done. A revert is the same swap again from
``testing``: the images trade places back. At a reset in ``swapping`` or
``reverting`` the bootloader redoes the recorded step and carries on. Redoing
is safe because each step's source is intact whenever its record is the
newest one:

* at ``(i, 1)``, ``secondary[i]`` still holds the old secondary page: only
  step 2 of page ``i`` changes it, and that step is announced by ``(i, 2)``,
  which is not yet (validly) written;
* at ``(i, 2)``, ``scratch`` holds the old ``secondary[i]`` (step 1 finished
  before ``(i, 2)`` was written, and scratch is erased again only after
  ``(i + 1, 1)``), and ``primary[i]`` is untouched until ``(i, 3)``;
* at ``(i, 3)``, ``scratch`` still holds the old ``secondary[i]`` and
  ``secondary[i]`` the old ``primary[i]`` (step 2 is done).

A step's destination is the only page it changes and is erased in full before
it is written, so a torn erase or a torn write of it is simply done again. So
after any cut, every page ``< i`` is swapped, every page ``> i`` is not, and
page ``i`` is recoverable from its recorded step: the node never runs a
half-swapped image, it finishes the move first.

Each power-cut point, and why it is safe
----------------------------------------

* Receiving writes only the secondary slot, whose header and image the
  primary never depend on. :meth:`Bootloader.begin_receive` records the new
  receive ``(digest, 0)`` first and only then rewrites the secondary header, so
  the journal never vouches for a verified image whose header is going away;
  a resume requires the header to hold the same signed manifest, else it
  starts over. A durable offset is recorded only after the pages below it
  were written.
* ``finish_receive``, ``request_test_boot``, ``confirm`` and ``abort_receive``
  are one record each: cut before it, the old state holds. A cut before the
  ``confirm`` record means the node never learnt of the confirmation: the
  next reset reverts, as it must for an image that did not confirm.
* A reset in ``test_pending`` only reads until it writes the ``(0, 1)``
  swapping record, the commit point of the swap; cut before it, the next
  reset verifies again. The end record (``testing``) follows step 3 of the
  last page; cut before it, that step is redone.
* A reset in ``testing`` (the app did not confirm) starts the revert with the
  ``(0, 1)`` reverting record and ends it with ``confirmed`` and
  ``last_reverted``. A cut between the end of a swap and the app's confirm
  therefore also reverts: the test image gets one boot, not more.
* :meth:`Bootloader.provision` records the new anti-rollback floor first,
  erases the header page before the image pages and writes the header last:
  a cut leaves a primary without a header, which counts as empty, so the
  factory simply provisions again.

Errors: UsageError when Shoal's own code misuses the bootloader (an illegal
state, an offset outside the image); InvalidInput subclasses when bytes from
outside or in the flash are bad. :class:`~mcu_firmware_stub.flash.PowerCut` is
never caught here: it ends the node's lifetime wherever it strikes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Final

from mcu_firmware_stub.flash import ERASED_BYTE, Flash
from otaproto import cose, mcuboot
from otaproto.artifact import check_installable
from otaproto.errors import (
    DigestMismatch,
    InvalidInput,
    LimitExceeded,
    MalformedError,
    RollbackRefused,
    UsageError,
)
from otaproto.keys import TrustedKeys
from otaproto.limits import DEFAULT_LIMITS
from otaproto.manifest import DIGEST_BYTES, Manifest, decode_manifest

_ERASED_U32 = 0xFFFF_FFFF
_HEADER_LENGTH = struct.Struct("<I")


class Slot(StrEnum):
    """An image slot: the primary one runs, the secondary one receives."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


class BootState(StrEnum):
    """Where the node stands in an update; persisted by name in the journal."""

    CONFIRMED = "confirmed"
    TEST_PENDING = "test_pending"
    SWAPPING = "swapping"
    TESTING = "testing"
    REVERTING = "reverting"


class BootEvent(StrEnum):
    """What happens to the bootloader; the key of :data:`TRANSITIONS` with the state."""

    PROVISION = "provision"
    RECEIVE = "receive"
    ABORT_RECEIVE = "abort_receive"
    REQUEST_TEST = "request_test"
    START_SWAP = "start_swap"
    REFUSE_SWAP = "refuse_swap"
    SWAP_DONE = "swap_done"
    CONFIRM = "confirm"
    START_REVERT = "start_revert"
    NO_FALLBACK = "no_fallback"
    REVERT_DONE = "revert_done"


_S = BootState
_E = BootEvent
#: Every legal (state, event) pair and the state it leads to. ``receive``
#: covers begin/write/persist/finish: the secondary may change only while the
#: primary is confirmed. ``abort_receive`` in ``test_pending`` cancels the test
#: boot. ``no_fallback`` is a reset in ``testing`` with no valid image to
#: revert to (the primary was empty before the swap): the test image stays.
TRANSITIONS: Final[Mapping[tuple[BootState, BootEvent], BootState]] = MappingProxyType(
    {
        (_S.CONFIRMED, _E.PROVISION): _S.CONFIRMED,
        (_S.CONFIRMED, _E.RECEIVE): _S.CONFIRMED,
        (_S.CONFIRMED, _E.ABORT_RECEIVE): _S.CONFIRMED,
        (_S.CONFIRMED, _E.REQUEST_TEST): _S.TEST_PENDING,
        (_S.CONFIRMED, _E.CONFIRM): _S.CONFIRMED,
        (_S.TEST_PENDING, _E.ABORT_RECEIVE): _S.CONFIRMED,
        (_S.TEST_PENDING, _E.START_SWAP): _S.SWAPPING,
        (_S.TEST_PENDING, _E.REFUSE_SWAP): _S.CONFIRMED,
        (_S.SWAPPING, _E.SWAP_DONE): _S.TESTING,
        (_S.TESTING, _E.ABORT_RECEIVE): _S.TESTING,
        (_S.TESTING, _E.CONFIRM): _S.CONFIRMED,
        (_S.TESTING, _E.START_REVERT): _S.REVERTING,
        (_S.TESTING, _E.NO_FALLBACK): _S.TESTING,
        (_S.REVERTING, _E.REVERT_DONE): _S.CONFIRMED,
    }
)


def next_state(state: BootState, event: BootEvent) -> BootState:
    """The state that ``event`` leads to from ``state``.

    Raises UsageError naming both when the pair is not in :data:`TRANSITIONS`.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise UsageError(f"bootloader event {event} is illegal in state {state}") from None


class SwapStep(IntEnum):
    """The steps of swapping one page, persisted by number.

    A step is a position in a fixed sequence, not a state of the machine, so
    its number is its name (the module docstring lists the three).
    """

    TO_SCRATCH = 1
    TO_SECONDARY = 2
    TO_PRIMARY = 3


@dataclass(frozen=True, slots=True)
class SwapProgress:
    """The step announced for page ``page_index`` of a swap of ``page_count`` pages.

    The direction (swap or revert) is the boot state itself, so it cannot
    disagree with it.
    """

    page_index: int
    step: SwapStep
    page_count: int


@dataclass(frozen=True, slots=True)
class ReceiveProgress:
    """An image being received into the secondary slot, durable up to ``durable_offset``."""

    image_digest: bytes
    durable_offset: int


@dataclass(frozen=True, slots=True)
class BootRecord:
    """Everything the bootloader persists; the default is a fresh node."""

    state: BootState = BootState.CONFIRMED
    confirmed_sequence: int = 0
    swap: SwapProgress | None = None
    receive: ReceiveProgress | None = None
    secondary_verified: bool = False
    last_reverted: bool = False


_RECORD_MAGIC = b"SBJ1"
_STATE_NAME_BYTES = 16
#: A journal record, little-endian, 128 bytes (the state name as text is
#: what makes it more than 64):
#:
#: ====== ===== ===============================================================
#: offset bytes field
#: ====== ===== ===============================================================
#: 0      4     magic ``SBJ1``
#: 4      4     record sequence (u32; the highest valid one wins)
#: 8      16    boot state name, ASCII, NUL-padded
#: 24     8     confirmed_sequence (u64, the anti-rollback floor)
#: 32     32    receive: image digest (zeros when not receiving)
#: 64     4     receive: durable offset (u32)
#: 68     4     swap: page index (u32)
#: 72     4     swap: page count (u32; 0 when not swapping or reverting)
#: 76     1     swap: step 1..3 (0 when not swapping or reverting)
#: 77     1     flags: 1 receiving, 2 secondary_verified, 4 last_reverted
#: 78     46    reserved, zero
#: 124    4     CRC-32 (zlib) of bytes 0..123
#: ====== ===== ===============================================================
_RECORD = struct.Struct(f"<4sI{_STATE_NAME_BYTES}sQ32sIIIBB46sI")
RECORD_BYTES: Final = _RECORD.size
_FLAG_RECEIVING = 0x01
_FLAG_SECONDARY_VERIFIED = 0x02
_FLAG_LAST_REVERTED = 0x04
_SWAP_STATES = frozenset({BootState.SWAPPING, BootState.REVERTING})


def encode_record(sequence: int, record: BootRecord) -> bytes:
    """The journal record of ``record`` with record sequence ``sequence``.

    The state is stored by name (text, never an ordinal) so that a journal
    stays readable when states are added. Raises UsageError for a sequence or
    field that does not fit its width.
    """
    if not 0 <= sequence <= _ERASED_U32:
        raise UsageError(f"journal sequence {sequence} does not fit 32 bits")
    flags = 0
    digest, offset = bytes(DIGEST_BYTES), 0
    if record.receive is not None:
        flags |= _FLAG_RECEIVING
        digest, offset = record.receive.image_digest, record.receive.durable_offset
    if record.secondary_verified:
        flags |= _FLAG_SECONDARY_VERIFIED
    if record.last_reverted:
        flags |= _FLAG_LAST_REVERTED
    swap = record.swap
    page_index, page_count, step = (
        (0, 0, 0) if swap is None else (swap.page_index, swap.page_count, int(swap.step))
    )
    if len(digest) != DIGEST_BYTES:
        raise UsageError(f"a receive digest is {DIGEST_BYTES} bytes, not {len(digest)}")
    try:
        body = _RECORD.pack(
            _RECORD_MAGIC,
            sequence,
            record.state.value.encode("ascii"),
            record.confirmed_sequence,
            digest,
            offset,
            page_index,
            page_count,
            step,
            flags,
            b"",
            0,
        )
    except struct.error as exc:
        raise UsageError(f"boot record does not fit the journal layout: {exc}") from exc
    crc_at = RECORD_BYTES - 4
    return body[:crc_at] + struct.pack("<I", zlib.crc32(body[:crc_at]))


def decode_record(raw: bytes) -> tuple[int, BootRecord] | None:
    """The (sequence, record) in one journal slot, or None when the slot holds none.

    An erased slot, a foreign one and a torn one (a cut during its write) all
    fail the magic or the CRC and give None. A record that passes its CRC but
    makes no sense was written by something else than this code: that raises
    MalformedError rather than being skipped, since skipping it could
    resurrect an older state.
    """
    if len(raw) != RECORD_BYTES:
        raise UsageError(f"a journal record is {RECORD_BYTES} bytes, not {len(raw)}")
    (magic, sequence, name, floor, digest, offset, page_index, page_count, step, flags, _, crc) = (
        _RECORD.unpack(raw)
    )
    if magic != _RECORD_MAGIC or crc != zlib.crc32(raw[: RECORD_BYTES - 4]):
        return None
    try:
        state = BootState(name.rstrip(b"\0").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedError("boot journal.state", f"unknown state {name!r}") from None
    swap: SwapProgress | None = None
    if state in _SWAP_STATES:
        if step not in tuple(SwapStep) or not 0 <= page_index < page_count:
            raise MalformedError(
                "boot journal.swap", f"step {step} of page {page_index} of {page_count}"
            )
        swap = SwapProgress(page_index, SwapStep(step), page_count)
    elif step or page_count:
        raise MalformedError("boot journal.swap", f"swap progress in state {state}")
    receive = ReceiveProgress(digest, offset) if flags & _FLAG_RECEIVING else None
    verified = bool(flags & _FLAG_SECONDARY_VERIFIED)
    if verified and receive is None:
        raise MalformedError("boot journal.flags", "secondary verified without a receive")
    record = BootRecord(state, floor, swap, receive, verified, bool(flags & _FLAG_LAST_REVERTED))
    return sequence, record


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the slots, the scratch page and the journal pages sit, in pages.

    Raises UsageError for a geometry that cannot hold a header page and at
    least one image page per slot.
    """

    page_bytes: int
    slot_bytes: int

    def __post_init__(self) -> None:
        if self.page_bytes <= 0:
            raise UsageError(f"page_bytes must be positive, not {self.page_bytes}")
        if self.slot_bytes % self.page_bytes or self.slot_bytes < 2 * self.page_bytes:
            raise UsageError(
                f"slot_bytes={self.slot_bytes} must be whole {self.page_bytes}-byte pages, "
                "at least two (a header page and an image page)"
            )

    @classmethod
    def flash_bytes_for(cls, slot_bytes: int, page_bytes: int) -> int:
        """The flash size two slots, the scratch page and the two journal pages need.

        Raises UsageError like the constructor.
        """
        return cls(page_bytes, slot_bytes).flash_bytes

    @property
    def flash_bytes(self) -> int:
        return 2 * self.slot_bytes + 3 * self.page_bytes

    @property
    def slot_pages(self) -> int:
        return self.slot_bytes // self.page_bytes

    @property
    def max_image_bytes(self) -> int:
        """A slot less its header page."""
        return self.slot_bytes - self.page_bytes

    @property
    def scratch_page(self) -> int:
        return 2 * self.slot_pages

    @property
    def journal_pages(self) -> tuple[int, int]:
        return self.scratch_page + 1, self.scratch_page + 2

    def slot_page(self, slot: Slot, index: int) -> int:
        """The flash page index of page ``index`` of ``slot`` (0 is its header page)."""
        return (0 if slot is Slot.PRIMARY else self.slot_pages) + index

    def header_at(self, slot: Slot) -> int:
        """Byte offset of the slot's header page."""
        return self.slot_page(slot, 0) * self.page_bytes

    def image_at(self, slot: Slot) -> int:
        """Byte offset of the slot's first image byte (the page after its header)."""
        return self.slot_page(slot, 1) * self.page_bytes


class _Journal:
    """Appends :class:`BootRecord` values to the two journal pages (module rules 1-3)."""

    def __init__(self, flash: Flash, pages: tuple[int, int]) -> None:
        self._flash = flash
        self._pages = pages
        self._slots_per_page = flash.page_bytes // RECORD_BYTES
        self._sequence = 0
        self._active: int | None = None  # index into pages of the winner's page
        self._next_slot = 0

    def load(self) -> BootRecord:
        """The winning record (a fresh node's default when there is none).

        Also finds where the next record goes. Raises MalformedError for a
        record that passes its CRC but makes no sense.
        """
        best: tuple[int, int, int, BootRecord] | None = None
        contents = []
        for which, page in enumerate(self._pages):
            raw = self._flash.read(page * self._flash.page_bytes, self._flash.page_bytes)
            contents.append(raw)
            for slot in range(self._slots_per_page):
                found = decode_record(raw[slot * RECORD_BYTES : (slot + 1) * RECORD_BYTES])
                if found is not None and (best is None or found[0] > best[0]):
                    best = (found[0], which, slot, found[1])
        if best is None:
            return BootRecord()
        self._sequence, self._active, slot, record = best
        raw = contents[self._active]
        self._next_slot = self._slots_per_page
        for later in range(slot + 1, self._slots_per_page):
            chunk = raw[later * RECORD_BYTES : (later + 1) * RECORD_BYTES]
            if chunk.count(ERASED_BYTE) == RECORD_BYTES:
                self._next_slot = later
                break
        return record

    def append(self, record: BootRecord) -> None:
        """Make ``record`` the winner: durable once the one write of it completes.

        Raises PowerCut from the flash, leaving the previous winner in force.
        """
        if self._active is None or self._next_slot >= self._slots_per_page:
            # A fresh journal, or a full page: (re)start the other page. Erased
            # every time, even when it looks erased, since a cut may have torn it.
            which = 0 if self._active is None else 1 - self._active
            self._flash.erase_page(self._pages[which])
            slot = 0
        else:
            which, slot = self._active, self._next_slot
        encoded = encode_record(self._sequence + 1, record)
        at = self._pages[which] * self._flash.page_bytes + slot * RECORD_BYTES
        self._flash.write(at, encoded)
        self._sequence += 1
        self._active, self._next_slot = which, slot + 1


@dataclass(frozen=True)
class SlotInfo:
    """What a slot's header says, and whether the slot holds that image intact.

    ``valid`` is true when the signature checks with the trusted keys and the
    SHA-256 of the slot's image bytes is the signed digest. Device type and
    anti-rollback are checked only when an image is about to be swapped in.
    """

    slot: Slot
    version: str
    sequence: int
    image_size: int
    image_digest: bytes
    signed_manifest: bytes
    valid: bool


@dataclass(frozen=True)
class BootOutcome:
    """What a reset did: the state after it, the image it runs, and whether it moved one."""

    state: BootState
    running: SlotInfo | None
    reverted: bool
    swapped: bool


@dataclass(slots=True)
class _ReceiveContext:
    """The receive of this power-on lifetime, in RAM: lost at a reset, like the MCU's."""

    image_size: int
    #: Highest image page erased in this lifetime; pages below the durable offset count.
    erased_through: int
    #: End of the furthest write in this lifetime (the durable offset at the start).
    written_end: int


class Bootloader:
    """The node's bootloader over ``flash``, holding images of at most ``max_image_bytes``.

    Reads the journal and nothing else: a fresh flash is ``confirmed`` with no
    images and ``confirmed_sequence`` 0. Raises UsageError for a geometry that
    cannot work (see :class:`Layout`; the flash must hold
    :meth:`Layout.flash_bytes_for` bytes and a page at least one journal
    record), MalformedError for a journal record that passes its CRC but makes
    no sense.
    """

    def __init__(
        self, flash: Flash, *, slot_bytes: int, trusted: TrustedKeys, device_type: str
    ) -> None:
        self._trusted = trusted
        self._device_type = device_type
        self._open(flash, slot_bytes)

    def _open(self, flash: Flash, slot_bytes: int) -> None:
        """Check the geometry, then load and check the journal: what every image format shares.

        Raises UsageError for a geometry that cannot work, MalformedError for a
        journal record that makes no sense.
        """
        layout = Layout(flash.page_bytes, slot_bytes)
        if flash.size_bytes < layout.flash_bytes:
            raise UsageError(
                f"flash of {flash.size_bytes} bytes is too small for {slot_bytes}-byte slots: "
                f"need {layout.flash_bytes}"
            )
        if flash.page_bytes < RECORD_BYTES or RECORD_BYTES % flash.word_bytes:
            raise UsageError(
                f"a {flash.page_bytes}-byte page of {flash.word_bytes}-byte words cannot hold "
                f"{RECORD_BYTES}-byte journal records"
            )
        self._flash = flash
        self._layout = layout
        self._journal = _Journal(flash, layout.journal_pages)
        self._record = self._journal.load()
        self._check_record(self._record)
        self._receive: _ReceiveContext | None = None

    # -- state -----------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def max_image_bytes(self) -> int:
        return self._layout.max_image_bytes

    @property
    def state(self) -> BootState:
        return self._record.state

    @property
    def confirmed_sequence(self) -> int:
        """The anti-rollback floor: the sequence of the last confirmed image."""
        return self._record.confirmed_sequence

    @property
    def last_reverted(self) -> bool:
        """Whether the last test boot was reverted (for reporting)."""
        return self._record.last_reverted

    @property
    def record(self) -> BootRecord:
        """The persisted state, as the journal's winning record holds it."""
        return self._record

    # -- reset -----------------------------------------------------------------

    def boot(self) -> BootOutcome:
        """What a reset does; returns the state after it and the image it runs.

        Finishes an interrupted swap or revert first. ``test_pending``: verify
        the secondary and swap it in (``testing``), or, when it fails, drop the
        request and stay ``confirmed``. ``testing``, i.e. the app did not
        confirm before this reset: revert (``confirmed``, ``last_reverted``),
        unless there is no valid image to go back to. ``confirmed``: nothing.
        ``running`` is the primary when it is valid, else None: bad flash
        content is never an exception here, since a node that cannot boot
        cannot report. Raises only PowerCut, from the flash.
        """
        self._receive = None  # a reset loses RAM
        entered = self._record.state
        if entered is BootState.TEST_PENDING:
            self._start_test_swap()
        elif entered is BootState.TESTING:
            self._start_revert()
        swapped = reverted = False
        if self._record.state is BootState.SWAPPING:
            self._run_swap(BootEvent.SWAP_DONE)
            swapped = True
        elif self._record.state is BootState.REVERTING:
            self._run_swap(BootEvent.REVERT_DONE)
            reverted = True
        running = self.slot_info(Slot.PRIMARY)
        return BootOutcome(
            self._record.state,
            running if running is not None and running.valid else None,
            reverted,
            swapped,
        )

    def _start_test_swap(self) -> None:
        """Verify the secondary, then write the swap's commit record, or drop the request."""
        try:
            self._verify_candidate()
        except InvalidInput:
            self._commit(
                replace(
                    self._record,
                    state=next_state(self._record.state, BootEvent.REFUSE_SWAP),
                    receive=None,
                    secondary_verified=False,
                )
            )
            return
        swap = SwapProgress(0, SwapStep.TO_SCRATCH, self._swap_page_count())
        self._commit(
            replace(
                self._record,
                state=next_state(self._record.state, BootEvent.START_SWAP),
                swap=swap,
                receive=None,
                secondary_verified=False,
                last_reverted=False,
            )
        )

    def _verify_candidate(self) -> None:
        """Check the secondary as the node must before it runs it.

        Order: header structure, signature, device type, sequence above the
        floor, the digest the receive verified, the image bytes' digest.
        Raises MalformedError, LimitExceeded, UnknownKeyError, SignatureError,
        DeviceTypeMismatch, RollbackRefused, DigestMismatch.
        """
        _, parts, _ = self._read_header(Slot.SECONDARY)
        manifest = cose.verify_signed(parts, self._trusted)
        check_installable(
            manifest,
            device_type=self._device_type,
            installed_sequence=self._record.confirmed_sequence,
        )
        receive = self._record.receive
        if receive is None or receive.image_digest != manifest.image_digest:
            raise DigestMismatch("the secondary slot is not the image that was received")
        if self._digest_of(Slot.SECONDARY, manifest) != manifest.image_digest:
            raise DigestMismatch("the secondary slot's image does not match its signed digest")

    def _start_revert(self) -> None:
        """Write the revert's commit record, if there is a valid image to go back to.

        With none (the primary was empty before the swap) a revert would leave
        the node nothing to run, so the test image keeps running, still
        unconfirmed.
        """
        fallback = self.slot_info(Slot.SECONDARY)
        if (
            fallback is None
            or not fallback.valid
            or fallback.sequence < self._record.confirmed_sequence
        ):
            next_state(self._record.state, BootEvent.NO_FALLBACK)  # legal; nothing to persist
            return
        swap = SwapProgress(0, SwapStep.TO_SCRATCH, self._swap_page_count())
        self._commit(
            replace(
                self._record,
                state=next_state(self._record.state, BootEvent.START_REVERT),
                swap=swap,
            )
        )

    def _swap_page_count(self) -> int:
        """Header page plus the image pages of the larger image of the two slots."""
        page_bytes = self._layout.page_bytes
        image_pages = 0
        for slot in Slot:
            try:
                _, _, manifest = self._read_header(slot)
            except InvalidInput:
                continue
            image_pages = max(image_pages, -(-manifest.image_size // page_bytes))
        return 1 + image_pages

    def _run_swap(self, done: BootEvent) -> None:
        """Carry the recorded swap (or revert) through to its end record (module docstring)."""
        progress = self._record.swap
        if progress is None:
            raise UsageError(f"no swap progress in state {self._record.state}")
        page, step, count = progress.page_index, progress.step, progress.page_count
        while True:
            self._swap_step(page, step)
            if step is not SwapStep.TO_PRIMARY:
                step = SwapStep(step + 1)
            elif page + 1 < count:
                page, step = page + 1, SwapStep.TO_SCRATCH
            else:
                break
            self._commit(replace(self._record, swap=SwapProgress(page, step, count)))
        self._commit(
            replace(
                self._record,
                state=next_state(self._record.state, done),
                swap=None,
                last_reverted=done is BootEvent.REVERT_DONE,
            )
        )

    def _swap_step(self, index: int, step: SwapStep) -> None:
        """Erase the step's destination page and copy its source page into it."""
        layout = self._layout
        primary = layout.slot_page(Slot.PRIMARY, index)
        secondary = layout.slot_page(Slot.SECONDARY, index)
        scratch = layout.scratch_page
        source, destination = {
            SwapStep.TO_SCRATCH: (secondary, scratch),
            SwapStep.TO_SECONDARY: (primary, secondary),
            SwapStep.TO_PRIMARY: (scratch, primary),
        }[step]
        page_bytes = layout.page_bytes
        data = self._flash.read(source * page_bytes, page_bytes)
        self._flash.erase_page(destination)
        used = len(data.rstrip(bytes([ERASED_BYTE])))
        if used:
            self._program(destination * page_bytes, data[: self._round_up_to_word(used)])

    # -- the app's side ----------------------------------------------------------

    def confirm(self) -> None:
        """Make the running test image permanent and raise the anti-rollback floor to it.

        A no-op in ``confirmed``. Raises UsageError in any other state, and
        MalformedError, LimitExceeded or a VerificationError when the primary's
        header no longer verifies.
        """
        new_state = next_state(self._record.state, BootEvent.CONFIRM)
        if self._record.state is BootState.CONFIRMED:
            return
        _, parts, _ = self._read_header(Slot.PRIMARY)
        manifest = cose.verify_signed(parts, self._trusted)
        self._commit(
            replace(
                self._record,
                state=new_state,
                # The floor never goes down, whatever the header says.
                confirmed_sequence=max(self._record.confirmed_sequence, manifest.sequence),
                last_reverted=False,
            )
        )

    # -- slots -------------------------------------------------------------------

    def slot_info(self, slot: Slot) -> SlotInfo | None:
        """What ``slot`` holds, or None when its header page is empty or undecodable.

        Never raises for bad flash content: a slot whose signature or image
        digest fails is reported with ``valid`` false.
        """
        try:
            signed, parts, manifest = self._read_header(slot)
        except InvalidInput:
            return None
        try:
            cose.verify_signed(parts, self._trusted)
            valid = self._digest_of(slot, manifest) == manifest.image_digest
        except InvalidInput:
            valid = False
        return SlotInfo(
            slot,
            manifest.version,
            manifest.sequence,
            manifest.image_size,
            manifest.image_digest,
            signed,
            valid,
        )

    def image_bytes(self, slot: Slot) -> bytes:
        """The ``image_size`` bytes after the slot's header page, as its header gives the size.

        Raises MalformedError when the header is empty or undecodable,
        LimitExceeded when it claims more than the slot holds.
        """
        _, _, manifest = self._read_header(slot)
        return self._flash.read(self._layout.image_at(slot), manifest.image_size)

    def provision(self, signed_manifest: bytes, image: bytes) -> None:
        """Factory programming: write a verified image straight into the primary, confirmed.

        Allowed only in ``confirmed`` on a primary without a valid image (a
        primary that a cut left half provisioned has no header yet, so it
        counts as empty). Raises UsageError otherwise; MalformedError,
        LimitExceeded, UnknownKeyError, SignatureError, DeviceTypeMismatch for
        a bad manifest; RollbackRefused below the current floor; DigestMismatch
        when ``image`` is not the signed image.
        """
        next_state(self._record.state, BootEvent.PROVISION)
        existing = self.slot_info(Slot.PRIMARY)
        if existing is not None and existing.valid:
            raise UsageError(
                f"primary slot already holds version {existing.version}: provision only once"
            )
        manifest = self._verify_manifest(signed_manifest)
        check_installable(manifest, device_type=self._device_type, installed_sequence=None)
        if manifest.image_size > self.max_image_bytes:
            raise LimitExceeded("image", manifest.image_size, self.max_image_bytes)
        floor = self._record.confirmed_sequence
        if manifest.sequence < floor:
            raise RollbackRefused(f"sequence {manifest.sequence} is below the confirmed {floor}")
        if len(image) != manifest.image_size or (
            hashlib.sha256(image).digest() != manifest.image_digest
        ):
            raise DigestMismatch("the image is not the one the signed manifest describes")
        self._commit(replace(self._record, confirmed_sequence=manifest.sequence))
        layout = self._layout
        self._flash.erase_page(layout.slot_page(Slot.PRIMARY, 0))
        page_bytes = layout.page_bytes
        for index in range(-(-len(image) // page_bytes)):
            self._flash.erase_page(layout.slot_page(Slot.PRIMARY, 1 + index))
            chunk = image[index * page_bytes : (index + 1) * page_bytes]
            self._program(layout.image_at(Slot.PRIMARY) + index * page_bytes, self._pad(chunk))
        self._write_header(Slot.PRIMARY, signed_manifest)

    # -- receiving into the secondary ----------------------------------------------

    def begin_receive(self, signed_manifest: bytes, manifest: Manifest) -> int:
        """Start or resume receiving an image; returns the offset the sender starts from.

        The same signed manifest already in progress resumes at the durable
        offset from the journal (at ``image_size`` when it was finished and
        verified). Anything else starts over: the new receive is recorded,
        then the secondary header page is rewritten. Raises UsageError outside
        ``confirmed`` or when ``manifest`` is not the one ``signed_manifest``
        carries; LimitExceeded when the image or the signed manifest does not
        fit the slot; MalformedError, UnknownKeyError, SignatureError for a
        signed manifest that does not verify (the caller should have checked).
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        if manifest.image_size > self.max_image_bytes:
            raise LimitExceeded("image", manifest.image_size, self.max_image_bytes)
        if self._verify_manifest(signed_manifest) != manifest:
            raise UsageError("the manifest is not the one the signed manifest carries")
        receive = self._record.receive
        if (
            receive is not None
            and receive.image_digest == manifest.image_digest
            and self._holds_header(Slot.SECONDARY, signed_manifest)
        ):
            offset = (
                manifest.image_size if self._record.secondary_verified else receive.durable_offset
            )
        else:
            self._commit(
                replace(
                    self._record,
                    receive=ReceiveProgress(manifest.image_digest, 0),
                    secondary_verified=False,
                )
            )
            self._write_header(Slot.SECONDARY, signed_manifest)
            offset = 0
        page_bytes = self._layout.page_bytes
        self._receive = _ReceiveContext(manifest.image_size, -(-offset // page_bytes) - 1, offset)
        return offset

    def write_image(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the secondary's image area, in any order.

        The serial receiver repeats lost chunks selectively, so chunks can
        arrive out of order; the flash itself is the reassembly buffer. Each
        write starts on a word boundary and is whole words, except the one that
        ends the image, whose last partial word is padded with 0xFF. Nothing is
        written below the durable offset. Pages are erased on their first
        touch in this lifetime: every page above the highest one erased so far,
        up to the one being written, holds no data of this lifetime yet, so
        erasing them all at once loses nothing. Raises UsageError outside
        ``confirmed``, before :meth:`begin_receive` in this lifetime, for empty
        or misaligned data, or bytes outside ``[durable offset, image_size)``.
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        context, receive = self._receive, self._record.receive
        if context is None or receive is None:
            raise UsageError("write_image before begin_receive")
        if not data:
            raise UsageError(f"image write at {offset} has no data")
        end = offset + len(data)
        if offset < receive.durable_offset or end > context.image_size:
            raise UsageError(
                f"image write of {len(data)} bytes at {offset} is outside "
                f"[{receive.durable_offset}, {context.image_size}) of the image"
            )
        word = self._flash.word_bytes
        if offset % word or (len(data) % word and end != context.image_size):
            raise UsageError(
                f"image write of {len(data)} bytes at {offset} is not whole {word}-byte words"
            )
        self._program_image(context, offset, self._pad(data) if len(data) % word else data)
        context.written_end = max(context.written_end, end)

    def _image_start(self, slot: Slot) -> int:
        """Where ``slot``'s image starts: after the slot's Shoal header page."""
        return self._layout.image_at(slot)

    def _program_image(self, context: _ReceiveContext, start: int, data: bytes) -> None:
        """Program ``data`` at ``start`` of the secondary image, erasing untouched pages first."""
        page_bytes = self._layout.page_bytes
        base = self._image_start(Slot.SECONDARY)
        last_page = (start + len(data) - 1) // page_bytes
        while context.erased_through < last_page:
            context.erased_through += 1
            self._flash.erase_page(self._flash.page_of(base + context.erased_through * page_bytes))
        self._program(base + start, data)

    def persist_progress(self, offset: int) -> None:
        """Record that the image is written up to ``offset``: a resume starts there.

        ``offset`` is a page boundary, or ``image_size``, that was written in
        this lifetime and is not below the durable offset already recorded.
        Raises UsageError otherwise, outside ``confirmed`` or before
        :meth:`begin_receive`.
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        context, receive = self._receive, self._record.receive
        if context is None or receive is None:
            raise UsageError("persist_progress before begin_receive")
        if offset % self._layout.page_bytes and offset != context.image_size:
            raise UsageError(f"durable offset {offset} is not a page boundary or the image end")
        written = context.written_end
        if not receive.durable_offset <= offset <= min(written, context.image_size):
            raise UsageError(
                f"durable offset {offset} is outside [{receive.durable_offset}, {written}]"
            )
        self._commit(replace(self._record, receive=replace(receive, durable_offset=offset)))

    def receive_progress(self) -> tuple[bytes, int] | None:
        """(image digest, durable offset) of an unfinished receive, else None."""
        receive = self._record.receive
        if receive is None or self._record.secondary_verified:
            return None
        return receive.image_digest, receive.durable_offset

    def finish_receive(self) -> bool:
        """Hash the secondary's image: True (and ``secondary_verified``) when it is the signed one.

        Otherwise the receive is forgotten and False returned, so the next
        :meth:`begin_receive` starts over. Raises UsageError outside
        ``confirmed`` or with no receive in progress.
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        receive = self._record.receive
        if receive is None:
            raise UsageError("finish_receive with no receive in progress")
        self._receive = None
        try:
            _, parts, _ = self._read_header(Slot.SECONDARY)
            manifest = cose.verify_signed(parts, self._trusted)
            intact = manifest.image_digest == receive.image_digest and (
                self._digest_of(Slot.SECONDARY, manifest) == manifest.image_digest
            )
        except InvalidInput:
            intact = False
        if not intact:
            self._commit(replace(self._record, receive=None, secondary_verified=False))
            return False
        self._commit(
            replace(
                self._record,
                receive=ReceiveProgress(receive.image_digest, manifest.image_size),
                secondary_verified=True,
            )
        )
        return True

    def request_test_boot(self) -> None:
        """Have the next reset swap the verified secondary in for one test boot.

        Raises UsageError outside ``confirmed`` or when no received image was
        verified by :meth:`finish_receive`.
        """
        new_state = next_state(self._record.state, BootEvent.REQUEST_TEST)
        if not self._record.secondary_verified:
            raise UsageError("request_test_boot without a verified image in the secondary slot")
        self._receive = None
        self._commit(replace(self._record, state=new_state))

    def abort_receive(self) -> None:
        """Forget the receive progress and the verified flag; cancels a pending test boot.

        Raises UsageError while a swap or revert is unfinished (boot first).
        """
        new_state = next_state(self._record.state, BootEvent.ABORT_RECEIVE)
        self._receive = None
        self._commit(replace(self._record, state=new_state, receive=None, secondary_verified=False))

    # -- internals -----------------------------------------------------------------

    def _commit(self, record: BootRecord) -> None:
        """Persist ``record`` (one journal append), unless it is already the state."""
        if record == self._record:
            return
        self._journal.append(record)
        self._record = record

    def _check_record(self, record: BootRecord) -> None:
        """Refuse a winning record that does not fit this geometry. Raises MalformedError."""
        swap = record.swap
        if swap is not None and swap.page_count > self._layout.slot_pages:
            raise MalformedError(
                "boot journal.swap",
                f"{swap.page_count} pages in a {self._layout.slot_pages}-page slot",
            )
        receive = record.receive
        if receive is not None and receive.durable_offset > self.max_image_bytes:
            raise MalformedError(
                "boot journal.receive", f"durable offset {receive.durable_offset} past the slot"
            )

    def _verify_manifest(self, signed_manifest: bytes) -> Manifest:
        """Decode and verify a signed manifest that must fit a header page.

        Raises LimitExceeded, MalformedError, UnknownKeyError, SignatureError.
        """
        room = self._layout.page_bytes - _HEADER_LENGTH.size
        if len(signed_manifest) > room:
            raise LimitExceeded("signed manifest", len(signed_manifest), room)
        return cose.verify_signed(cose.decode_signed_manifest(signed_manifest), self._trusted)

    def _header_bytes(self, slot: Slot) -> bytes | None:
        """The signed manifest bytes of the slot's header, undecoded; None when empty.

        Raises MalformedError for a length that cannot be a signed manifest.
        """
        raw = self._flash.read(self._layout.header_at(slot), self._layout.page_bytes)
        (length,) = _HEADER_LENGTH.unpack_from(raw)
        if length == _ERASED_U32:
            return None
        room = min(
            self._layout.page_bytes - _HEADER_LENGTH.size,
            DEFAULT_LIMITS.max_signed_manifest_bytes,
        )
        if not 0 < length <= room:
            raise MalformedError(f"{slot} slot header", f"length {length} is not 1..{room}")
        return raw[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length]

    def _holds_header(self, slot: Slot, signed_manifest: bytes) -> bool:
        """Whether the slot's header is exactly ``signed_manifest`` (a torn header is not)."""
        try:
            return self._header_bytes(slot) == signed_manifest
        except InvalidInput:
            return False

    def _read_header(self, slot: Slot) -> tuple[bytes, cose.SignedParts, Manifest]:
        """The slot's signed manifest, its parts and its (unverified) manifest.

        Raises MalformedError when the header is empty or undecodable,
        LimitExceeded when the manifest's image does not fit the slot.
        """
        signed = self._header_bytes(slot)
        if signed is None:
            raise MalformedError(f"{slot} slot header", "the slot holds no image")
        parts = cose.decode_signed_manifest(signed)
        manifest = decode_manifest(parts.manifest_bytes)
        if manifest.image_size > self.max_image_bytes:
            raise LimitExceeded(f"{slot} slot image", manifest.image_size, self.max_image_bytes)
        return signed, parts, manifest

    def _digest_of(self, slot: Slot, manifest: Manifest) -> bytes:
        """SHA-256 of the ``manifest.image_size`` bytes of the slot's image area."""
        image = self._flash.read(self._layout.image_at(slot), manifest.image_size)
        return hashlib.sha256(image).digest()

    def _write_header(self, slot: Slot, signed_manifest: bytes) -> None:
        """Erase the slot's header page and write ``length || signed_manifest`` into it."""
        self._flash.erase_page(self._layout.slot_page(slot, 0))
        header = _HEADER_LENGTH.pack(len(signed_manifest)) + signed_manifest
        self._program(self._layout.header_at(slot), self._pad(header))

    def _program(self, offset: int, data: bytes) -> None:
        """One flash write of ``data`` (whole words, onto erased bytes)."""
        self._flash.write(offset, data)

    def _round_up_to_word(self, length: int) -> int:
        word = self._flash.word_bytes
        return -(-length // word) * word

    def _pad(self, data: bytes) -> bytes:
        """``data`` padded with 0xFF to whole words (0xFF programs nothing)."""
        return data + bytes([ERASED_BYTE]) * (self._round_up_to_word(len(data)) - len(data))


# -- MCUboot image slots (SMP mode) ------------------------------------------------------


class McubootBootloader(Bootloader):
    """The same bootloader for slots that hold MCUboot images: what SMP mode boots.

    The same: the layout (two slots, scratch page, journal pages), the journal
    and its records, :data:`TRANSITIONS`, and the page-by-page swap through
    the scratch page with every power-cut rule of the module docstring. With
    test, confirm and revert, that is MCUboot's swap using scratch.

    Different:

    * A slot holds an MCUboot image file (:mod:`otaproto.mcuboot`: header,
      firmware, TLVs) from its first byte; there is no Shoal header page. An
      image is at most ``slot_bytes - page_bytes``: the last page stands for
      MCUboot's image trailer, whose state this model keeps in the journal.
    * A slot's image is *valid* when it passes ``trust`` (hash, and a
      signature by a trusted key unless hash-only images are accepted). It is
      checked when a test is requested, again at the reset that would swap the
      image in, and for the primary at every boot: nothing that fails it runs.
    * A receive is an SMP upload, identified by the SHA-256 of the whole file
      (the ``sha`` the client sent; zeros when it sent none, and such an
      upload never resumes). The durable offset is recorded at page
      boundaries as before, so an upload resumes across resets too.
    * There is no anti-rollback floor: ``confirmed_sequence`` stays 0, as
      MCUboot's downgrade prevention is off by default.

    The signed-manifest methods (``provision``, ``begin_receive``,
    ``finish_receive``, ``request_test_boot``) raise UsageError here; their
    counterparts are :meth:`provision_image`, :meth:`begin_upload`,
    :meth:`finish_upload` and :meth:`request_test`. Raises UsageError for a
    geometry that cannot work, MalformedError for a journal record that makes
    no sense, like :class:`Bootloader`.
    """

    def __init__(self, flash: Flash, *, slot_bytes: int, trust: mcuboot.ImageTrust) -> None:
        # No manifest keys or device type: MCUboot images do not use them.
        self._image_trust = trust
        self._open(flash, slot_bytes)

    @property
    def trust(self) -> mcuboot.ImageTrust:
        """What this bootloader boots."""
        return self._image_trust

    # -- slots ---------------------------------------------------------------------

    def _slot_region(self, slot: Slot) -> bytes:
        """The slot's bytes an image may occupy."""
        return self._flash.read(self._layout.header_at(slot), self.max_image_bytes)

    def slot_image(self, slot: Slot) -> mcuboot.McubootImage | None:
        """The slot's image when it parses and its hash checks, signature not considered.

        What SMP's image state lists (as Zephyr's img_mgmt does). Never raises
        for flash content.
        """
        try:
            return mcuboot.verify_image(
                self._slot_region(slot), None, max_image_bytes=self.max_image_bytes
            )
        except InvalidInput:
            return None

    def trusted_image(self, slot: Slot) -> mcuboot.McubootImage:
        """The slot's image, verified under :attr:`trust`.

        Raises MalformedError, LimitExceeded, DigestMismatch, UnknownKeyError,
        SignatureError.
        """
        return self._image_trust.verify(
            self._slot_region(slot), max_image_bytes=self.max_image_bytes
        )

    def slot_info(self, slot: Slot) -> SlotInfo | None:
        """What ``slot`` holds, or None when it holds no parsable image.

        ``valid`` means it passes :attr:`trust`; ``version`` is mcumgr's
        spelling (``1.2.3.4``), ``image_size`` the whole file, ``image_digest``
        the SHA256 TLV; ``sequence`` is 0 and ``signed_manifest`` empty (MCUboot
        images have neither). Never raises for flash content.
        """
        region = self._slot_region(slot)
        try:
            image = mcuboot.parse_image(region, max_image_bytes=self.max_image_bytes)
        except InvalidInput:
            return None
        try:
            self._image_trust.verify(region, max_image_bytes=self.max_image_bytes)
            valid = True
        except InvalidInput:
            valid = False
        return SlotInfo(slot, str(image.version), 0, image.total_bytes, image.hash, b"", valid)

    def image_bytes(self, slot: Slot) -> bytes:
        """The slot's image file (header, firmware, TLVs).

        Raises MalformedError or LimitExceeded when the slot holds no parsable image.
        """
        region = self._slot_region(slot)
        image = mcuboot.parse_image(region, max_image_bytes=self.max_image_bytes)
        return region[: image.total_bytes]

    def provision_image(self, image: bytes) -> None:
        """Factory programming: write a trusted image file straight into an empty primary.

        Padding after the image (``imgtool --pad``) is not written. The first
        page (the MCUboot header) is erased first and written last, so a cut
        leaves a primary without an image, which the factory provisions again.
        Raises UsageError outside ``confirmed`` or over a valid primary, and
        what :meth:`mcuboot.ImageTrust.verify` raises for the image.
        """
        next_state(self._record.state, BootEvent.PROVISION)
        existing = self.slot_info(Slot.PRIMARY)
        if existing is not None and existing.valid:
            raise UsageError(
                f"primary slot already holds version {existing.version}: provision only once"
            )
        verified = self._image_trust.verify(image, max_image_bytes=self.max_image_bytes)
        data = image[: verified.total_bytes]
        page_bytes = self._layout.page_bytes
        base = self._layout.header_at(Slot.PRIMARY)
        self._flash.erase_page(self._layout.slot_page(Slot.PRIMARY, 0))
        for index in range(1, -(-len(data) // page_bytes)):
            self._flash.erase_page(self._layout.slot_page(Slot.PRIMARY, index))
            chunk = data[index * page_bytes : (index + 1) * page_bytes]
            self._program(base + index * page_bytes, self._pad(chunk))
        self._program(base, self._pad(data[:page_bytes]))

    # -- uploads into the secondary --------------------------------------------------

    def begin_upload(self, file_sha: bytes | None, total_bytes: int) -> int:
        """Start or resume an upload of a ``total_bytes`` file; returns its next offset.

        The same ``file_sha`` (32 bytes) as the upload in the journal resumes
        at its durable offset (at ``total_bytes`` when it was finished with that
        size); anything else starts over at 0, erasing pages as they are first
        written. Raises UsageError outside ``confirmed`` or for an empty file,
        LimitExceeded when the file does not fit the slot.
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        if total_bytes < 1:
            raise UsageError("an upload needs at least one byte")
        if total_bytes > self.max_image_bytes:
            raise LimitExceeded("MCUboot image file", total_bytes, self.max_image_bytes)
        key = file_sha if file_sha is not None and len(file_sha) == DIGEST_BYTES else None
        receive = self._record.receive
        offset = 0
        if key is not None and receive is not None and receive.image_digest == key:
            if self._record.secondary_verified and receive.durable_offset == total_bytes:
                offset = total_bytes
            elif not self._record.secondary_verified and receive.durable_offset < total_bytes:
                offset = receive.durable_offset
        if offset == 0:
            self._commit(
                replace(
                    self._record,
                    receive=ReceiveProgress(key or bytes(DIGEST_BYTES), 0),
                    secondary_verified=False,
                )
            )
        page_bytes = self._layout.page_bytes
        self._receive = _ReceiveContext(total_bytes, -(-offset // page_bytes) - 1, offset)
        return offset

    def _image_start(self, slot: Slot) -> int:
        """Where ``slot``'s image starts: an MCUboot image starts at the slot's first byte."""
        return self._layout.header_at(slot)

    def finish_upload(self) -> bool:
        """Hash the uploaded file: True (upload complete) unless it differs from its ``sha``.

        Without a ``sha`` there is nothing to compare and it is True. On False
        the upload is forgotten, so the next one starts over. Raises UsageError
        outside ``confirmed``, with no upload in this lifetime, or before the
        whole file was written.
        """
        next_state(self._record.state, BootEvent.RECEIVE)
        receive, context = self._record.receive, self._receive
        if receive is None or context is None:
            raise UsageError("finish_upload with no upload in progress")
        if context.written_end < context.image_size:
            raise UsageError(
                f"finish_upload at {context.written_end} of {context.image_size} bytes"
            )
        self._receive = None
        written = self._flash.read(self._layout.header_at(Slot.SECONDARY), context.image_size)
        expected = receive.image_digest
        if expected != bytes(DIGEST_BYTES) and hashlib.sha256(written).digest() != expected:
            self._commit(replace(self._record, receive=None, secondary_verified=False))
            return False
        self._commit(
            replace(
                self._record,
                receive=ReceiveProgress(expected, context.image_size),
                secondary_verified=True,
            )
        )
        return True

    def request_test(self) -> mcuboot.McubootImage:
        """Have the next reset swap the secondary's image in for one test boot.

        The image is verified under :attr:`trust` first; returns it. Raises
        UsageError outside ``confirmed``, and MalformedError, LimitExceeded,
        DigestMismatch, UnknownKeyError or SignatureError for an image that
        must not run (nothing is changed then).
        """
        new_state = next_state(self._record.state, BootEvent.REQUEST_TEST)
        image = self.trusted_image(Slot.SECONDARY)
        self._receive = None
        self._commit(replace(self._record, state=new_state, receive=None, secondary_verified=False))
        return image

    def erase_secondary(self) -> None:
        """Forget any upload and erase the secondary slot's pages that are not blank.

        Raises UsageError outside ``confirmed`` (a test boot uses the slot).
        """
        if self._record.state is not BootState.CONFIRMED:
            raise UsageError(f"the secondary slot is in use in state {self._record.state}")
        self.abort_receive()
        page_bytes = self._layout.page_bytes
        for index in range(self._layout.slot_pages):
            page = self._layout.slot_page(Slot.SECONDARY, index)
            if not self._flash.is_erased(page * page_bytes, page_bytes):
                self._flash.erase_page(page)

    # -- what differs from signed manifests -------------------------------------------

    def confirm(self) -> None:
        """Make the running test image permanent (a no-op in ``confirmed``).

        Raises UsageError in any other state.
        """
        new_state = next_state(self._record.state, BootEvent.CONFIRM)
        if self._record.state is BootState.CONFIRMED:
            return
        self._commit(replace(self._record, state=new_state, last_reverted=False))

    def _verify_candidate(self) -> None:
        """At the reset of a test: the secondary must pass :attr:`trust` (raises if not)."""
        self.trusted_image(Slot.SECONDARY)

    def _swap_page_count(self) -> int:
        """Pages of the larger image file of the two slots (at least one)."""
        page_bytes = self._layout.page_bytes
        pages = 1
        for slot in Slot:
            try:
                extent = mcuboot.image_extent(
                    self._slot_region(slot), max_image_bytes=self.max_image_bytes
                )
            except InvalidInput:
                continue
            pages = max(pages, -(-extent // page_bytes))
        return pages

    def provision(self, signed_manifest: bytes, image: bytes) -> None:
        """Not for MCUboot slots: raises UsageError (use :meth:`provision_image`)."""
        raise UsageError("MCUboot slots are provisioned with provision_image")

    def begin_receive(self, signed_manifest: bytes, manifest: Manifest) -> int:
        """Not for MCUboot slots: raises UsageError (use :meth:`begin_upload`)."""
        raise UsageError("MCUboot slots receive with begin_upload")

    def finish_receive(self) -> bool:
        """Not for MCUboot slots: raises UsageError (use :meth:`finish_upload`)."""
        raise UsageError("MCUboot slots finish with finish_upload")

    def request_test_boot(self) -> None:
        """Not for MCUboot slots: raises UsageError (use :meth:`request_test`)."""
        raise UsageError("MCUboot slots request a test with request_test")
