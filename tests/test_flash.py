"""The simulated NOR flash: NOR rules, persistence across lifetimes, timing and power cuts."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from mcu_firmware_stub.flash import Flash, FlashFaults, FlashTiming, PowerCut
from otaproto.errors import InvalidInput, ShoalError, UsageError

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
SIZE = 16 * PAGE


def open_flash(
    path: Path,
    stalls: list[float] | None = None,
    timing: FlashTiming | None = None,
    faults: FlashFaults | None = None,
) -> Flash:
    """A 64 KiB flash whose stalls land in ``stalls`` (never a real sleep)."""
    recorder: list[float] = [] if stalls is None else stalls
    return Flash(
        path,
        SIZE,
        timing=FlashTiming() if timing is None else timing,
        faults=FlashFaults() if faults is None else faults,
        stall=recorder.append,
    )


def pattern(length: int, seed: int = 1) -> bytes:
    """Bytes with no 0xFF in them, so that programmed and erased bytes differ."""
    return bytes((seed + i) % 255 for i in range(length))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "node.flash"


def test_fresh_file_is_erased_and_of_the_right_size(image: Path) -> None:
    with open_flash(image) as flash:
        assert flash.read(0, SIZE) == b"\xff" * SIZE
        assert flash.is_erased(0, SIZE)
        assert (flash.page_count, flash.total_erases, flash.total_write_ops) == (16, 0, 0)
        assert flash.page_erase_counts == (0,) * 16
    assert image.read_bytes() == b"\xff" * SIZE
    assert image.with_name("node.flash.wear").is_file()


def test_write_reads_back_and_reaches_the_file_at_once(image: Path) -> None:
    data = pattern(1024)
    with open_flash(image) as flash:
        flash.write(0x1000, data)
        assert flash.read(0x1000, 1024) == data
        assert image.read_bytes()[0x1000:0x1400] == data  # no buffering between op and file
        assert not flash.is_erased(0x1000, 4)
        assert flash.is_erased(0x1400, SIZE - 0x1400)
        assert flash.page_of(0x13FF) == 1
        assert (flash.ops_done, flash.total_write_ops) == (1, 1)


def test_write_over_unerased_bytes_changes_nothing(image: Path) -> None:
    stalls: list[float] = []
    with open_flash(image, stalls) as flash:
        flash.write(0x2008, b"\x00\x11\x22\x33")
        before = image.read_bytes()
        with pytest.raises(UsageError, match=r"unerased byte 0x00 at 0x2008: erase page 2 first"):
            flash.write(0x2000, b"\x01" * 16)
        assert image.read_bytes() == before
        assert (flash.ops_done, flash.total_write_ops, len(stalls)) == (1, 1, 1)


def test_writing_0xff_over_programmed_bytes_is_refused_too(image: Path) -> None:
    with open_flash(image) as flash:
        flash.write(0, b"\xff\xff\x00\xff")
        with pytest.raises(UsageError, match="at 0x2: erase page 0 first"):
            flash.write(0, b"\xff" * 4)


@pytest.mark.parametrize(("offset", "length"), [(1, 4), (2, 8), (0, 3), (4, 6), (SIZE - 2, 2)])
def test_misaligned_write_is_refused(image: Path, offset: int, length: int) -> None:
    with open_flash(image) as flash:
        with pytest.raises(UsageError, match="4-byte words"):
            flash.write(offset, b"\x00" * length)
        assert flash.is_erased(0, SIZE)
        assert flash.ops_done == 0


def test_empty_write_is_refused(image: Path) -> None:
    with open_flash(image) as flash, pytest.raises(UsageError, match="no data"):
        flash.write(0, b"")


@pytest.mark.parametrize(("offset", "length"), [(-4, 4), (SIZE - 4, 8), (SIZE, 4), (0, -1)])
def test_out_of_range_access_is_our_bug(image: Path, offset: int, length: int) -> None:
    with open_flash(image) as flash:
        with pytest.raises(UsageError, match="outside the 65536-byte flash"):
            flash.read(offset, length)
        with pytest.raises(UsageError, match="outside the 65536-byte flash"):
            flash.is_erased(offset, length)
        if length > 0:
            with pytest.raises(UsageError, match="outside the 65536-byte flash"):
                flash.write(offset, b"\x00" * length)


@pytest.mark.parametrize("page", [-1, 16])
def test_erasing_a_page_outside_the_flash_is_our_bug(image: Path, page: int) -> None:
    with open_flash(image) as flash, pytest.raises(UsageError, match="outside the flash's 16"):
        flash.erase_page(page)


@pytest.mark.parametrize("offset", [-1, SIZE])
def test_page_of_outside_the_flash_is_our_bug(image: Path, offset: int) -> None:
    with open_flash(image) as flash, pytest.raises(UsageError, match="outside"):
        flash.page_of(offset)


def test_erase_resets_one_page_only(image: Path) -> None:
    with open_flash(image) as flash:
        flash.write(0, pattern(3 * PAGE))
        flash.erase_page(1)
        assert flash.read(0, PAGE) == pattern(3 * PAGE)[:PAGE]
        assert flash.is_erased(PAGE, PAGE)
        assert flash.read(2 * PAGE, PAGE) == pattern(3 * PAGE)[2 * PAGE :]
        flash.write(PAGE, pattern(PAGE, seed=9))  # writable again
        assert flash.read(PAGE, PAGE) == pattern(PAGE, seed=9)
        assert flash.page_erase_counts == (0, 1) + (0,) * 14


def test_data_and_counters_survive_close_and_reopen(image: Path) -> None:
    with open_flash(image) as flash:
        for _ in range(3):
            flash.erase_page(5)
        flash.erase_page(0)
        flash.write(0, pattern(64))
        flash.write(5 * PAGE, pattern(8))
    with open_flash(image) as flash:
        assert flash.ops_done == 0  # a new lifetime
        assert flash.read(0, 64) == pattern(64)
        assert flash.read(5 * PAGE, 8) == pattern(8)
        assert (flash.total_erases, flash.total_write_ops) == (4, 2)
        assert flash.page_erase_counts == (1, 0, 0, 0, 0, 3) + (0,) * 10
        flash.erase_page(5)
        flash.write(5 * PAGE, pattern(4))
    with open_flash(image) as flash:
        assert (flash.total_erases, flash.total_write_ops) == (5, 3)
        assert flash.page_erase_counts[5] == 4


def test_killed_process_leaves_every_completed_op_in_the_files(image: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mcu_firmware_stub.flash import Flash, FlashTiming
        flash = Flash(Path({str(image)!r}), {SIZE}, timing=FlashTiming.off())
        flash.erase_page(2)
        flash.write(8, bytes(range(16)))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL
    with open_flash(image) as flash:
        assert flash.read(8, 16) == bytes(range(16))
        assert (flash.total_erases, flash.total_write_ops) == (1, 1)
        assert flash.page_erase_counts[2] == 1


def test_existing_file_of_the_wrong_size_is_refused(image: Path) -> None:
    image.write_bytes(b"\xff" * (SIZE - 1))
    with pytest.raises(InvalidInput, match=r"is 65535 bytes, expected 65536"):
        open_flash(image)


def test_existing_image_without_wear_record_starts_with_zero_wear(image: Path) -> None:
    image.write_bytes(b"\x00" * SIZE)
    with open_flash(image) as flash:
        assert flash.read(0, 4) == b"\x00" * 4
        assert (flash.total_erases, flash.total_write_ops) == (0, 0)


def test_wear_record_for_another_geometry_is_refused(image: Path) -> None:
    open_flash(image).close()
    image.write_bytes(b"\xff" * 2 * SIZE)
    with pytest.raises(InvalidInput, match="is for 16 pages of 4096 bytes, not 32 of 4096"):
        Flash(image, 2 * SIZE)


@pytest.mark.parametrize("garbage", [b"", b"x" * 10, b"NOTWEAR!" + bytes(200)])
def test_corrupt_wear_record_is_refused(image: Path, garbage: bytes) -> None:
    open_flash(image).close()
    image.with_name("node.flash.wear").write_bytes(garbage)
    with pytest.raises(InvalidInput, match="wear record"):
        open_flash(image)


def test_truncated_wear_record_is_refused(image: Path) -> None:
    open_flash(image).close()
    wear = image.with_name("node.flash.wear")
    wear.write_bytes(wear.read_bytes()[:-8])
    with pytest.raises(InvalidInput, match=r"is \d+ bytes, expected \d+"):
        open_flash(image)


@pytest.mark.parametrize(
    ("size", "page", "word"), [(0, 4096, 4), (SIZE, 0, 4), (SIZE, 4096, 0), (SIZE, 4094, 4),
                               (SIZE + 4, 4096, 4)]
)  # fmt: skip
def test_geometry_that_cannot_work_is_our_bug(image: Path, size: int, page: int, word: int) -> None:
    with pytest.raises(UsageError):
        Flash(image, size, page, word)
    assert not image.exists()


def test_stall_models_nrf52840_erase_and_write_times(image: Path) -> None:
    stalls: list[float] = []
    with open_flash(image, stalls) as flash:
        flash.erase_page(0)
        flash.write(0, pattern(1024))
        flash.write(1024, pattern(4))
        assert stalls == [pytest.approx(0.085), pytest.approx(256 * 41e-6), pytest.approx(41e-6)]
        assert flash.busy_s == pytest.approx(0.085 + 257 * 41e-6)


def test_erase_slowdown_multiplies_the_erase_time(image: Path) -> None:
    stalls: list[float] = []
    faults = FlashFaults(erase_slowdown=3.0)
    with open_flash(image, stalls, faults=faults) as flash:
        flash.erase_page(0)
        flash.write(0, pattern(8))
    assert stalls == [pytest.approx(0.255), pytest.approx(2 * 41e-6)]


def test_timing_off_never_stalls_but_still_models_time(image: Path) -> None:
    stalls: list[float] = []
    with open_flash(image, stalls, timing=FlashTiming.off()) as flash:
        flash.erase_page(0)
        flash.write(0, pattern(4096))
        assert stalls == []
        assert flash.busy_s == pytest.approx(0.085 + 1024 * 41e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlashTiming(page_erase_s=-1.0),
        lambda: FlashTiming(word_write_s=math.nan),
        lambda: FlashFaults(cut_after_ops=-1),
        lambda: FlashFaults(random_cut_probability=1.5),
        lambda: FlashFaults(erase_slowdown=-0.5),
    ],
)
def test_impossible_timing_or_faults_are_our_bug(make: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        make()


def test_cut_after_three_ops_keeps_exactly_three(image: Path) -> None:
    stalls: list[float] = []
    with open_flash(image, stalls, faults=FlashFaults(cut_after_ops=3)) as flash:
        flash.write(0, pattern(8))
        flash.erase_page(3)
        flash.write(PAGE, pattern(8, seed=2))
        with pytest.raises(PowerCut, match=r"write of 8 bytes at 0x2000 \(after 3 operations"):
            flash.write(2 * PAGE, pattern(8, seed=3))
        for call in (
            lambda: flash.write(3 * PAGE, pattern(4)),
            lambda: flash.erase_page(0),
            lambda: flash.read(0, 4),
            lambda: flash.is_erased(0, 4),
        ):
            with pytest.raises(PowerCut, match="power is off"):
                call()
        assert (flash.ops_done, len(stalls), flash.powered_off) == (3, 3, True)
    with open_flash(image) as flash:
        assert flash.read(0, 8) == pattern(8)
        assert flash.read(PAGE, 8) == pattern(8, seed=2)
        assert flash.is_erased(2 * PAGE, PAGE)
        assert (flash.total_write_ops, flash.total_erases) == (2, 1)
        assert flash.page_erase_counts[3] == 1


def test_cut_after_zero_ops_stops_the_first_one(image: Path) -> None:
    with open_flash(image, faults=FlashFaults(cut_after_ops=0)) as flash:
        with pytest.raises(PowerCut):
            flash.erase_page(0)
        assert flash.ops_done == 0


def test_power_cut_is_not_a_shoal_error() -> None:
    assert not issubclass(PowerCut, ShoalError)


def test_misuse_is_reported_before_the_power_cut_and_spends_no_op(image: Path) -> None:
    with open_flash(image, faults=FlashFaults(cut_after_ops=1)) as flash:
        with pytest.raises(UsageError):
            flash.write(1, b"\x00" * 4)
        flash.write(0, pattern(4))  # still the first op
        with pytest.raises(PowerCut):
            flash.write(4, pattern(4))


def test_torn_write_programs_the_first_half_of_the_words(image: Path) -> None:
    faults = FlashFaults(cut_after_ops=0, torn_writes=True)
    with open_flash(image, faults=faults) as flash, pytest.raises(PowerCut):
        flash.write(0x100, pattern(40))  # 10 words: 5 land
    with open_flash(image) as flash:
        assert flash.read(0x100, 20) == pattern(40)[:20]
        assert flash.is_erased(0x114, SIZE - 0x114)
        assert flash.is_erased(0, 0x100)
        assert flash.total_write_ops == 0  # not a completed op


def test_torn_write_of_one_word_programs_nothing(image: Path) -> None:
    faults = FlashFaults(cut_after_ops=0, torn_writes=True)
    with open_flash(image, faults=faults) as flash, pytest.raises(PowerCut):
        flash.write(0, pattern(4))
    assert image.read_bytes() == b"\xff" * SIZE


def test_torn_erase_clears_the_first_half_of_the_page(image: Path) -> None:
    with open_flash(image) as flash:
        flash.write(0, pattern(3 * PAGE))
    faults = FlashFaults(cut_after_ops=0, torn_writes=True)
    with open_flash(image, faults=faults) as flash, pytest.raises(PowerCut):
        flash.erase_page(1)
    with open_flash(image) as flash:
        data = pattern(3 * PAGE)
        assert flash.read(0, PAGE) == data[:PAGE]
        assert flash.is_erased(PAGE, PAGE // 2)
        assert flash.read(PAGE + PAGE // 2, PAGE // 2) == data[PAGE + PAGE // 2 : 2 * PAGE]
        assert flash.read(2 * PAGE, PAGE) == data[2 * PAGE :]
        assert flash.total_erases == 0


def test_cut_without_torn_writes_leaves_the_op_undone(image: Path) -> None:
    with open_flash(image) as flash:
        flash.write(0, pattern(PAGE))
    with open_flash(image, faults=FlashFaults(cut_after_ops=0)) as flash, pytest.raises(PowerCut):
        flash.erase_page(0)
    assert image.read_bytes()[:PAGE] == pattern(PAGE)


def cut_point(directory: Path, seed: int, probability: float = 0.1) -> int | None:
    """How many ops of a fixed workload complete before a seeded random cut."""
    faults = FlashFaults(random_cut_probability=probability, seed=seed)
    with open_flash(directory / f"seed{seed}.flash", faults=faults) as flash:
        try:
            for page in range(16):
                flash.erase_page(page)
                for chunk in range(4):
                    flash.write(page * PAGE + chunk * 1024, pattern(1024, seed=chunk))
        except PowerCut:
            return flash.ops_done
    return None


def test_random_cuts_replay_with_the_same_seed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = [cut_point(tmp_path / "a", seed) for seed in range(8)]
    second = [cut_point(tmp_path / "b", seed) for seed in range(8)]
    assert first == second
    assert len(set(first)) > 1  # the seed matters
    assert all(point is not None for point in first)  # 80 ops at p=0.1: a cut is all but sure


def test_random_cut_probability_bounds(tmp_path: Path) -> None:
    assert cut_point(tmp_path, seed=0, probability=1.0) == 0
    assert cut_point(tmp_path, seed=1, probability=0.0) is None


def test_closed_flash_refuses_operations(image: Path) -> None:
    flash = open_flash(image)
    flash.close()
    flash.close()  # idempotent
    assert flash.closed
    with pytest.raises(UsageError, match="is closed"):
        flash.read(0, 4)
    with pytest.raises(UsageError, match="is closed"):
        flash.erase_page(0)
