"""One relay per worker: every running job's stream events and progress, written as the engine
steps.

The engine thread only takes note after each step (`Engine.on_step` sets an event); the relay's
own thread then reads each followed job's new tokens (`EngineJob.generated`), turns them into
stream events (the thinking/content split, stop strings held back) and its progress, and writes
what every job has to write in one Redis pipeline. If Redis is slow the relay falls behind and
its next write carries several steps; the engine never waits for it. A task slot only waits for
its job's end (`Followed.written`).

The stream is a live view; the stored result is the record. So a failed write never fails a
job: its events wait here, in order, and go out once Redis is back (an ended job's for at most
`flush_timeout_s`). Writes are fenced by each job's lease (`worker/lease.py`): a run that lost
its lease writes nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.schemas import Progress, StreamEvent
from worker.control import JobControl, ProgressWrite
from worker.engine import EngineJob
from worker.lease import Lease
from worker.pipeline.reasoning import Part, StreamSplitter, ThinkTokens
from worker.pipeline.stop import StopStringFilter

log = logging.getLogger(__name__)

# A job's progress as stored: (its key, the encoded PROGRESS state, its TTL in seconds).
ProgressEncoder = Callable[[Progress], ProgressWrite]


@dataclass(eq=False)
class Followed:
    """One job the relay follows, and what it has not written yet."""

    job_id: str
    job: EngineJob
    splitter: StreamSplitter
    stops: StopStringFilter
    lease: Lease | None
    streamed: bool
    encode_progress: ProgressEncoder | None
    pending: list[StreamEvent] = field(default_factory=list)
    # The pick time of the oldest token whose text is in `pending` (or held back): written with
    # the events as `t`, so a reader can tell how live its stream is.
    oldest_pick: float | None = None
    restart: bool = True  # the first write clears what an earlier run of the job streamed
    taken: int = 0  # tokens of job.generated turned into events
    progress: Progress | None = None  # the latest progress, not yet written
    progress_written_at: float = 0.0
    progress_phase: str | None = None
    ended_at: float | None = None  # when its end was seen (the end events queued)
    written: threading.Event = field(default_factory=threading.Event)  # all written or given up

    @property
    def lost(self) -> bool:
        return self.lease is not None and self.lease.lost.is_set()


class Relay:
    def __init__(self, control: JobControl | None, tokenizer: Any, think: ThinkTokens, *,
                 progress_interval_s: float = 0.25, retry_s: float = 0.5,
                 flush_timeout_s: float = 10.0) -> None:
        self.control = control
        self.tokenizer = tokenizer
        self.think = think
        self.progress_interval_s = progress_interval_s
        self.retry_s = retry_s
        self.flush_timeout_s = flush_timeout_s
        self._jobs: dict[int, Followed] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._retry_at = 0.0
        self.writes = 0  # pipelines executed (read by tests)
        self._thread = threading.Thread(target=self._run, name="chatqueue-relay", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        """Something to relay (the engine stepped): cheap, callable from any thread."""
        self._wake.set()

    def follow(self, job_id: str, job: EngineJob, *, prompt_opened_thinking: bool,
               stops: tuple[str, ...] = (), lease: Lease | None = None, streamed: bool = True,
               encode_progress: ProgressEncoder | None = None) -> Followed:
        """Relay `job` from its start; `written` is set once its end is written (or given up)."""
        followed = Followed(
            job_id, job,
            StreamSplitter(self.tokenizer, self.think,
                           prompt_opened_thinking=prompt_opened_thinking),
            StopStringFilter(stops), lease, streamed and self.control is not None,
            encode_progress if self.control is not None else None)
        if followed.streamed:
            followed.pending.append(StreamEvent(type="start"))
        with self._lock:
            self._jobs[id(followed)] = followed
        job.future.add_done_callback(lambda _: self._wake.set())
        self._wake.set()
        return followed

    # --- the relay thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.retry_s)
            self._wake.clear()  # before reading: a step after this wakes the next round
            try:
                self.relay_once()
            except Exception:  # a bug must not end every stream of the worker
                log.exception("relay round failed")
                time.sleep(self.retry_s)

    def relay_once(self, now: float | None = None) -> None:
        """One round: every followed job's news, written in one pipeline."""
        now = time.monotonic() if now is None else now
        with self._lock:
            followed = list(self._jobs.values())
        for one in followed:
            self._collect(one, now)
        due = [one for one in followed if not one.lost and (one.pending or self._progress_due(
            one, now))]
        if due and (not self._failing or now >= self._retry_at):
            self._write(due, now)
        for one in followed:
            if one.ended_at is None:
                continue
            if one.lost or not one.pending:
                self._done(one)
            elif now - one.ended_at >= self.flush_timeout_s:
                log.warning("job %s: %d stream event(s) not written; the result has the full "
                            "text", one.job_id, len(one.pending))
                self._done(one)

    def _collect(self, one: Followed, now: float) -> None:
        if one.ended_at is not None:
            return
        job = one.job
        done = job.future.done()  # read before the tokens: none can follow a done
        count = len(job.generated)
        if count > one.taken:
            if one.oldest_pick is None:
                one.oldest_pick = job.picked_at[one.taken]
            pieces = one.splitter.feed(job.generated[one.taken:count])
            one.taken = count
            if one.streamed:
                self._queue(one, pieces, final=False)
            phase = "thinking" if one.splitter.part == "thinking" else "answering"
            one.progress = Progress(phase=phase, tokens=count)
        if done:
            if job.future.exception() is None and one.streamed:
                self._queue(one, one.splitter.finish(), final=True)
                reason = job.future.result().finish_reason
                one.pending.append(StreamEvent(type="end", finish_reason=reason))
            one.progress = None
            one.ended_at = now

    def _queue(self, one: Followed, pieces: list[tuple[Part, str]], *, final: bool) -> None:
        for part, text in pieces:
            if part == "content":
                text = one.stops.feed(text)
            if text:
                one.pending.append(StreamEvent(type=part, text=text))
        if final and (tail := one.stops.finish()):
            one.pending.append(StreamEvent(type="content", text=tail))

    def _progress_due(self, one: Followed, now: float) -> bool:
        if one.progress is None or one.encode_progress is None:
            return False
        return (one.progress.phase != one.progress_phase
                or now - one.progress_written_at >= self.progress_interval_s)

    def _write(self, due: list[Followed], now: float) -> None:
        assert self.control is not None
        # One MULTI/EXEC: readers blocked on the streams are served once the whole round is
        # written, not after the first job's command -- a reader of many streams (the gateway's
        # one XREAD for all of them) gets the round in one reply on Redis >= 7.2 (an unblocked
        # XREAD is re-run over all its keys), in two on 7.0; never part of a round that Redis
        # read in parts. The commands still succeed or fail one by one (no rollback in Redis).
        pipe = self.control.redis.pipeline(transaction=True)
        sent: list[tuple[Followed, list[StreamEvent], Progress | None]] = []
        for one in due:
            progress = one.progress if self._progress_due(one, now) else None
            write = one.encode_progress(progress) if progress and one.encode_progress else None
            events = list(one.pending)
            self.control.queue_publish(pipe, one.job_id, events, restart=one.restart and
                                       one.streamed, lease=one.lease, progress=write,
                                       picked_at=one.oldest_pick)
            sent.append((one, events, progress))
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("streams paused, Redis unreachable (%s); the jobs go on", exc)
            self._failing, self._retry_at = True, now + self.retry_s
            return
        self.writes += 1
        if self._failing:
            log.info("streams resumed")
            self._failing = False
        for (one, events, progress), reply in zip(sent, self._replies(replies, sent),
                                                   strict=True):
            if isinstance(reply, Exception):
                log.warning("job %s: stream write failed (%s); retrying", one.job_id, reply)
                self._failing, self._retry_at = True, now + self.retry_s
                continue
            if reply is False:  # another run holds the lease: the stream is its now
                if one.lease is not None:
                    one.lease.mark_lost()
                one.pending = []
                continue
            del one.pending[:len(events)]
            if events:
                one.restart = False
            if any(event.text for event in events) and not one.pending:
                one.oldest_pick = None
            if progress is not None:
                one.progress_written_at, one.progress_phase = now, progress.phase

    @staticmethod
    def _replies(replies: list[Any], sent: list[Any]) -> list[Any]:
        """One reply per job (an unfenced job's write is several commands; the last tells)."""
        if len(replies) == len(sent):
            return [reply if isinstance(reply, Exception) else bool(reply) for reply in replies]
        raise RuntimeError("pipeline replies do not match the jobs written")

    def _done(self, one: Followed) -> None:
        with self._lock:
            self._jobs.pop(id(one), None)
        one.written.set()

    def forget(self, one: Followed) -> None:
        """The task slot is leaving without waiting (e.g. it raised): stop relaying the job."""
        self._done(one)
