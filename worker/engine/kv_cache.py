"""The KV cache: a pool of fixed-size blocks, a block table per job, prefix caching.

The bookkeeping follows vLLM v1's KVCacheManager: block ids are handed out from a free queue;
a block that becomes full of computed tokens is keyed by (its parent's key, its token ids), so a
later job whose tokens start the same way reuses it instead of computing it again. Blocks are
reference counted; a block nobody holds goes back to the free queue but keeps its key until it
is handed out again, least recently freed first (LRU). Blocks a job held without a key go to
the queue's front: they are worth nothing, so they are reused before any cached block.

The storage (`KVStorage`) is one tensor per layer for keys and one for values, [kv_heads, slots,
head_dim], a slot being block * block_size + offset, allocated on first use with the dtype of
the model's own key states, on the model's device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.job import EngineJob

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the parent's key, this block's token ids)


@dataclass
class _Blocks:
    """One job's share of the pool."""

    table: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)  # keys of its first len(keys) blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._jobs: dict[EngineJob, _Blocks] = {}

    # --- questions
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def table(self, job: EngineJob) -> list[int]:
        blocks = self._jobs.get(job)
        return blocks.table if blocks else []

    def slot(self, job: EngineJob, position: int) -> int:
        table = self._jobs[job].table
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # --- a job's blocks
    def match_prefix(self, job: EngineJob) -> int:
        """Take the cached blocks the job's tokens start with; returns how many tokens they
        hold. At least one token is always left to compute: its logits pick the next token."""
        blocks = self._jobs.setdefault(job, _Blocks())
        if not self.prefix_caching or blocks.table:
            return 0
        usable = (len(job.tokens) - 1) // self.block_size
        parent = 0
        for index in range(usable):
            start = index * self.block_size
            key = (parent, tuple(job.tokens[start:start + self.block_size]))
            block = self._cached.get(key)
            if block is None:
                break
            self._take(block)
            blocks.table.append(block)
            blocks.keys.append(key)
            parent = hash(key)
        return len(blocks.table) * self.block_size

    def allocate(self, job: EngineJob, total_tokens: int) -> bool:
        """Make the job's table cover `total_tokens` positions; False (nothing taken) when the
        pool has too few free blocks."""
        blocks = self._jobs.setdefault(job, _Blocks())
        missing = self.blocks_for(total_tokens) - len(blocks.table)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        for _ in range(missing):
            block, _ = self._free.popitem(last=False)
            if (key := self._key_of[block]) is not None:  # evict what it cached
                self._key_of[block] = None
                if self._cached.get(key) == block:
                    del self._cached[key]
            self._refs[block] = 1
            blocks.table.append(block)
        return True

    def cache_computed(self, job: EngineJob) -> None:
        """Key the job's blocks that are now full of computed tokens, for later jobs to reuse."""
        if not self.prefix_caching:
            return
        blocks = self._jobs[job]
        full = min(job.num_computed // self.block_size, len(blocks.table))
        parent = hash(blocks.keys[-1]) if blocks.keys else 0
        for index in range(len(blocks.keys), full):
            start = index * self.block_size
            key = (parent, tuple(job.tokens[start:start + self.block_size]))
            block = blocks.table[index]
            if key not in self._cached:  # else another job computed the same block first
                self._cached[key] = block
                self._key_of[block] = key
            blocks.keys.append(key)
            parent = hash(key)

    def free(self, job: EngineJob) -> None:
        """Give back the job's blocks (a finished, failed or preempted job)."""
        blocks = self._jobs.pop(job, None)
        if blocks is None:
            return
        # Tail blocks first, so a prefix's last blocks are evicted before its first ones.
        for block in reversed(blocks.table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._key_of[block] is None:
                    self._free.move_to_end(block, last=False)

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1


class KVStorage:
    """Per layer, keys and values of every slot, head-major: [kv_heads, num_slots, head_dim].

    Head-major, so that gathering a batch's slots (`index_select` on dim 1) gives each KV head's
    keys already laid out [kv_heads, rows, positions, head_dim], as attention reads them, with
    no transpose copy (measured on CPU: a decode group's attention 25-35% cheaper than from a
    slot-major pool)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's tensors; `like` ([batch, kv_heads, tokens, head_dim]) sets their shape,
        dtype and device the first time."""
        keys = self.keys.get(index)
        if keys is None:
            shape = (like.shape[1], self.num_slots, like.shape[3])
            keys = self.keys[index] = like.new_zeros(shape)
            self.values[index] = like.new_zeros(shape)
        return keys, self.values[index]


def kv_heads_of(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)


def head_dim_of(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token position needs across the model's layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads_of(config) * head_dim_of(config) * itemsize


def pool_blocks(config: Any, dtype: torch.dtype, device: torch.device, *, block_size: int,
                kv_cache_bytes: int | None, memory_fraction: float, wanted_tokens: int) -> int:
    """How many blocks the pool holds: on CUDA a share of the free memory, elsewhere a byte
    budget (by default no more than `wanted_tokens` positions, capped at 2 GiB)."""
    per_block = kv_bytes_per_token(config, dtype) * block_size
    if kv_cache_bytes is not None:
        budget = kv_cache_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * memory_fraction)
    else:
        budget = min(2 << 30, per_block * -(-wanted_tokens // block_size))
    return max(1, budget // per_block)
