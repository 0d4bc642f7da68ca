"""Sans-IO server side of the NBD fixed-newstyle handshake.

Rule 1: this module never touches a socket, a clock or a thread. Bytes come in through
:meth:`ServerHandshake.feed`, bytes to send come back out, and the caller looks at
:attr:`ServerHandshake.state` after each call.

Rule 2: nothing the client sends makes an exception escape. Malformed options get
``REP_ERR_INVALID`` and haggling goes on; violations the spec lets us (or makes us) answer with
a hard disconnect end in :attr:`HandshakeState.CLOSED` with :attr:`ServerHandshake.error` set.

A connection's life, as the caller sees it::

    hs = ServerHandshake(catalog)
    send(hs.initial_bytes())
    while hs.state is HandshakeState.IN_PROGRESS:
        send(hs.feed(recv()))              # recv() == b"" at EOF
        if hs.state is HandshakeState.START_TLS:
            wrap_socket_in_tls(); hs.tls_started()
    if hs.state is HandshakeState.DONE:
        transmission(hs.negotiated, first_bytes=hs.leftover)

Section references are to ``doc/proto.md`` of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from blkback.errors import ProtocolError
from blkback.protocol.constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_BLOCK,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TFlag,
)

__all__ = [
    "ExportCatalog",
    "ExportInfo",
    "HandshakeState",
    "Negotiated",
    "ServerHandshake",
    "StaticCatalog",
    "final_tflags",
]

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
_REPLY_HEADER: Final = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
_GREETING: Final = struct.Struct(">QQH")
_EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")

_SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# Plain ints: in Python 3.11 ``~`` on an IntFlag only inverts within the defined members.
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
# BLOCK_STAT_PAYLOAD only means something with extended headers, which we do not offer.
_ALL_TFLAGS: Final = sum(int(f) for f in TFlag if f is not TFlag.BLOCK_STAT_PAYLOAD)

# Context ids are opaque to the client ("NBD_OPT_SET_META_CONTEXT"); a fixed id per name keeps
# logs comparable across connections. Zero is avoided because LIST replies use it.
_CONTEXT_IDS: Final = {BASE_ALLOCATION: 1}

TlsMode = Literal["off", "allow", "require"]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ExportInfo:
    """What the backend offers under one export name.

    Attributes:
        name: The canonical export name (at most 4096 UTF-8 bytes, no NUL).
        size: Export size in bytes.
        tflags: Transmission flags the backend supports (:class:`TFlag` bits). The handshake
            adds ``HAS_FLAGS`` and removes what the negotiation rules forbid; see
            :func:`final_tflags`.
        min_block: Minimum block size: a power of 2, at most 64 KiB.
        pref_block: Preferred block size: a power of 2, at least ``max(min_block, 512)``.
        max_block: Largest READ/WRITE/CACHE length advertised (``NBD_INFO_BLOCK_SIZE``): a
            multiple of ``min_block`` (or ``0xFFFFFFFF``), at least ``min(pref_block, size)``.
        max_request: Largest READ/WRITE/CACHE length accepted, if larger than ``max_block``
            (0: ``max_block``). The spec lets a server serve more than it advertises; nbdkit
            serves 64 MiB (:data:`MAX_REQUEST`) whatever it advertises.
        description: Optional human-readable text (``INFO_DESCRIPTION``, ``OPT_LIST``).

    Raises:
        ValueError: If a field breaks the constraints of "Block size constraints" or
            "Conventions" (strings). Checked at construction so bad configuration never
            reaches the wire.
    """

    name: str
    size: int
    tflags: int
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    description: str = ""
    max_request: int = 0

    def __post_init__(self) -> None:
        for label, text in (("name", self.name), ("description", self.description)):
            if "\0" in text or len(text.encode()) > MAX_STRING:
                raise ValueError(f"export {label} must be <= {MAX_STRING} bytes without NUL")
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size out of range: {self.size}")
        if not 0 <= self.tflags <= 0xFFFF:
            raise ValueError(f"tflags must fit 16 bits: {self.tflags:#x}")
        if not _is_pow2(self.min_block) or self.min_block > 65536:
            raise ValueError(f"min_block must be a power of 2 <= 65536: {self.min_block}")
        if not _is_pow2(self.pref_block) or self.pref_block < max(self.min_block, 512):
            raise ValueError("pref_block must be a power of 2 >= max(min_block, 512)")
        if self.max_block != 0xFFFFFFFF and (
            not 0 < self.max_block <= 0xFFFFFFFF or self.max_block % self.min_block
        ):
            raise ValueError("max_block must be a multiple of min_block or 0xFFFFFFFF")
        if self.max_block < min(self.pref_block, self.size):
            raise ValueError("max_block must be >= min(pref_block, size)")
        if not 0 <= self.max_request <= 0xFFFFFFFF or self.max_request % self.min_block:
            raise ValueError("max_request must be a multiple of min_block below 4 GiB, or 0")


class ExportCatalog(Protocol):
    """Where the handshake looks exports up; implemented by the server's configuration."""

    def lookup(self, name: str) -> ExportInfo | None:
        """Returns the export called ``name`` (``""`` = the default export), or None."""
        ...

    def names(self) -> list[str]:
        """Returns the names ``OPT_LIST`` announces, in order."""
        ...


class StaticCatalog:
    """An :class:`ExportCatalog` over a fixed list of exports.

    Args:
        exports: The exports, announced by ``OPT_LIST`` in this order.
        default: Name of the export that ``""`` selects; None means the first export, and
            ``""`` selects nothing if ``exports`` is empty.
    """

    def __init__(self, exports: Iterable[ExportInfo], default: str | None = None) -> None:
        self._exports = {e.name: e for e in exports}
        self._default = default if default is not None else next(iter(self._exports), None)

    def lookup(self, name: str) -> ExportInfo | None:
        """Returns the export called ``name``; ``""`` is the default export."""
        if name == "" and self._default is not None:
            return self._exports.get(self._default)
        return self._exports.get(name)

    def names(self) -> list[str]:
        """Returns every export name."""
        return list(self._exports)


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake, input to the transmission phase.

    Attributes:
        export: The export the client selected.
        structured_replies: ``OPT_STRUCTURED_REPLY`` was acknowledged (and not reset by TLS).
        meta_contexts: Selected metadata contexts, context id -> name; empty unless the last
            ``OPT_SET_META_CONTEXT`` named this same export.
        no_zeroes: The client set ``NBD_FLAG_C_NO_ZEROES``.
        tflags: The transmission flags actually sent to the client.
        tls: TLS was started during the handshake.
        block_size_requested: The final ``OPT_GO`` asked for ``INFO_BLOCK_SIZE``, so the client
            promised to honour the constraints ("Block size constraints").
    """

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str]
    no_zeroes: bool
    tflags: int
    tls: bool = False
    block_size_requested: bool = False


class HandshakeState(enum.Enum):
    """Where the handshake stands after the last :meth:`ServerHandshake.feed`."""

    IN_PROGRESS = enum.auto()
    DONE = enum.auto()  # transmission phase: see .negotiated and .leftover
    CLOSED = enum.auto()  # close the connection (after sending what feed returned)
    START_TLS = enum.auto()  # send what feed returned, start TLS, then call tls_started()


def final_tflags(export: ExportInfo, *, structured_replies: bool) -> int:
    """Computes the transmission flags to advertise for ``export``.

    Args:
        export: The export.
        structured_replies: Whether structured replies are negotiated at this point.

    Returns:
        ``export.tflags`` restricted to known bits, with ``HAS_FLAGS`` set (it "MUST always be
        1"), ``SEND_DF`` cleared without structured replies (MUST, "Transmission flags"), and
        ``SEND_FAST_ZERO`` cleared without ``SEND_WRITE_ZEROES`` (MUST, same section).
    """
    flags = (export.tflags & _ALL_TFLAGS) | int(TFlag.HAS_FLAGS)
    if not structured_replies:
        flags &= ~int(TFlag.SEND_DF)
    if not flags & TFlag.SEND_WRITE_ZEROES:
        flags &= ~int(TFlag.SEND_FAST_ZERO)
    return int(flags)


class _Malformed(Exception):  # noqa: N818 - internal control flow, never escapes
    """An option payload is syntactically invalid: answer REP_ERR_INVALID."""


class _Close(Exception):  # noqa: N818 - internal control flow, never escapes
    """The handshake must end with a hard disconnect."""

    def __init__(self, reason: str, *, violation: bool = True) -> None:
        super().__init__(reason)
        self.violation = violation


class _Reader:
    """Cursor over one option's payload; every read is bounds-checked."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _Malformed("length field runs past the option data")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _Malformed(f"string longer than {MAX_STRING} bytes")
        return _decode(self.take(n))

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _decode(raw: bytes) -> str:
    """Decodes a protocol string: UTF-8 without NUL ("Conventions")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed("string is not valid UTF-8") from exc
    if "\0" in text:
        raise _Malformed("string contains NUL")
    return text


def _reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(REPLY_MAGIC, opt, rep, len(payload)) + payload


def _error(opt: int, rep: Rep, message: str) -> bytes:
    # Error replies MAY carry a message for the user ("Option reply types").
    return _reply(opt, rep, message.encode()[:MAX_STRING])


class _Phase(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_DATA = enum.auto()
    SKIP_DATA = enum.auto()  # discarding an oversized option's payload


class ServerHandshake:
    """The server side of fixed-newstyle negotiation, as a byte-in/byte-out state machine.

    Args:
        catalog: Where exports are looked up.
        tls: ``"off"`` (NOTLS: ``OPT_STARTTLS`` gets ``REP_ERR_POLICY``), ``"allow"``
            (SELECTIVETLS with no TLS-only export: TLS at the client's choice) or
            ``"require"`` (FORCEDTLS: every option but ``STARTTLS``/``ABORT`` gets
            ``REP_ERR_TLS_REQD`` until TLS is up; ``EXPORT_NAME`` before TLS closes).
        max_option_len: Largest option payload buffered. A larger one is discarded as it
            streams in and answered with ``REP_ERR_TOO_BIG`` (``EXPORT_NAME`` cannot be
            errored, so it closes instead).
        max_options: Options accepted per connection (counting every option, also across
            TLS); one more closes the connection as a denial of service, which "Termination
            of the session during option haggling" permits.

    Attributes:
        state: The current :class:`HandshakeState`.
        negotiated: The outcome, once ``state`` is ``DONE``.
        leftover: Bytes that arrived after the final ``OPT_GO``/``OPT_EXPORT_NAME``; they are
            the start of the transmission phase (pipelined requests).
        error: Set when ``state`` is ``CLOSED`` because the client broke the protocol (or a
            limit); None after ``OPT_ABORT`` or a clean EOF between options.
        close_reason: A short text for logs whenever ``state`` is ``CLOSED``.
    """

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        tls: TlsMode = "off",
        max_option_len: int = 64 * 1024,
        max_options: int = 1000,
    ) -> None:
        if tls not in ("off", "allow", "require"):
            raise ValueError(f"tls must be 'off', 'allow' or 'require', not {tls!r}")
        self._catalog = catalog
        self._tls_mode: TlsMode = tls
        self._max_option_len = max_option_len
        self._max_options = max_options

        self.state = HandshakeState.IN_PROGRESS
        self.negotiated: Negotiated | None = None
        self.leftover = b""
        self.error: ProtocolError | None = None
        self.close_reason = ""

        self._buf = bytearray()
        self._phase = _Phase.CLIENT_FLAGS
        self._opt = 0
        self._opt_len = 0
        self._skip = 0
        self._options_seen = 0
        self._no_zeroes = False
        self._tls_active = False
        self._structured = False
        self._meta_export: ExportInfo | None = None
        self._meta_contexts: dict[int, str] = {}

    # --- public API ------------------------------------------------------------------------------

    def initial_bytes(self) -> bytes:
        """Returns the greeting the server sends on connect.

        Returns:
            ``NBDMAGIC``, ``IHAVEOPT`` and the handshake flags ``FIXED_NEWSTYLE|NO_ZEROES``
            (18 bytes, "Newstyle negotiation").
        """
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_HANDSHAKE_FLAGS)

    def feed(self, data: bytes) -> bytes:
        """Consumes bytes from the client and returns the bytes to send back.

        Args:
            data: What the socket delivered; ``b""`` means the client closed its side. Once
                ``DONE``, data is appended to :attr:`leftover`; in ``CLOSED`` or ``START_TLS``
                it is ignored (in ``START_TLS`` call :meth:`tls_started` first).

        Returns:
            Replies to send, in order (possibly empty). Send them even when the state becomes
            ``CLOSED`` after ``OPT_ABORT`` (the ACK), ignoring a send error there: the spec
            asks the server to tolerate a client that closes without reading it.
        """
        if self.state is HandshakeState.DONE:
            self.leftover += data
            return b""
        if self.state is not HandshakeState.IN_PROGRESS:
            return b""
        out: list[bytes] = []
        if not data:
            self._on_eof()
            return b""
        self._buf += data
        try:
            self._run(out)
        except _Close as close:
            self._close(str(close), violation=close.violation)
        return b"".join(out)

    def tls_started(self) -> None:
        """Tells the handshake that the connection now runs over TLS.

        After an ``OPT_STARTTLS`` ACK the spec says the server "MUST NOT preserve any
        negotiation state" from before, so structured replies and meta contexts are reset.

        Raises:
            RuntimeError: If the state is not ``START_TLS`` (a caller bug, not a peer error).
        """
        if self.state is not HandshakeState.START_TLS:
            raise RuntimeError(f"tls_started() in state {self.state.name}")
        self._tls_active = True
        self._structured = False
        self._meta_export = None
        self._meta_contexts = {}
        self.state = HandshakeState.IN_PROGRESS

    # --- byte framing ----------------------------------------------------------------------------

    def _run(self, out: list[bytes]) -> None:
        buf = self._buf
        while self.state is HandshakeState.IN_PROGRESS:
            if self._phase is _Phase.CLIENT_FLAGS:
                if len(buf) < 4:
                    return
                (client_flags,) = _U32.unpack_from(buf)
                del buf[:4]
                self._on_client_flags(client_flags)
                self._phase = _Phase.OPTION_HEADER
            elif self._phase is _Phase.OPTION_HEADER:
                if len(buf) < _OPTION_HEADER.size:
                    return
                magic, opt, length = _OPTION_HEADER.unpack_from(buf)
                del buf[: _OPTION_HEADER.size]
                self._on_option_header(magic, opt, length)
            elif self._phase is _Phase.SKIP_DATA:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return
                self._phase = _Phase.OPTION_HEADER
                out.append(
                    _error(self._opt, Rep.ERR_TOO_BIG, "option data exceeds the server limit")
                )
            else:  # OPTION_DATA
                if len(buf) < self._opt_len:
                    return
                payload = bytes(buf[: self._opt_len])
                del buf[: self._opt_len]
                self._phase = _Phase.OPTION_HEADER
                self._dispatch(self._opt, payload, out)
        if self.state is HandshakeState.DONE:
            self.leftover = bytes(buf)
            buf.clear()
        elif self.state is HandshakeState.START_TLS and buf:
            # The client MUST wait for the ACK before starting TLS, so anything already here is
            # neither a TLS record we may hand on nor a valid option.
            raise _Close("client sent data after OPT_STARTTLS before the ACK")

    def _on_eof(self) -> None:
        if self._phase is _Phase.OPTION_HEADER and not self._buf:
            # Between options: a hard disconnect by the client, but nothing is lost.
            self._close("client closed the connection during option haggling", violation=False)
        else:
            self._close("client closed the connection in the middle of a message")

    def _close(self, reason: str, *, violation: bool = True) -> None:
        self.state = HandshakeState.CLOSED
        self.close_reason = reason
        if violation:
            self.error = ProtocolError(reason)
        self._buf.clear()

    def _on_client_flags(self, client_flags: int) -> None:
        # "Client flags": the server MUST drop the connection on an unknown flag.
        if client_flags & ~_KNOWN_CLIENT_FLAGS:
            raise _Close(f"unknown client flags {client_flags:#x}")
        if self._tls_mode == "require" and not client_flags & ClientFlag.C_FIXED_NEWSTYLE:
            # TLS needs fixed newstyle ("Server-side requirements"); a client without it could
            # only reach an export in plain text, which this server refuses.
            raise _Close("TLS is required but the client did not set C_FIXED_NEWSTYLE")
        self._no_zeroes = bool(client_flags & ClientFlag.C_NO_ZEROES)

    def _on_option_header(self, magic: int, opt: int, length: int) -> None:
        if magic != IHAVEOPT:
            raise _Close(f"bad option magic {magic:#x}")
        self._options_seen += 1
        if self._options_seen > self._max_options:
            raise _Close(f"more than {self._max_options} options")
        self._opt = opt
        self._opt_len = length
        if length <= self._max_option_len:
            self._phase = _Phase.OPTION_DATA
        elif opt == Opt.EXPORT_NAME:
            raise _Close("OPT_EXPORT_NAME data too long")
        else:
            # Discarding as it streams costs no memory, and "the server MUST ... simply error
            # inbound options" rather than disconnect; max_options bounds the total.
            self._phase = _Phase.SKIP_DATA
            self._skip = length

    # --- options ---------------------------------------------------------------------------------

    def _dispatch(self, opt: int, data: bytes, out: list[bytes]) -> None:
        if opt == Opt.EXPORT_NAME:
            self._opt_export_name(data, out)
            return
        if opt == Opt.ABORT:
            # MUST be ACKed; any data SHOULD be ignored ("NBD_OPT_ABORT").
            out.append(_reply(opt, Rep.ACK))
            self.state = HandshakeState.CLOSED
            self.close_reason = "client sent OPT_ABORT"
            return
        if opt == Opt.STARTTLS:
            self._opt_starttls(data, out)
            return
        if self._tls_mode == "require" and not self._tls_active:
            # FORCEDTLS: every other option, known or not, MUST get ERR_TLS_REQD.
            out.append(_error(opt, Rep.ERR_TLS_REQD, "TLS is required"))
            return
        try:
            if opt == Opt.LIST:
                self._opt_list(data, out)
            elif opt in (Opt.INFO, Opt.GO):
                self._opt_info_go(opt, data, out)
            elif opt == Opt.STRUCTURED_REPLY:
                self._opt_structured_reply(data, out)
            elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._opt_meta_context(opt, data, out)
            else:
                # Unknown options (and EXTENDED_HEADERS, which we do not implement) MUST get
                # ERR_UNSUP, and haggling continues ("Fixed newstyle negotiation").
                out.append(_error(opt, Rep.ERR_UNSUP, "option not supported"))
        except _Malformed as exc:
            out.append(_error(opt, Rep.ERR_INVALID, str(exc)))

    def _opt_export_name(self, data: bytes, out: list[bytes]) -> None:
        # This option cannot be errored: every failure is a hard disconnect ("NBD_OPT_EXPORT_NAME").
        if self._tls_mode == "require" and not self._tls_active:
            raise _Close("OPT_EXPORT_NAME before TLS while TLS is required", violation=False)
        if len(data) > MAX_STRING:
            raise _Close("export name longer than 4096 bytes")
        try:
            name = _decode(data)
        except _Malformed as exc:
            raise _Close(f"bad export name: {exc}") from exc
        export = self._catalog.lookup(name)
        if export is None:
            raise _Close(f"unknown export {name!r}", violation=False)
        tflags = final_tflags(export, structured_replies=self._structured)
        reply = _EXPORT_NAME_REPLY.pack(export.size, tflags)
        if not self._no_zeroes:
            reply += bytes(EXPORT_NAME_PADDING)
        out.append(reply)
        self._finish(export, tflags, block_size_requested=False)

    def _opt_starttls(self, data: bytes, out: list[bytes]) -> None:
        if self._tls_mode == "off":
            # NOTLS: MUST answer ERR_POLICY or ERR_UNSUP; POLICY says "known, but refused".
            out.append(_error(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not enabled"))
        elif data:
            out.append(_error(Opt.STARTTLS, Rep.ERR_INVALID, "OPT_STARTTLS takes no data"))
        elif self._tls_active:
            out.append(_error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already active"))
        else:
            out.append(_reply(Opt.STARTTLS, Rep.ACK))
            self.state = HandshakeState.START_TLS

    def _opt_list(self, data: bytes, out: list[bytes]) -> None:
        if data:
            raise _Malformed("OPT_LIST takes no data")
        for name in self._catalog.names():
            export = self._catalog.lookup(name)
            raw = name.encode()
            # After the name, REP_SERVER MAY carry a human-readable description.
            extra = export.description.encode() if export is not None else b""
            out.append(_reply(Opt.LIST, Rep.SERVER, _U32.pack(len(raw)) + raw + extra))
        out.append(_reply(Opt.LIST, Rep.ACK))

    def _opt_info_go(self, opt: int, data: bytes, out: list[bytes]) -> None:
        r = _Reader(data)
        name = r.string(r.u32())
        count = r.u16()
        requests = {r.u16() for _ in range(count)}
        if not r.at_end():
            raise _Malformed("trailing bytes after the information requests")
        export = self._catalog.lookup(name)
        if export is None:
            out.append(_error(opt, Rep.ERR_UNKNOWN, f"unknown export {name!r}"))
            return
        tflags = final_tflags(export, structured_replies=self._structured)
        # INFO_EXPORT is mandatory; BLOCK_SIZE is sent unasked too, which the spec allows
        # ("MAY send information ... not explicitly requested") and which tells clients that
        # read it what we enforce. NAME and DESCRIPTION only on request.
        out.append(_reply(opt, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, tflags)))
        if Info.NAME in requests:
            out.append(_reply(opt, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode()))
        if Info.DESCRIPTION in requests and export.description:
            payload = _U16.pack(Info.DESCRIPTION) + export.description.encode()
            out.append(_reply(opt, Rep.INFO, payload))
        block = _INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, export.min_block, export.pref_block, export.max_block
        )
        out.append(_reply(opt, Rep.INFO, block))
        out.append(_reply(opt, Rep.ACK))
        if opt == Opt.GO:
            self._finish(export, tflags, block_size_requested=Info.BLOCK_SIZE in requests)

    def _opt_structured_reply(self, data: bytes, out: list[bytes]) -> None:
        if data:
            raise _Malformed("OPT_STRUCTURED_REPLY takes no data")
        # A repeat MAY be failed with ERR_INVALID ("Fixed newstyle negotiation"); we ACK it
        # instead, because a client that read an error might conclude structured replies are
        # off while we would send them anyway.
        self._structured = True
        out.append(_reply(Opt.STRUCTURED_REPLY, Rep.ACK))

    def _opt_meta_context(self, opt: int, data: bytes, out: list[bytes]) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            # SET replaces the previous selection "including when this command fails".
            self._meta_export = None
            self._meta_contexts = {}
        r = _Reader(data)
        name = r.string(r.u32())
        queries = [r.string(r.u32()) for _ in range(r.u32())]
        if not r.at_end():
            raise _Malformed("trailing bytes after the queries")
        for query in queries:
            if ":" not in query:
                raise _Malformed(f"query {query!r} lacks a namespace")
        if setting and not self._structured:
            # SET MUST NOT precede structured replies; the server SHOULD answer ERR_INVALID.
            # LIST without them is only a SHOULD NOT for the client, so we answer it.
            raise _Malformed("OPT_SET_META_CONTEXT needs structured replies first")
        export = self._catalog.lookup(name)
        if export is None:
            out.append(_error(opt, Rep.ERR_UNKNOWN, f"unknown export {name!r}"))
            return
        found = _match_contexts(queries, listing=not setting)
        for context in found:
            # LIST replies carry id 0 ("reserved and SHOULD be set to zero").
            cid = _CONTEXT_IDS[context] if setting else 0
            out.append(_reply(opt, Rep.META_CONTEXT, _U32.pack(cid) + context.encode()))
        if setting:
            self._meta_export = export
            self._meta_contexts = {_CONTEXT_IDS[c]: c for c in found}
        out.append(_reply(opt, Rep.ACK))

    def _finish(self, export: ExportInfo, tflags: int, *, block_size_requested: bool) -> None:
        # Contexts count only if the last SET named the export now selected ("Metadata
        # querying"); compared as resolved exports so "" and the default's name agree.
        contexts = dict(self._meta_contexts) if self._meta_export == export else {}
        self.negotiated = Negotiated(
            export=export,
            structured_replies=self._structured,
            meta_contexts=contexts,
            no_zeroes=self._no_zeroes,
            tflags=tflags,
            tls=self._tls_active,
            block_size_requested=block_size_requested,
        )
        self.state = HandshakeState.DONE


def _match_contexts(queries: Sequence[str], *, listing: bool) -> list[str]:
    """Returns the contexts (deduplicated, in a stable order) the queries select.

    Only ``base:allocation`` exists. Per "The base: metadata namespace": ``base:`` is a
    wildcard when listing and ignored when setting; unknown leaves and unknown namespaces MUST
    be ignored; no query at all lists everything and sets nothing.
    """
    if not queries:
        return [BASE_ALLOCATION] if listing else []
    for query in queries:
        if query == BASE_ALLOCATION or (listing and query == "base:"):
            return [BASE_ALLOCATION]
    return []
