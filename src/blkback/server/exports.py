"""Exports: a name, a storage stack, and the core Device whose rings serve it."""

from __future__ import annotations

from dataclasses import dataclass

from blkback.core.device import Device
from blkback.errors import ConfigError
from blkback.protocol.constants import TFlag
from blkback.protocol.handshake import ExportInfo
from blkback.storage.base import Storage

MAX_NAME = 4096


@dataclass
class Export:
    """One export: what clients see (info), where data lives (storage), its core device."""

    name: str
    storage: Storage
    device: Device
    info: ExportInfo
    spec: str


def tflags_for(storage: Storage) -> int:
    """Transmission flags that are honest about what ``storage`` can do."""
    flags = int(TFlag.HAS_FLAGS)
    if storage.readonly:
        flags |= TFlag.READ_ONLY
    if storage.can_flush:
        flags |= TFlag.SEND_FLUSH
    if storage.can_fua:
        flags |= TFlag.SEND_FUA
    if storage.can_trim and not storage.readonly:
        flags |= TFlag.SEND_TRIM
    if storage.can_zero and not storage.readonly:
        flags |= TFlag.SEND_WRITE_ZEROES
        if storage.can_fast_zero:
            flags |= TFlag.SEND_FAST_ZERO
    if storage.can_cache:
        flags |= TFlag.SEND_CACHE
    if storage.can_multi_conn:
        flags |= TFlag.CAN_MULTI_CONN
    flags |= TFlag.SEND_DF
    return flags


def parse_export_arg(text: str) -> tuple[str, str]:
    """Split ``NAME=SPEC`` (the ``--export`` syntax) and check the name."""
    name, sep, spec = text.partition("=")
    if not sep or not spec:
        raise ConfigError(f"--export {text!r}: expected NAME=SPEC, e.g. disk=memory:1G")
    if not name or len(name.encode()) > MAX_NAME:
        raise ConfigError(f"--export {text!r}: the name must be 1 to {MAX_NAME} bytes")
    return name, spec


class Catalog:
    """The server's exports, for the handshake (``ExportCatalog``) and the control socket."""

    def __init__(self) -> None:
        self.exports: dict[str, Export] = {}
        self.default_name: str | None = None

    def add(self, export: Export) -> None:
        """Add an export; the first one added is the default (the empty name)."""
        if export.name in self.exports:
            raise ConfigError(f"export {export.name!r} is defined twice")
        self.exports[export.name] = export
        if self.default_name is None:
            self.default_name = export.name

    def get(self, name: str) -> Export | None:
        """The export called ``name``; ``""`` is the default export."""
        if name == "" and self.default_name is not None:
            name = self.default_name
        return self.exports.get(name)

    # -- ExportCatalog protocol -----------------------------------------------------------
    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return None if export is None else export.info

    def names(self) -> list[str]:
        return list(self.exports)
