"""Firmware images in: raw binary or Intel HEX, as bytes.

An Intel HEX file becomes the bytes from its lowest to its highest address,
gaps filled with 0xFF (erased flash). Anything else is taken as a raw image,
byte for byte: an MCUboot image signed by ``imgtool`` goes through untouched,
its own header and TLVs included, for MCUboot to check on the device.
"""

from __future__ import annotations

import io

from intelhex import HexReaderError, IntelHex

from otaproto.errors import ImageFormatError, LimitExceeded
from otaproto.limits import DEFAULT_LIMITS, Limits

ERASED_BYTE = 0xFF


HEX_SUFFIXES = (".hex", ".ihex", ".ihx")


def is_hex_name(filename: str) -> bool:
    """True for a file name that says Intel HEX; every other file is a raw image."""
    return filename.lower().endswith(HEX_SUFFIXES)


def image_from_hex(text: bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The image an Intel HEX file describes. Raises ImageFormatError, LimitExceeded."""
    if len(text) > limits.max_hex_file_bytes:
        raise LimitExceeded("Intel HEX file", len(text), limits.max_hex_file_bytes)
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ImageFormatError("Intel HEX file is not ASCII text") from exc
    hexfile = IntelHex()
    try:
        hexfile.loadhex(io.StringIO(decoded))
    except HexReaderError as exc:
        raise ImageFormatError(f"bad Intel HEX: {_first_line(exc)}") from exc
    lowest, highest = hexfile.minaddr(), hexfile.maxaddr()
    if lowest is None or highest is None:
        raise ImageFormatError("Intel HEX file holds no data records")
    size = highest - lowest + 1
    if size > limits.max_image_bytes:
        raise LimitExceeded("image from Intel HEX", size, limits.max_image_bytes)
    hexfile.padding = ERASED_BYTE
    image: bytes = hexfile.tobinstr(start=lowest, end=highest)
    return image


def load_image(data: bytes, *, intel_hex: bool, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """An image from the bytes of a raw (``intel_hex=False``) or Intel HEX file.

    The caller says which (by file name, :func:`is_hex_name`): a raw image may
    begin with any byte, ``:`` included. Raises ImageFormatError for an empty
    or unreadable file, LimitExceeded for an image larger than a slot can be.
    """
    image = image_from_hex(data, limits) if intel_hex else data
    if not image:
        raise ImageFormatError("image is empty")
    if len(image) > limits.max_image_bytes:
        raise LimitExceeded("image", len(image), limits.max_image_bytes)
    return image


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:120]
