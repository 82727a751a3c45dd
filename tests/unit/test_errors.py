"""One error base, and one mapping from an error to a job's end (worker/outcome.py)."""

from __future__ import annotations

import inspect

import pytest
import redis

import producer.errors
import worker.errors
from producer.errors import (
    ChatQueueError,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    NotReplicated,
)
from producer.schemas import JobError
from worker.errors import (
    DeviceOutOfMemory,
    EngineStopped,
    JobInterrupted,
    ModelNotReady,
    WorkerMisconfigured,
)
from worker.outcome import job_failed, settle


def error_classes(module):
    return [cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__]


@pytest.mark.parametrize("module", [producer.errors, worker.errors], ids=lambda m: m.__name__)
def test_every_chatqueue_error_derives_from_one_base(module):
    classes = error_classes(module)
    assert classes
    assert all(issubclass(cls, ChatQueueError) for cls in classes)


@pytest.mark.parametrize(
    ("error", "also"),
    [
        pytest.param(JobNotFound("x"), LookupError, id="job-not-found"),
        pytest.param(JobIdConflict("x"), ValueError, id="job-id-conflict"),
        pytest.param(NotReplicated("x", "why"), ConnectionError, id="not-replicated"),
        pytest.param(EngineStopped("x"), RuntimeError, id="engine-stopped"),
        pytest.param(DeviceOutOfMemory("x"), RuntimeError, id="out-of-memory"),
        pytest.param(ModelNotReady("x"), RuntimeError, id="model-not-ready"),
        pytest.param(WorkerMisconfigured("x"), RuntimeError, id="misconfigured"),
    ],
)
def test_callers_that_catch_the_builtin_base_still_catch_it(error, also):
    assert isinstance(error, ChatQueueError) and isinstance(error, also)


FAILED = JobFailed(JobError(code="limit_exceeded", field="messages", message="too many"))


@pytest.mark.parametrize(
    ("error", "ends_as", "code"),
    [
        pytest.param(FAILED, JobFailed, "limit_exceeded", id="job-failed-as-it-is"),
        pytest.param(DeviceOutOfMemory("needs 9 GiB"), JobFailed, "out_of_memory",
                     id="out-of-memory-fails"),
        pytest.param(EngineStopped("stopping"), JobInterrupted, None, id="engine-stopped-requeues"),
        pytest.param(JobInterrupted("drain"), JobInterrupted, None, id="interrupted-requeues"),
        pytest.param(redis.ConnectionError("gone"), JobInterrupted, None, id="redis-gone-requeues"),
        pytest.param(redis.TimeoutError("slow"), JobInterrupted, None, id="redis-timeout-requeues"),
        pytest.param(ValueError("bug"), None, None, id="a-bug-is-internal"),
        pytest.param(ModelNotReady("x"), None, None, id="start-time-error-is-internal"),
    ],
)
def test_settle_maps_each_error_by_its_class(error, ends_as, code):
    settled = settle(error)
    if ends_as is None:
        assert settled is None
        return
    assert isinstance(settled, ends_as)
    if code is not None:
        assert isinstance(settled, JobFailed) and settled.error.code == code
        assert str(error) in settled.error.message or settled is error


class Metrics:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def job_failed(self, code: str) -> None:
        self.failed.append(code)


@pytest.mark.parametrize(
    ("error", "counted", "raised"),
    [
        pytest.param(FAILED, ["limit_exceeded"], JobFailed, id="failed"),
        pytest.param(DeviceOutOfMemory("x"), ["out_of_memory"], JobFailed, id="oom"),
        pytest.param(EngineStopped("x"), [], JobInterrupted, id="requeued-is-no-failure"),
        pytest.param(KeyError("bug"), ["internal_error"], KeyError, id="internal"),
    ],
)
def test_a_failure_is_counted_and_logged_once(error, counted, raised, caplog):
    metrics = Metrics()
    with caplog.at_level("INFO", logger="worker.outcome"):
        result = job_failed(metrics, "job-1", error)  # type: ignore[arg-type]
    assert isinstance(result, raised)
    assert metrics.failed == counted
    assert len([r for r in caplog.records if "job-1" in r.getMessage()]) == 1


def _chatqueue_modules():
    import importlib
    import pkgutil

    import gateway
    import producer
    import worker
    for package in (producer, worker, gateway):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            # worker.app configures a live worker (offline mode) on import; __main__ runs.
            if info.name == "worker.app" or info.name.endswith("__main__"):
                continue
            yield importlib.import_module(info.name)


def test_no_module_defines_an_error_outside_the_one_base():
    strays = [f"{cls.__module__}.{cls.__qualname__}" for module in _chatqueue_modules()
              for cls in error_classes(module) if not issubclass(cls, ChatQueueError)]
    assert strays == []
