"""Exact batched speculative decoding: draft k tokens per row, verify k+1 positions in one target
forward, accept each row's own prefix by rejection sampling.

For each row, with p_i the target's and q_i the drafter's sampling distributions at draft position
i (temperature, top-k and top-p applied to both, exactly as plain sampling applies them):
  * draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
  * at the first rejection i, the row emits a token from normalize(max(0, p_i - q_i)) and stops;
  * if all k are accepted it emits a bonus token from p_{k+1}.
The emitted tokens are then distributed exactly as plain sampling from p would produce them
(Leviathan et al. 2023; Chen et al. 2023). Greedy rows (temperature 0) accept while the draft equals
the target's argmax and emit the argmax at the first mismatch.

Everything is batched tensors: the accepted length of every row is `cumprod` over its accept mask,
and the correction token is gathered at that length; no `.item()`, no `.nonzero()`. Randomness is
counter-based (`respec/sampling.py`): the drafter's samples, the acceptance uniforms and the
correction samples come from three streams of the same hash, keyed by (seed, position), so no
decision reuses noise that shaped an earlier output.
"""

from __future__ import annotations

import torch

from models.eagle import call_head
from respec.paged_attention import PagedKV
from respec.sampling import STREAM_ACCEPT, STREAM_DRAFT, sample, sampling_logprobs, uniform_noise


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, temperature: torch.Tensor,
                  seeds: torch.Tensor, positions: torch.Tensor):
    """The rejection-sampling rule, for a batch.

    p: (B, k+1, V) target sampling log-probs at the k draft positions and the bonus position;
    q: (B, k, V) drafter sampling log-probs; drafts: (B, k) draft tokens (sampled from q);
    positions: (B,) position of each row's last accepted token (drafts sit at positions+1..+k).
    Returns tokens (B, k+1), their target log-probs (B, k+1), and n (B,): the row emits
    tokens[:, :n+1] (n accepted drafts and one corrected or bonus token)."""
    B, k = drafts.shape
    greedy = (temperature <= 0).view(B, 1)
    p_k = p[:, :k]
    p_d = p_k.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_d = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    steps = torch.arange(1, k + 1, device=drafts.device)
    draft_pos = positions.unsqueeze(1) + steps  # (B, k)
    u = uniform_noise(seeds.unsqueeze(1).expand(B, k), draft_pos, 1, STREAM_ACCEPT).squeeze(-1)  # (B, k)
    accept = torch.where(greedy, drafts == p_k.argmax(-1), u.log() < p_d - q_d)
    n = accept.long().cumprod(dim=1).sum(dim=1)  # (B,) accepted drafts

    # Where a row stops: the residual max(0, p - q) after a rejection, p itself after k acceptances.
    residual = (p_k.exp() - q.exp()).clamp_min(0)  # (B, k, V), unnormalised: the sampler is scale-free
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual.log(), p_k)
    stop_dist = torch.cat([residual, p[:, k:]], dim=1)  # (B, k+1, V)
    V = p.shape[-1]
    at_n = n.view(B, 1, 1).expand(B, 1, V)
    chosen = torch.where(greedy, p.gather(1, at_n).squeeze(1), stop_dist.gather(1, at_n).squeeze(1))  # (B, V)
    correction, _ = sample(chosen, temperature, seeds, positions + 1 + n)

    tokens = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1).scatter(1, n.view(B, 1), correction.view(B, 1))
    logprobs = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, k+1) the target's, as plain decoding
    return tokens, logprobs, n


def draft_next(drafter, hidden, seeds, temperature, top_k, top_p, next_pos, *, use_filter: bool):
    """A drafter's output head and sampler: hidden (B, d) -> (draft tokens (B,), the drafter's
    sampling log-probs over the target vocabulary (B, V)). A compiled region (compile/policy.py)."""
    q = sampling_logprobs(drafter.target_logits(hidden), temperature, top_k, top_p, use_filter=use_filter)
    tokens, _ = sample(q, temperature, seeds, next_pos, stream=STREAM_DRAFT)
    return tokens, q


def verify_tail(target, hidden, drafts, q, seeds, temperature, top_k, top_p, positions, *, use_filter: bool):
    """The target's output head over the k+1 verified positions, hidden (B, k+1, d), and the
    acceptance test (`accept_drafts`). A compiled region (compile/policy.py)."""
    B, k1 = drafts.shape[0], drafts.shape[1] + 1
    rep = lambda t: t.repeat_interleave(k1)  # noqa: E731  per-row parameters for every position
    p = sampling_logprobs(target.logits(hidden).flatten(0, 1), rep(temperature), rep(top_k), rep(top_p),
                          use_filter=use_filter).view(B, k1, -1)
    return accept_drafts(p, q, drafts, temperature, seeds, positions)


def speculative_step(target, drafter, pools, draft_pools, prev_tokens, tokens, positions, block_tables, seeds,
                     temperature, top_k, top_p, *, k: int, use_filter: bool, run_block=None,
                     draft_fn=draft_next, verify_fn=verify_tail):
    """One SD step for every row: k drafter forwards, one target forward over k+1 positions.

    tokens (B,): each row's newest token, at `positions` (B,), not yet in either cache;
    prev_tokens (B,): the token before it (re-fed to the drafter, whose cache may lack it when every
    draft of the previous step was accepted). Target and drafter caches share the block tables.
    Returns (tokens (B, k+1), log-probs (B, k+1), n (B,)) as `accept_drafts`."""
    B = tokens.shape[0]
    n_rep_d = drafter.cfg.n_rep
    # Draft: the first forward covers (previous, newest) token, the rest one token each.
    inp = torch.stack([prev_tokens, tokens], dim=1)
    pos = torch.stack([(positions - 1).clamp_min(0), positions], dim=1)
    drafts, q = [], []
    for i in range(k):
        kv = PagedKV.build(draft_pools, block_tables, pos, n_rep_d)
        hidden = drafter(inp, pos, kv, run_block=run_block)[:, -1]  # (B, d)
        d_i, q_i = draft_fn(drafter, hidden, seeds, temperature, top_k, top_p, positions + 1 + i, use_filter=use_filter)
        drafts.append(d_i)
        q.append(q_i)
        inp, pos = d_i.view(B, 1), (positions + 1 + i).view(B, 1)
    drafts_t = torch.stack(drafts, dim=1)  # (B, k)

    # Verify: the newest token and the k drafts in one target forward.
    v_tokens = torch.cat([tokens.view(B, 1), drafts_t], dim=1)  # (B, k+1)
    v_pos = positions.view(B, 1) + torch.arange(k + 1, device=positions.device)
    kv = PagedKV.build(pools, block_tables, v_pos, target.cfg.n_rep)
    hidden = target(v_tokens, v_pos, kv, run_block=run_block)  # (B, k+1, d)
    return verify_fn(target, hidden, drafts_t, torch.stack(q, dim=1), seeds, temperature, top_k, top_p, positions,
                     use_filter=use_filter)


def eagle_speculative_step(target, head, pools, head_pools, pend_taps, pend_tokens, pend_pos, pend_valid, positions,
                           block_tables, seeds, temperature, top_k, top_p, *, k: int, use_filter: bool,
                           run_block=None, run_head=call_head, draft_fn=draft_next, verify_fn=verify_tail):
    """One SD step with an EAGLE head (`models/eagle.py`).

    pend_taps (B, k+1, 3d), pend_tokens / pend_pos / pend_valid (B, k+1): the (target feature of
    position j-1, token j) pairs the head has not consumed yet, right-padded; each row's last valid
    pair holds its newest token, at `positions` (B,). The head first catches up on them (rewriting
    the slots it filled with its own features while drafting), then drafts k tokens feeding its own
    output features back. Returns `accept_drafts`'s (tokens, log-probs, n) and the target's
    features at the k+1 verified positions (B, k+1, 3d): the next step's pending pairs."""
    B = positions.shape[0]
    embed = target.embed_tokens
    kv = PagedKV.build(head_pools, block_tables, pend_pos, head.n_rep, valid=pend_valid)
    out = run_head(head, head.project(pend_taps), pend_tokens, pend_pos, embed, kv.layer(0))  # (B, k+1, d)
    last = pend_valid.long().sum(1) - 1  # (B,)
    g = out.gather(1, last.view(B, 1, 1).expand(B, 1, out.shape[-1]))  # (B, 1, d)
    newest = pend_tokens.gather(1, last.view(B, 1))  # (B, 1)
    drafts, q = [], []
    for i in range(k):
        d_i, q_i = draft_fn(head, g[:, 0], seeds, temperature, top_k, top_p, positions + 1 + i, use_filter=use_filter)
        drafts.append(d_i)
        q.append(q_i)
        if i < k - 1:
            pos = (positions + 1 + i).view(B, 1)
            kv = PagedKV.build(head_pools, block_tables, pos, head.n_rep)
            g = run_head(head, g, d_i.view(B, 1), pos, embed, kv.layer(0))
    drafts_t = torch.stack(drafts, dim=1)  # (B, k)

    v_tokens = torch.cat([newest, drafts_t], dim=1)  # (B, k+1)
    v_pos = positions.view(B, 1) + torch.arange(k + 1, device=positions.device)
    kv = PagedKV.build(pools, block_tables, v_pos, target.cfg.n_rep)
    hidden, taps = target(v_tokens, v_pos, kv, run_block=run_block, hidden_layers=head.cfg.feature_layers)
    tokens, logprobs, n = verify_fn(target, hidden, drafts_t, torch.stack(q, dim=1), seeds, temperature, top_k, top_p,
                                    positions, use_filter=use_filter)
    return tokens, logprobs, n, torch.cat(taps, dim=-1)
