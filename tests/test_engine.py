"""The rollout engine: greedy == transformers' generate, preemption, sampling, reproducibility."""

import pytest
import torch

from models.loading import load_model
from respec.engine import RolloutEngine, SamplingParams
from respec.sampling import filter_logits, sample, sampling_logprobs

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The sea",
    "Question: What is 12 + 30? Think step by step, then give the answer.\nAnswer:",
]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, stop_on_eos=False)


def test_greedy_batch_matches_transformers_generate(smollm2, smollm2_hf, tokenizer):
    """Three prompts of different lengths in one batch; transformers runs each alone (no padding)."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    engine = RolloutEngine(smollm2, kv_cache_bytes=64 << 20, eos_token_ids=[tokenizer.eos_token_id], eager=True)
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))
    for p, o in zip(prompts, ours):
        with torch.no_grad():  # stops at EOS (kept in the output) like the engine
            ref = smollm2_hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)[0, len(p):].tolist()
        assert o.token_ids == ref, (tokenizer.decode(o.token_ids), tokenizer.decode(ref))
    assert {o.finish_reason for o in ours} == {"stop", "length"}  # both ways of ending are covered


def test_logprobs_are_the_models(smollm2, tokenizer):
    """The log-prob reported for each greedy token is log_softmax of a full forward at that position."""
    prompt = tokenizer.encode(PROMPTS[0])
    engine = RolloutEngine(smollm2, kv_cache_bytes=64 << 20, eager=True)
    (out,) = engine.generate([prompt], greedy(8))
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = smollm2.logits(smollm2(ids)).log_softmax(-1)[0]
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_more_requests_than_kv_capacity(tiny):
    """A pool far too small for the batch: sequences are preempted and recomputed, none dropped,
    and the greedy tokens are the same as with ample room."""
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
    ample = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True)
    want = ample.generate(prompts, greedy(30))
    bytes_per_block = ample.cache.bytes_per_block
    small = RolloutEngine(tiny, kv_cache_bytes=24 * bytes_per_block, block_size=4, eager=True)
    got = small.generate(prompts, greedy(30))
    assert small.stats.preemptions > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(g.token_ids) == 30 for g in got)
    assert small.blocks.num_free == small.blocks.num_blocks - 1  # everything was given back


def test_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=11, stop_on_eos=False)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True)
    alone = engine.generate([[5, 6, 7]], params)[0]
    others = [SamplingParams(max_new_tokens=9, temperature=0.5, seed=s, stop_on_eos=False) for s in range(4)]
    batch = engine.generate([[1, 2], [5, 6, 7], [9] * 17, [4]], [others[0], params, others[1], others[2]])
    assert batch[1].token_ids == alone.token_ids
    assert batch[1].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    again = engine.generate([[5, 6, 7]], SamplingParams(**{**params.__dict__, "seed": 12}))[0]
    assert again.token_ids != alone.token_ids


def test_eos_stops_and_frees(tiny):
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True)
    (free_run,) = engine.generate([[3, 4, 5]], greedy(12))
    eos = free_run.token_ids[4]
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eos_token_ids=[eos], eager=True)
    (out,) = engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=12, temperature=0.0))
    first = free_run.token_ids.index(eos)
    assert out.token_ids == free_run.token_ids[: first + 1] and out.finish_reason == "stop"
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_sampler_follows_the_distribution():
    """20k draws of the exponential-trick sampler (counter noise, one seed each) against p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    lp = sampling_logprobs(logits.expand(n, -1), torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n),
                           use_filter=False)
    tokens, _ = sample(lp, torch.ones(n), torch.arange(n), torch.full((n,), 7))
    counts = torch.bincount(tokens, minlength=6).double()
    expected = n * logits.softmax(-1).double()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom: p = 0.001


def test_top_k_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for top_k, top_p, min_p in [(0, 0.8, 0.0), (5, 1.0, 0.0), (10, 0.5, 0.0), (3, 0.95, 0.0), (0, 1.0, 0.05),
                                (0, 1.0, 0.3), (10, 0.9, 0.1)]:
        ours = filter_logits(logits, torch.full((6,), top_k), torch.full((6,), top_p), torch.full((6,), min_p))
        ref = logits.clone()
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        if min_p:
            ref = MinPLogitsWarper(min_p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (top_k, top_p, min_p)
        assert min_p == 0 or torch.isinf(ours).sum() > torch.isinf(filter_logits(
            logits, torch.full((6,), top_k), torch.full((6,), top_p))).sum()  # min-p removed tokens of its own


def _rows_ending_mid_run(tiny, prompts, n):
    """EOS ids that end some rows partway through a run of steps (greedy): each row's first token
    that is new at its 5th new token or later and that no row samples among its first four, with
    the row and where it appears."""
    free = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, run_ahead=0).generate(prompts, greedy(n))
    early = {t for o in free for t in o.token_ids[:4]}
    picks = []
    for row, o in enumerate(free):
        at = next((j for j, t in enumerate(o.token_ids) if j >= 4 and t not in early and t not in o.token_ids[:j]), None)
        if at is not None:
            picks.append((o.token_ids[at], row, at))
    assert len(picks) >= 2
    return picks


@pytest.mark.parametrize("eager, late", [(True, False), (True, True), (False, False)])
def test_run_ahead_gives_the_step_by_step_tokens(tiny, monkeypatch, eager, late):
    """Plain steps run ahead of the host (respec/run_ahead.py: rows' state on the device, their tokens
    read when the run ends, a flag per step saying a row sampled EOS, read at once or, as on a GPU,
    a step late with the extra step's tokens dropped) give the step-by-step loop's tokens,
    log-probabilities and finish reasons: greedy and sampled, rows ending at EOS mid-run and at their
    token limits, a row that ignores EOS, and a pool small enough that runs shorten and rows are
    preempted. Power: runs happened, rows ended by EOS inside them, and the late reads ran a step past it.
    Compiled: greedy, the large pool, one graph for every batch bucket (`regional-dynamic`, the batch
    dimension dynamic as on a GPU: a graph per bucket took 90 s of the suite), the eager cases covering
    preemption; compiled sampled steps are checked against eager in tests/test_compile.py."""
    import respec.run_ahead as ahead

    monkeypatch.setattr(ahead, "READ_LATE", late)
    runs = []
    real = ahead.run_ahead
    monkeypatch.setattr(ahead, "run_ahead", lambda e, seqs, steps, stop=None: (runs.append(steps), real(e, seqs, steps, stop)))
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(6)]
    picks = _rows_ending_mid_run(tiny, prompts, 40)
    eos = [t for t, _, _ in picks]
    for temperature in (0.0, 1.0) if eager else (0.0,):
        params = [SamplingParams(max_new_tokens=14 + 6 * i, temperature=temperature, top_p=0.9, seed=i,
                                 stop_on_eos=i != 0) for i in range(6)]
        outs = {}
        for ra in (0, 32):
            for pool in (64 << 20, 20) if eager else (64 << 20,):
                engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, max_batch=8, eos_token_ids=eos,
                                       eager=eager, compile_mode=None if eager else "regional-dynamic", run_ahead=ra)
                if pool == 20:  # blocks for fewer rows than run at once
                    engine = RolloutEngine(tiny, kv_cache_bytes=20 * engine.cache.bytes_per_block, block_size=4,
                                           eos_token_ids=eos, eager=eager, run_ahead=ra)
                outs[ra, pool] = engine.generate(prompts, params)
                assert engine.blocks.num_free == engine.blocks.num_blocks - 1
                if pool == 20:
                    assert engine.stats.preemptions > 0
        want = outs[0, 64 << 20]
        for (ra, pool), got in outs.items():
            assert [o.token_ids for o in got] == [o.token_ids for o in want], (ra, pool)
            assert [o.finish_reason for o in got] == [o.finish_reason for o in want], (ra, pool)
            # log-probs against the same pool (a preempted row's recompute rounds them apart), up to
            # the rounding of a wider block table (a run reserves its slots up front)
            for g, w in zip(got, outs[0, pool]):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5), (ra, pool)
        if temperature == 0.0:  # rows end at EOS partway, while others run on
            ended = [(row, at) for _, row, at in picks if row and at + 1 < params[row].max_new_tokens]
            assert len(ended) >= 2
            assert all(want[row].finish_reason == "stop" and len(want[row].token_ids) == at + 1 for row, at in ended)
    assert runs and max(runs) > 8


def test_released_weights_refuse_to_decode_until_synced():
    """`release_weights` (the trainer calls it while the actor trains) drops the CPU engine's packed
    weights; generating then is refused in one line, and after `sync_weights` the engine decodes
    with the model's current weights: the same tokens as a fresh engine."""
    from compile.cpu_linear import PackedLinear, packing_available

    if not packing_available("cpu", torch.float32):
        pytest.skip("no oneDNN packing on this CPU build")
    model = load_model("tiny", dtype=torch.float32)
    engine = RolloutEngine(model, kv_cache_bytes=8 << 20, max_batch=4, eager=True)
    prompts = [[5, 6, 7], [9, 10]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = [c.token_ids for c in engine.generate(prompts, params)]
    packed = [m for m in engine.runner.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.packed.numel() > 0 for m in packed)
    engine.release_weights()
    assert all(m.packed.numel() == 0 for m in packed)
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.generate(prompts, params)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # new weights, as an optimizer step would write
    engine.sync_weights()
    after = [c.token_ids for c in engine.generate(prompts, params)]
    fresh = RolloutEngine(model, kv_cache_bytes=8 << 20, max_batch=4, eager=True)
    assert after == [c.token_ids for c in fresh.generate(prompts, params)] and after != before


def test_a_batch_limit_is_what_decodes_at_once():
    """`limit_batch(n)`: at most n rows decode at once (the rest wait and are admitted as rows
    finish); the tokens are unchanged (greedy, fp32); a limit outside [1, max_batch] is refused."""
    model = load_model("tiny", dtype=torch.float32)
    engine = RolloutEngine(model, kv_cache_bytes=8 << 20, max_batch=4, eager=True)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [3, 4]]
    params = SamplingParams(max_new_tokens=5, temperature=0.0, stop_on_eos=False)
    together = engine.generate(prompts, params)
    assert max(together.stats.batch_sizes) == 4
    engine.limit_batch(1)
    apart = engine.generate(prompts, params)
    assert set(apart.stats.batch_sizes) == {1}
    assert [c.token_ids for c in apart] == [c.token_ids for c in together]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="batch limit"):
            engine.limit_batch(bad)


def test_a_released_rollout_copy_is_made_again_by_its_sync():
    """The trainer releases the rollout copy's weights while the actor trains (on a CPU); `sync`
    makes them again in the same Parameter objects, so the engine over the copy (its packed view
    sharing them) decodes with the new weights: the tokens of a fresh copy and engine."""
    from respec.distributed import RolloutCopy

    actor = load_model("tiny", dtype=torch.float32)
    copy = RolloutCopy(actor, dtype=torch.bfloat16, sharded=False)
    params = dict(copy.model.named_parameters())
    engine = RolloutEngine(copy.model, kv_cache_bytes=8 << 20, max_batch=4, eager=True)
    prompts, sampling = [[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=6, temperature=0.0)
    before = [c.token_ids for c in engine.generate(prompts, sampling)]
    engine.release_weights()
    copy.release()
    assert all(p.numel() == 0 for p in copy.model.parameters())
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(-1.0)  # an optimizer step
    copy.sync()
    engine.sync_weights()
    assert dict(copy.model.named_parameters()) == params  # the same objects, new storage
    assert all(tuple(p.shape) == tuple(a.shape) for p, a in zip(copy.model.parameters(), actor.parameters()))
    after = [c.token_ids for c in engine.generate(prompts, sampling)]
    fresh = RolloutEngine(RolloutCopy(actor, dtype=torch.bfloat16, sharded=False).model, kv_cache_bytes=8 << 20,
                          max_batch=4, eager=True)
    assert after == [c.token_ids for c in fresh.generate(prompts, sampling)] and after != before
