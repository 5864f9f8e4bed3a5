"""The A/B bootloader: test boot, confirm or revert, anti-rollback, and power cuts anywhere."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcu_firmware_stub.bootloader import (
    RECORD_BYTES,
    TRANSITIONS,
    BootEvent,
    Bootloader,
    BootRecord,
    BootState,
    Layout,
    ReceiveProgress,
    Slot,
    SwapProgress,
    SwapStep,
    decode_record,
    encode_record,
    next_state,
)
from mcu_firmware_stub.flash import Flash, FlashFaults, FlashTiming, PowerCut
from otaproto.artifact import VerifiedArtifact, build_full_artifact, verify_artifact
from otaproto.errors import (
    DigestMismatch,
    LimitExceeded,
    MalformedError,
    RollbackRefused,
    UnknownKeyError,
    UsageError,
)
from otaproto.keys import SigningKey, TrustedKeys
from shoal.synthetic import firmware_like

PAGE = 512
SLOT = 8 * PAGE
LAYOUT = Layout(PAGE, SLOT)
DEVICE = "nrf52840-dk"
KEY = SigningKey.from_ed25519_seed(bytes(range(32)))
TRUSTED = TrustedKeys([KEY.public_key])
#: Frames of the serial link are not page- or word-sized: neither are these writes.
CHUNK_BYTES = 200


def signed(
    image: bytes, sequence: int, *, key: SigningKey = KEY, device: str = DEVICE
) -> VerifiedArtifact:
    """A real, verified full artifact of ``image`` (its signer is trusted for building only)."""
    data = build_full_artifact(
        image,
        name="sensor-fw",
        version=f"1.{sequence}.0",
        sequence=sequence,
        device_types=(device,),
        key=key,
        created_s=1_700_000_000,
    )
    return verify_artifact(data, TrustedKeys([key.public_key]))


OLD = signed(firmware_like(2990, 1), 3)  # 6 image pages
NEW = signed(firmware_like(3401, 2), 4)  # 7 image pages, ending in a partial word


@dataclass(frozen=True)
class Geometry:
    """Page and slot sizes of a simulated node."""

    page_bytes: int = PAGE
    slot_bytes: int = SLOT


DEFAULT_GEOMETRY = Geometry()


@contextmanager
def node(
    path: Path, faults: FlashFaults | None = None, geometry: Geometry = DEFAULT_GEOMETRY
) -> Iterator[tuple[Flash, Bootloader]]:
    """One power-on lifetime of the node stored in ``path``."""
    with Flash(
        path,
        Layout.flash_bytes_for(geometry.slot_bytes, geometry.page_bytes),
        page_bytes=geometry.page_bytes,
        timing=FlashTiming.off(),
        faults=FlashFaults() if faults is None else faults,
    ) as flash:
        yield (
            flash,
            Bootloader(flash, slot_bytes=geometry.slot_bytes, trusted=TRUSTED, device_type=DEVICE),
        )


@dataclass(frozen=True)
class Snapshot:
    """The flash file and its wear sidecar at one moment, to start many runs from."""

    flash: bytes
    wear: bytes

    @classmethod
    def take(cls, path: Path) -> Snapshot:
        return cls(path.read_bytes(), Path(f"{path}.wear").read_bytes())

    def restore(self, path: Path) -> None:
        path.write_bytes(self.flash)
        Path(f"{path}.wear").write_bytes(self.wear)


def receive(bootloader: Bootloader, artifact: VerifiedArtifact) -> tuple[int, bool]:
    """Receive ``artifact`` as the serial receiver does; (resume offset, finish result)."""
    image = artifact.payload
    offset = resumed = bootloader.begin_receive(artifact.signed_manifest, artifact.manifest)
    durable = offset
    while offset < len(image):
        data = image[offset : offset + CHUNK_BYTES]
        bootloader.write_image(offset, data)
        offset += len(data)
        boundary = (
            offset if offset == len(image) else offset - offset % bootloader.layout.page_bytes
        )
        if boundary > durable:
            bootloader.persist_progress(boundary)
            durable = boundary
    return resumed, bootloader.finish_receive()


def update(bootloader: Bootloader, artifact: VerifiedArtifact) -> int:
    """A full update cycle: receive, finish, request, reset (swap), confirm; the resume offset."""
    resumed, finished = receive(bootloader, artifact)
    assert finished
    bootloader.request_test_boot()
    outcome = bootloader.boot()
    assert (outcome.state, outcome.swapped) == (BootState.TESTING, True)
    bootloader.confirm()
    return resumed


def provisioned(path: Path, geometry: Geometry = DEFAULT_GEOMETRY) -> Snapshot:
    """A node with OLD provisioned and booted once."""
    with node(path, geometry=geometry) as (_, bootloader):
        bootloader.provision(OLD.signed_manifest, OLD.payload)
        assert bootloader.boot().state is BootState.CONFIRMED
    return Snapshot.take(path)


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of the flash file, as a bad gateway or bit rot would."""
    with path.open("r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x5A]))


def assert_journal_agrees(
    path: Path, bootloader: Bootloader, geometry: Geometry = DEFAULT_GEOMETRY
) -> None:
    """A node that starts afresh on the same flash reads the state this one holds."""
    with node(path, geometry=geometry) as (_, again):
        assert again.record == bootloader.record


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node.flash"


# -- geometry, records and the table --------------------------------------------


def test_layout_places_two_slots_a_scratch_page_and_two_journal_pages() -> None:
    assert Layout.flash_bytes_for(SLOT, PAGE) == 2 * SLOT + 3 * PAGE
    assert (LAYOUT.scratch_page, LAYOUT.journal_pages) == (16, (17, 18))
    assert (LAYOUT.image_at(Slot.PRIMARY), LAYOUT.header_at(Slot.SECONDARY)) == (PAGE, SLOT)
    assert LAYOUT.max_image_bytes == SLOT - PAGE
    assert RECORD_BYTES == 128


@pytest.mark.parametrize(("slot_bytes", "page_bytes"), [(PAGE, PAGE), (SLOT + 4, PAGE), (SLOT, 0)])
def test_a_slot_needs_a_header_page_and_an_image_page(slot_bytes: int, page_bytes: int) -> None:
    with pytest.raises(UsageError):
        Layout.flash_bytes_for(slot_bytes, page_bytes)


def test_a_flash_too_small_for_the_layout_is_our_bug(path: Path) -> None:
    with (
        Flash(path, 2 * SLOT, page_bytes=PAGE, timing=FlashTiming.off()) as flash,
        pytest.raises(UsageError, match="too small"),
    ):
        Bootloader(flash, slot_bytes=SLOT, trusted=TRUSTED, device_type=DEVICE)


def test_records_round_trip_with_the_state_stored_by_name() -> None:
    record = BootRecord(
        BootState.REVERTING,
        confirmed_sequence=2**64 - 1,
        swap=SwapProgress(5, SwapStep.TO_PRIMARY, 8),
        receive=ReceiveProgress(bytes(range(32)), 3 * PAGE),
        secondary_verified=True,
        last_reverted=True,
    )
    raw = encode_record(7, record)
    assert len(raw) == RECORD_BYTES
    assert raw[8:24] == b"reverting".ljust(16, b"\0")
    assert decode_record(raw) == (7, record)


def test_erased_and_torn_records_are_no_records() -> None:
    raw = encode_record(1, BootRecord(BootState.TESTING))
    assert decode_record(b"\xff" * RECORD_BYTES) is None
    torn = raw[: RECORD_BYTES // 2] + b"\xff" * (RECORD_BYTES // 2)
    assert decode_record(torn) is None


def test_a_record_with_a_good_crc_and_an_unknown_state_is_malformed() -> None:
    raw = bytearray(encode_record(1, BootRecord()))
    raw[8:24] = b"flying".ljust(16, b"\0")
    raw[-4:] = struct.pack("<I", zlib.crc32(raw[:-4]))
    with pytest.raises(MalformedError, match="unknown state"):
        decode_record(bytes(raw))


def test_an_illegal_pair_names_the_state_and_the_event() -> None:
    with pytest.raises(UsageError, match="event confirm is illegal in state swapping"):
        next_state(BootState.SWAPPING, BootEvent.CONFIRM)
    assert {state for state, _ in TRANSITIONS} == set(BootState)
    assert set(TRANSITIONS.values()) == set(BootState)


# -- the update cycle, without faults ------------------------------------------------


def test_a_fresh_flash_is_confirmed_with_nothing_to_run(path: Path) -> None:
    with node(path) as (flash, bootloader):
        outcome = bootloader.boot()
        assert (outcome.state, outcome.running, outcome.reverted, outcome.swapped) == (
            BootState.CONFIRMED,
            None,
            False,
            False,
        )
        assert (bootloader.confirmed_sequence, flash.ops_done) == (0, 0)
        assert bootloader.slot_info(Slot.PRIMARY) is None


def test_provisioning_writes_a_confirmed_image_once(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        running = bootloader.boot().running
        assert running is not None and running.valid
        assert (running.slot, running.version, running.sequence) == (Slot.PRIMARY, "1.3.0", 3)
        assert running.signed_manifest == OLD.signed_manifest
        assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload
        assert bootloader.confirmed_sequence == 3
        with pytest.raises(UsageError, match=r"already holds version 1\.3\.0"):
            bootloader.provision(NEW.signed_manifest, NEW.payload)


def test_provisioning_refuses_an_image_that_is_not_the_signed_one(path: Path) -> None:
    with node(path) as (_, bootloader), pytest.raises(DigestMismatch):
        bootloader.provision(OLD.signed_manifest, NEW.payload)


def test_a_confirmed_update_becomes_the_anti_rollback_floor(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        assert receive(bootloader, NEW) == (0, True)
        assert bootloader.receive_progress() is None  # finished, not unfinished
        bootloader.request_test_boot()
        assert bootloader.state is BootState.TEST_PENDING
        outcome = bootloader.boot()
        assert (outcome.state, outcome.swapped, outcome.reverted) == (
            BootState.TESTING,
            True,
            False,
        )
        assert outcome.running is not None and outcome.running.sequence == 4
        assert bootloader.image_bytes(Slot.PRIMARY) == NEW.payload
        assert bootloader.image_bytes(Slot.SECONDARY) == OLD.payload
        assert bootloader.confirmed_sequence == 3
        bootloader.confirm()
        assert (bootloader.state, bootloader.confirmed_sequence) == (BootState.CONFIRMED, 4)
        bootloader.confirm()  # a no-op once confirmed
        again = bootloader.boot()
        assert (again.state, again.swapped, again.reverted) == (BootState.CONFIRMED, False, False)
        assert_journal_agrees(path, bootloader)


def test_a_test_boot_that_is_not_confirmed_reverts_at_the_next_reset(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        assert bootloader.boot().state is BootState.TESTING
        outcome = bootloader.boot()  # the app never called confirm()
        assert (outcome.state, outcome.reverted, outcome.swapped) == (
            BootState.CONFIRMED,
            True,
            False,
        )
        assert outcome.running is not None and outcome.running.version == "1.3.0"
        assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload
        assert bootloader.image_bytes(Slot.SECONDARY) == NEW.payload
        assert (bootloader.last_reverted, bootloader.confirmed_sequence) == (True, 3)
        with pytest.raises(UsageError, match="without a verified image"):
            bootloader.request_test_boot()
        assert_journal_agrees(path, bootloader)


def test_the_first_image_of_an_empty_node_has_nothing_to_revert_to(path: Path) -> None:
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        assert bootloader.boot().state is BootState.TESTING
        outcome = bootloader.boot()
        assert (outcome.state, outcome.reverted) == (BootState.TESTING, False)
        assert outcome.running is not None and outcome.running.sequence == 4
        bootloader.confirm()
        assert bootloader.confirmed_sequence == 4


def test_a_byte_flipped_before_finish_fails_the_receive(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        bootloader.write_image(0, NEW.payload)
        flip_byte(path, LAYOUT.image_at(Slot.SECONDARY) + 1000)
        assert not bootloader.finish_receive()
        assert bootloader.receive_progress() is None
        with pytest.raises(UsageError, match="without a verified image"):
            bootloader.request_test_boot()


def test_a_byte_flipped_after_finish_makes_the_boot_refuse_the_swap(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        flip_byte(path, LAYOUT.image_at(Slot.SECONDARY) + len(NEW.payload) - 1)
        secondary = bootloader.slot_info(Slot.SECONDARY)
        assert secondary is not None and not secondary.valid
        outcome = bootloader.boot()
        assert (outcome.state, outcome.swapped) == (BootState.CONFIRMED, False)
        assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload
        assert not bootloader.record.secondary_verified


@pytest.mark.parametrize("sequence", [2, 3])
def test_an_image_not_newer_than_the_floor_is_refused_at_boot(path: Path, sequence: int) -> None:
    provisioned(path)
    older = signed(firmware_like(1500, 9), sequence)
    with node(path) as (_, bootloader):
        assert receive(bootloader, older) == (0, True)  # finish_receive checks the digest only
        bootloader.request_test_boot()
        outcome = bootloader.boot()
        assert (outcome.state, outcome.swapped) == (BootState.CONFIRMED, False)
        assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload


def test_an_image_for_another_device_type_is_refused_at_boot(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, signed(NEW.payload, 5, device="esp32-c3"))
        bootloader.request_test_boot()
        assert bootloader.boot().swapped is False
        assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload


def test_a_manifest_signed_by_an_unknown_key_is_refused_on_arrival(path: Path) -> None:
    stranger = signed(NEW.payload, 5, key=SigningKey.from_ed25519_seed(bytes(range(1, 33))))
    with node(path) as (_, bootloader), pytest.raises(UnknownKeyError):
        bootloader.begin_receive(stranger.signed_manifest, stranger.manifest)


def test_a_receive_resumes_from_its_durable_offset_in_the_next_lifetime(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        assert bootloader.begin_receive(NEW.signed_manifest, NEW.manifest) == 0
        bootloader.write_image(0, NEW.payload[: 3 * PAGE + 100])
        bootloader.persist_progress(3 * PAGE)
    with node(path) as (_, bootloader):
        assert bootloader.receive_progress() == (NEW.manifest.image_digest, 3 * PAGE)
        assert bootloader.boot().state is BootState.CONFIRMED  # a reset keeps the progress
        assert receive(bootloader, NEW) == (3 * PAGE, True)
        assert bootloader.image_bytes(Slot.SECONDARY) == NEW.payload
        # The same manifest once more: nothing left to send.
        assert bootloader.begin_receive(NEW.signed_manifest, NEW.manifest) == len(NEW.payload)
        assert bootloader.finish_receive()


def test_a_receive_whose_header_was_damaged_starts_over(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        bootloader.write_image(0, NEW.payload[:PAGE])
        bootloader.persist_progress(PAGE)
    flip_byte(path, LAYOUT.header_at(Slot.SECONDARY) + 1)  # the length field
    with node(path) as (_, bootloader):
        assert bootloader.slot_info(Slot.SECONDARY) is None
        assert receive(bootloader, NEW) == (0, True)


def test_another_image_restarts_the_receive(path: Path) -> None:
    provisioned(path)
    other = signed(firmware_like(2000, 7), 5)
    with node(path) as (_, bootloader):
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        bootloader.write_image(0, NEW.payload[:PAGE])
        bootloader.persist_progress(PAGE)
        assert receive(bootloader, other) == (0, True)
        assert bootloader.image_bytes(Slot.SECONDARY) == other.payload


def test_abort_forgets_the_receive_and_cancels_a_pending_test(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        bootloader.abort_receive()
        assert (bootloader.state, bootloader.receive_progress()) == (BootState.CONFIRMED, None)
        assert bootloader.boot().swapped is False


def test_nothing_may_touch_the_secondary_while_a_test_is_pending_or_running(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        with pytest.raises(UsageError, match="receive is illegal in state test_pending"):
            bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        bootloader.boot()
        with pytest.raises(UsageError, match="receive is illegal in state testing"):
            bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        with pytest.raises(UsageError, match="request_test is illegal in state testing"):
            bootloader.request_test_boot()
        with pytest.raises(UsageError, match="provision is illegal in state testing"):
            bootloader.provision(OLD.signed_manifest, OLD.payload)


def test_image_writes_stay_inside_the_image_in_whole_words_in_any_order(path: Path) -> None:
    with node(path) as (_, bootloader):
        with pytest.raises(UsageError, match="before begin_receive"):
            bootloader.write_image(0, b"abcd")
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        with pytest.raises(UsageError, match="outside"):
            bootloader.write_image(3400, b"ab")
        with pytest.raises(UsageError, match="whole 4-byte words"):
            bootloader.write_image(2, b"abcd")
        with pytest.raises(UsageError, match="whole 4-byte words"):
            bootloader.write_image(0, b"abc")
        # Selective repeat: a later chunk first, in a later page, then the ones before it.
        bootloader.write_image(PAGE + 8, NEW.payload[PAGE + 8 : 2 * PAGE])
        bootloader.write_image(0, NEW.payload[: PAGE + 8])
        with pytest.raises(UsageError, match="not a page boundary"):
            bootloader.persist_progress(100)
        with pytest.raises(UsageError, match="outside"):
            bootloader.persist_progress(3 * PAGE)
        bootloader.persist_progress(2 * PAGE)
        with pytest.raises(UsageError, match="outside"):
            bootloader.write_image(PAGE, NEW.payload[PAGE : PAGE + 4])  # below the durable offset
        bootloader.write_image(2 * PAGE, NEW.payload[2 * PAGE :])
        assert bootloader.finish_receive()
        assert bootloader.image_bytes(Slot.SECONDARY) == NEW.payload


def test_an_image_larger_than_a_slot_is_refused(path: Path) -> None:
    big = signed(firmware_like(SLOT, 3), 5)
    with node(path) as (_, bootloader), pytest.raises(LimitExceeded):
        bootloader.begin_receive(big.signed_manifest, big.manifest)


def test_provisioning_refuses_a_sequence_below_the_floor(path: Path) -> None:
    provisioned(path)
    flip_byte(path, LAYOUT.header_at(Slot.PRIMARY) + 40)  # the primary is lost
    with node(path) as (_, bootloader):
        assert bootloader.boot().running is None
        with pytest.raises(RollbackRefused):
            bootloader.provision(*_parts(signed(OLD.payload, 2)))
        bootloader.provision(OLD.signed_manifest, OLD.payload)
        assert bootloader.boot().running is not None


def _parts(artifact: VerifiedArtifact) -> tuple[bytes, bytes]:
    return artifact.signed_manifest, artifact.payload


# -- the journal ------------------------------------------------------------------


def _newest_record_offset(path: Path) -> int:
    data = path.read_bytes()
    best = (-1, -1)
    for page in LAYOUT.journal_pages:
        for at in range(page * PAGE, (page + 1) * PAGE, RECORD_BYTES):
            found = decode_record(data[at : at + RECORD_BYTES])
            if found is not None and found[0] > best[0]:
                best = (found[0], at)
    return best[1]


def test_a_torn_newest_record_leaves_the_previous_one_in_force(path: Path) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        assert bootloader.receive_progress() == (NEW.manifest.image_digest, 0)
    flip_byte(path, _newest_record_offset(path) + 40)
    with node(path) as (_, bootloader):
        assert (bootloader.receive_progress(), bootloader.confirmed_sequence) == (None, 3)
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)  # skips the torn slot
    with node(path) as (_, bootloader):
        assert bootloader.receive_progress() == (NEW.manifest.image_digest, 0)


def test_the_journal_moves_between_its_two_pages(path: Path) -> None:
    other = signed(firmware_like(1000, 5), 5)
    with node(path) as (flash, bootloader):
        for _ in range(10):
            bootloader.begin_receive(other.signed_manifest, other.manifest)
            bootloader.abort_receive()
        bootloader.begin_receive(NEW.signed_manifest, NEW.manifest)
        first, second = LAYOUT.journal_pages
        assert flash.page_erase_counts[first] >= 2 and flash.page_erase_counts[second] >= 2
        assert_journal_agrees(path, bootloader)


# -- power cuts ---------------------------------------------------------------------


def _recover_and_finish(path: Path, seen: Counter[str], geometry: Geometry) -> None:
    """After a cut: the node boots OLD or NEW, valid and byte-exact, then completes the update.

    A node found testing NEW is reset without confirming first, so every cut
    in the swap also checks the revert; then the update runs again from where
    the journal says, and must resume the receive at the durable offset.
    """
    with node(path, geometry=geometry) as (_, bootloader):
        seen[f"reopened {bootloader.state}"] += 1
        progress = bootloader.receive_progress()
        verified = bootloader.record.secondary_verified
        outcome = bootloader.boot()
        running = outcome.running
        assert running is not None and running.valid
        image = bootloader.image_bytes(Slot.PRIMARY)
        assert image in (OLD.payload, NEW.payload)
        assert running.image_digest == hashlib.sha256(image).digest()
        if outcome.state is BootState.TESTING:
            assert (image, bootloader.confirmed_sequence) == (NEW.payload, 3)
            outcome = bootloader.boot()  # the app did not confirm: this reset reverts
            assert (outcome.state, outcome.reverted, bootloader.last_reverted) == (
                BootState.CONFIRMED,
                True,
                True,
            )
            assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload
            seen["reverted after the cut"] += 1
            progress, verified = None, False
        assert outcome.state is BootState.CONFIRMED
        running = outcome.running
        assert running is not None and bootloader.confirmed_sequence == running.sequence
        assert_journal_agrees(path, bootloader, geometry)
        # The confirm record is the cycle's last operation, so no cut leaves NEW confirmed.
        assert running.sequence == OLD.manifest.sequence
        expected = len(NEW.payload) if verified else (0 if progress is None else progress[1])
        resumed = update(bootloader, NEW)
        assert resumed == expected
        seen["receive resumed mid-image" if 0 < resumed < len(NEW.payload) else "restarted"] += 1
        assert bootloader.image_bytes(Slot.PRIMARY) == NEW.payload
        assert (bootloader.state, bootloader.confirmed_sequence) == (BootState.CONFIRMED, 4)
        assert_journal_agrees(path, bootloader, geometry)


@pytest.mark.parametrize(
    ("page_bytes", "torn"),
    [(512, True), (512, False), (256, True)],
    ids=["512-torn", "512", "256-torn"],
)
def test_a_power_cut_at_every_operation_of_an_update_recovers(
    path: Path, page_bytes: int, torn: bool
) -> None:
    """Every flash operation of receive, finish, request, swap and confirm is cut once.

    Exhaustive, not sampled: with 512-byte pages the cycle is about 150
    operations and each run a few milliseconds. The 256-byte geometry holds
    two journal records per page, so the journal changes pages all the time.
    """
    geometry = Geometry(page_bytes, 8 * 512)
    start = provisioned(path, geometry)
    with node(path, geometry=geometry) as (flash, bootloader):
        update(bootloader, NEW)
        total_ops = flash.ops_done
    seen: Counter[str] = Counter()
    for cut_after in range(total_ops):
        start.restore(path)
        faults = FlashFaults(cut_after_ops=cut_after, torn_writes=torn)
        with node(path, faults, geometry) as (_, bootloader), pytest.raises(PowerCut):
            update(bootloader, NEW)
        _recover_and_finish(path, seen, geometry)
    assert total_ops > 100
    for reached in (
        "reopened confirmed",
        "reopened test_pending",
        "reopened swapping",
        "reopened testing",
        "receive resumed mid-image",
        "reverted after the cut",
    ):
        assert seen[reached], f"no cut reached {reached!r}: {dict(seen)}"


@pytest.mark.parametrize("torn", [True, False], ids=["torn", "clean"])
def test_a_power_cut_at_every_operation_of_a_revert_recovers(path: Path, torn: bool) -> None:
    provisioned(path)
    with node(path) as (_, bootloader):
        receive(bootloader, NEW)
        bootloader.request_test_boot()
        assert bootloader.boot().state is BootState.TESTING
    testing = Snapshot.take(path)
    with node(path) as (flash, bootloader):
        assert bootloader.boot().reverted
        total_ops = flash.ops_done
    for cut_after in range(total_ops):
        testing.restore(path)
        faults = FlashFaults(cut_after_ops=cut_after, torn_writes=torn)
        with node(path, faults) as (_, bootloader), pytest.raises(PowerCut):
            bootloader.boot()
        with node(path) as (_, bootloader):
            outcome = bootloader.boot()
            assert (outcome.state, outcome.reverted) == (BootState.CONFIRMED, True)
            assert outcome.running is not None and outcome.running.valid
            assert bootloader.image_bytes(Slot.PRIMARY) == OLD.payload
            assert bootloader.image_bytes(Slot.SECONDARY) == NEW.payload
            assert (bootloader.confirmed_sequence, bootloader.last_reverted) == (3, True)
            assert bootloader.boot().reverted is False
            assert_journal_agrees(path, bootloader)
    assert total_ops > 50


def test_a_power_cut_during_provisioning_leaves_an_empty_primary(path: Path) -> None:
    with node(path) as (flash, bootloader):
        bootloader.provision(OLD.signed_manifest, OLD.payload)
        total_ops = flash.ops_done
    for cut_after in range(total_ops):
        path.unlink()
        Path(f"{path}.wear").unlink()
        faults = FlashFaults(cut_after_ops=cut_after, torn_writes=True)
        with node(path, faults) as (_, bootloader), pytest.raises(PowerCut):
            bootloader.provision(OLD.signed_manifest, OLD.payload)
        with node(path) as (_, bootloader):
            assert bootloader.boot().running is None
            bootloader.provision(OLD.signed_manifest, OLD.payload)
            running = bootloader.boot().running
            assert running is not None and running.valid and bootloader.confirmed_sequence == 3


def _drive_to_new(bootloader: Bootloader) -> bool:
    """One lifetime of a node that wants NEW confirmed: boot, then do what is left."""
    outcome = bootloader.boot()
    if outcome.state is BootState.TESTING:
        bootloader.confirm()
    elif outcome.running is None or outcome.running.sequence != NEW.manifest.sequence:
        update(bootloader, NEW)
    return bootloader.confirmed_sequence == NEW.manifest.sequence


@pytest.mark.parametrize("seed", range(12))
def test_cuts_that_strike_the_recovery_too_still_recover(path: Path, seed: int) -> None:
    """Random cuts in every lifetime, recoveries included, until NEW is confirmed.

    After each cut a copy of the flash boots cleanly to check the invariant
    (a valid OLD or NEW, byte-exact) without disturbing the storm.
    """
    provisioned(path)
    check = path.with_name("check.flash")
    for lifetime in range(400):
        faults = FlashFaults(
            random_cut_probability=0.08, torn_writes=True, seed=seed * 1000 + lifetime
        )
        try:
            with node(path, faults) as (_, bootloader):
                if _drive_to_new(bootloader):
                    break
        except PowerCut:
            Snapshot.take(path).restore(check)
            with node(check) as (_, bootloader):
                running = bootloader.boot().running
                assert running is not None and running.valid
                assert bootloader.image_bytes(Slot.PRIMARY) in (OLD.payload, NEW.payload)
    else:
        pytest.fail("the update never completed")
    assert lifetime > 0  # the storm did strike
    with node(path) as (_, bootloader):
        assert bootloader.boot().state is BootState.CONFIRMED
        assert bootloader.image_bytes(Slot.PRIMARY) == NEW.payload


def test_provisioning_an_image_larger_than_the_slot_writes_nothing(path: Path) -> None:
    from otaproto.errors import LimitExceeded

    big = signed(firmware_like(LAYOUT.max_image_bytes + 4, 3), 1)
    with node(path) as (flash, bootloader):
        before = flash.total_write_ops
        with pytest.raises(LimitExceeded, match="image is"):
            bootloader.provision(big.signed_manifest, big.payload)
        assert flash.total_write_ops == before
