"""The fake OpenAI-compatible provider of ``tests/fake_openai.py`` in a process of its own.

A CPU-bound measurement must not share its GIL with the provider, so the suite runs the provider here:
``python -m bench.provider --latency 0.2`` prints ``PORT <n>`` once it listens and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.fake_openai import FakeOpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--always", default="ok", help="fault for every request (ok, 503, 429, ...)")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with FakeOpenAI(latency_s=args.latency, always=args.always) as server:
        print(f"PORT {server.port}", flush=True)
        stop.wait()
        print(f"REQUESTS {server.count}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
