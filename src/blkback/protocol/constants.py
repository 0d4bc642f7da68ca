"""Wire constants of the NBD protocol.

Every value comes from the NBD specification, ``doc/proto.md`` in NetworkBlockDevice/nbd
(sections "Values", "Handshake phase", "Transmission phase" and "Error values"). The names drop
the ``NBD_`` prefix and live in enums so that logs print ``Cmd.READ`` rather than ``0``.
"""

from __future__ import annotations

import enum
from typing import Final

# --- Magics ("Newstyle negotiation", "Request message", "Simple reply message") -----------------
NBDMAGIC: Final = 0x4E42444D41474943  # ASCII "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT: Final = 0x49484156454F5054  # ASCII "IHAVEOPT"; also prefixes every client option
REPLY_MAGIC: Final = 0x3E889045565A9  # option reply magic (fixed newstyle)
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- Limits -------------------------------------------------------------------------------------
# "Conventions": every string MUST be no longer than 4096 bytes.
MAX_STRING: Final = 4096
# "Block size constraints": lengths below 2**25 SHOULD NOT be treated as a denial of service;
# it is also the largest READ/WRITE a maximally interoperable client sends.
DEFAULT_MAX_BLOCK: Final = 32 * 1024 * 1024
# The largest READ/WRITE/CACHE nbdkit serves (MAX_REQUEST_SIZE in its server/internal.h), and
# libnbd's limit too: a server that advertises 32 MiB still accepts this much, so that clients
# that never read NBD_INFO_BLOCK_SIZE (nbd-tester-client's integrityhuge trace) are served.
MAX_REQUEST: Final = 64 * 1024 * 1024
# The 124 reserved zero bytes after an NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES.
EXPORT_NAME_PADDING: Final = 124

# --- base:allocation flags ("The base: metadata namespace") -------------------------------------
STATE_HOLE: Final = 1
STATE_ZERO: Final = 2
BASE_ALLOCATION: Final = "base:allocation"


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits, sent once after the two magics)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits); the server MUST drop the connection on any other bit."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TFlag(enum.IntFlag):
    """Transmission flags (16 bits), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12  # extended-headers branch; never advertised by us


class Opt(enum.IntEnum):
    """Option types sent by the client during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; the error ones have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10  # extended-headers branch


class Info(enum.IntEnum):
    """``NBD_INFO_*`` types carried in ``REP_INFO`` replies to ``OPT_INFO``/``OPT_GO``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental RESIZE extension; never advertised by us


class CmdFlag(enum.IntFlag):
    """Command flags (16 bits) on each request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended-headers branch; invalid without extended headers


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


_CHUNK_ERR = 1 << 15


class ReplyType(enum.IntEnum):
    """Structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = _CHUNK_ERR + 1
    ERROR_OFFSET = _CHUNK_ERR + 2


class NbdErrno(enum.IntEnum):
    """The only error values allowed on the wire ("Error values").

    They were chosen to equal the common (Linux) ``errno`` values, but a host's ``errno`` module
    need not agree, so :func:`blkback.protocol.transmission.wire_errno` translates explicitly.
    """

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108
