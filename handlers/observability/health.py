"""Health for orchestrators: liveness and readiness of one process, over HTTP (``STANCHION_HEALTH_PORT``).

``GET /livez``: 200 while the process's event loop answers (a wedged loop answers nothing, and the probe's
timeout fails it). ``GET /readyz``: 200 when the process is started, connected to NATS, and every handler is
consuming (its streams and buckets were checked at start-up, and are recreated when deleted); 503 otherwise, e.g.
while disconnected or shutting down. Both answer a small JSON document saying why. A paused handler (every
candidate asked to wait) is still ready: it holds its messages on purpose, and restarting it would not help.

The NATS micro service every handler registers (``$SRV.PING.stanchion``, ``$SRV.STATS.stanchion``) answers the
same question over NATS: ``nats micro ping stanchion``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("stanchion.health")

Check = Callable[[], Mapping[str, Any]]
"""The readiness figures of the process: ``{"ready": bool, ...details}``."""


@dataclass
class HealthServer:
    """A minimal HTTP/1.1 server with ``/livez`` and ``/readyz`` (no dependency: two GET routes need none).

    Args:
        readiness: Called on every ``/readyz``; its ``ready`` decides 200 or 503.
        host: Interface to listen on.
        port: Port (0: one the OS picks; ``port`` holds it once started).
    """

    readiness: Check
    host: str = "0.0.0.0"
    port: int = 0
    _server: asyncio.Server | None = field(default=None, init=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health endpoint listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here needs them
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, body = self._answer(method, path)
            payload = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        if method not in ("GET", "HEAD"):
            return 405, {"error": "GET /livez or /readyz"}
        if path in ("/livez", "/healthz"):
            return 200, {"live": True}
        if path == "/readyz":
            try:
                figures = dict(self.readiness())
            except Exception as exc:  # a check that fails is a process that is not ready, not a crashed endpoint
                figures = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
            return (200 if figures.get("ready") else 503), figures
        return 404, {"error": "GET /livez or /readyz"}
