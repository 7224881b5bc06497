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
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import msgspec
from msgspec import Raw

from cadence.engine.events import MAX_EVENT_NAME, MAX_ID, MAX_MESSAGE_ID, corrected_timestamp
from cadence.errors import EventError

__all__ = ["TextRow", "text_row", "text_rows"]

#: An ``events`` row in ``COLUMNS`` order with the payload as JSON text.
TextRow = tuple[str, str, str | None, str | None, str | None, int, int, str, str]

_ABSENT: Final = Raw()
#: The bytes of a JSON number by class (every digit "0", the exponent mark "e", others "x";
#: signs are deleted): a number that overflows a double (which orjson rejects, and msgspec
#: keeps as raw text) shows there as "0e000" (a three-digit exponent) or as 309 digits in a
#: row. That test is cheap; a line that passes it gets the exact one (:data:`_OVERFLOW`), and
#: a line that fails both takes the general path (``"x1e234"`` in a string costs that line
#: only speed).
_NUMBER_CLASSES: Final = bytes(
    ord("0") if 48 <= b <= 57 else ord("e") if b in b"eE" else ord("x") for b in range(256)
)
_SIGNS: Final = b"+-"
_EXPONENT: Final = b"0e000"
#: A number with a three-digit exponent, where JSON puts a value (after ``:``, ``,``, ``[`` or a blank).
_OVERFLOW: Final = re.compile(rb"(?<=[:,\[\s])-?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]{3}")
_LONG_DIGITS: Final = b"0" * 309
#: A necessary condition for :data:`_LONG_DIGITS`, cheaper to look for (a long pattern costs
#: the search its preparation on every line).
_MANY_DIGITS: Final = b"0" * 20
#: The NUL character, which PostgreSQL cannot store: the general path finds where it is.
_NUL: Final = b"\\u0000"


def _suspect(line: bytes) -> bool:
    """Whether ``line`` may hold a number a double cannot hold, or a NUL character
    (:func:`text_rows` has this inline).

    >>> [_suspect(b) for b in (b'{"a":1e400}', b'{"a":[2.5E-300]}', b'{"id":"1e234"}', b'{"a":1.5e30}')]
    [True, True, False, False]
    >>> _suspect(b'{"a":' + b"9" * 309 + b"}"), _suspect(b'{"a":' + b"9" * 308 + b"}")
    (True, False)
    """
    if b"\\" in line and _NUL in line:  # a one-byte search is a memchr: cheap
        return True
    classes = line.translate(_NUMBER_CLASSES, _SIGNS)
    return (_EXPONENT in classes and _OVERFLOW.search(line) is not None) or (
        _MANY_DIGITS in classes and _LONG_DIGITS in classes
    )


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
_fromisoformat = datetime.fromisoformat
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_OPEN: Final = ord("{")
_NULL: Final = ord("n")  # the only JSON value that starts with "n"


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
    return text_rows([line], default_type=default_type, received_ms=received_ms, source=source)[0]


def text_rows(
    lines: list[bytes], *, default_type: str, received_ms: int, source: str
) -> list[TextRow | None]:
    """:func:`text_row` of each line (one call for a group: this loop runs once per imported event)."""
    rows: list[TextRow | None] = []
    append = rows.append
    decode = _decode
    nul = _NUL
    backslash = b"\\"
    number_classes = _NUMBER_CLASSES
    signs = _SIGNS
    exponent = _EXPONENT
    overflow = _OVERFLOW.search
    long_digits = _LONG_DIGITS
    many_digits = _MANY_DIGITS
    unset = msgspec.UNSET
    decode_error = msgspec.DecodeError
    fromisoformat = _fromisoformat
    epoch = _EPOCH
    one_ms = _ONE_MS
    utc = UTC
    for line in lines:
        if backslash in line and nul in line:  # _suspect(line), inline; memchr first
            append(None)
            continue
        classes = line.translate(number_classes, signs)
        if (exponent in classes and overflow(line) is not None) or (
            many_digits in classes and long_digits in classes
        ):
            append(None)
            continue
        if not line.isascii():
            try:
                line.decode()  # strict UTF-8, as orjson requires
            except UnicodeDecodeError:
                append(None)
                continue
        try:
            call = decode(line)
        except decode_error:  # also a ValidationError: a value of another type or size
            append(None)
            continue
        kind = default_type if call.type is unset else call.type
        user_id = call.userId
        anonymous_id = call.anonymousId
        if user_id is None and anonymous_id is None:
            append(None)
            continue
        # The first byte of a JSON value tells its type: "{" an object, "n" null.
        parts: list[bytes]
        raw = bytes(call.context)
        if raw and raw[0] != _NULL:
            if raw[0] != _OPEN:
                append(None)
                continue
            # kept unless empty
            parts = [b'{"context":', raw, b","] if len(raw) > 2 and raw[1:].strip() != b"}" else [b"{"]
        else:
            parts = [b"{"]
        if call.integrations:
            raw = bytes(call.integrations)
            if raw[0] != _NULL:
                if raw[0] != _OPEN:
                    append(None)
                    continue
                if len(raw) > 2 and raw[1:].strip() != b"}":
                    parts += (b'"integrations":', raw, b",")
        if kind == "track":
            event_name = call.event
            if event_name is None or event_name.isspace():
                append(None)
                continue
            raw = bytes(call.properties) or b"{}"
            key = b'"properties":'
        elif kind == "identify":
            event_name = None
            raw = bytes(call.traits) or b"{}"
            key = b'"traits":'
        elif kind == "page" or kind == "screen":
            event_name = call.name
            raw = bytes(call.properties) or b"{}"
            key = b'"properties":'
        else:  # alias, group, or not a call type
            append(None)
            continue
        if raw[0] != _OPEN:
            if raw[0] != _NULL:
                append(None)
                continue
            raw = b"{}"
        parts += (key, raw)
        if call.category and (kind == "page" or kind == "screen") and bytes(call.category)[0] != _NULL:
            parts += (b',"category":', bytes(call.category))
        if call.channel and bytes(call.channel)[0] != _NULL:
            parts += (b',"channel":', bytes(call.channel))
        parts.append(b"}")
        timestamp = call.timestamp
        try:
            if timestamp is not None and call.originalTimestamp is None and call.sentAt is None:
                parsed = fromisoformat(timestamp)  # ValueError: the general path says why
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=utc)
                ts_ms = (parsed - epoch) // one_ms
            elif timestamp is None and call.originalTimestamp is None:
                ts_ms = received_ms
            else:
                ts_ms = corrected_timestamp(
                    {
                        "timestamp": timestamp,
                        "originalTimestamp": call.originalTimestamp,
                        "sentAt": call.sentAt,
                    },
                    received_ms=received_ms,
                )
        except (ValueError, EventError):
            append(None)
            continue
        append(
            (
                call.messageId,
                kind,
                event_name,
                user_id,
                anonymous_id,
                ts_ms,
                received_ms,
                source,
                b"".join(parts).decode(),
            )
        )
    return rows
