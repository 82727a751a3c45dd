"""The fast path's fused small ops (worker/engine/native/layer_ops.c) round as transformers' ops.

Each op against the torch expression the fast path runs without it (fast_path._rms_norm,
_rotate, F.silu(gate) * up, x + delta): the same bits, in bfloat16 and float32 (RMSNorm sums its
squares in torch's order), but for float32 SiLU, whose exp is not torch's (within a few ulp).
Odd widths (a vector tail), one row, strided rows, wide rows (the sum's cascade), and what the
ops refuse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine import native
from worker.engine.fast_path import _rms_norm, _rotate

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
ROWS = pytest.mark.parametrize("rows", [1, 7, 300])


@pytest.fixture(scope="module")
def ops() -> native.LayerOps:
    built = native.load_layer_ops()
    assert built is not None, "the layer ops did not build (a C compiler is on every CI machine)"
    return built


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def assert_same(got: torch.Tensor, expected: torch.Tensor, *, exact: bool = True) -> None:
    if exact:
        assert torch.equal(got, expected), f"{(got != expected).sum().item()} elements differ"
    else:
        torch.testing.assert_close(got, expected, rtol=4e-6, atol=1e-6)


@DTYPES
@ROWS
@pytest.mark.parametrize("cols", [576, 37, 4096])
def test_rms_norm_with_and_without_the_residual_add(ops, dtype, rows, cols):
    x = randn(rows, cols, dtype=dtype, seed=1, scale=3.0)
    delta = randn(rows, cols, dtype=dtype, seed=2)
    weight = randn(cols, dtype=dtype, seed=3)
    assert_same(ops.rms_norm(x, weight, 1e-5), _rms_norm(x, weight, 1e-5))
    residual = x.clone()
    normed = ops.rms_norm(residual, weight, 1e-6, delta=delta)
    assert torch.equal(residual, x + delta)  # added in place, rounded as `x + delta` rounds
    assert_same(normed, _rms_norm(x + delta, weight, 1e-6))


@DTYPES
@ROWS
@pytest.mark.parametrize("cols", [1536, 45])
def test_silu_mul_equals_silu_of_the_gate_times_up(ops, dtype, rows, cols):
    # Wide enough (|x| up to ~20) for exp's whole range, and many repeated bfloat16 values.
    gate_up = randn(rows, 2 * cols, dtype=dtype, seed=4, scale=5.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_same(ops.silu_mul(gate_up), F.silu(gate) * up, exact=dtype == torch.bfloat16)


@DTYPES
@ROWS
@pytest.mark.parametrize(("heads", "rotated", "dim"), [(15, 12, 64), (6, 5, 14)])
def test_rotary_in_place_on_the_first_heads_only(ops, dtype, rows, heads, rotated, dim):
    x = randn(rows, heads, dim, dtype=dtype, seed=5)
    cos = randn(rows, dim, dtype=dtype, seed=6)
    sin = randn(rows, dim, dtype=dtype, seed=7)
    expected = _rotate(x[:, :rotated], cos.unsqueeze(1), sin.unsqueeze(1))
    rotated_x = x.clone()
    ops.rotary_(rotated_x, rotated, cos, sin)
    assert_same(rotated_x[:, :rotated], expected)
    assert torch.equal(rotated_x[:, rotated:], x[:, rotated:])


def test_strided_rows_are_read_and_written_where_they_are(ops):
    """A slice of wider rows: each op reads its row stride, and writes nothing outside."""
    wide = randn(9, 100, dtype=torch.bfloat16, seed=8)
    x, delta = wide[:, :40], wide[:, 50:90]
    weight = randn(40, dtype=torch.bfloat16, seed=9)
    expected_x, untouched = x + delta, wide[:, 40:].clone()
    normed = ops.rms_norm(x, weight, 1e-5, delta=delta)
    assert torch.equal(wide[:, :40], expected_x)
    assert torch.equal(wide[:, 40:], untouched)
    assert_same(normed, _rms_norm(expected_x, weight, 1e-5))
    gate_up = wide[:, 10:70]
    gate, up = gate_up.chunk(2, dim=-1)
    assert_same(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize(("call", "message"), [
    (lambda ops: ops.rms_norm(torch.ones(2, 8, dtype=torch.float16),
                              torch.ones(8, dtype=torch.float16), 1e-5), "rms_norm"),
    (lambda ops: ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5,
                              delta=torch.ones(2, 8, dtype=torch.bfloat16)), "rms_norm"),
    (lambda ops: ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5), "weight"),
    (lambda ops: ops.rms_norm(torch.ones(8, 2).t(), torch.ones(8), 1e-5), "strides"),
    (lambda ops: ops.silu_mul(torch.ones(2, 7)), "odd width"),
    (lambda ops: ops.rotary_(torch.ones(2, 3, 8), 4, torch.ones(2, 8), torch.ones(2, 8)),
     "rotary"),
    (lambda ops: ops.rotary_(torch.ones(2, 3, 8), 2, torch.ones(3, 8), torch.ones(3, 8)),
     "rotary"),
])
def test_what_an_op_does_not_take_is_refused_before_the_c_code_sees_it(ops, call, message):
    with pytest.raises(ValueError, match=message):
        call(ops)


def test_the_dtypes_and_devices_it_takes():
    assert native.LayerOps.takes(torch.bfloat16, torch.device("cpu"))
    assert native.LayerOps.takes(torch.float32, torch.device("cpu"))
    assert not native.LayerOps.takes(torch.float16, torch.device("cpu"))
    assert not native.LayerOps.takes(torch.bfloat16, torch.device("cuda"))
