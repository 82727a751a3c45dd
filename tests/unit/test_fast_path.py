"""The Llama family's fast path (worker/engine/fast_path.py) computes what transformers does.

Tiny random models of each family it takes (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with
per-head q/k norms): its logits equal transformers' forward, in float32 tightly and in bfloat16
within bf16's rounding, and its greedy outputs equal HF `generate` across batching, chunked
prefill and prefix-cache hits, with its small ops fused in C (native/layer_ops.c) and with
torch's. A model it does not take runs the generic path, and says why.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from worker.engine import Engine, EngineLimits, EngineRequest
from worker.engine import fast_path as fast
from worker.engine.runner import paged_attention
from worker.pipeline.sampling import SamplingParams

GREEDY = SamplingParams(do_sample=False)
VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.25, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=16)),
    # Llama 3's RoPE scaling: the fast path takes cos/sin from the model's own rotary_emb.
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, head_dim=16,
                                                        sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16)),
}
PROMPT_LENGTHS = (5, 23, 40, 12)


def tiny(family: str, dtype: torch.dtype = torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = FAMILIES[family]()
    return model.to(dtype).eval()


def prompts(lengths=PROMPT_LENGTHS, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def engine_for(model, small_ops="fused", **limits):
    """`small_ops`: "fused" (native/layer_ops.c, the default where it builds) or "torch"."""
    options = {"max_batch_size": 8, "batch_wait_s": 0.3, **limits}
    engine = Engine(model, pad_id=0, limits=EngineLimits(**options))
    forward = engine.runner.fast_path
    assert forward is not None and forward.ops is not None  # fused wherever it builds
    if small_ops == "torch":
        forward.ops = None
    return engine.start()


# Both ways the fast path runs its residual adds, norms, SiLU product and rotary.
SMALL_OPS = pytest.mark.parametrize("small_ops", ["fused", "torch"])


def test_every_family_here_takes_the_fast_path():
    for family in FAMILIES:
        assert fast.supports(tiny(family)) is None, family


@SMALL_OPS
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_position_logits_equal_transformers_forward(family, dtype, small_ops):
    model = tiny(family, dtype)
    engine = engine_for(model, small_ops)
    seen: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(rows):
        sampling, logits = execute(rows)
        seen.append(logits.float())
        return sampling, logits

    engine.runner.execute = recording
    try:
        assert engine.runner.use_fast_path
        for prompt in prompts():
            engine.generate(EngineRequest(prompt, 1, GREEDY, frozenset()))
            with torch.inference_mode():
                reference = model(torch.tensor([prompt])).logits[0, -1].float()
            got = seen.pop()[0]
            # float32: summation order only. bf16: each layer's output rounds to 8 bits of
            # mantissa on both sides, in different places, so allow a few of its steps.
            tolerance = 1e-4 if dtype == torch.float32 else 0.05 * reference.abs().max().item()
            assert (got - reference).abs().max().item() <= tolerance, family
            assert got.argmax() == reference.argmax() or dtype == torch.bfloat16
    finally:
        engine.stop()


@SMALL_OPS
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_outputs_equal_generate_batched_chunked_and_from_the_prefix_cache(family,
                                                                                  small_ops):
    model = tiny(family)
    shared = prompts((33,), seed=11)[0]
    requests = [EngineRequest(p, n, GREEDY, frozenset())
                for p, n in zip([*prompts(), [*shared, 5, 6], [*shared, 9]],
                                (9, 4, 12, 7, 6, 6), strict=True)]
    with torch.inference_mode():
        reference = [
            model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=r.max_new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(r.prompt_ids):].tolist()
            for r in requests]
    # Prompts prefilled in 7-token chunks while other rows decode, 4-token blocks so the two
    # that share 33 tokens hit the prefix cache.
    engine = engine_for(model, small_ops, max_step_tokens=7, block_size=4)
    try:
        jobs = [engine.submit(r) for r in requests]
        outputs = [job.future.result(timeout=120) for job in jobs]
        assert engine.runner.use_fast_path
    finally:
        engine.stop()
    assert [o.token_ids for o in outputs] == reference
    assert max(o.batch_size for o in outputs) > 1
    assert sum(o.cached_prompt_tokens for o in outputs) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_small_ops_give_the_same_bf16_tokens_as_torch_ops(family):
    """The fused ops round as torch's do, step by step: in bfloat16, where any rounding apart
    shows within a few tokens, the two ways give the same greedy tokens."""
    model = tiny(family, torch.bfloat16)
    requests = [EngineRequest(p, 24, GREEDY, frozenset()) for p in prompts()]
    outputs = {}
    for small_ops in ("fused", "torch"):
        engine = engine_for(model, small_ops, max_step_tokens=16)
        try:
            jobs = [engine.submit(r) for r in requests]
            outputs[small_ops] = [job.future.result(timeout=120).token_ids for job in jobs]
        finally:
            engine.stop()
    assert outputs["fused"] == outputs["torch"]


def test_a_model_the_fast_path_does_not_take_runs_the_generic_path_and_says_why(caplog):
    gelu = LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=16, hidden_act="gelu"))
    biased = LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=16, attention_bias=True))
    assert "activation 'gelu'" in fast.supports(gelu)
    assert "output projection with a bias" in fast.supports(biased)
    assert "not a transformers model" in fast.supports(object())
    with caplog.at_level("INFO", logger="worker.engine.runner"):
        engine = Engine(gelu, pad_id=0, limits=EngineLimits())
    assert engine.runner.fast_path is None and not engine.runner.use_fast_path
    assert engine.runner.layer_ops is None  # its fused ops are not built for nothing
    assert "generic transformers forward (activation 'gelu'" in caplog.text
    turned_off = Engine(tiny("llama"), pad_id=0, limits=EngineLimits(fast_path=False))
    assert turned_off.runner.fast_path is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 31, 300])
def test_prepacked_linear_equals_f_linear_for_any_row_count(dtype, rows):
    """oneDNN takes other kernels for other row counts (one row goes through two)."""
    generator = torch.Generator().manual_seed(rows)
    weights = [torch.randn(40, 48, generator=generator).to(dtype) for _ in range(2)]
    bias = [torch.randn(40, generator=generator).to(dtype) for _ in range(2)]
    linear = fast._Linear(weights, bias)
    assert linear.prepacked == fast.prepacking_works(dtype)
    x = torch.randn(rows, 48, generator=generator).to(dtype)
    expected = torch.nn.functional.linear(x, torch.cat(weights), torch.cat(bias))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(linear(x), expected, rtol=tolerance, atol=tolerance)


def test_the_fast_path_attends_through_the_engines_paged_attention():
    model = tiny("llama")
    forward = fast.FastForward(model, paged_attention)
    assert forward.attention is paged_attention
    assert [layer.attention.layer_idx for layer in forward.layers] == [0, 1]


@pytest.mark.parametrize(("config", "message"), [
    (MistralConfig(**SHAPE, head_dim=16, sliding_window=64), "no sliding window"),
    (Qwen3Config(**SHAPE, head_dim=16, layer_types=["full_attention", "sliding_attention"],
                 sliding_window=64, use_sliding_window=True), "full-attention layers only"),
])
def test_attention_the_engine_cannot_compute_is_refused_at_start(config, message):
    """Neither path has a sliding window: a model that needs one fails to start, clearly,
    instead of attending past its window."""
    model = {"mistral": MistralForCausalLM, "qwen3": Qwen3ForCausalLM}[config.model_type](config)
    with pytest.raises(NotImplementedError, match=message):
        Engine(model, pad_id=0, limits=EngineLimits())


def test_a_window_as_long_as_the_context_or_switched_off_is_no_window():
    as_long = MistralConfig(**SHAPE, head_dim=16, sliding_window=256)  # = max positions
    switched_off = Qwen2Config(**SHAPE, sliding_window=64, use_sliding_window=False)
    for model in (MistralForCausalLM(as_long), Qwen2ForCausalLM(switched_off)):
        assert Engine(model, pad_id=0, limits=EngineLimits()).runner.use_fast_path

