"""Paged attention read in place through flex_attention (respec/flex_paged.py) against the landed
gather + SDPA path: the same outputs for decode, verify and prompt shapes with GQA, stale slots past
a row's length, unused table entries and a padding row; the same tokens from an engine run eager
and traced whole-step as CUDA graphs need it. Compiled by inductor for a CPU it is refused. (Fake
CUDA cannot run it: flex_attention's fake implementation calls into CUDA, which a CPU build lacks.)"""

from __future__ import annotations

import pytest
import torch

from respec import flex_paged
from respec.drafters.history import HistoryDrafter
from respec.engine import RolloutEngine, SamplingParams
from respec.flex_paged import Q_BLOCK, tile_options
from respec.kv_cache import pool_bytes_for
from respec.paged_attention import PagedKV, paged_attention

from tests.test_cuda_path import GraphInspector, REPEATING, drafter_of, rollout, whole_step_engine


def paged_case(T: int, h: int = 6, hkv: int = 2, seed: int = 0):
    """Four rows over a shared pool of 16-slot blocks: lengths 5, 37, 80 and a padding row; the
    pool's every slot random, so a key the mask should hide (past a row's newest position, in an
    unused block, in the null block) would change the output."""
    g = torch.Generator().manual_seed(seed)
    n, bs, d = 24, 16, 32
    pool = torch.randn(2, n, bs, hkv, d, generator=g)
    lengths = [5, 37, 80]
    W = 7
    tables = torch.zeros(4, W, dtype=torch.int64)
    free = (torch.randperm(n - 1, generator=g) + 1).tolist()
    for b, length in enumerate(lengths):
        used = -(-(length + T) // bs)
        tables[b, :used] = torch.tensor(free[:used])
        del free[:used]
    positions = torch.zeros(4, T, dtype=torch.int64)
    positions[:3] = torch.tensor(lengths).view(-1, 1) + torch.arange(T)
    q = torch.randn(4, T, h, d, generator=g)
    return q, pool, tables, positions


@pytest.mark.parametrize("T", [1, 4, 20])  # decode, a k = 3 verify, a prompt chunk
def test_flex_reads_what_the_gather_reads(T):
    q, pool, tables, positions = paged_case(T)
    gather = PagedKV.build([pool], tables, positions, q.shape[2] // pool.shape[3]).layer(0)
    flex = PagedKV.build([pool], tables, positions, q.shape[2] // pool.shape[3], attention="flex").layer(0)
    assert flex.mask is None and flex.block_mask is not None
    want, got = paged_attention(q, gather), paged_attention(q, flex)
    torch.testing.assert_close(got[:3], want[:3], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got[3]).all()  # the padding row: finite


def test_flex_hides_what_the_mask_hides():
    """Power: a key past a row's newest query, or in the null block, changes nothing; a key it
    sees changes its output."""
    q, pool, tables, positions = paged_case(4)
    kv = lambda p: PagedKV.build([p], tables, positions, 3, attention="flex").layer(0)
    base = paged_attention(q, kv(pool))
    hidden = pool.clone()
    row1_last = int(positions[1, -1])  # row 1's newest query position; the slot after it is stale
    block, slot = tables[1, (row1_last + 1) // 16], (row1_last + 1) % 16
    hidden[:, block, slot] += 100.0
    hidden[:, 0] += 100.0  # the null block
    torch.testing.assert_close(paged_attention(q, kv(hidden))[:3], base[:3])
    seen = pool.clone()
    seen[:, tables[1, 0], 0] += 100.0  # row 1's first key
    assert not torch.allclose(paged_attention(q, kv(seen))[1], base[1])


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (10, 0)])  # A100, H100 / H200, B200
def test_flex_tiles_fit_inductors_cuda_kernel(monkeypatch, capability):
    """Inductor's main flex kernel on CUDA refuses a mask whose kv block (the cache's 16 slots) is
    not a multiple of its BLOCK_N, or whose query block (128) is not a multiple of its BLOCK_M. The
    kernel options `flex_paged_attention` passes (`tile_options`, checked as they reach
    flex_attention) make every default config of these GPUs admissible, for decode, verify and
    prompt widths, at the head sizes and dtypes of the GPU check's shapes, with tiles tl.dot accepts
    (>= 16) and one query tile for a step's queries. Power: without them, these GPUs' default config
    for SmolLM2's heads (64, bf16) is refused."""
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    configs = lambda d, dtype: CUDAConfigHeuristic().get_flex_attn_fwd_configs(d, dtype)  # noqa: E731
    tiles = lambda opts, c: (opts.get("BLOCK_M", c.block_m), opts.get("BLOCK_N", c.block_n))  # noqa: E731
    admissible = lambda m, n: Q_BLOCK % m == 0 and 16 % n == 0  # noqa: E731
    assert not all(admissible(*tiles({}, c)) for c in configs(64, torch.bfloat16))
    for T in (1, 4, 9, 20, 128):
        opts = tile_options(16, T)
        for d in (64, 128):
            for dtype in (torch.bfloat16, torch.float32):
                for c in configs(d, dtype):
                    m, n = tiles(opts, c)
                    assert admissible(m, n) and m >= 16 and n >= 16 and m >= T
    for T in (1, 4, 20):  # as they reach flex_attention
        opts = tile_options(16, T)
        q, pool, tables, positions = paged_case(T)
        seen = []
        real = flex_paged.flex_attention
        monkeypatch.setattr(flex_paged, "flex_attention",
                            lambda *a, **k: seen.append(k["kernel_options"]) or real(*a, **k))
        flex = PagedKV.build([pool], tables, positions, q.shape[2] // pool.shape[3], attention="flex").layer(0)
        paged_attention(q, flex)
        monkeypatch.setattr(flex_paged, "flex_attention", real)
        assert seen == [opts]
    assert tile_options(16, object())["BLOCK_M"] == 64  # a symbolic count of queries: one fixed tile


def test_flex_engine_tokens_equal_the_gather_engine(tiny):
    """Plain decoding steps and k = 3 verifies (the history drafter's engine runs both) with flex
    attention, eager and traced whole-step (the KV pools still the only mutated inputs, all static,
    one graph per step function across batch sizes), give the gather path's tokens."""
    want = rollout(whole_step_engine(tiny, "history"), "history")
    assert rollout(whole_step_engine(tiny, "history", attention="flex"), "history") == want
    inspector = GraphInspector()
    engine = whole_step_engine(tiny, "history", inspector, attention="flex")
    assert rollout(engine, "history") == want
    assert engine.stats.sd_steps > 0 and engine.stats.decode_steps > 0
    for g in inspector.graphs:
        assert g["mutated"] and set(g["mutated"]) <= g["static"]
    assert len(inspector.graphs) == 2  # the decode step and the k = 3 verify


def test_flex_with_a_pool_of_fewer_blocks_than_the_graphs_table_width(tiny):
    """A pool of 12 blocks: whole-step graphs declare the block-table width up to 16 (a power of two
    at least the 11 blocks a row can hold), more than the pool has. The block mask must not tie the
    width to the pool's size (its kv indices sliced in did: a guard against the declared range, an
    error when traced); the tokens are the gather path's."""
    cfg = tiny.cfg
    small = pool_bytes_for(rows=11, tokens=16, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                           head_dim=cfg.head_dim, dtype=torch.float32)
    want = rollout(whole_step_engine(tiny, "history", kv_cache_bytes=small), "history")
    engine = whole_step_engine(tiny, "history", GraphInspector(), attention="flex", kv_cache_bytes=small)
    assert engine.blocks.num_blocks == 12 and engine.steps.max_width == 16
    assert rollout(engine, "history") == want
    assert engine.stats.sd_steps > 0


def test_flex_refuses_a_verify_wider_than_its_query_block(tiny):
    """The mask has one query block of 128 tokens: a replay verify of 128 drafts (129 queries) is
    refused when the engine is built; 127 drafts fit."""
    kw = dict(kv_cache_bytes=16 << 20, attention="flex", drafter=HistoryDrafter(), num_draft_tokens=3)
    with pytest.raises(ValueError, match="--attention flex verifies at most 128 tokens a step"):
        RolloutEngine(tiny, replay_k=128, **kw)
    assert RolloutEngine(tiny, replay_k=127, **kw).replay_k == 127


def test_flex_compiled_by_inductor_on_a_cpu_is_refused(tiny):
    engine = RolloutEngine(tiny, kv_cache_bytes=16 << 20, attention="flex", compile_mode="whole")
    with pytest.raises(ValueError, match="--attention flex runs compiled on CUDA only"):
        engine.generate(REPEATING[:1], [SamplingParams(max_new_tokens=2)])


def test_flex_on_regional_graphs_with_a_dynamic_batch_is_refused(tiny):
    """Its block mask is built outside the regional graphs, at the step's rows: traced with a
    dynamic batch that was a constraint violation at the first step (the rows pinned to one size);
    it is refused in one line instead (the GPU check skips its flex bench on that fallback)."""
    engine = whole_step_engine(tiny, "history", GraphInspector(), mode="regional-dynamic", attention="flex")
    with pytest.raises(ValueError, match="--attention flex does not run with --compile-mode regional-dynamic"):
        rollout(engine, "history")
    params = [SamplingParams(max_new_tokens=12, seed=i, temperature=0.0, stop_on_eos=False) for i in range(2)]
    tokens = lambda engine: [c.token_ids for c in engine.generate(REPEATING[:2], params)]  # noqa: E731
    regional = whole_step_engine(tiny, "history", GraphInspector(), mode="regional", attention="flex")
    assert tokens(regional) == tokens(whole_step_engine(tiny, "history"))  # (static regional graphs: flex runs)
    assert regional.stats.sd_steps > 0
