from __future__ import annotations

import pytest

from blkback.clock import NS_PER_MS
from blkback.errors import ConfigError
from blkback.storage import (
    AnonMemoryStorage,
    DelayFilter,
    ErrorFilter,
    NullStorage,
    RateFilter,
    describe,
    open_storage,
    parse_duration_ns,
    parse_size,
    parse_spec,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("1KB", 1024),
        ("1KiB", 1024),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("1.5G", 3 << 29),
        ("512B", 512),
        (" 8 M ", 8 << 20),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected bytes"),
        ("abc", "expected bytes"),
        ("-1", "expected bytes"),
        ("1X", "expected bytes"),
        ("1.3K", "not a whole number"),
        ("0.5", "not a whole number"),
        ("9E", "larger than"),
    ],
)
def test_parse_size_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("10ms", 10_000_000),
        ("2s", 2_000_000_000),
        ("0.5s", 500_000_000),
        ("200us", 200_000),
        ("5ns", 5),
        ("0", 0),
        ("1.5ns", 2),  # rounded half to even
        ("2e-05s", 20_000),
    ],
)
def test_parse_duration_ns(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["2", "10", "0.5"])
def test_a_bare_number_is_not_a_duration(text):
    """Issue 15: `delay=10` silently meant 10 s; now it asks for the unit."""
    with pytest.raises(ConfigError, match=rf"give a unit, e\.g\. {text}ms, {text}us or {text}s"):
        parse_duration_ns(text, "delay")


@pytest.mark.parametrize(
    ("option", "readonly"),
    [
        ("readonly", True), ("ro", True), ("readonly=yes", True), ("readonly=no", False),
        ("ro=true", True), ("ro=false", False), ("readonly=1", True), ("readonly=0", False),
        ("readonly=on", True), ("readonly=OFF", False),
    ],
)  # fmt: skip
def test_readonly_takes_a_boolean(option, readonly):
    assert parse_spec(f"memory:1G,{option}").readonly is readonly


@pytest.mark.parametrize(("value", "direct"), [("auto", "auto"), ("yes", "on"), ("0", "off")])
def test_direct_takes_auto_or_a_boolean(value, direct):
    assert parse_spec(f"file:/var/tmp/x.img:1G,direct={value}").direct == direct


def test_parse_duration_error():
    with pytest.raises(ConfigError, match=r"expected e\.g\. 10ms"):
        parse_duration_ns("10 minutes")


def test_backends_and_sizes():
    assert parse_spec("memory:1G").size == 1 << 30
    assert parse_spec("null:64M").kind == "null"
    s = parse_spec("file:/var/tmp/x.img:10G,readonly,direct=off")
    assert (s.path, s.size, s.readonly, s.direct) == ("/var/tmp/x.img", 10 << 30, True, "off")
    s = parse_spec("file:/var/tmp/x.img")
    assert (s.path, s.size) == ("/var/tmp/x.img", None)
    # a colon that is not followed by a size belongs to the path
    s = parse_spec("file:/var/tmp/a:b.img")
    assert (s.path, s.size) == ("/var/tmp/a:b.img", None)


def test_filter_stacking_order():
    st = open_storage("memory:1M,delay=1ms,rate=40M,error=0.5")
    try:
        # each filter wraps everything to its left: the last written is outermost
        assert isinstance(st, ErrorFilter)
        assert isinstance(st.inner, RateFilter)
        assert isinstance(st.inner.inner, DelayFilter)
        assert isinstance(st.inner.inner.inner, AnonMemoryStorage)
        text = describe(st)
        assert (
            text.index("error(")
            < text.index("rate(")
            < text.index("delay(")
            < text.index("memory(")
        )
        assert "40 MiB/s" in text
        assert st.inline is False
        assert st.inner.inner.inner.inline is True
    finally:
        st.close()


def test_one_layer_per_family_run_and_repeats_stack():
    spec = parse_spec("null:1M,delay-read=1ms,delay-write=2ms,rate=1M,delay=3ms,delay=4ms")
    assert [f.family for f in spec.filters] == ["delay", "rate", "delay", "delay"]
    st = open_storage("null:1M,delay-read=1ms,delay-write=2ms")
    assert isinstance(st, DelayFilter)
    assert (st.read_ns, st.write_ns) == (NS_PER_MS, 2 * NS_PER_MS)
    assert isinstance(st.inner, NullStorage)


def test_error_ops_list_after_commas_and_plus():
    for spec in (
        "null:1M,error=0.1,error-ops=read,write,readonly",
        "null:1M,error=0.1,error-ops=read+write,ro",
    ):
        st = open_storage(spec)
        assert isinstance(st, ErrorFilter)
        assert st.ops == {"read", "write"}
        assert st.readonly is True
    st = open_storage("null:1M,error-range=1M-2M,error-seed=7")
    assert isinstance(st, ErrorFilter)
    assert (st.error_range, st.probability, st.seed) == ((1 << 20, 2 << 20), 1.0, 7)


def test_rate_with_per_second_suffix():
    st = open_storage("null:1M,rate=40M/s,rate-burst=1M")
    assert isinstance(st, RateFilter)
    assert (st.rate, st.burst) == (40 << 20, 1 << 20)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "expected file:PATH"),
        ("disk:1G", "expected file:PATH"),
        ("memory", "expected file:PATH"),
        ("memory:", "memory: needs a size"),
        ("null:lots", "bad null size"),
        ("memory:0", "must be above 0"),
        ("file:", "file: needs a path"),
        ("memory:1G,,readonly", "empty option"),
        ("memory:1G,fast", "unknown option 'fast'"),
        ("memory:1G,speed=3", "unknown option 'speed'"),
        ("memory:1G,direct=on", "file: only"),
        ("file:/x:1G,direct=maybe", "auto, on or off \\(or yes/no"),
        ("memory:1G,delay=soon", "bad delay"),
        ("memory:1G,delay=10", "bad delay '10': give a unit"),
        ("memory:1G,delay-write=2.5", "bad delay-write '2.5': give a unit"),
        (
            "memory:1G,readonly=maybe",
            "readonly= takes yes/no, true/false, on/off or 1/0, not 'maybe'",
        ),
        ("memory:1G,ro=", "ro= takes yes/no"),
        ("memory:1G,delay-read=1parsec", "bad delay-read"),
        ("memory:1G,rate=fast", "bad rate"),
        ("memory:1G,rate=0", "must be above 0"),
        ("memory:1G,rate-burst=1M", "needs rate="),
        ("memory:1G,error=2", "between 0 and 1"),
        ("memory:1G,error=often", "expected a number"),
        ("memory:1G,error-range=5", "expected OFFSET-END"),
        ("memory:1G,error-range=2M-1M", "END must be above"),
        ("memory:1G,error=0.1,error-ops=read,scribble", "bad error-ops entry 'scribble'"),
        ("memory:1G,error-ops=read", "need error=P or error-range"),
        ("memory:1G,error=0.1,error-seed=x", "bad error-seed"),
    ],
)
def test_spec_errors_are_one_clear_config_error(spec, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        open_storage(spec)
    assert "\n" not in str(info.value)
