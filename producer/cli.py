"""`chatqueue`: submit a chat job and print its result, or fetch a result by job id."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from producer.client import ChatQueueClient
from producer.errors import JobFailed, JobIdConflict, JobNotFound
from producer.schemas import ChatRequest, JobError, error_from_validation
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
    return parser


def request_from_args(args: argparse.Namespace) -> ChatRequest:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    params = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
        "enable_thinking": not args.no_thinking,
        "do_sample": False if args.greedy else None,
        "timeout_s": args.timeout_s, "max_thinking_tokens": args.max_thinking_tokens,
    }
    return ChatRequest.model_validate({
        "messages": messages, "job_id": args.job_id,
        "params": {key: value for key, value in params.items() if value is not None},
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with ChatQueueClient(ProducerSettings()) as client:
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
