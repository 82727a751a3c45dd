#!/usr/bin/env bash
# The walk-through: a local redis-server, a worker holding the demo model (SmolLM2-135M-Instruct,
# offline, from a pip package), one chat job through the producer, the structured result.
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=models/HuggingFaceTB--SmolLM2-135M-Instruct
PROMPT=${1:-"What is the capital of France? Answer in one sentence."}

.venv/bin/chatqueue-worker build-model demo --out "$MODEL_DIR"

workdir=$(mktemp -d)
port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
cleanup() {
  [ -n "${worker_pid:-}" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
  [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
  rm -rf "$workdir"
}
trap cleanup EXIT

redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$workdir" \
  >"$workdir/redis.log" 2>&1 &
redis_pid=$!

export CHATQUEUE_BROKER_URL="redis://127.0.0.1:$port/0"
export CHATQUEUE_MODEL_DIR="$MODEL_DIR"
echo "== starting a worker (log: $workdir/worker.log)"
.venv/bin/chatqueue-worker run --concurrency 4 >"$workdir/worker.log" 2>&1 &
worker_pid=$!

# The job waits in Redis until the worker has loaded the model and starts consuming.
echo "== submitting: $PROMPT"
if ! .venv/bin/chatqueue submit "$PROMPT" --greedy --max-new-tokens 64 --timeout 300; then
  echo "== the job failed; the worker's log:" >&2
  tail -n 40 "$workdir/worker.log" >&2
  exit 1
fi
