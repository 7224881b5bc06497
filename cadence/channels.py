"""The channels cadence knows, and the normalised names of what happens on them.

A channel is a way to reach a customer. Connectors declare which channels they
offer; rules name channels; consent is kept per channel. Feedback events (from
provider webhooks or ``/v1/track``) use Segment's names where its spec has them,
and a generic set that works for every channel otherwise; each carries
``properties.decision_id`` and ``properties.channel``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

__all__ = [
    "BOUNCE_TYPES",
    "CHANNELS",
    "CONSENT_CHANNELS",
    "CONSENT_EVENT",
    "FEEDBACK_EVENTS",
    "Feedback",
    "channel_named",
    "channel_problem",
    "consent_warnings",
    "decision_id_problem",
    "describe_value",
    "feedback_aggregate",
    "feedback_campaign",
    "feedback_channel",
    "feedback_kind",
    "feedback_of",
    "feedback_warnings",
]

#: Every channel name the language accepts; a ruleset may only use those an
#: installed connector offers.
CHANNELS = ("email", "sms", "push", "facebook", "google_ads", "webhook")
#: What a consent row may name: a channel, or ``all`` (every channel).
CONSENT_CHANNELS = (*CHANNELS, "all")
_KNOWN = frozenset(CONSENT_CHANNELS)
#: The event that grants or refuses channels (``POST /v1/consent`` appends one; clients may send it).
CONSENT_EVENT = "Consent Updated"
#: The ``bounce_type`` values cadence reads (in any case); absent means ``hard``.
BOUNCE_TYPES = ("hard", "soft")


class Feedback(StrEnum):
    """What happened to a message, whatever the channel."""

    SENT = "sent"
    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED = "bounced"
    FAILED = "failed"
    UNSUBSCRIBED = "unsubscribed"
    SPAM_REPORT = "spam_report"
    CONVERTED = "converted"


#: Event names (as they arrive in the log) that are feedback, and what kind.
#: The generic names work for any channel; the Segment spec names are kept as is.
FEEDBACK_EVENTS: dict[str, Feedback] = {
    # generic, any channel (properties.channel says which)
    "Message Sent": Feedback.SENT,
    "Message Delivered": Feedback.DELIVERED,
    "Message Opened": Feedback.OPENED,
    "Message Clicked": Feedback.CLICKED,
    "Message Bounced": Feedback.BOUNCED,
    "Message Failed": Feedback.FAILED,
    "Unsubscribed": Feedback.UNSUBSCRIBED,
    "Spam Reported": Feedback.SPAM_REPORT,
    "Converted": Feedback.CONVERTED,
    # Segment spec: email
    "Email Delivered": Feedback.DELIVERED,
    "Email Opened": Feedback.OPENED,
    "Email Link Clicked": Feedback.CLICKED,
    "Email Bounced": Feedback.BOUNCED,
    "Email Marked as Spam": Feedback.SPAM_REPORT,
    # Segment spec: push
    "Push Notification Received": Feedback.DELIVERED,
    "Push Notification Tapped": Feedback.CLICKED,
    "Push Notification Bounced": Feedback.BOUNCED,
}

#: The channel implied by a Segment spec name when properties.channel is absent.
IMPLIED_CHANNEL = {
    "Email Delivered": "email",
    "Email Opened": "email",
    "Email Link Clicked": "email",
    "Email Bounced": "email",
    "Email Marked as Spam": "email",
    "Push Notification Received": "push",
    "Push Notification Tapped": "push",
    "Push Notification Bounced": "push",
}


def feedback_kind(event: str | None) -> Feedback | None:
    """The feedback an event name stands for, or None.

    >>> feedback_kind("Email Link Clicked")
    <Feedback.CLICKED: 'clicked'>
    >>> feedback_kind("Order Completed") is None
    True
    """
    if event is None:
        return None
    return FEEDBACK_EVENTS.get(event)


def feedback_aggregate(channel: str, kind: str) -> str:
    """The profile aggregate name of feedback on a channel, as rules write it.

    Whatever name the feedback arrived under (``"Email Opened"``, or ``"Message
    Opened"`` with ``properties.channel = "email"``), profiles also count it as
    ``email.opened``, and ``count(email.opened within 7d)`` reads that.

    >>> feedback_aggregate("sms", "clicked")
    'sms.clicked'
    """
    return f"{channel}.{kind}"


def feedback_of(event: str | None, properties: Mapping[str, object]) -> tuple[str, Feedback] | None:
    """``(channel, kind)`` of a feedback event, or None when it is not feedback or names no channel.

    >>> feedback_of("Message Clicked", {"channel": "sms"})
    ('sms', <Feedback.CLICKED: 'clicked'>)
    >>> feedback_of("Email Opened", {})
    ('email', <Feedback.OPENED: 'opened'>)
    >>> feedback_of("Unsubscribed", {}) is None
    True
    """
    kind = feedback_kind(event)
    if kind is None:
        return None
    channel = feedback_channel(event, properties)
    if channel is None:
        return None
    return channel, kind


def feedback_channel(event: str | None, properties: Mapping[str, object]) -> str | None:
    """The channel a feedback event names: ``properties.channel`` when it is a string, else the event name's.

    A channel of another type (a number, a list) is read as no channel, as
    :func:`feedback_warnings` tells the sender, rather than as its text.

    >>> feedback_channel("Email Opened", {"channel": ["sms"]}), feedback_channel("Message Opened", {"channel": "sms"})
    ('email', 'sms')
    >>> feedback_channel("Unsubscribed", {"channel": 5}) is None
    True
    """
    channel = properties.get("channel")
    if isinstance(channel, str) and channel:
        return channel if channel in _KNOWN else channel_named(channel)
    return IMPLIED_CHANNEL.get(event or "")


def channel_named(name: str) -> str:
    """The channel (or ``all``) ``name`` spells in another case or with spaces around, else ``name``.

    Rules, consent and the learners name channels in lower case; ``"SMS"`` from a sender
    means ``sms``, and kept as given it would count nowhere (an ``Unsubscribed`` with
    ``channel: "Email"`` used to refuse a channel no campaign sends on).

    >>> channel_named("SMS"), channel_named(" Email "), channel_named("ALL"), channel_named("WhatsApp")
    ('sms', 'email', 'all', 'WhatsApp')
    """
    folded = name.strip().lower()
    return folded if folded in _KNOWN else name


def describe_value(value: object) -> str:
    """A JSON value's kind and (shortened) text, for warnings: ``a number (12345)``.

    >>> describe_value(["sms"]), describe_value(True), describe_value({"a": "x" * 50})
    ("an array (['sms'])", 'a boolean (True)', "an object ({'a': 'xxxxxxxxxxxxxxxxxxxxxxxxxxxx...)")
    """
    if value is None:
        return "null"
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{_kind_of(value)} ({shown})"


def channel_problem(value: object, known: tuple[str, ...] = CHANNELS) -> str | None:
    """What keeps a sender's channel name from naming one of ``known`` as written, or None.

    A name in another case is read as the channel it spells (:func:`channel_named`), and said;
    any other name is kept as given and counts on no channel cadence sends on.

    >>> channel_problem("sms") is None, channel_problem("SMS")
    (True, "'SMS' is read as 'sms': channel names are lower case")
    >>> channel_problem("e-mail")
    "'e-mail' is not a channel cadence knows (email, sms, push, facebook, google_ads, webhook)"
    >>> channel_problem(["sms"])
    "an array (['sms']), not a channel name such as 'email'"
    """
    if not isinstance(value, str):
        return f"{describe_value(value)}, not a channel name such as 'email'"
    if value in known:
        return None
    named = channel_named(value)
    if named in known:
        return f"{value[:80]!r} is read as {named!r}: channel names are lower case"
    return f"{value[:80]!r} is not a channel cadence knows ({', '.join(known)})"


def feedback_campaign(properties: Mapping[str, object]) -> str:
    """The campaign a feedback event names: ``properties.campaign`` when it is a string, else none ('').

    A campaign of another type is counted under no campaign (:func:`feedback_warnings` tells
    the sender), never under its text: ``str(["spring"])`` is no campaign's name.

    >>> feedback_campaign({"campaign": "spring"}), feedback_campaign({"campaign": ["spring"]}), feedback_campaign({})
    ('spring', '', '')
    """
    campaign = properties.get("campaign")
    return campaign if isinstance(campaign, str) else ""


#: The shapes of the decision ids cadence makes: 32 hex digits (``POST /v1/decisions``,
#: :func:`cadence.engine.decisions_service.make_decision`) or ``push-`` and 24 (a pushed send,
#: :func:`cadence.scheduler.push.push_decision_id`).
_DECISION_ID = re.compile(r"(?:push-[0-9a-f]{24}|[0-9a-f]{32})")


def _kind_of(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


def decision_id_problem(value: object) -> str | None:
    """What keeps ``properties.decision_id`` from naming a decision, or None when it has a decision id's shape.

    Only the shape: whether such a decision exists is known when the engine loop joins the
    feedback (:class:`cadence.engine.learning.LearnerSubscriber` logs it), never on the ingest path.

    >>> decision_id_problem("5f0c1e2d3c4b5a69788796a5b4c3d2e1") is None
    True
    >>> decision_id_problem(12345)
    'a number (12345), not a decision id: decision ids are strings of 32 hex digits, as POST /v1/decisions answers'
    >>> decision_id_problem("d-1")
    "'d-1' is not a decision id: decision ids are 32 hex digits, as POST /v1/decisions answers"
    """
    if isinstance(value, str):
        if _DECISION_ID.fullmatch(value):
            return None
        return f"{value[:80]!r} is not a decision id: decision ids are 32 hex digits, as POST /v1/decisions answers"
    return (
        f"{describe_value(value)}, not a decision id: decision ids are strings of 32 hex digits, "
        "as POST /v1/decisions answers"
    )


def feedback_warnings(payload: Mapping[str, Any], call_type: str) -> list[tuple[str, str]]:
    """``(field, warning)`` for each feedback field a track call gives that cadence cannot use as sent.

    A feedback event (:data:`FEEDBACK_EVENTS`) is joined to its decision by a string
    ``properties.decision_id``, counted per channel by a string ``properties.channel`` naming
    one of :data:`CHANNELS` (``all`` too for a refusal) and per campaign by a string
    ``properties.campaign``; anything else was stored and silently taught or counted nothing
    (or under the wrong name). The event is stored all the same: this says what it will not do,
    and a channel name in another case, read as the channel it spells, is said too.

    >>> feedback_warnings({"event": "Message Clicked", "properties": {"decision_id": 12345}}, "track")
    [('properties.decision_id', 'a number (12345), not a decision id: decision ids are strings of 32 hex digits, as POST /v1/decisions answers; the feedback is stored but joins no decision, so the learners do not learn from it')]
    >>> feedback_warnings({"event": "Message Clicked", "properties": {"channel": ["sms"]}}, "track")
    [('properties.channel', "an array (['sms']), not a channel name such as 'email': the event is stored and read as naming no channel")]
    >>> feedback_warnings({"event": "Unsubscribed", "properties": {"channel": "Email", "campaign": 7}}, "track")
    [('properties.channel', "'Email' is read as 'email': channel names are lower case"), ('properties.campaign', 'a number (7), not a campaign name: the event is stored and counted under no campaign')]
    >>> feedback_warnings({"event": "Message Clicked", "properties": {"channel": ""}}, "track")
    [('properties.channel', "'' is not a channel cadence knows (email, sms, push, facebook, google_ads, webhook): the event is stored and read as naming no channel")]
    >>> feedback_warnings({"event": "Order Completed", "properties": {"decision_id": 12345}}, "track")
    []
    """
    if call_type != "track":
        return []
    event = payload.get("event")
    properties = payload.get("properties")
    if not isinstance(event, str) or event not in FEEDBACK_EVENTS or not isinstance(properties, Mapping):
        return []
    found: list[tuple[str, str]] = []
    decision_id = properties.get("decision_id")
    if decision_id is not None:
        problem = decision_id_problem(decision_id)
        if problem is not None:
            found.append(
                (
                    "properties.decision_id",
                    f"{problem}; the feedback is stored but joins no decision, so the learners do not learn from it",
                )
            )
    channel = properties.get("channel")
    if channel is not None:
        refusal = FEEDBACK_EVENTS[event] in (Feedback.UNSUBSCRIBED, Feedback.SPAM_REPORT)
        problem = channel_problem(channel, CONSENT_CHANNELS if refusal else CHANNELS)
        if problem is None:
            pass
        elif not isinstance(channel, str) or not channel:  # "" names none, as feedback_channel reads it
            found.append(
                ("properties.channel", f"{problem}: the event is stored and read as naming no channel")
            )
        elif channel_named(channel) != channel:
            found.append(("properties.channel", problem))
        elif refusal:
            found.append(
                (
                    "properties.channel",
                    f"{problem}: the event is stored but refuses no channel cadence sends on "
                    "(without properties.channel it refuses every channel)",
                )
            )
        else:
            found.append(
                (
                    "properties.channel",
                    f"{problem}: the event is stored and counted under {channel[:80]!r}, "
                    "which no campaign sends on",
                )
            )
    campaign = properties.get("campaign")
    if campaign is not None and not isinstance(campaign, str):
        found.append(
            (
                "properties.campaign",
                f"{describe_value(campaign)}, not a campaign name: the event is stored and counted "
                "under no campaign",
            )
        )
    return found


def consent_warnings(payload: Mapping[str, Any], call_type: str) -> list[tuple[str, str]]:
    """``(field, warning)`` for each consent field of an accepted call that cadence cannot read as sent.

    What :func:`~cadence.engine.consent.consent_changes` reads: an identify's ``traits.consent`` (an object of true/false
    per channel, or a list of channel names) and ``traits.unsubscribed`` (true/false), also under
    ``context.traits``; a ``Consent Updated`` event's ``properties.channels``/``consent``,
    ``channel`` with ``granted``, and ``source``; a bounce's ``properties.bounce_type``. A value
    of the wrong type changes nothing and was ignored without a word; the event is stored all
    the same, and this says what it will not do. Channel names are checked by
    :func:`cadence.channels.channel_problem` (another case is read as the channel it spells).

    >>> consent_warnings({"traits": {"consent": {"email": "no"}, "unsubscribed": "true"}}, "identify")
    [('traits.consent.email', "a string ('no'), not true or false: consent for email is left as it was"), ('traits.unsubscribed', "a string ('true'), not true or false: consent is left as it was")]
    >>> consent_warnings({"event": "Email Bounced", "properties": {"bounce_type": ["soft"]}}, "track")
    [('properties.bounce_type', "an array (['soft']), not 'hard' or 'soft': read as a hard bounce, which marks the address undeliverable until a new one")]
    >>> consent_warnings({"traits": {"consent": {"email": True}}}, "identify")
    []
    """
    found: list[tuple[str, str]] = []
    if call_type == "identify":
        context = payload.get("context")
        for where, traits in (
            ("context.traits", context.get("traits") if isinstance(context, Mapping) else None),
            ("traits", payload.get("traits")),
        ):
            if isinstance(traits, Mapping):
                found += _granted_warnings(f"{where}.consent", traits.get("consent"), lists=True)
                unsubscribed = traits.get("unsubscribed")
                if unsubscribed is not None and not isinstance(unsubscribed, bool):
                    found.append(
                        (
                            f"{where}.unsubscribed",
                            f"{describe_value(unsubscribed)}, not true or false: consent is left as it was",
                        )
                    )
        return found
    properties = payload.get("properties")
    if call_type != "track" or not isinstance(properties, Mapping):
        return found
    event = payload.get("event")
    if event == CONSENT_EVENT:
        for key in ("channels", "consent"):
            found += _granted_warnings(f"properties.{key}", properties.get(key), lists=False)
        channel, granted = properties.get("channel"), properties.get("granted")
        if channel is not None or granted is not None:
            found += _channel_warning("properties.channel", channel, _LEFT)
            if not isinstance(granted, bool):
                found.append(("properties.granted", f"{describe_value(granted)}, not true or false: {_LEFT}"))
        source = properties.get("source")
        if source is not None and not isinstance(source, str):
            found.append(
                (
                    "properties.source",
                    f"{describe_value(source)}, not a text: the change is recorded with the event's source",
                )
            )
    elif isinstance(event, str) and feedback_kind(event) is Feedback.BOUNCED:
        bounce_type = properties.get("bounce_type")
        if bounce_type is not None and (
            not isinstance(bounce_type, str) or bounce_type.strip().lower() not in BOUNCE_TYPES
        ):
            shown = (
                describe_value(bounce_type) + ","
                if not isinstance(bounce_type, str)
                else f"{bounce_type[:80]!r} is"
            )
            found.append(
                (
                    "properties.bounce_type",
                    f"{shown} not 'hard' or 'soft': read as a hard bounce, which marks the address "
                    "undeliverable until a new one",
                )
            )
    return found


_LEFT = "properties.channel and properties.granted change nothing"


def _granted_warnings(field: str, value: object, *, lists: bool) -> list[tuple[str, str]]:
    """Warnings for a consent object (``{channel: true|false}``), or with ``lists`` also a list of channels."""
    if value is None:
        return []
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        for channel, granted in value.items():
            found += _channel_warning(f"{field}.{channel}", channel, "ignored")
            if not isinstance(granted, bool):
                found.append(
                    (
                        f"{field}.{channel}",
                        f"{describe_value(granted)}, not true or false: consent for "
                        f"{channel_named(channel)} is left as it was",
                    )
                )
        return found
    if lists and isinstance(value, list):
        for index, channel in enumerate(value):
            found += _channel_warning(f"{field}.{index}", channel, "ignored")
        return found
    shape = 'an object such as {"email": true}' + (' or a list such as ["email"]' if lists else "")
    return [(field, f"{describe_value(value)}, not {shape}: consent is left as it was")]


def _channel_warning(field: str, channel: object, ignored: str) -> list[tuple[str, str]]:
    """The warning for a channel name given for consent, if any: ``ignored`` says what a non-text does."""
    problem = channel_problem(channel, CONSENT_CHANNELS)
    if problem is None:
        return []
    if not isinstance(channel, str) or not channel:
        return [(field, f"{problem}: {ignored}")]
    if channel_named(channel) != channel:
        return [(field, problem)]  # read as the channel it spells, and said
    return [(field, f"{problem}: it refuses or allows no channel cadence sends on")]
