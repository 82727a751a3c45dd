"""The benchmark runs end to end in its quick mode. Whether it is fast is never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPECTED_KEYS = {"mode", "machine", "config", "limit", "baseline", "single_job", "concurrency",
                 "padded_generate", "sampled", "decode_heavy", "shared_prefix", "summary",
                 "targets_met"}
# The keys runs are compared by (issue 12); each a number, or null where its level was not run.
SUMMARY_KEYS = {
    "tok_s_32", "padded_tok_s_32", "ratio_vs_padded_32", "tok_s_64", "padded_tok_s_64",
    "ratio_vs_padded_64", "mfu_with_prompts_32", "first_token_p50_32", "first_token_p95_32",
    "shared_prefix_speedup", "sampled_over_greedy_32",
    "decode_tok_s_32", "decode_padded_tok_s_32", "decode_ratio_vs_padded_32",
    "decode_tok_s_64", "decode_padded_tok_s_64", "decode_ratio_vs_padded_64",
}
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

    # The padded-generate baseline: a row for every level above one, beside the product's.
    assert [row["concurrency"] for row in results["padded_generate"]] == [4, 8]
    assert all(row["tokens_per_s"] > 0 for row in results["padded_generate"])
    assert all(row["ratio_to_padded"] > 0 for row in results["concurrency"][1:])
    (decode,) = results["decode_heavy"]["levels"]
    assert decode["product"]["tokens_per_s"] > 0 and decode["padded"]["tokens_per_s"] > 0
    assert results["sampled"]["jobs"] == 8 and results["sampled"]["tokens_per_s"] > 0
    # Its ratio is taken against the greedy run that alternated with it.
    (greedy,) = results["sampled"]["greedy_beside_tokens_per_s"]
    assert results["summary"]["sampled_over_greedy_32"] is None  # --quick runs 8 jobs
    assert greedy > 0
    assert results["shared_prefix"]["on"]["tokens_per_s"] > 0
    assert results["shared_prefix"]["off"]["tokens_per_s"] > 0

    summary = results["summary"]
    assert summary.keys() >= SUMMARY_KEYS
    for key, value in summary.items():
        assert value is None or isinstance(value, int | float), (key, value)
    # --quick runs 1, 4 and 8 jobs: nothing at 32 or 64; the shared-prefix ratio has no level.
    assert summary["tok_s_32"] is None and summary["decode_ratio_vs_padded_64"] is None
    assert summary["shared_prefix_speedup"] > 0

    # One client streamed every job of the sweep; the engine alone ran the largest level's jobs.
    assert results["stream_lag_ms"]["events"] > 0 and summary["stream_lag_p95_ms"] >= 0
    (engine,) = results["engine_alone"]
    assert engine["concurrency"] == 8 and engine["product_over_engine"] > 0
    assert summary["engine_tok_s_32"] is None and summary["product_over_engine_64"] is None


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


def test_quick_engine_ab_alternates_the_variants_and_writes_their_medians(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_ab", "--quick", "--model-dir",
         str(tiny_model_dir), "--out", str(tmp_path), "--max-new-tokens", "12"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    (path,) = tmp_path.glob("*-engine-ab-generic-fast.json")
    results = json.loads(path.read_text())
    variants = results["variants"]
    assert set(variants) == {"generic", "fast"}
    # Steps alternate, so each variant ran about half of the decode steps (warm-up excluded).
    decode = [variants[name]["decode"]["steps"] for name in ("generic", "fast")]
    assert min(decode) >= 4 and abs(decode[0] - decode[1]) <= 2
    assert results["fast_over_generic"]["decode"] > 0
    assert "fast_over_generic: decode" in completed.stdout
