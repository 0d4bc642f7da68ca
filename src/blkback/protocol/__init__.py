"""Sans-IO NBD protocol codec: handshake state machine and transmission-phase encoding.

Rule: nothing in this package imports asyncio, socket, select, threading or time. Bytes go in,
bytes and decisions come out; the server owns every socket.
"""

from __future__ import annotations
