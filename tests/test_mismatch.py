"""The rollout's own log-probs against the trainer's: equal in fp32 (plain decoding and SD verifies
alike), measurably apart in bf16, and the mismatch metrics against a hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.drafter import truncated_drafter
from respec import mismatch
from respec.engine import RolloutEngine, SamplingParams
from respec.grpo import token_logprobs
from respec.update import completion_values, right_pad

PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(6)]
T = 0.8


def rollout_and_recompute(engine_model, train_model, *, sd: bool):
    """Sampled completions of the engine (SD with a one-layer drafter, k = 3, or plain decoding),
    and the training forward's log-probs of the same tokens, placed as the trainer places them."""
    drafter = dict(drafter=truncated_drafter(engine_model, 1), num_draft_tokens=3) if sd else {}
    engine = RolloutEngine(engine_model, kv_cache_bytes=64 << 20, eager=True, **drafter)
    params = [SamplingParams(max_new_tokens=24, temperature=T, seed=i, stop_on_eos=False) for i in range(len(PROMPTS))]
    outs = engine.generate(PROMPTS, params)
    plens = [len(p) for p in PROMPTS]
    tokens, mask, _ = right_pad([p + o.token_ids for p, o in zip(PROMPTS, outs)], plens, "cpu")
    with torch.no_grad():
        train, _ = token_logprobs(train_model, tokens, mask, temperature=T)
    rollout = completion_values([o.logprobs for o in outs], plens, mask, torch.float32)
    verified = completion_values([o.verified for o in outs], plens, mask, torch.bool)
    gap = mismatch.MismatchSums()
    gap.add(train, rollout, mask, verified, tokens)
    return mismatch.metrics(gap.sums, gap.maxima), engine.stats, verified[mask]


@pytest.mark.parametrize("sd", [False, True])
def test_engine_logprobs_equal_the_trainers_in_fp32(tiny, sd):
    m, stats, verified = rollout_and_recompute(tiny, tiny, sd=sd)
    assert m["mismatch_logratio_max"] < 1e-4, m
    if sd:  # verify tokens and plain ones (the prefill's first token at least) are both there and both equal
        assert stats.sd_steps > 0 and verified.any() and not verified.all()
        assert m["mismatch_logratio_max_verify"] < 1e-4 and m["mismatch_tokens_verify"] == int(verified.sum())
    else:
        assert not verified.any() and "mismatch_kl_verify" not in m


def test_engine_logprobs_differ_from_the_trainers_in_bf16(tiny):
    """A bf16 rollout copy (the default where bf16 is native) samples from other probabilities
    than the fp32 trainer computes: the gap is there, and far above fp32's."""
    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    exact, _, _ = rollout_and_recompute(tiny, tiny, sd=True)
    m, _, _ = rollout_and_recompute(bf16, tiny, sd=True)
    # (measured: mean |d| ~1e-3 in bf16 on the tiny model's flat distributions, max ~1e-6 in fp32)
    assert m["mismatch_logratio_mean"] > 2e-4 > 20 * exact["mismatch_logratio_max"]
    assert m["mismatch_kl"] > 0 and m["mismatch_logratio_max"] > m["mismatch_logratio_mean"]
    assert m["mismatch_logratio_mean_verify"] > 2e-4 and m["mismatch_logratio_mean_decode"] > 2e-4


def test_mismatch_metrics_by_hand():
    # two sequences; d = log pi_train - log pi_rollout = [ln 3, -ln 1.5] and [0 (verified), ln 0.4]
    rollout = torch.zeros(2, 2)
    train = torch.log(torch.tensor([[3.0, 1 / 1.5], [1.0, 0.4]]))
    mask = torch.ones(2, 2, dtype=torch.bool)
    verified = torch.tensor([[False, False], [True, False]])
    tokens = torch.tensor([[10, 11], [12, 13]])
    gap = mismatch.MismatchSums()
    gap.add(train, rollout, mask, verified, tokens)
    m = mismatch.metrics(gap.sums, gap.maxima)
    d = [math.log(3), -math.log(1.5), 0.0, math.log(0.4)]
    k3 = [math.exp(x) - 1 - x for x in d]
    assert m["mismatch_logratio_mean"] == pytest.approx(sum(map(abs, d)) / 4, abs=1e-6)
    assert m["mismatch_logratio_max"] == pytest.approx(math.log(3), abs=1e-6)
    assert m["mismatch_kl"] == pytest.approx(sum(k3) / 4, abs=1e-6)
    assert m["mismatch_ratio_out_frac"] == pytest.approx(2 / 4)  # 3 and 0.4 lie outside [1/2, 2]
    assert m["mismatch_kl_verify"] == 0.0 and m["mismatch_tokens_verify"] == 1
    assert m["mismatch_kl_decode"] == pytest.approx((k3[0] + k3[1] + k3[3]) / 3, abs=1e-6)
    assert m["mismatch_seq_logratio_mean"] == pytest.approx((d[0] + d[1] + d[2] + d[3]) / 2, abs=1e-6)
    assert gap.worst[:2] == (pytest.approx(math.log(3)), 10)
