"""The rollout/training mismatch, measured: ReSpec's first cause of drafter-induced degradation (R1).

The engine samples every completion token from pi_rollout: its own forward (bf16 weights, paged
attention, a batch of another shape, and under SD a (k+1)-wide verify). The trainer's ratio uses
pi_train, the training forward over the same tokens before the update. In exact arithmetic the two
are the same policy; in practice they differ, and a correction (respec/grpo.py, `behaviour_weights`)
needs to know by how much. Per completion token, with d = log pi_train(o_t) - log pi_rollout(o_t):

    logratio_mean   mean |d|
    logratio_max    max |d|
    kl              mean of exp(d) - 1 - d: the k3 estimate of KL(pi_rollout || pi_train) (the tokens
                    are drawn from pi_rollout; unbiased, >= 0 per token)
    ratio_out_frac  share of tokens whose ratio exp(d) lies outside [1/2, 2]
    seq_logratio    per completion, sum_t d: the log of the sequence's ratio (its mean, and its mean size)

each over all completion tokens and split by how the token was emitted: `_decode` (a plain decoding
step, or the prefill's first token) and `_verify` (an SD verify: accepted drafts, corrections and
bonus tokens). If a verify path moved the rollout's probabilities, `_verify` shows it beside `_decode`.

`MismatchSums` adds up one rank's microbatches; `metrics` turns the sums of all ranks into the
`mismatch_*` fields of metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SOURCES = {"": None, "_decode": False, "_verify": True}  # metric suffix -> tokens' `verified` flag (None: all)
FIELDS = ("n", "abs", "k3", "out")  # per source: tokens, sum |d|, sum k3, tokens outside [1/2, 2]


@dataclass
class MismatchSums:
    sums: dict = field(default_factory=lambda: {f"{f}{s}": 0.0 for s in SOURCES for f in FIELDS}
                       | {"seqs": 0.0, "seq_sum": 0.0, "seq_abs": 0.0})
    maxima: dict = field(default_factory=lambda: {f"max{s}": 0.0 for s in SOURCES})
    # the token with the largest |d|: (|d|, token id, log pi_rollout, log pi_train, verified)
    worst: tuple | None = None

    @torch.no_grad()
    def add(self, train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
            verified: torch.Tensor, tokens: torch.Tensor) -> None:
        """One microbatch: log-probs (N, T) of the same tokens, completion mask (N, T), per-token
        `verified` flags (N, T) and the token ids (N, T)."""
        d = (train_logp.float() - rollout_logp.float()).masked_fill(~mask, 0.0)  # (N, T)
        ratio = d.exp()
        k3 = ratio - 1 - d
        out = (ratio < 0.5) | (ratio > 2.0)
        for suffix, flag in SOURCES.items():
            sel = mask if flag is None else mask & (verified if flag else ~verified)
            self.sums[f"n{suffix}"] += float(sel.sum())
            self.sums[f"abs{suffix}"] += float(d.abs()[sel].sum())
            self.sums[f"k3{suffix}"] += float(k3[sel].sum())
            self.sums[f"out{suffix}"] += float((out & sel).sum())
            if sel.any():
                self.maxima[f"max{suffix}"] = max(self.maxima[f"max{suffix}"], float(d.abs()[sel].max()))
        rows = mask.any(-1)
        seq = d.sum(-1)[rows]
        self.sums["seqs"] += float(rows.sum())
        self.sums["seq_sum"] += float(seq.sum())
        self.sums["seq_abs"] += float(seq.abs().sum())
        if mask.any():
            at = int(d.abs().masked_fill(~mask, -1.0).argmax())
            i, t = divmod(at, d.shape[1])
            if self.worst is None or abs(float(d[i, t])) > self.worst[0]:
                self.worst = (abs(float(d[i, t])), int(tokens[i, t]), float(rollout_logp[i, t]),
                              float(train_logp[i, t]), bool(verified[i, t]))


def metrics(sums: dict, maxima: dict) -> dict:
    """The `mismatch_*` fields from every rank's summed `sums` and maximal `maxima`."""
    out = {}
    for suffix in SOURCES:
        n = sums[f"n{suffix}"]
        if suffix and not n:  # no token of that kind this step (no SD step, or nothing but SD)
            continue
        out[f"mismatch_logratio_mean{suffix}"] = round(sums[f"abs{suffix}"] / max(n, 1), 6)
        out[f"mismatch_logratio_max{suffix}"] = round(maxima[f"max{suffix}"], 6)
        out[f"mismatch_kl{suffix}"] = round(sums[f"k3{suffix}"] / max(n, 1), 8)
        out[f"mismatch_ratio_out_frac{suffix}"] = round(sums[f"out{suffix}"] / max(n, 1), 6)
    out["mismatch_tokens_verify"] = int(sums["n_verify"])
    out["mismatch_seq_logratio_mean"] = round(sums["seq_sum"] / max(sums["seqs"], 1), 6)
    out["mismatch_seq_logratio_abs"] = round(sums["seq_abs"] / max(sums["seqs"], 1), 6)
    return out
