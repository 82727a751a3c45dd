"""`chatqueue`: submit a chat job and print its result, or fetch a result by job id; run
OpenAI Batch files (`chatqueue batch ...`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from typing import Any

from pydantic import ValidationError

from producer.batches import DEFAULT_WINDOW, BatchClient
from producer.client import ChatQueueClient
from producer.errors import JobFailed, JobIdConflict, JobNotFound
from producer.schemas import (
    BATCH_PRIORITY,
    DEFAULT_PRIORITY,
    ChatRequest,
    JobError,
    error_from_validation,
)
from producer.settings import ProducerSettings

EXIT_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatqueue", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit a prompt and print the result")
    submit.add_argument("prompt")
    submit.add_argument("--system", help="a system prompt")
    submit.add_argument("--no-thinking", action="store_true", help="enable_thinking=False")
    submit.add_argument("--max-new-tokens", type=int)
    submit.add_argument("--greedy", action="store_true", help="do_sample=False")
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--job-id")
    submit.add_argument("--timeout-s", type=float, help="the job's own deadline (params.timeout_s)")
    submit.add_argument("--max-thinking-tokens", type=int)
    submit.add_argument("--stop", action="append",
                        help="a stop string (repeat for up to 4): the answer ends before it")
    submit.add_argument("--priority", type=int, help="0-9, higher runs first (default 5)")
    submit.add_argument("--stream", action="store_true",
                        help="print the text live as it is written")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--timeout", type=float, help="seconds to wait for the result")

    result = commands.add_parser("result", help="wait for a job's result and print it")
    result.add_argument("job_id")
    result.add_argument("--timeout", type=float)

    stream = commands.add_parser("stream", help="print a job's text live, then its result")
    stream.add_argument("job_id")
    stream.add_argument("--timeout", type=float)

    cancel = commands.add_parser(
        "cancel", help="cancel a queued or running job (exit 4: no such job, or it expired)")
    cancel.add_argument("job_id")
    add_batch_commands(commands)
    return parser


def add_batch_commands(commands: Any) -> None:
    batch = commands.add_parser("batch", help="OpenAI Batch JSONL files: submit, follow, "
                                "fetch results, cancel, list")
    sub = batch.add_subparsers(dest="batch_command", required=True)
    submit = sub.add_parser("submit", help="queue every line of a Batch JSONL file; prints the "
                            "batch id (the same file again resumes the same batch)")
    submit.add_argument("file")
    submit.add_argument("--window", default=DEFAULT_WINDOW,
                        help="completion window: 24h (default), 90m, 2d, 3600s ...")
    submit.add_argument("--priority", type=int, default=BATCH_PRIORITY,
                        help=f"0-9, higher runs first (default {BATCH_PRIORITY}, below "
                             f"interactive jobs' {DEFAULT_PRIORITY})")
    submit.add_argument("--id", dest="batch_id",
                        help="the batch's id (default: from the file's content)")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--stream", action="store_true",
                        help="keep each line's token stream in Redis (off: results only)")
    status = sub.add_parser("status", help="the batch object (with --wait: a progress line "
                            "until it ends)")
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true")
    status.add_argument("--timeout", type=float)
    results = sub.add_parser("results", help="write the output (and error) JSONL")
    results.add_argument("batch_id")
    results.add_argument("-o", "--output", required=True)
    results.add_argument("--errors", help="error lines go here (default: into --output too)")
    cancel = sub.add_parser("cancel", help="cancel a batch: queued lines never start")
    cancel.add_argument("batch_id")
    sub.add_parser("list", help="recent batches, newest first")


def batch_main(args: argparse.Namespace, client: ChatQueueClient) -> int:
    batches = BatchClient(client)
    try:
        if args.batch_command == "submit":
            metadata = dict(item.split("=", 1) for item in args.metadata)
            report = batches.submit(args.file, window=args.window, priority=args.priority,
                                    batch_id=args.batch_id, metadata=metadata,
                                    stream=args.stream)
            print(json.dumps({"id": report.batch_id, "lines": report.lines,
                              "refused": report.refused, "resumed": not report.created}))
            return 0
        if args.batch_command == "status":
            if args.wait:
                progress = ProgressLine()
                batch = batches.wait(args.batch_id, timeout=args.timeout,
                                     on_progress=progress.show)
                progress.close()
            else:
                batch = batches.status(args.batch_id)
            print(json.dumps(batch, indent=2))
            return 0 if batch["status"] != "failed" else EXIT_FAILED
        if args.batch_command == "results":
            counts = write_results(batches, args.batch_id, args.output, args.errors)
            print(json.dumps({"id": args.batch_id, **counts}))
            return 0
        if args.batch_command == "cancel":
            print(json.dumps(batches.cancel(args.batch_id), indent=2))
            return 0
        for batch in batches.list():
            counts = batch["request_counts"]
            print(f"{batch['id']}  {batch['status']:<11} {counts['completed']}+"
                  f"{counts['failed']}/{counts['total']}  {batch['input_file_id']}")
        return 0
    except LookupError as exc:
        print(json.dumps({"id": args.batch_id, "error": str(exc)}), file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OSError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError as exc:
        print(json.dumps({"id": args.batch_id, "error": str(exc)}), file=sys.stderr)
        return EXIT_TIMEOUT


def write_results(batches: BatchClient, batch_id: str, output: str,
                  errors: str | None) -> dict[str, int]:
    """Output lines to `output`, error lines to `errors` (or `output`), in the input's order."""
    counts = {"output": 0, "error": 0}
    with open(output, "w", encoding="utf-8") as out, \
            (open(errors, "w", encoding="utf-8") if errors else nullcontext(out)) as err:
        for kind, line in batches.results(batch_id):
            (out if kind == "output" else err).write(json.dumps(line, ensure_ascii=False) + "\n")
            counts[kind] += 1
    return counts


class ProgressLine:
    """One line on stderr, rewritten: status, counts, rate and ETA."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_done: int | None = None

    def show(self, batch: dict[str, Any]) -> None:
        counts = batch["request_counts"]
        done, total = counts["completed"] + counts["failed"], counts["total"]
        if self.first_done is None:
            self.first_done = done
        elapsed = time.monotonic() - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 and total > done else "-"
        width = 30
        filled = int(width * done / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        print(f"\r{batch['status']:<11} [{bar}] {done}/{total} ({counts['failed']} failed) "
              f"{rate:.1f}/s ETA {eta}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def request_from_args(args: argparse.Namespace) -> ChatRequest:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    params = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
        "enable_thinking": not args.no_thinking,
        "do_sample": False if args.greedy else None,
        "timeout_s": args.timeout_s, "max_thinking_tokens": args.max_thinking_tokens,
        "stop": args.stop,
    }
    request: dict[str, Any] = {
        "messages": messages, "job_id": args.job_id,
        "params": {key: value for key, value in params.items() if value is not None},
    }
    if args.priority is not None:
        request["priority"] = args.priority
    return ChatRequest.model_validate(request)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with ChatQueueClient(ProducerSettings()) as client:
        if args.command == "batch":
            return batch_main(args, client)
        if args.command == "cancel":
            try:
                client.cancel(args.job_id)
            except JobNotFound as exc:
                print(json.dumps({"job_id": args.job_id, "error": str(exc)}), file=sys.stderr)
                return EXIT_NOT_FOUND
            print(json.dumps({"job_id": args.job_id, "cancel": "requested"}))
            return 0
        if args.command == "submit":
            try:
                request = request_from_args(args)
            except ValidationError as exc:
                return _print_error(error_from_validation(exc))
            try:
                job_id = client.submit(request)
            except JobIdConflict as exc:
                print(json.dumps({"job_id": exc.job_id, "error": str(exc)}), file=sys.stderr)
                return EXIT_CONFLICT
            if args.no_wait:
                print(json.dumps({"job_id": job_id}))
                return 0
        else:
            job_id = args.job_id
        try:
            if args.command == "stream" or getattr(args, "stream", False):
                print_stream(client, job_id, args.timeout)
            result = client.result(job_id, timeout=args.timeout)
        except JobFailed as exc:
            return _print_error(exc.error)
        except TimeoutError as exc:
            print(json.dumps({"job_id": job_id, "error": str(exc)}), file=sys.stderr)
            return EXIT_TIMEOUT
        except JobNotFound as exc:
            print(json.dumps({"job_id": job_id, "error": str(exc)}), file=sys.stderr)
            return EXIT_NOT_FOUND
        print(result.model_dump_json(indent=2))
        return 0


def print_stream(client: ChatQueueClient, job_id: str, timeout: float | None) -> None:
    """Thinking goes to stderr, content to stdout, so `> answer.txt` keeps only the answer."""
    current = None
    for event in client.stream(job_id, timeout=timeout):
        if event.type == "start" and current is not None:
            print("\n[the job restarted]", file=sys.stderr)
        if event.type in ("thinking", "content"):
            if event.type != current:
                print(f"\n[{event.type}]", file=sys.stderr, flush=True)
                current = event.type
            sink = sys.stderr if event.type == "thinking" else sys.stdout
            print(event.text, end="", file=sink, flush=True)
    print(file=sys.stderr)


def _print_error(error: JobError) -> int:
    print(json.dumps({"error": error.model_dump()}, indent=2))
    return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
