"""Speculative decoding: exact against plain decoding (greedy token for token, sampling in
distribution), rollback bookkeeping under preemption, and bad drafters."""

import dataclasses
import itertools
import math

import pytest
import torch

from models.decoder import PRESETS
from models.drafter import truncated_drafter
from models.loading import random_model
from respec.engine import RolloutEngine, SamplingParams
from respec.sampling import sampling_logprobs
from respec.solver import conditional_acceptance

PROMPTS = [[1, 2, 3, 4, 5], [7] * 30, [9, 8, 7], [40, 41]]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, stop_on_eos=False)


@pytest.mark.parametrize("k", range(1, 7))
def test_greedy_sd_equals_plain_tiny(tiny, k):
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS, greedy(25))
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=truncated_drafter(tiny, 1),
                           num_draft_tokens=k)
    got = engine.generate(PROMPTS, greedy(25))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert engine.stats.sd_steps > 0 and 1 <= engine.stats.accept_len <= k + 1


def test_greedy_sd_equals_plain_smollm2(smollm2, tokenizer):
    prompts = [tokenizer.encode(p) for p in ["The capital of France is", "1, 2, 3, 4, 5,", "def fib(n):\n   "]]
    want = RolloutEngine(smollm2, kv_cache_bytes=64 << 20, eager=True).generate(prompts, greedy(12))
    drafter = truncated_drafter(smollm2, 6)
    for k in range(1, 7):
        engine = RolloutEngine(smollm2, kv_cache_bytes=64 << 20, eager=True, drafter=drafter, num_draft_tokens=k)
        got = engine.generate(prompts, greedy(12))
        assert [g.token_ids for g in got] == [w.token_ids for w in want], k


@pytest.mark.parametrize("k", [1, 4])
def test_identical_drafter_accepts_everything(tiny, k):
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=truncated_drafter(tiny, 4),
                           num_draft_tokens=k)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, stop_on_eos=False))
    assert engine.stats.accept_len == pytest.approx(k + 1, abs=0.25)  # only the final, capped steps are short
    st = engine.stats
    assert conditional_acceptance(st.sd_accepted_at, st.sd_reached_at) == [1.0] * k  # every draft proposed was accepted


# --- losslessness at temperature > 0 -----------------------------------------------------------
SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=4, num_layers=2, max_position_embeddings=64)
N_SAMPLES, LENGTH, PROMPT, SHARPEN = 30_000, 3, [0, 1], 2.0


def exact_sequence_probs(model, temperature, top_p, *, prompt=PROMPT, length=LENGTH, min_p=0.0):
    """Probability of every `length`-token completion under plain sampling (enumerated)."""
    seqs = list(itertools.product(range(SMALL.vocab_size), repeat=length))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    n = len(seqs) * length
    with torch.no_grad():
        logits = model.logits(model(ids))[:, len(prompt) - 1:-1]  # (S, length, V)
        lp = sampling_logprobs(logits.reshape(n, -1), torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                               torch.full((n,), top_p), use_filter=top_p < 1 or min_p > 0,
                               min_p=torch.full((n,), min_p)).view(len(seqs), length, -1)
    tok = torch.tensor(seqs).unsqueeze(-1)
    return {s: p for s, p in zip(seqs, lp.gather(-1, tok).squeeze(-1).sum(-1).exp().tolist())}


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    cells = [s for s in probs if probs[s] * n >= 5]  # pool the rare cells into one
    rare = [s for s in probs if s not in cells]
    obs = [counts.get(s, 0) for s in cells] + [sum(counts.get(s, 0) for s in rare)]
    exp = [probs[s] * n for s in cells] + [sum(probs[s] for s in rare) * n]
    return sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0), len(cells) - (0 if rare else 1)


def sample_sequences(engine, temperature, top_p, min_p=0.0):
    params = [SamplingParams(max_new_tokens=LENGTH, temperature=temperature, top_p=top_p, min_p=min_p, seed=i,
                             stop_on_eos=False) for i in range(N_SAMPLES)]
    out = engine.generate([PROMPT] * N_SAMPLES, params)
    counts: dict = {}
    for o in out:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    return counts


def chi2_quantile_999(dof: int) -> float:
    """99.9% quantile of chi-square(dof), Wilson-Hilferty approximation (z = 3.090)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + 3.090 * a**0.5) ** 3


@pytest.mark.parametrize("verify", ["match", "rejection"])
@pytest.mark.parametrize("temperature,top_p,min_p", [(1.0, 1.0, 0.0), (0.7, 0.9, 0.0), (1.0, 1.0, 0.3)])
def test_sd_sampling_is_lossless(temperature, top_p, min_p, verify):
    """Speculative decoding samples completions with plain sampling's probabilities (chi-square over
    every completion), with an independent small model as the drafter."""
    check_lossless(temperature, top_p, min_p, verify, "layers")


def test_sharpened_head_under_rejection_is_lossless():
    """A head drafting at half the rollout temperature: its q is not the rollout temperature's, and
    rejection sampling divides by the q the draft came from, so the completions keep plain
    sampling's probabilities."""
    check_lossless(1.0, 1.0, 0.0, "rejection", "eagle-sharpened")


def check_lossless(temperature, top_p, min_p, verify, drafter_kind):
    target = random_model(SMALL, seed=3)
    with torch.no_grad():  # sharpen it so the distributions are far from uniform
        target.lm_head.weight.mul_(SHARPEN)
    drafter = _drafter(drafter_kind, target)  # an independent, poor drafter
    probs = exact_sequence_probs(target, temperature, top_p, min_p=min_p)
    if min_p:  # the filter has work to do: some completions are impossible under it
        assert sum(p == 0 for p in probs.values()) > 0
    engine = RolloutEngine(target, kv_cache_bytes=256 << 20, block_size=4, max_batch=512, eager=True,
                           drafter=drafter, num_draft_tokens=2, verify=verify)
    counts = sample_sequences(engine, temperature, top_p, min_p)
    assert 0.2 < engine.stats.accept_per_pos[0] < 0.95  # the drafter is really being rejected sometimes
    chi2, dof = chi_square(counts, probs, N_SAMPLES)  # dof: cells + pooled rare cell - 1
    print(f"T={temperature} top_p={top_p} min_p={min_p}: chi2 {chi2:.1f} on {dof} dof, accept/pos {engine.stats.accept_per_pos}")
    assert chi2 < chi2_quantile_999(dof)

    # Power: the same test rejects a sampler with a 2% bias (2% of the mass moved to one sequence).
    biased = {s: 0.98 * p for s, p in probs.items()}
    biased[sorted(probs, key=probs.get)[-2]] += 0.02
    gen = torch.Generator().manual_seed(0)
    keys = list(biased)
    draws = torch.multinomial(torch.tensor([biased[s] for s in keys]), N_SAMPLES, replacement=True, generator=gen)
    fake = {}
    for i in draws.tolist():
        fake[keys[i]] = fake.get(keys[i], 0) + 1
    assert chi_square(fake, probs, N_SAMPLES)[0] > chi2_quantile_999(dof)


def test_rollback_with_preemption_keeps_blocks_consistent(tiny):
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, greedy(30))
    probe = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=truncated_drafter(tiny, 1),
                          num_draft_tokens=4)
    small = RolloutEngine(tiny, kv_cache_bytes=26 * probe.cache.bytes_per_block, block_size=4, eager=True,
                          drafter=truncated_drafter(tiny, 1), num_draft_tokens=4)
    checks = []
    original = small._speculate

    def checked(seqs, k, caps):
        original(seqs, k, caps)
        small.blocks.check_invariants()
        checks.append(len(seqs))

    small._speculate = checked
    got = small.generate(prompts, greedy(30))
    assert small.stats.preemptions > 0 and len(checks) > 5
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert small.blocks.num_free == small.blocks.num_blocks - 1


def test_bad_drafters(tiny):
    other_vocab = random_model(dataclasses.replace(PRESETS["tiny"], vocab_size=1000))
    with pytest.raises(ValueError, match="vocabulary"):
        RolloutEngine(tiny, kv_cache_bytes=64 << 20, drafter=other_vocab, num_draft_tokens=2)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k >= 1"):
            RolloutEngine(tiny, kv_cache_bytes=64 << 20, drafter=truncated_drafter(tiny, 1), num_draft_tokens=k)


# --- the match rule: SD emits plain decoding's tokens, whatever the drafter -----------------------
def _small_target():
    target = random_model(SMALL, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(SHARPEN)
    return target


def _drafter(kind, target):
    from respec.drafters.wrap import as_drafter
    from respec.drafters.history import HistoryDrafter
    from respec.drafters.hybrid import HybridDrafter
    from tests.test_eagle import head_for

    small = lambda: random_model(dataclasses.replace(SMALL, num_layers=1), seed=4)  # noqa: E731
    from respec.drafters.eagle import EagleDrafter

    return {"layers": small, "eagle": lambda: head_for(target, SMALL.vocab_size),
            "eagle-sharpened": lambda: EagleDrafter(head_for(target, SMALL.vocab_size), draft_temperature=0.5),
            "history": lambda: HistoryDrafter(min_match=1),
            "hybrid": lambda: HybridDrafter(as_drafter(small()), min_match=1)}[kind]()


def _mixed_params(n: int, length: int) -> list[SamplingParams]:
    """Plain sampling, top-k, top-p, min-p and greedy rows side by side in one batch."""
    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_k=2), dict(temperature=1.3, top_p=0.8),
             dict(temperature=0.0), dict(temperature=1.0, min_p=0.3)]
    return [SamplingParams(max_new_tokens=length, seed=100 + i, stop_on_eos=False, **kinds[i % 5]) for i in range(n)]


MATCH_PROMPTS = [[0, 1], [2, 3, 2, 3, 2, 3], [1, 1, 1], [3, 0, 2, 1, 3]] * 6


@pytest.mark.parametrize("kind", ["layers", "eagle", "eagle-sharpened", "history", "hybrid"])
def test_match_rule_emits_plain_decodings_tokens(kind):
    """Every drafter, k = 3, 24 rows of mixed sampling settings: the same tokens and log-probs as plain
    decoding with the same seeds, with drafts accepted and rejected along the way. Under the
    rejection rule the same drafters give other (equally distributed) tokens: the comparison can fail."""
    target = _small_target()
    params = _mixed_params(len(MATCH_PROMPTS), 20)
    plain = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(MATCH_PROMPTS, params)
    engine = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=_drafter(kind, target),
                           num_draft_tokens=3)
    got = engine.generate(MATCH_PROMPTS, params)
    assert [g.token_ids for g in got] == [p.token_ids for p in plain]
    for g, p in zip(got, plain):
        assert g.logprobs == pytest.approx(p.logprobs, abs=1e-5)
    st = engine.stats
    assert st.sd_steps > 0 and 0 < st.accept_per_pos[0] < 1  # drafts were accepted, and rejected
    rejection = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True,
                              drafter=_drafter(kind, target), num_draft_tokens=3, verify="rejection")
    assert [r.token_ids for r in rejection.generate(MATCH_PROMPTS, params)] != [p.token_ids for p in plain]


def test_match_rule_survives_preemption_and_recompute(tiny):
    """A cache too small for the batch: rows are preempted mid-rollout, recomputed by a prefill and
    speculate again; at T = 1 the tokens are still plain decoding's."""
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i, stop_on_eos=False) for i in range(8)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params)
    drafter = truncated_drafter(tiny, 3)
    probe = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter, num_draft_tokens=4)
    small = RolloutEngine(tiny, kv_cache_bytes=26 * probe.cache.bytes_per_block, block_size=4, eager=True,
                          drafter=drafter, num_draft_tokens=4)
    got = small.generate(prompts, params)
    assert small.stats.preemptions > 0 and small.stats.sd_steps > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_unfiltered_row_ignores_a_filtering_neighbour(tiny):
    """A row with top-p = 1 and top-k = 0 samples the same tokens whether or not another row of its
    batch filters (which switches the batch's compiled filter on)."""
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, stop_on_eos=False)]
    neighbour = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.5, top_k=7, seed=6, stop_on_eos=False)
    alone = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS[:1], params)
    shared = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS[:2], params + [neighbour])
    assert shared[0].token_ids == alone[0].token_ids
    assert shared[0].logprobs == alone[0].logprobs
    # the distribution itself, at the real vocabulary size (where float32's running sum reaches 1
    # thousands of tokens before the end): with the filter on, an unfiltered row keeps every token
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)) * 3
    one, off = torch.ones(4), torch.zeros(4, dtype=torch.long)
    unfiltered = sampling_logprobs(logits, one, off, one, use_filter=False)
    assert torch.equal(sampling_logprobs(logits, one, off, one, use_filter=True), unfiltered)
    assert not torch.equal(sampling_logprobs(logits, one, off, torch.full((4,), 0.999), use_filter=True), unfiltered)


def test_gumbel_coupling_agreement():
    """Drafting with the target's own noise (the match rule's `coupled` drafts) agrees with the target
    with probability sum_i 1 / sum_j max(p_j/p_i, q_j/q_i), measured over 40,000 counters of the
    sampler's hash; with independent noise it would be sum_i p_i q_i (the power: the two differ)."""
    from respec.sampling import STREAM_DRAFT, STREAM_SAMPLE, sample

    g = torch.Generator().manual_seed(7)
    V, N = 6, 40_000
    p = (torch.randn(V, generator=g) * 1.5).softmax(-1)
    q = (torch.randn(V, generator=g) * 1.5).softmax(-1)
    coupled = sum(1 / torch.maximum(p / p[i], q / q[i]).sum() for i in range(V)).item()
    independent = (p * q).sum().item()
    seeds, pos, one = torch.arange(N), torch.full((N,), 3), torch.ones(N)
    t, _ = sample(p.log().expand(N, V), one, seeds, pos, STREAM_SAMPLE)
    d, _ = sample(q.log().expand(N, V), one, seeds, pos, STREAM_SAMPLE)
    d_ind, _ = sample(q.log().expand(N, V), one, seeds, pos, STREAM_DRAFT)
    se = lambda a: 4 * math.sqrt(a * (1 - a) / N)  # noqa: E731
    assert abs((t == d).float().mean().item() - coupled) < se(coupled)
    assert abs((t == d_ind).float().mean().item() - independent) < se(independent)
    assert coupled - independent > 2 * se(coupled)
    tv = 0.5 * (p - q).abs().sum().item()
    assert (1 - tv) / (1 + tv) <= coupled <= 1 - tv + 1e-9
