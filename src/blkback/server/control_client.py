"""The client side of the control socket: what ``ctl``, the benchmarks and the experiments use.

The protocol is :class:`~blkback.server.server.ControlServer`'s: one JSON object per line
each way; an answer carries ``"ok"``, and a refusal an ``"error"``. This module opens no
server and imports nothing of it, so that a client process stays light.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from blkback.errors import ConfigError, EnvironmentProblem


class ControlConnection:
    """One persistent connection to the control socket at ``path``: any number of requests,
    one JSON line each way (a context manager; :meth:`close` hangs up).

    Raises (from the constructor and :meth:`request`):
        EnvironmentProblem: No server listens there, it may not be used, or it hung up.
        ConfigError: The server refused a request (its ``error`` is the message).
    """

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise EnvironmentProblem(f"no server listens on control socket {path}") from exc
        except PermissionError as exc:
            sock.close()
            raise EnvironmentProblem(f"not allowed to use control socket {path}") from exc
        self._sock = sock
        self._file = sock.makefile("rwb")

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request on this connection and return the answer."""
        self._file.write(json.dumps(payload).encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise EnvironmentProblem(f"the server at {self.path} closed the control connection")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok", False):
            raise ConfigError(answer.get("error", "request refused"))
        return answer

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(path: str, payload: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one control request to the socket at ``path`` on a connection of its own and
    return the answer (errors: see :class:`ControlConnection`)."""
    with ControlConnection(path, timeout_s) as conn:
        return conn.request(payload)


class ControlClient:
    """One server's control socket, with a method per operation."""

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send any request (see :func:`request`)."""
        return request(self.path, payload, self.timeout_s)

    def stats(self) -> dict[str, Any]:
        """What ``ctl stats --json`` prints."""
        return self.request({"op": "stats"})

    def params(self) -> dict[str, Any]:
        """Every runtime parameter by name."""
        params: dict[str, Any] = self.request({"op": "params"})["params"]
        return params

    def get(self, name: str) -> Any:
        """One runtime parameter's value."""
        return self.request({"op": "get", "name": name})["value"]

    def set(self, name: str, value: object) -> dict[str, Any]:
        """Change one runtime parameter; the answer has ``old``, ``value`` and ``now_ms``."""
        return self.request({"op": "set", "name": name, "value": str(value)})

    def report_pressure(self, level: str = "critical") -> dict[str, Any]:
        """Report memory pressure by hand; the answer has ``level`` and ``devices``."""
        return self.request({"op": "pressure", "level": level})

    def pressure_status(self) -> Any:
        """The server's pressure monitor status (None when it runs none)."""
        return self.request({"op": "pressure-status"})["monitor"]

    def pool_pages(self) -> list[int]:
        """Free pages in each ring's pool, ring by ring."""
        stats = self.stats()
        return [r["pool_pages"] for d in stats["devices"] for r in d["rings"]]
