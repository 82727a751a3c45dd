"""OpenAI Batch files in, results out (placeholder: grows below)."""

from __future__ import annotations


def batch_key(batch_id: str) -> str:
    """The batch record (a hash): OpenAI's lifecycle fields and the request counts."""
    return f"chatqueue:batch:{batch_id}"


def batch_cancel_key(batch_id: str) -> str:
    """Set when the batch is cancelled: its lines not yet started never start."""
    return f"chatqueue:batch:{batch_id}:cancel"
