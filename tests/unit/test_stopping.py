"""Stop criteria: small pure callables of (job, now)."""

from __future__ import annotations

import pytest

from worker.engine import stopping
from worker.engine.job import EngineJob, EngineRequest
from worker.pipeline.sampling import SamplingParams


def job(generated=(), *, max_new=4, stop_ids=(9,), deadline=None, cancelled=False):
    request = EngineRequest([1, 2], max_new, SamplingParams(do_sample=False),
                            frozenset(stop_ids), deadline=deadline)
    made = EngineJob(request, generated=list(generated))
    made.cancelled = cancelled
    return made


@pytest.mark.parametrize(("checks", "a_job", "now", "reason"), [
    pytest.param(stopping.INTERRUPTIONS, job(), 0.0, None, id="nothing"),
    pytest.param(stopping.INTERRUPTIONS, job(cancelled=True), 0.0, "cancelled", id="cancelled"),
    pytest.param(stopping.INTERRUPTIONS, job(deadline=5.0), 5.0, "timeout", id="deadline"),
    pytest.param(stopping.INTERRUPTIONS, job(deadline=5.0), 4.9, None, id="before-deadline"),
    pytest.param(stopping.INTERRUPTIONS, job(cancelled=True, deadline=1.0), 2.0, "cancelled",
                 id="cancel-wins"),
    pytest.param(stopping.AFTER_TOKEN, job([3]), 0.0, None, id="going-on"),
    pytest.param(stopping.AFTER_TOKEN, job([3, 9]), 0.0, "stop", id="stop-id"),
    pytest.param(stopping.AFTER_TOKEN, job([3, 4, 5, 6]), 0.0, "length", id="length"),
    pytest.param(stopping.AFTER_TOKEN, job([3, 4, 5, 9]), 0.0, "stop", id="stop-at-length"),
    pytest.param(stopping.AFTER_TOKEN, job([9, 3]), 0.0, None, id="only-the-last-token"),
])
def test_first_reason(checks, a_job, now, reason):
    assert stopping.first_reason(checks, a_job, now) == reason
