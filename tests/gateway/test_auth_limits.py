"""API keys (HTTP header; WebSocket header or first frame) and the session limits (HTTP 429,
error frame `busy`)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import websockets

from gateway.config import GatewayConfig, is_loopback
from tests.gateway.conftest import Client, Running, serve

KEY, OTHER = "k-one", "k-two"


@pytest.fixture(scope="module")
def locked() -> Iterator[Running]:
    # detach_timeout_s=0: a dropped connection closes its session (nothing lingers between tests)
    running = serve(
        GatewayConfig(
            api_keys=(KEY, OTHER),
            max_sessions=4,
            max_sessions_per_key=2,
            auth_timeout_s=1.0,
            detach_timeout_s=0,
        )
    )
    yield running
    running.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_http_needs_the_key(locked: Running) -> None:
    async with httpx.AsyncClient(base_url=locked.url) as http:
        for path in ("/v1/info", "/metrics", "/v1/sessions", "/openapi.json", "/v1/events"):
            r = await http.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert r.json()["error"]["code"] == "unauthorized"
        assert (await http.get("/v1/info", headers=auth("nope"))).status_code == 401
        assert (await http.get("/v1/info", headers=auth())).status_code == 200
        assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/")).status_code == 200  # the page asks for the key itself


async def test_websocket_header_or_first_frame(locked: Running) -> None:
    async with await Client.connect(locked.ws + "/v1/stream", auth()) as c:
        await c.open()
    async with await Client.connect(locked.ws + "/v1/stream") as c:
        await c.send({"type": "input", "text": "hi"})
        assert (await c.recv())["code"] == "unauthorized"  # still open: authenticate now
        await c.send({"type": "auth", "api_key": OTHER})
        await c.open()
        await c.send({"type": "auth", "api_key": OTHER})
        assert (await c.recv())["code"] == "wrong_state"
    async with await Client.connect(locked.ws + "/v1/stream") as c:
        await c.send({"type": "auth", "api_key": "wrong"})
        err = await c.recv()
        assert err["code"] == "unauthorized" and err["fatal"]
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    async with await Client.connect(
        locked.ws + "/v1/stream"
    ) as c:  # silent: closed after auth_timeout_s
        assert (await c.recv())["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            await c.recv()


async def test_session_limits(locked: Running) -> None:
    async with httpx.AsyncClient(base_url=locked.url) as http:
        made = [(await http.post("/v1/sessions", headers=auth())) for _ in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        r = await http.post("/v1/sessions", headers=auth())
        assert r.status_code == 429 and r.json()["error"]["code"] == "busy"  # per key
        async with await Client.connect(locked.ws + "/v1/stream", auth()) as c:
            await c.send({"type": "open"})
            err = await c.recv()
            assert err["code"] == "busy" and not err["fatal"]
        others = [(await http.post("/v1/sessions", headers=auth(OTHER))) for _ in range(2)]
        assert [r.status_code for r in others] == [201, 201]
        r = await http.post("/v1/completions", headers=auth(OTHER), json={"prompt": "x"})
        assert r.status_code == 429  # all four sessions in use
        # another key's sessions are out of reach without their token
        sid = others[0].json()["session"]
        assert (await http.get(f"/v1/sessions/{sid}", headers=auth())).status_code == 403
        assert (await http.get(f"/v1/sessions/{sid}", headers=auth(OTHER))).status_code == 200
        for r, key in ((made[0], KEY), (made[1], KEY), (others[0], OTHER), (others[1], OTHER)):
            assert (
                await http.delete(f"/v1/sessions/{r.json()['session']}", headers=auth(key))
            ).status_code == 200
        assert (
            await http.post(
                "/v1/completions", headers=auth(), json={"prompt": "x", "max_tokens": 2}
            )
        ).status_code == 200


def test_loopback_rule() -> None:
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("::1")
        and is_loopback("localhost")
        and is_loopback("127.8.0.1")
    )
    assert (
        not is_loopback("0.0.0.0")
        and not is_loopback("10.0.0.2")
        and not is_loopback("example.com")
    )
    assert GatewayConfig(host="0.0.0.0").bind_problem() is not None
    assert GatewayConfig(host="0.0.0.0", api_keys=("k",)).bind_problem() is None
    assert GatewayConfig().bind_problem() is None
