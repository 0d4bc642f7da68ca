"""Hypothesis: hostile bytes never make the codec raise anything but its documented errors."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_test_client import client_flags, info_data, meta_data, option, parse_replies

from blkback.errors import ProtocolError, RequestError
from blkback.protocol.constants import Cmd, Info, Opt, Rep, TFlag
from blkback.protocol.handshake import (
    ExportInfo,
    HandshakeState,
    Negotiated,
    ServerHandshake,
    StaticCatalog,
    final_tflags,
)
from blkback.protocol.transmission import Transmission

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MIB = 1024 * 1024
CATALOG = StaticCatalog(
    [
        ExportInfo("disk", 16 * MIB, 0x0FFF, min_block=512, max_block=MIB),
        ExportInfo("ro", MIB, TFlag.READ_ONLY),
    ]
)
OPTS = [*list(Opt), 0, 12, 0xFFFFFFFF]


def drive(data: bytes, cuts: list[int], **kw: object) -> ServerHandshake:
    """Feeds ``data`` cut at ``cuts``, then EOF, handling START_TLS; checks the invariants."""
    hs = ServerHandshake(CATALOG, max_option_len=256, max_options=50, **kw)  # type: ignore[arg-type]
    hs.initial_bytes()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)] + [b""]
    for piece in pieces:
        out = hs.feed(piece)
        assert isinstance(out, bytes)
        check_state(hs)
        if hs.state is HandshakeState.START_TLS:
            hs.tls_started()
    return hs


def check_state(hs: ServerHandshake) -> None:
    assert hs.state in HandshakeState
    if hs.state is HandshakeState.DONE:
        assert hs.negotiated is not None
        assert hs.error is None
        assert hs.negotiated.tflags & TFlag.HAS_FLAGS
    else:
        assert hs.negotiated is None
    if hs.state is HandshakeState.CLOSED:
        assert hs.close_reason
        assert hs.error is None or isinstance(hs.error, ProtocolError)
    else:
        assert hs.error is None


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    drive(data, cuts)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_random_options_after_valid_flags_never_raise(data: bytes, cuts: list[int]) -> None:
    drive(client_flags(3) + data, cuts, tls="allow")


def option_strategy() -> st.SearchStrategy[bytes]:
    names = st.sampled_from(["", "disk", "ro", "missing"])
    infos = st.lists(st.sampled_from([*list(Info), 99]), max_size=4)
    queries = st.lists(st.sampled_from(["base:allocation", "base:", "x:y", "nocolon"]), max_size=3)
    return st.one_of(
        st.builds(lambda o, d: option(o, d), st.sampled_from(OPTS), st.binary(max_size=40)),
        st.builds(lambda n, i: option(Opt.INFO, info_data(n, i)), names, infos),
        st.builds(lambda n, i: option(Opt.GO, info_data(n, i)), names, infos),
        st.builds(lambda n, q: option(Opt.SET_META_CONTEXT, meta_data(n, q)), names, queries),
        st.builds(lambda n, q: option(Opt.LIST_META_CONTEXT, meta_data(n, q)), names, queries),
        st.sampled_from(
            [option(Opt.STRUCTURED_REPLY), option(Opt.LIST), option(Opt.STARTTLS), option(99)]
        ),
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    script = bytearray(client_flags(draw(st.sampled_from([0, 1, 3]))))
    for opt in draw(st.lists(option_strategy(), max_size=8)):
        script += opt
    for _ in range(draw(st.integers(0, 4))):
        if not script:
            break
        pos = draw(st.integers(0, len(script) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip":
            script[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            script[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del script[pos : pos + draw(st.integers(1, 8))]
    return bytes(script)


@FUZZ
@given(mutated(), st.lists(st.integers(0, 800), max_size=8), st.sampled_from(["off", "allow"]))
def test_mutated_scripts_never_raise(data: bytes, cuts: list[int], tls: str) -> None:
    drive(data, cuts, tls=tls)


@FUZZ
@given(st.lists(option_strategy(), max_size=10), st.sampled_from(["off", "allow", "require"]))
def test_well_framed_options_each_get_exactly_one_final_reply(
    options: list[bytes], tls: str
) -> None:
    """Every option that is not EXPORT_NAME ends with exactly one ACK or error reply."""
    hs = ServerHandshake(CATALOG, tls=tls)  # type: ignore[arg-type]
    hs.feed(client_flags(1))
    for opt in options:
        if hs.state is HandshakeState.START_TLS:
            hs.tls_started()
        if hs.state is not HandshakeState.IN_PROGRESS:
            break
        opt_code = int.from_bytes(opt[8:12], "big")
        out = hs.feed(opt)
        check_state(hs)
        if opt_code == Opt.EXPORT_NAME:
            continue
        replies = parse_replies(out)
        assert replies, f"no reply to option {opt_code}"
        assert all(r.opt == opt_code for r in replies)
        finals = [r for r in replies if r.rep == Rep.ACK or r.rep & 0x80000000]
        assert finals == [replies[-1]]


NEGOTIATIONS = [
    Negotiated(e, sr, ctx, no_zeroes=False, tflags=final_tflags(e, structured_replies=sr))
    for e in (
        ExportInfo("a", 16 * MIB, 0x0FFF, min_block=512, max_block=MIB),
        ExportInfo("b", 12345, TFlag.READ_ONLY | TFlag.SEND_TRIM),
        ExportInfo("c", 0, 0),
    )
    for sr in (False, True)
    for ctx in ({}, {1: "base:allocation"})
]


@FUZZ
@given(
    st.sampled_from(NEGOTIATIONS),
    st.integers(0, 0xFFFF),
    st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 20 * MIB)),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2 * MIB)),
)
def test_check_only_raises_request_or_protocol_errors(
    neg: Negotiated, flags: int, cmd: int, offset: int, length: int
) -> None:
    t = Transmission(neg)
    try:
        t.check(flags, cmd, offset, length)
    except (RequestError, ProtocolError):
        return
    # Whatever passes is safe to hand to a backend.
    if cmd in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS):
        assert length > 0
        assert offset + length <= neg.export.size
    if cmd in (Cmd.READ, Cmd.WRITE, Cmd.CACHE):
        assert length <= neg.export.max_block
    if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert not neg.tflags & TFlag.READ_ONLY
    assert cmd in list(Cmd)
