"""The benchmark runs end to end in its quick mode. Whether it is fast is never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPECTED_KEYS = {"mode", "machine", "config", "limit", "baseline", "single_job", "concurrency"}
LEVEL_KEYS = {"concurrency", "tokens_per_s", "ratio_to_baseline", "speedup_same_requests",
              "latency_p50_s", "latency_p95_s", "queue_wait_p50_s", "queue_wait_p95_s", "mfu"}


def test_quick_benchmark_writes_its_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The session's tiny model, so the test neither rebuilds it nor writes into the repository.
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--model-dir", str(tiny_model_dir),
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((tmp_path / "tiny-qwen3-quick.json").read_text())
    assert results.keys() >= EXPECTED_KEYS
    assert results["mode"] == "quick"
    assert {"compute_bound_tokens_per_s", "matmul", "model"} <= results["limit"].keys()
    assert {"tokens_per_s", "latency_p50_s", "latency_p95_s"} <= results["baseline"].keys()
    assert "overhead_pct" in results["single_job"]
    assert [row["concurrency"] for row in results["concurrency"]] == [1, 4, 8]
    assert all(row.keys() >= LEVEL_KEYS for row in results["concurrency"])
    assert (tmp_path / "tiny-qwen3-quick.png").stat().st_size > 0


def test_quick_backends_comparison_writes_its_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.backends", "--quick", "--model-dir",
         str(tiny_model_dir), "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    (path,) = tmp_path.glob("*-backends.json")
    results = json.loads(path.read_text())
    assert set(results["backends"]) == {"engine", "transformers-cb"}
    assert all(row["tokens_per_s"] > 0 for row in results["backends"].values())
    # Both batchers decode greedily in float32 on the CPU: the same tokens, job by job.
    assert results["jobs_with_identical_tokens"] == results["jobs"] == 8
