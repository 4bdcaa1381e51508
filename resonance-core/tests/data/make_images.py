"""Writes the tiny 8x8 test PNGs in images/ (pure standard library; run from this directory)."""
import struct
import zlib


def png(path, rgb):
    w = h = 8
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


png("images/red.png", (220, 30, 30))
png("images/green.png", (30, 200, 60))
png("images/blue.png", (40, 60, 220))
