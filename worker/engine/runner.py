"""The model runner: one forward per step over a ragged batch; the only code that calls the model.

The step's tokens (each decoding row's last token, then each prefill chunk) are flattened into
input_ids [1, T] with their own position ids. The model runs as transformers wrote it, except
for attention: `paged_attention`, registered with transformers' AttentionInterface, writes the
step's keys and values into the paged KV pool and computes each row's attention over its own
blocks only. Everything a layer needs (slots to write, gather indices, masks) is computed once
per step (`StepContext`) and shared by all layers:

- decoding rows on CPU: one call per layer of the native kernel (`worker/engine/native`),
  which reads every row's blocks in place through its block table (no gather, no padding);
- decoding rows elsewhere (CUDA, or the kernel off or unbuilt), sorted by context length and
  cut into groups of similar lengths: a group's keys/values are gathered from the head-major
  pool (one index_select) into a tensor padded to its longest row, [kv_heads, rows, longest,
  head_dim], and attended at once, the query heads of a KV head folded into the query length
  (no repeat of K/V for grouped-query attention): SDPA on CUDA, two batched matmuls and a
  float32 softmax on CPU (`_decode_attention`); one group for all rows padded everything to
  the longest context, and gathering plus attending over that padding cost more than the rest
  of the step;
- prefill chunks on CPU: one call each of the native prefill kernel, causal over the row's
  blocks in place (the chunk's own keys are written first), tiled as flash attention is;
- prefill chunks elsewhere: one SDPA call each, causal; a chunk with nothing before it attends
  to its own keys directly (is_causal), a later chunk to its row's gathered context.

Only each sampling row's last hidden state goes through the LM head (`logits_to_keep` as
indices). On CPU, Llama-family models run the engine's own forward instead of transformers'
(`fast_path.py`: the same math, weights prepacked for oneDNN), attending through the same
`paged_attention`. The model's own attention implementation is restored after every forward,
so other users of the same model object (HF `generate`) are untouched; `paged_attention` also
falls back to SDPA when called outside an engine step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine import fast_path as fast
from worker.engine import native
from worker.engine.kv_cache import KVCacheManager, KVStorage, head_dim_of, kv_heads_of
from worker.engine.scheduler import ScheduledRow

ATTENTION_NAME = "chatqueue_paged"
log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    start: int  # where its tokens are in the step's flattened batch
    end: int
    context: torch.Tensor | None  # slots of its row's positions 0..last (None: starts at 0)
    mask: torch.Tensor | None  # [tokens, context]: True where a query may attend
    # The native kernel's way (CPU): the row's block table (int32) and its first position.
    native: tuple[native.DecodeKernel, torch.Tensor, int] | None = None


@dataclass
class _DecodeGroup:
    """Single-token rows start..end (their tokens' places in the step) of similar context
    lengths, attended in one SDPA call over their contexts gathered and padded to the longest."""

    start: int
    end: int
    index: torch.Tensor  # [kv_heads * rows * blocks]: pool blocks per head and row (pad: 0)
    mask: torch.Tensor | None  # [rows, blocks * block], float32: 0 on a row's positions, -inf
    # past its length


@dataclass
class _NativeDecode:
    """All single-token rows 0..rows of the step, attended by the native kernel in place."""

    kernel: native.DecodeKernel
    rows: int
    tables: torch.Tensor  # [rows, blocks], int32: each row's block table (padded with 0)
    lengths: torch.Tensor  # [rows], int32: positions each row attends


@dataclass
class StepContext:
    """Everything the attention layers need for one step, computed once."""

    storage: KVStorage
    slots: torch.Tensor  # [T]: where each new token's key and value are written
    decode_groups: list[_DecodeGroup] = field(default_factory=list)
    native_decode: _NativeDecode | None = None
    chunks: list[_Chunk] = field(default_factory=list)
    context_cells: int = 0  # sum over rows of the positions attended (what memory scales with)


_local = threading.local()


def current_step() -> StepContext | None:
    """The step being run on this thread, if any (tests use it to size injected faults)."""
    return getattr(_local, "step", None)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, dim], key/value [1, kv_heads, T, dim] -> [1, T, heads, dim]."""
    step = current_step()
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    key_pool, value_pool = step.storage.layer(module.layer_idx, key)
    key_pool.index_copy_(1, step.slots, key[0])
    value_pool.index_copy_(1, step.slots, value[0])
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group_size = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    out = query.new_empty(tokens, heads, dim)
    if (decode := step.native_decode) is not None:
        decode.kernel(query[0, :, :decode.rows].transpose(0, 1), key_pool, value_pool,
                      decode.tables, decode.lengths, out[:decode.rows], step.storage.block_size,
                      scale)
    for group in step.decode_groups:
        rows = group.end - group.start
        # [kv_heads, rows, group_size, dim]: a KV head's query heads take the query-length axis,
        # so grouped-query attention needs no repeat of K/V.
        q = query[0, :, group.start:group.end].view(kv_heads, group_size, rows, dim)
        q = q.transpose(1, 2)
        shape = (kv_heads, rows, -1, dim)
        k = _blocks_of(key_pool, step.storage.block_size).index_select(0, group.index).view(shape)
        v = _blocks_of(value_pool, step.storage.block_size).index_select(0, group.index).view(shape)
        o = _decode_attention(q, k, v, group.mask, scale)  # [kv_heads, rows, group_size, dim]
        out[group.start:group.end] = o.permute(1, 0, 2, 3).reshape(rows, heads, dim)
    for chunk in step.chunks:
        if chunk.native is not None:
            kernel, table, position = chunk.native
            kernel.prefill(query[0, :, chunk.start:chunk.end].transpose(0, 1), key_pool,
                           value_pool, table, position, out[chunk.start:chunk.end],
                           step.storage.block_size, scale)
            continue
        q = query[:, :, chunk.start:chunk.end]
        if chunk.context is None:
            k, v = key[:, :, chunk.start:chunk.end], value[:, :, chunk.start:chunk.end]
        else:
            k = key_pool.index_select(1, chunk.context).unsqueeze(0)
            v = value_pool.index_select(1, chunk.context).unsqueeze(0)
            if group_size > 1 and q.is_cuda:
                # CUDA's memory-efficient kernel takes a mask but not enable_gqa (math would).
                k, v = k.repeat_interleave(group_size, 1), v.repeat_interleave(group_size, 1)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=chunk.mask, is_causal=chunk.context is None, scale=scale,
            enable_gqa=group_size > 1 and k.shape[1] != heads)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _blocks_of(pool: torch.Tensor, block: int) -> torch.Tensor:
    """The pool [kv_heads, slots, head_dim] seen as [kv_heads * num_blocks, block * head_dim]."""
    return pool.view(-1, block * pool.shape[-1])


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Single-token rows' attention: q [kv_heads, rows, group, dim] over k, v [kv_heads, rows,
    positions, dim]; `mask` [rows, positions] additive (float32), or None.

    On CUDA, SDPA's fused kernels. On CPU, two batched matmuls and a float32 softmax: SDPA's
    CPU kernel pays a fixed cost per (row, head) pair that dominates for a 1-token query
    (measured: 1.3-1.5x the time of the matmuls, at 32 and 64 rows of the demo model)."""
    if q.is_cuda:
        attn_mask = None if mask is None else mask.to(q.dtype)[None, :, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.add_(mask[None, :, None, :])
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


AttentionInterface.register(ATTENTION_NAME, paged_attention)


class ModelRunner:
    def __init__(self, model: Any, kv: KVCacheManager, *, native_kernels: bool = True,
                 kernel_cache_dir: Path | None = None, fast_path: bool = True) -> None:
        self.model = model
        self.device = model.device
        self.kv = kv
        self.storage = KVStorage(kv.num_blocks, kv.block_size)
        self.kv_heads = kv_heads_of(model.config)
        _check_attention_layers(model.config)
        dtype = getattr(model, "dtype", None) or torch.get_default_dtype()
        # The native kernel for single-token rows on CPU (worker/engine/native), when it builds.
        self.kernel = None
        if native_kernels and native.DecodeKernel.takes(dtype, self.device,
                                                        head_dim_of(model.config)):
            self.kernel = native.load(kernel_cache_dir)
        self.native_decode = self.kernel is not None
        self.native_prefill = self.kernel is not None  # prefill chunks through it too
        log.info("decode attention: %s", "native CPU kernel" if self.native_decode else
                 "torch (SDPA on CUDA, gathered matmuls on CPU)")
        log.info("prefill attention: %s", "native CPU kernel" if self.native_prefill else
                 "SDPA")
        # The Llama family's own forward on CPU (worker/engine/fast_path.py), when it applies.
        # Its small ops fused in C (worker/engine/native/layer_ops.c), when they build -- only
        # built for a model the fast path takes.
        self.layer_ops = (native.load_layer_ops(kernel_cache_dir)
                          if fast_path and native_kernels and fast.supports(model) is None
                          and native.LayerOps.takes(dtype, self.device) else None)
        self.fast_path, how = (
            fast.build(model, paged_attention, self.layer_ops) if fast_path
            else (None, "transformers' forward (the fast path is turned off)"))
        self.use_fast_path = self.fast_path is not None
        log.info("model forward: %s", how)

    @torch.inference_mode()
    def execute(self, rows: Sequence[ScheduledRow]) -> tuple[list[ScheduledRow], torch.Tensor]:
        """Run one step; returns the rows that sample, in order, and their logits [rows, vocab].

        `rows` are reordered: single-token rows first, by context length (for decode groups)."""
        ordered = sorted(rows, key=lambda row: (row.count != 1, row.start))
        step, input_ids, positions, keep = self._prepare(ordered)
        sampling = [row for row in ordered if row.samples]
        with _running(step), _attention(self.model.config):
            if self.use_fast_path and self.fast_path is not None:
                return sampling, self.fast_path(input_ids[0], positions[0], keep)
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                             logits_to_keep=keep)
        return sampling, out.logits[0]

    def _prepare(self, rows: list[ScheduledRow]) -> tuple[StepContext, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
        block = self.kv.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        decode_rows = sum(1 for row in rows if row.count == 1)
        tables = [self.kv.table(row.job) for row in rows]
        for row, table in zip(rows, tables, strict=True):
            stop = row.start + row.count
            ids.extend(row.job.tokens[row.start:stop])
            positions.extend(range(row.start, stop))
            slots.extend(table[p // block] * block + p % block for p in range(row.start, stop))
            if row.samples:
                keep.append(len(ids) - 1)
        device = self.device
        step = StepContext(self.storage, _tensor(slots, device),
                           context_cells=sum(row.start + row.count for row in rows))
        if self.native_decode and self.kernel is not None and decode_rows:
            step.native_decode = _native_decode(self.kernel, rows[:decode_rows],
                                                tables[:decode_rows], block)
        else:
            start = 0
            for end in _similar_lengths([row.start + 1 for row in rows[:decode_rows]]):
                step.decode_groups.append(_decode_group(
                    rows[start:end], tables[start:end], start, block, self.kv.num_blocks,
                    self.kv_heads, device))
                start = end
        start = decode_rows
        for row, table in zip(rows[start:], tables[start:], strict=True):
            if self.native_prefill and self.kernel is not None:
                used = table[: -(-(row.start + row.count) // block)]
                step.chunks.append(_Chunk(start, start + row.count, None, None, (
                    self.kernel, torch.tensor(used, dtype=torch.int32), row.start)))
            else:
                step.chunks.append(_chunk(row, table, start, block, device))
            start += row.count
        return (step, _tensor(ids, device).unsqueeze(0), _tensor(positions, device).unsqueeze(0),
                _tensor(keep or [len(ids) - 1], device))


# A decode group's padding may cost up to this share of its own work before it is split: one
# SDPA call per layer costs about as much as attending over a few hundred positions here.
_GROUP_SPREAD = 1.5


def _similar_lengths(lengths: list[int]) -> list[int]:
    """Where groups of rows end, the rows sorted by context length ascending."""
    ends: list[int] = []
    first = 0
    for i, length in enumerate(lengths):
        if length > _GROUP_SPREAD * lengths[first] + 64:
            ends.append(i)
            first = i
    return [*ends, len(lengths)] if lengths else []


def _decode_group(rows: list[ScheduledRow], tables: list[list[int]], start: int, block: int,
                  num_blocks: int, kv_heads: int, device: torch.device) -> _DecodeGroup:
    """Whole blocks are gathered (one index per KV head and block, not per position: at memory
    bandwidth, a third less time than per-slot indices), so a row spans its blocks' positions
    and the mask hides what lies past its length."""
    lengths = [row.start + 1 for row in rows]
    width = -(-max(lengths) // block)
    padded = torch.tensor(_padded_tables(tables, width))
    # Row r's block b of KV head h is row h * num_blocks + block of the pool seen as
    # [kv_heads * num_blocks, block * head_dim].
    index = (torch.arange(kv_heads).view(-1, 1, 1) * num_blocks + padded).reshape(-1)
    mask = None
    if min(lengths) < width * block:
        outside = torch.arange(width * block) >= torch.tensor(lengths).unsqueeze(1)
        mask = torch.zeros(outside.shape).masked_fill(outside, float("-inf")).to(device)
    return _DecodeGroup(start, start + len(rows), index.to(device), mask)


def _native_decode(kernel: native.DecodeKernel, rows: list[ScheduledRow],
                   tables: list[list[int]], block: int) -> _NativeDecode:
    lengths = [row.start + 1 for row in rows]
    padded = _padded_tables(tables, -(-max(lengths) // block))
    return _NativeDecode(kernel, len(rows), torch.tensor(padded, dtype=torch.int32),
                         torch.tensor(lengths, dtype=torch.int32))


def _padded_tables(tables: list[list[int]], width: int) -> list[list[int]]:
    """Each row's first `width` block ids, padded with block 0 (never read: past its length)."""
    return [table[:width] + [0] * (width - len(table[:width])) for table in tables]


def _chunk(row: ScheduledRow, table: list[int], start: int, block: int,
           device: torch.device) -> _Chunk:
    end = start + row.count
    if row.start == 0:
        return _Chunk(start, end, None, None)
    length = row.start + row.count
    position = torch.arange(length)
    blocks = torch.tensor(table[: -(-length // block)])
    context = blocks[position // block] * block + position % block
    queries = torch.arange(row.start, length).unsqueeze(1)
    mask = position.unsqueeze(0) <= queries
    return _Chunk(start, end, context.to(device), mask.to(device))


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@contextmanager
def _running(step: StepContext) -> Iterator[None]:
    _local.step = step
    try:
        yield
    finally:
        _local.step = None


@contextmanager
def _attention(config: Any) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def _check_attention_layers(config: Any) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(
            f"the engine's paged attention handles full-attention layers only; this model has "
            f"{sorted(kinds)}")
    if getattr(text, "attn_logit_softcapping", None):
        raise NotImplementedError("the engine's paged attention has no logit soft-capping")
    # A window set without layer_types (Mistral 7B v0.1: 4096 of 32768 positions) applies to
    # every layer; Qwen2 keeps one in its config with use_sliding_window off.
    window = getattr(text, "sliding_window", None)
    if (window and getattr(text, "use_sliding_window", True)
            and window < getattr(text, "max_position_embeddings", 0)):
        raise NotImplementedError(
            f"the engine's paged attention has no sliding window; this model attends {window} "
            f"positions back in a context of {text.max_position_embeddings}")
