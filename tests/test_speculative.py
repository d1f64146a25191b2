"""Speculative decoding: exact against plain decoding (greedy token for token, sampling in
distribution), rollback bookkeeping under preemption, and bad drafters."""

import dataclasses
import itertools

import pytest
import torch

from models.decoder import PRESETS
from models.drafter import truncated_drafter
from models.loading import random_model
from respec.engine import RolloutEngine, SamplingParams
from respec.sampling import sampling_logprobs

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
    assert engine.stats.alpha == [1.0] * k  # every draft a row proposed was accepted


# --- losslessness at temperature > 0 -----------------------------------------------------------
SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=4, num_layers=2, max_position_embeddings=64)
N_SAMPLES, LENGTH, PROMPT, SHARPEN = 30_000, 3, [0, 1], 2.0


def exact_sequence_probs(model, temperature, top_p, *, prompt=PROMPT, length=LENGTH):
    """Probability of every `length`-token completion under plain sampling (enumerated)."""
    seqs = list(itertools.product(range(SMALL.vocab_size), repeat=length))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    n = len(seqs) * length
    with torch.no_grad():
        logits = model.logits(model(ids))[:, len(prompt) - 1:-1]  # (S, length, V)
        lp = sampling_logprobs(logits.reshape(n, -1), torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                               torch.full((n,), top_p), use_filter=top_p < 1).view(len(seqs), length, -1)
    tok = torch.tensor(seqs).unsqueeze(-1)
    return {s: p for s, p in zip(seqs, lp.gather(-1, tok).squeeze(-1).sum(-1).exp().tolist())}


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    cells = [s for s in probs if probs[s] * n >= 5]  # pool the rare cells into one
    rare = [s for s in probs if s not in cells]
    obs = [counts.get(s, 0) for s in cells] + [sum(counts.get(s, 0) for s in rare)]
    exp = [probs[s] * n for s in cells] + [sum(probs[s] for s in rare) * n]
    return sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0), len(cells) - (0 if rare else 1)


def sample_sequences(engine, temperature, top_p):
    params = [SamplingParams(max_new_tokens=LENGTH, temperature=temperature, top_p=top_p, seed=i, stop_on_eos=False)
              for i in range(N_SAMPLES)]
    out = engine.generate([PROMPT] * N_SAMPLES, params)
    counts: dict = {}
    for o in out:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    return counts


def chi2_quantile_999(dof: int) -> float:
    """99.9% quantile of chi-square(dof), Wilson-Hilferty approximation (z = 3.090)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + 3.090 * a**0.5) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sd_sampling_is_lossless(temperature, top_p):
    target = random_model(SMALL, seed=3)
    with torch.no_grad():  # sharpen it so the distributions are far from uniform
        target.lm_head.weight.mul_(SHARPEN)
    drafter = random_model(dataclasses.replace(SMALL, num_layers=1), seed=4)  # an independent, poor drafter
    probs = exact_sequence_probs(target, temperature, top_p)
    engine = RolloutEngine(target, kv_cache_bytes=256 << 20, block_size=4, max_batch=512, eager=True,
                           drafter=drafter, num_draft_tokens=2)
    counts = sample_sequences(engine, temperature, top_p)
    assert 0.2 < engine.stats.accept_per_pos[0] < 0.95  # the drafter is really being rejected sometimes
    chi2, dof = chi_square(counts, probs, N_SAMPLES)  # dof: cells + pooled rare cell - 1
    print(f"T={temperature} top_p={top_p}: chi2 {chi2:.1f} on {dof} dof, accept/pos {engine.stats.accept_per_pos}")
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
