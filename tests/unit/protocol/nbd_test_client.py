"""A tiny client-side NBD encoder/decoder for driving the sans-IO server codec in tests.

Written from the spec's message layouts (doc/proto.md), independently of the server code, so
that a layout mistake in one is not silently mirrored in the other.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0b11)


def client_flags(flags: int = 1) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data


def info_data(name: str | bytes, infos: Iterable[int] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    items = list(infos)
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(items))
        + b"".join(struct.pack(">H", i) for i in items)
    )


def meta_data(name: str, queries: Iterable[str | bytes]) -> bytes:
    raw = name.encode()
    qs = [q.encode() if isinstance(q, str) else q for q in queries]
    body = b"".join(struct.pack(">I", len(q)) + q for q in qs)
    return struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(qs)) + body


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class OptReply:
    opt: int
    rep: int
    data: bytes


def parse_replies(buf: bytes) -> list[OptReply]:
    """Splits option replies; asserts the framing is exact (no trailing bytes)."""
    out = []
    pos = 0
    while pos < len(buf):
        magic, opt, rep, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == REPLY_MAGIC, hex(magic)
        pos += 20
        data = buf[pos : pos + length]
        assert len(data) == length, "truncated reply"
        pos += length
        out.append(OptReply(opt, rep, data))
    return out


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def parse_chunk(buf: bytes) -> tuple[Chunk, bytes]:
    magic, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", buf)
    assert magic == STRUCTURED_REPLY_MAGIC
    return Chunk(flags, ctype, cookie, buf[20 : 20 + length]), buf[20 + length :]
