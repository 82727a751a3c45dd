"""Load the tokenizer and model once, from the local folder only, pinned to one device."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from worker.manifest import Manifest
from worker.pipeline.reasoning import ThinkTokens

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    manifest: Manifest
    device: torch.device
    generation_defaults: GenerationConfig
    stop_ids: frozenset[int]
    pad_id: int
    context_length: int | None
    think: ThinkTokens
    close_thinking_ids: tuple[int, ...]
    load_s: float

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype  # type: ignore[no-any-return]


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    log.warning(
        "!!! CUDA is not available: the model runs on the CPU, far slower than on a GPU !!!")
    return torch.device("cpu")


def resolve_dtype(name: str, *, device: torch.device, model_dir: Path) -> torch.dtype | str:
    """`auto` is the checkpoint's own dtype -- except on a CPU without native bf16/fp16 matmul
    (AVX2-only x86, for one), where those run tens of times slower than float32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {name!r}")
        return _DTYPES[name]
    saved = _checkpoint_dtype(model_dir)
    if device.type != "cpu" or saved in (None, torch.float32) or cpu_matmul_is_fast(saved):
        return "auto"
    log.warning("%s matmul is slow on this CPU (no native support measured): loading the "
                "model in float32 instead; set CHATQUEUE_DTYPE to override", saved)
    return torch.float32


def _checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


@functools.cache
def cpu_matmul_is_fast(dtype: torch.dtype, size: int = 512) -> bool:
    """True when a square matmul in `dtype` runs at least 80% as fast as in float32 here."""

    def best_seconds(kind: torch.dtype) -> float:
        a, b = torch.randn(size, size).to(kind), torch.randn(size, size).to(kind)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            torch.matmul(a, b)
            timings.append(time.perf_counter() - started)
        return min(timings)

    return best_seconds(dtype) <= best_seconds(torch.float32) / 0.8


def load_model(
    model_dir: Path, manifest: Manifest, *, device: torch.device, dtype: str,
    trust_remote_code: bool = False,
) -> LoadedModel:
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, device=device, model_dir=model_dir),
        device_map=str(device), local_files_only=True,
        # Weights only from safetensors: a pickled checkpoint (pytorch_model.bin) can run code
        # when unpickled. A folder without safetensors weights fails to load instead.
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    ).eval()
    defaults = model.generation_config
    stop_ids = _stop_ids(defaults, tokenizer)
    pad_id = _pad_id(defaults, tokenizer, stop_ids)
    think = ThinkTokens.from_tokenizer(tokenizer)
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, manifest=manifest, device=device,
        generation_defaults=defaults, stop_ids=stop_ids, pad_id=pad_id,
        context_length=getattr(model.config, "max_position_embeddings", None),
        think=think, close_thinking_ids=_close_thinking_ids(tokenizer, think),
        load_s=time.perf_counter() - started,
    )
    log.info(
        "loaded %s@%s from %s on %s as %s in %.1fs (think tags: %s)",
        manifest.repo_id, manifest.commit[:12], model_dir, device, model.dtype, loaded.load_s,
        "yes" if loaded.think.close_id is not None else "no",
    )
    return loaded


def _stop_ids(defaults: GenerationConfig, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = defaults.eos_token_id
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise RuntimeError(
            "the model defines no end-of-sequence token; generation would never stop")
    return frozenset(ids)


def _pad_id(defaults: GenerationConfig, tokenizer: Any, stop_ids: frozenset[int]) -> int:
    # Padding sits under a zero attention mask, so any id works; prefer the model's own.
    for candidate in (defaults.pad_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return min(stop_ids)


def _close_thinking_ids(tokenizer: Any, think: ThinkTokens) -> tuple[int, ...]:
    """How a think block ends in this model's templates (Qwen3: "\n</think>\n\n"): what the
    engine writes for the model when a job's thinking budget runs out."""
    if think.close_id is None:
        return ()
    ids = tuple(tokenizer("\n</think>\n\n", add_special_tokens=False)["input_ids"])
    return ids if think.close_id in ids else (think.close_id,)
