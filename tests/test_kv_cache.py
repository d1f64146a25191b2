"""The block manager's invariants under random use, and paged attention against contiguous SDPA."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.kv_cache import BlockManager, OutOfBlocks, PagedKVCache
from respec.paged_attention import PagedKV, causal_attention, paged_attention, write_kv

OPS = st.lists(
    st.tuples(st.sampled_from(["allocate", "append", "append_each", "truncate", "free"]), st.integers(0, 5), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 4, 16]), ops=OPS)
def test_block_manager_invariants(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    model: dict[int, int] = {}  # sequence -> length, the reference
    for op, seq, n in ops:
        free_before = bm.num_free
        try:
            if op == "allocate" and seq not in model:
                bm.allocate(seq, n)
                model[seq] = n
            elif op == "append" and seq in model:
                bm.append(seq, n)
                model[seq] += n
            elif op == "append_each" and seq in model:  # (the batched form, one sequence at a time)
                bm.append_each([seq], [n])
                model[seq] += n
            elif op == "truncate" and seq in model:
                n = min(n, model[seq])
                bm.truncate(seq, n)
                model[seq] -= n
            elif op == "free" and seq in model:
                bm.free(seq)
                del model[seq]
        except OutOfBlocks:
            assert bm.num_free == free_before, "a failed allocation must not leak blocks"
            assert op in ("allocate", "append", "append_each")
        bm.check_invariants()
        assert bm.lengths == model
    for seq in list(model):
        bm.free(seq)
    assert bm.num_free == num_blocks - 1


def test_truncate_returns_whole_blocks():
    bm = BlockManager(10, 4)
    bm.allocate(0, 9)  # 3 blocks
    assert len(bm.tables[0]) == 3
    bm.truncate(0, 1)  # 8 tokens: 2 blocks
    assert len(bm.tables[0]) == 2 and bm.num_free == 7
    with pytest.raises(ValueError):
        bm.truncate(0, 9)


def _scatter_into_pages(cache, k, v, seq_ids, lengths):
    """Write contiguous per-sequence K/V (B, S, Hkv, D) through the paged cache's own write path."""
    B, S = k.shape[:2]
    for s, n in zip(seq_ids, lengths):
        cache.blocks.allocate(s, n)
    width = max(len(cache.blocks.tables[s]) for s in seq_ids)
    tables = cache.block_tables(seq_ids, width)
    positions = torch.arange(S).expand(B, S)
    valid = positions < torch.tensor(lengths).unsqueeze(1)
    kv = PagedKV.build(cache.pools, tables, positions, n_rep=1, valid=valid)
    write_kv(kv.layer(0), k, v)
    return tables


@pytest.mark.parametrize("n_rep", [1, 3])
def test_paged_attention_equals_contiguous(n_rep):
    torch.manual_seed(0)
    hkv, d, bs = 2, 16, 4
    lengths = [5, 13, 1]
    B, S = len(lengths), max(lengths)
    cache = PagedKVCache(num_layers=1, num_kv_heads=hkv, head_dim=d, capacity_bytes=1 << 20, block_size=bs,
                         dtype=torch.float32)
    random.seed(0)
    random.shuffle(cache.blocks.free_blocks)  # tables point all over the pool, not at consecutive blocks
    q = torch.randn(B, S, hkv * n_rep, d)
    k, v = torch.randn(B, S, hkv, d), torch.randn(B, S, hkv, d)
    tables = _scatter_into_pages(cache, k, v, list(range(B)), lengths)
    positions = torch.arange(S).expand(B, S)
    kv = PagedKV.build(cache.pools, tables, positions, n_rep=n_rep)
    # Reading only (the write above already stored everything): attention over the pool.
    out = paged_attention(q, kv.layer(0))
    ref = causal_attention(q, k, v)
    for b, n in enumerate(lengths):  # positions past a sequence's length are padding: not compared
        torch.testing.assert_close(out[b, :n], ref[b, :n], rtol=1e-5, atol=1e-5)


def test_decode_query_sees_only_its_own_length():
    """One query per sequence at its last position, with stale garbage past each length."""
    torch.manual_seed(1)
    hkv, d, bs = 1, 8, 4
    lengths = [6, 3]
    cache = PagedKVCache(num_layers=1, num_kv_heads=hkv, head_dim=d, capacity_bytes=1 << 20, block_size=bs,
                         dtype=torch.float32)
    cache.pools[0].normal_()  # garbage everywhere, including the null block
    k, v = torch.randn(2, 6, hkv, d), torch.randn(2, 6, hkv, d)
    tables = _scatter_into_pages(cache, k, v, [0, 1], lengths)
    positions = torch.tensor([[n - 1] for n in lengths])
    q = torch.randn(2, 1, hkv, d)
    out = paged_attention(q, PagedKV.build(cache.pools, tables, positions, n_rep=1).layer(0))
    for b, n in enumerate(lengths):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b].transpose(0, 1), k[b, :n].transpose(0, 1), v[b, :n].transpose(0, 1))
        torch.testing.assert_close(out[b], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_attention_equals_gather_and_sdpa(dtype):
    """The compiled CPU decode path (`pool_attention`: keys and values read through the block table,
    no gather copy, products and sums) against gather + SDPA, eager and compiled, with GQA, tables all
    over the pool and garbage past every sequence's length."""
    from respec.paged_attention import pool_attention

    torch.manual_seed(2)
    hkv, n_rep, d, bs = 2, 3, 16, 4
    lengths = [7, 2, 13]
    cache = PagedKVCache(num_layers=1, num_kv_heads=hkv, head_dim=d, capacity_bytes=1 << 20, block_size=bs, dtype=dtype)
    random.seed(1)
    random.shuffle(cache.blocks.free_blocks)
    cache.pools[0].normal_()
    k, v = torch.randn(3, 13, hkv, d, dtype=dtype), torch.randn(3, 13, hkv, d, dtype=dtype)
    tables = _scatter_into_pages(cache, k, v, [0, 1, 2], lengths)
    positions = torch.tensor([[n - 1] for n in lengths])
    layer = PagedKV.build(cache.pools, tables, positions, n_rep=n_rep).layer(0)
    q = torch.randn(3, 1, hkv * n_rep, d, dtype=dtype)
    ref = paged_attention(q, layer)  # eager: gather + SDPA
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pool_attention(q, layer), ref, **tol)
    compiled = torch.compile(paged_attention, fullgraph=True, dynamic=False)(q, layer)  # takes the pool path
    torch.testing.assert_close(compiled, ref, **tol)
    # power: a query that sees one key fewer gives another answer
    short = PagedKV.build(cache.pools, tables, positions - 1, n_rep=n_rep).layer(0)
    assert not torch.allclose(pool_attention(q, short).float(), ref.float(), **tol)


def test_cache_capacity_in_bytes():
    cache = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, capacity_bytes=10 * 2 * 2 * 2 * 4 * 8 * 4,
                         block_size=4, dtype=torch.float32)
    assert cache.blocks.num_blocks == 10
    with pytest.raises(ValueError, match="at least 2"):
        PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, capacity_bytes=100, block_size=4)


def test_default_pool_is_sized_for_the_device(monkeypatch):
    from respec.kv_cache import default_pool_bytes

    assert default_pool_bytes("cpu") == 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 << 30, 80 << 30))  # free, total
    assert default_pool_bytes("cuda:0") == int(0.4 * (60 << 30))
    assert default_pool_bytes("cpu", most=5 << 20) == default_pool_bytes("cuda:0", most=5 << 20) == 5 << 20


def test_a_pool_sized_for_its_rows_holds_them_and_no_more():
    """`pool_bytes_for`: the bytes of exactly `rows` sequences of `tokens` tokens (whole blocks) and
    the null block, in the cache's own layout, a drafter's pools included."""
    from respec.kv_cache import pool_bytes_for

    shape = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    for draft in (None, (1, 2, 4)):
        size = pool_bytes_for(rows=3, tokens=10, draft_shape=draft, **shape)
        cache = PagedKVCache(capacity_bytes=size, draft_shape=draft, **shape)
        assert cache.blocks.num_blocks == 3 * 3 + 1
        for s in range(3):
            cache.blocks.allocate(s, 10)
        assert cache.blocks.num_free == 0


def test_a_cpu_pool_takes_memory_only_where_it_is_written():
    """A CPU pool's pages are resident once written, not when the pool is made (`zeroed`): a 512 MiB
    pool costs about nothing until blocks are used; it reads as zeros, and what is written stays.
    The check has power: the same tensor made by torch.zeros is resident at once."""
    from respec.host_memory import release_free_memory, rss_bytes
    from respec.kv_cache import zeroed

    shape = (2, 4096, 16, 4, 64)  # K and V x 4096 blocks x 16 slots x 4 heads x 64 dims in fp32: 128 MiB a layer
    release_free_memory()
    before = rss_bytes()
    cache = PagedKVCache(num_layers=4, num_kv_heads=4, head_dim=64, capacity_bytes=512 << 20, block_size=16,
                         dtype=torch.float32)
    assert tuple(cache.pools[0].shape) == shape
    assert rss_bytes() - before < 32 << 20  # 512 MiB made
    for pool in cache.pools:
        pool[:, 1:9] = 1.5  # 8 blocks a layer written
    assert rss_bytes() - before < 64 << 20
    assert float(cache.pools[2][:, 1:9].mean()) == 1.5 and not cache.pools[2][:, 9:].any()
    del cache
    release_free_memory()
    base = rss_bytes()
    eager = torch.zeros(shape)
    assert rss_bytes() - base > 100 << 20  # the power of the check: torch.zeros writes every page
    del eager
    assert not zeroed((0, 3), torch.bfloat16, "cpu").numel() and zeroed((2, 3), torch.bfloat16, "cpu").dtype == torch.bfloat16
