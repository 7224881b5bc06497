"""The import's fast path for the common Segment call: one typed decode, nested objects kept raw.

A common call (``track``, ``identify``, ``page`` or ``screen`` with string ids, a
``messageId``, ISO-8601 timestamps and object-valued ``context``/``properties``/``traits``)
is decoded by msgspec straight into a typed struct whose nested objects stay slices of
the line's JSON: no Python objects are built for them and nothing is re-encoded, the
stored payload is assembled from the slices. That is a third of the cost of decoding the
line into dicts, validating them with :func:`~cadence.engine.events.parse_call` and
encoding the payload again.

For anything else :func:`text_row` returns None and the caller takes the general path
(``orjson.loads`` and ``parse_call``), which decides exactly as before and names the field
of an error. The fast path accepts a line only when the general path would accept it
with the same result, so it never changes what is stored or rejected; it leaves to the
general path every line where the two parsers could differ (text that is not valid UTF-8,
numbers that overflow a double, nesting near the depth limit: msgspec's limit is the lower).
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec
from msgspec import Raw

from cadence.engine.events import MAX_EVENT_NAME, MAX_ID, MAX_MESSAGE_ID, _timestamp_ms, corrected_timestamp
from cadence.errors import EventError

__all__ = ["TextRow", "text_row"]

#: An ``events`` row in ``COLUMNS`` order with the payload as JSON text.
TextRow = tuple[str, str, str | None, str | None, str | None, int, int, str, str]

_ABSENT: Final = Raw()
#: Classes of the bytes a JSON number is made of (all digits alike), everything else "x": a
#: number that overflows a double (which orjson rejects and msgspec keeps as raw text) shows
#: there as a digit, "e" and three digits, or as 309 digits in a row. That test is cheap; a
#: line that passes it gets the exact one (:data:`_OVERFLOW`), and a line that fails both
#: the general path (``"x1e234"`` in a string costs that line only speed).
_NUMBER_CLASSES: Final = bytes(
    ord("0") if 48 <= b <= 57 else b if b in b"eE" else ord("+") if b in b"+-" else ord("x")
    for b in range(256)
).replace(b"E", b"e")
#: A number with a three-digit exponent, where JSON puts a value (after ``:``, ``,``, ``[`` or a blank).
_OVERFLOW: Final = re.compile(rb"(?<=[:,\[\s])-?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]{3}")
_LONG_DIGITS: Final = b"0" * 309
#: The NUL character, which PostgreSQL cannot store: the general path finds where it is.
_NUL: Final = b"\\u0000"


def _suspect(line: bytes) -> bool:
    """Whether ``line`` may hold a number a double cannot hold, or a NUL character.

    >>> [_suspect(b) for b in (b'{"a":1e400}', b'{"a":[2.5E-300]}', b'{"id":"1e234"}', b'{"a":1.5e30}')]
    [True, True, False, False]
    >>> _suspect(b'{"a":' + b"9" * 309 + b"}"), _suspect(b'{"a":' + b"9" * 308 + b"}")
    (True, False)
    """
    if _NUL in line:
        return True
    classes = line.translate(_NUMBER_CLASSES)
    if b"0e" in classes and (b"0e000" in classes or b"0e+000" in classes):
        return _OVERFLOW.search(line) is not None
    return classes.count(b"0") >= 309 and _LONG_DIGITS in classes


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_NAME)]


class _Call(msgspec.Struct, gc=False):
    """The fields of a Segment call the event log keeps (others are ignored, as by ``parse_call``),
    with the common case's constraints: a value outside them sends the line to the general path."""

    messageId: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_ID)]  # else a content hash
    type: str | msgspec.UnsetType = msgspec.UNSET  # null is not "absent" for the general path
    userId: _Id | None = None
    anonymousId: _Id | None = None
    event: _Name | None = None
    name: Annotated[str, msgspec.Meta(max_length=MAX_EVENT_NAME)] | None = None
    timestamp: str | None = None
    originalTimestamp: str | None = None
    sentAt: str | None = None
    context: Raw = _ABSENT
    integrations: Raw = _ABSENT
    properties: Raw = _ABSENT
    traits: Raw = _ABSENT
    category: Raw = _ABSENT
    channel: Raw = _ABSENT


_decode = msgspec.json.Decoder(_Call).decode
_OPEN: Final = ord("{")
_NULL: Final = ord("n")  # the only JSON value that starts with "n"


def _optional(raw: Raw) -> bytes | None:
    """An object kept only when not empty (``context``, ``integrations``), as its JSON; None when
    absent, null or empty; ValueError for anything else (an error the general path reports)."""
    if not raw:
        return None
    text = bytes(raw)
    first = text[0]
    if first == _OPEN:
        return text if len(text) > 2 and text[1:].strip() != b"}" else None
    if first == _NULL:
        return None
    raise ValueError


def _object(raw: Raw) -> bytes:
    """An object always kept (``properties``, ``traits``), as its JSON: ``{}`` when absent or null;
    ValueError for anything else."""
    if not raw:
        return b"{}"
    text = bytes(raw)
    first = text[0]
    if first == _OPEN:
        return text
    if first == _NULL:
        return b"{}"
    raise ValueError


def text_row(line: bytes, *, default_type: str, received_ms: int, source: str) -> TextRow | None:
    """``line`` as an ``events`` row, or None when it is not the common case.

    >>> row = text_row(b'{"type":"track","event":"Signed Up","userId":"u1","messageId":"m1",'
    ...     b'"timestamp":"2026-01-01T00:00:00Z","properties":{"plan":"pro"}}',
    ...     default_type="track", received_ms=5, source="import")
    >>> row
    ('m1', 'track', 'Signed Up', 'u1', None, 1767225600000, 5, 'import', '{"properties":{"plan":"pro"}}')
    >>> text_row(b'{"type":"track","event":"Signed Up","userId":42,"messageId":"m1"}',
    ...     default_type="track", received_ms=5, source="import") is None
    True
    """
    if _suspect(line):
        return None
    if not line.isascii():
        try:
            line.decode()  # strict UTF-8, as orjson requires
        except UnicodeDecodeError:
            return None
    try:
        call = _decode(line)
    except msgspec.DecodeError:  # also a ValidationError: a value of another type or size
        return None
    kind = default_type if call.type is msgspec.UNSET else call.type
    user_id = call.userId
    anonymous_id = call.anonymousId
    if user_id is None and anonymous_id is None:
        return None
    try:
        context = _optional(call.context)
        parts = [b'{"context":', context] if context is not None else [b"{"]
        integrations = _optional(call.integrations)
        if integrations is not None:
            parts += (b',"integrations":' if context is not None else b'"integrations":', integrations)
        comma = b"," if len(parts) > 1 else b""
        if kind == "track":
            event_name = call.event
            if event_name is None or event_name.isspace():
                return None
            parts += (comma, b'"properties":', _object(call.properties))
        elif kind == "identify":
            event_name = None
            parts += (comma, b'"traits":', _object(call.traits))
        elif kind == "page" or kind == "screen":
            event_name = call.name
            parts += (comma, b'"properties":', _object(call.properties))
            if call.category and bytes(call.category)[0] != _NULL:
                parts += (b',"category":', call.category)
        else:  # alias, group, or not a call type
            return None
        if call.channel and bytes(call.channel)[0] != _NULL:
            parts += (b',"channel":', call.channel)
    except ValueError:
        return None
    timestamp = call.timestamp
    if call.originalTimestamp is None and call.sentAt is None and timestamp is not None:
        try:
            ts_ms = _timestamp_ms(timestamp, "timestamp")
        except EventError:
            return None
    elif timestamp is None and call.originalTimestamp is None:
        ts_ms = received_ms
    else:
        try:
            ts_ms = corrected_timestamp(
                {"timestamp": timestamp, "originalTimestamp": call.originalTimestamp, "sentAt": call.sentAt},
                received_ms=received_ms,
            )
        except EventError:
            return None
    parts.append(b"}")
    payload = b"".join(parts).decode()
    return (call.messageId, kind, event_name, user_id, anonymous_id, ts_ms, received_ms, source, payload)
