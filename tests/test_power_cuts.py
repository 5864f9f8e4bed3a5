"""Power cuts at every flash operation of a full update, through the real node stack.

The node here is the real SimulatedNode (flash file, bootloader, receiver)
driven by the real gateway sender over the in-memory framed channel, so that
each of the many cut points costs milliseconds; the same stack runs over ptys
in test_serial_integration.py. After each cut: a new node process-lifetime on
the same flash file boots a valid signed image, the old or the new, and a
fresh gateway finishes the update.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mcu_firmware_stub.bootloader import Slot
from mcu_firmware_stub.flash import FlashFaults, PowerCut
from mcu_firmware_stub.node import SimulatedNode
from otaproto.framing import Frame, FrameDecoder, encode_frame
from otaproto.node_sender import NodeUpdate, SenderConfig, UpdateState
from tests.node_fixtures import Images, images, node_config

IMAGE_BYTES = 12 * 1024
CONFIG = SenderConfig(request_timeout_s=0.05, ack_timeout_s=0.05, link_lost_s=5.0)


def drive(node: SimulatedNode, update: NodeUpdate, limit_s: float = 30.0) -> None:
    """Run the update against the node on a perfect in-memory line with a fake clock."""
    decoder = FrameDecoder(4096)
    now = 0.0
    update.start(now)
    while not update.done and now < limit_s:
        for body in update.poll(now):
            for reply in node.handle_bytes(encode_frame(body, 4096)):
                for event in decoder.feed(reply):
                    if isinstance(event, Frame):
                        update.receive(event.body, now)
        now += 0.01


def fresh_update(imgs: Images) -> NodeUpdate:
    new = imgs.new
    return NodeUpdate(new.signed_manifest, new.manifest, new.payload, config=CONFIG)


def count_flash_ops(tmp: Path, imgs: Images) -> int:
    node = SimulatedNode(node_config(tmp / "count"), initial=imgs.old)
    before = node.flash.ops_done
    update = fresh_update(imgs)
    drive(node, update)
    assert update.state is UpdateState.SUCCEEDED, update.reason
    ops = node.flash.ops_done - before
    node.close()
    return ops


def test_power_cut_at_every_flash_operation_of_a_full_update(tmp_path: Path) -> None:
    imgs = images(IMAGE_BYTES)
    total = count_flash_ops(tmp_path, imgs)
    assert total > 30
    outcomes: dict[str, int] = {}
    for k in range(total):
        state = tmp_path / f"cut{k}"
        provision = SimulatedNode(node_config(state), initial=imgs.old)
        provision.close()
        node = SimulatedNode(
            node_config(state, faults=FlashFaults(cut_after_ops=k, torn_writes=True))
        )
        try:
            drive(node, fresh_update(imgs))
            raise AssertionError(f"no power cut after {k} of {total} operations")
        except PowerCut:
            pass
        finally:
            node.close()
        # Power back on: the node boots a valid signed image, the old or the new one.
        node = SimulatedNode(node_config(state))
        running = node.running
        assert running is not None, f"cut {k}: nothing valid to boot"
        image = node.bootloader.image_bytes(Slot.PRIMARY)
        assert image in (imgs.old.payload, imgs.new.payload), f"cut {k}: a mixed image"
        outcomes[running.version] = outcomes.get(running.version, 0) + 1
        # A fresh gateway finishes the job.
        update = fresh_update(imgs)
        drive(node, update)
        assert update.state in (UpdateState.SUCCEEDED, UpdateState.ALREADY_INSTALLED), (
            f"cut {k}: {update.state} {update.reason}"
        )
        assert node.bootloader.image_bytes(Slot.PRIMARY) == imgs.new.payload
        node.close()
    assert outcomes.get("1.0.0", 0) > 0 and outcomes.get("2.0.0", 0) > 0, outcomes


def test_a_power_cut_mid_transfer_resumes_at_the_last_durable_page(tmp_path: Path) -> None:
    imgs = images(32 * 1024)
    state = tmp_path / "node"
    SimulatedNode(node_config(state), initial=imgs.old).close()
    # Erase + write of the header, then data pages: cut well into the transfer.
    node = SimulatedNode(node_config(state, faults=FlashFaults(cut_after_ops=20)))
    with pytest.raises(PowerCut):
        drive(node, fresh_update(imgs))
    node.close()
    node = SimulatedNode(node_config(state))
    progress = node.bootloader.receive_progress()
    assert progress is not None and progress[1] > 0
    update = fresh_update(imgs)
    drive(node, update)
    assert update.state is UpdateState.SUCCEEDED
    assert update.resumed_from == progress[1]
    assert update.data_bytes_sent == imgs.new.manifest.image_size - progress[1]
    node.close()
