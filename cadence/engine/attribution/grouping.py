"""Channel grouping: which channel an event is a touch on.

:class:`ChannelRule` (in :mod:`cadence.engine.attribution.spec`) maps a field
(``source``, ``medium``, ``event``, ``referrer``, ``campaign``) to a glob pattern; all
of a rule's fields must match, rules are tried in order, and ``a|b`` in a pattern
means either. :data:`DEFAULT_CHANNEL_RULES` follows Google Analytics' default
channel grouping for UTM source/medium and referrers; our own sends and clicks
(feedback events with ``properties.channel``) are touches on that channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from functools import lru_cache
from urllib.parse import urlsplit

from cadence.engine.attribution.spec import ChannelRule

__all__ = ["DEFAULT_CHANNEL_RULES", "group_channel", "matches"]

# Bare names match UTM sources; ``name.*`` and ``*.name.*`` match referrer hosts
# (``google.com``, ``www.google.co.uk`` once ``www.`` is dropped: ``google.co.uk``).
_SEARCH = (
    "google|bing|yahoo|baidu|duckduckgo|yandex|ecosia|naver|*search*"
    "|google.*|*.google.*|bing.*|*.bing.*|yahoo.*|*.yahoo.*|baidu.*|duckduckgo.*|yandex.*|ecosia.*|naver.*"
)
_SOCIAL = (
    "facebook|fb|instagram|ig|twitter|t.co|x|linkedin|lnkd.in|pinterest|reddit|tiktok|snapchat"
    "|youtube|*.facebook.*|*facebook.com|*instagram.com|*linkedin.com|*reddit.com|*tiktok.com"
    "|twitter.com|*.twitter.com|x.com|*.x.com|pinterest.*|*.pinterest.*|*snapchat.com"
)
_VIDEO = "youtube|vimeo|twitch|*youtube.com|*vimeo.com"
_PAID = "cpc|ppc|paid*|*cp*|retargeting|paidsearch"

#: Google Analytics' default channel grouping, simplified, in order.
DEFAULT_CHANNEL_RULES: tuple[ChannelRule, ...] = (
    ChannelRule("direct", {"source": "(direct)|direct"}),
    ChannelRule("paid_search", {"source": _SEARCH, "medium": _PAID}),
    ChannelRule("paid_social", {"source": _SOCIAL, "medium": _PAID}),
    ChannelRule("paid_video", {"source": _VIDEO, "medium": _PAID}),
    ChannelRule("display", {"medium": "display|banner|expandable|interstitial|cpm"}),
    ChannelRule("paid_other", {"medium": _PAID}),
    ChannelRule("email", {"medium": "email|e-mail|e_mail|e mail|newsletter"}),
    ChannelRule("email", {"source": "email|e-mail|e_mail|e mail|newsletter"}),
    ChannelRule("sms", {"medium": "sms"}),
    ChannelRule("sms", {"source": "sms"}),
    ChannelRule("push", {"medium": "*push|*mobile*|*notification*"}),
    ChannelRule("affiliate", {"medium": "affiliate*"}),
    ChannelRule("organic_video", {"source": _VIDEO}),
    ChannelRule("organic_social", {"source": _SOCIAL}),
    ChannelRule("organic_social", {"medium": "social|social-network|social-media|sm|social network"}),
    ChannelRule("organic_search", {"medium": "organic"}),
    ChannelRule("organic_search", {"source": _SEARCH}),
    ChannelRule("organic_video", {"referrer": _VIDEO}),
    ChannelRule("organic_social", {"referrer": _SOCIAL}),
    ChannelRule("organic_search", {"referrer": _SEARCH}),
    ChannelRule("referral", {"medium": "referral|app|link"}),
    ChannelRule("referral", {"referrer": "?*"}),
)


@lru_cache(maxsize=4096)
def _alternatives(pattern: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in pattern.split("|"))


def matches(pattern: str, value: str | None) -> bool:
    """Whether ``value`` matches the glob ``pattern`` (case-insensitive, ``|`` = or).

    >>> matches("google|*bing*", "Google"), matches("cp*", "cpc"), matches("x", None)
    (True, True, False)
    """
    if value is None:
        return False
    text = value.strip().lower()
    return any(fnmatchcase(text, alt) for alt in _alternatives(pattern))


def _host(referrer: str | None) -> str | None:
    if not referrer:
        return None
    host = urlsplit(referrer if "//" in referrer else f"//{referrer}").hostname
    return host.removeprefix("www.") if host else referrer


def group_channel(
    fields: Mapping[str, str | None], rules: Sequence[ChannelRule] = DEFAULT_CHANNEL_RULES
) -> str | None:
    """The channel of the first rule whose every field matches, else None.

    ``referrer`` may be a URL; its host name is matched.

    >>> group_channel({"source": "google", "medium": "cpc"})
    'paid_search'
    >>> group_channel({"source": "newsletter", "medium": "email"})
    'email'
    >>> group_channel({"referrer": "https://www.reddit.com/r/x"})
    'organic_social'
    >>> group_channel({"source": "(direct)", "medium": "(none)"})
    'direct'
    >>> group_channel({"event": "Order Completed"}) is None
    True
    """
    values = dict(fields)
    if values.get("referrer"):
        values["referrer"] = _host(values["referrer"])
    for rule in rules:
        if all(matches(pattern, values.get(name)) for name, pattern in rule.when.items()):
            return rule.channel
    return None
