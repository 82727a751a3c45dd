"""Two engine variants side by side in one process, switched step by step.

    .venv/bin/python -m benchmarks.engine_ab [--quick] [--model-dir DIR] [--jobs 32]
        [--variants generic,fast]

On a shared VM two runs of the same workload differ by 10-15%, more than most single changes
gain, so whole runs one after the other cannot decide a change. Here one engine serves the
benchmark's prompts (prefix caching off, greedy, EOS ignored) and its runner alternates the
variants every step: each variant's steps see the same machine, the same batch sizes and the
same contexts, and their medians compare. Steps are split by kind: decode-only steps (every
row one token) and steps that also prefill.

Variants (`VARIANTS`, two compared per run): `fast`, the Llama family's own forward with
prepacked weights (`worker/engine/fast_path.py`), its small ops fused
(`worker/engine/native/layer_ops.c`) and the native attention kernels for decoding rows and
prefill chunks; `fast-torch-ops`, the same with torch's small ops; `fast-sdpa`, the same as
`fast` with SDPA for prefill chunks; `generic`,
transformers' forward with the native kernels; `torch`, transformers' forward with pure-torch
attention (gather + matmuls for decoding rows, SDPA for chunks). Writes
<out>/<model>-engine-ab-<a>-<b>.json and prints the medians and their ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.backends import Workload, in_process_parser
from worker.engine import Engine, EngineLimits, EngineRequest
from worker.engine.runner import ModelRunner
from worker.engine.scheduler import ScheduledRow
from worker.manifest import read_manifest
from worker.pipeline.sampling import SamplingParams

# name -> the runner's switches: (fast path, its small ops fused, native decode kernel, native
# prefill kernel)
VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "fast": (True, True, True, True),
    "fast-torch-ops": (True, False, True, True),
    "fast-sdpa": (True, True, True, False),
    "generic": (False, False, True, True),
    "torch": (False, False, False, False),
}


def _switch(runner: ModelRunner, name: str) -> None:
    fast_path, fused, runner.native_decode, runner.native_prefill = VARIANTS[name]
    runner.use_fast_path = fast_path
    if runner.fast_path is not None:
        runner.fast_path.ops = runner.layer_ops if fused else None


def main(argv: list[str] | None = None) -> int:
    parser = in_process_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="generic,fast",
                        help=f"the two compared, of {', '.join(VARIANTS)} (default generic,fast)")
    work = Workload.load(parser.parse_args(argv))
    names = work.args.variants.split(",")
    if len(names) != 2 or not set(names) <= set(VARIANTS):
        raise SystemExit(f"--variants: two of {', '.join(VARIANTS)}, got {work.args.variants!r}")
    loaded = work.loaded
    engine = Engine(loaded.model, pad_id=loaded.pad_id, think=loaded.think,
                    limits=EngineLimits(max_batch_size=work.jobs, prefix_caching=False))
    if not engine.runner.native_decode:
        raise SystemExit("the native kernel is not available here (a CPU device, bf16 or "
                         "float32, a C compiler): nothing to compare")
    if "fast" in names and engine.runner.fast_path is None:
        raise SystemExit("the fast path does not run this model here: nothing to compare")
    timings = _Alternating(engine.runner, names)
    engine.start()
    try:
        _run(engine, work.prompts[:2], 2)  # warm-up, both variants
        timings.reset()
        for _ in range(work.rounds):
            _run(engine, work.prompts, work.new_tokens)
    finally:
        engine.stop()
    results = _summarise(read_manifest(work.model_dir).repo_id, loaded, work.jobs,
                         work.new_tokens, work.rounds, timings.seconds)
    _report(results, work.write(results, "engine-ab-" + "-".join(names)))
    return 0


class _Alternating:
    """Wraps the runner's execute: each step runs the next variant and is timed under it."""

    def __init__(self, runner: ModelRunner, names: list[str]) -> None:
        self.names = names
        self.reset()
        execute = runner.execute

        def timed(rows: Sequence[ScheduledRow]) -> tuple[list[ScheduledRow], torch.Tensor]:
            name = names[self._step % len(names)]
            self._step += 1
            _switch(runner, name)
            began = time.perf_counter()
            result = execute(rows)
            kind = "decode" if all(row.count == 1 for row in rows) else "prefill"
            self.seconds[name][kind].append(time.perf_counter() - began)
            return result

        runner.execute = timed  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds: dict[str, dict[str, list[float]]] = {
            name: {"decode": [], "prefill": []} for name in self.names}
        self._step = 0


def _run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> None:
    greedy = SamplingParams(do_sample=False)
    jobs = [engine.submit(EngineRequest(p, new_tokens, greedy, frozenset())) for p in prompts]
    for job in jobs:
        job.future.result()


def _summarise(model_id: str, loaded: Any, jobs: int, new_tokens: int, rounds: int,
               seconds: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    rows = {
        name: {kind: {"steps": len(times),
                      "median_ms": 1000 * statistics.median(times) if times else None}
               for kind, times in kinds.items()}
        for name, kinds in seconds.items()
    }
    first, second = list(rows)
    ratios: dict[str, float | None] = {}
    for kind in ("decode", "prefill"):
        a, b = rows[first][kind]["median_ms"], rows[second][kind]["median_ms"]
        ratios[kind] = b / a if a and b else None
    return {
        "model_id": model_id,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "jobs": jobs,
        "max_new_tokens": new_tokens,
        "rounds": rounds,
        "variants": rows,
        f"{second}_over_{first}": ratios,
    }


def _report(results: dict[str, Any], path: Path) -> None:
    print(f"{results['model_id']} ({results['dtype']} on {results['device']}), "
          f"{results['jobs']} jobs x {results['max_new_tokens']} new tokens, "
          f"{results['rounds']} rounds, variants alternating step by step")
    for name, kinds in results["variants"].items():
        parts = [f"{kind} {row['median_ms']:.1f} ms ({row['steps']} steps)"
                 for kind, row in kinds.items() if row["median_ms"] is not None]
        print(f"  {name:8s} " + ", ".join(parts))
    (ratio_name, ratios), = ((k, v) for k, v in results.items() if "_over_" in k)
    print(f"  {ratio_name}: " + ", ".join(
        f"{kind} {value:.3f}" for kind, value in ratios.items() if value is not None))
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
