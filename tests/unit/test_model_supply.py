"""Model supply you can pin (issue 17, point 6): the checks themselves, without servers.

The same checks on real processes -- the download command against a real mirror, a real
worker refusing to start -- are in tests/integration/test_download.py and test_model_pins.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from worker.download import DownloadError, download_model, fetch_command
from worker.download.failures import refuse_token_in_clear
from worker.download.pins import pin_mismatches
from worker.manifest import (
    ModelNotReady,
    manifest_digest,
    manifest_for_local_dir,
    verify_model_dir,
    write_manifest,
)
from worker.settings import WorkerSettings, is_commit_id

TOKEN = "hf_thisIsNotARealTokenButMustNotLeak"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "Z-upper.txt").write_text("sorted by bytes: upper case first")
    write_manifest(folder, manifest_for_local_dir(folder, repo_id="acme/m", revision="main",
                                                  endpoint="local"))
    return folder


# --------------------------------------------------------------------------- the digest


def test_manifest_digest_is_what_sha256sum_gives(model_dir: Path) -> None:
    """An operator can compute the pin without chatqueue, with the command README gives."""
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum here")
    manifest = verify_model_dir(model_dir)
    files = " ".join(entry.path for entry in manifest.files)
    listed = subprocess.run(
        f"sha256sum {files} | LC_ALL=C sort -k2 | sha256sum", shell=True, cwd=model_dir,
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]

    assert manifest_digest(manifest) == listed


def test_manifest_digest_follows_the_bytes_not_the_metadata(model_dir: Path) -> None:
    manifest = verify_model_dir(model_dir)
    moved = manifest.model_copy(update={"endpoint": "https://elsewhere", "revision": "v2"})
    assert manifest_digest(moved) == manifest_digest(manifest)

    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    changed = manifest_for_local_dir(model_dir, repo_id="acme/m", revision="main",
                                     endpoint="local")
    assert manifest_digest(changed) != manifest_digest(manifest)


# --------------------------------------------------------------------------- unlisted files


@pytest.mark.parametrize("name", ["pytorch_model.bin", "chat_template.jinja", "sub/extra.py"])
def test_a_file_the_manifest_does_not_list_is_refused_by_name(model_dir: Path, name: str) -> None:
    (model_dir / name).write_bytes(b"\x80\x04K\x01.")  # a pickle, whatever its name

    with pytest.raises(ModelNotReady) as caught:
        verify_model_dir(model_dir, check_hashes=False)

    assert f"{name}: not listed in chatqueue-manifest.json" in str(caught.value)


def test_hub_metadata_is_not_an_unlisted_file(model_dir: Path) -> None:
    metadata = model_dir / ".cache" / "huggingface" / "download" / "config.json.metadata"
    metadata.parent.mkdir(parents=True)
    metadata.write_text("commit\netag\n1.0\n")

    assert verify_model_dir(model_dir).repo_id == "acme/m"


# --------------------------------------------------------------------------- pins


def test_pins_that_match_pass_and_each_mismatch_names_setting_expected_and_found(
    model_dir: Path,
) -> None:
    manifest = verify_model_dir(model_dir)
    digest = manifest_digest(manifest)
    assert pin_mismatches(manifest, pinned_commit=manifest.commit, expected_sha256=digest) == []
    assert pin_mismatches(manifest, pinned_commit=None, expected_sha256=None) == []

    other_commit, other_digest = "a" * 40, "b" * 64
    problems = pin_mismatches(manifest, pinned_commit=other_commit, expected_sha256=other_digest)

    assert len(problems) == 2
    assert "CHATQUEUE_MODEL_REVISION" in problems[0]
    assert other_commit in problems[0] and manifest.commit in problems[0]
    assert "CHATQUEUE_MODEL_SHA256" in problems[1]
    assert other_digest in problems[1] and digest in problems[1]


@pytest.mark.parametrize(
    ("revision", "pinned"),
    [
        pytest.param("main", None, id="branch"),
        pytest.param("v1.0", None, id="tag"),
        pytest.param("1d229b3", None, id="short-commit-is-not-a-pin"),
        pytest.param("1D229B3160DD14B8032FA1715A16F409EEEF952E ",
                     "1d229b3160dd14b8032fa1715a16f409eeef952e", id="full-commit-any-case"),
    ],
)
def test_a_full_commit_id_is_a_pin(revision: str, pinned: str | None) -> None:
    settings = WorkerSettings(model_revision=revision)
    assert settings.pinned_commit == pinned
    assert is_commit_id(settings.model_revision) == (pinned is not None)


def test_the_digest_setting_takes_a_sha256_only() -> None:
    assert WorkerSettings(model_sha256="AB" * 32).model_sha256 == "ab" * 32
    with pytest.raises(ValidationError, match="model_sha256"):
        WorkerSettings(model_sha256="ab" * 31)


def test_an_empty_digest_setting_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATQUEUE_MODEL_SHA256", "")  # what compose passes for ${VAR:-}
    assert WorkerSettings().model_sha256 is None


def test_the_fetch_command_carries_the_pins() -> None:
    settings = WorkerSettings(model_revision="c" * 40, model_sha256="d" * 64)
    command = fetch_command(settings)
    assert f"--revision {'c' * 40}" in command
    assert f"--sha256 {'d' * 64}" in command


# --------------------------------------------------------------------------- the token


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        pytest.param("https://huggingface.co", True, id="https"),
        pytest.param("https://hf-mirror.com/", True, id="https-mirror"),
        pytest.param("http://127.0.0.1:8090", True, id="loopback-v4"),
        pytest.param("http://127.8.9.10:8090", True, id="loopback-v4-range"),
        pytest.param("http://[::1]:8090", True, id="loopback-v6"),
        pytest.param("http://localhost:8090", True, id="localhost"),
        pytest.param("http://hf-mirror.internal:8090", False, id="http-name"),
        pytest.param("http://10.0.0.5", False, id="http-private-address"),
        pytest.param("http://127.0.0.1.evil.example", False, id="loopback-lookalike"),
        pytest.param("ftp://127.0.0.1", False, id="other-scheme"),
    ],
)
def test_the_token_goes_only_over_https_or_loopback(endpoint: str, allowed: bool) -> None:
    refuse_token_in_clear(endpoint, None)  # no token: any endpoint
    if allowed:
        refuse_token_in_clear(endpoint, SecretStr(TOKEN))
        return
    with pytest.raises(DownloadError) as caught:
        refuse_token_in_clear(endpoint, SecretStr(TOKEN))
    message = str(caught.value)
    assert "HF_TOKEN" in message and "HF_ENDPOINT" in message and endpoint in message
    assert TOKEN not in message


def test_a_download_with_a_token_over_http_is_refused_before_any_request(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: nothing answers there, so a request would hang, not fail.
    with pytest.raises(DownloadError, match="not https"):
        download_model(repo_id="acme/m", revision="main", endpoint="http://192.0.2.1:9",
                       local_dir=tmp_path / "m", token=SecretStr(TOKEN), progress=False)
    assert not (tmp_path / "m").exists()


def test_a_mirror_resolving_a_pinned_commit_to_another_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # olah answers what its git repo holds, so the lie is put in the mirror's answer here.
    from worker.download import fetch

    pinned, served = "a" * 40, "b" * 40
    monkeypatch.setattr(fetch, "_resolve_commit", lambda api, repo_id, revision: served)

    with pytest.raises(DownloadError) as caught:
        download_model(repo_id="acme/m", revision=pinned, endpoint="http://127.0.0.1:9",
                       local_dir=tmp_path / "m", progress=False)

    assert f"resolves pinned commit {pinned} to {served}" in str(caught.value)
    assert not (tmp_path / "m" / "chatqueue-manifest.json").exists()


def test_a_download_error_is_a_chatqueue_error_and_still_a_runtime_error() -> None:
    from producer.errors import ChatQueueError

    error = DownloadError("cannot download acme/m@main from https://hub: ...")
    assert isinstance(error, ChatQueueError) and isinstance(error, RuntimeError)
    assert isinstance(ModelNotReady("x"), ChatQueueError)
