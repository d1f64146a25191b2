"""The policy update of one GRPO step, as a function of the actor, its optimizer and schedule, the
step's episodes and the run's settings.

    policy_update(actor, optimizer, scheduler, episodes, cfg, d, ...)  ->  the update's metrics

`cfg.epochs` passes of `cfg.minibatches` optimizer steps each over this rank's episodes:

  1. plan: global minibatch m is the prompts m*P/M .. (m+1)*P/M - 1 (fixed, not shuffled: one
     process and N ranks take the same optimizer steps on the same data); each minibatch is split
     into length-sorted microbatches of about `micro_tokens` padded tokens, the same number on every
     rank (FSDP2's collectives must match one for one; a rank with fewer sequences runs an empty one);
  2. pi_old (and the reference's log-probs) before any update, when needed: with one pass the
     training forward's own log-probs, detached, are pi_old (the ratio is exactly 1), no extra pass;
  3. per microbatch: the training forward, the behaviour correction from the rollout's own
     log-probs (`--is-correction`), the loss (respec/grpo.py), backward; the rollout/training
     mismatch is measured on the first pass (respec/mismatch.py);
  4. per minibatch: the global gradient norm clipped; a non-finite one skips the optimizer step.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from models.decoder import checkpointed_block
from respec import distributed, grpo, mismatch

# padded tokens per forward/backward when `--micro-tokens 0`: length-sorted microbatches keep padding
# small (measured on 2 CPU cores, 32 sequences of ~120 tokens: 512 -> 26.8 s per update, one microbatch
# of all -> 39.4 s); a GPU wants large ones to fill its cores
MICRO_TOKENS = {"cpu": 512, "cuda": 8192}


def balanced_chunks(lengths: list[int], n: int) -> list[list[int]]:
    """Split indices sorted by length into `n` contiguous chunks of about equal total length (some
    may be empty when there are fewer items than chunks). Sorting keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    total, chunks, current, acc = sum(lengths), [], [], 0
    for i in order:
        current.append(i)
        acc += lengths[i]
        if len(chunks) < n - 1 and acc >= total * (len(chunks) + 1) / n:
            chunks.append(current)
            current = []
    chunks.append(current)
    return chunks + [[] for _ in range(n - len(chunks))]


def right_pad(seqs: list[list[int]], prompt_lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens (N, T), completion mask (N, T), real tokens) for sequences prompt + completion."""
    T = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), T, dtype=torch.int64)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, p:len(s)] = True
    return tokens.to(device), mask.to(device), sum(map(len, seqs))


def completion_values(values: list[list], prompt_lens: list[int], like: torch.Tensor, dtype) -> torch.Tensor:
    """Per-completion-token values (a completion's log-probs, its `verified` flags) placed as
    `right_pad` places the completions: (N, T) like `like`, 0 elsewhere."""
    out = torch.zeros(like.shape, dtype=dtype)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        out[i, p:p + len(v)] = torch.tensor(v, dtype=dtype)
    return out.to(like.device)


def plan(episodes, cfg, d, micro_tokens: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Step 1: this rank's minibatches (episode indices) and each one's microbatches."""
    per_mb = len(episodes) // cfg.group // cfg.minibatches * cfg.group
    minibatches = [list(range(m * per_mb, (m + 1) * per_mb)) for m in range(cfg.minibatches)]
    lengths = [len(e.tokens) for e in episodes]

    def micro_split(indices: list[int]) -> list[list[int]]:
        want = max(1, math.ceil(sum(lengths[i] for i in indices) * 1.1 / micro_tokens))
        (most,) = distributed.all_reduce_max([want], d)
        return [[indices[j] for j in chunk] for chunk in balanced_chunks([lengths[i] for i in indices], int(most))]

    return minibatches, [micro_split(mb) for mb in minibatches]


class Microbatch:
    """A microbatch's tensors: tokens, completion mask, loss mask, the rollout's log-probs and
    `verified` flags (N, T), and advantages (N,). An empty one (a rank with fewer sequences than
    microbatches) borrows its minibatch's first episode and contributes nothing."""

    def __init__(self, episodes, idx: list[int], *, empty: bool, mask_truncated: bool, device):
        chosen = [episodes[i] for i in idx]
        plens = [len(e.prompt_ids) for e in chosen]
        self.empty = empty
        self.tokens, self.mask, self.real = right_pad([e.tokens for e in chosen], plens, device)
        keep = torch.tensor([not (mask_truncated and e.truncated) for e in chosen], device=device)
        self.loss_mask = self.mask & keep.view(-1, 1)
        self.rollout_logp = completion_values([e.completion.logprobs for e in chosen], plens, self.mask, torch.float32)
        self.verified = completion_values([e.completion.verified for e in chosen], plens, self.mask, torch.bool)
        self.advantages = torch.tensor([e.advantage for e in chosen], dtype=torch.float32, device=device)


def checkpointing(cfg, device: torch.device) -> bool:
    """Whether the update recomputes each block's activations in its backward pass: as asked, else
    (`--gradient-checkpointing` not given) on a CPU, where the run's peak memory is the update's and
    the machine may be a laptop (4 steps of the default run peaked at 4.12 GiB against 4.86, at no measured
    cost in time there: docs/benchmarks.md), and not on a GPU, whose memory holds a small model's
    activations and whose time the recomputation would cost."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return device.type == "cpu"


def policy_update(actor, optimizer, scheduler, episodes, cfg, d, *, reference=None, micro_tokens: int,
                  train_dtype, progress: bool = False) -> dict:
    """`cfg.epochs` x `cfg.minibatches` optimizer steps on this rank's `episodes` (the module
    docstring's steps 1-4). Returns the update's metrics, summed over ranks."""
    device = d.device
    minibatches, micro_plan = plan(episodes, cfg, d, micro_tokens)  # 1.
    mask_truncated = cfg.mask_truncated_completions
    loss_len = [0 if mask_truncated and e.truncated else len(e.completion.token_ids) for e in episodes]
    batch = lambda micro, mb: Microbatch(episodes, micro or [mb[0]], empty=not micro,  # noqa: E731
                                         mask_truncated=mask_truncated, device=device)
    single_pass = cfg.epochs == 1 and cfg.minibatches == 1
    ckpt = checkpointing(cfg, device)
    run_block = checkpointed_block if ckpt else None  # only the forward that backpropagates
    # Checkpointed, autocast's cache of the weights' low-precision casts (kept for the whole forward,
    # for a backward that recomputes them anyway) would hold a second copy of every weight: off.
    autocast = torch.autocast(device.type, dtype=train_dtype, enabled=train_dtype != torch.float32,
                              cache_enabled=not ckpt)
    logprobs = lambda model, b: grpo.token_logprobs(model, b.tokens, b.mask, temperature=cfg.temperature)[0]  # noqa: E731

    old, ref = {}, {}  # 2.
    if not single_pass or reference is not None:
        with torch.no_grad(), autocast:
            for mb, micros in zip(minibatches, micro_plan):
                for micro in micros:
                    b = batch(micro, mb)
                    if not single_pass:
                        old[tuple(micro)] = logprobs(actor, b)
                    if reference is not None:
                        ref[tuple(micro)] = logprobs(reference, b)

    sums = dict(pg=0.0, kl=0.0, clipped=0, tokens=0, entropy=0.0, trained=0, trained_completion=0, loss=0.0,
                is_weight=0.0, is_capped=0, is_n=0)
    gap = mismatch.MismatchSums()
    grad_norms, skipped = [], 0
    bar = tqdm(total=cfg.epochs * sum(map(len, micro_plan)), desc="train", disable=not (progress and d.main),
               file=sys.stderr, leave=False)
    actor.train()
    for epoch in range(cfg.epochs):
        for mb, micros in zip(minibatches, micro_plan):
            local_tokens = sum(loss_len[i] for i in mb)
            (global_tokens,) = distributed.all_reduce_sum([local_tokens], d)
            totals = grpo.LossTotals(tokens=int(global_tokens), local_tokens=local_tokens,
                                     sequences=len(mb) * d.world, max_len=cfg.max_new_tokens, world=d.world)
            optimizer.zero_grad(set_to_none=True)
            for micro in micros:  # 3.
                b = batch(micro, mb)
                with autocast:
                    logp, entropy = grpo.token_logprobs(actor, b.tokens, b.mask, temperature=cfg.temperature,
                                                        with_entropy=epoch == 0, run_block=run_block)
                key = tuple(micro)
                old_logp = old[key] if key in old and not b.empty else logp.detach()  # pi_old: before any update
                is_weight, over = grpo.behaviour_weights(old_logp, b.rollout_logp, b.mask, cfg.is_correction,
                                                         cfg.is_cap)
                terms = grpo.policy_loss(
                    logp, old_logp, b.advantages, b.loss_mask, totals=totals, loss_type=cfg.loss_type,
                    level=cfg.importance_sampling_level, is_weight=is_weight, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, ref_logp=None if b.empty else ref.get(key), kl_coef=cfg.kl_coef)
                (terms.loss * (0.0 if b.empty else 1.0)).backward()
                bar.update()
                if b.empty:
                    continue
                sums["trained"] += b.real
                sums["trained_completion"] += int(b.mask.sum())
                sums["loss"] += float(terms.loss.detach())
                if epoch == 0:
                    sums["pg"] += terms.pg_sum
                    sums["kl"] += terms.kl_sum
                    sums["clipped"] += terms.clipped
                    sums["tokens"] += int(b.mask.sum())
                    sums["entropy"] += float(entropy[b.mask].sum())
                    gap.add(old_logp, b.rollout_logp, b.mask, b.verified, b.tokens)
                    if is_weight is not None:
                        sums["is_weight"] += float(is_weight.expand_as(b.mask)[b.loss_mask].sum())
                        sums["is_capped"] += int(over.expand_as(b.mask)[b.loss_mask].sum())
                        sums["is_n"] += int(b.loss_mask.sum())
            # 4.
            norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.grad_clip)))
            if not math.isfinite(norm):  # a non-finite loss or gradient (the same on every rank: the norm
                optimizer.zero_grad(set_to_none=True)  # is global): skip this update
                skipped += 1
                continue
            grad_norms.append(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)  # no gradients held between updates (the rollout's memory)
    bar.close()
    actor.eval()
    return _update_metrics(sums, gap, grad_norms, skipped, cfg, d)


def _update_metrics(sums: dict, gap: mismatch.MismatchSums, grad_norms: list[float], skipped: int, cfg, d) -> dict:
    """The update's figures over all ranks; `mismatch_worst_id` is the worst token's id (the
    caller decodes it)."""
    g = distributed.all_reduce_named(sums, d)
    gap_sums = distributed.all_reduce_named(gap.sums, d)
    gap_max = dict(zip(gap.maxima, distributed.all_reduce_max(list(gap.maxima.values()), d)))
    worst = max((w for w in distributed.all_gather(gap.worst, d) if w is not None), default=None)
    correction = {} if cfg.is_correction == "off" else {
        "is_weight_mean": round(g["is_weight"] / max(g["is_n"], 1), 6),  # over loss tokens
        "is_capped_frac": round(g["is_capped"] / max(g["is_n"], 1), 6)}  # of those, truncated or masked
    return {
        "loss": round(g["loss"] / d.world / (cfg.epochs * cfg.minibatches), 6),
        "kl": round(g["kl"] / max(g["tokens"], 1), 6),
        "entropy": round(g["entropy"] / max(g["tokens"], 1), 4),
        "clip_frac": round(g["clipped"] / max(g["tokens"], 1), 4),
        "grad_norm": round(sum(grad_norms) / len(grad_norms), 4) if grad_norms else None,
        "skipped_updates": skipped,
        "trained_tokens": int(g["trained"]),
        "trained_completion": int(g["trained_completion"]),
        **mismatch.metrics(gap_sums, gap_max),
        **({} if worst is None else {"mismatch_worst": {
            "token_id": worst[1], "logp_rollout": round(worst[2], 4), "logp_train": round(worst[3], 4),
            "verified": worst[4]}}),
        **correction,
    }
