"""A local nats-server cluster for tests: nodes on loopback with routes to each other, JetStream on each, each on a
store of its own; a node can be SIGKILLed and started again on its store, on its ports.

Routes need the other nodes' cluster ports before any node starts (a JetStream cluster refuses to start without
configured routes), so the ports are taken from the OS (bound to port 0, then released) and kept for restarts.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from types import TracebackType

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig

from stanchion.handlers.nats.embedded import EmbeddedNats, free_port

_clusters = itertools.count()


class NatsCluster:
    """``size`` nats-server processes forming one JetStream cluster.

    Args:
        root: Where the nodes' stores (and logs) go, one folder per node.
        size: Number of nodes.
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        self.name = f"stanchion-test-{next(_clusters)}"
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes = [
            EmbeddedNats(
                store_dir=root / f"n{i}",
                args=(
                    *("--server_name", f"n{i}"),
                    *("--cluster_name", self.name),
                    *("--cluster", f"nats://127.0.0.1:{cluster_ports[i]}"),
                    *("--routes", routes),
                ),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated, as ``NATS_URL`` takes them."""
        return ",".join(node.url for node in self.nodes)

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> int:
        """The index of the node named ``name`` (``n0``, ``n1``...: what ``stream_info().cluster.leader`` says)."""
        return int(name.removeprefix("n"))

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until the cluster can hold a stream on all of them."""
        for node in self.nodes:
            await asyncio.to_thread(node.start)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a stream replicated on every node can be created (a meta leader elected, every node a peer)."""
        client = await nats.connect(self.servers)
        js = client.jetstream(timeout=2)
        name = f"PROBE_{self.name.replace('-', '_')}"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await js.add_stream(StreamConfig(name=name, subjects=[], num_replicas=len(self.nodes)))
                        await js.delete_stream(name)
                        return
                    except NatsError:
                        await asyncio.sleep(0.2)
        finally:
            await client.close()

    def kill(self, index: int) -> None:
        """SIGKILL one node; its store stays for :meth:`restart`."""
        self.nodes[index].kill()

    async def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed node again, on its store and ports, and wait until it holds streams again."""
        await asyncio.to_thread(self.nodes[index].start)
        await self.wait_ready(timeout)

    async def leader(self, client: Client, stream: str) -> int:
        """The index of the node that leads ``stream``."""
        info = await client.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None, f"{stream} has no leader"
        return self.node(info.cluster.leader)

    def stop(self) -> None:
        """Stop every node by its PID."""
        for node in self.nodes:
            node.stop()

    async def __aenter__(self) -> NatsCluster:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
