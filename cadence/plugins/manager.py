"""The plugin manager: built-ins and entry-point plugins, loaded the same way, failures reported.

:func:`make_plugin_manager` registers :data:`DEFAULT_PLUGINS` (the built-in connectors)
and then every entry point of the ``cadence`` group, unless
``settings.disable_plugin_autoload`` (``CADENCE_DISABLE_PLUGIN_AUTOLOAD=1``) is set.
``settings.plugins_allow`` (``CADENCE_PLUGINS_ALLOW='["name"]'``), when given, is the
list of entry-point plugins that may load; built-ins always load. A plugin that fails
to import or whose hook raises is recorded in :attr:`CadencePluginManager.infos` with
its name and error, and the service carries on without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pluggy
from sqlalchemy import Engine

from cadence.channels import CHANNELS
from cadence.connectors.base import Connector, as_bool
from cadence.plugins import hookspecs
from cadence.settings import Settings

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "CadencePluginManager",
    "ConnectorRegistry",
    "PluginInfo",
    "available_channels",
    "build_connectors",
    "call_each",
    "connector_classes",
    "enabled_connectors",
    "installed_channels",
    "make_plugin_manager",
    "opt_in_channels",
    "serving_classes",
]

log = logging.getLogger("cadence.plugins")

#: The built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "cadence.connectors.outbox",
    "cadence.connectors.sendgrid",
    "cadence.connectors.sms",
    "cadence.connectors.facebook",
    "cadence.connectors.google_ads",
)

#: The entry-point group third-party packages declare their plugin module in.
ENTRY_POINT_GROUP = "cadence"


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as the host sees it: where it came from and whether it works."""

    name: str
    source: str  # "builtin" | "entrypoint" | "registered"
    module: str
    version: str | None = None
    hooks: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "source": self.source,
            "module": self.module,
            "version": self.version,
            "hooks": list(self.hooks),
            "error": self.error,
        }


class CadencePluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers every plugin it tried to load, failures included."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []

    def register_plugin(self, plugin: object, *, name: str, source: str, version: str | None = None) -> None:
        """Register ``plugin`` and record it; a registration error is recorded, not raised."""
        module = getattr(plugin, "__name__", type(plugin).__module__)
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the service down
            self._fail(name, source, str(module), exc, version)
            return
        hooks = tuple(sorted(impl.name for impl in self.get_hookcallers(plugin) or []))
        self.infos.append(PluginInfo(name, source, str(module), version, hooks))

    def _fail(
        self, name: str, source: str, module: str, exc: BaseException, version: str | None = None
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"
        log.error("plugin %s (%s) failed to load: %s", name, module, error)
        self.infos.append(PluginInfo(name, source, module, version, (), error))

    def mark_failed(self, name: str, exc: BaseException) -> None:
        """Record that plugin ``name`` misbehaved in a hook call, and unregister it."""
        error = f"{type(exc).__name__}: {exc}"
        log.error("plugin %s failed: %s", name, error)
        for index, info in enumerate(self.infos):
            if info.name == name:
                self.infos[index] = replace(info, error=error)
                break
        else:
            self.infos.append(PluginInfo(name, "registered", "?", None, (), error))
        plugin = self.get_plugin(name)
        if plugin is not None:
            self.unregister(plugin)


def make_plugin_manager(
    settings: Settings, *, extra_plugins: Iterable[tuple[str, object]] = ()
) -> CadencePluginManager:
    """Build a plugin manager: built-ins, then entry points (unless disabled), then ``extra_plugins``.

    :param settings: reads ``disable_plugin_autoload`` and ``plugins_allow``.
    :param extra_plugins: ``(name, plugin)`` pairs registered last (tests, embedding).
    """
    pm = CadencePluginManager()
    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - report and carry on
            pm._fail(short, "builtin", module_name, exc)
            continue
        pm.register_plugin(module, name=short, source="builtin")
    if not settings.disable_plugin_autoload:
        allow = None if settings.plugins_allow is None else set(settings.plugins_allow)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            version = entry.dist.version if entry.dist is not None else None
            dist_name = entry.dist.name if entry.dist is not None else None
            if allow is not None and entry.name not in allow and dist_name not in allow:
                log.info("plugin %s is not in CADENCE_PLUGINS_ALLOW: skipped", entry.name)
                continue
            if pm.has_plugin(entry.name):
                pm._fail(entry.name, "entrypoint", entry.value, ValueError("a plugin of this name is loaded"))
                continue
            try:
                plugin = entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken package must not take the service down
                pm._fail(entry.name, "entrypoint", entry.value, exc, version)
                continue
            pm.register_plugin(plugin, name=entry.name, source="entrypoint", version=version)
    for name, plugin in extra_plugins:
        pm.register_plugin(plugin, name=name, source="registered")
    return pm


def call_each(pm: CadencePluginManager, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of ``hook_name`` on its own; a raising plugin is reported and dropped.

    Returns ``(plugin_name, result)`` for each implementation that answered non-None,
    in pluggy's call order.
    """
    caller = getattr(pm.hook, hook_name)
    answers: list[tuple[str, Any]] = []
    for impl in reversed(caller.get_hookimpls()):
        wanted = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        try:
            result = impl.function(**wanted)
        except Exception as exc:  # noqa: BLE001 - isolate plugins from each other
            pm.mark_failed(impl.plugin_name, exc)
            continue
        if result is not None:
            answers.append((impl.plugin_name, result))
    return answers


def connector_classes(pm: CadencePluginManager, settings: Settings) -> dict[str, type[Connector]]:
    """Every connector class the plugins register, by name; bad registrations are reported."""
    found: dict[str, type[Connector]] = {}
    for plugin_name, classes in call_each(pm, "cadence_register_connectors", settings=settings):
        for cls in classes:
            problem = _connector_problem(cls)
            if problem is None and cls.name in found:
                problem = f"connector name {cls.name!r} is already provided by another plugin"
            if problem is not None:
                pm.mark_failed(plugin_name, TypeError(problem))
                break
            found[cls.name] = cls
    return found


def _connector_problem(cls: object) -> str | None:
    if not (inspect.isclass(cls) and issubclass(cls, Connector)):
        return f"{cls!r} is not a subclass of cadence.connectors.base.Connector"
    if inspect.isabstract(cls):
        return f"{cls.__name__} does not implement send()"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return f"{cls.__name__}.name must be an identifier-like string"
    channels = getattr(cls, "channels", None)
    if not isinstance(channels, frozenset) or not channels:
        return f"{cls.__name__}.channels must be a non-empty frozenset"
    return None


def installed_channels(settings: Settings, *, pm: CadencePluginManager | None = None) -> frozenset[str]:
    """The channels offered by the connectors installed plugins provide.

    The rule checker uses it: a campaign that names a channel outside this set does not
    compile. The outbox offers every channel, so by default this is all of them.
    """
    pm = pm or make_plugin_manager(settings)
    channels: set[str] = set()
    for cls in connector_classes(pm, settings).values():
        channels |= cls.channels
    return frozenset(channels)


def enabled_connectors(names: Iterable[str], settings: Settings) -> list[str]:
    """The configured connectors among ``names``, in order: they serve their channels before the outbox.

    >>> s = Settings(connectors={"sms": {"account_sid": "x"}, "sendgrid": {"enabled": "false"}},
    ...              disable_plugin_autoload=True, _env_file=None)
    >>> enabled_connectors(["outbox", "sendgrid", "sms"], s)
    ['sms']
    """
    return [
        name
        for name in names
        if name != "outbox"
        and name in settings.connectors
        and as_bool(settings.connectors[name].get("enabled", True))
    ]


def opt_in_channels(settings: Settings, *, pm: CadencePluginManager | None = None) -> frozenset[str]:
    """The channels whose serving connector needs an explicit opt-in (``consent_required``).

    A channel is served by the first configured connector offering it, else by the
    outbox (see :class:`ConnectorRegistry`); decisions only choose such a channel for
    customers whose consent for it is explicitly given, as the dispatcher would
    suppress the send otherwise.

    >>> sorted(opt_in_channels(Settings(disable_plugin_autoload=True, _env_file=None)))
    []
    >>> sorted(opt_in_channels(Settings(connectors={"sms": {"account_sid": "AC1"}},
    ...                                 disable_plugin_autoload=True, _env_file=None)))
    ['sms']
    """
    serving = serving_classes(settings, pm=pm)
    return frozenset(ch for ch, cls in serving.items() if cls.capabilities.consent_required)


def serving_classes(
    settings: Settings, *, pm: CadencePluginManager | None = None
) -> dict[str, type[Connector]]:
    """The connector class serving each channel, as :meth:`ConnectorRegistry.route` picks it.

    The first configured connector offering the channel, else the outbox; for code that
    needs a connector's class methods without building (and connecting) the instances.

    >>> serving_classes(Settings(disable_plugin_autoload=True, _env_file=None))["facebook"].name
    'outbox'
    """
    pm = pm or make_plugin_manager(settings)
    classes = connector_classes(pm, settings)
    serving: dict[str, type[Connector]] = {}
    for name in [*enabled_connectors(classes, settings), "outbox"]:
        cls = classes.get(name)
        for channel in cls.channels if cls is not None else ():
            serving.setdefault(channel, cls)  # type: ignore[arg-type]
    return serving


def available_channels(settings: Settings, *, pm: CadencePluginManager | None = None) -> tuple[str, ...]:
    """:func:`installed_channels` in a stable order (known channels first), for the rule checker.

    >>> available_channels(Settings(disable_plugin_autoload=True, _env_file=None))[:3]
    ('email', 'sms', 'push')
    """
    offered = installed_channels(settings, pm=pm)
    known = [c for c in CHANNELS if c in offered]
    return tuple(known + sorted(offered - set(known)))


@dataclass
class ConnectorRegistry:
    """The connector instances of one process, and which one serves each channel.

    A row of the send queue that names its connector goes there. Otherwise a channel
    is served by the first *configured* connector offering it (one with an entry in
    ``settings.connectors`` whose ``enabled`` is not false), else by the dry-run
    ``outbox``. So nothing is sent for real until credentials are configured.
    """

    connectors: dict[str, Connector]
    enabled: list[str] = field(default_factory=list)
    webhook_parsers: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Connector | None:
        """The connector called ``name``, or None."""
        return self.connectors.get(name)

    def route(self, channel: str, name: str | None = None) -> Connector | None:
        """The connector for a send on ``channel`` (``name`` if the row names one)."""
        if name:
            return self.connectors.get(name)
        for candidate in self.enabled:
            connector = self.connectors[candidate]
            if channel in connector.channels:
                return connector
        outbox = self.connectors.get("outbox")
        if outbox is not None and channel in outbox.channels:
            return outbox
        return None

    def webhook_receiver(self, name: str) -> Any | None:
        """The object that verifies and parses ``POST /v1/webhooks/{name}``."""
        return self.connectors.get(name) or self.webhook_parsers.get(name)

    async def aclose(self) -> None:
        """Close every connector's own HTTP client."""
        for connector in self.connectors.values():
            await connector.aclose()


def build_connectors(
    settings: Settings,
    *,
    pm: CadencePluginManager,
    engine: Engine | None = None,
    client: httpx.AsyncClient | None = None,
    factories: Mapping[str, Callable[..., Connector]] | None = None,
) -> ConnectorRegistry:
    """Instantiate every registered connector with its settings, the HTTP client and the database."""
    instances: dict[str, Connector] = {}
    for name, cls in connector_classes(pm, settings).items():
        config = settings.connectors.get(name, {})
        factory = (factories or {}).get(name, cls)
        try:
            instances[name] = factory(config=config, client=client, engine=engine)
        except Exception as exc:  # noqa: BLE001 - one bad connector leaves the others working
            owner = _owner_of(pm, cls)
            pm.mark_failed(owner, exc)
    enabled = enabled_connectors(instances, settings)
    parsers: dict[str, Any] = {}
    for plugin_name, receivers in call_each(pm, "cadence_register_webhook_parsers", settings=settings):
        for receiver in receivers:
            rname = getattr(receiver, "name", None)
            if not isinstance(rname, str) or rname in instances or rname in parsers:
                pm.mark_failed(plugin_name, TypeError(f"webhook parser {receiver!r} needs a unique name"))
                break
            parsers[rname] = receiver
    return ConnectorRegistry(connectors=instances, enabled=enabled, webhook_parsers=parsers)


def _owner_of(pm: CadencePluginManager, cls: type) -> str:
    for name, plugin in pm.list_name_plugin():
        if getattr(plugin, "__name__", None) == cls.__module__:
            return name
    return cls.__module__
