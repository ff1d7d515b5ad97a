"""The Fleet-only gateway's path filter (deploy/fleet_gateway.py), through its ASGI app with a stub upstream."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]


def _gateway():
    spec = importlib.util.spec_from_file_location("fleet_gateway", ROOT / "deploy" / "fleet_gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/runtime/x",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/%2E%2E/control/list-runs",
        "/v1/fleet/..%2fcontrol/start-run",
        "/v1/fleet/./../control/start-run",
        "/v1/fleet//../../v1/control/x",
        "/v1/fleet\\..\\control",
    ],
)
def test_only_canonical_fleet_paths_reach_the_superlink(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request the gateway forwards is recorded; a Control/Runtime path, however spelled, is refused (403)
    and never reaches the upstream."""
    gw = _gateway()
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, stream=httpx.ByteStream(b"ok"))

    real = httpx.AsyncClient
    monkeypatch.setattr(gw.httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(upstream), **kw))
    client = TestClient(gw.create_app("http://superlink:9093", False))
    # a raw request line (no client-side normalisation), as an attacker would send it
    response = client.post("/v1/fleet/create-node")
    assert response.status_code == 200 and seen == ["/v1/fleet/create-node"]
    seen.clear()
    raw = client.request("POST", "http://testserver" + path)
    assert raw.status_code in (403, 404), (path, raw.status_code)
    assert not seen, (path, seen)
