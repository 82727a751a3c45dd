"""The batching engine: a scheduler, a paged KV cache and a model runner behind one thread.

    scheduler.py  what runs each step: admission order, token budget, chunked prefill, preemption
    kv_cache.py   the block pool, block tables, prefix-cache keys, reference counts, LRU eviction
    runner.py     one forward over a ragged batch; paged attention via transformers' interface
    stopping.py   why a job ends, as small pure callables
    core.py       the engine thread that composes them; job.py the types that flow through
"""

from worker.engine.core import Engine
from worker.engine.job import (
    DeviceOutOfMemory,
    EngineJob,
    EngineLimits,
    EngineOutput,
    EngineRequest,
    EngineStopped,
    FinishReason,
)

__all__ = [
    "DeviceOutOfMemory",
    "Engine",
    "EngineJob",
    "EngineLimits",
    "EngineOutput",
    "EngineRequest",
    "EngineStopped",
    "FinishReason",
]
