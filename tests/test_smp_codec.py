"""otaproto.smp against the third-party ``smp`` package, golden bytes and hypothesis.

``smp`` (PyPI) is an independent implementation of the same protocol: our
requests must load as its models, its messages must decode with our code, and
its console framing must equal ours byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import struct
from pathlib import Path

import cbor2
import pytest
import smp.error as smp_error
import smp.header as smp_header
import smp.image_management as smp_image
import smp.os_management as smp_os
import smp.packet as smp_packet
from crcmod.predefined import mkPredefinedCrcFun  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from otaproto import smp
from otaproto.errors import InvalidInput, LimitExceeded, MalformedError, UsageError

SHA = hashlib.sha256(b"an image").digest()
LOG_LINE = b"[00:00:00.022,374] <inf> smp_sample: build time: Jan  1 2025 00:00:00\r\n"


def smp_lines(packet: bytes, line_length: int = 128) -> bytes:
    """What smpclient puts on the wire for ``packet`` (its default line length is 128)."""
    return b"".join(smp_packet.encode(packet, line_length=line_length))


def smp_decode_lines(wire: bytes) -> bytes:
    """Decode console lines with the ``smp`` package's generator."""
    decoder = smp_packet.decode()
    next(decoder)
    for line in wire.splitlines(keepends=True):
        try:
            decoder.send(line)
        except StopIteration as done:
            return bytes(done.value)
    raise AssertionError("smp.packet.decode wanted more lines")


# -- CRC and header --------------------------------------------------------------------


def test_crc16_check_value() -> None:
    assert smp.crc16_xmodem(b"123456789") == 0x31C3
    assert smp.crc16_xmodem(b"") == 0


@given(st.binary(max_size=600))
def test_crc16_equals_crcmod_xmodem(data: bytes) -> None:
    reference = mkPredefinedCrcFun("xmodem")
    assert smp.crc16_xmodem(data) == reference(data)
    half = len(data) // 2
    assert smp.crc16_xmodem(data[half:], smp.crc16_xmodem(data[:half])) == reference(data)


def test_header_golden_bytes() -> None:
    header = smp.Header(smp.Op.WRITE, 1, 1, sequence=0x9A, length=0x74)
    assert header.encode() == bytes.fromhex("0a000074 0001 9a 01".replace(" ", ""))
    assert smp.Header.decode(header.encode()) == header
    theirs = smp_header.Header.loads(header.encode())
    assert (theirs.op, theirs.version, theirs.length) == (2, 1, 0x74)
    assert (theirs.group_id, theirs.sequence, theirs.command_id) == (1, 0x9A, 1)


@given(
    st.sampled_from(list(smp.Op)),
    st.sampled_from(list(smp.Version)),
    st.integers(64, 0xFFFF),  # user groups: smp checks the commands of the groups it knows
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
)
def test_header_round_trip_and_matches_smp(
    op: smp.Op, version: smp.Version, group: int, command: int, sequence: int, length: int
) -> None:
    header = smp.Header(op, group, command, sequence=sequence, length=length, version=version)
    raw = header.encode()
    assert smp.Header.decode(raw) == header
    mine = smp_header.Header(
        op=smp_header.OP(op),
        version=smp_header.Version(version),
        flags=smp_header.Flag(0),
        length=length,
        group_id=group,
        sequence=sequence,
        command_id=command,
    )
    assert bytes(mine) == raw


@pytest.mark.parametrize(
    ("first", "field"),
    [(0x20 | 2, "smp header"), (0x10 | 2, "smp header.version"), (0x06, "smp header.op")],
)
def test_header_rejects_reserved_bits_versions_and_ops(first: int, field: str) -> None:
    with pytest.raises(MalformedError) as caught:
        smp.Header.decode(bytes([first]) + bytes(7))
    assert caught.value.field == field


def test_header_refuses_fields_that_do_not_fit() -> None:
    with pytest.raises(UsageError):
        smp.Header(smp.Op.READ, 0x1_0000, 0)
    with pytest.raises(UsageError):
        smp.Header(smp.Op.READ, 0, 0, sequence=256)
    with pytest.raises(UsageError):
        smp.Op.READ_RSP.reply  # noqa: B018


# -- our requests as smp's models ----------------------------------------------------------


def test_echo_request_loads_as_smp_model() -> None:
    packet = smp.echo_request("hello, node").encode(7)
    theirs = smp_os.EchoWriteRequest.loads(packet)
    assert theirs.d == "hello, node"
    assert theirs.header.sequence == 7 and theirs.header.version == smp_header.Version.V2


def test_upload_requests_load_as_smp_model() -> None:
    first = smp.upload_request(0, b"\x01" * 100, image_len=5000, sha=SHA, image=0, upgrade=False)
    theirs = smp_image.ImageUploadWriteRequest.loads(first.encode(200))
    assert (theirs.off, theirs.len, theirs.sha, theirs.image, theirs.upgrade) == (
        0, 5000, SHA, 0, False,
    )  # fmt: skip
    assert theirs.data == b"\x01" * 100
    later = smp_image.ImageUploadWriteRequest.loads(smp.upload_request(100, b"xyz").encode(201))
    assert (later.off, later.data, later.len, later.sha) == (100, b"xyz", None, None)


def test_state_params_reset_erase_requests_load_as_smp_models() -> None:
    test = smp_image.ImageStatesWriteRequest.loads(smp.image_state_write(SHA).encode(1))
    assert (test.hash, test.confirm) == (SHA, False)
    confirm = smp_image.ImageStatesWriteRequest.loads(smp.image_state_write(confirm=True).encode(2))
    assert (confirm.hash, confirm.confirm) == (None, True)
    smp_image.ImageStatesReadRequest.loads(smp.image_state_read().encode(3))
    smp_os.MCUMgrParametersReadRequest.loads(smp.params_request().encode(4))
    assert smp_os.ResetWriteRequest.loads(smp.reset_request(force=True).encode(5)).force == 1
    assert smp_image.ImageEraseRequest.loads(smp.image_erase(1).encode(6)).slot == 1


def test_request_builders_refuse_misuse() -> None:
    with pytest.raises(UsageError):
        smp.upload_request(0, b"")  # no len at offset 0
    with pytest.raises(UsageError):
        smp.upload_request(10, b"", image_len=10)
    with pytest.raises(UsageError):
        smp.upload_request(10, b"", sha=SHA)
    with pytest.raises(UsageError):
        smp.image_state_write(None, confirm=False)
    with pytest.raises(UsageError):
        smp.image_state_write(b"short")


# -- smp's messages with our decoder ----------------------------------------------------------


def test_smp_requests_decode_with_our_parsers() -> None:
    upload = smp_image.ImageUploadWriteRequest(
        off=0, data=b"abc", image=0, len=3, sha=SHA, upgrade=True, sequence=9
    )
    packet = smp.decode_packet(upload.BYTES)
    assert packet.header == smp.Header(
        smp.Op.WRITE, smp.Group.IMAGE, smp.ImageCommand.UPLOAD, sequence=9,
        length=len(upload.BYTES) - 8,
    )  # fmt: skip
    assert smp.parse_upload_request(packet.payload) == smp.UploadRequest(0, b"abc", 3, SHA, 0, True)
    echo = smp.decode_packet(smp_os.EchoWriteRequest(d="hi", sequence=1).BYTES)
    assert smp.parse_echo_request(echo.payload) == "hi"
    state = smp.decode_packet(smp_image.ImageStatesWriteRequest(hash=SHA, sequence=2).BYTES)
    assert smp.parse_state_write(state.payload) == smp.StateWrite(SHA, False)
    reset = smp.decode_packet(smp_os.ResetWriteRequest(force=1, sequence=3).BYTES)
    assert smp.parse_reset_request(reset.payload) is True


def test_smp_responses_decode_with_our_parsers() -> None:
    states = smp_image.ImageStatesReadResponse(
        images=[
            smp_image.ImageState(slot=0, version="1.2.3", hash=SHA, active=True, confirmed=True),
            smp_image.ImageState(slot=1, version="2.0.0.7", hash=bytes(32), pending=True),
        ],
        sequence=4,
    )
    parsed = smp.parse_image_states(smp.decode_packet(states.BYTES).payload)
    assert parsed.images == (
        smp.ImageSlotState(0, "1.2.3", SHA, active=True, confirmed=True),
        smp.ImageSlotState(1, "2.0.0.7", bytes(32), pending=True),
    )
    params = smp_os.MCUMgrParametersReadResponse(buf_size=2048, buf_count=4, sequence=5)
    assert smp.parse_params_reply(smp.decode_packet(params.BYTES).payload) == smp.McumgrParams(
        2048, 4
    )
    upload = smp_image.ImageUploadWriteResponse(off=4096, match=True, sequence=6)
    assert smp.parse_upload_reply(smp.decode_packet(upload.BYTES).payload) == smp.UploadProgress(
        4096, True
    )


def test_our_replies_load_as_smp_models() -> None:
    request = smp.Header(smp.Op.READ, smp.Group.IMAGE, smp.ImageCommand.STATE, sequence=11)
    states = smp.ImageStates(
        (
            smp.ImageSlotState(0, "1.0.0", SHA, bootable=True, active=True, confirmed=True),
            smp.ImageSlotState(1, "2.0.0", bytes(32), bootable=True, pending=True),
        )
    )
    reply = smp.encode_packet(request.reply(), states.to_cbor())
    theirs = smp_image.ImageStatesReadResponse.loads(reply)
    assert theirs.header.op == smp_header.OP.READ_RSP and theirs.header.sequence == 11
    assert theirs.images[0].active and theirs.images[0].confirmed and not theirs.images[0].pending
    assert theirs.images[1].pending and theirs.images[1].hash == bytes(32)
    upload = smp.Header(smp.Op.WRITE, smp.Group.IMAGE, smp.ImageCommand.UPLOAD, sequence=12)
    done = smp_image.ImageUploadWriteResponse.loads(
        smp.encode_packet(upload.reply(), smp.upload_reply(5000, match=True))
    )
    assert (done.off, done.match) == (5000, True)


def smp_error_packet(model: type[smp_error.ErrorV1], version: int, **fields: object) -> bytes:
    """An error reply built by ``smp``'s models (which need an explicit reply header)."""
    length = len(cbor2.dumps(fields, canonical=True))
    header = smp_header.Header(
        op=smp_header.OP.WRITE_RSP,
        version=smp_header.Version(version),
        flags=smp_header.Flag(0),
        length=length,
        group_id=1,
        sequence=1,
        command_id=1,
    )
    return model(header=header, **fields).BYTES  # type: ignore[arg-type]


def test_error_replies_in_both_versions() -> None:
    v1 = smp_error_packet(smp_image.ImageManagementErrorV1, 0, rc=3, rsn="bad")
    info = smp.reply_error(smp.decode_packet(v1).payload)
    assert info == smp.ErrorInfo(3, None, "bad")
    assert info.name == "MGMT_ERR_EINVAL"
    v2 = smp_error_packet(
        smp_image.ImageManagementErrorV2,  # type: ignore[arg-type]
        1,
        err={"group": 1, "rc": 3},
    )
    info2 = smp.reply_error(smp.decode_packet(v2).payload)
    assert info2 == smp.ErrorInfo(3, 1) and info2.name == "IMG_MGMT_ERR_NO_IMAGE"
    assert smp.reply_error({"rc": 0, "off": 5}) is None
    assert smp.reply_error({"err": {"group": 1, "rc": 0}}) is None
    packet = smp.Packet(smp.Header(smp.Op.WRITE_RSP, 1, 1), {"rc": 8})
    with pytest.raises(smp.SmpErrorReply, match="image upload refused: MGMT_ERR_ENOTSUP"):
        smp.check_reply(packet, "image upload")
    with pytest.raises(MalformedError):
        smp.reply_error({"rc": "zero"})


def test_error_payloads_load_as_smp_errors() -> None:
    header = smp.Header(smp.Op.WRITE, smp.Group.IMAGE, smp.ImageCommand.STATE, sequence=3)
    v2 = smp.error_payload(smp.Version.V2, smp.ImgMgmtErr.HASH_NOT_FOUND, group=smp.Group.IMAGE)
    theirs = smp_image.ImageManagementErrorV2.loads(smp.encode_packet(header.reply(), v2))
    assert theirs.err.rc == smp_image.IMG_MGMT_ERR.HASH_NOT_FOUND
    v1 = smp.error_payload(smp.Version.V1, smp.ImgMgmtErr.HASH_NOT_FOUND, group=smp.Group.IMAGE)
    assert v1 == {"rc": smp.MgmtErr.ENOENT}
    assert smp.error_payload(smp.Version.V2, smp.MgmtErr.ENOTSUP) == {"rc": 8}
    assert set(smp.IMAGE_ERROR_V1) == set(smp.ImgMgmtErr)


# -- payload decoding ---------------------------------------------------------------------------


def test_zephyr_indefinite_length_maps_decode() -> None:
    # zcbor writes indefinite maps and arrays: {"images": [{"slot": 0, "version": "1.0.0"}]}
    payload = b"\xbf\x66images\x9f\xbf\x64slot\x00\x67version\x651.0.0\x66active\xf5\xff\xff\xff"
    header = smp.Header(smp.Op.READ_RSP, 1, 0, length=len(payload), version=smp.Version.V1)
    packet = smp.decode_packet(header.encode() + payload)
    states = smp.parse_image_states(packet.payload)
    assert states.images == (smp.ImageSlotState(0, "1.0.0", active=True),)
    chunked = b"\xbf\x61r\x7f\x62he\x63llo\xff\xff"  # an indefinite text string
    assert smp.decode_payload(chunked) == {"r": "hello"}
    assert smp.decode_payload(b"") == {}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xa1\x61r\xc1\x01",  # a tag
        b"\xa2\x61a\x01\x61a\x02",  # a duplicate key
        b"\xa1\x01\x02",  # an integer key
        b"\xa0\x00",  # trailing bytes
        b"\xa1\x61a",  # truncated
        b"\x80",  # not a map
        b"\xa1\x61a\x5b\x00\x00\x00\x01\x00\x00\x00\x00",  # a string longer than the data
        b"\xa1\x61a\x9b\x00\x00\x00\x10\x00\x00\x00\x00",  # an array longer than the data
        b"\xa1\x61a\xf7",  # undefined
        b"\xa1\x61a\x1c",  # reserved additional information
        b"\xff",  # a lone break
        b"\xa1\x61a\x3f",  # indefinite negative integer
        b"\xbf\x61a\x01",  # an unterminated indefinite map
        b"\xa1\x61a\x7f\x41x\xff",  # a byte chunk inside an indefinite text
        b"\xa1\x61a\x62\xff\xfe",  # text that is not UTF-8
        b"\xa1\x61a" + b"\x81" * 9 + b"\x00",  # nested too deep
    ],
)
def test_payload_decoder_refuses_what_smp_never_sends(payload: bytes) -> None:
    with pytest.raises(MalformedError):
        smp.decode_payload(payload)


def test_packet_length_must_match_its_header() -> None:
    packet = smp.echo_request("x").encode(0)
    with pytest.raises(MalformedError, match="announces"):
        smp.decode_packet(packet + b"\x00")
    with pytest.raises(MalformedError):
        smp.decode_packet(packet[:-1])
    with pytest.raises(MalformedError):
        smp.decode_packet(packet[:5])


_scalars = (
    st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_payloads = st.dictionaries(st.text(max_size=12), _values, max_size=6)


@given(_payloads, st.integers(0, 255), st.sampled_from(list(smp.Op)))
def test_packet_round_trip(payload: dict[str, object], sequence: int, op: smp.Op) -> None:
    header = smp.Header(op, smp.Group.IMAGE, 1, sequence=sequence)
    packet = smp.decode_packet(smp.encode_packet(header, payload))
    assert packet.payload == payload
    assert packet.header.sequence == sequence and packet.header.op is op


@given(_payloads)
def test_payload_decoder_agrees_with_cbor2(payload: dict[str, object]) -> None:
    assert smp.decode_payload(cbor2.dumps(payload)) == payload


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedError):
        smp.decode_packet(data)
    with contextlib.suppress(MalformedError):
        smp.decode_payload(data)


# -- console framing ----------------------------------------------------------------------------


def test_console_golden_echo() -> None:
    packet = smp.echo_request("hello").encode(7)
    wire = smp.encode_console(packet)
    assert wire == b"\x06\x09ABMKAAAJAAAHAKFhZGVoZWxsb4vC\n"
    assert smp.decode_console(wire) == packet


@pytest.mark.parametrize("line_length", [8, 16, 64, 100, 127, 128])
def test_console_lines_equal_smp_packet_encode(line_length: int) -> None:
    packet = smp.upload_request(0, bytes(range(256)) * 3, image_len=9000, sha=SHA).encode(1)
    theirs = smp_lines(packet, line_length)
    # smp's line_length L carries ((L - 4) // 4) * 4 characters; ours counts the
    # line's own bytes: marker, characters, newline.
    ours = smp.encode_console(packet, line_bytes=min(127, (line_length - 4) // 4 * 4 + 3))
    assert ours == theirs
    assert smp.decode_console(theirs) == packet
    assert smp_decode_lines(ours) == packet


def test_console_lines_are_at_most_127_bytes_with_93_raw_bytes() -> None:
    packet = smp.upload_request(0, bytes(2000), image_len=2000).encode(0)
    lines = smp.encode_console(packet).splitlines(keepends=True)
    assert max(len(line) for line in lines) == 127
    first = base64.b64decode(lines[0][2:-1])
    assert len(first) == 93 and struct.unpack(">H", first[:2])[0] == len(packet) + 2
    assert all(line.startswith(b"\x04\x14") for line in lines[1:])


@given(
    st.lists(st.binary(min_size=8, max_size=700), min_size=1, max_size=4),
    st.integers(7, 127),
    st.data(),
)
def test_console_round_trip_in_any_cut(
    packets: list[bytes], line_bytes: int, data: st.DataObject
) -> None:
    wire = b"".join(LOG_LINE + smp.encode_console(p, line_bytes) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = smp.ConsoleDecoder(1024)
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[start:end])
    assert got == packets
    assert not decoder.drops
    assert decoder.take_text() == LOG_LINE * len(packets)


def test_log_lines_interleaved_between_and_inside_packets() -> None:
    first = smp.echo_request("one").encode(1)
    second = smp.upload_request(0, bytes(400), image_len=400).encode(2)
    lines = smp.encode_console(second).splitlines(keepends=True)
    wire = (
        LOG_LINE
        + b"[00:00:00.1] <inf> no newline yet, then " + smp.encode_console(first)
        + lines[0] + LOG_LINE + b"".join(lines[1:3]) + LOG_LINE + b"".join(lines[3:])
    )  # fmt: skip
    decoder = smp.ConsoleDecoder()
    assert decoder.feed(wire) == [first, second]
    assert not decoder.drops
    assert decoder.take_text().count(b"<inf>") == 4


def test_new_start_marker_abandons_a_truncated_packet() -> None:
    whole = smp.upload_request(0, bytes(400), image_len=400).encode(1)
    lines = smp.encode_console(whole).splitlines(keepends=True)
    after = smp.echo_request("after").encode(2)
    decoder = smp.ConsoleDecoder()
    assert decoder.feed(b"".join(lines[:2]) + smp.encode_console(after)) == []
    assert decoder.drops == {smp.ConsoleDrop.TRUNCATED: 1}
    # The start line that abandoned the old packet was not decoded: resync at the next one.
    assert decoder.feed(smp.encode_console(after)) == [after]


def test_bad_lines_are_dropped_and_the_decoder_recovers() -> None:
    good = smp.echo_request("ok").encode(3)
    wire = smp.encode_console(good)
    bad_crc = bytearray(wire)
    bad_crc[-3] = ord("A") if bad_crc[-3] != ord("A") else ord("B")
    long_line = b"\x06\x09" + b"QUFB" * 40 + b"\n"
    cases = {
        smp.ConsoleDrop.CRC: bytes(bad_crc),
        smp.ConsoleDrop.BASE64: b"\x06\x09AB*=\n",
        smp.ConsoleDrop.LINE_TOO_LONG: long_line,
        smp.ConsoleDrop.ORPHAN: b"\x04\x14QUFB\n",
        smp.ConsoleDrop.LENGTH: b"\x06\x09" + base64.b64encode(b"\x00\x05abc") + b"\n",
        smp.ConsoleDrop.OVERSIZE: b"\x06\x09" + base64.b64encode(b"\xff\xffabcd") + b"\n",
        smp.ConsoleDrop.OVERRUN: b"\x06\x09" + base64.b64encode(b"\x00\x0a" + bytes(13)) + b"\n",
    }
    for reason, garbage in cases.items():
        decoder = smp.ConsoleDecoder(2044)
        assert decoder.feed(garbage + wire) == [good], reason
        assert decoder.drops == {reason: 1}, reason
        with pytest.raises(InvalidInput):
            smp.decode_console(garbage, 2044)


def test_decode_console_is_strict() -> None:
    wire = smp.encode_console(smp.echo_request("x").encode(0))
    with pytest.raises(MalformedError, match="text outside"):
        smp.decode_console(LOG_LINE + wire)
    with pytest.raises(MalformedError, match="truncated"):
        smp.decode_console(wire[:-1])
    with pytest.raises(MalformedError, match="2 packets"):
        smp.decode_console(wire + wire)
    big = smp.encode_console(smp.upload_request(0, bytes(3000), image_len=3000).encode(0))
    with pytest.raises(LimitExceeded):
        smp.decode_console(big, 2044)


@settings(max_examples=300)
@given(st.binary(max_size=400), st.binary(max_size=400))
def test_console_decoder_never_raises_and_stays_in_step(noise: bytes, more: bytes) -> None:
    decoder = smp.ConsoleDecoder(512, max_text_bytes=64)
    decoder.feed(noise)
    decoder.feed(more)
    good = smp.echo_request("sync").encode(9)
    assert decoder.feed(b"\n" + smp.encode_console(good))[-1:] == [good]
    assert len(decoder.take_text()) <= 64


def test_encode_console_refuses_misuse() -> None:
    with pytest.raises(UsageError):
        smp.encode_console(b"")
    with pytest.raises(UsageError):
        smp.encode_console(b"x" * 10, line_bytes=6)
    with pytest.raises(UsageError):
        smp.encode_console(bytes(smp.MAX_CONSOLE_PACKET_BYTES + 1))


# -- raw framing ---------------------------------------------------------------------------------


def test_raw_decoder_splits_back_to_back_packets_in_any_cut() -> None:
    packets = [smp.echo_request("a" * n).encode(n) for n in (1, 30, 200)]
    wire = b"".join(packets)
    for cut in range(len(wire) + 1):
        decoder = smp.RawDecoder(512)
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == packets


def test_raw_decoder_skips_an_oversize_packet_and_resets() -> None:
    small = smp.echo_request("ok").encode(1)
    big = smp.echo_request("b" * 600).encode(2)
    decoder = smp.RawDecoder(100)
    assert decoder.feed(big[:50]) == []
    assert decoder.feed(big[50:] + small) == [small]
    assert decoder.oversize_drops == 1
    decoder.feed(small[:5])
    assert decoder.buffered_bytes == 5
    decoder.reset()
    assert decoder.feed(small) == [small]


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("buf_size", [128, 384, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("offset", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1])
def test_max_upload_chunk_fills_the_buffer_exactly(buf_size: int, offset: int) -> None:
    limit = smp.max_packet_bytes(buf_size)
    extra = {"image_len": 700_000, "sha": SHA, "image": 0, "upgrade": False} if not offset else {}
    chunk = smp.max_upload_chunk_bytes(limit, offset, **extra)  # type: ignore[arg-type]
    request = smp.upload_request(offset, bytes(chunk), **extra).encode(0)  # type: ignore[arg-type]
    assert len(request) <= limit
    bigger = smp.upload_request(offset, bytes(chunk + 1), **extra).encode(0)  # type: ignore[arg-type]
    assert len(bigger) > limit
    theirs = smp_image.ImageUploadWriteRequest.loads(request)
    assert len(theirs.data) == chunk and theirs.off == offset
    # What smpclient sends over console framing for that buffer fits it.
    assert len(request) + 4 <= buf_size


def test_max_upload_chunk_respects_remaining_and_alignment() -> None:
    assert smp.max_upload_chunk_bytes(2044, 4096, remaining_bytes=10) == 10
    assert smp.max_upload_chunk_bytes(2044, 4096, align_bytes=64) % 64 == 0
    assert smp.max_upload_chunk_bytes(20, 4096) == 0
    assert smp.max_packet_bytes(2048) == 2044 and smp.max_packet_bytes(384, console=False) == 384
    with pytest.raises(UsageError):
        smp.max_packet_bytes(10)


# -- matching --------------------------------------------------------------------------------------


def test_matcher_pairs_replies_and_drops_stale_ones() -> None:
    matcher = smp.RequestMatcher(first_sequence=254)
    first = smp.Header.decode(matcher.send(smp.echo_request("a")))
    assert first.sequence == 254
    late_reply = smp.encode_packet(first.reply(), {"r": "a"})
    matcher.abandon()  # a timeout: the gateway gives up on it
    second = smp.Header.decode(matcher.send(smp.image_state_read()))
    third_sequence = smp.Header.decode(
        smp.RequestMatcher(first_sequence=255).send(smp.params_request())
    )
    assert second.sequence == 255 and third_sequence.sequence == 255
    assert matcher.match(late_reply) is None
    wrong_command = smp.encode_packet(replace_command(second.reply(), 1), {})
    assert matcher.match(wrong_command) is None
    wrong_op = smp.encode_packet(second, {})  # a request echoed back is not a reply
    assert matcher.match(wrong_op) is None
    reply = smp.encode_packet(second.reply(), {"images": []})
    matched = matcher.match(reply)
    assert matched is not None and matched.payload == {"images": []}
    assert matcher.match(reply) is None  # already answered
    assert matcher.stale_replies == 4
    assert smp.Header.decode(matcher.send(smp.echo_request("b"))).sequence == 0  # wraps mod 256


def replace_command(header: smp.Header, command: int) -> smp.Header:
    return smp.Header(
        header.op, header.group, command, sequence=header.sequence, version=header.version
    )


# -- docs/smp.md says what the code does ------------------------------------------------------

DOC = (Path(__file__).resolve().parent.parent / "docs" / "smp.md").read_text()


def test_doc_hex_examples_are_the_codecs_bytes() -> None:
    request = smp.echo_request("hello").encode(7)
    reply = smp.encode_packet(smp.Header.decode(request).reply(), {"r": "hello"})
    assert request.hex(" ") in DOC and reply.hex(" ") in DOC
    line = smp.encode_console(request)
    assert f'06 09 "{line[2:-1].decode()}" 0a' in DOC
    framed = base64.b64decode(line[2:-1])
    assert framed[:2].hex(" ") == "00 13" and framed[-2:].hex(" ") == "8b c2"


def test_doc_error_tables_are_the_enums() -> None:
    for code in smp.MgmtErr:
        assert f"| {int(code)} | MGMT_ERR_{code.name} |" in DOC
    rows = re.findall(r"\| (\d+) \| ([A-Z_0-9]+) \| ([A-Z]+) \|", DOC)
    table = {int(number): (name, v1) for number, name, v1 in rows}
    assert {smp.ImgMgmtErr(n).name: v1 for n, (_, v1) in table.items()} == {
        code.name: smp.IMAGE_ERROR_V1[code].name for code in smp.ImgMgmtErr
    }
    assert all(smp.ImgMgmtErr(n).name == name for n, (name, _) in table.items())


def test_doc_chunk_table_is_what_the_helper_computes() -> None:
    limit = smp.max_packet_bytes(2048)
    first_all = smp.max_upload_chunk_bytes(
        limit, 0, image_len=200_000, sha=SHA, image=0, upgrade=False
    )
    first = smp.max_upload_chunk_bytes(limit, 0, image_len=200_000, sha=SHA)
    for text, value in (
        ("`image` and `upgrade` | ", first_all),
        ("`len` and `sha` | ", first),
        ("offset 4,096 | ", smp.max_upload_chunk_bytes(limit, 4096)),
        ("offset 100,000 | ", smp.max_upload_chunk_bytes(limit, 100_000)),
    ):
        assert f"{text}{value:,} |" in DOC, text


def test_a_break_inside_a_definite_length_map_is_refused() -> None:
    # {"a": ...} announced with two entries, the second "key" a break byte.
    with pytest.raises(MalformedError, match="break inside a definite-length map"):
        smp.decode_payload(bytes.fromhex("a2ff616161 01".replace(" ", "")))
