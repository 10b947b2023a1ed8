"""/livez and /readyz of a running service, through a NATS outage and shutdown, on a real nats-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stanchion.handlers.api import Stanchion
from stanchion.handlers.nats.embedded import EmbeddedNats, free_port
from tests.conftest import policy_for, running_service
from tests.fake_openai import FakeOpenAI


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """One HTTP GET on loopback: (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    finally:
        writer.close()
    return int(head.split()[1]), json.loads(body)


async def test_readiness_follows_the_connection_and_shutdown_while_liveness_stays(
    fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "store", port=free_port())
    server.start()
    try:
        policy = policy_for(("primary", fake_openai()))
        async with running_service(server.url, policy, health_port=0, health_host="127.0.0.1") as svc:
            reliable = svc.service.loop  # the handler's loop, for its state below
            stanchion = _stanchion(svc)
            assert stanchion._health is not None
            port = stanchion._health.port
            assert await get(port, "/livez") == (200, {"live": True})
            status, body = await get(port, "/readyz")
            assert status == 200 and body["ready"] and body["connected"], body
            assert body["handlers"]["classify"] == {"consuming": True, "paused": False, "waiting": reliable.waiting}

            server.stop()  # NATS goes away: not ready, still alive
            async with asyncio.timeout(10):
                while (await get(port, "/readyz"))[0] != 503:
                    await asyncio.sleep(0.05)
            status, body = await get(port, "/readyz")
            assert body["connected"] is False and body["started"] is True
            assert (await get(port, "/livez"))[0] == 200

            server.start()  # back: ready again
            async with asyncio.timeout(20):
                while (await get(port, "/readyz"))[0] != 200:
                    await asyncio.sleep(0.1)
            assert (await get(port, "/nothing"))[0] == 404
        try:
            await get(port, "/livez")
        except ConnectionError:
            pass
        else:
            raise AssertionError("the health endpoint still answers after shutdown")
    finally:
        server.stop()


def _stanchion(svc: Any) -> Stanchion:
    """The app's Stanchion, as the CLI finds it."""
    reliable = svc.app.context.get("stanchion")
    assert isinstance(reliable, Stanchion)
    return reliable
