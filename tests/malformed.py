"""Hostile and broken uploads, made by hand where Pillow would refuse to write them."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """Signature and IHDR of an 8-bit greyscale PNG of any size, even 0x0."""
    return PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` but whose pixel data is empty."""
    return (
        png_header(width, height) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    )


def bomb_png(side: int = 20_000) -> bytes:
    """A valid `side` x `side` greyscale PNG of zeros: ~0.4 MB that decodes to side**2 bytes.

    Compressing gigabytes of zeros would take seconds, so one block of rows is compressed once
    and repeated: after a full flush deflate restarts, so identical input gives identical output.
    The Adler-32 of n zero bytes is (n mod 65521) << 16 | 1.
    """
    rows_per_block = 100
    assert side % rows_per_block == 0
    row = bytes(side + 1)  # filter byte 0, then the pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(row * rows_per_block) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush()
    total = len(row) * side
    stream = b"\x78\xda" + block * (side // rows_per_block) + end
    stream += struct.pack(">I", (total % 65521) << 16 | 1)
    return png_header(side, side) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    """The first half of an encoded image: a valid header, then nothing."""
    return data[: len(data) // 2]
