"""Stopping the process: Ctrl-C to the terminal's process group, with the embedded nats-server, ends cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import STANCHION, clean_env


def test_ctrl_c_to_the_process_group_with_the_embedded_server_exits_cleanly_every_time(tmp_path: Path) -> None:
    """SIGINT to the whole process group of `stanchion run` (what a terminal's Ctrl-C does), ten times: ten exits
    with code 0 and no traceback — the embedded server, in a session of its own, outlives the broker's drain."""
    codes, logs = [], []
    for run in range(10):
        log = tmp_path / f"run-{run}.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [STANCHION, "run"],
                env=clean_env(),
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal gives a foreground job
            )
        deadline = time.monotonic() + 30
        while b"started successfully" not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        codes.append(process.wait(30))
        logs.append(log.read_text())
    assert codes == [0] * 10, [text[-2000:] for code, text in zip(codes, logs, strict=True) if code != 0][:1]
    assert not [text for text in logs if "Traceback" in text or "[error" in text]
