"""Waiting for a worker's log lines.

A worker's output reaches the test through a pipe that a reader thread drains into
`WorkerProcess.lines` (chatqueue_dev.servers.spawn_worker). So a line the worker wrote *before* an
event the test sees another way -- a result stored in Redis, the worker's own exit -- may reach
`worker.log()` a moment *after* that event: assert on such a line by waiting for it, never at once.
"""

from __future__ import annotations

from chatqueue_dev.servers import WorkerProcess, wait_until


def wait_logged(worker: WorkerProcess, *texts: str, timeout: float = 30) -> str:
    """The worker's log once every one of `texts` is in it; AssertionError with the log's tail
    if one is still missing after `timeout` seconds."""

    def all_there() -> bool:
        log = worker.log()
        return all(text in log for text in texts)

    try:
        wait_until(all_there, timeout=timeout, what=f"{worker.name} to log {texts!r}")
    except TimeoutError as exc:
        log = worker.log()
        missing = [text for text in texts if text not in log]
        raise AssertionError(f"{exc}; missing {missing!r}; log tail:\n{log[-3000:]}") from None
    return worker.log()
