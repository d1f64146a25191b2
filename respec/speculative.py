"""Exact batched speculative decoding: draft k tokens per row, verify k+1 positions in one target
forward, accept each row's own prefix.

Two verification rules (`VERIFY_RULES`; the engine's `verify`):

**match** (the default): the target draws its own token at every verified position exactly as
plain decoding would there, with the row's plain-decoding noise (`respec/sampling.py`: the noise is
a function of the row's seed and the position); a draft is accepted iff it equals that token; the
row stops at the first mismatch and emits the target's token there (after k accepted drafts, the
bonus token). Every emitted token is therefore plain decoding's token, whatever the drafter
proposed: SD on or off, any k, any drafter, the same rollout (drafter-invariant speculative
decoding, Daliri, Musco & Suresh, arXiv 2408.07978). A deterministic draft d is accepted with
probability p(d), as under the point-mass rejection rule; a model drafter should then draw its
proposals with the *same* noise (`coupled`: Gumbel coupling, argmax of its log-probs plus the
target's noise), which makes it agree with the target with probability
sum_i 1 / sum_j max(p_j / p_i, q_j / q_i), at least (1 - TV) / (1 + TV). Exact in exact arithmetic;
in floating point a verify's wider forward can round a logit differently from plain decoding's
one-token forward, and a near-tie then draws another token (docs/benchmarks.md counts them).

**rejection** (speculative sampling, Leviathan et al. 2023; Chen et al. 2023), with p_i and q_i the
target's and the drafter's sampling distributions at draft position i (temperature, top-k and top-p
applied to both, exactly as plain sampling applies them):
  * draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
  * at the first rejection i, the row emits a token from normalize(max(0, p_i - q_i)) and stops;
  * if all k are accepted it emits a bonus token from p_{k+1}.
The emitted tokens are distributed exactly as plain sampling would produce them, but they are not
plain decoding's tokens for the same seed: the draws depend on the drafter. Greedy rows (temperature
0) accept while the draft equals the target's argmax and emit the argmax at the first mismatch.

Rows may propose fewer than k tokens (`lengths`): a position a row did not draft is never
accepted, and the row emits the target's token there, exactly as plain decoding would. Under
rejection a deterministic drafter (q a point mass on d) is the special case q(d) = 1: d is accepted
with probability p(d), and a rejection resamples from p with d removed.

Everything is batched tensors: the accepted length of every row is `cumprod` over its accept mask,
and the emitted tokens are gathered at that length; no `.item()`, no `.nonzero()`. Randomness is
counter-based (`respec/sampling.py`): under rejection the drafter's samples, the acceptance uniforms
and the correction samples come from three streams of the same hash, keyed by (seed, position), so
no decision reuses noise that shaped an earlier output; under match every draw is the target's own.
"""

from __future__ import annotations

import torch

from respec.paged_attention import PagedKV
from respec.sampling import STREAM_ACCEPT, STREAM_DRAFT, STREAM_SAMPLE, sample, sampling_logprobs, uniform_noise

VERIFY_RULES = ("match", "rejection")  # see the module docstring
# A head drafts at the rollout temperature times this (respec/drafters/eagle.py). Distilled with
# KL(p || q), a head spreads q wider than p; sharpened, its drafts agree with the target's own samples
# more often (measured: `python -m respec.lab.draft_temperature`, docs/benchmarks.md).
DRAFT_TEMPERATURE = 0.5


def match_drafts(p: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor, temperature: torch.Tensor,
                 seeds: torch.Tensor, positions: torch.Tensor):
    """The match rule, for a batch. p: (B, k+1, V) the target's sampling log-probs at the k draft
    positions and the bonus position; drafts (B, k) of which row i proposed lengths[i]; positions
    (B,) of each row's last accepted token (drafts sit at positions+1..+k). Returns tokens (B, k+1),
    their log-probs (B, k+1) and n (B,) as `accept_drafts`: the row emits tokens[:, :n+1]."""
    B, k = drafts.shape
    k1 = k + 1
    at = positions.view(B, 1) + torch.arange(1, k1 + 1, device=positions.device)  # (B, k+1) where each lands
    per_position = lambda t: t.view(B, 1).expand(B, k1).reshape(-1)  # noqa: E731
    own, logprobs = sample(p.flatten(0, 1), per_position(temperature), per_position(seeds), at.reshape(-1))
    own, logprobs = own.view(B, k1), logprobs.view(B, k1)  # plain decoding's token at every position
    drafted = torch.arange(k, device=drafts.device).view(1, k) < lengths.view(B, 1)  # (B, k)
    n = ((drafts == own[:, :k]) & drafted).long().cumprod(dim=1).sum(dim=1)  # (B,) accepted drafts
    return own, logprobs, n  # where a draft was accepted it *is* the target's token


def accept_drafts(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, lengths: torch.Tensor,
                  temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  point: torch.Tensor | None = None):
    """The rejection rule, for a batch.

    p: (B, k+1, V) target sampling log-probs at the k draft positions and the bonus position;
    q: (B, k, V) drafter sampling log-probs, or None for point masses on the drafts; point: (B,) bool,
    rows whose drafts are point masses although q is given (a hybrid drafter's; their q is ignored);
    drafts: (B, k) draft tokens; lengths: (B,) drafts each row really proposed (<= k);
    positions: (B,) position of each row's last accepted token (drafts sit at positions+1..+k).
    Returns tokens (B, k+1), their target log-probs (B, k+1), and n (B,): the row emits
    tokens[:, :n+1] (n accepted drafts and one corrected or bonus token)."""
    B, k = drafts.shape
    greedy = (temperature <= 0).view(B, 1)
    drafted = torch.arange(k, device=drafts.device).view(1, k) < lengths.view(B, 1)  # (B, k)
    p_k = p[:, :k]
    p_d = p_k.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_d = 0.0 if q is None else q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # log q(d); a point mass: log 1
    if q is not None and point is not None:
        q_d = torch.where(point.view(B, 1), 0.0, q_d)
    steps = torch.arange(1, k + 1, device=drafts.device)
    draft_pos = positions.unsqueeze(1) + steps  # (B, k)
    u = uniform_noise(seeds.unsqueeze(1).expand(B, k), draft_pos, 1, STREAM_ACCEPT).squeeze(-1)  # (B, k)
    accept = torch.where(greedy, drafts == p_k.argmax(-1), u.log() < p_d - q_d) & drafted
    n = accept.long().cumprod(dim=1).sum(dim=1)  # (B,) accepted drafts

    # Where a row stops (position n): the residual max(0, p - q) after a rejection (n < its
    # drafts), p itself where it proposed nothing there, and p after k acceptances (the bonus
    # position). Only that one position's distribution is needed, so it is built for (B, V), not
    # for every draft position.
    V = p.shape[-1]
    p_n = p.gather(1, n.view(B, 1, 1).expand(B, 1, V)).squeeze(1)  # (B, V) the target at the stop
    rejected = (n < lengths).view(B, 1)  # (B, 1) stopped at a draft it rejected
    at = n.clamp(max=k - 1).view(B, 1)  # (B, 1) that draft's index (clamped where there is none)
    if q is None or point is not None:  # p - point mass on d, clamped: p with d removed
        without_d = p_n.scatter(-1, drafts.gather(1, at), float("-inf"))
        without_d = torch.where(without_d.amax(-1, keepdim=True) > float("-inf"), without_d, p_n)
    if q is None:
        residual = without_d
    else:
        q_n = q.gather(1, at.view(B, 1, 1).expand(B, 1, V)).squeeze(1)  # (B, V)
        residual = (p_n.exp() - q_n.exp()).clamp_min(0)  # unnormalised: the sampler is scale-free
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual.log(), p_n)
        if point is not None:
            residual = torch.where(point.view(B, 1), without_d, residual)
    chosen = torch.where(greedy | ~rejected, p_n, residual)  # (B, V)
    correction, _ = sample(chosen, temperature, seeds, positions + 1 + n)

    tokens = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1).scatter(1, n.view(B, 1), correction.view(B, 1))
    logprobs = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, k+1) the target's, as plain decoding
    return tokens, logprobs, n


def draft_stream(coupled: bool) -> int:
    """The noise a drafter draws its proposals with: the target's own under the match rule (Gumbel
    coupling), an independent stream under rejection sampling (which needs drafts independent of
    its acceptance test)."""
    return STREAM_SAMPLE if coupled else STREAM_DRAFT


def draft_next(drafter, hidden, seeds, temperature, top_k, top_p, min_p, next_pos, *, use_filter: bool, coupled: bool):
    """A drafter's output head and sampler: hidden (B, d) -> (draft tokens (B,), the drafter's
    sampling log-probs over the target vocabulary (B, V)). A compiled region (compile/policy.py)."""
    q = sampling_logprobs(drafter.target_logits(hidden), temperature, top_k, top_p, use_filter=use_filter, min_p=min_p)
    tokens, _ = sample(q, temperature, seeds, next_pos, stream=draft_stream(coupled))
    return tokens, q


def slack(k: int, late: bool) -> int:
    """The room every row of a run ahead of the host (respec/sd_ahead.py) must have at its start: 2,
    so that each row drafts at least one token at its first step (a row drafts up to its room less
    one, as the plan caps it; a step in which no row could draft is the step-by-step loop's plain
    step); where the flag is read a step late, one more step runs after it, which takes up to k + 1
    more."""
    return k + 3 if late else 2


def stops_under(k: int, late: bool) -> int:
    """The room under which a row stops the run (`next_inputs`): 1 where the flag is read at once (a
    row with one token of room drafts nothing and emits its last token in the run, as the step-by-step
    loop's step would; the run stops where no row could draft at the next step); where it is read a
    step late, `slack`, the step after the flag taking up to k + 1 more."""
    return k + 3 if late else 1


ENDLESS = 1 << 40  # a padding row's room in a run ahead of the host


def next_inputs(tokens, n, positions, left, lengths, eos_ids, watching, *, late: bool):
    """What the next SD step of a run ahead of the host needs (respec/sd_ahead.py), from a verify
    that emitted tokens[:, :n+1] (B, k+1) after `positions` (B,):

    * each row's newest token, tokens[n], and its position, positions + n + 1;
    * its room (`left` (B,): tokens it may still emit) less what it emitted, and its draft cap at
      the next step: that room less one, at most k (0 for a row that drafted nothing: padding);
    * the verified pairs, as a drafter that runs ahead consumes them: pair j (the token emitted
      after position positions + j) at position positions + 1 + j, valid for j <= n;
    * whether the run must stop (0-d bool): a `watching` row (B,) emitted one of `eos_ids` (1, E;
      -1 where there are none), a row's room fell under `stops_under` (`late`: the host reads the
      flag a step late), or no row could draft at the next step (every room at most one token; a
      padding row's is `ENDLESS`).

    Device ops only, inside the verify's compiled tail; the step-by-step loop reads none of it."""
    B, k1 = tokens.shape
    j = torch.arange(k1, device=tokens.device).view(1, k1)
    valid = j <= n.view(B, 1)  # (B, k+1)
    first = positions.view(B, 1) + 1
    pair_positions = torch.where(valid, first + j, first)
    newest = tokens.gather(1, n.view(B, 1)).view(B)
    left = left - n - 1
    caps = (left - 1).clamp(min=0).minimum(torch.where(lengths > 0, k1 - 1, 0))
    hit = ((tokens.unsqueeze(2) == eos_ids.view(1, 1, -1)).any(2) & valid).any(1) & watching  # (B,)
    ended = (left < stops_under(k1 - 1, late)).any() | hit.any() | ((left <= 1) | (left > ENDLESS // 2)).all()
    return newest, positions + n + 1, left, caps, ended, pair_positions, valid


def verify_tail(target, hidden, drafts, lengths, q, point, seeds, temperature, top_k, top_p, min_p, positions, left,
                eos_ids, watching, *, use_filter: bool, rule: str = "match", late: bool = False):
    """The target's output head over the k+1 verified positions, hidden (B, k+1, d), the
    verification rule (`match_drafts` or `accept_drafts`), and the next step's inputs
    (`next_inputs`). A compiled region (compile/policy.py)."""
    B, k1 = drafts.shape[0], drafts.shape[1] + 1
    rep = lambda t: t.repeat_interleave(k1)  # noqa: E731  per-row parameters for every position
    p = sampling_logprobs(target.logits(hidden).flatten(0, 1), rep(temperature), rep(top_k), rep(top_p),
                          use_filter=use_filter, min_p=rep(min_p)).view(B, k1, -1)
    if rule == "match":
        tokens, logprobs, n = match_drafts(p, drafts, lengths, temperature, seeds, positions)
    else:
        tokens, logprobs, n = accept_drafts(p, q, drafts, lengths, temperature, seeds, positions, point)
    return tokens, logprobs, n, *next_inputs(tokens, n, positions, left, lengths, eos_ids, watching, late=late)


def verify_step(target, pools, tokens, drafts, lengths, q, point, positions, block_tables, seeds, temperature, top_k,
                top_p, min_p, left, eos_ids, watching, *, use_filter: bool, rule: str = "match", late: bool = False,
                hidden_layers=(), run_block=None, verify_fn=verify_tail, attention: str = "gather"):
    """Verify every row's drafts in one target forward over k+1 positions, by `rule` (see the module
    docstring).

    tokens (B,): each row's newest token, at `positions` (B,), not yet in the cache; drafts (B, k)
    of which row i proposed lengths[i]; q (B, k, V) or None, and point (B,) or None, as `accept_drafts`. Slots past a row's
    proposals are neither written (they go to the null block) nor looked up past its table.
    Returns (tokens (B, k+1), log-probs (B, k+1), n (B,)) as `accept_drafts`; the next step's inputs
    for a run ahead of the host, from left (B,), eos_ids (1, E), watching (B,) and `late`
    (`next_inputs`: newest tokens, positions, left, caps, the stop flag, the verified pairs'
    positions and validity); and, with `hidden_layers`, the target's features at the k+1 verified
    positions (B, k+1, F), else None."""
    B, k = drafts.shape
    j = torch.arange(k + 1, device=positions.device)
    valid = j.view(1, -1) <= lengths.view(B, 1)  # (B, k+1) the newest token and each row's drafts
    v_tokens = torch.cat([tokens.view(B, 1), drafts], dim=1)  # (B, k+1)
    v_pos = torch.where(valid, positions.view(B, 1) + j, positions.view(B, 1))
    kv = PagedKV.build(pools, block_tables, v_pos, target.cfg.n_rep, valid=valid, attention=attention)
    out = target(v_tokens, v_pos, kv, run_block=run_block, hidden_layers=hidden_layers)
    hidden, taps = out if hidden_layers else (out, None)  # (B, k+1, d)
    out = verify_fn(target, hidden, drafts, lengths, q, point, seeds, temperature, top_k, top_p, min_p, positions, left,
                    eos_ids, watching, use_filter=use_filter, rule=rule, late=late)
    return *out, (torch.cat(taps, dim=-1) if hidden_layers else None)
