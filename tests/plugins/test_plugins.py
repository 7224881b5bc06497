"""The plugin host: built-ins, entry points, allow-list, broken plugins, hooks, CLI, the example package."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from typer.testing import CliRunner

from cadence.api.app import create_app
from cadence.api.routers.webhooks import to_new_events
from cadence.channels import CHANNELS, Feedback
from cadence.cli import app as cli_app
from cadence.connectors.base import OutgoingMessage, ProviderEvent
from cadence.plugins import hookimpl, hookspecs
from cadence.plugins.manager import (
    DEFAULT_PLUGINS,
    build_connectors,
    connector_classes,
    installed_channels,
    make_plugin_manager,
)
from cadence.runtime import open_runtime
from cadence.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cadence-connector-example"
HOOKS = sorted(
    name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("cadence_")
)


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"disable_plugin_autoload": True, "_env_file": None}
    return Settings(**{**base, **overrides})


def fake_distribution(root: Path, name: str, module: str, source: str, *, version: str = "1.2.3") -> None:
    """An installed distribution on ``root`` with a ``cadence`` entry point to ``module``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[cadence]\n{name} = {module}\n")


GOOD_PLUGIN = """
from cadence.connectors.base import Capabilities, Connector, SendResult
from cadence.plugins import hookimpl

class Pigeon(Connector):
    name = "pigeon"
    channels = frozenset({"push"})
    capabilities = Capabilities(max_batch_size=5)

    async def send(self, batch):
        return [SendResult(m.idempotency_key, True, provider_message_id="coo") for m in batch]

@hookimpl
def cadence_register_connectors(settings):
    return [Pigeon]
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    fake_distribution(root, "cadence-pigeon", "cadence_pigeon", GOOD_PLUGIN)
    fake_distribution(root, "cadence-broken", "cadence_broken", "raise ImportError('needs libfoo 2.0')\n")
    fake_distribution(
        root,
        "cadence-raiser",
        "cadence_raiser",
        """
        from cadence.plugins import hookimpl

        @hookimpl
        def cadence_register_connectors(settings):
            raise RuntimeError("no config")
        """,
    )
    monkeypatch.syspath_prepend(str(root))
    return root


def test_builtins_register_like_any_plugin() -> None:
    pm = make_plugin_manager(settings())
    assert [i.name for i in pm.infos] == [m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS]
    assert all(i.source == "builtin" and i.error is None for i in pm.infos)
    assert all(i.hooks == ("cadence_register_connectors",) for i in pm.infos)
    assert set(connector_classes(pm, settings())) == {"outbox", "sendgrid", "sms", "facebook", "google_ads"}


def test_entry_points_load_and_broken_plugins_are_reported(site: Path) -> None:
    pm = make_plugin_manager(settings(disable_plugin_autoload=False))
    classes = connector_classes(pm, settings())
    infos = {i.name: i for i in pm.infos}
    assert infos["cadence-pigeon"].source == "entrypoint" and infos["cadence-pigeon"].version == "1.2.3"
    assert "pigeon" in classes
    assert infos["cadence-broken"].error == "ImportError: needs libfoo 2.0"
    assert infos["cadence-raiser"].error == "RuntimeError: no config"
    assert "sendgrid" in classes  # the service carries on with everything that works


def test_autoload_can_be_disabled_and_restricted(site: Path) -> None:
    off = make_plugin_manager(settings(disable_plugin_autoload=True))
    assert {i.source for i in off.infos} == {"builtin"}
    only = make_plugin_manager(settings(disable_plugin_autoload=False, plugins_allow=["cadence-pigeon"]))
    assert {i.name for i in only.infos if i.source == "entrypoint"} == {"cadence-pigeon"}
    assert "pigeon" in connector_classes(only, settings())


def test_environment_variable_turns_autoload_off(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Settings(_env_file=None).disable_plugin_autoload is True  # type: ignore[call-arg]
    monkeypatch.setenv("CADENCE_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("CADENCE_PLUGINS_ALLOW", '["cadence-pigeon"]')
    loaded = make_plugin_manager(Settings(_env_file=None))  # type: ignore[call-arg]
    assert {i.name for i in loaded.infos if i.source == "entrypoint"} == {"cadence-pigeon"}


def test_bad_connector_classes_are_reported_not_raised() -> None:
    class NotAConnector:
        name = "x"

    class Plugin:
        @hookimpl
        def cadence_register_connectors(self, settings: Settings) -> list[Any]:
            return [NotAConnector]

    pm = make_plugin_manager(settings(), extra_plugins=[("bad", Plugin())])
    assert "x" not in connector_classes(pm, settings())
    [info] = [i for i in pm.infos if i.name == "bad"]
    assert "not a subclass" in (info.error or "")


def test_installed_channels_follow_the_connectors(site: Path) -> None:
    assert installed_channels(settings()) == frozenset(CHANNELS)  # the outbox offers them all

    class OnlyPush:
        @hookimpl
        def cadence_register_connectors(self, settings: Settings) -> list[Any]:
            return [connector_classes(make_plugin_manager(settings), settings)["sms"]]

    pm = make_plugin_manager(settings())
    for name in ("outbox", "sendgrid", "facebook", "google_ads"):
        pm.unregister(name=name)
    assert installed_channels(settings(), pm=pm) == frozenset({"sms"})


def test_enrich_and_resolve_identity_hooks_shape_webhook_events(sqlite_engine: Engine) -> None:
    class Enricher:
        @hookimpl
        def cadence_enrich_feedback(
            self, connector: str, provider_event: ProviderEvent, properties: dict[str, Any]
        ) -> dict[str, Any]:
            return {"region": "eu", "channel": "hijacked"}

        @hookimpl
        def cadence_resolve_identity(self, connector: str, provider_event: ProviderEvent) -> str | None:
            return "crm-" + (provider_event.recipient or "")[:3]

    pm = make_plugin_manager(settings(), extra_plugins=[("enricher", Enricher())])
    item = ProviderEvent(event_id="e1", kind=Feedback.CLICKED, channel="email", ts_ms=5, recipient="bob@x.io")
    [event] = to_new_events(engine=sqlite_engine, pm=pm, connector="sendgrid", items=[item], received_ms=9)
    assert event.user_id == "crm-bob" and event.event == "Email Link Clicked"
    assert event.payload["properties"]["region"] == "eu"
    assert event.payload["properties"]["channel"] == "email"  # cadence's own keys win


def test_plugin_routers_and_webhook_parsers_are_mounted(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    router = APIRouter(prefix="/v1/pigeon")

    @router.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    class Receiver:
        name = "crm"

    class Plugin:
        @hookimpl
        def cadence_register_routers(self, settings: Settings) -> list[APIRouter]:
            return [router]

        @hookimpl
        def cadence_register_webhook_parsers(self, settings: Settings) -> list[Any]:
            return [Receiver()]

    from cadence.api.routers import webhooks

    real = webhooks.make_plugin_manager
    monkeypatch.setattr(webhooks, "make_plugin_manager", lambda s: real(s, extra_plugins=[("p", Plugin())]))
    runtime = open_runtime(settings(database_url=f"sqlite:///{tmp_path}/c.db"), engine=sqlite_engine)
    app = create_app(runtime=runtime, background=False)
    assert TestClient(app).get("/v1/pigeon/ping").json() == {"pong": "yes"}
    assert isinstance(app.state.connectors.webhook_receiver("crm"), Receiver)


def test_hooks_are_documented_tested_and_in_the_docs() -> None:
    docs = (ROOT / "docs" / "connectors.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    assert HOOKS == [
        "cadence_enrich_feedback",
        "cadence_register_connectors",
        "cadence_register_routers",
        "cadence_register_webhook_parsers",
        "cadence_resolve_identity",
    ]
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and ":param" in spec.__doc__, name
        assert name in docs, f"{name} is not in docs/connectors.md"
        assert tests.count(name) >= 2, f"{name} has no test"


def test_cli_lists_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, site: Path) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    monkeypatch.setenv("CADENCE_DISABLE_PLUGIN_AUTOLOAD", "1")
    ok = runner.invoke(cli_app, ["plugins", "list", "--json"])
    assert ok.exit_code == 0, ok.output
    listed = json.loads(ok.output)
    assert {c["name"] for c in listed["connectors"]} == {
        "outbox",
        "sendgrid",
        "sms",
        "facebook",
        "google_ads",
    }
    # A configured connector missing a setting it cannot send without: named, and exit 1.
    monkeypatch.setenv("CADENCE_CONNECTORS__SENDGRID__FROM_EMAIL", "news@shop.example")
    incomplete = runner.invoke(cli_app, ["plugins", "list", "--json"])
    assert incomplete.exit_code == 1
    [sendgrid] = [c for c in json.loads(incomplete.stdout)["connectors"] if c["name"] == "sendgrid"]
    assert sendgrid["missing_settings"] == ["CADENCE_CONNECTORS__SENDGRID__API_KEY"]
    table = runner.invoke(cli_app, ["plugins", "list"])
    assert table.exit_code == 1 and "CADENCE_CONNECTORS__SENDGRID__API_KEY" in table.output
    monkeypatch.delenv("CADENCE_CONNECTORS__SENDGRID__FROM_EMAIL")
    monkeypatch.setenv("CADENCE_DISABLE_PLUGIN_AUTOLOAD", "0")
    broken = runner.invoke(cli_app, ["plugins", "list"])
    assert broken.exit_code == 1  # a plugin failed to load: scripts notice
    assert "needs libfoo" in broken.output and "pigeon" in broken.output


def test_example_package_installs_with_pip_and_loads_through_its_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    source = tmp_path / "src"  # build a copy: pip's setuptools build writes into the source tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(target),
        str(source),
    ]
    subprocess.run(pip, check=True, cwd=tmp_path, capture_output=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]),
        "CADENCE_DISABLE_PLUGIN_AUTOLOAD": "0",
        "CADENCE_CONNECTORS__EXAMPLE_WEBHOOK__URL": "http://127.0.0.1:9/hook",
    }
    out = subprocess.run(
        [sys.executable, "-m", "cadence", "plugins", "list", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = json.loads(out)
    [plugin] = [p for p in listed["plugins"] if p["source"] == "entrypoint"]
    assert (plugin["name"], plugin["version"], plugin["error"]) == ("example_webhook", "0.1.0", None)
    [connector] = [c for c in listed["connectors"] if c["name"] == "example_webhook"]
    assert connector["channels"] == ["webhook"] and connector["enabled"] is True


async def test_example_connector_sends_through_the_same_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_engine: Engine
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from cadence_connector_example import ExampleWebhook  # type: ignore[import-not-found]

    seen: list[httpx.Request] = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202)

    class Plugin:
        @hookimpl
        def cadence_register_connectors(self, settings: Settings) -> list[Any]:
            return [ExampleWebhook]

    config = settings(connectors={"example_webhook": {"url": "https://hooks.example/in", "secret": "s"}})
    pm = make_plugin_manager(config, extra_plugins=[("example", Plugin())])
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as client:
        registry = build_connectors(config, pm=pm, client=client, engine=sqlite_engine)
        connector = registry.route("webhook")
        assert connector is not None and connector.name == "example_webhook"
        message = OutgoingMessage(
            send_id=1, idempotency_key="k1", campaign="c", channel="webhook", customer_id=1
        )
        [result] = await connector.send([message])
    assert (
        result.ok
        and seen[0].headers["x-signature"]
        and json.loads(seen[0].content)["messages"][0]["id"] == "k1"
    )


def test_public_names_exist() -> None:
    import cadence.connectors.base as base
    import cadence.connectors.delivery as delivery
    import cadence.plugins as plugins

    for module in (base, delivery, plugins):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"{module.__name__}.__all__ names {missing}"


def test_the_rule_checker_sees_the_installed_channels(site: Path) -> None:
    from cadence.dsl.explain import installed_channels as checker_channels
    from cadence.plugins import available_channels

    assert checker_channels(settings()) == available_channels(settings()) == CHANNELS
    pm = make_plugin_manager(settings())
    for name in ("outbox", "facebook", "google_ads"):
        pm.unregister(name=name)
    assert installed_channels(settings(), pm=pm) == frozenset({"email", "sms"})
