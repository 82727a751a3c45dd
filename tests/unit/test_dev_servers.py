"""The test tooling's worker process (chatqueue_dev.servers)."""

from __future__ import annotations

import os
from pathlib import Path

from chatqueue_dev.servers import spawn_worker
from tests.support.chatty_exit import LINES


def test_a_stopped_workers_log_has_everything_it_wrote(tmp_path: Path) -> None:
    """stop() returns once the reader thread has every line the process wrote, so a test that
    looks for a line's absence after stopping a worker reads its whole log."""
    worker = spawn_worker(dict(os.environ), tmp_path, module="tests.support.chatty_exit")
    worker.process.wait(timeout=60)  # it has written everything and exited
    assert worker.stop() == 0
    assert len(worker.lines) == LINES
    assert worker.lines[-1] == "end\n"
