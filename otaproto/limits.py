"""Every size bound of Shoal, in one typed place.

Parsers check a length against these numbers *before* they allocate for it
(style guide §5). A node advertises its own, smaller, limits on the wire; the
defaults here are what the gateway and the tools accept.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits; frozen so that a limit cannot drift at run time."""

    #: Largest firmware image (one MCU slot) the tools and gateway accept.
    max_image_bytes: int = 16 * MIB
    #: Largest artifact file: a full image plus container and signature.
    max_artifact_bytes: int = 16 * MIB + 64 * KIB
    #: Largest COSE_Sign1 structure (protected header, manifest, signature).
    #: Small enough for a node to hold in one frame buffer.
    max_signed_manifest_bytes: int = 2 * KIB
    #: Longest text field in a manifest (name, version, device type, metadata).
    max_text_chars: int = 128
    #: Most device types one artifact may name.
    max_device_types: int = 16
    #: Most metadata entries in a manifest.
    max_metadata_entries: int = 16
    #: Largest bzip2-decompressed bsdiff4 control block (24 bytes per entry).
    max_patch_control_bytes: int = 4 * MIB
    #: Largest Intel HEX text file (about 2.8 bytes of text per image byte).
    max_hex_file_bytes: int = 48 * MIB
    #: Deepest CBOR nesting any Shoal structure needs.
    max_cbor_depth: int = 8


DEFAULT_LIMITS = Limits()
