"""OpenAI Batch files in, results out: a file of chat requests run as one batch of jobs.

One concept per module, so that the blocking CLI, the Python API, the asyncio client and the
gateway share one logic:

- `ids`: batch and line job ids, Redis keys, completion windows (pure);
- `lines`: a JSONL line -> `InputLine` / the contract's `ChatRequest`, or a 400-shaped
  `LineError` naming the field (`parse_line`, `read_line` with the byte limit, `map_body`) (pure);
- `outputs`: a result or error -> an output / error line (`completion_body`, `output_line`,
  `error_line`, `line_from_meta`, `line_outcome`) (pure);
- `lifecycle`: a stored record -> OpenAI's Batch object (`batch_status`, `batch_object`) (pure);
- `plan`: a chunk of read lines -> the jobs to publish and the lines refused (`plan_chunk`) (pure);
- `store`: everything a batch keeps in Redis (`BatchStore`, `mark_finished_if_done`);
- `client`: `BatchClient`, which drives them with a `ChatQueueClient` (publishing is the
  client's);
- `metrics`: a Prometheus collector of batch progress (imported on its own: it needs
  prometheus_client, which the producer does not depend on).

A line's job id is derived from the batch id and its custom_id (`line_job_id`), and a job id
names one request (ChatQueueClient.publish): a submission killed halfway and run again queues
each line exactly once. The worker counts a line's end in the transaction that stores its
result (worker/result_store.py), so the counts are exact through crashes and redeliveries.

Every name below is importable from `producer.batches` as before the split.
"""

from producer.batches.client import SUBMIT_CHUNK, BatchClient, SubmitReport
from producer.batches.ids import (
    BATCH_PREFIX,
    BATCHES_KEY,
    DEFAULT_WINDOW,
    ENDPOINT,
    LINE_SEP,
    MAX_CUSTOM_ID_CHARS,
    batch_cancel_key,
    batch_errors_key,
    batch_id_for_digest,
    batch_ids_key,
    batch_key,
    batch_lines_key,
    batch_of_job,
    line_job_id,
    new_batch_id,
    parse_window,
    valid_batch_id,
)
from producer.batches.lifecycle import Status, batch_object, batch_status
from producer.batches.lines import (
    InputLine,
    LineError,
    check_size,
    map_body,
    parse_line,
    read_line,
)
from producer.batches.outputs import (
    FINISH_REASONS,
    Outcome,
    completion_body,
    error_line,
    line_from_meta,
    line_outcome,
    output_line,
    request_line_id,
)
from producer.batches.plan import ChunkPlan, LinePolicy, named_lines, plan_chunk
from producer.batches.store import BatchStore, mark_finished_if_done, task_meta

_FINISH = FINISH_REASONS  # the name gateway/openai_api.py imports

__all__ = [
    "BATCHES_KEY",
    "BATCH_PREFIX",
    "DEFAULT_WINDOW",
    "ENDPOINT",
    "FINISH_REASONS",
    "LINE_SEP",
    "MAX_CUSTOM_ID_CHARS",
    "SUBMIT_CHUNK",
    "BatchClient",
    "BatchStore",
    "ChunkPlan",
    "InputLine",
    "LineError",
    "LinePolicy",
    "Outcome",
    "Status",
    "SubmitReport",
    "batch_cancel_key",
    "batch_errors_key",
    "batch_id_for_digest",
    "batch_ids_key",
    "batch_key",
    "batch_lines_key",
    "batch_object",
    "batch_of_job",
    "batch_status",
    "check_size",
    "completion_body",
    "error_line",
    "line_from_meta",
    "line_job_id",
    "line_outcome",
    "map_body",
    "mark_finished_if_done",
    "named_lines",
    "new_batch_id",
    "output_line",
    "parse_line",
    "parse_window",
    "plan_chunk",
    "read_line",
    "request_line_id",
    "task_meta",
    "valid_batch_id",
]
