"""A small OpenAI-compatible Chat Completions server over real HTTP, for tests and benchmarks.

It answers ``TaskClassification`` as a tool call (when the request offers tools) or as JSON content
(native / prompted output), and can be told to misbehave: 429 with Retry-After, 5xx, 401, slow
answers, connection resets, malformed bodies, schema-invalid output. It counts every request.
It runs its own event loop in a thread, so a test's loop (or another process) can call it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Fault = str
"""ok | 429 | 500 | 503 | 401 | 404 | slow | reset | malformed | invalid"""

FAULTS: tuple[Fault, ...] = ("429", "500", "503", "slow", "reset", "malformed", "invalid")


@dataclass
class Recorded:
    at: float
    fault: Fault
    model: str
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    """Configure with ``script`` (faults for the next requests, in order), ``always`` (a fault for every
    request after the script), or ``fault_rate`` (a random fault from ``faults`` with that probability).
    """

    retry_after: float = 1.0
    slow_s: float = 5.0
    latency_s: float = 0.0
    slots: int | None = None
    """Requests served at once, like a local server with that many slots (others queue; ``None``: no limit)."""
    echo_auth: bool = False
    quote_auth: bool = False
    """Answer with the request's Authorization header in the output's text (a provider or proxy echoing it)."""
    always: Fault = "ok"
    fault_rate: float = 0.0
    faults: tuple[Fault, ...] = FAULTS
    seed: int = 1
    category: str = "bug"
    answer: Callable[[str], dict[str, Any]] | None = None
    """The output for a request's user text (default: a ``TaskClassification``); ``invalid`` faults answer ``{}``."""
    script: collections.deque[Fault] = field(default_factory=collections.deque)
    requests: list[Recorded] = field(default_factory=list)
    tokens: list[tuple[int, int]] = field(default_factory=list)
    """(prompt, completion) tokens of every completion answered, as its ``usage`` said."""
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(self.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._slots: asyncio.Semaphore | None = None

    # -- control -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def set(
        self,
        *,
        always: Fault | None = None,
        script: list[Fault] | None = None,
        fault_rate: float | None = None,
    ) -> None:
        with self._lock:
            if always is not None:
                self.always = always
            if script is not None:
                self.script = collections.deque(script)
            if fault_rate is not None:
                self.fault_rate = fault_rate

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.tokens.clear()

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._run, name=f"fake-openai-{id(self)}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- server --------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _next_fault(self, body: dict[str, Any]) -> Fault:
        with self._lock:
            if self.script:
                fault = self.script.popleft()
            elif self.fault_rate and self._random.random() < self.fault_rate:
                fault = self._random.choice(self.faults)
            else:
                fault = self.always
            self.requests.append(Recorded(time.monotonic(), fault, str(body.get("model", "")), body))
            return fault

    def requests_mentioning(self, text: str, after: float = 0.0) -> int:
        """How many requests since ``after`` (monotonic) had ``text`` in their messages."""
        with self._lock:
            return sum(1 for r in self.requests if r.at >= after and text in json.dumps(r.body.get("messages", [])))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._respond(method, path, raw, writer, headers.get("authorization", "")):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(
        self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter, authorization: str = ""
    ) -> bool:
        if method != "POST" or not path.endswith("/chat/completions"):
            self._write(writer, 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
            return True
        body = json.loads(raw or b"{}")
        fault = self._next_fault(body)
        if self.slots is not None:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.slots)
            async with self._slots:
                await asyncio.sleep(self.latency_s)
        elif self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "reset":
            writer.transport.abort()
            return False
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
            fault = "ok"
        if fault in ("429", "500", "503", "401", "404"):
            status = int(fault)
            extra = {"Retry-After": f"{self.retry_after:g}"} if status == 429 else {}
            kind = {429: "rate_limit_exceeded", 401: "invalid_api_key", 404: "model_not_found"}.get(
                status, "server_error"
            )
            message = f"injected {status}"
            if self.echo_auth:  # like a careless provider or proxy that quotes the credentials it refused
                message += f"; got Authorization: {authorization}"
            self._write(
                writer,
                status,
                {"error": {"message": message, "type": kind, "code": kind}},
                extra,
            )
            return True
        if fault == "malformed":
            self._write_raw(writer, 200, b'{"id": "chatcmpl-x", "choices": [ {"mess', "application/json")
            return True
        self._write(writer, 200, self._completion(body, invalid=fault == "invalid", authorization=authorization))
        return True

    def _completion(self, body: dict[str, Any], *, invalid: bool, authorization: str = "") -> dict[str, Any]:
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")
        if self.quote_auth:
            text = f"{authorization} {text}"
        answer: dict[str, Any] = {
            "category": self.category,
            "priority": 9 if invalid else 2 + len(text) % 3,
            "confidence": 0.9,
            "summary": text[:60] or "empty",
        }
        if self.answer is not None:
            answer = {} if invalid else self.answer(text)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish = "stop"
        tools = body.get("tools") or []
        if tools:
            name = tools[0]["function"]["name"]
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.requests)}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(answer)},
                }
            ]
            finish = "tool_calls"
        else:
            message["content"] = json.dumps(answer)
        prompt_tokens = 50 + len(text) // 4
        with self._lock:
            self.tokens.append((prompt_tokens, 20))
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20},
        }

    def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        self._write_raw(writer, status, json.dumps(payload).encode(), "application/json", headers)

    def _write_raw(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        data: bytes,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        reason = {
            200: "OK",
            401: "Unauthorized",
            404: "Not Found",
            429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "Error")
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
