"""The serial protocol's sender and receiver wired together in memory, under faults."""

from __future__ import annotations

import pytest

from otaproto import nodelink as nl
from otaproto.artifact import VerifiedArtifact, build_full_artifact, verify_artifact
from otaproto.keys import SigningKey, TrustedKeys
from otaproto.node_receiver import NodeReceiver, TransferState
from otaproto.node_sender import NodeUpdate, SenderConfig, UpdateState
from shoal.synthetic import firmware_like
from tests.protocol_harness import Faults, MemoryStore, run_transfer

PAGE = 4096
LIMITS = nl.NodeLimits(
    max_frame_bytes=2200, chunk_bytes=1024, window_frames=4, max_image_bytes=256 * 1024
)
CONFIG = SenderConfig(test_boot=False, ack_timeout_s=0.2, request_timeout_s=0.2)


def artifact(
    key: SigningKey, size: int = 64 * 1024, seq: int = 2, device: str = "nrf52840"
) -> VerifiedArtifact:
    image = firmware_like(size, seed=size + seq)
    data = build_full_artifact(
        image,
        name="app",
        version=f"1.{seq}",
        sequence=seq,
        device_types=(device,),
        key=key,
        created_s=0,
    )
    return verify_artifact(data, TrustedKeys([key.public_key]))


def pair(
    key: SigningKey,
    art: VerifiedArtifact,
    store: MemoryStore | None = None,
    config: SenderConfig = CONFIG,
    first_id: int = 1,
) -> tuple[NodeUpdate, NodeReceiver, MemoryStore]:
    store = store or MemoryStore(LIMITS.max_image_bytes, PAGE)
    receiver = NodeReceiver(
        store,
        device_type="nrf52840",
        trusted=TrustedKeys([key.public_key]),
        limits=LIMITS,
        page_bytes=PAGE,
    )
    update = NodeUpdate(
        art.signed_manifest, art.manifest, art.payload, config=config, first_id=first_id
    )
    return update, receiver, store


def assert_delivered(store: MemoryStore, art: VerifiedArtifact) -> None:
    assert bytes(store.slot[: art.manifest.image_size]) == art.payload
    assert store.verified


def test_clean_link_delivers_and_verifies(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update, receiver, store = pair(ed_key, art)
    run = run_transfer(update, receiver)
    assert update.state is UpdateState.VERIFIED, update.reason
    assert receiver.state is TransferState.VERIFIED
    assert_delivered(store, art)
    assert update.resent_bytes == 0
    assert update.data_bytes_sent == art.manifest.image_size
    assert run.elapsed_s < 2


@pytest.mark.parametrize(
    ("name", "faults"),
    [
        ("loss", Faults(loss=0.05)),
        ("corruption", Faults(corrupt=0.08)),
        ("duplication", Faults(duplicate=0.2)),
        ("reordering", Faults(reorder=0.2)),
        ("everything", Faults(loss=0.03, corrupt=0.03, duplicate=0.05, reorder=0.05)),
    ],
)
@pytest.mark.parametrize("direction", ["down", "up", "both"])
def test_faults_never_corrupt_the_image(
    ed_key: SigningKey, name: str, faults: Faults, direction: str
) -> None:
    art = artifact(ed_key)
    for seed in range(3):
        update, receiver, store = pair(ed_key, art)
        run_transfer(
            update,
            receiver,
            seed=seed,
            down=faults if direction in ("down", "both") else None,
            up=faults if direction in ("up", "both") else None,
        )
        assert update.state is UpdateState.VERIFIED, f"{name}/{direction}/{seed}: {update.reason}"
        assert_delivered(store, art)


def test_selective_repeat_resends_only_what_was_lost(ed_key: SigningKey) -> None:
    art = artifact(ed_key, size=256 * 1024)
    update, receiver, store = pair(ed_key, art)
    run = run_transfer(update, receiver, down=Faults(loss=0.02), seed=7)
    assert update.state is UpdateState.VERIFIED
    assert_delivered(store, art)
    # ~2 % of 256 frames lost: the repeats stay close to that, not whole windows.
    assert update.resent_bytes <= 0.06 * art.manifest.image_size
    assert run.gw_to_node.sent_bytes < 1.1 * art.manifest.image_size


def test_a_stalled_link_is_probed_and_resumes_from_the_node_offset(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update, receiver, store = pair(ed_key, art)
    stall = Faults(stall_from_s=0.05, stall_for_s=3.0)
    run_transfer(update, receiver, down=stall, up=stall)
    assert update.state is UpdateState.VERIFIED, update.reason
    assert_delivered(store, art)
    assert update.resent_bytes <= LIMITS.window_frames * LIMITS.chunk_bytes


def test_a_link_dead_for_good_fails_with_link_lost(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update, receiver, _ = pair(ed_key, art, config=SenderConfig(test_boot=False, link_lost_s=2.0))
    dead = Faults(stall_from_s=0.02, stall_for_s=1e9)
    run_transfer(update, receiver, down=dead)
    assert update.state is UpdateState.FAILED
    assert "link lost" in update.reason


def test_a_restarted_gateway_resumes_from_the_durable_offset(ed_key: SigningKey) -> None:
    art = artifact(ed_key, size=128 * 1024)
    update, receiver, store = pair(ed_key, art)
    run_transfer(update, receiver, limit_s=0.03)  # the first gateway dies early
    assert not update.done
    durable = store.durable
    assert durable > 0
    fresh, receiver2, _ = pair(ed_key, art, store=store, first_id=500)
    run_transfer(fresh, receiver2)
    assert fresh.state is UpdateState.VERIFIED
    assert fresh.resumed_from == durable
    assert fresh.data_bytes_sent == art.manifest.image_size - durable
    assert_delivered(store, art)


def test_late_replies_are_never_taken_for_newer_requests(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update, _, _ = pair(ed_key, art)
    update.start(0.0)
    hello_id = nl.decode(update.poll(0.0)[0]).id
    # A stale INFO from an earlier gateway run, with another id, is dropped.
    update.receive(nl.encode(nl.MsgType.ERROR, hello_id + 7, 2, "old"), 0.1)
    assert update.state is UpdateState.HELLO
    assert update.stale_replies == 1


def test_node_rejections_end_the_update_as_rejected(
    ed_key: SigningKey, other_key: SigningKey
) -> None:
    evil = artifact(other_key)
    update, receiver, store = pair(ed_key, evil)
    run_transfer(update, receiver)
    assert update.state is UpdateState.REJECTED
    assert "signature" in update.reason
    assert store.writes == []
    old = artifact(ed_key, seq=1)
    store2 = MemoryStore(LIMITS.max_image_bytes, PAGE)
    store2.confirmed_sequence = 5
    update, receiver, _ = pair(ed_key, old, store=store2)
    run_transfer(update, receiver)
    assert update.state is UpdateState.REJECTED
    assert "rollback" in update.reason
    assert store2.writes == []


def test_wrong_device_type_is_refused_by_the_gateway_before_begin(ed_key: SigningKey) -> None:
    art = artifact(ed_key, device="esp32")
    update, receiver, store = pair(ed_key, art)
    run_transfer(update, receiver)
    assert update.state is UpdateState.REJECTED
    assert "node is a nrf52840" in update.reason
    assert store.manifest is None


def test_a_bad_write_is_caught_by_the_read_back_digest_and_sent_again(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update, receiver, store = pair(ed_key, art)
    original = store.write_image
    corrupted: list[int] = []

    def flaky_write(offset: int, data: bytes) -> None:
        if offset == 4096 and not corrupted:
            corrupted.append(offset)
            data = b"\x00" * len(data)
        original(offset, data)

    store.write_image = flaky_write  # type: ignore[method-assign]
    run_transfer(update, receiver)
    assert corrupted == [4096]
    assert update.state is UpdateState.VERIFIED, update.reason
    assert update.data_bytes_sent == 2 * art.manifest.image_size  # started over after DIGEST
    assert_delivered(store, art)
