"""The SMP-mode simulated node, driven by the third-party ``smpclient`` over real ptys.

smpclient (PyPI) is what people flash Zephyr devices with; here it uploads
imgtool-signed images into the node, test-boots, confirms and reverts them.
The protocol details that smpclient never exercises (wrong offsets, refusals,
v1 errors, erase, power cuts) are driven in-process with otaproto.smp.
No sleeps: every wait is an SMP request with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import smp.image_management as smp_image
from hypothesis import given, settings
from hypothesis import strategies as st
from smpclient import SMPClient
from smpclient.generics import error, success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead, ResetWrite
from smpclient.transport.serial import SMPSerialRawTransport, SMPSerialTransport

from mcu_firmware_stub.bootloader import BootState
from mcu_firmware_stub.flash import FlashFaults, FlashTiming, PowerCut
from mcu_firmware_stub.smp_node import Framing, SmpNode, SmpNodeConfig, SmpNodeThread
from otaio.serial_link import PtyLink
from otaproto import mcuboot
from otaproto import smp as codec
from otaproto.errors import UnknownKeyError
from shoal.synthetic import evolve, firmware_like
from tests.node_fixtures import process, shoal
from tests.test_mcuboot import ImgtoolKeys, sign

SLOT_BYTES = 64 * 1024
PAGE_BYTES = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class Images:
    """imgtool image files (bytes) for the tests."""

    old: bytes  # 1.0.0, trusted key
    new: bytes  # 2.0.0, trusted key
    untrusted: bytes  # 2.0.0, a key the node does not trust
    hash_only: bytes  # 2.1.0, no signature
    ecdsa: bytes  # 3.0.0, the trusted ECDSA key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ImgtoolKeys:
    return ImgtoolKeys(tmp_path_factory.mktemp("smp-keys"))


@pytest.fixture(scope="module")
def images(keys: ImgtoolKeys, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("smp-images")
    old = firmware_like(30_000, seed=21)
    new = evolve(old, seed=22, insert_bytes=512)
    trusted_ed, trusted_ec = keys.path("trusted"), keys.path("trusted-ec", "ecdsa-p256")
    return Images(
        old=sign(work, old, "1.0.0", trusted_ed),
        new=sign(work, new, "2.0.0", trusted_ed),
        untrusted=sign(work, new, "2.0.0", keys.path("stranger")),
        hash_only=sign(work, new, "2.1.0", None),
        ecdsa=sign(work, new, "3.0.0", trusted_ec),
    )


@pytest.fixture(scope="module")
def trust(keys: ImgtoolKeys) -> mcuboot.ImageTrust:
    return mcuboot.ImageTrust((keys.trusted("trusted"), keys.trusted("trusted-ec", "ecdsa-p256")))


def node_config(state: Path, trust: mcuboot.ImageTrust, **overrides: Any) -> SmpNodeConfig:
    config = SmpNodeConfig(
        state_dir=state,
        trust=trust,
        slot_bytes=SLOT_BYTES,
        page_bytes=PAGE_BYTES,
        timing=FlashTiming.off(),
    )
    return replace(config, **overrides)


def image_hash(image: bytes) -> bytes:
    return mcuboot.parse_image(image).hash


@contextlib.contextmanager
def node_on_pty(config: SmpNodeConfig, initial: bytes | None) -> Iterator[tuple[SmpNode, str]]:
    """A node served from a thread on a new pty; yields it and the client's path."""
    link = PtyLink()
    thread = SmpNodeThread(SmpNode(config, initial_image=initial), link)
    try:
        yield thread.node, link.path
    finally:
        thread.stop()
        assert thread.error is None, thread.error


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await coroutine

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def client_on(path: str, *, raw: bool = False) -> AsyncIterator[SMPClient]:
    transport = SMPSerialRawTransport(mtu=2048) if raw else SMPSerialTransport()
    client = SMPClient(transport, path, timeout_s=10.0)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def image_states(client: SMPClient) -> dict[int, smp_image.ImageState]:
    reply = await client.request(ImageStatesRead())
    assert success(reply), reply
    return {state.slot: state for state in reply.images}


async def upload(client: SMPClient, image: bytes) -> list[int]:
    return [offset async for offset in client.upload(image)]


async def write_state(client: SMPClient, image: bytes | None, *, confirm: bool) -> Any:
    return await client.request(
        ImageStatesWrite(hash=None if image is None else image_hash(image), confirm=confirm)
    )


async def reset(client: SMPClient) -> None:
    assert success(await client.request(ResetWrite()))


# -- smpclient over a pty -------------------------------------------------------------------


def test_upload_test_boot_then_confirm(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def session(path: str) -> None:
        async with client_on(path) as client:
            params = await client.request(MCUMgrParametersRead())
            assert success(params) and params.buf_size == 2048
            echo = await client.request(EchoWrite(d="hello node"))
            assert success(echo) and echo.r == "hello node"
            before = await image_states(client)
            assert before[0].active and before[0].confirmed and before[0].version == "1.0.0"
            assert 1 not in before
            offsets = await upload(client, images.new)
            assert offsets[-1] == len(images.new)
            uploaded = await image_states(client)
            assert uploaded[1].hash == image_hash(images.new) and not uploaded[1].pending
            tested = await write_state(client, images.new, confirm=False)
            assert success(tested)
            assert {s.slot: bool(s.pending) for s in tested.images} == {0: False, 1: True}
            await reset(client)
            running = await image_states(client)
            assert running[0].version == "2.0.0" and running[0].active
            assert not running[0].confirmed
            assert (
                running[1].version == "1.0.0" and running[1].confirmed
            )  # what a reset brings back
            assert success(await write_state(client, None, confirm=True))
            confirmed = await image_states(client)
            assert confirmed[0].confirmed and confirmed[0].active and not confirmed[1].confirmed
            await reset(client)
            assert (await image_states(client))[0].version == "2.0.0"

    with node_on_pty(node_config(tmp_path, trust), images.old) as (node, path):
        run(session(path))
    assert node.bootloader.state is BootState.CONFIRMED
    assert node.running is not None and str(node.running.version) == "2.0.0"


def test_a_reset_without_confirm_reverts(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def session(path: str) -> None:
        async with client_on(path) as client:
            await upload(client, images.ecdsa)
            assert success(await write_state(client, images.ecdsa, confirm=False))
            await reset(client)
            assert (await image_states(client))[0].version == "3.0.0"
            await reset(client)
            after = await image_states(client)
            assert after[0].version == "1.0.0" and after[0].active and after[0].confirmed
            assert after[1].version == "3.0.0" and not after[1].pending

    with node_on_pty(node_config(tmp_path, trust), images.old) as (node, path):
        run(session(path))
    assert node.bootloader.last_reverted


def test_untrusted_and_unsigned_images_are_refused(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def session(path: str) -> None:
        async with client_on(path) as client:
            for image in (images.untrusted, images.hash_only):
                await upload(client, image)
                refused = await write_state(client, image, confirm=False)
                assert error(refused) and int(refused.rc) == codec.MgmtErr.EACCESSDENIED
                await reset(client)
                states = await image_states(client)
                assert states[0].version == "1.0.0" and states[0].active
                assert not states[1].pending

    with node_on_pty(node_config(tmp_path, trust), images.old) as (node, path):
        run(session(path))
    assert node.bootloader.state is BootState.CONFIRMED


def test_hash_only_images_boot_when_the_node_accepts_them(
    tmp_path: Path, images: Images, keys: ImgtoolKeys
) -> None:
    lenient = mcuboot.ImageTrust((keys.trusted("trusted"),), accept_hash_only=True)

    async def session(path: str) -> None:
        async with client_on(path) as client:
            await upload(client, images.hash_only)
            assert success(await write_state(client, images.hash_only, confirm=False))
            await reset(client)
            assert (await image_states(client))[0].version == "2.1.0"
            assert success(await write_state(client, None, confirm=True))
            await upload(client, images.untrusted)  # a signature by a stranger: still refused
            refused = await write_state(client, images.untrusted, confirm=False)
            assert error(refused)

    with node_on_pty(node_config(tmp_path, lenient), images.old) as (_, path):
        run(session(path))


def test_an_interrupted_upload_resumes_from_the_nodes_offset(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def interrupted(path: str) -> int:
        async with client_on(path) as client:
            uploads = cast(AsyncGenerator[int, None], client.upload(images.new))
            async with contextlib.aclosing(uploads):
                async for offset in uploads:
                    if offset > len(images.new) // 3:
                        return offset
        raise AssertionError("the upload finished before it was interrupted")

    async def resumed(path: str) -> list[int]:
        async with client_on(path) as client:
            offsets = await upload(client, images.new)
            assert success(await write_state(client, images.new, confirm=False))
            return offsets

    with node_on_pty(node_config(tmp_path, trust), images.old) as (node, path):
        stopped_at = run(interrupted(path))
        offsets = run(resumed(path))
        assert offsets[0] == stopped_at  # smpclient restarted at 0; the node said where it was
        assert offsets[-1] == len(images.new)
    assert node.bootloader.state is BootState.TEST_PENDING


def test_an_upload_resumes_after_the_node_restarts(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def interrupted(path: str) -> int:
        async with client_on(path) as client:
            uploads = cast(AsyncGenerator[int, None], client.upload(images.new))
            async with contextlib.aclosing(uploads):
                async for offset in uploads:
                    if offset > len(images.new) // 2:
                        return offset
        raise AssertionError("the upload finished before it was interrupted")

    async def resumed(path: str) -> list[int]:
        async with client_on(path) as client:
            offsets = await upload(client, images.new)
            assert success(await write_state(client, images.new, confirm=False))
            await reset(client)
            assert (await image_states(client))[0].version == "2.0.0"
            return offsets

    config = node_config(tmp_path, trust)
    with node_on_pty(config, images.old) as (_, path):
        stopped_at = run(interrupted(path))
    with node_on_pty(config, None) as (_, path):  # a new process on the same flash
        offsets = run(resumed(path))
    assert offsets[0] == stopped_at // PAGE_BYTES * PAGE_BYTES > 0


def test_raw_framing_with_smpclients_raw_transport(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    async def session(path: str) -> None:
        async with client_on(path, raw=True) as client:
            echo = await client.request(EchoWrite(d="raw"))
            assert success(echo) and echo.r == "raw"
            assert (await image_states(client))[0].version == "1.0.0"

    config = node_config(tmp_path, trust, framing=Framing.RAW)
    with node_on_pty(config, images.old) as (_, path):
        run(session(path))


def test_mcu_sim_protocol_smp_serves_smpclient(
    tmp_path: Path, images: Images, keys: ImgtoolKeys
) -> None:
    initial = tmp_path / "initial.bin"
    initial.write_bytes(images.old)
    public = keys.folder / "trusted.pub.pem"
    keys.trusted("trusted")  # writes the public PEM

    async def session(path: str) -> None:
        async with client_on(path) as client:
            echo = await client.request(EchoWrite(d="cli"))
            assert success(echo) and echo.r == "cli"
            states = await image_states(client)
            assert states[0].version == "1.0.0" and states[0].active

    argv = shoal(
        "mcu-sim", "--protocol", "smp", "--pty", "--state-dir", str(tmp_path / "node"),
        "--trust-key", str(public), "--initial-image", str(initial), "--no-flash-timing",
        "--slot-kib", "64",
    )  # fmt: skip
    with process(argv) as proc:
        assert proc.stdout is not None
        path = proc.stdout.readline().decode().strip()
        assert path.startswith("/dev/"), "mcu-sim did not come up"
        run(session(path))


# -- the protocol in-process ----------------------------------------------------------------------


class Driver:
    """An SMP client built from otaproto.smp, feeding a node's handle_bytes directly."""

    def __init__(self, node: SmpNode, version: codec.Version = codec.Version.V2) -> None:
        self.node = node
        self.matcher = codec.RequestMatcher(version=version)
        self.decoder = codec.ConsoleDecoder()
        self.decoder.feed(node.pending_output())

    def request(self, request: codec.Request) -> codec.Packet:
        wire = codec.encode_console(self.matcher.send(request))
        packets = [p for out in self.node.handle_bytes(wire) for p in self.decoder.feed(out)]
        assert len(packets) == 1, packets
        reply = self.matcher.match(packets[0])
        assert reply is not None
        return reply

    def payload(self, request: codec.Request) -> codec.Payload:
        return codec.check_reply(self.request(request), request.describe())

    def error(self, request: codec.Request) -> codec.ErrorInfo:
        found = codec.reply_error(self.request(request).payload)
        assert found is not None
        return found

    def upload(
        self, image: bytes, chunk_bytes: int = 1500, *, sha: bool = True
    ) -> codec.UploadProgress:
        offset = 0
        while True:
            first = offset == 0
            request = codec.upload_request(
                offset,
                image[offset : offset + chunk_bytes],
                image_len=len(image) if first else None,
                sha=hashlib.sha256(image).digest() if first and sha else None,
            )
            progress = codec.parse_upload_reply(self.payload(request))
            if progress.offset == len(image):
                return progress
            offset = progress.offset

    def states(self) -> codec.ImageStates:
        return codec.parse_image_states(self.payload(codec.image_state_read()))


@pytest.fixture
def driver(tmp_path: Path, images: Images, trust: mcuboot.ImageTrust) -> Iterator[Driver]:
    node = SmpNode(node_config(tmp_path, trust), initial_image=images.old)
    try:
        yield Driver(node)
    finally:
        node.close()


def test_the_node_prints_a_boot_log_line_that_clients_skip(driver: Driver) -> None:
    assert b"<inf> shoal_sim: boot: confirmed, running 1.0.0" in driver.decoder.take_text()
    driver.payload(codec.reset_request())
    assert b"<inf> shoal_sim: boot:" in driver.decoder.take_text()
    assert codec.parse_echo_reply(driver.payload(codec.echo_request("still here"))) == "still here"


def test_wrong_offsets_are_answered_with_the_expected_one(driver: Driver, images: Images) -> None:
    image = images.new
    assert codec.parse_upload_reply(driver.payload(codec.upload_request(500, b"x" * 8))).offset == 0
    first = codec.upload_request(
        0, image[:1000], image_len=len(image), sha=hashlib.sha256(image).digest()
    )
    assert codec.parse_upload_reply(driver.payload(first)).offset == 1000
    for wrong in (0 + 999, 1001, 5000):
        reply = driver.payload(codec.upload_request(wrong, image[wrong : wrong + 10]))
        assert codec.parse_upload_reply(reply).offset == 1000
    again = driver.payload(first)  # the same start again: the node says where it is
    assert codec.parse_upload_reply(again).offset == 1000
    done = driver.upload(image)
    assert done == codec.UploadProgress(len(image), True)


def test_upload_refusals(driver: Driver, images: Images) -> None:
    image = images.new
    no_len = codec.Request(
        codec.Op.WRITE, codec.Group.IMAGE, codec.ImageCommand.UPLOAD, {"off": 0, "data": image[:64]}
    )
    assert driver.error(no_len).name == "IMG_MGMT_ERR_INVALID_LENGTH"
    not_mcuboot = codec.upload_request(0, b"\x00" * 64, image_len=len(image))
    assert driver.error(not_mcuboot).name == "IMG_MGMT_ERR_INVALID_IMAGE_HEADER_MAGIC"
    too_big = codec.upload_request(0, image[:64], image_len=SLOT_BYTES)
    assert driver.error(too_big).name == "IMG_MGMT_ERR_INVALID_IMAGE_TOO_LARGE"
    older = codec.upload_request(0, images.old[:64], image_len=len(images.old), upgrade=True)
    assert driver.error(older).name == "IMG_MGMT_ERR_CURRENT_VERSION_IS_NEWER"
    small = codec.upload_request(0, image[:64], image_len=100)
    assert codec.parse_upload_reply(driver.payload(small)).offset == 64
    assert driver.error(codec.upload_request(64, bytes(50))).name == (
        "IMG_MGMT_ERR_INVALID_IMAGE_DATA_OVERRUN"
    )
    other_image = codec.upload_request(0, image[:64], image_len=len(image), image=1)
    assert driver.error(other_image).name == "IMG_MGMT_ERR_INVALID_SLOT"


def test_a_corrupted_upload_does_not_match_its_sha(driver: Driver, images: Images) -> None:
    image = images.new
    liar = codec.upload_request(0, image[:1000], image_len=len(image), sha=bytes(range(32)))
    offset = codec.parse_upload_reply(driver.payload(liar)).offset
    while offset < len(image):
        reply = driver.payload(codec.upload_request(offset, image[offset : offset + 1500]))
        progress = codec.parse_upload_reply(reply)
        offset = progress.offset
    assert progress.match is False
    # Forgotten: the next upload starts over, and a sha-less one completes without match.
    assert driver.upload(image, sha=False) == codec.UploadProgress(len(image), None)


def test_image_state_write_refusals(driver: Driver, images: Images) -> None:
    old_hash, new_hash = image_hash(images.old), image_hash(images.new)
    assert driver.error(codec.image_state_write(new_hash)).name == "IMG_MGMT_ERR_HASH_NOT_FOUND"
    assert driver.error(codec.image_state_write(old_hash)).name == (
        "IMG_MGMT_ERR_IMAGE_SETTING_TEST_TO_ACTIVE_DENIED"
    )
    driver.upload(images.new)
    assert driver.error(codec.image_state_write(new_hash, confirm=True)).name == (
        "IMG_MGMT_ERR_IMAGE_CONFIRMATION_DENIED"
    )
    driver.payload(codec.image_state_write(old_hash, confirm=True))  # the running one: fine
    states = codec.parse_image_states(driver.payload(codec.image_state_write(new_hash)))
    assert states.slot(1) is not None and states.slot(1).pending  # type: ignore[union-attr]
    driver.payload(codec.image_state_write(new_hash))  # the same test again: fine
    assert driver.error(codec.upload_request(0, images.new[:64], image_len=100)).name == (
        "IMG_MGMT_ERR_IMAGE_ALREADY_PENDING"
    )
    assert driver.error(codec.image_erase()) == codec.ErrorInfo(codec.MgmtErr.EBADSTATE)


def test_v1_requests_get_v1_errors(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    node = SmpNode(node_config(tmp_path, trust), initial_image=images.old)
    try:
        v1 = Driver(node, codec.Version.V1)
        reply = v1.request(codec.image_state_write(image_hash(images.new)))
        assert reply.header.version is codec.Version.V1
        assert reply.payload == {"rc": codec.MgmtErr.ENOENT}
        assert (
            v1.error(codec.upload_request(0, b"\x00" * 64, image_len=10)).name == "MGMT_ERR_EINVAL"
        )
    finally:
        node.close()


def test_unknown_commands_and_malformed_payloads(driver: Driver) -> None:
    stats = codec.Request(codec.Op.READ, 2, 0)
    assert driver.error(stats).name == "MGMT_ERR_ENOTSUP"
    bad_echo = codec.Request(codec.Op.WRITE, codec.Group.OS, codec.OsCommand.ECHO, {"d": 5})
    assert driver.error(bad_echo).name == "MGMT_ERR_EINVAL"
    params = codec.parse_params_reply(driver.payload(codec.params_request()))
    assert params == codec.McumgrParams(2048, 4)
    garbage = codec.Header(codec.Op.WRITE, 0, 0, length=3).encode() + b"\xa1\x61"  # short
    wire = codec.encode_console(garbage + b"d")
    packets = [p for out in driver.node.handle_bytes(wire) for p in driver.decoder.feed(out)]
    assert codec.decode_packet(packets[0]).payload == {"rc": codec.MgmtErr.EINVAL}


def test_oversize_requests_are_dropped_unanswered(driver: Driver) -> None:
    big = codec.echo_request("x" * 2100).encode(1)
    assert list(driver.node.handle_bytes(codec.encode_console(big))) == []
    assert codec.parse_echo_reply(driver.payload(codec.echo_request("after"))) == "after"


def test_erase_forgets_the_secondary(driver: Driver, images: Images) -> None:
    driver.upload(images.new)
    assert driver.states().slot(1) is not None
    assert driver.payload(codec.image_erase(1)) == {}
    assert driver.states().slot(1) is None
    assert driver.error(codec.image_erase(0)).name == "IMG_MGMT_ERR_INVALID_SLOT"
    assert driver.node.flash.is_erased(SLOT_BYTES, SLOT_BYTES)


def test_a_power_cut_in_the_swap_is_finished_at_the_next_start(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    def until_reset(state: Path, faults: FlashFaults) -> SmpNode:
        node = SmpNode(node_config(state, trust, faults=faults), initial_image=images.old)
        driver = Driver(node)
        driver.upload(images.new)
        driver.payload(codec.image_state_write(image_hash(images.new)))
        return node

    dry = until_reset(tmp_path / "dry", FlashFaults())
    before_reset = dry.flash.ops_done
    Driver(dry).payload(codec.reset_request())
    swap_ops = dry.flash.ops_done - before_reset
    dry.close()
    assert swap_ops > 10

    node = until_reset(
        tmp_path / "cut", FlashFaults(cut_after_ops=before_reset + swap_ops // 2, torn_writes=True)
    )
    with pytest.raises(PowerCut):
        Driver(node).payload(codec.reset_request())
    node.close()
    after = SmpNode(node_config(tmp_path / "cut", trust))
    try:
        assert state_of(after) is BootState.TESTING
        assert after.running is not None and str(after.running.version) == "2.0.0"
        Driver(after).payload(codec.image_state_write(confirm=True))
        assert state_of(after) is BootState.CONFIRMED
    finally:
        after.close()


def state_of(node: SmpNode) -> BootState:
    return node.bootloader.state


def test_the_node_refuses_an_initial_image_it_would_not_boot(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    with pytest.raises(UnknownKeyError):
        SmpNode(node_config(tmp_path, trust), initial_image=images.untrusted)


_KEYS = ["off", "len", "data", "sha", "image", "upgrade", "hash", "confirm", "slot", "d", "force"]
_VALUES = (
    st.integers(-5, 2**33)
    | st.binary(max_size=40)
    | st.text(max_size=10)
    | st.booleans()
    | st.none()
    | st.lists(st.integers(0, 3), max_size=3)
)
_COMMANDS = [
    (op, group, command)
    for op in (codec.Op.READ, codec.Op.WRITE, codec.Op.READ_RSP)
    for group, command in ((0, 0), (0, 5), (0, 6), (1, 0), (1, 1), (1, 5), (1, 6), (9, 0))
]


def test_any_request_is_answered_or_dropped_never_crashes(
    tmp_path: Path, images: Images, trust: mcuboot.ImageTrust
) -> None:
    node = SmpNode(node_config(tmp_path, trust), initial_image=images.old)
    decoder = codec.ConsoleDecoder()

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(_COMMANDS),
        st.sampled_from(list(codec.Version)),
        st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5) | st.binary(max_size=60),
    )
    def check(command: tuple[codec.Op, int, int], version: codec.Version, payload: object) -> None:
        op, group, number = command
        header = codec.Header(op, group, number, sequence=3, version=version)
        if isinstance(payload, bytes):
            packet = replace(header, length=len(payload)).encode() + payload
        else:
            packet = codec.encode_packet(header, payload)  # type: ignore[arg-type]
        replies = [
            p for out in node.handle_bytes(codec.encode_console(packet)) for p in decoder.feed(out)
        ]
        if not op.is_request:
            assert replies == []
            return
        assert len(replies) == 1
        reply = codec.decode_packet(replies[0])
        assert reply.header.sequence == header.sequence and reply.header.op is op.reply

    try:
        check()
        assert node.running is not None  # nothing a client sent broke the running image
    finally:
        node.close()
