"""`chatqueue-worker` whose engine thread dies on demand: the watchdog's test fixture.

    CHATQUEUE_TEST_ENGINE_FAULT=<file> python -m tests.support.dying_engine_worker run ...

The real worker, model and engine, except that once <file> exists the engine's next step raises
SystemExit -- an exception the engine's per-step handler (which fails a batch on any Exception
and keeps serving) does not catch, so the engine thread itself ends, as it would on a bug
outside that handler. The fault is in the runner's `execute`, which every forward goes through
(transformers' or the Llama family's fast path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.cli import main
from worker.engine.runner import ModelRunner

TRIGGER = Path(os.environ["CHATQUEUE_TEST_ENGINE_FAULT"])
_execute = ModelRunner.execute


def _execute_or_die(self: ModelRunner, rows: Sequence[Any]) -> Any:
    if TRIGGER.exists():
        raise SystemExit("injected: the engine thread dies")
    return _execute(self, rows)


ModelRunner.execute = _execute_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
