"""`python -m benchmarks.gpu --quick` runs on a CPU with only what the GPU machine has.

The GPU machine has torch and transformers but no Celery, kombu, redis-py or pydantic-settings;
here those are made unimportable in the subprocess, so a new import of one of them on the
engine's path fails this test rather than a lent machine's few minutes. Speed is not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ABSENT_ON_GPU_HOST = ("celery", "kombu", "redis", "pydantic_settings")
# Runs the module as `python -m` would, after a finder that refuses the absent packages.
LAUNCHER = f"""
import runpy, sys
from importlib.abc import MetaPathFinder
ABSENT = {ABSENT_ON_GPU_HOST!r}
class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU host)",
                                      name=name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = ["benchmarks.gpu", *sys.argv[1:]]
runpy.run_module("benchmarks.gpu", run_name="__main__", alter_sys=True)
"""

SUMMARY_KEYS = {
    "hf_batch1_tok_s", "engine_tok_s_1", "engine_tok_s_4", "engine_tok_s_8",
    "hf_padded_tok_s_4", "hf_padded_tok_s_8", "generate_batch_tok_s_4",
    "generate_batch_tok_s_8", "engine_over_padded_8", "engine_over_generate_batch_8",
    "equality_check_passed",
}


def test_quick_gpu_benchmark_runs_without_the_queue_stack(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((tmp_path / "gpu-cpu-quick.json").read_text())
    assert results.keys() >= {"machine", "config", "limit", "equality_check", "engine",
                              "hf_padded", "hf_batch1", "generate_batch", "summary", "errors",
                              "skipped"}
    assert results["errors"] == {} and results["skipped"] == []
    check = results["equality_check"]
    assert check["passed"], check["mismatches"]
    assert check["matching_jobs"] == check["jobs"] > 1
    assert [row["jobs"] for row in results["engine"]] == [1, 4, 8]
    assert [row["jobs"] for row in results["hf_padded"]] == [4, 8]
    assert [row["jobs"] for row in results["generate_batch"]] == [4, 8]
    summary = results["summary"]
    assert summary.keys() >= SUMMARY_KEYS
    assert all(isinstance(summary[key], int | float) and summary[key] > 0
               for key in SUMMARY_KEYS)


def test_it_names_what_is_missing(tmp_path: Path) -> None:
    launcher = LAUNCHER.replace(repr(ABSENT_ON_GPU_HOST), repr(("pydantic",)))
    completed = subprocess.run(
        [sys.executable, "-c", launcher, "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "missing Python packages: pydantic" in completed.stderr
    assert not list(tmp_path.iterdir())
