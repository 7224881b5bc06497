"""Segment-spec calls: validation, timestamp correction, and the :class:`NewEvent` they become.

Every source (the HTTP API, file imports, provider webhooks) turns its input into
:class:`NewEvent` objects and hands them to :func:`cadence.engine.ingest.record_events`.
A malformed call raises :class:`~cadence.errors.EventError` naming the field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
import orjson

from cadence.channels import (
    CONSENT_EVENT,
    FEEDBACK_EVENTS,
    consent_warnings,
    describe_value,
    feedback_warnings,
)
from cadence.clock import valid_zone, zone_warnings
from cadence.errors import EventError

__all__ = [
    "CALL_TYPES",
    "LoggedEvent",
    "NewEvent",
    "call_warnings",
    "context_warnings",
    "may_warn",
    "parse_call",
    "parse_timestamp",
]

CALL_TYPES = ("track", "identify", "alias", "page", "screen", "group")
MAX_ID = 200
MAX_MESSAGE_ID = 100
MAX_EVENT_NAME = 200


class NewEvent(NamedTuple):
    """An event ready for the log: ids and time pulled out, the rest kept in ``payload``."""

    message_id: str
    type: str
    ts_ms: int
    payload: dict[str, Any]
    event: str | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    source: str = "api"
    received_ms: int = 0


def parse_timestamp(value: Any, where: str) -> datetime:
    """Parse an ISO-8601 timestamp (``Z``, an offset, or none for UTC) or epoch seconds.

    >>> parse_timestamp("2026-03-04T05:06:07Z", "timestamp").isoformat()
    '2026-03-04T05:06:07+00:00'
    >>> parse_timestamp("2026-03-04 05:06:07", "timestamp").isoformat()
    '2026-03-04T05:06:07+00:00'
    """
    if isinstance(value, bool):
        raise EventError(f"{where}: expected an ISO-8601 timestamp, got a boolean", field=where)
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise EventError(f"{where}: {value!r} is not a valid epoch time", field=where) from exc
    if not isinstance(value, str):
        raise EventError(f"{where}: expected an ISO-8601 timestamp string", field=where)
    try:
        parsed = datetime.fromisoformat(value.strip())  # 3.11+: "Z", offsets, a space for "T"
    except ValueError as exc:
        raise EventError(f"{where}: {value!r} is not an ISO-8601 timestamp", field=where) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _optional_id(raw: dict[str, Any], name: str, prefix: str, limit: int = MAX_ID) -> str | None:
    value = raw.get(name)
    if type(value) is str and 0 < len(value) <= limit:  # the common case, checked first
        return value
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EventError(f"{prefix}{name}: expected a string", field=prefix + name)
    text = str(value)
    if len(text) > limit:
        raise EventError(f"{prefix}{name}: longer than {limit} characters ({len(text)})", field=prefix + name)
    return text


def _object(raw: dict[str, Any], name: str, prefix: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError(f"{prefix}{name}: expected an object", field=prefix + name)
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_fromisoformat = datetime.fromisoformat


def _timestamp_ms(value: Any, where: str) -> int:
    """``value`` (see :func:`parse_timestamp`) as integer ms since the epoch.

    The common case, an ISO-8601 string, is parsed inline; anything else goes through
    :func:`parse_timestamp`, which names ``where`` in its error.

    >>> _timestamp_ms("2026-01-01T00:00:00.123Z", "timestamp")
    1767225600123
    """
    if type(value) is str:
        try:
            parsed = _fromisoformat(value)
        except ValueError:
            parsed = parse_timestamp(value, where)  # surrounding blanks, or the error
    else:
        parsed = parse_timestamp(value, where)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _ONE_MS


def corrected_timestamp(raw: dict[str, Any], *, received_ms: int, prefix: str = "") -> int:
    """The event time in ms, corrected for client clock skew as Segment does.

    ``timestamp = receivedAt - (sentAt - originalTimestamp)`` when ``sentAt`` is given;
    an explicit ``timestamp`` without ``sentAt`` is trusted; else the receive time.

    >>> corrected_timestamp({"originalTimestamp": "2026-01-01T00:00:00Z",
    ...     "sentAt": "2026-01-01T00:00:10Z"}, received_ms=1767225605000)
    1767225595000
    """
    get = raw.get
    timestamp = get("timestamp")
    original_ts = get("originalTimestamp")
    original = original_ts or timestamp
    sent_at = get("sentAt")
    if original is not None and sent_at is not None:
        where = "originalTimestamp" if original_ts else "timestamp"
        original_ms = _timestamp_ms(original, prefix + where)
        sent_ms = _timestamp_ms(sent_at, prefix + "sentAt")
        return received_ms - (sent_ms - original_ms)
    if timestamp is not None:
        return _timestamp_ms(timestamp, prefix + "timestamp")
    if original is not None:
        return _timestamp_ms(original, prefix + "originalTimestamp")
    return received_ms


def _auto_message_id(raw: dict[str, Any]) -> str:
    """A stable id for a call sent without ``messageId``: its content hash, so a retry dedupes."""
    digest = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "auto-" + digest[:40]


def parse_call(
    raw: Any,
    *,
    received_ms: int,
    call_type: str | None = None,
    source: str = "api",
    prefix: str = "",
) -> NewEvent:
    """Validate one Segment-spec call and turn it into a :class:`NewEvent`.

    :param raw: the decoded JSON object.
    :param call_type: the type implied by the route (``/v1/track``); ``raw["type"]``
        is used when None (batches, imports).
    :param prefix: prepended to field names in errors (``"batch.3."``).

    >>> e = parse_call({"type": "track", "event": "Order Completed", "userId": "u1",
    ...     "messageId": "m1", "timestamp": "2026-01-01T00:00:00Z"}, received_ms=0)
    >>> (e.type, e.event, e.user_id, e.ts_ms)
    ('track', 'Order Completed', 'u1', 1767225600000)
    """
    if type(raw) is not dict and not isinstance(raw, dict):
        raise EventError(f"{prefix or 'body'}: expected a JSON object", field=prefix.rstrip(".") or None)
    # Each check tests the common case inline and calls a helper only for the rest, which
    # raises the error or normalises the value; the import and batch paths run this per event.
    get = raw.get
    kind = call_type or get("type")
    if kind not in CALL_TYPES:
        if kind is None:
            raise EventError(
                f"{prefix}type: required (one of {', '.join(CALL_TYPES)})", field=prefix + "type"
            )
        raise EventError(
            f"{prefix}type: {kind!r} is not a Segment call type ({', '.join(CALL_TYPES)})",
            field=prefix + "type",
        )
    user_id = get("userId")
    if user_id is not None and (type(user_id) is not str or not 0 < len(user_id) <= MAX_ID):
        user_id = _optional_id(raw, "userId", prefix)
    anonymous_id = get("anonymousId")
    if anonymous_id is not None and (type(anonymous_id) is not str or not 0 < len(anonymous_id) <= MAX_ID):
        anonymous_id = _optional_id(raw, "anonymousId", prefix)
    if user_id is None and anonymous_id is None:
        raise EventError(f"{prefix}userId: userId or anonymousId is required", field=prefix + "userId")
    message_id = get("messageId")
    if type(message_id) is not str or not 0 < len(message_id) <= MAX_MESSAGE_ID:
        message_id = _optional_id(raw, "messageId", prefix, MAX_MESSAGE_ID) or _auto_message_id(raw)

    event_name: str | None = None
    payload: dict[str, Any] = {}
    context = get("context")
    if context:
        if type(context) is not dict:
            context = _object(raw, "context", prefix)
        payload["context"] = context
    elif context is not None:
        _object(raw, "context", prefix)  # a falsy non-object, e.g. [] or "": the error
    integrations = get("integrations")
    if integrations:
        if type(integrations) is not dict:
            integrations = _object(raw, "integrations", prefix)
        payload["integrations"] = integrations
    elif integrations is not None:
        _object(raw, "integrations", prefix)
    if kind == "track":
        event_name = get("event")
        if type(event_name) is not str or not 0 < len(event_name) <= MAX_EVENT_NAME or event_name.isspace():
            if not isinstance(event_name, str) or not event_name.strip():
                raise EventError(
                    f"{prefix}event: required for track, a non-empty string", field=prefix + "event"
                )
            if len(event_name) > MAX_EVENT_NAME:
                raise EventError(
                    f"{prefix}event: longer than {MAX_EVENT_NAME} characters", field=prefix + "event"
                )
        properties = get("properties")
        payload["properties"] = properties if type(properties) is dict else _object(raw, "properties", prefix)
    elif kind in ("identify", "group"):
        traits = get("traits")
        payload["traits"] = traits if type(traits) is dict else _object(raw, "traits", prefix)
        if kind == "group":
            group_id = _optional_id(raw, "groupId", prefix)
            if group_id is None:
                raise EventError(f"{prefix}groupId: required for group", field=prefix + "groupId")
            payload["groupId"] = group_id
    elif kind in ("page", "screen"):
        name = get("name")
        if name is not None and not isinstance(name, str):
            raise EventError(f"{prefix}name: expected a string", field=prefix + "name")
        if name is not None and len(name) > MAX_EVENT_NAME:  # the event column's width
            raise EventError(f"{prefix}name: longer than {MAX_EVENT_NAME} characters", field=prefix + "name")
        event_name = name
        payload["properties"] = _object(raw, "properties", prefix)
        if get("category") is not None:
            payload["category"] = raw["category"]
    elif kind == "alias":
        previous = _optional_id(raw, "previousId", prefix)
        if previous is None:
            raise EventError(f"{prefix}previousId: required for alias", field=prefix + "previousId")
        if user_id is None:
            raise EventError(f"{prefix}userId: required for alias", field=prefix + "userId")
        payload["previousId"] = previous
    if get("channel") is not None:  # RudderStack's optional field
        payload["channel"] = raw["channel"]

    ts_ms = corrected_timestamp(raw, received_ms=received_ms, prefix=prefix)
    # Positional and without NewEvent.__new__: this runs once per ingested event.
    return _new_event(
        NewEvent, (message_id, kind, ts_ms, payload, event_name, user_id, anonymous_id, source, received_ms)
    )


_new_event = tuple.__new__


class LoggedEvent(NamedTuple):
    """An event from the log, with the canonical customer it belongs to (at processing time).

    A named tuple rather than a dataclass: the engine loop builds one per event, and a
    tuple is several times cheaper to create than a frozen dataclass.
    """

    id: int
    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    customer_id: int
    ts_ms: int
    source: str
    payload: dict[str, Any]

    @property
    def properties(self) -> dict[str, Any]:
        """``payload["properties"]`` (track, page, screen), else empty."""
        return self.payload.get("properties") or {}

    @property
    def traits(self) -> dict[str, Any]:
        """``payload["traits"]`` (identify, group) merged over ``context.traits``.

        A ``context.traits`` that is not an object counts as none (the API said so in its
        ``warnings``, :func:`context_warnings`): merged as it was, a list stopped the engine
        loop's profiles until the event was set aside.

        >>> LoggedEvent(1, "m", "identify", None, "u", None, 1, 0, "api",
        ...             {"context": {"traits": ["vip"]}, "traits": {"plan": "pro"}}).traits
        {'plan': 'pro'}
        """
        context = self.payload.get("context") or {}
        shared = context.get("traits")
        return {**(shared if isinstance(shared, dict) else {}), **(self.payload.get("traits") or {})}

    @property
    def context(self) -> dict[str, Any]:
        """``payload["context"]``, else empty."""
        return self.payload.get("context") or {}


#: The parts of ``context`` the Segment spec makes objects, and what cadence reads from each.
_CONTEXT_OBJECTS = {
    "traits": "the customer's traits",
    "campaign": "the UTM campaign attribution reads",
    "page": "the page (its referrer) attribution reads",
}


def context_warnings(payload: Mapping[str, Any], call_type: str) -> list[tuple[str, str]]:
    """``(field, warning)`` for each part of ``context`` that the spec makes an object and a call sent otherwise.

    Such a call is stored (``context`` itself is checked by :func:`parse_call`); the part is read
    as absent, and this says so.

    >>> context_warnings({"context": {"campaign": "spring", "page": {"url": "/"}}}, "page")
    [('context.campaign', "a string ('spring'), not an object: read as no campaign (the UTM campaign attribution reads)")]
    """
    context = payload.get("context")
    if type(context) is not dict:  # parsed JSON (on every accepted call: kept cheap)
        return []
    found: list[tuple[str, str]] = []
    for part in _CONTEXT_OBJECTS:
        value = context.get(part)
        if value is not None and type(value) is not dict:
            what = _CONTEXT_OBJECTS[part]
            found.append(
                (f"context.{part}", f"{describe_value(value)}, not an object: read as no {part} ({what})")
            )
    return found


def call_warnings(payload: Mapping[str, Any], call_type: str) -> list[tuple[str, str]]:
    """``(field, warning)`` for what an accepted call gives that cadence cannot use as sent.

    A time zone the profile cannot read, a feedback event's decision id, channel or campaign of
    the wrong shape, a consent field or bounce type of the wrong type, a channel name cadence does
    not know, a part of ``context`` the spec makes an object sent as something else. The call is
    stored all the same; ``POST /v1/track`` and the other calls, ``/v1/batch`` and ``cadence
    import`` say each of these to the sender, naming the field.

    >>> call_warnings({"event": "Email Bounced", "properties": {"bounce_type": "Hard", "campaign": 7},
    ...                "context": {"timezone": "Mars/Olympus"}}, "track")  # doctest: +NORMALIZE_WHITESPACE
    [('context.timezone', "'Mars/Olympus' is not an IANA time zone (such as Europe/Berlin): the customer's zone is left as it was"),
     ('properties.campaign', 'a number (7), not a campaign name: the event is stored and counted under no campaign')]
    """
    return (
        context_warnings(payload, call_type)
        + zone_warnings(payload, call_type)
        + feedback_warnings(payload, call_type)
        + consent_warnings(payload, call_type)
    )


#: Track events whose properties :func:`call_warnings` reads (feedback, consent).
_PROPERTIES_READ = frozenset(FEEDBACK_EVENTS) | {CONSENT_EVENT}
#: A part of ``context`` :func:`context_warnings` reads, given something other than an object or
#: null (a key of that name elsewhere matches too: the test only has to miss nothing).
_CONTEXT_PART_NOT_OBJECT = re.compile(r'"(?:traits|campaign|page)"\s*:\s*[^{n\s]')


#: A ``timezone`` key and its value when it is a text or null (an escape in the text has sent the
#: line to the full check already, so a text ends at the next quote).
_ZONE = re.compile(r'"timezone"\s*:\s*("[^"]*"|null)?')


def _unreadable_zone(text: str) -> bool:
    """Whether a ``timezone`` in ``text`` is not a zone :func:`~cadence.clock.valid_zone` reads.

    Browser libraries give ``context.timezone`` on every call: a valid one must not cost the
    line a full check.

    >>> _unreadable_zone('{"context":{"timezone":"Europe/Berlin"}}'), _unreadable_zone('{"timezone":5}')
    (False, True)
    """
    start = text.find('"timezone":"') + 12
    if start > 11 and text.count('"timezone"') == 1:  # the common case, read without a regex
        return _unreadable_zone_value(text[start - 1 : text.find('"', start) + 1])
    return any(_unreadable_zone_value(match.group(1)) for match in _ZONE.finditer(text))


@lru_cache(maxsize=1024)
def _unreadable_zone_value(value: str | None) -> bool:
    """Whether a ``timezone`` value as :data:`_ZONE` captures it (None: neither text nor null) warns."""
    return value is None or (value != "null" and valid_zone(value[1:-1]) is None)


class _Properties(msgspec.Struct, gc=False):
    """A payload's ``properties`` as its JSON text (the rest skipped, not decoded)."""

    properties: msgspec.Raw = msgspec.Raw()


_properties_of = msgspec.json.Decoder(_Properties).decode


def may_warn(payload_json: str, call_type: str, event: str | None) -> bool:
    """False when :func:`call_warnings` surely finds nothing in the call stored as ``payload_json``.

    A test on the stored payload's JSON text for every key a warning reads (an escape in the text
    could spell any of them), a fourth of the cost of decoding it and checking: an import asks it
    of every line it took the fast path for, and decodes and checks only the lines it lets
    through. A feedback event's keys are looked for in its ``properties`` alone (a context's
    ``campaign`` is not the feedback's), and a time zone is read (a valid one warns of nothing). A warning added to :func:`call_warnings` adds its key
    here; ``tests/engine/test_import_warnings.py`` imports a line for each warning.

    >>> may_warn('{"context":{"campaign":{"name":"spring"}},"properties":{"revenue":5}}', "track", "Email Opened")
    False
    >>> may_warn('{"context":{"campaign":"spring"},"properties":{}}', "track", "Order Completed")
    True
    >>> may_warn('{"properties":{"channel":"Email"}}', "track", "Message Clicked")
    True
    """
    if "\\" in payload_json:
        return True
    if '"timezone"' in payload_json and _unreadable_zone(payload_json):
        return True
    if _CONTEXT_PART_NOT_OBJECT.search(payload_json):
        return True
    if call_type == "identify":
        return '"consent"' in payload_json or '"unsubscribed"' in payload_json
    if call_type != "track" or event not in _PROPERTIES_READ:
        return False
    if event == CONSENT_EVENT:
        return True
    if not _has_feedback_key(payload_json):
        return False
    try:
        properties = _properties_of(payload_json).properties
    except msgspec.DecodeError:
        return True
    return _has_feedback_key(bytes(properties).decode())


def _has_feedback_key(text: str) -> bool:
    """Whether ``text`` holds a key a feedback warning reads (written out: the import calls it per line)."""
    return '"campaign"' in text or '"channel"' in text or '"decision_id"' in text or '"bounce_type"' in text
