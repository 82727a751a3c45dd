"""The worker's errors, under producer.errors.ChatQueueError (whose docstring is the one
description of the hierarchy: what each error does to a job, and its JobError code)."""

from __future__ import annotations

from producer.errors import ChatQueueError


class JobInterrupted(ChatQueueError):
    """This worker could not finish the job, through no fault of the job (it stops, Redis went
    away, its lease went to another run): it goes back to the queue instead of ending with an
    error."""

    outcome = "requeued"


class EngineStopped(ChatQueueError, RuntimeError):
    """The engine stopped (the worker is shutting down) before the job finished: the job is
    not at fault and can run again elsewhere."""

    outcome = "requeued"


class DeviceOutOfMemory(ChatQueueError, RuntimeError):
    """The job does not fit on the device even alone."""

    outcome = "failed"
    code = "out_of_memory"


class ModelNotReady(ChatQueueError, RuntimeError):
    """The model folder is missing, incomplete or fails verification; the message says how to
    fix it. The worker exits before taking a job."""


class WorkerMisconfigured(ChatQueueError, RuntimeError):
    """A setting this worker cannot run with; the message says which."""


class NativeBuildError(ChatQueueError, RuntimeError):
    """A native kernel could not be built or loaded here (no C compiler, a failed compile, no
    private folder to build in). Never reaches a job: the engine logs it and takes its pure-torch
    path."""
