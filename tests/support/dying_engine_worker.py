"""`chatqueue-worker` whose engine thread dies on demand: the watchdog's test fixture.

    CHATQUEUE_TEST_ENGINE_FAULT=<file> python -m tests.support.dying_engine_worker run ...

The real worker, model and engine, except that once <file> exists the model's next forward
pass raises SystemExit -- an exception the engine's per-step handler (which fails a batch on
any Exception and keeps serving) does not catch, so the engine thread itself ends, as it would
on a bug outside that handler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from worker.cli import main

TRIGGER = Path(os.environ["CHATQUEUE_TEST_ENGINE_FAULT"])
_call = PreTrainedModel.__call__


def _forward_or_die(self: Any, *args: Any, **kwargs: Any) -> Any:
    if TRIGGER.exists():
        raise SystemExit("injected: the engine thread dies")
    return _call(self, *args, **kwargs)


PreTrainedModel.__call__ = _forward_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
