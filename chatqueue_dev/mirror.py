"""A real Hugging Face mirror for tests: olah on a loopback port, serving local git repos.

olah in offline mode serves `<mirrors_path>/models/<org>/<name>` (a plain git repo with a commit on
`main`) through the Hub API that huggingface_hub speaks. `publish_model` turns a model folder into
such a repo; large files become Git LFS pointers with their objects in `.git/lfs/objects`, the
layout olah reads, so the mirror reports LFS sha256s the way the Hub does (no git-lfs needed).

Use `running_olah(workdir)` as a context manager, or `olah_fixture()` to make a pytest fixture.
Import it as `from mirror import ...` from tests in this folder (pytest puts a test folder
without __init__.py on sys.path).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from worker.manifest import MANIFEST_NAME

# What the Hub stores in LFS by default (its .gitattributes): weights and other big binaries.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pth", "*.onnx", "*.h5", "*.msgpack")
_NOT_PUBLISHED = {".git", ".cache", MANIFEST_NAME}
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "chatqueue tests",
    "GIT_AUTHOR_EMAIL": "tests@chatqueue.invalid",
    "GIT_COMMITTER_NAME": "chatqueue tests",
    "GIT_COMMITTER_EMAIL": "tests@chatqueue.invalid",
}
# uvicorn's access log line, as olah writes it to logs/olah.log.
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_OLAH_CLI = Path(sys.executable).with_name("olah-cli")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the server


@dataclass
class OlahMirror:
    endpoint: str
    mirrors_path: Path
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / "olah.log"

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served so far, from olah's access log."""
        if not self.log_file.is_file():
            return []
        found = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            if match := _ACCESS_LINE.search(line):
                found.append((match["method"], match["path"], int(match["status"])))
        return found

    def file_gets(self, repo_id: str) -> Counter[str]:
        """How many times each file of `repo_id` was fetched (GET .../resolve/<rev>/<path>)."""
        prefix = f"/{repo_id}/resolve/"
        counts: Counter[str] = Counter()
        for method, path, _ in self.requests():
            if method == "GET" and path.startswith(prefix):
                counts[path[len(prefix) :].split("/", 1)[1]] += 1
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_olah_config(workdir: Path, port: int, mirrors_path: Path) -> Path:
    # The upstream Hub is a loopback port nothing answers on: in offline mode olah never calls
    # it, and if it tried, the test would fail fast instead of reaching the internet.
    dead_upstream = f"127.0.0.1:{free_port()}"
    config = workdir / "olah.toml"
    config.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'repos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirrors_path}"]\n'
        'hf-scheme = "http"\n'
        f'hf-netloc = "{dead_upstream}"\n'
        f'hf-lfs-netloc = "{dead_upstream}"\n'
        'mirror-scheme = "http"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "\n[accessibility]\n"
        "offline = true\n"
    )
    return config


def start_olah(
    workdir: Path, *, mirrors_path: Path | None = None, startup_timeout_s: float = 60.0
) -> OlahMirror:
    """Start olah in `workdir` (its logs go to workdir/logs) and return once it answers HTTP."""
    workdir.mkdir(parents=True, exist_ok=True)
    mirrors_path = mirrors_path or workdir / "mirrors"
    (mirrors_path / "models").mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(3):  # another process may take the free port before olah binds it
        port = free_port()
        config = write_olah_config(workdir, port, mirrors_path)
        with (workdir / "olah.out").open("ab") as out:
            process = subprocess.Popen(
                [str(_OLAH_CLI), "-c", str(config)], cwd=workdir, stdout=out, stderr=out
            )
        mirror = OlahMirror(f"http://127.0.0.1:{port}", mirrors_path, workdir, process)
        if _wait_until_answering(mirror, startup_timeout_s):
            return mirror
        mirror.stop()
        last_error = (workdir / "olah.out").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"olah did not start in {workdir}:\n{last_error}")


def _wait_until_answering(mirror: OlahMirror, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mirror.process.poll() is not None:
            return False
        try:
            # A cheap API route olah answers from local state (404 here); its "/" page errors.
            probe = f"{mirror.endpoint}/api/models/chatqueue/readiness-probe/refs"
            with urllib.request.urlopen(probe, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.1)
    return False


@contextmanager
def running_olah(workdir: Path, *, mirrors_path: Path | None = None) -> Iterator[OlahMirror]:
    mirror = start_olah(workdir, mirrors_path=mirrors_path)
    try:
        yield mirror
    finally:
        mirror.stop()


def olah_fixture(scope: str = "session"):
    """A pytest fixture that runs one olah for `scope`: `olah = olah_fixture("module")`."""

    @pytest.fixture(scope=scope)
    def _olah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahMirror]:
        with running_olah(tmp_path_factory.mktemp("olah")) as mirror:
            yield mirror

    return _olah


# --------------------------------------------------------------------------- the repos


def repo_path(mirrors_path: Path, repo_id: str) -> Path:
    return mirrors_path / "models" / repo_id


def publish_model(
    model_dir: Path,
    mirrors_path: Path,
    repo_id: str,
    *,
    tag: str | None = None,
    message: str = "publish",
    lfs_patterns: tuple[str, ...] = LFS_PATTERNS,
) -> str:
    """Commit `model_dir` as the new state of `repo_id` on `main` (tag it too); return the sha.

    The manifest and hub metadata are left out. Call again with a changed folder to add a commit.
    """
    repo = repo_path(mirrors_path, repo_id)
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "--quiet", "--initial-branch=main")
    _clear_worktree(repo)
    for source in _publishable_files(model_dir):
        rel = source.relative_to(model_dir).as_posix()
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if any(fnmatchcase(rel, pattern) for pattern in lfs_patterns):
            _store_as_lfs(source, target, repo)
        else:
            shutil.copyfile(source, target)
    (repo / ".gitattributes").write_text(
        "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in lfs_patterns)
    )
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    if tag is not None:
        _git(repo, "tag", "--force", tag)
    return _git(repo, "rev-parse", "HEAD")


def _publishable_files(model_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in model_dir.rglob("*")
        if path.is_file() and path.relative_to(model_dir).parts[0] not in _NOT_PUBLISHED
    )


def _clear_worktree(repo: Path) -> None:
    for child in repo.iterdir():
        if child.name == ".git":
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _store_as_lfs(source: Path, pointer: Path, repo: Path) -> None:
    """Write a Git LFS pointer at `pointer` and the content where git-lfs (and olah) keep it."""
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    oid = digest.hexdigest()
    size = source.stat().st_size
    obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, obj)
    pointer.write_text(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
    )


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_IDENTITY}
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()
