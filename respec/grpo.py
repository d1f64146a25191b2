"""The GRPO objective: group-normalised advantages, the clipped-ratio surrogate, the k3 KL term,
and per-token log-probabilities from the training forward.

One rollout gives P prompts x G samples. Each sample's advantage is its reward minus its group's
mean reward, divided by the group's standard deviation (`scale_by_std=False` keeps only the
centring, as Dr. GRPO argues: dividing by a small std up-weights groups that are nearly solved or
nearly failed). A group whose rewards are all equal has advantage 0 for every sample: it carries no
signal, and with the `eps` in the denominator it never produces NaN.

Departures from the GRPO paper (DeepSeekMath), on purpose:

* Token-level mean: the loss is the sum of per-token terms over every completion token in the
  (mini)batch divided by the number of those tokens. The paper averages over each sequence's
  tokens first and then over sequences, which gives every token of a short completion more weight
  than a token of a long one (a length bias: short wrong answers are punished harder per token,
  long ones less). The sequence-mean alternative is a one-line change in `policy_loss`.
* Asymmetric clipping is available (`clip_low`, `clip_high`; DAPO's "clip-higher"), symmetric by
  default.
* The KL penalty to a frozen reference model is optional and off by default (`kl_coef=0` skips
  the reference model entirely); when on, it is the k3 estimator per token,
  `exp(ref - logp) - (ref - logp) - 1`, which is unbiased for KL(pi || ref) and always >= 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): centred per group, optionally divided by the group's std."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True)  # (P, 1) unbiased, as in the paper's code
    return centred / (std + eps)


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: what backward() is called on
    pg_sum: float  # sum over tokens of the policy-gradient term (for logging)
    kl_sum: float  # sum over tokens of the k3 KL estimate (0 without a reference)
    clipped: int  # tokens where the clip was active
    ratio_max: float


def policy_loss(
    logp: torch.Tensor,  # (N, T) log-prob of each sampled token under the policy being trained
    old_logp: torch.Tensor,  # (N, T) the same under the policy that generated the rollout
    advantages: torch.Tensor,  # (N,) one per sequence
    mask: torch.Tensor,  # (N, T) bool, True on completion tokens (not prompt, not padding)
    *,
    num_tokens: float,  # completion tokens in the whole (mini)batch (/ ranks under FSDP): the denominator
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,  # (N, T) under the frozen reference (None: no KL term)
    kl_coef: float = 0.0,
) -> LossTerms:
    """The clipped-ratio surrogate, as named steps. Returns this batch's share of the token mean."""
    adv = advantages[:, None]  # (N, 1): every token of a sequence shares its advantage
    ratio = torch.exp(logp - old_logp)  # (N, T) pi / pi_old
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg = -torch.minimum(surr1, surr2)  # (N, T) pessimistic bound, to be minimised
    per_token = pg
    kl = torch.zeros_like(pg)
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1.0  # (N, T) k3 estimator of KL(pi || ref)
        per_token = pg + kl_coef * kl
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / num_tokens  # token-level mean (see the module docstring)
    with torch.no_grad():
        clipped = int(((surr2 < surr1) & mask).sum())
        ratio_max = float(ratio[mask].max()) if mask.any() else 1.0
        return LossTerms(loss, float((pg * m).sum()), float((kl * m).sum()), clipped, ratio_max)


def token_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Per-token log-probs of `tokens` under `model`, where `mask` is True.

    tokens (N, T) right-padded prompt + completion; mask (N, T) True on completion tokens.
    Returns logp (N, T) (0 where mask is False) and, if asked, the policy's entropy at each masked
    position (N, T). The 49k-wide output head runs only on the masked positions: prompt and
    padding positions need no logits, and the head is a fifth of the model's FLOPs per token."""
    hidden = model(tokens[:, :-1])  # (N, T-1, d): position t predicts token t+1
    sel = mask[:, 1:]  # (N, T-1) which predictions are of completion tokens
    logits = model.logits(hidden[sel])  # (M, V) fp32, M = completion tokens
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature  # the distribution the rollout sampled from
    targets = tokens[:, 1:][sel]  # (M,)
    logp_flat = -F.cross_entropy(logits, targets, reduction="none")  # (M,)
    logp = torch.zeros(tokens.shape, dtype=logp_flat.dtype, device=tokens.device)
    logp[:, 1:][sel] = logp_flat  # completion tokens never sit at position 0
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=-1)  # (M,)
        entropy_flat = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        entropy = torch.zeros(tokens.shape, dtype=entropy_flat.dtype, device=tokens.device)
        entropy[:, 1:][sel] = entropy_flat
    return logp, entropy


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` optimizer steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
