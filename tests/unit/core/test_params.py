"""Runtime parameters: defaults, validation, aliases, refusals that change nothing."""

from __future__ import annotations

import pytest

from blkback.core.params import SPECS, U32_MAX, Params
from blkback.errors import ParamError


def test_kernel_defaults() -> None:
    p = Params()
    assert p.max_buffer_pages == 1024
    assert p.buffer_squeeze_duration_ms == 10
    assert p.lru_interval_ms == 100
    assert p.batch_free_pages == 10
    assert p.log_stats is False
    assert p.squeeze_scope == "device"
    assert p.squeeze_wake is True
    assert p.squeeze_policy == "kernel"


def test_seed_alias_writes_the_5_6_parameter() -> None:
    p = Params()
    p.set("aggressive_shrinking_duration", "100")
    assert p.buffer_squeeze_duration_ms == 100
    assert p.get("aggressive_shrinking_duration") == 100


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("max_buffer_pages", "-1", "out of range"),
        ("max_buffer_pages", "1.5", "is not an integer"),
        ("max_buffer_pages", "lots", "is not an integer"),
        ("buffer_squeeze_duration_ms", str(U32_MAX + 1), "out of range"),
        ("buffer_squeeze_duration_ms", "-1", "out of range"),
        ("lru_interval_ms", "0", "out of range"),
        ("batch_free_pages", "0", "out of range"),
        ("log_stats", "maybe", "boolean"),
        ("squeeze_scope", "host", "one of device, global"),
        ("squeeze_wake", "2", "boolean"),
        ("no_such_param", "1", "unknown parameter"),
    ],
)
def test_bad_values_are_refused_and_nothing_changes(name: str, value: str, fragment: str) -> None:
    p = Params()
    before = p.as_dict()
    with pytest.raises(ParamError) as info:
        p.set(name, value)
    assert fragment in str(info.value)
    assert name.split("_")[0] in str(info.value) or "unknown" in str(info.value)
    assert p.as_dict() == before


def test_update_is_all_or_nothing() -> None:
    p = Params()
    with pytest.raises(ParamError):
        p.update({"max_buffer_pages": "5", "squeeze_scope": "nowhere"})
    assert p.max_buffer_pages == 1024


def test_booleans_accept_kernel_spellings() -> None:
    p = Params()
    for text, want in [("Y", True), ("n", False), ("1", True), ("off", False), ("true", True)]:
        p.set("log_stats", text)
        assert p.log_stats is want


def test_direct_assignment_is_refused() -> None:
    p = Params()
    with pytest.raises(AttributeError):
        p.max_buffer_pages = 3  # type: ignore[misc]


def test_listeners_see_changes_only() -> None:
    p = Params()
    seen: list[tuple[str, object, object]] = []
    p.subscribe(lambda n, o, v: seen.append((n, o, v)))
    p.set("max_buffer_pages", 1024)
    p.set("max_buffer_pages", "0")
    assert seen == [("max_buffer_pages", 1024, 0)]


def test_every_spec_has_help_and_a_valid_default() -> None:
    for spec in SPECS:
        assert spec.help
        assert spec.parse(spec.default) == spec.default
