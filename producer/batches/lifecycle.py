"""OpenAI's Batch object and its lifecycle, read from a stored record (pure: no I/O)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from producer.batches.ids import DEFAULT_WINDOW, ENDPOINT
from producer.schemas import BATCH_PRIORITY

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                 "cancelling", "cancelled"]

def batch_status(record: Mapping[str, str], now: float) -> Status:
    """OpenAI's lifecycle from the stored record: derived when read, so no process has to be
    alive to move a batch on (an expired batch reads expired without any worker)."""
    if record.get("failed_at"):
        return "failed"
    done = int(record.get("completed", 0)) + int(record.get("failed", 0))
    total = int(record["total"]) if record.get("total") else None
    finished = total is not None and done >= total
    if record.get("cancelling_at"):
        return "cancelled" if finished else "cancelling"
    if finished:
        return "completed"
    if now >= float(record.get("expires_at", "inf")):
        return "expired"
    return "in_progress" if record.get("in_progress_at") else "validating"


def lines_known(record: Mapping[str, str]) -> int:
    """How many lines a batch's results may cover: its total once submitted, else the lines
    its submission has reached so far."""
    return int(record.get("total") or record.get("seen") or 0)


def batch_object(record: Mapping[str, str], now: float) -> dict[str, Any]:
    """OpenAI's Batch object (its fields, with chatqueue's `priority` and `pending` added)."""
    status = batch_status(record, now)
    completed, failed = int(record.get("completed", 0)), int(record.get("failed", 0))
    total = int(record["total"]) if record.get("total") else int(record.get("seen", 0))

    def at(name: str) -> int | None:
        value = record.get(name)
        return int(float(value)) if value else None

    finished_at = at("finished_at")
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": ENDPOINT,
        "errors": None,
        "input_file_id": record.get("input_file", ""),
        "completion_window": record.get("completion_window", DEFAULT_WINDOW),
        "status": status,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": at("created_at"),
        "in_progress_at": at("in_progress_at"),
        "expires_at": at("expires_at"),
        "finalizing_at": finished_at if status in ("completed",) else None,
        "completed_at": finished_at if status == "completed" else None,
        "failed_at": at("failed_at"),
        "expired_at": at("expires_at") if status == "expired" else None,
        "cancelling_at": at("cancelling_at"),
        "cancelled_at": finished_at if status == "cancelled" else None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
        "priority": int(record.get("priority", BATCH_PRIORITY)),
        "submitted": bool(record.get("total")),
    }
