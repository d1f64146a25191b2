"""Distilling a draft head from the target: what the offline pretraining (respec/drafter_training.py)
and the online learner during GRPO (respec/online_learner.py) share.

  * `target_features`: one no-grad target forward per sequence (a GRPO group's shared prompt runs
    once) gives the features the head reads and the target's distribution at every position;
  * `head_loss`: forward KL(p_target || q_head) over the draft vocabulary at the rollout temperature
    (optionally plus TV(p, q)), each sequence weighted (respec/kd_loss.py: w(r)), with the exact
    training-time-test unroll: unroll step s feeds the head its own output features of step s-1,
    and attends exactly as the s-th draft does at inference (`unroll_mask`, `ttt_layer`); and the
    acceptance estimate that goes to the solver (1 - TV, or under the match rule a draw with the
    engine's own sampler);
  * `collate`, `make_batches`: sequences and their features into training batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.eagle import EagleHead
from respec.kd_loss import accepted_mass, coupled_agreement, weighted_kl
from respec.paged_attention import causal_attention, masked_attention

ESTIMATE_ROWS = 256  # positions per batch the match rule's acceptance estimate draws (every R/256-th)



@dataclass
class Sequences:
    tokens: list[list[int]]  # prompt + completion
    prompt_lens: list[int]


def distilled(prompt_len: int, n: int) -> slice:
    """The positions of a sequence of n tokens whose next token is a completion token: the ones the
    head is distilled on and the acceptance estimated at (what drafting will see)."""
    return slice(max(prompt_len - 1, 0), n - 1)


@torch.no_grad()
def target_features(target, seqs: Sequences, feature_layers, batch: int = 8, *, temperature: float | None = None):
    """Per sequence: (taps (T, 3d), final normed hidden (T, d)) from the target's causal forward; with
    a `temperature`, also the log-partition (T,) of the target's full-vocabulary logits / temperature
    at the positions `collate` masks in (what the acceptance estimate needs, `head_loss`; 0 elsewhere).

    Sequences that share their prompt (a GRPO group's G samples) share its forward: the prompt runs
    once and each completion attends to its keys and values (`_prompt_once`); the same features as a
    forward of each whole sequence, up to rounding."""
    feats: list = [None] * len(seqs.tokens)
    groups: dict[tuple, list[int]] = {}
    for i, (t, p) in enumerate(zip(seqs.tokens, seqs.prompt_lens)):
        groups.setdefault(tuple(t[:p]), []).append(i)
    shared = max(map(len, groups.values())) > 1
    chunk: list[list[int]] = []
    for members in [*groups.values(), None]:  # chunks of whole groups of about `batch` sequences
        if chunk and (members is None or sum(map(len, chunk)) + len(members) > batch):
            rows = [i for g in chunk for i in g]
            if shared:
                _prompt_once(target, seqs, chunk, feature_layers, temperature, feats)
            else:
                _whole(target, seqs, rows, feature_layers, temperature, feats)
            chunk = []
        if members is not None:
            chunk.append(members)
    return feats


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(1, max(map(len, rows))), dtype=torch.int64)
    for j, t in enumerate(rows):
        ids[j, :len(t)] = torch.tensor(t, dtype=torch.int64)
    return ids.to(device)


def _store(target, seqs: Sequences, out: list[tuple[int, torch.Tensor, torch.Tensor]], temperature,
           feats: list) -> None:
    """feats[i] = (taps, hidden[, log-partition]) for each (i, taps, hidden) of `out`; the
    log-partition only where a completion token is predicted (the rest stays 0), in one product."""
    lse = None
    if temperature is not None:
        spans = [distilled(seqs.prompt_lens[i], len(h)) for i, _, h in out]
        picked = torch.cat([h[span] for (_, _, h), span in zip(out, spans)])
        lse = (target.logits(picked) / temperature).logsumexp(-1).cpu()  # (rows,) fp32
        lse = lse.split([span.stop - span.start for span in spans])
    for r, (i, taps, hidden) in enumerate(out):
        item = (taps.float().cpu(), hidden.float().cpu())
        if lse is not None:
            full = torch.zeros(len(hidden))
            full[distilled(seqs.prompt_lens[i], len(hidden))] = lse[r]
            item += (full,)
        feats[i] = item


def _whole(target, seqs: Sequences, rows: list[int], feature_layers, temperature, feats: list) -> None:
    """One forward of the whole sequences `rows` (right padding never affects earlier positions)."""
    device = target.embed_tokens.weight.device
    hidden, taps = target(_padded([seqs.tokens[i] for i in rows], device), hidden_layers=feature_layers)
    taps = torch.cat(taps, dim=-1)
    lens = [len(seqs.tokens[i]) for i in rows]
    _store(target, seqs, [(i, taps[j, :n], hidden[j, :n]) for j, (i, n) in enumerate(zip(rows, lens))],
           temperature, feats)


def _prompt_once(target, seqs: Sequences, groups: list[list[int]], feature_layers, temperature, feats: list) -> None:
    """Each group's prompt in one forward, keeping every layer's keys and values; then all the
    completions in one forward, each attending to its prompt's keys (padding masked) and causally
    to its own."""
    device = target.embed_tokens.weight.device
    plens = [seqs.prompt_lens[g[0]] for g in groups]
    prompts = [seqs.tokens[g[0]][:p] for g, p in zip(groups, plens)]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(block, x, cos, sin, kv):
        def attend(q, k, v):
            kept[block.layer] = (k, v)
            return causal_attention(q, k, v)
        return block(x, cos, sin, None, attend=attend)

    p_hidden, p_taps = target(_padded(prompts, device), hidden_layers=feature_layers, run_block=keep)
    p_taps = torch.cat(p_taps, dim=-1)
    rows = [(g, i) for g, members in enumerate(groups) for i in members]
    owner = torch.tensor([g for g, _ in rows], device=device)
    tails = [seqs.tokens[i][plens[g]:] for g, i in rows]
    P, C = p_hidden.shape[1], max(1, max(map(len, tails)))
    prompt_ok = torch.arange(P, device=device) < torch.tensor(plens, device=device)[owner].unsqueeze(1)  # (R, P)
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    mask = torch.cat([prompt_ok.unsqueeze(1).expand(-1, C, -1), causal.expand(len(rows), -1, -1)], dim=-1)

    def extend(block, x, cos, sin, kv):
        def attend(q, k, v):
            pk, pv = kept[block.layer]
            return masked_attention(q, torch.cat([pk[owner], k], 1), torch.cat([pv[owner], v], 1), mask.unsqueeze(1))
        return block(x, cos, sin, None, attend=attend)

    positions = torch.tensor(plens, device=device)[owner].unsqueeze(1) + torch.arange(C, device=device)
    positions = positions.clamp_max(target.cfg.max_position_embeddings - 1)  # (only padding reaches past it)
    c_hidden, c_taps = target(_padded(tails, device), positions=positions, hidden_layers=feature_layers,
                              run_block=extend)
    c_taps = torch.cat(c_taps, dim=-1)
    out = []
    for r, (g, i) in enumerate(rows):
        p, c = plens[g], len(tails[r])
        out.append((i, torch.cat([p_taps[g, :p], c_taps[r, :c]]), torch.cat([p_hidden[g, :p], c_hidden[r, :c]])))
    _store(target, seqs, out, temperature, feats)


def unroll_mask(T: int, s: int, device=None) -> torch.Tensor:
    """Which keys each query of TTT step s sees: (T, (s+1)*T) bool over the key set [K_0 | K_1 | ... | K_s],
    K_t the keys step t made at every position (K_0 from the true features).

    The query at position j of step s is the s-th draft after drafting point j - s. At inference that
    draft attends to the cache: keys of true features up to the drafting point (K_0 at positions <=
    j - s), then the key each earlier draft step wrote after it (step t at position j - s + t, for
    t = 1..s; t = s is the query's own key, so no row is empty)."""
    j = torch.arange(T, device=device).view(-1, 1)  # query positions
    i = torch.arange(T, device=device).view(1, -1)  # key positions within one block
    blocks = [i <= j - s] + [i == j - s + t for t in range(1, s + 1)]
    return torch.cat(blocks, dim=1)


def ttt_layer(head: EagleHead, features: torch.Tensor, tokens: torch.Tensor, embed, unroll: int):
    """The head's layer over every TTT step; returns the output features of each step (B, T, d).

    Step s runs the head's own layer (`EagleLayer`) on (its step s-1 output features shifted by one
    position, the tokens); only which keys a query sees differs from a causal forward: `unroll_mask`,
    over the keys of every step so far. The steps' keys are kept, so step s costs one layer forward."""
    B, T, _ = features.shape
    emb = embed(tokens).to(features.dtype)  # (B, T, d)
    cos = head.rope_cos[:T].to(features.dtype).view(1, T, 1, -1)  # (1, T, 1, D)
    sin = head.rope_sin[:T].to(features.dtype).view(1, T, 1, -1)
    keys, values, outs = [], [], []  # per step: (B, T, Hkv, D)
    feat = features
    for s in range(unroll):
        mask = unroll_mask(T, s, features.device)  # (T, (s+1)*T)

        def attend(q, k, v, mask=mask):  # this step's keys join the set, then the masked attention
            keys.append(k)
            values.append(v)
            return masked_attention(q, torch.cat(keys, dim=1), torch.cat(values, dim=1), mask)

        x = head.layer(feat, emb, cos, sin, None, attend=attend)  # (B, T, d)
        outs.append(x)
        feat = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x[:, :-1]], dim=1)  # own features, shifted
    return outs


def head_loss(head: EagleHead, target, batch, unroll: int, *, weights: torch.Tensor | None = None,
              denom: float | None = None, temperature: float = 1.0, lse: torch.Tensor | None = None,
              decay: float = 1.0, tv_weight: float = 0.0, verify: str = "match", draft_temperature: float = 1.0):
    """The TTT distillation loss: sum over unroll steps s of decay^s * (the weighted KL(p || q_s) of
    respec/kd_loss.py + tv_weight * the weighted mean of TV(p_full, q_s)). p is the target's
    next-token distribution renormalised on the draft vocabulary, p_full its slice of the target's
    full distribution, q_s the head's after s steps on its own features; all at `temperature`.

    Why both terms: a draft from q_s is accepted with probability sum_x min(p_full, q_s) = 1 - TV, so
    TV is the loss acceptance actually pays. Its gradient alone is weak (it only sees where q_s < p
    or q_s > p, not by how much), so the KL, whose minimiser (q_s = p on the draft vocabulary) also
    maximises 1 - TV, does the steering. `decay` < 1 trusts later steps less; every step counts
    alike at k = 3, since drafts are accepted or rejected in a row.

    batch: tokens (B, T), taps (B, T, 3d), final (B, T, d) (the target's normed last hidden state),
    mask (B, T) (positions whose next token is distilled); `weights` (B,) per sequence (default 1)
    and `denom` the weighted token count of the whole batch over microbatches and ranks (default:
    this batch's). `lse` (B, T) is the log-partition of the target's *full-vocabulary* sampling
    logits: the TV term needs it, and with it every step also reports the acceptance estimate summed
    over positions for the engine's `verify` rule (respec/kd_loss.py): sum_t (1 - TV(p_full, q_s))
    under rejection, a Monte Carlo count of coupled agreements under match, for the q the head drafts
    from (at `temperature` * `draft_temperature`, respec/drafters/eagle.py; the loss is at
    `temperature`). Returns (loss, [per step: {"kl", "agree", and with lse "accepted", "count"}])."""
    tokens, taps, final, mask = batch
    B, T = tokens.shape
    if tv_weight and lse is None:
        raise ValueError("the TV term needs the target's log-partition (lse)")
    weights = torch.ones(B, device=tokens.device) if weights is None else weights
    # Only the distilled positions pay the draft-vocabulary heads: flatten them to rows.
    w_row = weights.view(-1, 1).expand(B, T)[mask]  # (R,) each row's sequence weight
    first = torch.arange(T, device=tokens.device).expand(B, T)[mask]  # (R,) position of each row
    # the target's logits of the next token over the draft vocab, in fp32 even under autocast
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        w = target.lm_head.weight[head.d2t].float()  # (N, d)
        z = (final[mask].float() @ w.T) / temperature  # (R, N)
        logp = z.log_softmax(-1)
        # the draft vocabulary's slice of the full p (R, N): its mass outside is never accepted
        p_full = (z - lse[mask].unsqueeze(-1)).exp() if lse is not None else None
        if lse is not None and verify == "match":  # the match rule's estimate draws from the full p
            est_rows = torch.arange(0, z.shape[0], max(1, -(-z.shape[0] // ESTIMATE_ROWS)), device=z.device)
            logp_all = ((final[mask][est_rows].float() @ target.lm_head.weight.float().T) / temperature).log_softmax(-1)
            est_seeds, est_pos = (c[est_rows] for c in _estimate_counters(tokens, mask, 0))
    shifted = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
    feature = head.project(shifted)  # pair j: (feature of position j-1, token j)
    total, steps = 0.0, []
    for s, out in enumerate(ttt_layer(head, feature, tokens, target.embed_tokens, unroll)):
        logq = (head.draft_logits(out[mask]) / temperature).log_softmax(-1)  # (R, N)
        # step s predicts from s own features back: its first s positions have no such history (they
        # are prompt positions, outside the mask, for any prompt longer than the unroll)
        valid = first >= s  # (R,)
        n_w = (w_row * valid).sum() if denom is None else denom  # weighted row count
        loss_s = weighted_kl(logp.unsqueeze(1), logq.unsqueeze(1), valid.unsqueeze(1), w_row, denom=n_w)
        accepted = accepted_mass(p_full, logq.exp()) if p_full is not None else None  # (R,)
        step_loss = loss_s
        if tv_weight:
            tv = ((1.0 - accepted) * w_row * valid).sum() / n_w
            step_loss = step_loss + tv_weight * tv
        total = total + (decay ** s) * step_loss
        with torch.no_grad():
            n = valid.sum().clamp_min(1)
            stat = {"kl": loss_s.item(), "agree": ((logq.argmax(-1) == logp.argmax(-1)) & valid).sum().item() / n.item()}
            drafting = logq if draft_temperature == 1 or accepted is None else (
                head.draft_logits(out[mask]).float() / (temperature * draft_temperature)).log_softmax(-1)
            if accepted is not None and verify == "rejection":
                drafted = accepted if draft_temperature == 1 else accepted_mass(p_full, drafting.exp())
                stat["accepted"] = (drafted * valid).sum().item()
                stat["count"] = int(valid.sum())
            elif accepted is not None:  # one coupled draw per sampled row, with the head's q over the full vocabulary
                logq_all = logp_all.new_full(logp_all.shape, float("-inf")).index_copy(
                    -1, head.d2t, drafting[est_rows].to(logp_all.dtype))
                estimate = coupled_agreement(logp_all, logq_all, est_seeds + s, est_pos)
                stat["accepted"] = (estimate * valid[est_rows]).sum().item()
                stat["count"] = int(valid[est_rows].sum())
        steps.append(stat)
    return total, steps


def _estimate_counters(tokens: torch.Tensor, mask: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counters (seeds, positions) (R,) for `coupled_agreement` at the masked positions of `tokens`
    (B, T): a seed made from the sequence's tokens, and the position. Any noise independent of p and
    q makes the draw unbiased; the sampler's own keeps it the noise the engine draws with, and
    seeding from the text (not from a row's place in a minibatch) gives every rank split the same
    draws."""
    B, T = tokens.shape
    weights = (torch.arange(1, T + 1, device=tokens.device) * 0x9E3779B1) & 0x7FFFFFFF  # (T,)
    seed = ((tokens * weights).sum(-1) + step) & 0xFFFFFFFF  # (B,)
    seeds = seed.view(B, 1).expand(B, T)[mask]  # (R,)
    positions = torch.arange(T, device=tokens.device).expand(B, T)[mask]
    return seeds, positions


def collate(seqs: Sequences, feats, idx: list[int]):
    """Sequences `idx` right-padded: tokens (B, T), taps (B, T, 3d), final (B, T, d), mask (B, T)
    (`distilled` positions) and, if `feats` carry it, the log-partition lse (B, T) (else None)."""
    T = max(len(seqs.tokens[j]) for j in idx)
    d3, d = feats[idx[0]][0].shape[-1], feats[idx[0]][1].shape[-1]
    tokens = torch.zeros(len(idx), T, dtype=torch.int64)
    taps = torch.zeros(len(idx), T, d3)
    final = torch.zeros(len(idx), T, d)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    lse = torch.zeros(len(idx), T) if len(feats[idx[0]]) > 2 else None
    for r, j in enumerate(idx):
        n = len(seqs.tokens[j])
        tokens[r, :n] = torch.tensor(seqs.tokens[j])
        taps[r, :n], final[r, :n] = feats[j][:2]
        if lse is not None:
            lse[r, :n] = feats[j][2]
        mask[r, distilled(seqs.prompt_lens[j], n)] = True
    return tokens, taps, final, mask, lse


def make_batches(seqs: Sequences, feats, batch: int, gen: torch.Generator):
    """One epoch of shuffled batches: collate's (tokens, taps, final, mask, lse)."""
    order = torch.randperm(len(seqs.tokens), generator=gen).tolist()
    for i in range(0, len(order), batch):
        yield collate(seqs, feats, order[i:i + batch])
