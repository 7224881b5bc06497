"""The plugin host: hook specifications, the plugin manager factory, installed connectors.

>>> from cadence.plugins import DEFAULT_PLUGINS
>>> "cadence.connectors.outbox" in DEFAULT_PLUGINS
True
"""

from __future__ import annotations

from cadence.plugins.hookspecs import hookimpl
from cadence.plugins.manager import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    CadencePluginManager,
    ConnectorRegistry,
    PluginInfo,
    available_channels,
    build_connectors,
    connector_classes,
    installed_channels,
    make_plugin_manager,
)

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "CadencePluginManager",
    "ConnectorRegistry",
    "PluginInfo",
    "available_channels",
    "build_connectors",
    "connector_classes",
    "hookimpl",
    "installed_channels",
    "make_plugin_manager",
]
