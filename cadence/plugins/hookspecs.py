"""Every hook cadence calls, in one module. These docstrings are the plugin reference.

A plugin is any module or object with functions marked ``@hookimpl`` whose names match
the specifications below (they may take a subset of the parameters, and must not give
them defaults). Built-in connectors are plugins too, registered exactly like a package
found through the ``cadence`` entry-point group.

pluggy is synchronous: hooks *register things* (classes, routers, functions) and
return them; the asynchronous work happens in the objects they return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from fastapi import APIRouter

    from cadence.connectors.base import Connector, ProviderEvent
    from cadence.settings import Settings

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "cadence"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """Return the connector classes this plugin provides.

    Each class subclasses :class:`cadence.connectors.base.Connector` and sets ``name``
    (unique; also the webhook path ``/v1/webhooks/{name}`` and the settings key
    ``settings.connectors[name]``), ``channels`` and ``capabilities``. cadence builds
    one instance per class with its settings, the shared HTTP client and the database.

    :param settings: the process settings (read ``settings.connectors[name]`` if the
        classes you return depend on configuration).
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def cadence_register_webhook_parsers(settings: Settings) -> list[Any]:
    """Return webhook receivers for providers that are not send connectors.

    Each object has a ``name`` (served at ``POST /v1/webhooks/{name}``) and the methods
    ``verify_webhook(request)``, ``parse_webhook(request) -> list[ProviderEvent]`` and
    optionally ``webhook_challenge(request) -> str | None`` of
    :class:`~cadence.connectors.base.Connector`. Connectors need not be listed here:
    their own webhook methods are used.

    :param settings: the process settings.
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def cadence_enrich_feedback(
    connector: str, provider_event: ProviderEvent, properties: dict[str, Any]
) -> Mapping[str, Any] | None:
    """Return extra ``properties`` for the cadence event made from a provider event.

    Called once per provider event accepted by ``POST /v1/webhooks/{connector}``, after
    normalisation; every non-None answer is merged into the event's properties (the
    keys ``decision_id``, ``campaign`` and ``channel`` cannot be overridden).

    :param connector: the connector's name.
    :param provider_event: what the connector parsed.
    :param properties: the properties cadence built so far (do not modify).
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def cadence_register_routers(settings: Settings) -> list[APIRouter]:
    """Return FastAPI routers to mount on the API (e.g. a connector's OAuth callback).

    Routers are included as they are: give them a prefix of your own and protect their
    routes with ``cadence.api.security.Scope``.

    :param settings: the process settings.
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec(firstresult=True)
def cadence_resolve_identity(connector: str, provider_event: ProviderEvent) -> str | None:
    """Return the user id a provider event belongs to, when cadence cannot link it.

    cadence first links a provider event to its send (through ``decision_id`` or the
    provider's message id). When that fails it asks the plugins, in order; the first
    non-None answer wins. Answer None when you do not know.

    :param connector: the connector's name.
    :param provider_event: what the connector parsed (``recipient`` holds the address).
    """
