"""A job's outcome is set once: a second end of one job is dropped, quietly."""

from __future__ import annotations

import threading

import pytest

from worker.engine.job import EngineJob, EngineRequest
from worker.errors import JobInterrupted
from worker.pipeline.sampling import SamplingParams


def _job() -> EngineJob:
    return EngineJob(EngineRequest([1, 2, 3], 4, SamplingParams(do_sample=False), frozenset()))


def test_a_finish_after_a_failure_is_dropped_and_raises_nothing() -> None:
    job = _job()
    job.fail(JobInterrupted("grace period over"))
    job.finish("length")
    with pytest.raises(JobInterrupted):
        job.future.result(timeout=0)


def test_a_failure_after_a_finish_is_dropped_and_raises_nothing() -> None:
    job = _job()
    job.generated.append(7)
    job.finish("stop")
    job.fail(JobInterrupted("grace period over"))
    assert job.future.result(timeout=0).token_ids == [7]


def test_racing_threads_set_one_outcome_and_neither_raises() -> None:
    for _ in range(200):
        job, errors = _job(), []
        start = threading.Barrier(2)

        def end(action, errors=errors, start=start) -> None:
            start.wait()
            try:
                action()
            except Exception as exc:  # the race this guards against raised InvalidStateError
                errors.append(exc)

        threads = [threading.Thread(target=end, args=(lambda job=job: job.finish("length"),)),
                   threading.Thread(target=end, args=(lambda job=job: job.fail(
                       JobInterrupted("drained")),))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert job.future.done()
