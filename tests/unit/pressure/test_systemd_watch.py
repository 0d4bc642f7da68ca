"""Reading systemd's ``$MEMORY_PRESSURE_WATCH``/``$MEMORY_PRESSURE_WRITE`` as sd-event does."""

from __future__ import annotations

import base64

import pytest

from blkback.errors import EnvironmentProblem
from blkback.pressure.systemd import WatchSpec, watch_from_environ

# What systemd 254 writes for a service (the default: 200 ms of "some" stall per 2 s).
SYSTEMD_DEFAULT = "c29tZSAyMDAwMDAgMjAwMDAwMAA="


def test_unset_means_no_watch() -> None:
    assert watch_from_environ({}) is None
    assert watch_from_environ({"MEMORY_PRESSURE_WRITE": SYSTEMD_DEFAULT}) is None


def test_systemd_default_trigger_is_decoded_with_its_nul() -> None:
    spec = watch_from_environ(
        {
            "MEMORY_PRESSURE_WATCH": "/sys/fs/cgroup/system.slice/b.service/memory.pressure",
            "MEMORY_PRESSURE_WRITE": SYSTEMD_DEFAULT,
        }
    )
    assert spec is not None and not spec.disabled
    assert spec.trigger == b"some 200000 2000000\0"
    assert spec.describe().endswith('trigger "some 200000 2000000\\0"')


def test_whitespace_in_the_base64_is_skipped_as_unbase64mem_does() -> None:
    wrapped = SYSTEMD_DEFAULT[:10] + "\n " + SYSTEMD_DEFAULT[10:]
    spec = watch_from_environ({"MEMORY_PRESSURE_WATCH": "/p", "MEMORY_PRESSURE_WRITE": wrapped})
    assert spec == WatchSpec("/p", b"some 200000 2000000\0")


def test_no_write_means_watch_without_a_trigger() -> None:
    spec = watch_from_environ({"MEMORY_PRESSURE_WATCH": "/run/pressure.sock"})
    assert spec == WatchSpec("/run/pressure.sock", b"")
    assert "no trigger" in spec.describe()


@pytest.mark.parametrize("path", ["", "/dev/null"])
def test_empty_or_dev_null_disables_watching(path: str) -> None:
    spec = watch_from_environ({"MEMORY_PRESSURE_WATCH": path, "MEMORY_PRESSURE_WRITE": "eA=="})
    assert spec is not None and spec.disabled
    assert "disabled" in spec.describe()


@pytest.mark.parametrize("path", ["relative/memory.pressure", "/sys//fs/x", "/sys/fs/../x"])
def test_relative_or_unnormalised_paths_are_refused(path: str) -> None:
    with pytest.raises(EnvironmentProblem, match="absolute, normalised"):
        watch_from_environ({"MEMORY_PRESSURE_WATCH": path})


def test_bad_base64_is_refused() -> None:
    with pytest.raises(EnvironmentProblem, match="not base64"):
        watch_from_environ({"MEMORY_PRESSURE_WATCH": "/p", "MEMORY_PRESSURE_WRITE": "@@@"})
    assert base64.b64decode(SYSTEMD_DEFAULT)  # the fixture itself is valid
