"""`chatqueue-worker download`: fetch a model into its folder, verify it, write its manifest."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from worker.download.failures import DownloadError
from worker.download.fetch import download_model
from worker.download.pins import pin_mismatches
from worker.manifest import Manifest, ModelNotReady, manifest_digest, verify_model_dir
from worker.settings import WorkerSettings, is_commit_id


def _sha256(value: str) -> str:
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"a sha256 is 64 hex digits, got {value!r}")
    return digest


def _parser(settings: WorkerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatqueue-worker download",
        description="Download a model through a Hub mirror into its folder, verify it and "
        "write its manifest. A run that was interrupted is finished by running it again. "
        "The token is read from HF_TOKEN / CHATQUEUE_HF_TOKEN only, and sent only to an "
        "https (or loopback) endpoint.",
    )
    parser.add_argument("--model-id", default=settings.model_id)
    parser.add_argument(
        "--revision",
        default=settings.model_revision,
        help="branch, tag or commit (default: %(default)s); a full 40-hex commit is a pin: "
        "the mirror must resolve it to itself",
    )
    parser.add_argument(
        "--sha256",
        type=_sha256,
        default=settings.model_sha256,
        help="expected manifest digest (default: CHATQUEUE_MODEL_SHA256); files that give "
        "another one are refused and no manifest is written",
    )
    parser.add_argument(
        "--endpoint", default=settings.hf_endpoint, help="Hub or mirror URL (default: %(default)s)"
    )
    parser.add_argument(
        "--hf-home",
        type=Path,
        default=settings.hf_home,
        help="Hub cache root; files already there are copied, not fetched",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="default: CHATQUEUE_MODEL_DIR, else <models_root>/<org>--<name>",
    )
    parser.add_argument(
        "--all-files",
        action="store_true",
        help="every file of the repo, not only what a worker needs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing, without any network access, when the folder already holds this "
        "repo and revision (and digest, when given) and verifies (what a compose init service "
        "wants on every start)",
    )
    return parser


def _already_there(model_dir: Path, args: argparse.Namespace) -> Manifest | None:
    try:
        manifest = verify_model_dir(model_dir)
    except ModelNotReady:
        return None
    if manifest.repo_id != args.model_id or args.revision not in (
        manifest.revision,
        manifest.commit,
    ):
        return None
    pinned = args.revision if is_commit_id(args.revision) else None
    if pin_mismatches(manifest, pinned_commit=pinned, expected_sha256=args.sha256):
        return None
    return manifest


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # One INFO line per HTTP request drowns ours; the progress bar shows the transfer.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"error: invalid worker settings: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    # The default folder follows --model-id, not the model id of the settings.
    named = settings.model_copy(update={"model_id": args.model_id})
    model_dir = args.model_dir or named.resolved_model_dir
    if args.if_missing and (manifest := _already_there(model_dir, args)):
        print(f"model dir: {model_dir} already holds {manifest.repo_id}@{manifest.commit}")
        return 0
    try:
        manifest = download_model(
            repo_id=args.model_id,
            revision=args.revision,
            endpoint=args.endpoint,
            local_dir=model_dir,
            hf_home=args.hf_home,
            token=settings.hf_token,
            all_files=args.all_files,
            progress=not args.no_progress,
            expected_sha256=args.sha256,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(entry.size for entry in manifest.files)
    print(f"model dir: {model_dir.expanduser().resolve()}")
    print(f"commit:    {manifest.commit} ({manifest.repo_id}@{manifest.revision})")
    print(f"sha256:    {manifest_digest(manifest)} (manifest digest: CHATQUEUE_MODEL_SHA256)")
    print(f"files:     {len(manifest.files)}, {total:,} bytes")
    return 0
