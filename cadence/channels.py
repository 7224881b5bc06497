"""The channels cadence knows, and the normalised names of what happens on them.

A channel is a way to reach a customer. Connectors declare which channels they
offer; rules name channels; consent is kept per channel. Feedback events (from
provider webhooks or ``/v1/track``) use Segment's names where its spec has them,
and a generic set that works for every channel otherwise; each carries
``properties.decision_id`` and ``properties.channel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = ["CHANNELS", "FEEDBACK_EVENTS", "Feedback", "feedback_aggregate", "feedback_kind", "feedback_of"]

#: Every channel name the language accepts; a ruleset may only use those an
#: installed connector offers.
CHANNELS = ("email", "sms", "push", "facebook", "google_ads", "webhook")


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
    channel = properties.get("channel") or IMPLIED_CHANNEL.get(event or "")
    if not isinstance(channel, str) or not channel:
        return None
    return channel, kind
