"""Prompts and generated text stay in the result and the stream: out of logs and Flower.

Celery puts a task's content in several places a log shipper or a Flower login can read: the
INFO line "Task ... succeeded in ...s: <the result>", the "raised expected: <error>" line, the
DEBUG line "TaskPool: Apply ... (args: <the raw message>)", the body dumps of messages it
refuses, and the task events Flower shows (args/kwargs on task-received, the result on
task-succeeded, the exception and traceback on task-failed). Unless CHATQUEUE_LOG_CONTENT is
on (a debug setting), each is replaced by a placeholder here; the job id, the task name, timings
and the error code stay.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import consumer as celery_consumer

from producer.errors import JobFailed

REDACTED = "<redacted: set CHATQUEUE_LOG_CONTENT=true to log content>"

_show_content = False

# Consumer messages that dump a refused message's body (and its headers, which carry the
# sender's argsrepr/kwargsrepr): every argument but the first (the exception) is content.
_BODY_DUMPS = {celery_consumer.UNKNOWN_FORMAT, celery_consumer.UNKNOWN_TASK_ERROR,
               celery_consumer.INVALID_TASK_ERROR}
_LOGGERS = ("celery.app.trace", "celery.pool", "celery.worker.consumer.consumer")


def show_content() -> bool:
    return _show_content


def describe_failure(failed: JobFailed) -> str:
    """A failed job for the log: its code, field and limit; the message (which quotes the value
    given, maybe part of the prompt) only when content may be logged."""
    if _show_content:
        return str(failed)
    error = failed.error
    where = f" field={error.field}" if error.field else ""
    limit = f" limit={error.limit}" if error.limit is not None else ""
    return f"{error.code}{where}{limit}"


class ContentFilter(logging.Filter):
    """Replaces content in Celery's own log records (see the module's doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "celery.pool" and str(record.msg).startswith("TaskPool: Apply"):
            if isinstance(record.args, tuple) and record.args:
                record.args = (record.args[0], *[REDACTED] * (len(record.args) - 1))
        elif record.name == "celery.app.trace" and isinstance(record.args, dict):
            context = dict(record.args)
            for key in ("return_value", "args", "kwargs"):
                if key in context:
                    context[key] = REDACTED
            if "exc" in context:
                # JobFailed reads "<code>: <message>"; the message may quote the request.
                context["exc"] = str(context["exc"]).split(":", 1)[0] + ": " + REDACTED
            record.args = context
            if isinstance(getattr(record, "data", None), dict):
                record.data = context
        elif record.msg in _BODY_DUMPS and isinstance(record.args, tuple):
            record.args = (record.args[0], *[REDACTED] * (len(record.args) - 1)) \
                if record.msg != celery_consumer.UNKNOWN_FORMAT else (REDACTED,)
        return True


_filter = ContentFilter()


def install(show: bool) -> None:
    """Redact Celery's logs in this process unless `show` (CHATQUEUE_LOG_CONTENT)."""
    global _show_content
    _show_content = show
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if show:
            logger.removeFilter(_filter)
        elif _filter not in logger.filters:
            logger.addFilter(_filter)


def redact_event(event_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A task event's fields as Flower and any event consumer will see them."""
    if _show_content:
        return fields
    fields = dict(fields)
    for key in ("args", "kwargs", "result", "traceback"):
        if key in fields:
            fields[key] = REDACTED
    if event_type == "task-failed" and "exception" in fields:
        fields["exception"] = str(fields["exception"]).split("(", 1)[0] + "(" + REDACTED + ")"
    return fields
