"""The worker's one relay: every running job's stream events and progress, written as the
engine steps, in one pipeline per round, fenced by each job's lease; nothing here is timed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from producer.schemas import Progress, StreamEvent
from worker.control import ProgressWrite
from worker.engine import EngineJob, EngineRequest
from worker.lease import Lease
from worker.pipeline.reasoning import ThinkTokens
from worker.pipeline.sampling import SamplingParams
from worker.relay import Relay

OPEN, CLOSE = 1, 2
THINK = ThinkTokens(open_id=OPEN, close_id=CLOSE)


class CharTokenizer:
    """Token id n >= 10 is the character chr(n); 1 and 2 are the think tags."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        tags = {OPEN: "<think>", CLOSE: "</think>"}
        return "".join(tags.get(i, chr(i)) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class Pipe:
    def __init__(self, control: FakeControl) -> None:
        self.control = control
        self.writes: list[dict[str, Any]] = []

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.control.pipelines += 1
        self.control.executing.set()
        self.control.release.wait()
        if self.control.failures:
            self.control.failures -= 1
            raise redis.ConnectionError("Redis is restarting")
        self.control.written.append(self.writes)
        return [0 if w["job_id"] in self.control.taken_over else 1 for w in self.writes]


class FakeControl:
    """Stands in for JobControl: records each pipeline's writes, one entry per job."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.pipelines = 0
        self.written: list[list[dict[str, Any]]] = []
        self.taken_over: set[str] = set()
        self.release = threading.Event()
        self.release.set()
        self.executing = threading.Event()
        self.redis = self

    def pipeline(self, transaction: bool = True) -> Pipe:
        return Pipe(self)

    def queue_publish(self, pipe: Pipe, job_id: str, events: list[StreamEvent], *,
                      restart: bool = False, lease: Lease | None = None,
                      progress: ProgressWrite | None = None,
                      picked_at: float | None = None) -> None:
        pipe.writes.append({"job_id": job_id, "events": list(events), "restart": restart,
                            "progress": progress, "picked_at": picked_at})

    def stream(self, job_id: str) -> list[StreamEvent]:
        return [event for pipeline in self.written for write in pipeline
                if write["job_id"] == job_id for event in write["events"]]


def engine_job() -> EngineJob:
    return EngineJob(request=EngineRequest(prompt_ids=[5], max_new_tokens=100,
                                           sampling=SamplingParams(do_sample=False),
                                           stop_ids=frozenset()))


def pick(job: EngineJob, text: str | list[int]) -> None:
    """What the engine thread does with a step's tokens."""
    for token in ids(text) if isinstance(text, str) else text:
        job.picked_at.append(1000.0 + len(job.generated))
        job.generated.append(token)


def end(job: EngineJob, reason: str = "stop") -> None:
    job.finish(reason)  # type: ignore[arg-type]


def text_of(events: list[StreamEvent], part: str) -> str:
    return "".join(event.text for event in events if event.type == part)


def encoder(job_id: str):
    return lambda progress: ProgressWrite(f"meta-{job_id}", progress.model_dump_json(), 60)


def test_every_jobs_news_of_a_step_goes_out_in_one_pipeline():
    control = FakeControl()
    relay = Relay(control, CharTokenizer(), THINK)  # type: ignore[arg-type]
    jobs = {f"job-{i}": engine_job() for i in range(5)}
    followed = {job_id: relay.follow(job_id, job, prompt_opened_thinking=False,
                                     encode_progress=encoder(job_id))
                for job_id, job in jobs.items()}
    relay.relay_once(now=0.0)
    assert control.pipelines == 1  # the five starts, together
    assert [w["restart"] for w in control.written[0]] == [True] * 5
    for step, text in enumerate(["He", "llo", " world"], start=1):
        for job in jobs.values():
            pick(job, text)
        relay.relay_once(now=float(step))
        assert control.pipelines == step + 1  # one pipeline per step, all five jobs in it
        (pipeline,) = control.written[-1:]
        assert sorted(w["job_id"] for w in pipeline) == sorted(jobs)
        assert all(not w["restart"] for w in pipeline)
        assert all(w["progress"] is not None for w in pipeline)  # 1 s apart: each due
    for job in jobs.values():
        end(job)
    relay.relay_once(now=10.0)
    assert control.pipelines == 5
    for job_id in jobs:
        events = control.stream(job_id)
        assert [e.type for e in events] == ["start", "content", "content", "content", "end"]
        assert text_of(events, "content") == "Hello world"
        assert events[-1].finish_reason == "stop"
        assert followed[job_id].written.is_set()
    relay.relay_once(now=11.0)
    assert control.pipelines == 5  # nothing left to follow: nothing written


def test_progress_is_written_with_the_stream_at_most_once_per_interval_and_on_a_phase_change():
    control = FakeControl()
    relay = Relay(control, CharTokenizer(), THINK, progress_interval_s=0.25)  # type: ignore[arg-type]
    job = engine_job()
    relay.follow("job-p", job, prompt_opened_thinking=False, encode_progress=encoder("job-p"))
    progress = []
    for now, text in [(0.0, [OPEN]), (0.1, "ab"), (0.2, "c"), (0.3, "d"), (0.35, [CLOSE])]:
        pick(job, text)
        relay.relay_once(now=now)
        write = control.written[-1][0]
        if write["progress"] is not None:
            progress.append(Progress.model_validate_json(write["progress"].value))
    assert progress == [Progress(phase="thinking", tokens=1), Progress(phase="thinking", tokens=5),
                        Progress(phase="answering", tokens=6)]


def test_the_prompts_opened_think_block_and_a_stop_string_never_leak():
    control = FakeControl()
    relay = Relay(control, CharTokenizer(), THINK)  # type: ignore[arg-type]
    job = engine_job()
    relay.follow("job-s", job, prompt_opened_thinking=True, stops=("END",))
    for now, text in enumerate(["hmm", [CLOSE], "\n\nAnswer E", "N", "D more"]):
        pick(job, text)
        relay.relay_once(now=float(now))
        assert "E" not in text_of(control.stream("job-s"), "content")  # held back until known
    end(job)
    relay.relay_once(now=9.0)
    events = control.stream("job-s")
    assert text_of(events, "thinking") == "hmm"
    assert text_of(events, "content") == "Answer "


def test_a_slow_redis_never_blocks_the_engine_and_the_next_write_catches_up():
    control = FakeControl()
    control.release.clear()  # Redis hangs in the first write
    relay = Relay(control, CharTokenizer(), THINK).start()  # type: ignore[arg-type]
    try:
        job = engine_job()
        followed = relay.follow("job-slow", job, prompt_opened_thinking=False)
        assert control.executing.wait(10)
        for text in "abcdef":  # the engine goes on stepping and telling the relay
            pick(job, text)
            relay.wake()
        assert control.pipelines == 1 and not control.written  # still in the first write
        end(job, "length")
        control.release.set()
        assert followed.written.wait(10)
        assert control.pipelines <= 3  # the six steps went out together
        events = control.stream("job-slow")
        assert text_of(events, "content") == "abcdef" and events[-1].type == "end"
    finally:
        control.release.set()
        relay.stop()


def test_events_wait_for_redis_in_order_and_the_restart_is_kept():
    control = FakeControl(failures=2)
    relay = Relay(control, CharTokenizer(), THINK, retry_s=0.5)  # type: ignore[arg-type]
    job = engine_job()
    followed = relay.follow("job-r", job, prompt_opened_thinking=False)
    pick(job, "ab")
    relay.relay_once(now=0.0)  # fails
    pick(job, "c")
    relay.relay_once(now=0.1)  # not retried before retry_s
    assert control.pipelines == 1
    relay.relay_once(now=0.6)  # fails again
    end(job)
    relay.relay_once(now=1.2)
    assert followed.written.is_set()
    (pipeline,) = control.written
    assert pipeline[0]["restart"] is True
    assert [e.type for e in pipeline[0]["events"]] == ["start", "content", "content", "end"]
    assert text_of(pipeline[0]["events"], "content") == "abc"


def test_an_ended_job_gives_up_its_stream_after_the_flush_timeout():
    control = FakeControl(failures=1000)
    relay = Relay(control, CharTokenizer(), THINK, flush_timeout_s=10)  # type: ignore[arg-type]
    job = engine_job()
    followed = relay.follow("job-x", job, prompt_opened_thinking=False)
    end(job)
    relay.relay_once(now=0.0)
    relay.relay_once(now=5.0)
    assert not followed.written.is_set()  # still waiting for Redis
    relay.relay_once(now=10.0)
    assert followed.written.is_set()


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "batch-line-unstreamed"])
def test_a_run_that_lost_its_lease_writes_nothing_more(streamed):
    control = FakeControl()
    relay = Relay(control, CharTokenizer(), THINK)  # type: ignore[arg-type]
    job, lease = engine_job(), Lease("job-l", "token", 1000)
    lease.on_lost(job.cancel)
    followed = relay.follow("job-l", job, prompt_opened_thinking=False, lease=lease,
                            streamed=streamed, encode_progress=encoder("job-l"))
    pick(job, "a")
    relay.relay_once(now=0.0)
    control.taken_over.add("job-l")  # another run took the lease
    pick(job, "b")
    relay.relay_once(now=1.0)
    assert lease.lost.is_set() and job.cancelled
    written = control.pipelines
    pick(job, "c")
    end(job, "cancelled")
    relay.relay_once(now=2.0)
    assert control.pipelines == written and followed.written.is_set()
    assert all(not w["events"] for w in control.written[0]) or streamed
