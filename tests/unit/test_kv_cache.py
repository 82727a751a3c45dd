"""The KV-cache manager alone: blocks, tables, prefix-cache keys, reference counts, LRU."""

from __future__ import annotations

import pytest

from worker.engine.job import EngineJob, EngineRequest
from worker.engine.kv_cache import KVCacheManager
from worker.pipeline.sampling import SamplingParams


def job(tokens):
    return EngineJob(EngineRequest(list(tokens), 8, SamplingParams(do_sample=False), frozenset()))


def computed(manager, a_job):
    """The job's prompt has been computed: key its full blocks."""
    a_job.num_computed = len(a_job.tokens)
    manager.cache_computed(a_job)


def test_blocks_are_taken_for_positions_and_all_given_back_when_a_job_ends():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    first = job(range(10))
    assert manager.allocate(first, 10) and len(manager.table(first)) == 3
    assert manager.allocate(first, 12) and len(manager.table(first)) == 3  # still room
    assert manager.allocate(first, 13) and len(manager.table(first)) == 4
    assert manager.free_blocks == 4
    table = manager.table(first)
    assert manager.slot(first, 5) == table[1] * 4 + 1
    manager.free(first)
    assert manager.free_blocks == 8 and manager.table(first) == []


def test_allocation_fails_whole_when_the_pool_is_short():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    a, b = job(range(8)), job(range(8))
    assert manager.allocate(a, 8)
    assert not manager.allocate(b, 8)  # needs 2, 1 free: takes nothing
    assert manager.free_blocks == 1


def test_a_prompt_that_starts_with_cached_blocks_reuses_them():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    system = list(range(100, 110))  # two full blocks and two tokens
    first = job([*system, 1, 2, 3])
    assert manager.match_prefix(first) == 0
    manager.allocate(first, len(first.tokens))
    computed(manager, first)

    second = job([*system, 7, 8])
    assert manager.match_prefix(second) == 8  # the two full blocks; the partial one is not keyed
    assert manager.table(second) == manager.table(first)[:2]
    # A different first block changes every key after it, even with the same later tokens.
    other = job([0, *system[1:], 1, 2, 3])
    assert manager.match_prefix(other) == 0


def test_a_hit_always_leaves_one_token_to_compute():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    first = job(range(8))
    manager.allocate(first, 8)
    computed(manager, first)
    same = job(range(8))
    assert manager.match_prefix(same) == 4  # not 8: the last token's logits pick the next one


def test_shared_blocks_are_reference_counted_and_kept_while_free_until_evicted():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    first = job(range(9))
    manager.allocate(first, 9)
    computed(manager, first)
    second = job(range(9))
    assert manager.match_prefix(second) == 8
    manager.allocate(second, 9)
    manager.free(first)  # the shared blocks stay: the second job holds them
    assert manager.free_blocks == 1
    manager.free(second)
    assert manager.free_blocks == 4
    third = job(range(9))  # freed, but still keyed: a hit
    assert manager.match_prefix(third) == 8
    manager.free(third)
    # Filling the pool with new tokens evicts them (least recently freed first).
    filler = job(range(1000, 1016))
    assert manager.allocate(filler, 16)
    manager.free(filler)
    assert manager.match_prefix(job(range(9))) == 0


def test_unkeyed_blocks_are_reused_before_cached_ones():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    cached = job(range(5))
    manager.allocate(cached, 5)
    computed(manager, cached)  # block 0 keyed, block 1 (partial) not
    manager.free(cached)
    newcomer = job(range(50, 54))
    manager.allocate(newcomer, 4)
    manager.free(newcomer)
    assert manager.match_prefix(job(range(5))) == 4  # the keyed block survived


def test_prefix_caching_off_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=4, prefix_caching=False)
    first = job(range(9))
    manager.allocate(first, 9)
    computed(manager, first)
    assert manager.match_prefix(job(range(9))) == 0


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=0, block_size=16)
