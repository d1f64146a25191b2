"""The drafter's distillation objective, ReSpec's third mechanism: reward-weighted KD.

    L = sum_i w(r_i) * sum_t KL(p_actor(.|x_i, y_i<t) || q_draft(.|x_i, y_i<t))  /  sum_i w(r_i) * T_i

over the completions i of a batch and their tokens t (T_i of them): a *weighted token mean* of the
forward KL from the actor (teacher) to the drafter (student). The weight of a completion comes from
its reward (`sequence_weights`):

    kd    w = 1                                          plain KD, uniform weights
    rkd   w = clip(1 + (r - mean r) / std r, 0, w_max)   reward-weighted: the paper's "reward normalised and clipped"
    akd   w = max(A, 0)                                  advantage-weighted: only completions better than their group

(the names `--drafter-update` takes), so the drafter follows the trajectories the policy is moving
toward rather than the ones it is leaving. `rkd` keeps the mean weight near 1 (the step size of
uniform KD) and gives a completion one reward-std below the batch mean weight 0; when every reward
is equal it is plain KD.

Choices the paper leaves open, made here:

* The denominator is the *weighted* token count, so the loss is a weighted mean: multiplying all
  weights by a constant changes nothing, uniform weights give exactly plain (token-mean) KD, and a
  completion of weight 0 contributes nothing to the loss or the gradient. (Dividing by the plain
  token count instead would make the step size follow the mean reward.)
* The drafter predicts over a reduced draft vocabulary (`models/eagle.py`), where KL(p || q) with
  the full p is infinite; the KL is taken to p renormalised on the draft vocabulary, the usual
  EAGLE-3 practice (its gradient is that of the cross-entropy to p restricted there).

The other use of the same two distributions is the acceptance estimate the solver starts from
(its alpha_j, respec/solver.py), averaged over the tokens of real rollouts at draft position j,
without speculating at all; it depends on how drafts are verified (respec/speculative.py):

* rejection: a draft x ~ q is accepted with probability E_q[min(1, p(x)/q(x))] = sum_x min(p(x),
  q(x)) = 1 - TV(p, q) (`accepted_mass`);
* match: the head drafts with the target's own noise and is accepted iff its draft is the target's
  own sample. That agreement, sum_i 1 / sum_j max(p_j/p_i, q_j/q_i), has no cheap closed form over
  a 49k vocabulary (nor under the sampler's two-level draw) and lies below 1 - TV, so
  `coupled_agreement` draws it: one Monte Carlo sample per position, with the engine's own sampler.

Here p must be the target's full sampling distribution (its mass outside the draft vocabulary is
what a drafter can never match).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from respec.sampling import sample

WEIGHTINGS = ("kd", "rkd", "akd")  # w(r): uniform, reward-weighted, advantage-weighted (above)


def sequence_weights(kind: str, rewards: torch.Tensor, advantages: torch.Tensor | None = None, *,
                     mean: float | None = None, std: float | None = None, w_max: float = 2.0,
                     eps: float = 1e-6) -> torch.Tensor:
    """w(r) for each completion, (N,) -> (N,). `mean` / `std` are the reward statistics to normalise
    with (default: of `rewards` itself; the trainer passes those of the global batch over ranks)."""
    rewards = rewards.float()
    if kind == "kd":
        return torch.ones_like(rewards)
    if kind == "rkd":
        mean = rewards.mean().item() if mean is None else mean
        std = rewards.std(unbiased=False).item() if std is None else std
        if std < eps:  # every reward equal: nothing to prefer
            return torch.ones_like(rewards)
        return (1.0 + (rewards - mean) / std).clamp(0.0, w_max)
    if kind == "akd":
        if advantages is None:
            raise ValueError("advantage weighting (akd) needs the advantages")
        return advantages.float().clamp_min(0.0)
    raise ValueError(f"unknown KD weighting {kind!r} (choose {', '.join(WEIGHTINGS)})")


def weighted_kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """The loss above. logp, logq: (N, T, V) log-probs of teacher and student over the same vocabulary
    (normalised over it); mask (N, T) bool: the positions distilled; weights (N,). `denom` is the
    weighted token count of the whole batch when this is one part of it (a microbatch, one rank's
    share); default: this part's own."""
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # (N, T) KL(p || q) per position
    w = weights.to(kl.dtype).view(-1, 1) * mask.to(kl.dtype)  # (N, T)
    if denom is None:
        denom = w.sum()
    return (kl * w).sum() / (denom.clamp_min(1e-12) if torch.is_tensor(denom) else max(float(denom), 1e-12))


def accepted_mass(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q(x)) = 1 - TV(p, q) over the last dim: the probability that exact
    speculative sampling accepts a draft from q when the target samples from p. p and q are
    probabilities over the same ids (p may be a slice of a larger distribution: its mass elsewhere
    is simply never accepted)."""
    return torch.minimum(p, q).sum(-1)


def coupled_agreement(logp: torch.Tensor, logq: torch.Tensor, seeds: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Whether a head drafting with the target's own noise proposes the target's own sample, one
    Monte Carlo draw per row (0/1 floats, (R,)): an unbiased estimate of the match rule's acceptance.

    logp (R, V) the target's full sampling log-probs, logq (R, V) the head's (-inf outside its draft
    vocabulary, which it can never propose); both drawn by the engine's own sampler (respec/
    sampling.py, two-level) with the counters (seeds, positions) (R,)."""
    one = torch.ones(logp.shape[0], device=logp.device)
    target, _ = sample(logp, one, seeds, positions)
    draft, _ = sample(logq, one, seeds, positions)
    return (target == draft).float()