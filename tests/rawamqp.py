"""Publishing with hand-built AMQP frames: property bytes no client library would write.

pika can put raw bytes in short strings, but it encodes header tables itself.
Here the property list (and so every field-table type the spec and RabbitMQ
allow: ``b B s u I i l f d D T F A x t V S``) is written byte by byte, so a
test can send exactly what a foreign client, or a broken one, could.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pamqp.frame
from pamqp import commands

from tests.conftest import AMQP_URL

# property flag bits of the basic class, highest first
CONTENT_TYPE, CONTENT_ENCODING, HEADERS, DELIVERY_MODE = 1 << 15, 1 << 14, 1 << 13, 1 << 12
CORRELATION_ID, MESSAGE_ID, TIMESTAMP, TYPE = 1 << 10, 1 << 7, 1 << 6, 1 << 5


def shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def table(*fields: tuple[bytes, bytes]) -> bytes:
    """A field table of ``(key, typed value)`` pairs, values already typed (``b"S" + …``)."""
    body = b"".join(shortstr(key) + value for key, value in fields)
    return longstr(body)


def array(*values: bytes) -> bytes:
    return longstr(b"".join(values))


@dataclass
class Raw:
    """One message: routing key and the property list in wire order, flags alongside."""

    routing_key: bytes
    body: bytes = b"{}"
    props: list[tuple[int, bytes]] = field(default_factory=list)

    def header_payload(self) -> bytes:
        flags = 0
        data = b""
        for flag, value in sorted(self.props, key=lambda p: -p[0]):
            flags |= flag
            data += value
        return struct.pack(">HHQH", 60, 0, len(self.body), flags) + data


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


class _Conn:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "", parts.port or 5672), 10)
        self.buffer = b""
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self.read()  # Connection.Start
        login = f"\x00{parts.username}\x00{parts.password}"
        self.send(0, commands.Connection.StartOk(mechanism="PLAIN", response=login))
        tune = self.read()
        assert isinstance(tune, commands.Connection.Tune)
        self.frame_max = tune.frame_max
        self.send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        vhost = parts.path[1:] or "/"
        self.send(0, commands.Connection.Open(vhost))
        self.read()
        self.send(1, commands.Channel.Open())
        self.read()
        self.send(1, commands.Confirm.Select())
        self.read()

    def send(self, channel: int, method: Any) -> None:
        self.sock.sendall(pamqp.frame.marshal(method, channel))

    def read(self) -> Any:
        while True:
            if len(self.buffer) >= 7:
                size = struct.unpack(">I", self.buffer[3:7])[0]
                if len(self.buffer) >= size + 8:
                    used, _, frame = pamqp.frame.unmarshal(self.buffer)
                    self.buffer = self.buffer[used:]
                    if isinstance(frame, commands.Channel.Close | commands.Connection.Close):
                        raise AssertionError(f"the broker refused the message: {frame.reply_text}")
                    return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the broker closed the connection")
            self.buffer += chunk

    def publish(self, exchange: str, message: Raw) -> None:
        method = commands.Basic.Publish(exchange=exchange, routing_key="x")
        payload = bytearray(pamqp.frame.marshal(method, 1))
        # replace the routing key pamqp wrote ("x") by the raw bytes
        start = 7 + 4 + 2 + 1 + len(exchange.encode())
        head = bytes(payload[7:start]) + shortstr(message.routing_key) + b"\x00"
        out = _frame(1, 1, head) + _frame(2, 1, message.header_payload())
        step = self.frame_max - 8
        for at in range(0, len(message.body), step):
            out += _frame(3, 1, message.body[at : at + step])
        self.sock.sendall(out)
        ack = self.read()
        assert isinstance(ack, commands.Basic.Ack), ack

    def close(self) -> None:
        self.sock.close()


def _publish_all(exchange: str, messages: list[Raw], url: str) -> None:
    conn = _Conn(url)
    try:
        for message in messages:
            conn.publish(exchange, message)
    finally:
        conn.close()


async def publish_raw(exchange: str, messages: list[Raw], url: str = AMQP_URL) -> None:
    """Publish ``messages`` on one raw connection, each confirmed, off the event loop."""
    await asyncio.to_thread(_publish_all, exchange, messages, url)
