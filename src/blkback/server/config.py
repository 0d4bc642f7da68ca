"""``blkback serve``'s settings: built-in defaults, then a TOML file, then command-line flags.

A configuration file (``serve --config FILE``, read with the standard library's ``tomllib``)
holds what a service keeps between restarts::

    listen = ["tcp:127.0.0.1:10809", "unix:/run/blkback/nbd.sock"]
    control = "/run/blkback/control.sock"
    metrics = "127.0.0.1:9809"
    pressure = "auto"                 # or a list: ["systemd", "psi-total"]

    [limits]
    workers = 16
    max_connections = 1024
    poll_us = 50                      # busy polling: the longest window, microseconds (0: off)
    handshake_timeout = "10s"         # a duration with its unit, or a number of seconds
    idle_timeout = 0                  # 0: never
    io_timeout = "60s"
    max_block = "32M"                 # advertised maximum request size
    max_request = "64M"               # served maximum request size
    send_buffer = "512K"              # SO_SNDBUF of Unix-socket connections (0: kernel's)
    mlock = false

    [tls]
    mode = "require"                  # off | allow | require
    certificates = "/etc/blkback/pki" # or cert = ..., key = ..., ca = ...
    verify_peer = false

    [params]
    max_buffer_pages = 1024
    buffer_squeeze_duration_ms = 10

    [[export]]                        # the first export is the default one
    name = "disk"
    backend = "file:/var/lib/blkback/disk.img:8G"
    filters = ["delay=2ms", "rate=40M"]
    readonly = false

Command-line flags override the file: ``--listen`` and ``--export`` replace its lists,
``--param NAME=VALUE`` replaces one parameter, every other flag its key. Errors name the file,
the line when the TOML parser gives one, and the key (``blkback.toml: limits.workers: ...``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from blkback.clock import NS_PER_S
from blkback.errors import ConfigError
from blkback.storage.spec import parse_duration_ns

__all__ = ["ServeOptions", "load_config", "merge"]


@dataclass
class ServeOptions:
    """Every setting of ``serve`` that a file or a flag can give, with its default.

    ``origins`` says where a value came from (``--workers``, ``FILE: limits.workers``), so
    that an error about it names what the user wrote.
    """

    listen: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)  # NAME=SPEC
    params: dict[str, str] = field(default_factory=dict)
    control: str | None = None
    metrics: str | None = None
    pressure: str = "auto"
    workers: int = 16
    max_connections: int = 1024
    poll_us: int = 50  # the longest busy-poll window; adaptive (docs/data-path.md section 3)
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    io_timeout: float = 60.0
    max_block: str = "32M"
    max_request: str = "64M"
    send_buffer: str = "512K"
    mlock: bool = False
    tls: str = "off"
    tls_certificates: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_peer: bool = False
    origins: dict[str, str] = field(default_factory=dict)

    def where(self, name: str) -> str:
        """How the user spelled the setting ``name`` (for error messages)."""
        return self.origins.get(name) or "--" + name.replace("_", "-")


# -- value checkers: TOML value -> option value, or a message saying what was expected ------
Check = Callable[[object], Any]


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


def seconds(value: object) -> float:
    """A timeout of the file or a flag: a duration with its unit (``"10s"``, ``"500ms"``), or
    a bare number of seconds (nbdkit's and systemd's habit for timeouts), in seconds.

    Raises:
        ValueError: Not a duration.
    """
    if isinstance(value, str):
        try:
            return float(value) if _is_number(value) else parse_duration_ns(value) / NS_PER_S
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError('expected a duration such as "10s" or "500ms", or seconds')
    return float(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _size(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('expected a size: bytes, or a string such as "32M"')
    return str(value)


def _str_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [_str(value)]
    if not isinstance(value, list) or not value:
        raise ValueError("expected a string or a non-empty list of strings")
    return [_str(v) for v in value]


def _pressure(value: object) -> str:
    return ",".join(_str_list(value))


def _tls_mode(value: object) -> str:
    if value not in ("off", "allow", "require"):
        raise ValueError('expected "off", "allow" or "require"')
    return str(value)


def _param(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if not isinstance(value, int | float | str):
        raise ValueError("expected a number or a string")
    return str(value)


# key -> (option field, checker), per table ("" is the top level).
_KEYS: dict[str, dict[str, tuple[str, Check]]] = {
    "": {
        "listen": ("listen", _str_list),
        "control": ("control", _str),
        "metrics": ("metrics", _str),
        "pressure": ("pressure", _pressure),
    },
    "limits": {
        "workers": ("workers", _int),
        "max_connections": ("max_connections", _int),
        "poll_us": ("poll_us", _int),
        "handshake_timeout": ("handshake_timeout", seconds),
        "idle_timeout": ("idle_timeout", seconds),
        "io_timeout": ("io_timeout", seconds),
        "max_block": ("max_block", _size),
        "max_request": ("max_request", _size),
        "send_buffer": ("send_buffer", _size),
        "mlock": ("mlock", _bool),
    },
    "tls": {
        "mode": ("tls", _tls_mode),
        "certificates": ("tls_certificates", _str),
        "cert": ("tls_cert", _str),
        "key": ("tls_key", _str),
        "ca": ("tls_ca", _str),
        "verify_peer": ("tls_verify_peer", _bool),
    },
}
_TABLES = ("limits", "tls", "params", "export")
_EXPORT_KEYS = ("name", "backend", "filters", "readonly")


def load_config(path: str) -> dict[str, Any]:
    """Read ``path`` into option values (field -> value, plus ``origins``).

    Raises:
        ConfigError: The file cannot be read, is not TOML (the message has the parser's line
            and column), or has an unknown key or a value of the wrong type (the message
            names the key).
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {why}")

    for key, value in data.items():
        if key in _KEYS[""]:
            _take(values, origins, path, "", key, value)
        elif key in ("limits", "tls"):
            if not isinstance(value, dict):
                raise fail(key, "expected a table ([" + key + "])")
            for sub, subvalue in value.items():
                if sub not in _KEYS[key]:
                    known = ", ".join(_KEYS[key])
                    raise fail(f"{key}.{sub}", f"unknown key (known: {known})")
                _take(values, origins, path, key, sub, subvalue)
        elif key == "params":
            if not isinstance(value, dict):
                raise fail(key, "expected a table ([params])")
            params: dict[str, str] = {}
            for name, raw in value.items():
                try:
                    params[name] = _param(raw)
                except ValueError as exc:
                    raise fail(f"params.{name}", str(exc)) from None
                origins[f"param:{name}"] = f"{path}: params.{name}"
            values["params"] = params
        elif key == "export":
            values["exports"] = _exports(path, value)
            origins["exports"] = f"{path}: export"
        else:
            known = ", ".join([*_KEYS[""], *_TABLES])
            raise fail(key, f"unknown key (known: {known})")
    values["origins"] = origins
    return values


def _take(
    values: dict[str, Any], origins: dict[str, str], path: str, table: str, key: str, raw: object
) -> None:
    name, check = _KEYS[table][key]
    dotted = f"{table}.{key}" if table else key
    try:
        values[name] = check(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {dotted}: {exc}") from None
    origins[name] = f"{path}: {dotted}"


def _exports(path: str, value: object) -> list[str]:
    """``[[export]]`` tables to ``NAME=SPEC`` strings (the ``--export`` syntax)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: export: expected [[export]] tables")
    out: list[str] = []
    for i, table in enumerate(value, 1):
        where = f"{path}: export #{i}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        for key in table:
            if key not in _EXPORT_KEYS:
                raise ConfigError(f"{where}: {key}: unknown key (known: {', '.join(_EXPORT_KEYS)})")
        for key in ("name", "backend"):
            if key not in table:
                raise ConfigError(f'{where}: {key}: missing (e.g. name = "disk")')
        try:
            name = _str(table["name"])
            backend = _str(table["backend"])
            filters = _str_list(table["filters"]) if "filters" in table else []
            readonly = _bool(table.get("readonly", False))
        except ValueError as exc:
            raise ConfigError(f"{where} ({table.get('name')!r}): {exc}") from None
        parts = [backend, *filters] + (["readonly"] if readonly else [])
        out.append(f"{name}={','.join(parts)}")
    return out


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServeOptions:
    """Defaults, then the file's values, then the flags given (None: not given).

    ``--param`` values (``params``) are merged name by name; every other flag replaces the
    file's value whole.
    """
    options = ServeOptions()
    known = {f.name for f in fields(ServeOptions)}
    for source in (file_values, flag_values):
        for name, value in source.items():
            if name not in known or value is None or name == "origins":
                continue
            if name == "params":
                options.params.update(value)
                for param in value:
                    options.origins.pop(f"param:{param}", None)
            else:
                setattr(options, name, value)
                options.origins.pop(name, None)
        options.origins.update(source.get("origins", {}))
    return options
