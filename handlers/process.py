"""One service process: settings, the embedded nats-server, logging, telemetry and GC, around any app.

``stanchion run [MODULE:APP]`` and ``faststream run`` of the classifier's module set the process up the same
way: ``NATS_URL`` unset starts an embedded nats-server *before* the app is imported or built, and sets
``NATS_URL`` for it, so the user's own ``NatsBroker(os.environ["NATS_URL"])`` (or ``create_broker``) finds it.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from faststream import FastStream

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.observability.logs import configure_logging
from stanchion.handlers.observability.telemetry import Telemetry, configure_telemetry
from stanchion.handlers.runtime.redact import environment_secrets
from stanchion.handlers.settings import Settings, load_settings


def tune_gc(threshold: int) -> None:
    """Tune the cyclic garbage collector for a long-running service, once start-up is over.

    Everything alive after start-up (imported modules, schemas, clients) is frozen out of later collections,
    and the young generation is collected every ``threshold`` allocations instead of Python's 700: with spans
    waiting in the exporter's batch, the default made tracing cost about 40 % more CPU per event (bench/).
    ``0`` leaves the collector as Python set it.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


@dataclass
class Process:
    """What one service process started, to stop in reverse order."""

    settings: Settings
    embedded: EmbeddedNats | None = None
    telemetry: Telemetry | None = None
    stopped: bool = field(default=False, init=False)

    @classmethod
    def start(cls, settings: Settings | None = None, *, log_level: str | None = None) -> Process:
        """Read the settings, start the embedded server when ``NATS_URL`` is unset, configure telemetry and logs.

        Raises:
            ConfigError: A bad setting (the message names it).
        """
        settings = settings or load_settings()
        process = cls(settings)
        try:
            if not settings.nats_url:
                process.embedded = EmbeddedNats(settings.nats_server_bin, settings.nats_store_dir)
                url = process.embedded.start()
                os.environ["NATS_URL"] = url
                process.settings = settings = settings.model_copy(update={"nats_url": url})
            process.telemetry = configure_telemetry(settings)
            secrets = [*settings.secrets(), *environment_secrets()]
            configure_logging(log_level or settings.log_level, settings.log_format, secrets)
        except BaseException:
            process.stop()
            raise
        return process

    def serve(self, app: FastStream) -> FastStream:
        """Hook the process's own start-up and shutdown work onto ``app``."""
        threshold = self.settings.gc_threshold

        async def tuned() -> None:  # async: on the loop's thread (FastStream runs sync hooks in a worker thread)
            tune_gc(threshold)

        app.after_startup(tuned)
        app.after_shutdown(self.stop)
        return app

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.embedded is not None:
            self.embedded.stop()
        if self.telemetry is not None:
            self.telemetry.shutdown()  # flush the last spans and metrics


def import_app(target: str, cwd: Path | None = None) -> FastStream:
    """``MODULE:APP`` from the current directory, as ``faststream run`` finds it (``ConfigError`` if it cannot)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"APP: {target!r} is not MODULE:APP (e.g. myservice.app:app)")
    root = str(cwd or Path.cwd())
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"APP: no module {exc.name!r} (from {root})") from None
        raise
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"APP: module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(app, FastStream):
        raise ConfigError(f"APP: {target} is a {type(app).__name__}, not a FastStream app")
    return app


def serve_module(build: Callable[[Settings], FastStream]) -> FastStream:
    """An app for ``faststream run``, with the process set up around it (stopped after the app's shutdown)."""
    process = Process.start()
    try:
        return process.serve(build(process.settings))
    except BaseException:
        process.stop()
        raise
