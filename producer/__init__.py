"""chatqueue producer: the job contract and a thin client. Imports no torch or transformers."""

from producer.aio import AsyncChatQueueClient
from producer.aio_batches import AsyncBatchClient
from producer.batches import BatchClient
from producer.client import ChatQueueClient, parse_request
from producer.errors import ChatQueueError, JobFailed, JobIdConflict, JobNotFound
from producer.schemas import ChatMessage, ChatRequest, ChatResult, GenerationParams, JobError
from producer.settings import ProducerSettings

__all__ = [
    "AsyncBatchClient",
    "AsyncChatQueueClient",
    "BatchClient",
    "ChatMessage",
    "ChatQueueClient",
    "ChatQueueError",
    "ChatRequest",
    "ChatResult",
    "GenerationParams",
    "JobError",
    "JobFailed",
    "JobIdConflict",
    "JobNotFound",
    "ProducerSettings",
    "parse_request",
]
