"""The GRPO objective: group-normalised advantages, the clipped-ratio surrogate, the k3 KL term,
and per-token log-probabilities from the training forward.

One rollout gives P prompts x G samples. Each sample's advantage is its reward minus its group's
mean reward, divided by the group's standard deviation (`scale_by_std=False` keeps only the
centring, as Dr. GRPO argues: dividing by a small std up-weights groups that are nearly solved or
nearly failed). A group whose rewards are all equal has advantage 0 for every sample: it carries no
signal, and with the `eps` in the denominator it never produces NaN.

What the loss is made of, each in one function below, with TRL's names where TRL has the option:

* The ratio r = pi / pi_old per token, or per sequence (`level="sequence"`, GSPO, TRL's
  `importance_sampling_level`): exp of the sequence's mean log-ratio, shared by its tokens.
* The clipped surrogate -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A); asymmetric clipping is
  DAPO's "clip-higher" (symmetric by default).
* The behaviour correction (`behaviour_weights`, TRL's `vllm_importance_sampling_*`): the rollout
  sampled from pi_rollout (the engine's numerics: bf16 weights, paged attention, the verify
  forward), not from pi_old (the trainer's); w = pi_old / pi_rollout, per token or per sequence,
  truncated at a cap or masked above it, multiplies the surrogate. Off by default.
* The KL penalty to a frozen reference model, optional and off by default (`kl_coef=0` skips the
  reference model entirely); when on, the k3 estimator per token, `exp(ref - logp) - (ref - logp) - 1`,
  unbiased for KL(pi || ref) and always >= 0.
* The aggregation over tokens (`aggregate`, TRL's `loss_type`): `dapo` (the default, as TRL's) is
  the token mean over the whole global minibatch; `grpo` the GRPO paper's mean over sequences of
  each sequence's token mean (every token of a short completion weighs more than one of a long
  completion: a length bias); `bnpo` the token mean over this rank's batch; `dr_grpo` the token sum
  over a constant (sequences x the completion length limit, Dr. GRPO). Masking truncated
  completions (TRL's `mask_truncated_completions`) takes them out of the loss, not out of their
  group's advantages.
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


LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")  # TRL's loss_type names and meanings (module docstring)
IS_LEVELS = ("token", "sequence")  # the ratio pi / pi_old per token, or per sequence (GSPO)
IS_CORRECTIONS = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class LossTotals:
    """What the loss types divide by, counted over one global minibatch (every rank's share)."""
    tokens: int  # loss tokens of the global minibatch (completion tokens, less masked completions)
    local_tokens: int | None = None  # this rank's loss tokens (bnpo); None: the same as `tokens`
    sequences: int = 0  # sequences of the global minibatch (grpo, dr_grpo)
    max_len: int = 0  # the completion length limit (dr_grpo)
    world: int = 1  # ranks: FSDP averages their gradients, so each rank's loss is scaled by W


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: what backward() is called on
    pg_sum: float  # sum over tokens of the policy-gradient term (for logging)
    kl_sum: float  # sum over tokens of the k3 KL estimate (0 without a reference)
    clipped: int  # tokens where the clip was active


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, totals: LossTotals) -> torch.Tensor:
    """This rank's microbatch's share of the minibatch loss, l_it the per-token loss, o_i a
    sequence's loss tokens, N the global minibatch's sequences, T its loss tokens, L the length limit:

        dapo      sum_it l_it / T                 token mean over the global minibatch
        grpo      sum_i (sum_t l_it / |o_i|) / N  each sequence's token mean, then the mean over sequences
        bnpo      sum_it l_it / T_rank            token mean over this rank's minibatch
        dr_grpo   sum_it l_it / (N L)             token sum over a constant

    Summed over microbatches, and averaged over ranks by FSDP (hence the factor W where the
    denominator is global), each is the formula on its left."""
    m = mask.to(per_token.dtype)
    summed = per_token * m
    if loss_type == "dapo":
        return summed.sum() / max(totals.tokens, 1) * totals.world
    if loss_type == "grpo":
        per_sequence = summed.sum(-1) / m.sum(-1).clamp(min=1)  # (N,) 0 for a masked sequence
        return per_sequence.sum() / max(totals.sequences, 1) * totals.world
    if loss_type == "bnpo":
        return summed.sum() / max(totals.tokens if totals.local_tokens is None else totals.local_tokens, 1)
    if loss_type == "dr_grpo":
        return summed.sum() / max(totals.sequences * totals.max_len, 1) * totals.world
    raise ValueError(f"unknown loss type {loss_type!r} (choose from {', '.join(LOSS_TYPES)})")


def behaviour_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                      cap: float) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The truncated or masked importance weight of the rollout's behaviour policy (TRL's
    `vllm_importance_sampling_mode`, verl's rollout correction), and where the raw weight exceeded
    the cap: two (N, T) tensors per token, (N, 1) per sequence; (None, None) when `mode` is off.

        token_*      w_it = pi_old(o_it) / pi_rollout(o_it)
        sequence_*   w_i  = prod_t pi_old(o_it) / pi_rollout(o_it)     (exp of the summed log-ratios)
        *_truncate   w <- min(w, cap)
        *_mask       w <- 0 where w > cap

    pi_old is the trainer's forward before the update (the ratio's denominator); pi_rollout what
    the engine sampled each token from. The weight multiplies the clipped surrogate and carries no
    gradient."""
    if mode == "off":
        return None, None
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance-sampling correction {mode!r} (choose from {', '.join(IS_CORRECTIONS)})")
    with torch.no_grad():
        log_w = (old_logp - rollout_logp) * mask
        if mode.startswith("sequence"):
            log_w = log_w.sum(-1, keepdim=True)
        w = log_w.exp()
        over = w > cap
        return (w.clamp(max=cap) if mode.endswith("truncate") else w.masked_fill(over, 0.0)), over


def policy_loss(
    logp: torch.Tensor,  # (N, T) log-prob of each sampled token under the policy being trained
    old_logp: torch.Tensor,  # (N, T) the same under the policy before this rollout's updates
    advantages: torch.Tensor,  # (N,) one per sequence
    mask: torch.Tensor,  # (N, T) bool, True on loss tokens (completion, not prompt, padding or a masked completion)
    *,
    totals: LossTotals,  # the minibatch's counts the aggregation divides by
    loss_type: str = "dapo",
    level: str = "token",  # the ratio per token or per sequence (GSPO)
    is_weight: torch.Tensor | None = None,  # (N, T) or (N, 1) behaviour_weights, None: no correction
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,  # (N, T) under the frozen reference (None: no KL term)
    kl_coef: float = 0.0,
) -> LossTerms:
    """The clipped-ratio surrogate, as named steps. Returns this microbatch's share of the minibatch loss."""
    adv = advantages[:, None]  # (N, 1): every token of a sequence shares its advantage
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp  # (N, T)
    if level == "sequence":  # GSPO: the length-normalised sequence ratio, on every token of the sequence
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (N, 1)
    elif level != "token":
        raise ValueError(f"unknown importance-sampling level {level!r} (choose from {', '.join(IS_LEVELS)})")
    ratio = torch.exp(log_ratio).expand_as(logp)  # (N, T) pi / pi_old
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg = -torch.minimum(surr1, surr2)  # (N, T) pessimistic bound, to be minimised
    per_token = pg if is_weight is None else pg * is_weight
    kl = torch.zeros_like(pg)
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1.0  # (N, T) k3 estimator of KL(pi || ref)
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, loss_type, totals)
    with torch.no_grad():
        clipped = int(((surr2 < surr1) & mask).sum())
        return LossTerms(loss, float((pg * m).sum()), float((kl * m).sum()), clipped)


def token_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, run_block=None):
    """Per-token log-probs of `tokens` under `model`, where `mask` is True.

    tokens (N, T) right-padded prompt + completion; mask (N, T) True on completion tokens.
    Returns logp (N, T) (0 where mask is False) and, if asked, the policy's entropy at each masked
    position (N, T). The 49k-wide output head runs only on the masked positions: prompt and
    padding positions need no logits, and the head is a fifth of the model's FLOPs per token.
    `run_block`: how each decoder block runs (models/decoder.py `checkpointed_block` recomputes
    its activations in the backward pass)."""
    hidden = model(tokens[:, :-1], run_block=run_block)  # (N, T-1, d): position t predicts token t+1
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
    """LR multiplier: linear warm-up over `warmup` optimizer steps, then cosine down to `min_ratio`
    at step `total` (min_ratio 1: constant after the warm-up). The actor's schedule, the drafter's
    pretraining (to 0) and its online distillation (constant)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
