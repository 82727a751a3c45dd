"""Download through a real mirror (olah on loopback), verify, resume after kill -9, load offline."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TypeVar

import huggingface_hub.constants
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from pydantic import SecretStr

from tests.support.mirror import (
    OlahMirror,
    free_port,
    olah_fixture,
    publish_model,
    running_olah,
)
from worker.download import (
    DEFAULT_ALLOW_PATTERNS,
    OFFLINE_VARIABLES,
    DownloadError,
    download_model,
    ensure_model,
    fetch_command,
    main,
)
from worker.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelNotReady,
    git_blob_id,
    read_manifest,
    sha256_file,
    verify_model_dir,
)
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration

REPO = "acme/tiny-chat"
BIG_REPO = "acme/big-chat"
EXTRAS = ("pytorch_model.bin", "model.gguf", "onnx/model.onnx", "README.md")
PADDING = "padding.safetensors"
# olah serves ~16 MB/s: seconds of transfer left after the 39 MB model is complete.
PADDING_BYTES = 96 * 1024 * 1024
BOUND_S = 60.0  # "it returns": a generous bound, not a speed claim

T = TypeVar("T")

olah = olah_fixture("module")


# --------------------------------------------------------------------------- the repos


def copy_model(source: Path, target: Path) -> Path:
    """A copy to add files to and change; the built folder stays as built."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    return target


def add_extras(model_dir: Path) -> None:
    """Files a repo often carries but a worker does not need."""
    for name in EXTRAS:
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_bytes(os.urandom(64 * 1024))
    # olah decodes the README as UTF-8 to build the model card.
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny chat model\n")


@dataclass(frozen=True)
class Published:
    source: Path
    first_commit: str  # tagged v1.0
    first_generation_config: bytes
    latest_commit: str  # main


@pytest.fixture(scope="module")
def published(
    olah: OlahMirror, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    """The tiny model (tests/conftest.py) plus extra files, as two commits: v1.0 and main."""
    source = copy_model(tiny_model_dir, tmp_path_factory.mktemp("source") / "model")
    add_extras(source)
    first_config = (source / "generation_config.json").read_bytes()
    first = publish_model(source, olah.mirrors_path, REPO, tag="v1.0", message="first")
    (source / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    latest = publish_model(source, olah.mirrors_path, REPO, message="second")
    return Published(source, first, first_config, latest)


def download(olah: OlahMirror, local_dir: Path, *, revision: str = "main", **kwargs) -> Manifest:
    return download_model(
        repo_id=REPO,
        revision=revision,
        endpoint=olah.endpoint,
        local_dir=local_dir,
        hf_home=local_dir.parent / "hf-home",
        token=None,
        progress=False,
        **kwargs,
    )


def worker_settings(olah: OlahMirror, model_dir: Path, **overrides: object) -> WorkerSettings:
    fields: dict[str, object] = {"model_revision": "main", **overrides}
    return WorkerSettings(model_id=REPO, model_dir=model_dir, hf_endpoint=olah.endpoint, **fields)


def wanted_by_default(source: Path) -> set[str]:
    names = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    return {n for n in names if any(fnmatchcase(n, pat) for pat in DEFAULT_ALLOW_PATTERNS)}


def online_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}


def returns_within(seconds: float, action: Callable[[], T]) -> T:
    """Run `action` in a thread; fail the test if it has not returned (or raised) by then."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(action).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture
def restore_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_model turns this process offline; undo that after the test for the other tests."""
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# --------------------------------------------------------------------------- download + verify


def test_download_verifies_every_file_and_writes_the_manifest(
    olah: OlahMirror, published: Published, tmp_path: Path
) -> None:
    local = tmp_path / "model"
    manifest = download(olah, local)

    assert manifest.repo_id == REPO
    assert manifest.revision == "main"
    assert manifest.commit == published.latest_commit
    assert manifest.endpoint == olah.endpoint
    assert {f.path for f in manifest.files} == wanted_by_default(published.source)
    for entry in manifest.files:
        original = published.source / entry.path
        assert entry.size == original.stat().st_size
        assert entry.sha256 == sha256_file(original) == sha256_file(local / entry.path)
        # The Hub's way: weights in LFS (checked by sha256), small files by git blob id.
        assert entry.lfs == entry.path.endswith(".safetensors")
        assert entry.blob_id == (None if entry.lfs else git_blob_id(original))
    for extra in EXTRAS:
        assert not (local / extra).exists(), f"{extra} is not needed by a worker"
    assert read_manifest(local) == manifest
    assert verify_model_dir(local) == manifest


def test_all_files_from_the_command_line(
    olah: OlahMirror, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "model"
    argv = [
        "--model-id",
        REPO,
        "--endpoint",
        olah.endpoint,
        "--model-dir",
        str(local),
        "--hf-home",
        str(tmp_path / "hf-home"),
        "--all-files",
        "--no-progress",
    ]

    assert main(argv) == 0

    manifest = read_manifest(local)
    for extra in EXTRAS:
        assert sha256_file(local / extra) == sha256_file(published.source / extra)
    assert {*EXTRAS, "model.safetensors", "config.json"} <= {f.path for f in manifest.files}
    out = capsys.readouterr().out
    assert str(local) in out
    assert published.latest_commit in out
    assert f"files:     {len(manifest.files)}," in out


@pytest.mark.parametrize("revision", ["v1.0", "first-commit-sha"], ids=["tag", "commit"])
def test_revision_by_tag_or_commit_gets_that_snapshot(
    olah: OlahMirror, published: Published, tmp_path: Path, revision: str
) -> None:
    if revision == "first-commit-sha":
        revision = published.first_commit
    local = tmp_path / "model"

    # Only small files: what matters here is which snapshot they come from.
    manifest = download(olah, local, revision=revision, allow_patterns=["*.json"])

    assert manifest.revision == revision
    assert manifest.commit == published.first_commit != published.latest_commit
    assert (local / "generation_config.json").read_bytes() == published.first_generation_config


def test_token_never_reaches_the_logs(
    olah: OlahMirror, published: Published, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hf_thisIsNotARealTokenButMustNotLeak"
    caplog.set_level("DEBUG")
    manifest = download_model(
        repo_id=REPO,
        revision="main",
        endpoint=olah.endpoint,
        local_dir=tmp_path / "model",
        token=SecretStr(secret),
        allow_patterns=["*.json"],
        progress=False,
    )

    assert manifest.commit == published.latest_commit
    assert secret not in caplog.text
    assert secret not in (tmp_path / "model" / MANIFEST_NAME).read_text()


def test_two_downloads_into_one_folder_fetch_each_file_once(
    olah: OlahMirror, published: Published, tmp_path: Path
) -> None:
    """Workers on one host starting together: the second waits, then finds the files complete."""
    local = tmp_path / "model"
    gets_before = olah.file_gets(REPO)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(download, olah, local, allow_patterns=["*.json"]) for _ in range(2)]
        manifests = [run.result(timeout=BOUND_S) for run in runs]

    assert manifests[0].commit == manifests[1].commit == published.latest_commit
    fetched = olah.file_gets(REPO) - gets_before
    assert set(fetched) == {f.path for f in manifests[0].files}
    assert set(fetched.values()) == {1}
    assert verify_model_dir(local).files == manifests[1].files


# --------------------------------------------------------------------------- kill -9 and resume


@pytest.fixture(scope="module")
def big_repo(
    olah: OlahMirror, published: Published, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The small model plus one large safetensors file, so a download can be killed mid-file."""
    source = copy_model(published.source, tmp_path_factory.mktemp("big") / "model")
    (source / PADDING).write_bytes(os.urandom(PADDING_BYTES))
    publish_model(source, olah.mirrors_path, BIG_REPO)
    return source


def _download_cli(olah: OlahMirror, local: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "worker.download",
        "--model-id",
        BIG_REPO,
        "--endpoint",
        olah.endpoint,
        "--model-dir",
        str(local),
        "--no-progress",
    ]


def _hub_metadata(local: Path) -> Path:
    return local / ".cache" / "huggingface" / "download"


def _partials(local: Path) -> list[Path]:
    return list(_hub_metadata(local).rglob("*.incomplete"))


def _complete(local: Path, name: str) -> bool:
    """Complete as the hub sees it: at the final path, with its download metadata written."""
    return (local / name).is_file() and (_hub_metadata(local) / f"{name}.metadata").is_file()


def _kill_mid_padding(
    process: subprocess.Popen[bytes], local: Path, others: set[str], padding_sha256: str
) -> None:
    """kill -9 once every other file is complete and the padding is part-way in its partial file.

    The hub names a partial file after the etag, which for an LFS file is its sha256. All along,
    the padding's final path holds either nothing or the whole file.
    """
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        final = local / PADDING
        assert not final.exists() or final.stat().st_size == PADDING_BYTES, (
            "half file at final path"
        )
        assert process.poll() is None, "the download finished before it could be killed"
        started = any(padding_sha256 in p.name and p.stat().st_size > 0 for p in _partials(local))
        if started and all(_complete(local, name) for name in others):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.01)
    pytest.fail("the download never reached the point to kill it")


def test_kill_9_mid_download_then_rerun_fetches_only_what_was_missing(
    olah: OlahMirror, big_repo: Path, tmp_path: Path
) -> None:
    local = tmp_path / "model"
    others = wanted_by_default(big_repo) - {PADDING}
    assert "model.safetensors" in others  # an LFS file among those that must not come again
    process = subprocess.Popen(
        _download_cli(olah, local),
        env=online_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_mid_padding(process, local, others, sha256_file(big_repo / PADDING))

    # What the kill left: complete files, a partial file aside, nothing at the padding's final
    # path, no manifest -- so a worker refuses the folder.
    assert not (local / PADDING).exists()
    assert _partials(local)
    with pytest.raises(ModelNotReady, match="did not finish"):
        verify_model_dir(local)
    before = {name: (local / name).stat() for name in others}
    assert all(olah.file_gets(BIG_REPO)[name] == 1 for name in others)

    rerun = subprocess.run(
        _download_cli(olah, local),
        env=online_env(),
        capture_output=True,
        text=True,
        timeout=BOUND_S * 3,
    )
    assert rerun.returncode == 0, rerun.stderr

    manifest = verify_model_dir(local, check_hashes=True)
    assert {f.path for f in manifest.files} == others | {PADDING}
    assert sha256_file(local / PADDING) == sha256_file(big_repo / PADDING)
    assert not _partials(local), "the partial file of the killed run is cleaned up"
    gets = olah.file_gets(BIG_REPO)
    for name in others:
        after = (local / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
        assert gets[name] == 1, f"{name} was complete before the kill and fetched again"
    assert gets[PADDING] == 2  # started by the killed run, fetched whole by the rerun


# --------------------------------------------------------------------------- worker start


@pytest.mark.parametrize(
    ("damage", "victim", "verify_hashes"),
    [
        pytest.param("flip-a-byte", "model.safetensors", True, id="flipped-byte"),
        pytest.param("truncate", "config.json", False, id="truncated-even-without-hashes"),
    ],
)
def test_damaged_file_stops_the_worker_and_the_fetch_command_repairs_it(
    olah: OlahMirror,
    published: Published,
    tmp_path: Path,
    restore_online: None,
    damage: str,
    victim: str,
    verify_hashes: bool,
) -> None:
    local = tmp_path / "model"
    download(olah, local)
    path = local / victim
    data = bytearray(path.read_bytes())
    if damage == "flip-a-byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    settings = worker_settings(olah, local, verify_hashes=verify_hashes)

    with pytest.raises(ModelNotReady) as caught:
        ensure_model(settings)
    assert victim in str(caught.value)
    assert fetch_command(settings) in str(caught.value)

    # The hub alone would skip the file (its metadata says complete); our check refetches it.
    fix = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.download",
            *shlex.split(fetch_command(settings))[2:],
            "--no-progress",
        ],
        env=online_env(),
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )
    assert fix.returncode == 0, fix.stderr
    assert ensure_model(settings).commit == published.latest_commit
    assert sha256_file(path) == sha256_file(published.source / victim)


def test_worker_start_is_offline_and_names_the_fetch_command_when_absent(
    olah: OlahMirror, tmp_path: Path, restore_online: None
) -> None:
    settings = worker_settings(olah, tmp_path / "absent")

    with pytest.raises(ModelNotReady) as caught:
        ensure_model(settings)

    assert "does not exist" in str(caught.value)
    assert f"Fetch it with: {fetch_command(settings)}" in str(caught.value)
    assert all(os.environ[name] == "1" for name in OFFLINE_VARIABLES)
    with pytest.raises(OfflineModeIsEnabled):
        HfApi(endpoint=olah.endpoint).model_info(REPO, revision="main")


def test_download_if_missing_fetches_in_a_child_and_stays_offline(
    olah: OlahMirror, published: Published, tmp_path: Path, restore_online: None
) -> None:
    settings = worker_settings(olah, tmp_path / "model", download_if_missing=True)

    manifest = ensure_model(settings)

    assert manifest.commit == published.latest_commit
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(OfflineModeIsEnabled):
        HfApi(endpoint=olah.endpoint).model_info(REPO, revision="main")


# --------------------------------------------------------------------------- clear failures


@pytest.mark.parametrize(
    ("repo_id", "revision", "mirror_up", "expected"),
    [
        pytest.param(
            "acme/no-such-model",
            "main",
            True,
            "repository acme/no-such-model not found",
            id="unknown-repo",
        ),
        pytest.param(
            REPO,
            "no-such-branch",
            True,
            "revision 'no-such-branch' not found",
            id="unknown-revision",
        ),
        pytest.param(REPO, "main", False, "the mirror did not answer", id="mirror-down"),
    ],
)
def test_failures_are_clear_and_return(
    olah: OlahMirror,
    published: Published,
    tmp_path: Path,
    repo_id: str,
    revision: str,
    mirror_up: bool,
    expected: str,
) -> None:
    endpoint = olah.endpoint if mirror_up else f"http://127.0.0.1:{free_port()}"

    with pytest.raises(DownloadError) as caught:
        returns_within(
            BOUND_S,
            lambda: download_model(
                repo_id=repo_id,
                revision=revision,
                endpoint=endpoint,
                local_dir=tmp_path / "m",
                max_attempts=3,
                progress=False,
            ),
        )

    message = str(caught.value)
    assert expected in message
    assert repo_id in message and revision in message and endpoint in message
    assert not (tmp_path / "m" / MANIFEST_NAME).exists()


def test_command_line_failure_is_one_line_and_nonzero(
    olah: OlahMirror, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--model-id",
        "acme/no-such-model",
        "--endpoint",
        olah.endpoint,
        "--model-dir",
        str(tmp_path / "m"),
        "--no-progress",
    ]

    assert returns_within(BOUND_S, lambda: main(argv)) == 1

    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download acme/no-such-model@main")
    assert "\n" not in err


def test_if_missing_keeps_a_verified_folder_without_asking_the_mirror(
    olah: OlahMirror, published: Published, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "model"
    download(olah, local)
    gets_before = olah.file_gets(REPO)

    unreachable = f"http://127.0.0.1:{free_port()}"
    argv = ["--model-id", REPO, "--model-dir", str(local), "--endpoint", unreachable,
            "--if-missing", "--no-progress"]
    assert main(argv) == 0
    assert "already holds" in capsys.readouterr().out
    assert olah.file_gets(REPO) == gets_before

    (local / "config.json").write_text("{}")  # no longer verifies: a real download is needed
    assert main(argv) == 1


# --------------------------------------------------------------------------- pins (issue 17.6)

CLI = str(Path(sys.executable).with_name("chatqueue-worker"))
SECRET = "hf_thisIsNotARealTokenButMustNotLeak"


def download_command(olah_endpoint: str, local: Path, *args: str,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`chatqueue-worker download` as an operator runs it: a real process."""
    return subprocess.run(
        [CLI, "download", "--model-id", REPO, "--endpoint", olah_endpoint,
         "--model-dir", str(local), "--no-progress", *args],
        env=env or online_env(), capture_output=True, text=True, timeout=BOUND_S,
    )


def printed_digest(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("sha256:"))
    return line.split()[1]


def test_a_pinned_commit_and_the_printed_digest_are_what_a_worker_checks(
    olah: OlahMirror, published: Published, tmp_path: Path, restore_online: None
) -> None:
    local = tmp_path / "model"
    done = download_command(olah.endpoint, local, "--revision", published.first_commit)
    assert done.returncode == 0, done.stderr
    digest = printed_digest(done.stdout)
    assert read_manifest(local).commit == published.first_commit

    pinned = worker_settings(olah, local, model_revision=published.first_commit,
                             model_sha256=digest)
    assert ensure_model(pinned).commit == published.first_commit

    # main moved on since: a worker pinned to it refuses the folder, naming what differs.
    moved = worker_settings(olah, local, model_revision=published.latest_commit)
    with pytest.raises(ModelNotReady) as caught:
        ensure_model(moved)
    message = str(caught.value)
    assert f"CHATQUEUE_MODEL_REVISION pins commit {published.latest_commit}" in message
    assert f"holds commit {published.first_commit}" in message
    assert fetch_command(moved) in message

    other = "0" * 64
    with pytest.raises(ModelNotReady) as caught:
        ensure_model(worker_settings(olah, local, model_sha256=other))
    assert f"CHATQUEUE_MODEL_SHA256 expects manifest digest {other}" in str(caught.value)
    assert f"the folder's is {digest}" in str(caught.value)


def test_a_mirror_serving_other_bytes_is_refused_by_the_digest(
    olah: OlahMirror, published: Published, tmp_path: Path
) -> None:
    """The substitute mirror's own hashes agree with its files: only the pin catches it."""
    genuine = download_command(olah.endpoint, tmp_path / "genuine")
    assert genuine.returncode == 0, genuine.stderr
    digest = printed_digest(genuine.stdout)
    substitute_source = copy_model(published.source, tmp_path / "substitute-source")
    (substitute_source / "generation_config.json").write_text(json.dumps({"temperature": 2.0}))
    with running_olah(tmp_path / "substitute") as substitute:
        publish_model(substitute_source, substitute.mirrors_path, REPO)
        local = tmp_path / "model"
        refused = download_command(substitute.endpoint, local, "--sha256", digest)

    assert refused.returncode == 1
    assert f"CHATQUEUE_MODEL_SHA256 expects manifest digest {digest}" in refused.stderr
    assert "no manifest written" in refused.stderr
    assert not (local / MANIFEST_NAME).exists()

    # --if-missing keeps the genuine folder offline, and only while its digest is the pinned one.
    unreachable = f"http://127.0.0.1:{free_port()}"
    kept = download_command(unreachable, tmp_path / "genuine", "--if-missing", "--sha256", digest)
    assert kept.returncode == 0 and "already holds" in kept.stdout, kept.stderr
    other = download_command(unreachable, tmp_path / "genuine", "--if-missing", "--sha256",
                             "1" * 64)
    assert other.returncode == 1 and "the mirror did not answer" in other.stderr


def test_a_file_dropped_into_the_model_folder_stops_the_worker_and_the_download(
    olah: OlahMirror, published: Published, tmp_path: Path, restore_online: None
) -> None:
    local = tmp_path / "model"
    download(olah, local)
    (local / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle

    with pytest.raises(ModelNotReady, match=r"pytorch_model\.bin: not listed"):
        ensure_model(worker_settings(olah, local))
    # The download does not delete what it did not fetch: it says so and leaves it.
    refused = download_command(olah.endpoint, local)
    assert refused.returncode == 1
    assert "pytorch_model.bin" in refused.stderr and "did not fetch" in refused.stderr
    assert (local / "pytorch_model.bin").exists()


def test_files_an_earlier_download_fetched_are_removed_when_no_longer_listed(
    olah: OlahMirror, published: Published, tmp_path: Path
) -> None:
    local = tmp_path / "model"
    assert download_command(olah.endpoint, local, "--all-files").returncode == 0
    assert (local / "pytorch_model.bin").is_file()

    done = download_command(olah.endpoint, local)

    assert done.returncode == 0, done.stderr
    assert not any((local / extra).exists() for extra in EXTRAS)
    assert {f.path for f in verify_model_dir(local).files} == wanted_by_default(published.source)


@pytest.mark.parametrize("variable", ["HF_TOKEN", "CHATQUEUE_HF_TOKEN"])
def test_the_token_is_never_sent_over_plain_http_off_the_host(
    olah: OlahMirror, published: Published, tmp_path: Path, variable: str
) -> None:
    env = {**online_env(), variable: SECRET}
    # TEST-NET-1: nothing answers there; a request would hang until its timeouts, not fail.
    refused = download_command("http://192.0.2.1:8090", tmp_path / "m", env=env)
    assert refused.returncode == 1
    assert "HF_TOKEN is set, but the endpoint 'http://192.0.2.1:8090'" in refused.stderr
    assert "HF_ENDPOINT" in refused.stderr
    assert SECRET not in refused.stdout + refused.stderr

    # Over loopback the token goes (it never leaves the host), and stays out of the output.
    allowed = download_command(olah.endpoint, tmp_path / "m", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert SECRET not in allowed.stdout + allowed.stderr
