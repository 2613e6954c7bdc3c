"""AMQP field tables (message headers): Pigeon's own encoder, the check and the normaliser.

pamqp, which aio-pika uses, cannot encode some values RabbitMQ's table
grammar allows: it packs -128..-1 as an *unsigned* byte (``struct.error``),
reads a negative decimal as a huge positive one, and knows no ``bytes``. A
message carrying one could be neither retried nor dead-lettered. Here every
value is encoded the way RabbitMQ reads it:

==========================  =====  =================================================
Python                      type   notes
==========================  =====  =================================================
``bool``                    ``t``
``int``                     ``b`` ``s`` ``I`` ``l``  signed, the smallest that fits; beyond 64 bits: no
``float``                   ``d``  double (pamqp's ``f`` lost precision)
``decimal.Decimal``         ``D``  scale 0..255, signed 32-bit unscaled value
``str``                     ``S``  UTF-8
``bytes``                   ``S``  as is (a long string that was not UTF-8 comes back so)
``bytearray``/memoryview    ``x``  byte array
``datetime``                ``T``  seconds since 1970, naive means UTC; not before 1970
``dict`` (``str`` keys)     ``F``  nested table
``list``/``tuple``          ``A``  array
``None``                    ``V``
==========================  =====  =================================================

Keys are ``str`` of at most 255 UTF-8 bytes. :func:`check_headers` is what
dispatch runs before publishing (it raises :class:`InvalidHeaderError` naming
the key); :func:`normalise_headers` is what a worker (and LetterThief's
replayer) runs on headers it did not write: values that cannot be encoded are
left out and named, so the copy can still be published.
"""

from __future__ import annotations

import decimal
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pigeon.errors import InvalidHeaderError

MAX_DEPTH = 32
"""Nesting of tables and arrays beyond this is refused (a hostile message could nest deeper)."""

_INT_TYPES = (
    (-(1 << 7), (1 << 7) - 1, b"b", struct.Struct(">b")),
    (-(1 << 15), (1 << 15) - 1, b"s", struct.Struct(">h")),
    (-(1 << 31), (1 << 31) - 1, b"I", struct.Struct(">i")),
    (-(1 << 63), (1 << 63) - 1, b"l", struct.Struct(">q")),
)
_LONG = struct.Struct(">I")
_DOUBLE = struct.Struct(">d")
_DECIMAL = struct.Struct(">Bi")
_TIMESTAMP = struct.Struct(">Q")


class _Unencodable(Exception):
    """A value with no AMQP encoding; the message says why."""


def short_string(value: str, what: str) -> bytes:
    """``value`` as an AMQP short string (length byte, UTF-8); ``ValueError`` naming
    ``what`` when it is over 255 bytes."""
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} is {len(data)} bytes long; AMQP allows at most 255: {value!r}")
    return bytes((len(data),)) + data


def encode_table(table: Mapping[str, Any]) -> bytes:
    """The field table ``table`` as AMQP bytes (length prefix included).

    Raises :class:`InvalidHeaderError` naming the first key whose value (or
    the key itself) cannot be encoded; nothing is half-encoded.
    """
    parts: list[bytes] = []
    for key, value in table.items():
        try:
            parts.append(_key(key))
            parts.append(_value(value, 0))
        except _Unencodable as exc:
            raise InvalidHeaderError(key, str(exc)) from None
    data = b"".join(parts)
    return _LONG.pack(len(data)) + data


MAX_HEADER_BYTES = 120 * 1024
"""What the headers of a message may take of a content header frame (RabbitMQ's default
``frame_max`` is 128 KiB; the other properties take at most a few hundred bytes more).
A content header that does not fit makes the broker close the whole connection."""


def check_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` after checking every key and value can be encoded,
    and that together they fit in one frame (:data:`MAX_HEADER_BYTES`).

    Raises :class:`InvalidHeaderError` (a :class:`~pigeon.DispatchError` and a
    ``ValueError``) naming the key and what is wrong with it (for a table too
    large, its largest header).
    """
    out = dict(headers or {})
    size = len(encode_table(out))
    if size > MAX_HEADER_BYTES:
        largest = max(out, key=lambda k: len(encode_table({k: out[k]})))
        raise InvalidHeaderError(
            largest,
            f"the headers take {size} bytes, over the {MAX_HEADER_BYTES} that fit in one "
            "AMQP frame (the broker would close the connection); this is the largest",
        )
    return out


def normalise_headers(
    headers: Mapping[Any, Any], *, max_bytes: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``headers`` made encodable, and the keys that had to be left out.

    A string with lone surrogates is kept with them backslash-escaped; a
    ``bytes`` or non-``str`` key is decoded or turned into text; any value
    with no encoding (an integer beyond 64 bits, a decimal beyond 32 bits, a
    date before 1970, an object) is dropped. With ``max_bytes``, the largest
    headers are dropped too until the table fits (a content header must fit
    in one frame); Pigeon's own ``x-pigeon-*`` headers go last, since the
    attempt count and reason are what keep a retry copy from looping forever.
    Never raises.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    sizes: dict[str, int] = {}
    for raw_key, value in headers.items():
        key = _text_key(raw_key)
        value = _repair(value)
        try:
            sizes[key] = len(_key(key)) + len(_value(value, 0))
        except _Unencodable:
            dropped.append(key)
            continue
        out[key] = value
    if max_bytes is not None and sum(sizes.values()) > max_bytes:
        total = sum(sizes.values())
        for key in sorted(out, key=lambda k: (k.startswith("x-pigeon-"), -sizes[k])):
            if total <= max_bytes:
                break
            del out[key]
            total -= sizes[key]
            dropped.append(key)
    return out, dropped


def repair_decoded(headers: dict[str, Any]) -> dict[str, Any]:
    """Undo pamqp's misreading of negative decimals in headers it decoded (in place).

    pamqp reads a decimal's value as an *unsigned* 32-bit integer, so -1.5
    arrives as 429496729.1. Such a value can never be a real decimal (it
    does not fit the signed 32 bits it was sent in), so it is read again.
    """
    for key, value in headers.items():
        if isinstance(value, decimal.Decimal | dict | list):
            headers[key] = _repair(value)
    return headers


def _repair(value: Any) -> Any:
    if isinstance(value, decimal.Decimal) and value.is_finite():
        sign, _, exponent = value.as_tuple()
        scale = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        unscaled = int(value.scaleb(scale))
        if not sign and (1 << 31) <= unscaled < (1 << 32):
            return decimal.Decimal(unscaled - (1 << 32)).scaleb(-scale)
        return value
    if isinstance(value, dict):
        return {k: _repair(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_repair(v) for v in value]
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
    return value


def _text_key(key: Any) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    if isinstance(key, str):
        return _repair(key)  # type: ignore[no-any-return]
    return str(key)


def _key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise _Unencodable(f"the key is a {type(key).__name__}, not a str")
    try:
        data = key.encode()
    except UnicodeEncodeError as exc:
        raise _Unencodable(f"the key is not valid text: {exc}") from None
    if len(data) > 255:
        raise _Unencodable(f"the key is {len(data)} bytes long; AMQP allows at most 255")
    return bytes((len(data),)) + data


def _value(value: Any, depth: int) -> bytes:
    """One table value with its type byte; raises :class:`_Unencodable`."""
    if isinstance(value, str):
        try:
            data = value.encode()
        except UnicodeEncodeError as exc:
            raise _Unencodable(f"the string is not valid text: {exc}") from None
        return b"S" + _LONG.pack(len(data)) + data
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        for low, high, kind, packer in _INT_TYPES:
            if low <= value <= high:
                return kind + packer.pack(value)
        raise _Unencodable(f"the integer {value} does not fit in 64 signed bits")
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return b"S" + _LONG.pack(len(value)) + value
    if isinstance(value, bytearray | memoryview):
        data = bytes(value)
        return b"x" + _LONG.pack(len(data)) + data
    if value is None:
        return b"V"
    if isinstance(value, decimal.Decimal):
        return b"D" + _decimal(value)
    if isinstance(value, datetime):
        return b"T" + _timestamp(value)
    if depth >= MAX_DEPTH:
        raise _Unencodable(f"tables and arrays nest deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            parts.append(_key(k))
            parts.append(_value(v, depth + 1))
        data = b"".join(parts)
        return b"F" + _LONG.pack(len(data)) + data
    if isinstance(value, list | tuple):
        data = b"".join(_value(v, depth + 1) for v in value)
        return b"A" + _LONG.pack(len(data)) + data
    raise _Unencodable(f"a {type(value).__name__} has no AMQP encoding")


def _decimal(value: decimal.Decimal) -> bytes:
    if not value.is_finite():
        raise _Unencodable(f"the decimal {value} is not finite")
    _, _, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    scale = max(-exponent, 0)
    unscaled = int(value.scaleb(scale))
    if scale > 255 or not -(1 << 31) <= unscaled < (1 << 31):
        raise _Unencodable(f"the decimal {value} does not fit AMQP's 32-bit decimal")
    return _DECIMAL.pack(scale, unscaled)


def _timestamp(value: datetime) -> bytes:
    seconds = int(
        (value if value.utcoffset() is not None else value.replace(tzinfo=UTC)).timestamp()
    )
    if not 0 <= seconds < (1 << 64):
        raise _Unencodable(f"the timestamp {value.isoformat()} is before 1970")
    return _TIMESTAMP.pack(seconds)
