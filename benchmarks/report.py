"""Turn runs into numbers: summaries, the results file, the chart and the printed table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.baseline import PaddedRun, RequestRun
from benchmarks.limit import mfu
from benchmarks.product import JobRun, LevelRun


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise_baseline(runs: list[RequestRun], limit: dict[str, Any]) -> dict[str, Any]:
    latencies = [r.latency_s for r in runs]
    tokens_per_s = sum(r.completion_tokens for r in runs) / sum(latencies)
    return {
        "what": "tutorial pipeline in one process, one request at a time",
        "tokens_per_s": tokens_per_s,
        "latency_mean_s": mean(latencies),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "mfu": mfu(tokens_per_s, limit),
        "requests": [asdict(r) for r in runs],
    }


def summarise_single_jobs(jobs: list[JobRun], baseline: list[RequestRun]) -> dict[str, Any]:
    """The baseline's requests, each alone through the product right after its baseline run;
    where the time goes."""
    latency = mean([j.latency_s for j in jobs])
    baseline_latency = mean([r.latency_s for r in baseline])
    queue_wait = mean([j.queue_wait_s for j in jobs])
    generation = mean([j.generation_s for j in jobs])
    per_job = [
        {**asdict(job), "baseline_latency_s": run.latency_s,
         "overhead_pct": 100 * (job.latency_s / run.latency_s - 1)}
        for job, run in zip(jobs, baseline, strict=True)
    ]
    return {
        "what": "each baseline request alone through redis + worker, right after its baseline run",
        "overhead_pct": 100 * (latency / baseline_latency - 1),
        # Robust to the odd request that caught a burst of other load on either side.
        "overhead_pct_median": percentile([job["overhead_pct"] for job in per_job], 50),
        "latency_mean_s": latency,
        "baseline_latency_mean_s": baseline_latency,
        "queue_wait_mean_s": queue_wait,
        "generation_mean_s": generation,
        # What is left: the result's trip back through Redis to the client, and client work.
        "delivery_mean_s": latency - queue_wait - generation,
        "tokens_per_s": sum(j.completion_tokens for j in jobs) / sum(j.latency_s for j in jobs),
        "jobs": per_job,
    }


def summarise_run(run: LevelRun, limit: dict[str, Any]) -> dict[str, Any]:
    """N jobs submitted together, whatever their prompts: throughput, first token, MFU."""
    completion = sum(j.completion_tokens for j in run.jobs)
    prompt = sum(j.prompt_tokens for j in run.jobs)
    cached = sum(j.cached_prompt_tokens for j in run.jobs)
    tokens_per_s = run.tokens_per_s
    first = [j.first_token_s for j in run.jobs]
    return {
        "jobs": len(run.jobs),
        "tokens_per_s": tokens_per_s,
        "wall_s": run.wall_s,
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "latency_p50_s": percentile([j.latency_s for j in run.jobs], 50),
        "latency_p95_s": percentile([j.latency_s for j in run.jobs], 95),
        "first_token_p50_s": percentile(first, 50),
        "first_token_p95_s": percentile(first, 95),
        "mfu": mfu(tokens_per_s, limit),
        # Prompt tokens the worker computed (cache hits are not computed), padding excluded.
        "mfu_with_prompt": mfu((completion + prompt - cached) / run.wall_s, limit),
        "per_job": [asdict(j) for j in run.jobs],
    }


def summarise_padded(run: PaddedRun, limit: dict[str, Any]) -> dict[str, Any]:
    tokens_per_s = run.completion_tokens / run.wall_s
    return {
        "what": "one left-padded model.generate over the same prompts, in this process",
        "concurrency": run.prompts,
        "tokens_per_s": tokens_per_s,
        "wall_s": run.wall_s,
        "completion_tokens": run.completion_tokens,
        "prompt_tokens": sum(run.prompt_tokens),
        "padded_width": run.padded_width,
        "mfu": mfu(tokens_per_s, limit),
        "mfu_with_prompt": mfu((run.completion_tokens + sum(run.prompt_tokens)) / run.wall_s,
                               limit),
    }


def summarise_level(
    n: int, run: LevelRun, baseline: list[RequestRun], limit: dict[str, Any]
) -> dict[str, Any]:
    completion = sum(j.completion_tokens for j in run.jobs)
    prompt = sum(j.prompt_tokens for j in run.jobs)
    cached = sum(j.cached_prompt_tokens for j in run.jobs)
    tokens_per_s = run.tokens_per_s
    baseline_tokens_per_s = sum(r.completion_tokens for r in baseline) / sum(
        r.latency_s for r in baseline)
    # The level's jobs cycle through the prompts; small N use only the first (shortest) ones,
    # so the aggregate ratio flatters them. This one compares the very same requests.
    baseline_same_s = sum(baseline[j.prompt_index % len(baseline)].latency_s for j in run.jobs)
    latencies = [j.latency_s for j in run.jobs]
    waits = [j.queue_wait_s for j in run.jobs]
    finished = [j.finished_at for j in run.jobs]
    return {
        "concurrency": n,
        "tokens_per_s": tokens_per_s,
        "ratio_to_baseline": tokens_per_s / baseline_tokens_per_s,
        "speedup_same_requests": baseline_same_s / run.wall_s,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "queue_wait_p50_s": percentile(waits, 50),
        "queue_wait_p95_s": percentile(waits, 95),
        "generation_p50_s": percentile([j.generation_s for j in run.jobs], 50),
        # Task slot start -> first token: the prefill, and any wait for a row, as a user of the
        # stream sees it (plus queue wait).
        "first_token_p50_s": percentile([j.first_token_s for j in run.jobs], 50),
        "first_token_p95_s": percentile([j.first_token_s for j in run.jobs], 95),
        # Worker clock: how staggered the jobs ended. Equal work per job, so a wide spread means
        # they started (were admitted to the batch) far apart.
        "finish_spread_s": max(finished) - min(finished),
        "mfu": mfu(tokens_per_s, limit),
        # Prompt tokens cost a forward pass too; this counts those the worker computed (not its
        # prefix-cache hits), padding still excluded.
        "mfu_with_prompt": mfu((completion + prompt - cached) / run.wall_s, limit),
        "wall_s": run.wall_s,
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "jobs": [asdict(j) for j in run.jobs],
    }


# Concurrency levels the summary names; a level the run did not measure gives null.
SUMMARY_LEVELS = (32, 64)
# Issue 12's targets: summary key -> (at least / at most, value). For the record, not a test.
TARGETS: dict[str, tuple[str, float]] = {
    "ratio_vs_padded_32": (">=", 2.5),
    "ratio_vs_padded_64": (">=", 3.0),
    "mfu_with_prompts_32": (">=", 0.30),
    "first_token_p95_over_p50_32": ("<=", 2.0),
    "shared_prefix_speedup": (">=", 2.0),
    "sampled_over_greedy_32": (">=", 0.9),
}


def build_summary(results: dict[str, Any]) -> dict[str, float | None]:
    """The numbers runs are compared by, flat: every value a number, or None where its level or
    workload was not run."""
    levels = {row["concurrency"]: row for row in results["concurrency"]}
    padded = {row["concurrency"]: row for row in results["padded_generate"]}
    decode = {row["concurrency"]: row for row in results["decode_heavy"]["levels"]}
    summary: dict[str, float | None] = {}
    for n in SUMMARY_LEVELS:
        product_rate = _get(levels.get(n), "tokens_per_s")
        padded_rate = _get(padded.get(n), "tokens_per_s")
        summary[f"tok_s_{n}"] = product_rate
        summary[f"padded_tok_s_{n}"] = padded_rate
        summary[f"ratio_vs_padded_{n}"] = _ratio(product_rate, padded_rate)
    row_32 = levels.get(32)
    summary["mfu_with_prompts_32"] = _get(row_32, "mfu_with_prompt")
    summary["first_token_p50_32"] = _get(row_32, "first_token_p50_s")
    summary["first_token_p95_32"] = _get(row_32, "first_token_p95_s")
    summary["first_token_p95_over_p50_32"] = _ratio(summary["first_token_p95_32"],
                                                    summary["first_token_p50_32"])
    shared = results["shared_prefix"]
    summary["shared_prefix_speedup"] = _ratio(_get(shared["on"], "tokens_per_s"),
                                              _get(shared["off"], "tokens_per_s"))
    sampled = results["sampled"]
    summary["sampled_tok_s_32"] = (_get(sampled, "tokens_per_s")
                                   if _get(sampled, "jobs") == 32 else None)
    # Against the greedy runs that alternated with the sampled ones (the fastest of each).
    greedy_beside = max(sampled.get("greedy_beside_tokens_per_s") or [0.0]) or None
    summary["sampled_over_greedy_32"] = _ratio(summary["sampled_tok_s_32"], greedy_beside)
    for n in SUMMARY_LEVELS:
        row = decode.get(n)
        summary[f"decode_tok_s_{n}"] = _get(_get(row, "product"), "tokens_per_s")
        summary[f"decode_padded_tok_s_{n}"] = _get(_get(row, "padded"), "tokens_per_s")
        summary[f"decode_ratio_vs_padded_{n}"] = _ratio(summary[f"decode_tok_s_{n}"],
                                                        summary[f"decode_padded_tok_s_{n}"])
    return summary


def check_targets(summary: dict[str, float | None]) -> dict[str, bool | None]:
    """Each target met (True), missed (False), or not measured in this run (None)."""
    verdicts: dict[str, bool | None] = {}
    for key, (relation, bound) in TARGETS.items():
        value = summary.get(key)
        if value is None:
            verdicts[key] = None
        else:
            verdicts[key] = value >= bound if relation == ">=" else value <= bound
    return verdicts


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, dict) else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def write_json(results: dict[str, Any], path: Path) -> None:
    """Written beside and renamed into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(staging, path)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt

    levels = [row["concurrency"] for row in results["concurrency"]]
    rates = [row["tokens_per_s"] for row in results["concurrency"]]
    config, limit = results["config"], results["limit"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(levels, rates, marker="o", label="product (redis + worker), all jobs")
    padded = results.get("padded_generate") or []
    if padded:
        ax.plot([row["concurrency"] for row in padded], [row["tokens_per_s"] for row in padded],
                marker="s", linestyle=":", label="one padded model.generate, same prompts")
    ax.axhline(results["baseline"]["tokens_per_s"], color="grey", linestyle="--",
               label="baseline: tutorial, one request at a time")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent jobs (N)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        f"{config['model_name']} ({config['dtype']} on {config['device']}), "
        f"{config['max_new_tokens']} new tokens/job\n"
        f"compute bound {limit['compute_bound_tokens_per_s']:,.0f} tok/s "
        f"({limit['matmul']['flops_per_s'] / 1e9:,.0f} GFLOP/s matmul peak)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    config, limit = results["config"], results["limit"]
    baseline, single = results["baseline"], results["single_job"]
    peak = limit["matmul"]
    lines = [
        f"model {config['model_name']} ({config['dtype']} on {config['device']}), "
        f"{config['max_new_tokens']} new tokens per job (greedy, EOS ignored), prompts of "
        f"{min(config['prompt_tokens'])}-{max(config['prompt_tokens'])} tokens",
        f"limit: matmul peak {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s ({peak['dtype']}, "
        f"n={peak['best_size']}) / {limit['model']['flops_per_token'] / 1e9:.4f} GFLOP per token "
        f"= {limit['compute_bound_tokens_per_s']:,.0f} tok/s",
        f"  ({limit['model']['formula']})",
        f"worker: {config['worker']}",
        "",
        f"baseline (tutorial, one at a time): {baseline['tokens_per_s']:.1f} tok/s, latency "
        f"p50 {baseline['latency_p50_s']:.2f} s, MFU {100 * baseline['mfu']:.2f} %",
        f"single job through the product: overhead {single['overhead_pct']:+.1f} % (median "
        f"of pairs {single['overhead_pct_median']:+.1f} %; latency "
        f"{single['latency_mean_s']:.2f} s vs {single['baseline_latency_mean_s']:.2f} s; "
        f"queue wait {single['queue_wait_mean_s']:.3f} s + worker {single['generation_mean_s']:.2f}"
        f" s + delivery {single['delivery_mean_s']:.3f} s)",
        "",
        f"{'N':>4} {'tok/s':>8} {'x base':>7} {'x same':>7} {'lat p50':>8} {'lat p95':>8} "
        f"{'wait p50':>9} {'wait p95':>9} {'1st p50':>8} {'1st p95':>8} {'MFU':>7} {'MFU+pr':>7} "
        f"{'wall':>7} {'spread':>7}",
    ]
    for row in results["concurrency"]:
        lines.append(
            f"{row['concurrency']:>4} {row['tokens_per_s']:>8.1f} "
            f"{row['ratio_to_baseline']:>6.2f}x {row['speedup_same_requests']:>6.2f}x "
            f"{row['latency_p50_s']:>7.2f}s {row['latency_p95_s']:>7.2f}s "
            f"{row['queue_wait_p50_s']:>8.3f}s {row['queue_wait_p95_s']:>8.3f}s "
            f"{row['first_token_p50_s']:>7.2f}s {row['first_token_p95_s']:>7.2f}s "
            f"{100 * row['mfu']:>6.2f}% {100 * row['mfu_with_prompt']:>6.2f}% "
            f"{row['wall_s']:>6.1f}s {row['finish_spread_s']:>6.1f}s"
        )
    lines += [
        f"{'base':>4} {baseline['tokens_per_s']:>8.1f} {1.0:>6.2f}x",
        "x base: product tok/s / baseline tok/s over all 8 prompts; x same: the baseline's time "
        "for the same N requests one after another / the product's wall time; 1st: a task "
        "slot's start -> the job's first token (its prefill and any wait for a row)",
        "",
        *_format_workloads(results),
        "",
        *_format_summary(results),
    ]
    return "\n".join(lines)


def _format_workloads(results: dict[str, Any]) -> list[str]:
    levels = {row["concurrency"]: row for row in results["concurrency"]}
    lines = [f"padded generate (one left-padded model.generate over the level's prompts, "
             f"{results['config']['max_new_tokens']} new tokens):",
             f"{'N':>4} {'tok/s':>8} {'wall':>7} {'width':>6} {'product':>8} {'x pad':>6}"]
    for row in results["padded_generate"]:
        product_rate = levels[row["concurrency"]]["tokens_per_s"]
        lines.append(f"{row['concurrency']:>4} {row['tokens_per_s']:>8.1f} {row['wall_s']:>6.1f}s "
                     f"{row['padded_width']:>6} {product_rate:>8.1f} "
                     f"{product_rate / row['tokens_per_s']:>5.2f}x")
    decode = results["decode_heavy"]
    lines += ["", f"decode-heavy ({decode['max_new_tokens']} new tokens per job):",
              f"{'N':>4} {'tok/s':>8} {'padded':>8} {'x pad':>6} {'1st p50':>8} {'1st p95':>8}"]
    for row in decode["levels"]:
        product, padded = row["product"], row["padded"]
        lines.append(f"{row['concurrency']:>4} {product['tokens_per_s']:>8.1f} "
                     f"{padded['tokens_per_s']:>8.1f} "
                     f"{product['tokens_per_s'] / padded['tokens_per_s']:>5.2f}x "
                     f"{product['first_token_p50_s']:>7.2f}s {product['first_token_p95_s']:>7.2f}s")
    sampled, shared = results["sampled"], results["shared_prefix"]
    greedy = max(sampled.get("greedy_beside_tokens_per_s") or [0.0]) or None
    lines += ["", f"sampled ({sampled['jobs']} jobs, {sampled['sampling']}): "
              f"{sampled['tokens_per_s']:.1f} tok/s"
              + (f", {sampled['tokens_per_s'] / greedy:.2f}x greedy's {greedy:.1f}" if greedy
                 else "")]
    on, off = shared["on"], shared["off"]
    lines.append(
        f"shared system prompt ({shared['jobs']} jobs, {shared['system_prompt_tokens']} shared "
        f"tokens): prefix caching on {on['tokens_per_s']:.1f} tok/s (1st p50 "
        f"{on['first_token_p50_s']:.2f}s, {on['cached_prompt_tokens']} prompt tokens cached), "
        f"off {off['tokens_per_s']:.1f} tok/s (1st p50 {off['first_token_p50_s']:.2f}s): "
        f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x")
    return lines


def _format_summary(results: dict[str, Any]) -> list[str]:
    summary, verdicts = results["summary"], results["targets_met"]
    lines = ["summary (issue 12's targets in brackets):"]
    for key, value in summary.items():
        shown = "-" if value is None else f"{value:.4g}"
        target = ""
        if key in TARGETS:
            relation, bound = TARGETS[key]
            verdict = {True: "met", False: "missed", None: "not run"}[verdicts[key]]
            target = f"   [{relation} {bound:g}: {verdict}]"
        lines.append(f"  {key:32s} {shown:>10}{target}")
    return lines
