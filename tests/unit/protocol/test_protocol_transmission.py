"""Transmission.check rule table and byte-exact reply encodings."""

from __future__ import annotations

import errno
import struct

import pytest
from nbd_test_client import parse_chunk, request

from blkback.errors import (
    InvalidRequestError,
    NbdError,
    NoSpaceError,
    ProtocolError,
    ReadOnlyError,
)
from blkback.protocol.constants import (
    DEFAULT_MAX_BLOCK,
    MAX_REQUEST,
    MAX_STRING,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    ReplyType,
    TFlag,
)
from blkback.protocol.handshake import ExportInfo, Negotiated, final_tflags
from blkback.protocol.transmission import (
    REQUEST_SIZE,
    Transmission,
    unpack_request,
    wire_errno,
)

KIB = 1024
MIB = 1024 * KIB
ALL = (
    TFlag.SEND_FLUSH
    | TFlag.SEND_FUA
    | TFlag.SEND_TRIM
    | TFlag.SEND_WRITE_ZEROES
    | TFlag.SEND_DF
    | TFlag.SEND_CACHE
    | TFlag.SEND_FAST_ZERO
    | TFlag.CAN_MULTI_CONN
)


def tx(
    export: ExportInfo, *, structured: bool = True, contexts: dict[int, str] | None = None
) -> Transmission:
    return Transmission(
        Negotiated(
            export=export,
            structured_replies=structured,
            meta_contexts={1: "base:allocation"} if contexts is None else contexts,
            no_zeroes=False,
            tflags=final_tflags(export, structured_replies=structured),
        )
    )


FULL = tx(ExportInfo("full", MIB, ALL, min_block=512, pref_block=4096, max_block=64 * KIB))
PLAIN = tx(ExportInfo("plain", 64 * MIB, 0), structured=False, contexts={})
RO = tx(ExportInfo("ro", MIB, TFlag.READ_ONLY | TFlag.SEND_FLUSH | TFlag.SEND_TRIM), contexts={})
SR_NO_CONTEXT = tx(ExportInfo("src", MIB, ALL), contexts={})
CONTEXT_NO_SR = tx(ExportInfo("cns", MIB, ALL), structured=False)

F = CmdFlag
OK = None
CASES: list[tuple[str, Transmission, int, int, int, int, type[Exception] | None]] = [
    # name, transmission, flags, cmd, offset, length, expected
    ("read", FULL, 0, Cmd.READ, 0, 4096, OK),
    ("read df", FULL, F.DF, Cmd.READ, 0, 4096, OK),
    ("read fua tolerated", FULL, F.FUA, Cmd.READ, 0, 4096, OK),
    ("write fua", FULL, F.FUA, Cmd.WRITE, 0, 4096, OK),
    ("write last block", FULL, 0, Cmd.WRITE, MIB - 512, 512, OK),
    ("write past end", FULL, 0, Cmd.WRITE, MIB - 512, 1024, NoSpaceError),
    ("zero past end", FULL, 0, Cmd.WRITE_ZEROES, MIB, 512, NoSpaceError),
    ("read past end", FULL, 0, Cmd.READ, MIB, 512, InvalidRequestError),
    ("read huge offset", FULL, 0, Cmd.READ, 2**64 - 512, 512, InvalidRequestError),
    ("trim past end", FULL, 0, Cmd.TRIM, MIB - 512, 1024, InvalidRequestError),
    ("cache past end", FULL, 0, Cmd.CACHE, MIB, 512, InvalidRequestError),
    ("status past end", FULL, 0, Cmd.BLOCK_STATUS, MIB, 512, InvalidRequestError),
    ("status", FULL, 0, Cmd.BLOCK_STATUS, 0, MIB, OK),
    ("status req_one", FULL, F.REQ_ONE, Cmd.BLOCK_STATUS, 0, 512, OK),
    ("req_one on read", FULL, F.REQ_ONE, Cmd.READ, 0, 512, InvalidRequestError),
    ("df on write", FULL, F.DF, Cmd.WRITE, 0, 512, InvalidRequestError),
    ("no_hole on write", FULL, F.NO_HOLE, Cmd.WRITE, 0, 512, InvalidRequestError),
    ("no_hole on zero", FULL, F.NO_HOLE, Cmd.WRITE_ZEROES, 0, 512, OK),
    ("fast_zero", FULL, F.FAST_ZERO | F.NO_HOLE, Cmd.WRITE_ZEROES, 0, 512, OK),
    ("fast_zero on trim", FULL, F.FAST_ZERO, Cmd.TRIM, 0, 512, InvalidRequestError),
    ("unknown flag bit 6", FULL, 1 << 6, Cmd.READ, 0, 512, InvalidRequestError),
    ("unknown flag bit 15", FULL, 1 << 15, Cmd.WRITE, 0, 512, InvalidRequestError),
    ("payload_len flag", FULL, F.PAYLOAD_LEN, Cmd.WRITE, 0, 512, InvalidRequestError),
    ("resize", FULL, 0, Cmd.RESIZE, 0, 0, InvalidRequestError),
    ("unknown cmd 9", FULL, 0, 9, 0, 512, InvalidRequestError),
    ("unknown cmd 0xffff", FULL, 0, 0xFFFF, 0, 512, InvalidRequestError),
    ("flush", FULL, 0, Cmd.FLUSH, 0, 0, OK),
    ("flush fua", FULL, F.FUA, Cmd.FLUSH, 0, 0, OK),
    ("flush offset", FULL, 0, Cmd.FLUSH, 512, 0, InvalidRequestError),
    ("flush length", FULL, 0, Cmd.FLUSH, 0, 512, InvalidRequestError),
    ("read length 0", FULL, 0, Cmd.READ, 0, 0, InvalidRequestError),
    ("write length 0", FULL, 0, Cmd.WRITE, 0, 0, InvalidRequestError),
    ("trim length 0", FULL, 0, Cmd.TRIM, 0, 0, InvalidRequestError),
    ("zero length 0", FULL, 0, Cmd.WRITE_ZEROES, 0, 0, InvalidRequestError),
    ("status length 0", FULL, 0, Cmd.BLOCK_STATUS, 0, 0, InvalidRequestError),
    ("misaligned offset", FULL, 0, Cmd.READ, 1, 512, InvalidRequestError),
    ("misaligned length", FULL, 0, Cmd.WRITE, 0, 100, InvalidRequestError),
    ("misaligned trim", FULL, 0, Cmd.TRIM, 256, 512, InvalidRequestError),
    ("read over max", FULL, 0, Cmd.READ, 0, 64 * KIB + 512, InvalidRequestError),
    ("read at max", FULL, 0, Cmd.READ, 0, 64 * KIB, OK),
    ("write over max, skippable", FULL, 0, Cmd.WRITE, 0, 128 * KIB, InvalidRequestError),
    ("write 32M past end, skippable", FULL, 0, Cmd.WRITE, 0, DEFAULT_MAX_BLOCK, NoSpaceError),
    ("write over 32M", FULL, 0, Cmd.WRITE, 0, DEFAULT_MAX_BLOCK + 512, ProtocolError),
    ("write 4G-1", FULL, 0, Cmd.WRITE, 0, 2**32 - 1, ProtocolError),
    ("cache over max", FULL, 0, Cmd.CACHE, 0, 128 * KIB, InvalidRequestError),
    ("trim over max", FULL, F.FUA, Cmd.TRIM, 0, MIB, OK),
    ("zero over max", FULL, 0, Cmd.WRITE_ZEROES, 0, MIB, OK),
    ("disc", FULL, 0, Cmd.DISC, 0, 0, OK),
    ("disc with junk", FULL, 0xFFFF, Cmd.DISC, 123, 456, OK),
    # Nothing optional advertised, no structured replies.
    ("plain read unaligned", PLAIN, 0, Cmd.READ, 3, 1, OK),
    ("plain write 32M", PLAIN, 0, Cmd.WRITE, 0, DEFAULT_MAX_BLOCK, OK),
    ("plain write 32M+1", PLAIN, 0, Cmd.WRITE, 0, DEFAULT_MAX_BLOCK + 1, ProtocolError),
    ("plain flush", PLAIN, 0, Cmd.FLUSH, 0, 0, InvalidRequestError),
    ("plain trim", PLAIN, 0, Cmd.TRIM, 0, 512, InvalidRequestError),
    ("plain zero", PLAIN, 0, Cmd.WRITE_ZEROES, 0, 512, InvalidRequestError),
    ("plain cache", PLAIN, 0, Cmd.CACHE, 0, 512, InvalidRequestError),
    ("plain status", PLAIN, 0, Cmd.BLOCK_STATUS, 0, 512, InvalidRequestError),
    ("plain fua", PLAIN, F.FUA, Cmd.WRITE, 0, 512, InvalidRequestError),
    ("plain df (no structured)", PLAIN, F.DF, Cmd.READ, 0, 512, InvalidRequestError),
    # Read-only export.
    ("ro read", RO, 0, Cmd.READ, 0, 512, OK),
    ("ro flush", RO, 0, Cmd.FLUSH, 0, 0, OK),
    ("ro write", RO, 0, Cmd.WRITE, 0, 512, ReadOnlyError),
    ("ro write past end", RO, 0, Cmd.WRITE, MIB, 512, ReadOnlyError),
    ("ro trim", RO, 0, Cmd.TRIM, 0, 512, ReadOnlyError),
    ("ro zero (unadvertised)", RO, 0, Cmd.WRITE_ZEROES, 0, 512, ReadOnlyError),
    # Block status needs both structured replies and a context.
    ("sr, no context", SR_NO_CONTEXT, 0, Cmd.BLOCK_STATUS, 0, 512, InvalidRequestError),
    ("context, no sr", CONTEXT_NO_SR, 0, Cmd.BLOCK_STATUS, 0, 512, InvalidRequestError),
    ("df without sr", CONTEXT_NO_SR, F.DF, Cmd.READ, 0, 512, InvalidRequestError),
]


@pytest.mark.parametrize(
    ("t", "flags", "cmd", "offset", "length", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_check(
    t: Transmission, flags: int, cmd: int, offset: int, length: int, expected: type | None
) -> None:
    if expected is None:
        t.check(flags, cmd, offset, length)
    else:
        with pytest.raises(expected) as info:
            t.check(flags, cmd, offset, length)
        assert type(info.value) is expected
        assert str(info.value)


def test_request_errors_carry_the_right_errno() -> None:
    for exc, want in [
        (InvalidRequestError, errno.EINVAL),
        (NoSpaceError, errno.ENOSPC),
        (ReadOnlyError, errno.EPERM),
    ]:
        assert exc.errno == want


def test_short_tail_of_unaligned_export_is_reachable() -> None:
    t = tx(ExportInfo("t", MIB + 100, 0, min_block=512, max_block=64 * KIB))
    t.check(0, Cmd.READ, MIB, 100)
    with pytest.raises(InvalidRequestError):
        t.check(0, Cmd.READ, MIB - 512, 100)


def test_max_write_payload_follows_a_larger_max_block() -> None:
    t = tx(ExportInfo("big", 128 * MIB, 0, max_block=64 * MIB))
    assert t.max_write_payload == 64 * MIB
    t.check(0, Cmd.WRITE, 0, 64 * MIB)
    with pytest.raises(ProtocolError):
        t.check(0, Cmd.WRITE, 0, 64 * MIB + 1)


# --- request header ---------------------------------------------------------------------------


def test_unpack_request_round_trip_and_offset() -> None:
    raw = b"xx" + request(Cmd.WRITE, 4096, 512, flags=1, cookie=0xDEADBEEF)
    assert REQUEST_SIZE == 28
    assert unpack_request(raw, 2) == (1, Cmd.WRITE, 0xDEADBEEF, 4096, 512)
    assert unpack_request(memoryview(raw)[2:]) == (1, Cmd.WRITE, 0xDEADBEEF, 4096, 512)


def test_unpack_request_bad_magic() -> None:
    with pytest.raises(ProtocolError):
        unpack_request(b"\0" * 28)


# --- errno mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "wire"),
    [
        (0, 0),
        (errno.EPERM, 1),
        (errno.EROFS, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.EOPNOTSUPP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.EBADF, 5),
        (errno.EAGAIN, 5),
        (99999, 5),
    ],
)
def test_wire_errno(host: int, wire: int) -> None:
    assert wire_errno(host) == wire


# --- replies ----------------------------------------------------------------------------------


def test_simple_replies() -> None:
    assert PLAIN.simple_reply(0x0102030405060708) == bytes.fromhex(
        "67446698000000000102030405060708"
    )
    assert PLAIN.simple_reply(1, errno.EROFS) == bytes.fromhex("6744669800000001") + bytes(
        [0] * 7 + [1]
    )
    assert PLAIN.read_reply_header(5, 0, 512) == PLAIN.simple_reply(5)


def test_error_reply_simple_without_structured_replies() -> None:
    assert PLAIN.error_reply(9, errno.ENOSPC, "ignored") == PLAIN.simple_reply(9, errno.ENOSPC)


def test_error_reply_structured_when_negotiated() -> None:
    out = FULL.error_reply(9, errno.EDQUOT, "full")
    chunk, rest = parse_chunk(out)
    assert rest == b""
    assert (chunk.flags, chunk.type, chunk.cookie) == (1, ReplyType.ERROR, 9)
    assert chunk.payload == struct.pack(">IH", 28, 4) + b"full"


def test_offset_data_header() -> None:
    out = FULL.chunk_offset_data_header(3, 4096, 512, done=True)
    assert out == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 3, 520, 4096)
    assert FULL.read_reply_header(3, 4096, 512) == out
    assert FULL.chunk_offset_data_header(3, 0, 1, done=False)[4:6] == b"\0\0"


@pytest.mark.parametrize("cookie", [0, 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("length", [1, 2**31 - 9, 2**31 - 8, 2**32 - 9])
def test_fast_replies_carry_every_u64_cookie_and_u32_length(cookie: int, length: int) -> None:
    # The fast path's replies are written as signed fields (BytesWriter): the top bit of a
    # cookie or a chunk length must still come out as the client sent or asked for it.
    offset = 2**63 - 4096
    for done in (True, False):
        assert FULL.chunk_offset_data_header(cookie, offset, length, done) == struct.pack(
            ">IHHQIQ", 0x668E33EF, int(done), 1, cookie, length + 8, offset
        )
    assert FULL.ok_reply(cookie) == PLAIN.simple_reply(cookie)
    assert PLAIN.read_reply_header(cookie, 0, length) == struct.pack(">IIQ", 0x67446698, 0, cookie)


def test_hole_chunk() -> None:
    assert FULL.chunk_hole(3, 8192, 4096, done=False) == struct.pack(
        ">IHHQIQI", 0x668E33EF, 0, 2, 3, 12, 8192, 4096
    )


def test_error_chunks() -> None:
    assert FULL.chunk_error(4, errno.EIO) == struct.pack(
        ">IHHQIIH", 0x668E33EF, 1, 2**15 + 1, 4, 6, 5, 0
    )
    out = FULL.chunk_error_offset(4, errno.EIO, 1024, "bad", done=False)
    chunk, rest = parse_chunk(out)
    assert rest == b""
    assert (chunk.flags, chunk.type) == (0, ReplyType.ERROR_OFFSET)
    assert chunk.payload == struct.pack(">IH", 5, 3) + b"bad" + struct.pack(">Q", 1024)
    with pytest.raises(ValueError):
        FULL.chunk_error(4, 0)
    with pytest.raises(ValueError):
        FULL.chunk_error_offset(4, 0, 0)


def test_error_message_cut_to_string_limit_on_a_character_boundary() -> None:
    chunk, _ = parse_chunk(FULL.chunk_error(1, errno.EIO, "é" * MAX_STRING))
    (msg_len,) = struct.unpack_from(">H", chunk.payload, 4)
    msg = chunk.payload[6:]
    assert msg_len == len(msg) <= MAX_STRING
    assert msg.decode() == "é" * (MAX_STRING // 2)


def test_done_chunk() -> None:
    assert FULL.chunk_done(0xAB) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 0xAB, 0)


def test_block_status_chunk() -> None:
    extents = [(4096, STATE_HOLE | STATE_ZERO), (8192, 0)]
    out = FULL.chunk_block_status(6, 1, extents)
    assert out == struct.pack(">IHHQII", 0x668E33EF, 1, 5, 6, 20, 1) + struct.pack(
        ">4I", 4096, 3, 8192, 0
    )


def test_block_status_req_one_sends_one_clipped_extent() -> None:
    out = FULL.chunk_block_status(6, 1, [(8192, 3), (512, 0)], req_one=True, request_length=512)
    chunk, _ = parse_chunk(out)
    assert chunk.payload == struct.pack(">III", 1, 512, 3)


@pytest.mark.parametrize("extents", [[], [(0, 0)], [(2**32, 0)]])
def test_block_status_rejects_bad_extents(extents: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        FULL.chunk_block_status(6, 1, extents)


def test_request_errors_are_nbd_errors() -> None:
    # The server's translation boundary catches NbdError subclasses only.
    for exc in (InvalidRequestError, NoSpaceError, ReadOnlyError, ProtocolError):
        assert issubclass(exc, NbdError)


def test_max_request_serves_more_than_advertised_as_nbdkit() -> None:
    # Advertise 32 MiB, serve 64 MiB: nbdkit's MAX_REQUEST_SIZE.
    info = ExportInfo("big", 128 * MIB, 0, max_block=DEFAULT_MAX_BLOCK, max_request=MAX_REQUEST)
    t = tx(info, structured=False, contexts={})
    assert MAX_REQUEST == 64 * MIB
    assert t.max_write_payload == MAX_REQUEST
    t.check(0, Cmd.WRITE, 0, MAX_REQUEST)
    t.check(0, Cmd.READ, 0, MAX_REQUEST)
    with pytest.raises(InvalidRequestError):
        t.check(0, Cmd.READ, 0, MAX_REQUEST + 1)
    with pytest.raises(ProtocolError):
        t.check(0, Cmd.WRITE, 0, MAX_REQUEST + 1)


def test_max_request_must_fit_the_minimum_block() -> None:
    with pytest.raises(ValueError, match="max_request"):
        ExportInfo("odd", MIB, 0, min_block=512, max_request=MAX_REQUEST + 1)
