"""The GRPO objective against hand-computed values, and the training log-probs against a direct
computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from respec.grpo import (LOSS_TYPES, LossTotals, aggregate, behaviour_weights, group_advantages, policy_loss,
                         token_logprobs, warmup_cosine)
from respec.rollout_seeds import request_seed
from respec.update import balanced_chunks, right_pad


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 0.8]])
    adv = group_advantages(r, eps=0.0)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    std1 = math.sqrt((0.3**2 + 0.1**2 + 0.1**2 + 0.3**2) / 3)
    assert torch.allclose(adv[1], torch.tensor([-0.3, -0.1, 0.1, 0.3]) / std1, atol=1e-6)
    centred = group_advantages(r, scale_by_std=False)
    assert torch.allclose(centred[1], torch.tensor([-0.3, -0.1, 0.1, 0.3]), atol=1e-6)


def test_all_equal_rewards_give_zero_advantage_not_nan():
    for scale in (True, False):
        adv = group_advantages(torch.full((3, 4), 0.7), scale_by_std=scale)
        assert torch.isfinite(adv).all() and (adv == 0).all()


def test_policy_loss_by_hand_and_clipping_on_both_sides():
    # One row per case, one token each; clip range [0.8, 1.2].
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0, 1.0])
    old = torch.zeros(5, 1)
    logp = torch.log(ratio)[:, None].clone().requires_grad_(True)
    mask = torch.ones(5, 1, dtype=torch.bool)
    terms = policy_loss(logp, old, adv, mask, totals=LossTotals(5), clip_low=0.2, clip_high=0.2)
    # per token -min(r A, clip(r) A):
    #   r=1,   A=2:  -2                  (inside the range)
    #   r=1.5, A=1:  -min(1.5, 1.2) = -1.2  clipped above: no gradient
    #   r=0.5, A=-1: -min(-0.5, -0.8) = 0.8 clipped below: no gradient
    #   r=1.5, A=-1: -min(-1.5, -1.2) = 1.5 unclipped (the pessimistic side)
    #   r=0.5, A=1:  -min(0.5, 0.8) = -0.5  unclipped
    expected = torch.tensor([-2.0, -1.2, 0.8, 1.5, -0.5])
    assert terms.loss.item() == pytest.approx(expected.mean().item(), abs=1e-6)
    assert terms.clipped == 2
    terms.loss.backward()
    g = logp.grad[:, 0]
    # d/dlogp of -r*A/5 is -r*A/5 where unclipped, 0 where the clip is active
    assert torch.allclose(g, torch.tensor([-2.0, 0.0, 0.0, 1.5, -0.5]) / 5, atol=1e-6)


def test_asymmetric_clip():
    logp = torch.log(torch.tensor([[1.25]]))
    terms = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool),
                        totals=LossTotals(1), clip_low=0.2, clip_high=0.28)
    assert terms.loss.item() == pytest.approx(-1.25) and terms.clipped == 0


def test_kl_term_is_k3_and_masked():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    mask = torch.tensor([[True, True, False]])
    terms = policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, totals=LossTotals(2), ref_logp=ref, kl_coef=0.1)
    k3 = 0.5 - math.log(0.5) - 1  # exp(log r) - log r - 1 with r = ref / pi = 0.5
    assert terms.kl_sum == pytest.approx(k3, abs=1e-6)  # the equal token adds 0, the masked one nothing
    assert terms.loss.item() == pytest.approx(0.1 * k3 / 2, abs=1e-6)
    off = policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, totals=LossTotals(2), ref_logp=ref, kl_coef=0.0)
    assert off.loss.item() == 0.0


def test_token_mean_over_the_batch_not_per_sequence():
    # Two sequences, 1 and 3 completion tokens, per-token term -A: token-level mean weights tokens.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    terms = policy_loss(logp, logp, torch.tensor([1.0, -1.0]), mask, totals=LossTotals(4))
    assert terms.loss.item() == pytest.approx((-1 + 3 * 1) / 4)


def test_each_loss_type_by_hand():
    # Two sequences of 1 and 3 loss tokens (a third row fully masked: a truncated completion left
    # out), per-token losses l; the global minibatch has 6 sequences (2 ranks), 10 loss tokens, of
    # which this rank holds these 4; the length limit is 5.
    per_token = torch.tensor([[2.0, 9.0, 9.0], [1.0, 3.0, -1.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    totals = LossTotals(tokens=10, local_tokens=4, sequences=6, max_len=5, world=2)
    token_sum = 2 + 1 + 3 - 1
    expected = {
        "dapo": token_sum / 10 * 2,  # FSDP averages the two ranks' losses: x W for a global mean
        "grpo": (2 / 1 + 3 / 3 + 0) / 6 * 2,  # the masked sequence counts, with 0
        "bnpo": token_sum / 4,  # this rank's token mean (ranks averaged by FSDP, as TRL's DDP)
        "dr_grpo": token_sum / (6 * 5) * 2,
    }
    assert set(expected) == set(LOSS_TYPES)
    for loss_type, value in expected.items():
        assert aggregate(per_token, mask, loss_type, totals).item() == pytest.approx(value), loss_type
    with pytest.raises(ValueError, match="unknown loss type"):
        aggregate(per_token, mask, "sum", totals)


def test_loss_types_through_policy_loss_and_their_gradients():
    # ratio 1 everywhere (logp == old), advantages +1 / -1: per-token loss -A, gradient -A / denominator
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0])
    totals = LossTotals(tokens=4, sequences=2, max_len=3)
    grpo_terms = policy_loss(logp, logp.detach(), adv, mask, totals=totals, loss_type="grpo")
    assert grpo_terms.loss.item() == pytest.approx((-1 / 1 + 3 / 3) / 2)
    grpo_terms.loss.backward()
    # GRPO's length bias: the short sequence's token carries 1/2, each long one's 1/6
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))


def test_sequence_level_ratio_is_the_geometric_mean_gspo():
    # one sequence of two tokens, log-ratios 0.3 and -0.1: s = exp(0.1), shared by both tokens
    logp = torch.tensor([[0.3, -0.1, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    terms = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, totals=LossTotals(2), level="sequence",
                        clip_low=0.2, clip_high=0.2)
    s = math.exp(0.1)
    assert terms.loss.item() == pytest.approx(-s)  # token mean of -s A over 2 tokens
    terms.loss.backward()
    # d(-s)/dlogp_t = -s * 1/|o| for each token; the masked position gets nothing
    assert torch.allclose(logp.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))


def test_truncated_importance_sampling_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    rollout = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.3, 0.1, 0.6]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    cap = 3.0
    # per-token ratios old / rollout: [5, 0.5, (masked)], [1, 3, 0.5]
    w, over = behaviour_weights(old, rollout, mask, "token_truncate", cap)
    assert torch.allclose(w, torch.tensor([[3.0, 0.5, 1.0], [1.0, 3.0, 0.5]]))  # a masked position: exp(0)
    assert over.tolist() == [[True, False, False], [False, False, False]]
    w, _ = behaviour_weights(old, rollout, mask, "token_mask", cap)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 1.0], [1.0, 3.0, 0.5]]))
    # per sequence: the product over its loss tokens, 5 * 0.5 = 2.5 and 1 * 3 * 0.5 = 1.5
    w, _ = behaviour_weights(old, rollout, mask, "sequence_truncate", 2.0)
    assert torch.allclose(w, torch.tensor([[2.0], [1.5]]))
    w, over = behaviour_weights(old, rollout, mask, "sequence_mask", 2.0)
    assert torch.allclose(w, torch.tensor([[0.0], [1.5]])) and over.tolist() == [[True], [False]]
    assert behaviour_weights(old, rollout, mask, "off", cap) == (None, None)
    # The weight multiplies the clipped surrogate (ratio 1 here: per-token loss -A w), not the KL term
    logp = old.clone().requires_grad_(True)
    w, _ = behaviour_weights(old, rollout, mask, "token_truncate", cap)
    terms = policy_loss(logp, old, torch.tensor([1.0, 2.0]), mask, totals=LossTotals(5), is_weight=w)
    assert terms.loss.item() == pytest.approx(-(3.0 + 0.5 + 2 * (1.0 + 3.0 + 0.5)) / 5)
    terms.loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[3.0, 0.5, 0.0], [2.0, 6.0, 1.0]]) / 5)


def test_token_logprobs_match_a_direct_computation_and_ignore_padding(tiny):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
    plens = [2, 1, 3]
    tokens, mask, real = right_pad(seqs, plens, "cpu")
    assert real == 13
    assert mask.tolist() == [[False, False, True, True, True, True],
                             [False, True, True, False, False, False],
                             [False, False, False, True, False, False]]
    with torch.no_grad():
        logp, entropy = token_logprobs(tiny, tokens, mask, temperature=0.7, with_entropy=True)
        for i, (s, p) in enumerate(zip(seqs, plens)):
            ids = torch.tensor([s])
            logits = tiny.logits(tiny(ids))[0] / 0.7  # (T, V), no padding at all
            ref = F.log_softmax(logits, -1)
            for t in range(p, len(s)):
                assert logp[i, t].item() == pytest.approx(ref[t - 1, s[t]].item(), abs=1e-4)
                h = -(ref[t - 1].exp() * ref[t - 1]).sum()
                assert entropy[i, t].item() == pytest.approx(h.item(), abs=1e-3)
        assert (logp[~mask] == 0).all()
        # Padding content does not matter: fill the pads with other tokens, same log-probs.
        noisy = tokens.clone()
        noisy[~mask & (torch.arange(6) >= torch.tensor([6, 3, 4])[:, None])] = 999
        assert torch.allclose(token_logprobs(tiny, noisy, mask, temperature=0.7)[0], logp, atol=1e-5)


def test_padded_batch_loss_equals_per_sequence_sum(tiny):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    plens = [2, 1]
    adv = torch.tensor([1.0, -0.5])
    tokens, mask, _ = right_pad(seqs, plens, "cpu")
    n = int(mask.sum())
    with torch.no_grad():
        lp, _ = token_logprobs(tiny, tokens, mask)
        whole = policy_loss(lp, lp - 0.1, adv, mask, totals=LossTotals(n)).loss
        parts = 0.0
        for i in range(2):
            t1, m1, _ = right_pad([seqs[i]], [plens[i]], "cpu")
            lp1, _ = token_logprobs(tiny, t1, m1)
            parts += policy_loss(lp1, lp1 - 0.1, adv[i:i + 1], m1, totals=LossTotals(n)).loss
    assert whole.item() == pytest.approx(parts.item(), abs=1e-5)


def test_helpers():
    chunks = balanced_chunks([5, 1, 9, 3, 7], 2)
    assert sorted(sum(chunks, [])) == list(range(5)) and all(chunks)
    assert balanced_chunks([4], 3) == [[0], [], []]
    assert request_seed(0, 3, 7) == request_seed(0, 3, 7) != request_seed(0, 3, 8)
    lrs = [warmup_cosine(s, total=10, warmup=2, min_ratio=0.1) for s in range(12)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less():
    """`--gradient-checkpointing`: the log-probs and every gradient equal the plain backward's, and
    the forward keeps far fewer tensors for the backward (it really recomputes the blocks; counted,
    not summed: the output head's logits, which both keep, would dominate a sum)."""
    from models.decoder import checkpointed_block
    from models.loading import load_model

    model = load_model("tiny", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 12), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 5:] = True
    results = []
    for run_block in (None, checkpointed_block):
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            logp, _ = token_logprobs(model, tokens, mask, temperature=0.7, run_block=run_block)
        (logp.sum() * -1).backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)))
    (lp0, g0, kept0), (lp1, g1, kept1) = results
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)
    assert kept1 < 0.5 * kept0
