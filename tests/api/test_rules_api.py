"""The rules routes: summary, atomic reload, explain as JSON."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime

RULES = Path(__file__).resolve().parents[2] / "rules"


def test_rules_reload_and_explain(runtime: Runtime, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    client = TestClient(create_app(runtime=runtime, background=False))
    admin = {"X-API-Key": create_key(runtime.engine, name="a", scopes=["admin"])}
    decider = {"X-API-Key": create_key(runtime.engine, name="d", scopes=["decide"])}

    summary = client.get("/v1/rules", headers=admin).json()
    assert summary["ok"] and "winback" in summary["campaigns"] and len(summary["hash"]) == 64
    assert client.get("/v1/rules", headers=decider).status_code == 403

    (rules / "cart.cadence").write_text("campaign broken {\n  channel emial\n}\n")
    failed = client.post("/v1/rules/reload", headers=admin).json()
    assert failed["ok"] is False and failed["hash"] == summary["hash"]  # the old ruleset stays
    assert {d["code"] for d in failed["diagnostics"]} == {"E202", "E404"}
    (rules / "cart.cadence").unlink()
    swapped = client.post("/v1/rules/reload", headers=admin).json()
    assert swapped["ok"] and swapped["hash"] != summary["hash"] and "cart_rescue" not in swapped["campaigns"]

    missing = client.get("/v1/explain/winback", params={"customer": "nobody"}, headers=decider)
    assert missing.status_code == 404
    unknown = client.get("/v1/explain/winbak", params={"customer": "1"}, headers=decider)
    assert unknown.status_code == 404 and "did you mean 'winback'?" in unknown.json()["detail"]
