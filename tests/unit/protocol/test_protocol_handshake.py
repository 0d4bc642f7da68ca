"""ServerHandshake driven byte-exactly through every option path and error path."""

from __future__ import annotations

import struct

import pytest
from nbd_test_client import (
    GREETING,
    OptReply,
    client_flags,
    info_data,
    meta_data,
    option,
    parse_replies,
    request,
)

from blkback.errors import ProtocolError
from blkback.protocol.constants import (
    MAX_STRING,
    Info,
    Opt,
    Rep,
    TFlag,
)
from blkback.protocol.handshake import (
    ExportInfo,
    HandshakeState,
    ServerHandshake,
    StaticCatalog,
    final_tflags,
)

MIB = 1024 * 1024
RW = TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES
DISK = ExportInfo("disk", 64 * MIB, RW | TFlag.SEND_DF | TFlag.SEND_FAST_ZERO, description="a")
RO = ExportInfo("ro", 4096, TFlag.READ_ONLY, min_block=512, pref_block=4096, max_block=4096)
CATALOG = StaticCatalog([DISK, RO])


def start(catalog: StaticCatalog = CATALOG, flags: int = 1, **kw: object) -> ServerHandshake:
    hs = ServerHandshake(catalog, **kw)  # type: ignore[arg-type]
    assert hs.initial_bytes() == GREETING
    assert hs.feed(client_flags(flags)) == b""
    assert hs.state is HandshakeState.IN_PROGRESS
    return hs


def ask(hs: ServerHandshake, *messages: bytes) -> list[OptReply]:
    return parse_replies(hs.feed(b"".join(messages)))


def reply(opt: int, rep: int, data: bytes = b"") -> OptReply:
    return OptReply(opt, rep, data)


def info_export(e: ExportInfo, tflags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, e.size, tflags)


def info_block(e: ExportInfo) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, e.min_block, e.pref_block, e.max_block)


def closed_with_error(hs: ServerHandshake) -> None:
    assert hs.state is HandshakeState.CLOSED
    assert isinstance(hs.error, ProtocolError)


# --- greeting and client flags ----------------------------------------------------------------


def test_greeting_is_magic_ihaveopt_fixed_newstyle_no_zeroes() -> None:
    assert ServerHandshake(CATALOG).initial_bytes() == bytes.fromhex(
        "4e42444d4147494349484156454f50540003"
    )


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_close(flags: int) -> None:
    hs = ServerHandshake(CATALOG)
    assert hs.feed(client_flags(flags)) == b""
    closed_with_error(hs)
    assert "client flags" in hs.close_reason


def test_client_without_fixed_newstyle_is_still_served() -> None:
    hs = start(flags=0)
    assert ask(hs, option(Opt.LIST))[-1] == reply(Opt.LIST, Rep.ACK)


# --- OPT_EXPORT_NAME --------------------------------------------------------------------------


def test_export_name_replies_size_flags_and_124_zeroes() -> None:
    hs = start()
    out = hs.feed(option(Opt.EXPORT_NAME, b"disk"))
    tflags = TFlag.HAS_FLAGS | RW  # DF dropped (no structured replies), FAST_ZERO kept
    assert tflags & TFlag.SEND_WRITE_ZEROES
    expected = struct.pack(">QH", DISK.size, tflags | TFlag.SEND_FAST_ZERO) + bytes(124)
    assert out == expected
    assert hs.state is HandshakeState.DONE
    assert hs.negotiated is not None
    assert hs.negotiated.export == DISK
    assert hs.negotiated.tflags == tflags | TFlag.SEND_FAST_ZERO
    assert not hs.negotiated.structured_replies
    assert hs.negotiated.meta_contexts == {}
    assert hs.leftover == b""


def test_export_name_with_no_zeroes_omits_padding() -> None:
    hs = start(flags=3)
    out = hs.feed(option(Opt.EXPORT_NAME, b"ro"))
    assert out == struct.pack(">QH", RO.size, TFlag.HAS_FLAGS | TFlag.READ_ONLY)
    assert hs.negotiated is not None
    assert hs.negotiated.no_zeroes


def test_export_name_default_and_pipelined_request_goes_to_leftover() -> None:
    hs = start()
    first = request(0, 0, 512)
    hs.feed(option(Opt.EXPORT_NAME) + first[:10])
    assert hs.state is HandshakeState.DONE
    assert hs.negotiated is not None
    assert hs.negotiated.export == DISK
    assert hs.leftover == first[:10]
    assert hs.feed(first[10:]) == b""  # later bytes append
    assert hs.leftover == first


@pytest.mark.parametrize(
    ("name", "violation"),
    [(b"nope", False), (b"\xff\xfe", True), (b"a\0b", True), (b"x" * (MAX_STRING + 1), True)],
)
def test_export_name_failures_close(name: bytes, violation: bool) -> None:
    hs = start()
    assert hs.feed(option(Opt.EXPORT_NAME, name)) == b""
    assert hs.state is HandshakeState.CLOSED
    assert (hs.error is not None) is violation
    assert hs.close_reason


# --- OPT_ABORT --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_then_closed(data: bytes) -> None:
    hs = start()
    out = hs.feed(option(Opt.ABORT, data))
    assert out == struct.pack(">QIII", 0x3E889045565A9, Opt.ABORT, Rep.ACK, 0)
    assert hs.state is HandshakeState.CLOSED
    assert hs.error is None


def test_abort_then_eof_is_tolerated() -> None:
    hs = start()
    assert ask(hs, option(Opt.ABORT)) == [reply(Opt.ABORT, Rep.ACK)]
    assert hs.feed(b"") == b""
    assert hs.state is HandshakeState.CLOSED
    assert hs.error is None


# --- OPT_LIST ---------------------------------------------------------------------------------


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    hs = start()
    assert ask(hs, option(Opt.LIST)) == [
        reply(Opt.LIST, Rep.SERVER, b"\0\0\0\x04disk" + b"a"),
        reply(Opt.LIST, Rep.SERVER, b"\0\0\0\x02ro"),
        reply(Opt.LIST, Rep.ACK),
    ]
    assert hs.state is HandshakeState.IN_PROGRESS


def test_list_with_data_is_invalid_and_haggling_continues() -> None:
    hs = start()
    replies = ask(hs, option(Opt.LIST, b"x"))
    assert [(r.opt, r.rep) for r in replies] == [(Opt.LIST, Rep.ERR_INVALID)]
    assert ask(hs, option(Opt.LIST))[-1] == reply(Opt.LIST, Rep.ACK)


def test_list_of_empty_catalog_is_just_ack() -> None:
    hs = start(StaticCatalog([]))
    assert ask(hs, option(Opt.LIST)) == [reply(Opt.LIST, Rep.ACK)]


# --- OPT_INFO / OPT_GO ------------------------------------------------------------------------


def test_info_sends_export_and_block_size_then_ack_and_stays() -> None:
    hs = start()
    tflags = final_tflags(DISK, structured_replies=False)
    assert ask(hs, option(Opt.INFO, info_data("disk"))) == [
        reply(Opt.INFO, Rep.INFO, info_export(DISK, tflags)),
        reply(Opt.INFO, Rep.INFO, info_block(DISK)),
        reply(Opt.INFO, Rep.ACK),
    ]
    assert hs.state is HandshakeState.IN_PROGRESS


def test_info_name_description_on_request_unknown_infos_ignored() -> None:
    hs = start()
    infos = [Info.NAME, Info.DESCRIPTION, 0x7777, Info.NAME]
    replies = ask(hs, option(Opt.INFO, info_data("", infos)))
    assert reply(Opt.INFO, Rep.INFO, b"\0\x01disk") in replies
    assert reply(Opt.INFO, Rep.INFO, b"\0\x02a") in replies
    assert len(replies) == 5  # EXPORT, NAME, DESCRIPTION, BLOCK_SIZE, ACK


def test_info_description_omitted_when_empty() -> None:
    hs = start()
    replies = ask(hs, option(Opt.INFO, info_data("ro", [Info.DESCRIPTION])))
    assert [r.rep for r in replies] == [Rep.INFO, Rep.INFO, Rep.ACK]


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_unknown_export(opt: Opt) -> None:
    hs = start()
    replies = ask(hs, option(opt, info_data("missing")))
    assert [(r.opt, r.rep) for r in replies] == [(opt, Rep.ERR_UNKNOWN)]
    assert b"missing" in replies[0].data
    assert hs.state is HandshakeState.IN_PROGRESS


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no name length
        b"\0\0\0\x05disk",  # name runs past the data
        struct.pack(">I", 4) + b"disk" + b"\0",  # half a count
        info_data("disk", [1])[:-1],  # count says 1, no request
        info_data("disk") + b"\0",  # trailing byte
        info_data(b"\xff"),  # not UTF-8
        info_data(b"a\0"),  # NUL
        info_data("x" * (MAX_STRING + 1)),  # longer than the string limit
    ],
)
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_malformed_info_go_is_invalid(opt: Opt, data: bytes) -> None:
    hs = start()
    replies = ask(hs, option(opt, data))
    assert [(r.opt, r.rep) for r in replies] == [(opt, Rep.ERR_INVALID)]
    assert hs.state is HandshakeState.IN_PROGRESS


def test_go_enters_transmission_with_leftover() -> None:
    hs = start()
    req = request(0, 0, 4096, cookie=1) + request(1, 0, 4096, cookie=2)
    out = hs.feed(option(Opt.GO, info_data("ro", [Info.BLOCK_SIZE])) + req)
    tflags = TFlag.HAS_FLAGS | TFlag.READ_ONLY
    assert parse_replies(out) == [
        reply(Opt.GO, Rep.INFO, info_export(RO, tflags)),
        reply(Opt.GO, Rep.INFO, info_block(RO)),
        reply(Opt.GO, Rep.ACK),
    ]
    assert hs.state is HandshakeState.DONE
    assert hs.leftover == req
    n = hs.negotiated
    assert n is not None
    assert (n.export, n.tflags, n.block_size_requested) == (RO, tflags, True)


def test_info_then_go_same_answer() -> None:
    hs = start()
    info = ask(hs, option(Opt.INFO, info_data("disk")))
    go = ask(hs, option(Opt.GO, info_data("disk")))
    assert [(r.rep, r.data) for r in info] == [(r.rep, r.data) for r in go]
    assert hs.negotiated is not None
    assert not hs.negotiated.block_size_requested


# --- OPT_STRUCTURED_REPLY and the flags it changes --------------------------------------------


def test_structured_reply_ack_repeat_ack_and_df_advertised() -> None:
    hs = start()
    assert ask(hs, option(Opt.STRUCTURED_REPLY)) == [reply(Opt.STRUCTURED_REPLY, Rep.ACK)]
    assert ask(hs, option(Opt.STRUCTURED_REPLY)) == [reply(Opt.STRUCTURED_REPLY, Rep.ACK)]
    ask(hs, option(Opt.GO, info_data("disk")))
    n = hs.negotiated
    assert n is not None
    assert n.structured_replies
    assert n.tflags & TFlag.SEND_DF


def test_structured_reply_with_data_is_invalid() -> None:
    hs = start()
    replies = ask(hs, option(Opt.STRUCTURED_REPLY, b"\0"))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    ask(hs, option(Opt.GO, info_data("disk")))
    assert hs.negotiated is not None
    assert not hs.negotiated.structured_replies


def test_final_tflags_rules() -> None:
    fz = ExportInfo("z", 4096, TFlag.SEND_FAST_ZERO | TFlag.SEND_DF | 0x8000)
    assert final_tflags(fz, structured_replies=True) == TFlag.HAS_FLAGS | TFlag.SEND_DF
    assert final_tflags(fz, structured_replies=False) == TFlag.HAS_FLAGS


# --- meta contexts ----------------------------------------------------------------------------


def sr(hs: ServerHandshake) -> None:
    assert ask(hs, option(Opt.STRUCTURED_REPLY)) == [reply(Opt.STRUCTURED_REPLY, Rep.ACK)]


def test_set_meta_context_needs_structured_replies() -> None:
    hs = start()
    replies = ask(hs, option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]


def test_set_base_allocation_then_go_negotiates_context() -> None:
    hs = start()
    sr(hs)
    replies = ask(
        hs,
        option(Opt.SET_META_CONTEXT, meta_data("disk", ["x-foo:bar", "base:allocation"])),
    )
    assert replies == [
        reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x01base:allocation"),
        reply(Opt.SET_META_CONTEXT, Rep.ACK),
    ]
    ask(hs, option(Opt.GO, info_data("")))  # "" resolves to the same export
    assert hs.negotiated is not None
    assert hs.negotiated.meta_contexts == {1: "base:allocation"}


def test_contexts_for_another_export_are_dropped_at_go() -> None:
    hs = start()
    sr(hs)
    ask(hs, option(Opt.SET_META_CONTEXT, meta_data("ro", ["base:allocation"])))
    ask(hs, option(Opt.GO, info_data("disk")))
    assert hs.negotiated is not None
    assert hs.negotiated.meta_contexts == {}


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["base:nope"], ["qemu:dirty-bitmap:x"], ["BASE:allocation"]]
)
def test_set_selecting_nothing_acks_and_clears(queries: list[str]) -> None:
    hs = start()
    sr(hs)
    ask(hs, option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    replies = ask(hs, option(Opt.SET_META_CONTEXT, meta_data("disk", queries)))
    assert replies == [reply(Opt.SET_META_CONTEXT, Rep.ACK)]
    ask(hs, option(Opt.GO, info_data("disk")))
    assert hs.negotiated is not None
    assert hs.negotiated.meta_contexts == {}


def test_failed_set_still_clears_previous_selection() -> None:
    hs = start()
    sr(hs)
    ask(hs, option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    bad = ask(hs, option(Opt.SET_META_CONTEXT, meta_data("disk", ["nocolon"])))
    assert [r.rep for r in bad] == [Rep.ERR_INVALID]
    ask(hs, option(Opt.GO, info_data("disk")))
    assert hs.negotiated is not None
    assert hs.negotiated.meta_contexts == {}


@pytest.mark.parametrize("queries", [[], ["base:"], ["base:allocation", "base:allocation"]])
def test_list_meta_context_returns_base_allocation_with_id_zero(queries: list[str]) -> None:
    hs = start()
    replies = ask(hs, option(Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    assert replies == [
        reply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0base:allocation"),
        reply(Opt.LIST_META_CONTEXT, Rep.ACK),
    ]


def test_list_meta_context_unknown_namespace_is_ignored() -> None:
    hs = start()
    replies = ask(hs, option(Opt.LIST_META_CONTEXT, meta_data("disk", ["x-a:", "qemu:"])))
    assert replies == [reply(Opt.LIST_META_CONTEXT, Rep.ACK)]


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        meta_data("disk", ["base:allocation"])[:-1],
        meta_data("disk", []) + b"x",
        meta_data("disk", [b"base:\xff"]),
        meta_data("disk", ["base:" + "a" * MAX_STRING]),
        struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF),
    ],
)
def test_malformed_meta_context_is_invalid(opt: Opt, data: bytes) -> None:
    hs = start()
    sr(hs)
    assert [r.rep for r in ask(hs, option(opt, data))] == [Rep.ERR_INVALID]


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_unknown_export(opt: Opt) -> None:
    hs = start()
    sr(hs)
    replies = ask(hs, option(opt, meta_data("missing", ["base:allocation"])))
    assert [r.rep for r in replies] == [Rep.ERR_UNKNOWN]


# --- unsupported options, limits, framing errors ----------------------------------------------


@pytest.mark.parametrize("opt", [Opt.EXTENDED_HEADERS, Opt.PEEK_EXPORT, 12, 0, 0xFFFFFFFF])
def test_unsupported_options_get_err_unsup_and_haggling_continues(opt: int) -> None:
    hs = start()
    replies = ask(hs, option(opt, b"whatever"))
    assert [(r.opt, r.rep) for r in replies] == [(opt, Rep.ERR_UNSUP)]
    assert ask(hs, option(Opt.LIST))[-1].rep == Rep.ACK


def test_oversized_option_is_skipped_in_pieces_then_too_big() -> None:
    hs = start(max_option_len=16)
    assert hs.feed(option(Opt.INFO, length=100) + bytes(50)) == b""
    out = parse_replies(hs.feed(bytes(50) + option(Opt.LIST)))
    assert [(r.opt, r.rep) for r in out[:1]] == [(Opt.INFO, Rep.ERR_TOO_BIG)]
    assert out[-1] == reply(Opt.LIST, Rep.ACK)


def test_oversized_export_name_closes() -> None:
    hs = start(max_option_len=16)
    hs.feed(option(Opt.EXPORT_NAME, length=17))
    closed_with_error(hs)


def test_too_many_options_close() -> None:
    hs = start(max_options=3)
    out = ask(hs, option(99), option(99), option(99))
    assert len(out) == 3
    assert hs.feed(option(99)) == b""
    closed_with_error(hs)


def test_bad_option_magic_closes() -> None:
    hs = start()
    hs.feed(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    closed_with_error(hs)


def test_eof_between_options_closes_without_error() -> None:
    hs = start()
    hs.feed(b"")
    assert hs.state is HandshakeState.CLOSED
    assert hs.error is None


@pytest.mark.parametrize(
    "partial", [b"\0\0", option(Opt.LIST)[:10], option(Opt.INFO, length=9) + b"abc"]
)
def test_eof_mid_message_is_an_error(partial: bytes) -> None:
    hs = ServerHandshake(CATALOG) if partial == b"\0\0" else start()
    hs.feed(partial)
    hs.feed(b"")
    closed_with_error(hs)


def test_feed_after_close_is_ignored() -> None:
    hs = start()
    hs.feed(option(Opt.ABORT))
    assert hs.feed(option(Opt.LIST)) == b""
    assert hs.state is HandshakeState.CLOSED


def test_byte_at_a_time_equals_all_at_once() -> None:
    script = (
        client_flags(1)
        + option(Opt.LIST)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
        + option(99, b"xyz")
        + option(Opt.GO, info_data("disk", [Info.NAME]))
        + request(0, 0, 512)
    )
    whole = ServerHandshake(CATALOG)
    expected = whole.feed(script)
    split = ServerHandshake(CATALOG)
    got = b"".join(split.feed(script[i : i + 1]) for i in range(len(script)))
    assert got == expected
    assert split.negotiated == whole.negotiated
    assert split.leftover == whole.leftover == request(0, 0, 512)


# --- TLS modes --------------------------------------------------------------------------------


def test_starttls_refused_with_policy_when_tls_off() -> None:
    hs = start()
    replies = ask(hs, option(Opt.STARTTLS))
    assert [(r.opt, r.rep) for r in replies] == [(Opt.STARTTLS, Rep.ERR_POLICY)]
    assert hs.state is HandshakeState.IN_PROGRESS


@pytest.mark.parametrize(
    "opt", [Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, 99]
)
def test_tls_required_errors_options_before_tls(opt: int) -> None:
    hs = start(tls="require")
    replies = ask(hs, option(opt, info_data("disk")))
    assert [(r.opt, r.rep) for r in replies] == [(opt, Rep.ERR_TLS_REQD)]


def test_tls_required_export_name_before_tls_closes() -> None:
    hs = start(tls="require")
    assert hs.feed(option(Opt.EXPORT_NAME, b"disk")) == b""
    assert hs.state is HandshakeState.CLOSED


def test_tls_required_without_fixed_newstyle_closes() -> None:
    hs = ServerHandshake(CATALOG, tls="require")
    hs.feed(client_flags(0))
    closed_with_error(hs)


def test_tls_required_abort_still_acked() -> None:
    hs = start(tls="require")
    assert ask(hs, option(Opt.ABORT)) == [reply(Opt.ABORT, Rep.ACK)]


def test_starttls_upgrade_resets_state_and_resumes() -> None:
    hs = start(tls="require")
    assert ask(hs, option(Opt.STARTTLS)) == [reply(Opt.STARTTLS, Rep.ACK)]
    assert hs.state is HandshakeState.START_TLS
    assert hs.feed(b"ignored until tls_started") == b""
    hs.tls_started()
    assert hs.state is HandshakeState.IN_PROGRESS
    sr(hs)
    replies = ask(hs, option(Opt.STARTTLS))
    assert [r.rep for r in replies] == [Rep.ERR_INVALID]
    ask(hs, option(Opt.GO, info_data("disk")))
    n = hs.negotiated
    assert n is not None
    assert n.tls
    assert n.structured_replies


def test_tls_allow_keeps_state_before_upgrade_and_resets_after() -> None:
    hs = start(tls="allow")
    sr(hs)
    assert ask(hs, option(Opt.LIST))[-1].rep == Rep.ACK
    assert ask(hs, option(Opt.STARTTLS)) == [reply(Opt.STARTTLS, Rep.ACK)]
    hs.tls_started()
    ask(hs, option(Opt.GO, info_data("disk")))
    assert hs.negotiated is not None
    assert not hs.negotiated.structured_replies


def test_starttls_with_data_is_invalid() -> None:
    hs = start(tls="allow")
    assert [r.rep for r in ask(hs, option(Opt.STARTTLS, b"x"))] == [Rep.ERR_INVALID]


def test_data_pipelined_after_starttls_closes() -> None:
    hs = start(tls="allow")
    hs.feed(option(Opt.STARTTLS) + b"\x16\x03\x01")
    closed_with_error(hs)


def test_tls_started_in_wrong_state_is_a_caller_bug() -> None:
    with pytest.raises(RuntimeError):
        start().tls_started()


def test_bad_tls_mode_rejected() -> None:
    with pytest.raises(ValueError, match="tls"):
        ServerHandshake(CATALOG, tls="maybe")  # type: ignore[arg-type]


# --- ExportInfo validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a\0"},
        {"name": "x" * (MAX_STRING + 1)},
        {"description": "y" * (MAX_STRING + 1)},
        {"size": -1},
        {"tflags": 1 << 16},
        {"min_block": 3},
        {"min_block": 1 << 17, "pref_block": 1 << 17, "max_block": 1 << 17},
        {"pref_block": 256},
        {"min_block": 4096, "pref_block": 2048},
        {"min_block": 512, "max_block": 1000},
        {"max_block": 0},
        {"max_block": 1024},  # < min(pref_block, size)
    ],
)
def test_export_info_rejects_bad_values(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"name": "e", "size": MIB, "tflags": 0}
    with pytest.raises(ValueError):
        ExportInfo(**(base | kwargs))  # type: ignore[arg-type]


def test_export_info_accepts_unlimited_max_and_tiny_export() -> None:
    ExportInfo("e", MIB, 0, max_block=0xFFFFFFFF)
    ExportInfo("e", 100, 0, max_block=100)
