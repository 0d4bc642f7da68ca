"""Sans-IO transmission phase: request validation and reply encoding (the hot path).

Rule: no I/O and no per-request allocation beyond the returned ``bytes`` (and, for the fast
path's replies, the writer that builds it). Those replies are written field by field with
mypyc's runtime ``BytesWriter`` (compiled, its writes are inline C, where a ``struct`` pack
is a Python call that boxes every field and made a ``bytes`` of its own); the
other layouts are precompiled :class:`struct.Struct`. :meth:`Transmission.check` does its
common case (a valid READ or WRITE) in a handful of integer comparisons.

How a server uses it, per request::

    flags, cmd, cookie, offset, length = unpack_request(header)   # ProtocolError: close
    try:
        tx.check(flags, cmd, offset, length)                       # ProtocolError: close
    except RequestError as exc:
        if cmd == Cmd.WRITE:
            discard(length)              # the payload is on the wire whatever we answer
        send(tx.error_reply(cookie, exc.errno, str(exc)))
        continue
    ...

Section references are to ``doc/proto.md`` of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Sequence
from typing import Final

from librt.strings import BytesWriter, write_i32_be, write_i64_be
from mypy_extensions import i32, i64

from blkback.errors import (
    InvalidRequestError,
    NoSpaceError,
    ProtocolError,
    ReadOnlyError,
)
from blkback.protocol.constants import (
    DEFAULT_MAX_BLOCK,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    NbdErrno,
    ReplyFlag,
    ReplyType,
    TFlag,
)
from blkback.protocol.handshake import Negotiated

__all__ = [
    "CHUNK_HEADER",
    "REQUEST",
    "REQUEST_SIZE",
    "SIMPLE_REPLY",
    "Transmission",
    "unpack_request",
    "wire_errno",
]

# "Request message": magic, command flags, type, cookie, offset, length.
REQUEST: Final = struct.Struct(">IHHQQI")
REQUEST_SIZE: Final = REQUEST.size  # 28
# "Simple reply message": magic, error, cookie.
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
# "Structured reply chunk message": magic, flags, type, cookie, payload length.
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
_CHUNK_HOLE: Final = struct.Struct(">IHHQIQI")  # header + offset + hole size
_CHUNK_ERROR: Final = struct.Struct(">IHHQIIH")  # header + error + message length
_CHUNK_BLOCK_STATUS: Final = struct.Struct(">IHHQII")  # header + context id
_U64: Final = struct.Struct(">Q")
_SIMPLE_MAGIC: Final = int(SIMPLE_REPLY_MAGIC)
_STRUCTURED_MAGIC: Final = int(STRUCTURED_REPLY_MAGIC)
_OFFSET_DATA_INT: Final = int(ReplyType.OFFSET_DATA)

_DONE: Final = int(ReplyFlag.DONE)
_U32_MAX: Final = 0xFFFFFFFF

# Host errno -> NBD wire errno ("Error values"). EDQUOT and EFBIG SHOULD become ENOSPC and
# EROFS is the read-only case of EPERM. Names missing on a platform are skipped.
_WIRE_ERRNO: Final = {
    getattr(_errno, name): int(wire)
    for name, wire in (
        ("EPERM", NbdErrno.EPERM),
        ("EROFS", NbdErrno.EPERM),
        ("EIO", NbdErrno.EIO),
        ("ENOMEM", NbdErrno.ENOMEM),
        ("EINVAL", NbdErrno.EINVAL),
        ("ENOSPC", NbdErrno.ENOSPC),
        ("EDQUOT", NbdErrno.ENOSPC),
        ("EFBIG", NbdErrno.ENOSPC),
        ("EOVERFLOW", NbdErrno.EOVERFLOW),
        ("ENOTSUP", NbdErrno.ENOTSUP),
        ("EOPNOTSUPP", NbdErrno.ENOTSUP),
        ("ESHUTDOWN", NbdErrno.ESHUTDOWN),
    )
    if hasattr(_errno, name)
}


# The replies of every fast-path request: their constant fields packed once, the rest
# written per request.
_OK_PREFIX: Final = struct.pack(">II", _SIMPLE_MAGIC, 0)
_OFFSET_DATA_DONE: Final = struct.pack(">IHH", _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA_INT)
_OFFSET_DATA_MORE: Final = struct.pack(">IHH", _STRUCTURED_MAGIC, 0, _OFFSET_DATA_INT)


def _u64_bits(value: int) -> i64:
    """The signed 64-bit integer with the bits of ``value`` (0 .. 2**64 - 1), for the writer."""
    # A shift, not a comparison with 2**63: compiled, comparing with a constant that big
    # leaves the native integer path (~280 instructions a call, against a few).
    return value - (1 << 64) if value >> 63 else value


def _u32_bits(value: int) -> i32:
    """The signed 32-bit integer with the bits of ``value`` (0 .. 2**32 - 1), for the writer."""
    return value - (1 << 32) if value >> 31 else value


def wire_errno(err: int) -> int:
    """Translates a host ``errno`` value to the NBD error sent on the wire.

    The spec leaves unlisted errors open ("Which error to return in any other case is not
    specified"). We send ``EIO`` rather than nbdkit's ``EINVAL``: :meth:`Transmission.check`
    only produces listed values, so an unlisted one comes from the storage side, and telling
    the client its (valid) request was invalid would mislead it; clients treat an unexpected
    value as ``EINVAL`` anyway.

    Args:
        err: A host errno (``0`` = success).

    Returns:
        The wire value: ``0`` for ``0``, one of :class:`NbdErrno` otherwise.
    """
    if err == 0:
        return 0
    return _WIRE_ERRNO.get(err, NbdErrno.EIO)


def unpack_request(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[int, int, int, int, int]:
    """Decodes one 28-byte request header.

    Args:
        buf: Buffer holding at least ``offset + REQUEST_SIZE`` bytes.
        offset: Where the header starts in ``buf`` (lets a server parse a batch in place).

    Returns:
        ``(flags, cmd, cookie, offset, length)``.

    Raises:
        ProtocolError: On a wrong magic; the stream cannot be resynchronised, so close.
    """
    magic, flags, cmd, cookie, req_offset, length = REQUEST.unpack_from(buf, offset)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return flags, cmd, cookie, req_offset, length


class Transmission:
    """Validates requests and encodes replies for one negotiated connection.

    Args:
        negotiated: The handshake's outcome.

    Attributes:
        negotiated: As given.
        structured: Whether structured replies were negotiated.
        max_write_payload: The largest WRITE length whose payload the server reads (and drops,
            if the request fails); :meth:`check` raises ``ProtocolError`` above it.
    """

    def __init__(self, negotiated: Negotiated) -> None:
        self.negotiated = negotiated
        export = negotiated.export
        tflags = negotiated.tflags
        self.structured = negotiated.structured_replies
        self._size = export.size
        self._min_mask = export.min_block - 1
        # Advertised or not, every READ/WRITE/CACHE up to this length is served.
        self._max_request = max(export.max_block, export.max_request)
        self._read_only = bool(tflags & TFlag.READ_ONLY)
        # "Block size constraints": any length below 2**25 "SHOULD NOT be considered a denial
        # of service", so a WRITE up to max(accepted length, 32 MiB) is read and failed with
        # EINVAL (as nbdkit skips over-large payloads); only a longer one drops the connection.
        self.max_write_payload = max(self._max_request, DEFAULT_MAX_BLOCK)

        # Which flags each advertised command accepts ("Command flags"). FUA "is valid for all
        # commands, provided NBD_FLAG_SEND_FUA has been negotiated". A command missing here was
        # not advertised, and the client MUST NOT send it.
        fua = int(CmdFlag.FUA) if tflags & TFlag.SEND_FUA else 0
        allowed: dict[int, int] = {
            Cmd.READ: fua | (int(CmdFlag.DF) if tflags & TFlag.SEND_DF else 0),
            Cmd.WRITE: fua,
        }
        if tflags & TFlag.SEND_FLUSH:
            allowed[Cmd.FLUSH] = fua
        if tflags & TFlag.SEND_TRIM:
            allowed[Cmd.TRIM] = fua
        if tflags & TFlag.SEND_CACHE:
            allowed[Cmd.CACHE] = fua
        if tflags & TFlag.SEND_WRITE_ZEROES:
            fast = int(CmdFlag.FAST_ZERO) if tflags & TFlag.SEND_FAST_ZERO else 0
            allowed[Cmd.WRITE_ZEROES] = fua | int(CmdFlag.NO_HOLE) | fast
        if self.structured and negotiated.meta_contexts:
            allowed[Cmd.BLOCK_STATUS] = fua | int(CmdFlag.REQ_ONE)
        self._allowed = allowed

    # --- requests --------------------------------------------------------------------------------

    def check(self, flags: int, cmd: int, offset: int, length: int) -> None:
        """Validates one request header against the negotiation and the export.

        ``NBD_CMD_DISC`` always passes: it gets no reply, so there is no way to report an
        error on it. A passing ``WRITE_ZEROES`` with ``FAST_ZERO`` still obliges the backend to
        fail fast with ``UnsupportedError`` (ENOTSUP) unless zeroing is genuinely fast.

        Args:
            flags: Command flags.
            cmd: Command type.
            offset: Request offset.
            length: Request length.

        Raises:
            ProtocolError: WRITE longer than :attr:`max_write_payload`: close the connection.
            ReadOnlyError: WRITE, TRIM or WRITE_ZEROES on a read-only export (EPERM).
            NoSpaceError: WRITE or WRITE_ZEROES past the end of the export (ENOSPC).
            InvalidRequestError: Anything else the spec says to reject (EINVAL): unknown or
                unadvertised command, a flag unknown, unadvertised or not valid for the
                command, FLUSH with a nonzero offset or length, zero length, READ/TRIM/CACHE/
                BLOCK_STATUS past the end, misalignment to the minimum block size, or a READ,
                WRITE or CACHE longer than the largest request served (the maximum block
                size, or the export's larger ``max_request``). After one of these on a WRITE
                the caller MUST still read and discard the ``length`` payload bytes.
        """
        if cmd == Cmd.WRITE and length > self.max_write_payload:
            raise ProtocolError(
                f"WRITE of {length} bytes exceeds {self.max_write_payload}: disconnecting"
            )
        allowed = self._allowed.get(cmd)
        if allowed is None:
            self._reject_command(cmd)
            return  # DISC
        if flags & ~allowed:
            raise InvalidRequestError(self._flag_problem(flags & ~allowed, cmd))
        if cmd == Cmd.FLUSH:
            # "length and offset are reserved, and MUST be set to all-zero".
            if offset or length:
                raise InvalidRequestError("FLUSH needs offset and length 0")
            return
        if self._read_only and cmd != Cmd.READ and cmd != Cmd.CACHE and cmd != Cmd.BLOCK_STATUS:
            raise ReadOnlyError(f"{Cmd(cmd).name} on a read-only export")
        if length == 0:
            # "the behavior of a server on such a request is unspecified although the server
            # SHOULD NOT disconnect": EINVAL, as nbdkit, keeps every backend call non-empty.
            raise InvalidRequestError(f"{Cmd(cmd).name} of length 0")
        end = offset + length
        if end > self._size:
            msg = f"{Cmd(cmd).name} [{offset}, {end}) beyond the export size {self._size}"
            if cmd == Cmd.WRITE or cmd == Cmd.WRITE_ZEROES:
                raise NoSpaceError(msg)  # "SHOULD return ENOSPC ... beyond the size"
            raise InvalidRequestError(msg)
        if self._min_mask and (
            offset & self._min_mask or (length & self._min_mask and end != self._size)
        ):
            # A length that reaches the end of the export may be short: the spec only says the
            # size SHOULD be a multiple of the minimum block, and the tail must stay reachable.
            raise InvalidRequestError(
                f"{Cmd(cmd).name} not aligned to the minimum block size {self._min_mask + 1}"
            )
        if length > self._max_request and (cmd == Cmd.READ or cmd == Cmd.WRITE or cmd == Cmd.CACHE):
            # TRIM and WRITE_ZEROES carry no payload; the spec asks only for EINVAL (never a
            # disconnect) there, and we simply accept them whole.
            raise InvalidRequestError(
                f"{Cmd(cmd).name} of {length} bytes exceeds the largest request served "
                f"{self._max_request}"
            )

    def _reject_command(self, cmd: int) -> None:
        if cmd == Cmd.DISC:
            return
        if cmd not in Cmd._value2member_map_:
            raise InvalidRequestError(f"unknown command {cmd}")
        name = Cmd(cmd).name
        if self._read_only and cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            raise ReadOnlyError(f"{name} on a read-only export")
        if cmd == Cmd.BLOCK_STATUS:
            raise InvalidRequestError("BLOCK_STATUS without a negotiated metadata context")
        raise InvalidRequestError(f"{name} was not advertised")

    def _flag_problem(self, bad: int, cmd: int) -> str:
        name = Cmd(cmd).name
        known = sum(int(f) for f in CmdFlag if f is not CmdFlag.PAYLOAD_LEN)
        if bad & ~known:
            return f"unknown command flags {bad & ~known:#x} on {name}"
        return "; ".join(f"{f.name} not valid on {name} here" for f in CmdFlag if bad & f)

    # --- replies ---------------------------------------------------------------------------------

    def simple_reply(self, cookie: int, error: int = 0) -> bytes:
        """Encodes a simple reply header (for a successful READ, the data follows it).

        Args:
            cookie: The request's cookie.
            error: Host errno, translated by :func:`wire_errno`; 0 = success.

        Returns:
            16 bytes.
        """
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, wire_errno(error) if error else 0, cookie)

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """Encodes what precedes a successful READ's data, as the negotiation requires.

        Args:
            cookie: The request's cookie.
            offset: The READ's offset.
            length: Bytes of data that follow (the whole READ; at least 1).

        Returns:
            A simple reply header, or with structured replies one final ``OFFSET_DATA`` chunk
            header: send it only when every byte is in hand, because a chunk marked DONE MUST
            NOT be sent "if there is still a possibility of detecting an error".
        """
        if self.structured:
            return self.chunk_offset_data_header(cookie, offset, length, True)
        return self.ok_reply(cookie)

    def ok_reply(self, cookie: int) -> bytes:
        """Encodes the whole reply of a successful request that returns no data.

        A simple reply in every negotiation: it is allowed for any request but a READ
        (structured replies only add what a simple reply cannot carry).

        Args:
            cookie: The request's cookie.

        Returns:
            16 bytes.
        """
        out = BytesWriter()
        out.write(_OK_PREFIX)
        write_i64_be(out, _u64_bits(cookie))
        return out.getvalue()

    def error_reply(self, cookie: int, errno: int, message: str = "") -> bytes:
        """Encodes a whole error reply in the form the negotiation requires.

        With structured replies, a READ MUST NOT get a simple reply, and errors SHOULD travel
        structured so they can carry a message; ``NBD_REPLY_TYPE_ERROR`` is "valid as a reply
        to any request", so every error gets one final ERROR chunk. Without them, a simple
        reply with the error (and, for a READ, no payload).

        Args:
            cookie: The request's cookie.
            errno: Host errno (nonzero), translated by :func:`wire_errno`.
            message: Text for the user; dropped for simple replies.

        Returns:
            The complete reply.
        """
        if self.structured:
            return self.chunk_error(cookie, errno, message, done=True)
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, wire_errno(errno), cookie)

    def chunk_offset_data_header(self, cookie: int, offset: int, length: int, done: bool) -> bytes:
        """Encodes an ``OFFSET_DATA`` chunk header plus its 8-byte offset; data follows.

        Args:
            cookie: The request's cookie.
            offset: Absolute export offset of the data.
            length: Data bytes that follow (1 .. 2**32 - 9).
            done: Mark this the final chunk.

        Returns:
            28 bytes.
        """
        out = BytesWriter()
        out.write(_OFFSET_DATA_DONE if done else _OFFSET_DATA_MORE)
        write_i64_be(out, _u64_bits(cookie))
        write_i32_be(out, _u32_bits(length + 8))
        write_i64_be(out, offset)
        return out.getvalue()

    def chunk_hole(self, cookie: int, offset: int, length: int, done: bool) -> bytes:
        """Encodes an ``OFFSET_HOLE`` chunk: ``length`` bytes at ``offset`` read as zero.

        Args:
            cookie: The request's cookie.
            offset: Absolute export offset of the hole.
            length: Hole size (nonzero, fits 32 bits).
            done: Mark this the final chunk.

        Returns:
            32 bytes.
        """
        return _CHUNK_HOLE.pack(
            STRUCTURED_REPLY_MAGIC,
            _DONE if done else 0,
            ReplyType.OFFSET_HOLE,
            cookie,
            12,
            offset,
            length,
        )

    def chunk_error(self, cookie: int, errno: int, message: str = "", done: bool = True) -> bytes:
        """Encodes an ``ERROR`` chunk.

        Args:
            cookie: The request's cookie.
            errno: Host errno (nonzero), translated by :func:`wire_errno`.
            message: Text for the user, cut to 4096 bytes (the string limit).
            done: Mark this the final chunk.

        Returns:
            The chunk.

        Raises:
            ValueError: If ``errno`` is 0 (the error field "MUST be nonzero").
        """
        if not errno:
            raise ValueError("an error chunk needs a nonzero errno")
        raw = _message_bytes(message)
        return (
            _CHUNK_ERROR.pack(
                STRUCTURED_REPLY_MAGIC,
                _DONE if done else 0,
                ReplyType.ERROR,
                cookie,
                6 + len(raw),
                wire_errno(errno),
                len(raw),
            )
            + raw
        )

    def chunk_error_offset(
        self, cookie: int, errno: int, offset: int, message: str = "", done: bool = True
    ) -> bytes:
        """Encodes an ``ERROR_OFFSET`` chunk: the error happened at ``offset``.

        Args:
            cookie: The request's cookie.
            errno: Host errno (nonzero), translated by :func:`wire_errno`.
            offset: Where the error occurred, inside the request's range.
            message: Text for the user, cut to 4096 bytes.
            done: Mark this the final chunk.

        Returns:
            The chunk.

        Raises:
            ValueError: If ``errno`` is 0.
        """
        if not errno:
            raise ValueError("an error chunk needs a nonzero errno")
        raw = _message_bytes(message)
        return (
            _CHUNK_ERROR.pack(
                STRUCTURED_REPLY_MAGIC,
                _DONE if done else 0,
                ReplyType.ERROR_OFFSET,
                cookie,
                14 + len(raw),
                wire_errno(errno),
                len(raw),
            )
            + raw
            + _U64.pack(offset)
        )

    def chunk_done(self, cookie: int) -> bytes:
        """Encodes the ``NONE`` chunk that ends a structured reply (always with DONE).

        Args:
            cookie: The request's cookie.

        Returns:
            20 bytes.
        """
        return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.NONE, cookie, 0)

    def chunk_block_status(
        self,
        cookie: int,
        context_id: int,
        extents: Sequence[tuple[int, int]],
        done: bool = True,
        *,
        req_one: bool = False,
        request_length: int = _U32_MAX,
    ) -> bytes:
        """Encodes one ``BLOCK_STATUS`` chunk (one per negotiated context per request).

        Args:
            cookie: The request's cookie.
            context_id: A key of ``negotiated.meta_contexts``.
            extents: Consecutive ``(length, flags)`` descriptors from the request's offset;
                lengths nonzero and at most 2**32 - 1.
            done: Mark this the final chunk.
            req_one: The request had ``REQ_ONE``: send only the first descriptor, cut to
                ``request_length`` ("exactly one descriptor ... MUST NOT exceed the length").
            request_length: The request's length; used with ``req_one``.

        Returns:
            The chunk.

        Raises:
            ValueError: If ``extents`` is empty or holds a length of 0 or over 32 bits.
        """
        if not extents:
            raise ValueError("a block status chunk needs at least one extent")
        if req_one:
            first_len, first_flags = extents[0]
            extents = [(min(first_len, request_length), first_flags)]
        flat: list[int] = []
        for ext_len, ext_flags in extents:
            if not 0 < ext_len <= _U32_MAX:
                raise ValueError(f"extent length out of range: {ext_len}")
            flat.append(ext_len)
            flat.append(ext_flags)
        header = _CHUNK_BLOCK_STATUS.pack(
            STRUCTURED_REPLY_MAGIC,
            _DONE if done else 0,
            ReplyType.BLOCK_STATUS,
            cookie,
            4 + 4 * len(flat),
            context_id,
        )
        return header + struct.pack(f">{len(flat)}I", *flat)


def _message_bytes(message: str) -> bytes:
    # Cut at 4096 bytes without splitting a UTF-8 sequence (the result must stay valid UTF-8).
    raw = message.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()
