"""The stack outside NATS: the README's plain-asyncio example runs as written."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_plain_asyncio_example_runs_and_retries_through_the_stack() -> None:
    """examples/plain_asyncio.py retries the rate-limited model and routes the urgent event to the steady one."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples/plain_asyncio.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "default: 'hello from flaky' served by flaky, 3 attempt(s), 2 retries",
        "urgent: 'hello from steady' served by steady, 1 attempt(s), 0 retries",
    ]


def test_the_middleware_package_imports_neither_faststream_nor_handlers() -> None:
    """`stanchion.middleware` stands alone: importing it loads no FastStream and no handlers module."""
    code = (
        "import sys, stanchion.middleware; print(sorted(m for m in sys.modules"
        " if m.split('.')[0] == 'faststream' or m.startswith('stanchion.handlers')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
