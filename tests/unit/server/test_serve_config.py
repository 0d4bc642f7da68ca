"""``serve --config FILE``: TOML files, good and bad, and how flags override them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from blkback.errors import ConfigError
from blkback.server.command import add_arguments, resolve_options, server_config
from blkback.server.config import load_config

GOOD = """
listen = ["unix:/run/x/nbd.sock", "tcp:127.0.0.1:10900"]
control = "/run/x/control.sock"
pressure = ["systemd", "psi-total"]

[limits]
workers = 4
io_timeout = 30
max_block = "16M"
max_request = 67108864
mlock = true

[tls]
mode = "allow"
certificates = "/etc/pki"

[params]
max_buffer_pages = 256
squeeze_wake = false

[[export]]
name = "disk"
backend = "memory:64M"

[[export]]
name = "slow"
backend = "null:1G"
filters = ["delay=2ms", "rate=40M"]
readonly = true
"""


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "blkback.toml"
    path.write_text(text)
    return str(path)


def test_a_good_file_sets_every_table(tmp_path: Path) -> None:
    options = resolve_options(_args("--config", _write(tmp_path, GOOD)))
    assert options.listen == ["unix:/run/x/nbd.sock", "tcp:127.0.0.1:10900"]
    assert options.control == "/run/x/control.sock"
    assert options.pressure == "systemd,psi-total"
    assert (options.workers, options.io_timeout, options.mlock) == (4, 30.0, True)
    assert (options.max_block, options.max_request) == ("16M", "67108864")
    assert (options.tls, options.tls_certificates) == ("allow", "/etc/pki")
    assert options.params == {"max_buffer_pages": "256", "squeeze_wake": "0"}
    assert options.exports == ["disk=memory:64M", "slow=null:1G,delay=2ms,rate=40M,readonly"]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    options = resolve_options(
        _args(
            "--config", path, "--workers", "8", "-U", "/tmp/o.sock", "--param",
            "max_buffer_pages=16", "--export", "o=memory:1M", "--tls", "off",
        )
    )  # fmt: skip
    assert options.workers == 8
    assert options.listen == ["unix:/tmp/o.sock"]  # the flag's list replaces the file's
    assert options.params == {"max_buffer_pages": "16", "squeeze_wake": "0"}  # merged by name
    assert options.exports == ["o=memory:1M"]
    assert options.tls == "off"
    assert options.io_timeout == 30.0  # not given as a flag: the file's value stays


def test_no_file_gives_the_documented_defaults() -> None:
    options = resolve_options(_args())
    assert options.listen == [] and options.exports == ["disk=memory:1G"]
    config = server_config(options, listen_fds=[], single=False)
    assert (config.workers, config.max_block, config.max_request) == (16, 32 << 20, 64 << 20)
    assert config.send_buffer == 512 << 10


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("listen = [\n", ["not valid TOML", "at end of document"]),
        ('workers = "4"', ["workers: unknown key"]),
        ("[limits]\nworkers = 'four'", ["limits.workers: expected an integer"]),
        ("[limits]\nwrokers = 4", ["limits.wrokers: unknown key", "known: workers"]),
        ("[tls]\nmode = 'maybe'", ["tls.mode", '"off", "allow" or "require"']),
        ("[params]\nmax_buffer_pages = [1]", ["params.max_buffer_pages", "number or a string"]),
        ("[[export]]\nname = 'a'", ["export #1", "backend: missing"]),
        ("[[export]]\nname = 'a'\nbackend = 'memory:1M'\nfilter = []", ["filter: unknown key"]),
        ("pressure = []", ["pressure", "non-empty list"]),
    ],
)
def test_bad_files_name_the_file_and_the_key(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path), message
    for fragment in fragments:
        assert fragment in message, message


def test_the_parsers_line_is_in_the_message(tmp_path: Path) -> None:
    path = _write(tmp_path, 'control = "/c"\n\n[limits]\nworkers = = 3\n')
    with pytest.raises(ConfigError, match=r"line 4"):
        load_config(path)


def test_values_are_checked_with_the_key_in_the_message(tmp_path: Path) -> None:
    for text, fragment in (
        ("[limits]\nworkers = 0", "limits.workers must be at least 1"),
        ("[limits]\nmax_block = '12Q'", "limits.max_block"),
        ("[limits]\nio_timeout = 0", "limits.io_timeout must be between"),
        ("[limits]\nsend_buffer = '1T'", "limits.send_buffer must be at most 64M"),
        ("[limits]\nsend_buffer = 'lots'", "limits.send_buffer: bad size 'lots'"),
    ):
        options = resolve_options(_args("--config", _write(tmp_path, text)))
        with pytest.raises(ConfigError, match="blkback.toml: " + fragment):
            server_config(options, listen_fds=[], single=False)


def test_a_bad_parameter_value_names_the_file_key(tmp_path: Path) -> None:
    from blkback.server.command import build_server

    path = _write(tmp_path, "[params]\nmax_buffer_pages = -1\n")
    options = resolve_options(_args("--config", path))
    with pytest.raises(ConfigError, match=r"blkback.toml: params.max_buffer_pages: .*"):
        build_server(options, listen_fds=[], single=False)


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*nope\.toml: No such file"):
        load_config(str(tmp_path / "nope.toml"))


def test_a_bad_export_in_the_file_names_the_file_and_the_export(tmp_path: Path) -> None:
    from blkback.server.command import build_server

    path = _write(tmp_path, "[[export]]\nname = 'tapes'\nbackend = 'tape:1G'\n")
    options = resolve_options(_args("--config", path))
    with pytest.raises(ConfigError) as info:
        build_server(options, listen_fds=[], single=False)
    assert str(info.value).startswith(f"{path}: export 'tapes': ")
    assert "tape" in str(info.value).removeprefix(f"{path}: export 'tapes': ")


def test_timeouts_take_a_unit_or_seconds_in_the_file_and_in_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, '[limits]\nhandshake_timeout = "500ms"\nio_timeout = 30\n')
    options = resolve_options(_args("--config", path, "--idle-timeout", "2s"))
    assert (options.handshake_timeout, options.io_timeout, options.idle_timeout) == (0.5, 30.0, 2.0)
    config = server_config(options, listen_fds=[], single=False)
    assert config.handshake_timeout_ns == 500_000_000
    assert config.idle_timeout_ns == 2_000_000_000
    assert resolve_options(_args("--io-timeout", "1.5")).io_timeout == 1.5


def test_a_timeout_that_is_no_duration_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.io_timeout: bad duration '10 parsecs'"):
        load_config(_write(tmp_path, '[limits]\nio_timeout = "10 parsecs"\n'))
    with pytest.raises(SystemExit):
        _args("--io-timeout", "soon")


def test_the_send_buffer_is_a_size_in_the_file_and_in_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, '[limits]\nsend_buffer = "1M"\n')
    assert server_config(
        resolve_options(_args("--config", path)), listen_fds=[], single=False
    ).send_buffer == (1 << 20)
    flags = resolve_options(_args("--config", path, "--send-buffer", "0"))
    assert server_config(flags, listen_fds=[], single=False).send_buffer == 0
