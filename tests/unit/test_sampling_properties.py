"""Properties of token choice over drawn logits, parameters and batches (hypothesis), beside the
hand-worked cases of test_sampling.py: whatever the batch, a greedy row takes its best token, a
sampled row never takes a token outside its own top-k or top-p, and a seeded row draws the same
token alone, through sample_token, and at any place among any neighbours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.schemas import GenerationParams
from worker.pipeline.sampling import SamplingParams, resolve_sampling, sample_batch, sample_token

PROPERTIES = settings(max_examples=200, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
# Slack for float32 scaling and float64 sums, far below any probability a test relies on.
EPS = 1e-5

# A few distinct levels make ties common (ties at the k-th best are where top-k goes wrong);
# -inf is a token a logits processor masked out.
LEVELS = [float("-inf"), -3.0, -1.0, 0.0, 0.5, 2.0, 4.0]


@st.composite
def logits_rows(draw: st.DrawFn, vocab: int) -> list[float]:
    row = draw(st.lists(st.sampled_from(LEVELS) | st.floats(-8, 8, width=32),
                        min_size=vocab, max_size=vocab))
    if all(value == float("-inf") for value in row):
        row[draw(st.integers(0, vocab - 1))] = 0.0
    return row


sampled_params = st.builds(
    SamplingParams, do_sample=st.just(True),
    temperature=st.sampled_from([0.05, 0.6, 1.0, 3.0]) | st.floats(0.01, 10.0),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 1e-6]) | st.floats(0.01, 1.0),
    top_k=st.sampled_from([0, 1, 2, 5]) | st.integers(-1, 80),
)
greedy_params = st.builds(SamplingParams, do_sample=st.just(False),
                          temperature=st.sampled_from([0.0, 1.0, 7.0]),
                          top_p=st.sampled_from([0.1, 1.0]), top_k=st.integers(0, 5))
any_params = sampled_params | greedy_params


@st.composite
def tie_free_rows(draw: st.DrawFn, vocab: int) -> list[float]:
    """Finite logits all different (masked -inf tokens aside): where ties are not the point."""
    finite = draw(st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=vocab, unique=True))
    masked = [float("-inf")] * (vocab - len(finite))
    return draw(st.permutations(finite + masked))


@st.composite
def batches(draw: st.DrawFn, rows_of=logits_rows) -> tuple[torch.Tensor, list[SamplingParams],
                                                          list[int]]:
    vocab = draw(st.integers(1, 60))
    rows = draw(st.integers(1, 6))
    logits = torch.tensor([draw(rows_of(vocab)) for _ in range(rows)], dtype=torch.float32)
    params = [draw(any_params) for _ in range(rows)]
    seeds = [draw(st.integers(0, 2**63 - 1)) for _ in range(rows)]
    return logits, params, seeds


def generators(params: list[SamplingParams], seeds: list[int]) -> list[torch.Generator | None]:
    return [torch.Generator().manual_seed(seed) if p.do_sample else None
            for p, seed in zip(params, seeds, strict=True)]


def allowed(row: torch.Tensor, params: SamplingParams, token: int) -> bool:
    """Worked out on its own from the definitions (HF's): a sampled token is among the top-k
    (ties with the k-th best included), has weight, and the tokens strictly better than it,
    renormalised over what top-k kept, hold less than top_p."""
    # Scaled in float32 as the sampler scales: two logits that round to one value tie there.
    scaled = (row.float() / torch.tensor(params.temperature, dtype=torch.float32)).double()
    vocab = row.shape[0]
    if 0 < params.top_k < vocab:
        kth_best = torch.sort(scaled, descending=True).values[params.top_k - 1]
        kept = scaled >= kth_best
    else:
        kept = torch.ones(vocab, dtype=torch.bool)
    if not bool(kept[token]) or scaled[token] == float("-inf"):
        return False
    probs = torch.softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
    better = float(probs[probs > probs[token] * (1 + 1e-9)].sum())
    return params.top_p >= 1.0 or better < params.top_p + EPS


@PROPERTIES
@given(batches())
def test_every_row_keeps_to_its_own_rule_whatever_shares_the_batch(batch):
    logits, params, seeds = batch
    tokens = sample_batch(logits, params, generators(params, seeds))

    assert len(tokens) == len(params)
    for row, p, token in zip(logits, params, tokens, strict=True):
        assert 0 <= token < logits.shape[1]
        if not p.do_sample:
            # Greedy: the best token (temperature, top-k and top-p do not apply).
            assert row[token] == row.max()
            assert token == int(row.argmax())
        else:
            assert allowed(row, p, token), (row.tolist(), p, token)


@PROPERTIES
@given(batches(tie_free_rows), st.data())
def test_a_seeded_row_draws_the_same_alone_and_anywhere_in_any_batch(batch, data):
    """Without ties; rows with tied top logits are tested below."""
    logits, params, seeds = batch
    target = data.draw(sampled_params, label="target")
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    row = data.draw(tie_free_rows(logits.shape[1]), label="row")
    position = data.draw(st.integers(0, len(params)), label="position")

    alone = sample_batch(torch.tensor([row]), [target], [torch.Generator().manual_seed(seed)])
    one = sample_token(torch.tensor(row), target, torch.Generator().manual_seed(seed))
    together = torch.cat([logits[:position], torch.tensor([row]), logits[position:]])
    all_params = [*params[:position], target, *params[position:]]
    all_seeds = [*seeds[:position], seed, *seeds[position:]]
    in_batch = sample_batch(together, all_params, generators(all_params, all_seeds))

    assert in_batch[position] == alone[0] == one
    # The neighbours draw as they would without the target among them, too.
    without = sample_batch(logits, params, generators(params, seeds))
    assert in_batch[:position] + in_batch[position + 1:] == without


@PROPERTIES
@given(st.integers(1, 60).flatmap(logits_rows), sampled_params, st.integers(0, 2**63 - 1))
def test_the_same_seed_draws_the_same_sequence(row, params, seed):
    logits = torch.tensor(row)
    first, second = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert ([sample_token(logits, params, first) for _ in range(5)]
            == [sample_token(logits, params, second) for _ in range(5)])


def test_a_seeded_row_with_tied_top_logits_draws_the_same_beside_a_larger_top_k():
    row = torch.full((46,), float("-inf"))
    row[[42, 43]] = 4.0  # top_k=1 keeps both (ties with the k-th best stay, as in HF)
    target = SamplingParams(do_sample=True, temperature=0.05, top_k=1)
    neighbour = torch.zeros(46)
    wider = SamplingParams(do_sample=True, top_k=2)
    for seed in range(8):
        alone = sample_batch(row.unsqueeze(0), [target], [torch.Generator().manual_seed(seed)])
        beside = sample_batch(torch.stack([row, neighbour]), [target, wider],
                              [torch.Generator().manual_seed(seed), torch.Generator()])
        assert beside[0] == alone[0], seed


def test_seeded_qwen3_rows_on_bf16_logits_draw_the_same_beside_a_larger_top_k():
    noise = torch.Generator().manual_seed(0)
    qwen3 = SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    wider = SamplingParams(do_sample=True, temperature=1.0, top_k=200)
    differed = 0
    for seed in range(100):
        logits = (torch.randn(2, 32000, generator=noise) * 3).to(torch.bfloat16)
        alone = sample_batch(logits[:1], [qwen3], [torch.Generator().manual_seed(seed)])
        beside = sample_batch(logits, [qwen3, wider],
                              [torch.Generator().manual_seed(seed), torch.Generator()])
        differed += beside[0] != alone[0]
    assert differed == 0


def test_different_seeds_really_draw_differently():
    # Guards the properties above against a sampler that ignores its generator.
    logits = torch.zeros(50)
    params = SamplingParams(do_sample=True)
    drawn = {sample_token(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert len(drawn) > 40


@pytest.mark.parametrize("top_k", [1, 2, 5, 10])
def test_a_token_outside_top_k_is_never_chosen_even_when_it_holds_most_of_the_rest(top_k):
    # The k best are barely ahead of a crowd that, together, holds nearly all the probability.
    logits = torch.zeros(2000)
    logits[:top_k] = 0.01
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=top_k)
    drawn = sample_batch(logits.expand(3000, -1), [params] * 3000,
                         [torch.Generator().manual_seed(s) for s in range(3000)])
    assert set(drawn) == set(range(top_k))


# ---------------------------------------------------------------- temperature 0


@pytest.mark.parametrize("top_k", [0, 3])
def test_temperature_zero_is_fine_for_a_greedy_row(top_k):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(do_sample=False, temperature=0.0, top_p=0.5, top_k=top_k)
    assert sample_batch(logits, [greedy] * 3, [None] * 3) == logits.argmax(-1).tolist()


def test_a_job_cannot_ask_for_temperature_zero():
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=0.0)


def test_a_model_default_of_temperature_zero_is_greedy_not_a_failed_batch():
    model_defaults = SimpleNamespace(do_sample=True, temperature=0.0, top_p=0.95, top_k=20)
    resolved = resolve_sampling(GenerationParams(), model_defaults)
    neighbour = SamplingParams(do_sample=True, temperature=0.7, top_k=20, seed=3)
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(2))

    tokens = sample_batch(logits, [resolved, neighbour],
                          [torch.Generator().manual_seed(1), torch.Generator().manual_seed(3)])
    assert tokens[0] == int(logits[0].argmax())


# ---------------------------------------------------------------- resolve_sampling

job_values = st.fixed_dictionaries({
    "do_sample": st.none() | st.booleans(),
    "temperature": st.none() | st.floats(0.01, 10.0),
    "top_p": st.none() | st.floats(0.01, 1.0),
    "top_k": st.none() | st.integers(0, 1000),
    "seed": st.none() | st.integers(0, 2**63 - 1),
})
model_values = st.fixed_dictionaries({}, optional={
    "do_sample": st.none() | st.booleans(),
    "temperature": st.none() | st.floats(0.01, 5.0),
    "top_p": st.none() | st.floats(0.01, 1.0),
    "top_k": st.none() | st.integers(0, 100),
    "seed": st.none() | st.integers(0, 10),
})
HF_FALLBACK = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


@PROPERTIES
@given(job_values, model_values)
def test_each_field_is_the_jobs_else_the_models_else_hfs(job, model):
    resolved = resolve_sampling(GenerationParams(**job), SimpleNamespace(**model))
    for name, fallback in HF_FALLBACK.items():
        if job[name] is not None:
            expected = job[name]
        elif model.get(name) is not None:
            expected = model[name]
        else:
            expected = fallback
        assert getattr(resolved, name) == expected, name
    # The seed is the job's alone: a model-wide seed would make every job draw alike.
    assert resolved.seed == job["seed"]
