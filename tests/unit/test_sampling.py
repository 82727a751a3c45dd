"""Choosing tokens: the job's parameters over the model's defaults, and batched sampling that
keeps HF's semantics and draws each seeded row the same whatever shares its batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from producer.schemas import GenerationParams
from worker.pipeline.sampling import SamplingParams, resolve_sampling, sample_batch, sample_token

GREEDY = SamplingParams(do_sample=False)
QWEN3 = SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
# A small distribution whose truncations are easy to work out by hand (best first).
PROBS = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04]


def known_logits(rows: int = 1, probs: list[float] = PROBS) -> torch.Tensor:
    # Shuffled so that "best first" is the sampler's doing, not the layout's.
    order = [3, 0, 5, 1, 4, 2]
    row = torch.full((len(probs),), 0.0)
    for token, p in zip(order, probs, strict=True):
        row[token] = math.log(p)
    return row.expand(rows, -1).clone()


def best_first(logits_row: torch.Tensor) -> list[int]:
    return torch.argsort(logits_row, descending=True).tolist()


def seeded(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def draw_many(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> list[int]:
    """One draw from each of `draws` rows, row i seeded with i: deterministic, and batched."""
    return sample_batch(logits_row.expand(draws, -1), [params] * draws, seeded(range(draws)))


def expected_distribution(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's own warpers, in generate's order, give the truncated renormalised distribution."""
    scores = logits_row.unsqueeze(0).float()
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0].double()


# ---------------------------------------------------------------- resolve_sampling


HF_LIKE_DEFAULTS = SimpleNamespace(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)


@pytest.mark.parametrize(
    ("job", "defaults", "expected"),
    [
        pytest.param({}, HF_LIKE_DEFAULTS,
                     SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=20),
                     id="unset-fields-take-model-defaults"),
        pytest.param({"do_sample": False, "temperature": 1.2, "top_p": 0.5, "top_k": 3,
                      "seed": 7}, HF_LIKE_DEFAULTS,
                     SamplingParams(do_sample=False, temperature=1.2, top_p=0.5, top_k=3,
                                    seed=7),
                     id="job-values-win"),
        pytest.param({"top_k": 0}, HF_LIKE_DEFAULTS,
                     SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=0),
                     id="job-zero-top-k-is-a-value-not-unset"),
        pytest.param({"temperature": 0.9}, SimpleNamespace(), SamplingParams(
            do_sample=False, temperature=0.9, top_p=1.0, top_k=0), id="no-model-defaults-hf"),
        pytest.param({"seed": 11}, SimpleNamespace(do_sample=None, temperature=None, top_p=None,
                                                   top_k=None, seed=99),
                     SamplingParams(do_sample=False, seed=11),
                     id="none-defaults-fall-back-and-seed-is-the-jobs"),
    ],
)
def test_resolve_sampling(job, defaults, expected):
    assert resolve_sampling(GenerationParams(**job), defaults) == expected


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    ("dtype", "rows", "vocab"),
    [
        pytest.param(torch.float32, 1, 50, id="one-row-float32"),
        pytest.param(torch.float32, 7, 1000, id="seven-rows-float32"),
        pytest.param(torch.bfloat16, 5, 4096, id="bfloat16"),
        pytest.param(torch.float16, 3, 300, id="float16"),
    ],
)
def test_greedy_rows_equal_argmax(dtype, rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)).to(dtype)
    assert sample_batch(logits, [GREEDY] * rows, [None] * rows) == logits.argmax(-1).tolist()


def test_empty_batch_picks_nothing():
    assert sample_batch(torch.zeros(0, 10), [], []) == []


def test_non_contiguous_logits_like_the_last_position_of_a_forward():
    hidden = torch.randn(4, 3, 200, generator=torch.Generator().manual_seed(0))
    last = hidden[:, -1, :]
    assert not last.is_contiguous()
    params = [GREEDY, QWEN3, GREEDY, QWEN3]
    assert (sample_batch(last, params, [None, *seeded([1]), None, *seeded([2])])
            == sample_batch(last.contiguous(), params, [None, *seeded([1]), None, *seeded([2])]))


# ---------------------------------------------------------------- reproducibility


TARGETS = [
    pytest.param(QWEN3, id="qwen3-defaults"),
    pytest.param(SamplingParams(do_sample=True, temperature=1.5, top_p=1.0, top_k=50),
                 id="top-k-only"),
    pytest.param(SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, top_k=0),
                 id="top-p-without-top-k"),
    pytest.param(SamplingParams(do_sample=True, temperature=1.0), id="plain"),
    pytest.param(SamplingParams(do_sample=True, top_k=3), id="small-k"),
]
# Neighbours differ in every way that could change the batch's shapes: greedy rows, larger k,
# top-k off with and without top-p.
NEIGHBOURS = [
    GREEDY,
    SamplingParams(do_sample=True, temperature=0.7, top_p=0.8, top_k=200),
    SamplingParams(do_sample=True, temperature=1.0, top_p=0.5, top_k=0),
    SamplingParams(do_sample=True, temperature=2.0),
    GREEDY,
    SamplingParams(do_sample=True, top_k=1),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("position", [0, 3, len(NEIGHBOURS)], ids=["first", "middle", "last"])
def test_a_seeded_row_draws_the_same_alone_and_in_a_mixed_batch(target, position):
    vocab = 2000
    noise = torch.Generator().manual_seed(5)
    steps = [torch.randn(len(NEIGHBOURS) + 1, vocab, generator=noise) for _ in range(6)]

    alone_generator = torch.Generator().manual_seed(1234)
    alone = [sample_batch(step[position:position + 1], [target], [alone_generator])[0]
             for step in steps]

    params = [*NEIGHBOURS[:position], target, *NEIGHBOURS[position:]]
    generators = [None if not p.do_sample else torch.Generator().manual_seed(100 + i)
                  for i, p in enumerate(params)]
    generators[position] = torch.Generator().manual_seed(1234)
    batched = [sample_batch(step, params, generators)[position] for step in steps]

    assert batched == alone
    assert len(set(alone)) > 1 or target.top_k == 1  # the steps really sampled


@pytest.mark.parametrize("target", TARGETS)
def test_sample_token_is_a_one_row_sample_batch(target):
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(9))
    params = [QWEN3, target, GREEDY]
    batched = sample_batch(logits, params, [*seeded([1, 2]), None])
    assert sample_token(logits[1], target, torch.Generator().manual_seed(2)) == batched[1]
    assert sample_token(logits[2], GREEDY, None) == batched[2] == int(logits[2].argmax())


# ---------------------------------------------------------------- support


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(SamplingParams(do_sample=True, top_k=1), id="k1"),
        pytest.param(SamplingParams(do_sample=True, temperature=5.0, top_k=1), id="k1-hot"),
        pytest.param(SamplingParams(do_sample=True, temperature=2.0, top_p=0.99, top_k=1),
                     id="k1-with-top-p"),
    ],
)
def test_top_k_one_equals_argmax(params):
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(3))
    assert sample_batch(logits, [params] * 64, seeded(range(64))) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("top_k", "temperature"),
    [
        pytest.param(2, 1.0, id="k2"),
        pytest.param(20, 0.6, id="k20-qwen-temperature"),
        pytest.param(20, 10.0, id="k20-flat"),
        pytest.param(999, 1.0, id="k-one-below-vocab"),
    ],
)
def test_top_k_restricts_support(top_k, temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(top_k))
    allowed = set(torch.topk(logits, top_k).indices.tolist())
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k)
    drawn = set(draw_many(logits, params, 2000))
    assert drawn <= allowed
    assert len(drawn) >= min(top_k, 15)


def test_top_k_keeps_tokens_tied_with_the_kth_best_as_hf_does():
    logits = torch.zeros(40)
    logits[[5, 9]] = 3.0
    logits[[1, 2, 3, 20, 33]] = 1.0  # k=3 lands inside this tie: HF keeps all five
    params = SamplingParams(do_sample=True, temperature=0.2, top_k=3)
    expected = expected_distribution(logits, params)
    assert set(torch.nonzero(expected).flatten().tolist()) == {1, 2, 3, 5, 9, 20, 33}
    drawn = set(draw_many(logits, SamplingParams(do_sample=True, temperature=3.0, top_k=3), 3000))
    assert drawn == {1, 2, 3, 5, 9, 20, 33}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_past_the_largest_k_in_the_batch_are_fetched_too(dtype):
    logits = torch.zeros(2, 300, dtype=dtype)
    logits[0, 100:200] = 1.0  # a hundred-way tie at the top, k=2
    params = [SamplingParams(do_sample=True, top_k=2), SamplingParams(do_sample=True, top_k=4)]
    drawn = {tuple(sample_batch(logits, params, seeded([i, i + 5000]))) for i in range(400)}
    assert {first for first, _ in drawn} <= set(range(100, 200))
    assert len({first for first, _ in drawn}) > 80


@pytest.mark.parametrize(
    ("params", "nucleus"),
    [
        # Best first the probabilities are .40 .25 .15 .10 .06 .04.
        pytest.param(SamplingParams(do_sample=True, top_p=0.3), {0}, id="p.3-best-only"),
        pytest.param(SamplingParams(do_sample=True, top_p=1e-9, top_k=4), {0},
                     id="tiny-p-keeps-the-best"),
        pytest.param(SamplingParams(do_sample=True, top_p=0.6), {0, 1}, id="p.6"),
        pytest.param(SamplingParams(do_sample=True, top_p=0.75), {0, 1, 2}, id="p.75"),
        pytest.param(SamplingParams(do_sample=True, top_p=0.97), {0, 1, 2, 3, 4, 5}, id="p.97"),
        # Over the top three only (.5 .3125 .1875), 0.75 is reached by two tokens.
        pytest.param(SamplingParams(do_sample=True, top_p=0.75, top_k=3), {0, 1},
                     id="p.75-over-k3"),
        pytest.param(SamplingParams(do_sample=True, top_p=0.95, top_k=4), {0, 1, 2, 3},
                     id="p.95-over-k4"),
    ],
)
def test_top_p_restricts_support_to_the_nucleus(params, nucleus):
    logits = known_logits()[0]
    ranked = best_first(logits)
    drawn = set(draw_many(logits, params, 3000))
    assert drawn == {ranked[i] for i in nucleus}
    hf_support = set(torch.nonzero(expected_distribution(logits, params)).flatten().tolist())
    assert drawn == hf_support


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(SamplingParams(do_sample=True), id="plain"),
        pytest.param(SamplingParams(do_sample=True, temperature=0.5), id="cold"),
        pytest.param(SamplingParams(do_sample=True, temperature=2.0), id="hot"),
        pytest.param(SamplingParams(do_sample=True, top_k=3), id="top-k"),
        pytest.param(SamplingParams(do_sample=True, top_p=0.8), id="top-p-without-top-k"),
        pytest.param(SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=4),
                     id="qwen3-shape"),
    ],
)
def test_draws_follow_the_truncated_renormalised_distribution(params):
    logits = known_logits()[0]
    expected = expected_distribution(logits, params)
    draws = 20_000
    counts = torch.bincount(torch.tensor(draw_many(logits, params, draws)),
                            minlength=len(PROBS)).double()
    support = expected > 0
    assert bool((counts[~support] == 0).all())
    wanted = expected[support] * draws
    chi_square = float(((counts[support] - wanted) ** 2 / wanted).sum())
    # Seeds are fixed so this is deterministic; 22.5 is the 0.1 % tail for 5 degrees of freedom.
    assert chi_square < 22.5, (counts.tolist(), wanted.tolist())


def test_temperature_sharpens_and_flattens():
    logits = known_logits()[0]
    best = best_first(logits)[0]

    def share_of_best(temperature: float) -> float:
        params = SamplingParams(do_sample=True, temperature=temperature)
        drawn = draw_many(logits, params, 4000)
        return drawn.count(best) / len(drawn)

    cold, neutral, hot = share_of_best(0.3), share_of_best(1.0), share_of_best(5.0)
    assert cold > 0.75 and abs(neutral - PROBS[0]) < 0.03 and hot < 0.25
    assert set(draw_many(logits, SamplingParams(do_sample=True, temperature=0.01), 500)) == {best}


# ---------------------------------------------------------------- mixed batches


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(8, 5000, generator=torch.Generator().manual_seed(4))
    top_p_only = SamplingParams(do_sample=True, top_p=0.9)
    params = [GREEDY, QWEN3, top_p_only, GREEDY, SamplingParams(do_sample=True), QWEN3,
              GREEDY, SamplingParams(do_sample=True, top_k=1)]
    generators = [None if not p.do_sample else torch.Generator().manual_seed(i)
                  for i, p in enumerate(params)]
    tokens = sample_batch(logits, params, generators)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 3, 6, 7)] == [argmax[i] for i in (0, 3, 6, 7)]
    for row in (1, 2, 5):
        support = torch.nonzero(expected_distribution(logits[row], params[row])).flatten()
        assert tokens[row] in support.tolist()


@pytest.mark.parametrize(
    "top_k",
    [pytest.param(0, id="k0"), pytest.param(-1, id="k-negative"),
     pytest.param(6, id="k-equals-vocab"), pytest.param(60, id="k-above-vocab")],
)
def test_top_k_off_with_top_p_uses_the_full_vocabulary(top_k):
    logits = known_logits()[0]
    params = SamplingParams(do_sample=True, top_p=0.75, top_k=top_k)
    ranked = best_first(logits)
    assert set(draw_many(logits, params, 2000)) == {ranked[0], ranked[1], ranked[2]}


def test_rows_with_and_without_top_k_in_one_batch_each_get_their_own_truncation():
    logits = known_logits(4)
    ranked = best_first(logits[0])
    params = [SamplingParams(do_sample=True, top_p=0.75),
              SamplingParams(do_sample=True, top_p=0.75, top_k=3),
              SamplingParams(do_sample=True, top_k=2),
              SamplingParams(do_sample=True)]
    seen: list[set[int]] = [set(), set(), set(), set()]
    for i in range(1500):
        for row, token in enumerate(sample_batch(logits, params, seeded(range(4 * i, 4 * i + 4)))):
            seen[row].add(token)
    assert seen == [{ranked[0], ranked[1], ranked[2]}, {ranked[0], ranked[1]},
                    {ranked[0], ranked[1]}, set(ranked)]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("params", "generators", "message"),
    [
        pytest.param([GREEDY], [None, None], "one of each per row", id="too-many-generators"),
        pytest.param([GREEDY, GREEDY, GREEDY], [None, None], "one of each per row",
                     id="too-many-params"),
        pytest.param([GREEDY, SamplingParams(do_sample=True, temperature=0.0)],
                     [None, torch.Generator()], "temperature must be > 0", id="zero-temperature"),
    ],
)
def test_bad_calls_are_refused(params, generators, message):
    with pytest.raises(ValueError, match=message):
        sample_batch(torch.zeros(2, 10), params, generators)
