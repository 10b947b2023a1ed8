"""The OTLP/HTTP receiver of ``tests/otlp_receiver.py`` in a process of its own, like a collector.

Decoding every exported span in the benchmark's own process would take the GIL from the driver that
publishes and counts events, and charge it to the traced lane. ``python -m bench.collector`` prints
``PORT <n>`` once it listens; on SIGTERM it prints one JSON line with what it received and exits.
"""

from __future__ import annotations

import json
import signal
import threading

from tests.otlp_receiver import OtlpReceiver


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with OtlpReceiver() as receiver:
        print(f"PORT {receiver.endpoint.rsplit(':', 1)[1]}", flush=True)
        stop.wait()
        spans = receiver.snapshot()
        summary = {
            "spans": len(spans),
            "names": sorted({s.name for s in spans}),
            "metrics": {name: len(receiver.metric_points(name)) for name in list(receiver.metrics)},
        }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
