"""The native CPU decode attention kernel: exact attention over each row's own blocks, read in
place from the paged pool; built once per source, compiler and CPU; a failed build falls back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from worker.engine import native
from worker.engine.runner import _blocks_of, _decode_attention


def _case(dtype, *, rows, heads, kv_heads, dim, block, lengths=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(1, 90, (rows,), generator=generator).tolist()
    width = -(-max(lengths) // block)
    num_blocks = rows * width + 3
    tables = torch.randperm(num_blocks, generator=generator)[: rows * width].view(rows, width)
    pool = (kv_heads, num_blocks * block, dim)
    keys = torch.randn(pool, generator=generator).to(dtype)
    values = torch.randn(pool, generator=generator).to(dtype)
    # As transformers hands it over: [tokens, heads, dim] seen through a transpose.
    query = torch.randn(1, rows, heads, dim, generator=generator).to(dtype).transpose(1, 2)
    return query, keys, values, tables, lengths


def _reference(query, keys, values, tables, lengths, block, scale):
    """Float64, one row and head at a time, straight from the definition."""
    _, heads, rows, dim = query.shape
    group = heads // keys.shape[0]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r, length in enumerate(lengths):
        positions = torch.arange(length)
        slots = tables[r][positions // block] * block + positions % block
        for h in range(heads):
            k, v = keys[h // group, slots].double(), values[h // group, slots].double()
            weights = torch.softmax(k @ query[0, h, r].double() * scale, dim=0)
            out[r, h] = weights @ v
    return out


def _native(query, keys, values, tables, lengths, block, scale, out=None):
    rows = query.shape[2]
    out = query.new_full((rows, query.shape[1], query.shape[3]), 7.0) if out is None else out
    kernel = native.load()
    assert kernel is not None, "the native kernel did not build"
    kernel(query[0].transpose(0, 1), keys, values, tables.to(torch.int32).contiguous(),
           torch.tensor(lengths, dtype=torch.int32), out, block, scale)
    return out


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "dim", "block"), [
    (5, 9, 3, 64, 16),  # the demo model's attention: 3 query heads per KV head
    (7, 16, 8, 128, 16),  # Qwen3-0.6B's
    (3, 4, 4, 32, 4),  # no grouping
    (4, 8, 1, 64, 1),  # one KV head for all; a block per position
    (1, 32, 4, 80, 32),
    (3, 8, 2, 128, 16),  # four heads per KV head (Llama 3 8B's grouping)
    (2, 4, 1, 96, 8),  # a head size without its own copy in the AVX512-BF16 unit
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_attention_computed_from_its_definition(rows, heads, kv_heads, dim,
                                                                  block, dtype):
    query, keys, values, tables, lengths = _case(dtype, rows=rows, heads=heads,
                                                 kv_heads=kv_heads, dim=dim, block=block)
    scale = dim ** -0.5
    got = _native(query, keys, values, tables, lengths, block, scale)
    expected = _reference(query, keys, values, tables, lengths, block, scale)
    # float32: summation order only; bfloat16: the output's own rounding (8 bits of mantissa).
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


def test_lengths_on_and_around_block_edges_and_a_single_position():
    block = 4
    lengths = [1, 3, 4, 5, 8, 9]
    query, keys, values, tables, _ = _case(torch.float32, rows=len(lengths), heads=6, kv_heads=2,
                                           dim=16, block=block, lengths=lengths)
    got = _native(query, keys, values, tables, lengths, block, 0.25)
    torch.testing.assert_close(
        got.double(), _reference(query, keys, values, tables, lengths, block, 0.25),
        atol=1e-5, rtol=1e-5)
    # A single position attends to itself only: the output is its value.
    first_slot = int(tables[0, 0]) * block
    torch.testing.assert_close(got[0, :3], values[0, first_slot].expand(3, -1))


def test_the_kernel_equals_the_torch_path_the_engine_falls_back_to():
    rows, heads, kv_heads, dim, block = 6, 9, 3, 64, 16
    query, keys, values, tables, lengths = _case(torch.float32, rows=rows, heads=heads,
                                                 kv_heads=kv_heads, dim=dim, block=block)
    width = tables.shape[1]
    num_blocks = keys.shape[1] // block
    index = (torch.arange(kv_heads).view(-1, 1, 1) * num_blocks + tables).reshape(-1)
    k = _blocks_of(keys, block).index_select(0, index).view(kv_heads, rows, -1, dim)
    v = _blocks_of(values, block).index_select(0, index).view(kv_heads, rows, -1, dim)
    outside = torch.arange(width * block) >= torch.tensor(lengths).unsqueeze(1)
    mask = torch.zeros(outside.shape).masked_fill(outside, float("-inf"))
    q = query[0].view(kv_heads, heads // kv_heads, rows, dim).transpose(1, 2)
    torch_path = _decode_attention(q, k, v, mask, dim ** -0.5).permute(1, 0, 2, 3)
    torch.testing.assert_close(_native(query, keys, values, tables, lengths, block, dim ** -0.5),
                               torch_path.reshape(rows, heads, dim))


def test_it_writes_its_rows_of_out_and_nothing_else():
    query, keys, values, tables, lengths = _case(torch.float32, rows=3, heads=4, kv_heads=2,
                                                 dim=8, block=2)
    out = torch.full((5, 4, 8), 7.0)
    _native(query, keys, values, tables, lengths, 2, 1.0, out=out[:3])
    assert torch.equal(out[3:], torch.full((2, 4, 8), 7.0))
    assert not torch.equal(out[:3], torch.full((3, 4, 8), 7.0))


def test_a_query_strided_along_its_head_vectors_is_taken_too():
    query, keys, values, tables, lengths = _case(torch.float32, rows=3, heads=4, kv_heads=2,
                                                 dim=8, block=2)
    strided = query.transpose(-1, -2).contiguous().transpose(-1, -2)  # dim is the slow axis
    assert strided.stride(-1) != 1
    torch.testing.assert_close(_native(strided, keys, values, tables, lengths, 2, 1.0),
                               _native(query, keys, values, tables, lengths, 2, 1.0))


def test_shapes_it_cannot_take_are_refused_not_guessed():
    query, keys, values, tables, lengths = _case(torch.float32, rows=2, heads=4, kv_heads=2,
                                                 dim=8, block=2)
    with pytest.raises(ValueError, match="refused"):
        _native(query, keys, values, tables, [0, 3], 2, 1.0)  # a row with no position
    with pytest.raises(ValueError, match="layouts or dtypes"):
        _native(query, keys.half(), values.half(), tables, lengths, 2, 1.0)
    assert native.DecodeKernel.takes(torch.bfloat16, torch.device("cpu"), 128)
    assert not native.DecodeKernel.takes(torch.float16, torch.device("cpu"), 64)
    assert not native.DecodeKernel.takes(torch.float32, torch.device("cpu"), 1024)
    assert not native.DecodeKernel.takes(torch.float32, torch.device("cuda"), 64)


# --- prefill chunks: causal attention of a chunk's tokens over their row's blocks

def _chunk_case(dtype, *, tokens, start, heads, kv_heads, dim, block, seed=0):
    """A row whose positions 0..start+tokens-1 are in the pool (in shuffled blocks) and a chunk
    of `tokens` queries at positions start.., as transformers hands them: [tokens, heads, dim]
    seen through a transpose."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-(start + tokens) // block)
    num_blocks = blocks + 3
    table = torch.randperm(num_blocks, generator=generator)[:blocks].to(torch.int32)
    pool = (kv_heads, num_blocks * block, dim)
    keys = torch.randn(pool, generator=generator).to(dtype)
    values = torch.randn(pool, generator=generator).to(dtype)
    query = torch.randn(heads, tokens, dim, generator=generator).to(dtype).transpose(0, 1)
    return query, keys, values, table


def _chunk_reference(query, keys, values, table, start, block, scale):
    """Float64, straight from the definition: token t attends positions 0..start + t."""
    tokens, heads, _ = query.shape
    group = heads // keys.shape[0]
    positions = torch.arange(start + tokens)
    slots = table[positions // block].long() * block + positions % block
    future = positions.unsqueeze(0) > (start + torch.arange(tokens)).unsqueeze(1)
    out = torch.empty(query.shape, dtype=torch.float64)
    for h in range(heads):
        k, v = keys[h // group, slots].double(), values[h // group, slots].double()
        scores = (query[:, h].double() @ k.T * scale).masked_fill(future, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v
    return out


@pytest.mark.parametrize(("tokens", "start", "heads", "kv_heads", "dim", "block"), [
    (37, 0, 9, 3, 64, 16),  # the demo model, a first chunk shorter than a tile
    (100, 300, 9, 3, 64, 16),  # a later chunk of a long prompt
    (40, 23, 16, 8, 128, 4),  # Qwen3-0.6B's heads; a start inside a block
    (16, 16, 4, 4, 32, 16),  # whole tiles, no grouping
    (1, 0, 8, 1, 80, 1),  # one token alone; one KV head; a block per position
    (50, 7, 12, 2, 16, 8),  # six query heads per KV head (padded tile rows)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefill_kernel_equals_causal_attention_from_its_definition(
        tokens, start, heads, kv_heads, dim, block, dtype):
    query, keys, values, table = _chunk_case(dtype, tokens=tokens, start=start, heads=heads,
                                             kv_heads=kv_heads, dim=dim, block=block)
    kernel = native.load()
    assert kernel is not None, "the native kernel did not build"
    out = torch.full((tokens + 2, heads, dim), 7.0, dtype=dtype)
    kernel.prefill(query, keys, values, table, start, out[1:-1], block, dim ** -0.5)
    expected = _chunk_reference(query, keys, values, table, start, block, dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[1:-1].double(), expected, atol=tolerance, rtol=tolerance)
    # Its own rows of out and nothing else.
    assert (out[0] == 7).all() and (out[-1] == 7).all()


def test_the_prefill_kernel_refuses_what_it_cannot_take():
    kernel = native.load()
    assert kernel is not None
    query, keys, values, table = _chunk_case(torch.float32, tokens=4, start=2, heads=4,
                                             kv_heads=2, dim=8, block=2)
    out = torch.empty(4, 4, 8)
    with pytest.raises(ValueError, match="layouts or dtypes"):  # the table ends too soon
        kernel.prefill(query, keys, values, table[:2], 2, out, 2, 1.0)
    with pytest.raises(ValueError, match="layouts or dtypes"):
        kernel.prefill(query.half(), keys.half(), values.half(), table, 2, out.half(), 2, 1.0)
    many, keys1, values1, table1 = _chunk_case(torch.float32, tokens=4, start=0, heads=34,
                                               kv_heads=2, dim=8, block=2)
    with pytest.raises(ValueError, match="refused"):  # 17 query heads per KV head
        kernel.prefill(many, keys1, values1, table1, 0, torch.empty(4, 34, 8), 2, 1.0)


def test_loading_the_kernel_leaves_the_process_floating_point_state_alone():
    # A shared library linked with -ffast-math by GCC < 13 sets flush-to-zero and
    # denormals-are-zero for the whole process when loaded: subnormals would vanish everywhere.
    code = ("import torch; from worker.engine import native; assert native.load() is not None; "
            "tiny = 5e-324; assert tiny * 1.0 != 0.0, 'subnormal doubles flushed'; "
            "assert (torch.tensor([1e-40]) * 1.0).item() != 0.0, 'subnormal floats flushed'; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_a_build_is_reused_for_the_same_source_compiler_and_cpu(tmp_path):
    first = native.build(out_dir=tmp_path)
    built_at = first.stat().st_mtime_ns
    assert native.build(out_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == built_at  # not compiled again
    other = tmp_path / "other.c"
    other.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    assert native.build(other, out_dir=tmp_path) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial files


def test_a_folder_others_can_write_is_not_built_in_nor_loaded_from(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    built = native.build(out_dir=shared)
    shared.chmod(0o777)  # as /tmp is: anyone could replace the library
    with pytest.raises(native.NativeBuildError, match="not private"):
        native.build(out_dir=shared)
    shared.chmod(0o700)
    built.chmod(0o666)
    with pytest.raises(native.NativeBuildError, match="not private"):
        native.build(out_dir=shared)
    fresh = native.build(out_dir=tmp_path / "fresh")
    assert (fresh.parent.stat().st_mode & 0o777) == 0o700


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.build(broken, out_dir=tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="no-such-compiler"):
        native.build(out_dir=tmp_path)


def test_an_engine_without_a_compiler_falls_back_to_the_torch_path_and_says_so(tmp_path,
                                                                               tiny_model_dir):
    # A fresh process: the library is loaded once per process.
    script = textwrap.dedent(f"""
        import logging, torch
        from pathlib import Path
        logging.basicConfig(level=logging.WARNING)
        from worker.engine import Engine, EngineLimits, EngineRequest
        from worker.manifest import read_manifest
        from worker.model import load_model
        from worker.pipeline.sampling import SamplingParams
        model_dir = Path({str(tiny_model_dir)!r})
        loaded = load_model(model_dir, read_manifest(model_dir), device=torch.device("cpu"),
                            dtype="float32")
        limits = EngineLimits(kernel_cache_dir=Path({str(tmp_path / "cache")!r}))
        engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=limits).start()
        out = engine.generate(EngineRequest([1, 2, 3], 4, SamplingParams(do_sample=False),
                                            frozenset()))
        engine.stop()
        print("native", engine.runner.native_decode, "tokens", len(out.token_ids))
    """)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "native False tokens 4" in done.stdout
    assert "native CPU attention kernel unavailable" in done.stderr
    assert "no-such-compiler" in done.stderr
