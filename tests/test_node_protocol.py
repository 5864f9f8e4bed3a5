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


# --- edge cases a review of the first version found ----------------------------


def info_body(
    msg_id: int,
    *,
    boot_state: str = "confirmed",
    primary: nl.SlotSummary | None = None,
    version: int = nl.PROTOCOL_VERSION,
    chunk: int = 1024,
) -> bytes:
    limits = nl.NodeLimits(2200, chunk, 4, 256 * 1024)
    return nl.info(
        msg_id, nl.Info(version, "nrf52840", limits, boot_state, primary, None, None, 0, 0, False)
    )


def reply_to_last(update: NodeUpdate, now: float, make: object) -> None:
    sent = [nl.decode(b) for b in update.poll(now)]
    assert sent, "the update sent nothing"
    update.receive(make(sent[-1].id), now)  # type: ignore[operator]


def test_the_verdict_wait_keeps_asking_through_testing_and_a_long_silent_swap(
    ed_key: SigningKey,
) -> None:
    art = artifact(ed_key)
    update = NodeUpdate(art.signed_manifest, art.manifest, art.payload, config=SenderConfig())
    update.start(0.0)
    reply_to_last(update, 0.0, lambda i: info_body(i))
    size = art.manifest.image_size
    reply_to_last(update, 0.1, lambda i: nl.encode(nl.MsgType.BEGIN_OK, i, size))
    reply_to_last(
        update, 0.2, lambda i: nl.encode(nl.MsgType.FINISH_OK, i, art.manifest.image_digest)
    )
    reply_to_last(update, 0.3, lambda i: nl.encode(nl.MsgType.TEST_BOOT_OK, i))
    assert update.state is UpdateState.REBOOTING
    new = nl.SlotSummary(art.manifest.version, 2, art.manifest.image_digest, size)
    reply_to_last(update, 0.4, lambda i: info_body(i, boot_state="testing", primary=new))
    assert update.state is UpdateState.REBOOTING
    assert update.poll(0.5) == []
    assert [nl.decode(b).type for b in update.poll(1.5)] == [nl.MsgType.HELLO]  # asks again
    for t in range(2, 120):  # silent for two minutes, longer than link_lost_s
        update.poll(float(t))
    assert update.state is UpdateState.REBOOTING
    reply_to_last(update, 120.5, lambda i: info_body(i, primary=new))
    assert update.done
    assert update.reason == f"node runs {art.manifest.version}, confirmed"


@pytest.mark.parametrize(
    ("info", "state", "reason"),
    [
        ({"version": 2}, UpdateState.REJECTED, "protocol version 2"),
        ({"chunk": 4096}, UpdateState.REJECTED, "4096-byte chunks"),
        ({"boot_state": "testing"}, UpdateState.FAILED, "busy"),
    ],
)
def test_hello_decisions(
    ed_key: SigningKey, info: dict[str, object], state: UpdateState, reason: str
) -> None:
    art = artifact(ed_key)
    update = NodeUpdate(art.signed_manifest, art.manifest, art.payload, config=CONFIG)
    update.start(0.0)
    reply_to_last(update, 0.0, lambda i: info_body(i, **info))  # type: ignore[arg-type]
    assert update.state is state
    assert reason in update.reason


def test_busy_is_transient_not_a_rejection(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update = NodeUpdate(art.signed_manifest, art.manifest, art.payload, config=CONFIG)
    update.start(0.0)
    reply_to_last(update, 0.0, lambda i: info_body(i))
    reply_to_last(update, 0.1, lambda i: nl.error(i, nl.ErrorCode.BUSY, "boot state is testing"))
    assert update.state is UpdateState.FAILED
    assert "try again later" in update.reason


def test_request_ids_wrap_without_ever_using_zero(ed_key: SigningKey) -> None:
    art = artifact(ed_key)
    update = NodeUpdate(
        art.signed_manifest, art.manifest, art.payload, config=CONFIG, first_id=0xFFFF
    )
    update.start(0.0)
    assert nl.decode(update.poll(0.0)[0]).id == 0xFFFF
    update.receive(info_body(0xFFFF), 0.0)
    assert nl.decode(update.poll(0.0)[0]).id == 1


def node_receiver(ed_key: SigningKey) -> tuple[NodeReceiver, MemoryStore]:
    store = MemoryStore(LIMITS.max_image_bytes, PAGE)
    receiver = NodeReceiver(
        store,
        device_type="nrf52840",
        trusted=TrustedKeys([ed_key.public_key]),
        limits=LIMITS,
        page_bytes=PAGE,
    )
    return receiver, store


def only(reaction_replies: list[bytes]) -> nl.Message:
    assert len(reaction_replies) == 1
    return nl.decode(reaction_replies[0])


def test_node_repeats_its_ack_for_data_after_the_last_byte(ed_key: SigningKey) -> None:
    art = artifact(ed_key, size=2048)
    receiver, _ = node_receiver(ed_key)
    assert (
        only(receiver.handle(nl.begin(40, art.signed_manifest)).replies).type is nl.MsgType.BEGIN_OK
    )
    for offset in (0, 1024):
        receiver.handle(nl.data(40, offset, art.payload[offset : offset + 1024]))
    assert receiver.state is TransferState.COMPLETE
    again = only(receiver.handle(nl.data(40, 1024, art.payload[1024:])).replies)
    assert (again.type, again.fields) == (nl.MsgType.ACK, (2048, 0))


def test_node_refuses_test_boot_before_finish_without_touching_the_store(
    ed_key: SigningKey,
) -> None:
    art = artifact(ed_key, size=1024)
    receiver, store = node_receiver(ed_key)
    receiver.handle(nl.begin(3, art.signed_manifest))
    receiver.handle(nl.data(3, 0, art.payload))
    store.verified = True  # the store remembers an earlier verified receive
    msg = only(receiver.handle(nl.encode(nl.MsgType.TEST_BOOT, 4)).replies)
    assert (msg.type, msg.fields[0]) == (nl.MsgType.ERROR, nl.ErrorCode.BAD_STATE)
    assert store.boot_state == "confirmed"


def test_unknown_message_types_are_answered_with_the_request_id(ed_key: SigningKey) -> None:
    receiver, _ = node_receiver(ed_key)
    msg = only(receiver.handle(b"\x82\x18\x77\x19\x12\x34").replies)
    assert (msg.type, msg.id, msg.fields[0]) == (nl.MsgType.ERROR, 0x1234, nl.ErrorCode.MALFORMED)
    assert "unknown type 0x77" in msg.fields[1]


def test_non_deterministic_cbor_is_refused_as_a_c_decoder_would(ed_key: SigningKey) -> None:
    receiver, _ = node_receiver(ed_key)
    for body in (
        bytes.fromhex("8204c2421000"),  # STATUS with its id as a bignum
        bytes.fromhex("82180105"),  # HELLO with its type in a two-byte form
    ):
        msg = only(receiver.handle(body).replies)
        assert (msg.type, msg.fields[0]) == (nl.MsgType.ERROR, nl.ErrorCode.MALFORMED)
        assert "deterministic" in msg.fields[1]
