"""A batch's ids and Redis keys, and its completion window (pure: no I/O).

Keys (all under `chatqueue:batch:<id>`, living for the window plus result_ttl_s):
  <id>          hash: the record (lifecycle timestamps, window, counts completed/failed, total)
  <id>:lines    hash: line index -> custom_id (the input's order; a resumed submission rewrites
                the same fields)
  <id>:ids      hash: custom_id -> line index (a custom_id seen twice fails its second line)
  <id>:errors   hash: line index -> error line of a line refused before it was queued
  <id>:cancel   set once the batch is cancelled: its lines not yet started never start

The worker imports these (worker/result_store.py, worker/control.py, worker/service.py): one
spelling of every key on both sides.
"""

from __future__ import annotations

import hashlib
import re
import uuid

ENDPOINT = "/v1/chat/completions"
DEFAULT_WINDOW = "24h"
BATCH_PREFIX = "batch_"
LINE_SEP = "."  # line job id = <batch id>.<digest of custom_id>
BATCHES_KEY = "chatqueue:batches"  # sorted set: batch id -> created_at
MAX_CUSTOM_ID_CHARS = 512
_BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}

def batch_key(batch_id: str) -> str:
    """The batch record (a hash): OpenAI's lifecycle fields and the request counts."""
    return f"chatqueue:batch:{batch_id}"


def batch_lines_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:lines"


def batch_ids_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:ids"


def batch_errors_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:errors"


def batch_cancel_key(batch_id: str) -> str:
    """Set when the batch is cancelled: its lines not yet started never start."""
    return f"chatqueue:batch:{batch_id}:cancel"


def valid_batch_id(batch_id: str) -> bool:
    return bool(_BATCH_ID.fullmatch(batch_id))


def batch_id_for_digest(digest: str) -> str:
    """A file's batch id: its content's digest, so submitting the same file again resumes it."""
    return f"{BATCH_PREFIX}{digest[:32]}"


def line_job_id(batch_id: str, custom_id: str) -> str:
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{batch_id}{LINE_SEP}{digest}"


def batch_of_job(job_id: str) -> str | None:
    """The batch a line's job id belongs to, or None for a job of no batch."""
    if not job_id.startswith(BATCH_PREFIX):
        return None
    batch_id, sep, _ = job_id.rpartition(LINE_SEP)
    return batch_id if sep and valid_batch_id(batch_id) else None


def parse_window(text: str) -> float:
    """A completion window as seconds: "24h", "90m", "2d", "3600s" or "3600"."""
    match = _WINDOW.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"completion window {text!r}: expected a positive duration such as "
                         "24h, 90m, 2d or 3600s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def new_batch_id() -> str:
    return f"{BATCH_PREFIX}{uuid.uuid4().hex}"
