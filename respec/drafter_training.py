"""Pretraining an EAGLE-style head by distillation from the target.

  1. the target answers task prompts (reasoning-gym problems in the chat template: what RL will roll
     out), sampled by the rollout engine;
  2. the draft vocabulary is the most frequent tokens of those sequences;
  3. one target forward per sequence gives the features (outputs of the feature layers) and the
     target's next-token distribution at every position;
  4. the head is trained with forward KL(p_target || q_head) over the draft vocabulary, with a
     training-time-test (TTT) unroll: unroll step s feeds the head its own output features of step
     s-1 (shifted by one position), as drafting does after the first token, and attends exactly as
     the s-th draft does at inference: to keys made from true target features up to the drafting
     point and to the keys of its own earlier draft steps after it (`ttt_layer`). The loss weight
     of step s is 0.8^s.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.eagle import EagleConfig, EagleHead, save_eagle
from respec.engine import RolloutEngine, SamplingParams
from respec.kd_loss import accepted_mass, weighted_kl
from respec.tasks import chat_prompt


@dataclass
class Sequences:
    tokens: list[list[int]]  # prompt + completion
    prompt_lens: list[int]


def sample_rollouts(engine, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int) -> Sequences:
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + i) for i in range(len(prompts))]
    out = engine.generate(prompts, params)
    return Sequences([p + o.token_ids for p, o in zip(prompts, out)], [len(p) for p in prompts])


def draft_vocabulary(seqs: Sequences, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent token ids of the sequences (completions and prompts), most frequent
    first; ties and unseen tokens filled by id order."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for t in seqs.tokens:
        counts += torch.bincount(torch.tensor(t), minlength=vocab_size)
    return counts.argsort(descending=True, stable=True)[:size]


def distilled(prompt_len: int, n: int) -> slice:
    """The positions of a sequence of n tokens whose next token is a completion token: the ones the
    head is distilled on and the acceptance estimated at (what drafting will see)."""
    return slice(max(prompt_len - 1, 0), n - 1)


@torch.no_grad()
def target_features(target, seqs: Sequences, feature_layers, batch: int = 8, *, temperature: float | None = None):
    """Per sequence: (taps (T, 3d), final normed hidden (T, d)) from one causal target forward; with
    a `temperature`, also the log-partition (T,) of the target's full-vocabulary logits / temperature
    at the positions `collate` masks in (what the acceptance estimate needs, `head_loss`; 0 elsewhere)."""
    feats = []
    for i in range(0, len(seqs.tokens), batch):
        group = seqs.tokens[i:i + batch]
        T = max(map(len, group))
        ids = torch.zeros(len(group), T, dtype=torch.int64)
        for j, t in enumerate(group):
            ids[j, :len(t)] = torch.tensor(t)
        hidden, taps = target(ids.to(target.embed_tokens.weight.device), hidden_layers=feature_layers)
        taps = torch.cat(taps, dim=-1)
        lse = None
        if temperature is not None:  # only where a completion token is predicted (the rest stays 0)
            lens, plens = [len(t) for t in group], seqs.prompt_lens[i:i + batch]
            where = torch.zeros(len(group), T, dtype=torch.bool, device=hidden.device)
            for j, (n, p) in enumerate(zip(lens, plens)):
                where[j, distilled(p, n)] = True
            lse = torch.zeros(len(group), T, device=hidden.device)
            lse[where] = (target.logits(hidden[where]) / temperature).logsumexp(-1)  # (rows,) fp32
        for j, t in enumerate(group):  # right padding never affects earlier positions (causal)
            item = (taps[j, :len(t)].float().cpu(), hidden[j, :len(t)].float().cpu())
            feats.append(item + (lse[j, :len(t)].cpu(),) if lse is not None else item)
    return feats


def ttt_layer(head: EagleHead, features: torch.Tensor, tokens: torch.Tensor, embed, unroll: int):
    """The head's layer over every TTT step; returns the output features of each step (B, T, d).

    Step s, query position j (the s-th draft after drafting point j - s) sees: step-0 keys (true
    features) at positions <= j - s, and the key of step t at position j - s + t for t = 1..s:
    what the s-th draft attends to at inference."""
    from models.decoder import apply_rope

    layer, cfg = head.layer, head.cfg.target
    B, T, _ = features.shape
    emb = layer.embed_norm(embed(tokens).to(features.dtype))
    cos = head.rope_cos[:T].to(features.dtype).view(1, T, 1, -1)
    sin = head.rope_sin[:T].to(features.dtype).view(1, T, 1, -1)
    attn = layer.self_attn
    rep = cfg.n_rep
    pos = torch.arange(T, device=features.device)
    keys, values, outs = [], [], []
    feat = features
    for s in range(unroll):
        h = torch.cat([emb, layer.feature_norm(feat)], dim=-1)
        q, k, v = attn.qkv_proj(h).split(attn.split, dim=-1)
        q = apply_rope(q.view(B, T, cfg.num_heads, cfg.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k.view(B, T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        k = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).repeat_interleave(rep, dim=2).transpose(1, 2)
        keys.append(k)
        values.append(v)
        scale = cfg.head_dim ** -0.5
        scores = [(q @ keys[0].transpose(-1, -2)) * scale]  # (B, H, T, T) against true-feature keys
        scores[0] = scores[0].masked_fill(pos.view(1, -1) > (pos - s).view(-1, 1), float("-inf"))
        shifted_v = []
        for t in range(1, s + 1):  # own keys: step t at position j - (s - t)
            shift = s - t
            k_t = torch.roll(keys[t], shift, dims=2)
            v_t = torch.roll(values[t], shift, dims=2)
            d_t = (q * k_t).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
            scores.append(d_t.masked_fill((pos < shift).view(1, 1, -1, 1), float("-inf")))
            shifted_v.append(v_t)
        w = torch.cat(scores, dim=-1).softmax(-1)
        w = torch.nan_to_num(w)  # rows with no visible key at all (j < s): unused by the loss
        o = w[..., :T] @ values[0]
        for t, v_t in enumerate(shifted_v):
            o = o + w[..., T + t: T + t + 1] * v_t
        x = feat + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        outs.append(x)
        feat = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x[:, :-1]], dim=1)  # own features, shifted
    return outs


def head_loss(head: EagleHead, target, batch, unroll: int, *, weights: torch.Tensor | None = None,
              denom: float | None = None, temperature: float = 1.0, lse: torch.Tensor | None = None):
    """The TTT distillation loss: sum over unroll steps s of 0.8^s * the weighted KL(p || q_s) of
    respec/kd_loss.py, p the target's next-token distribution renormalised on the draft vocabulary,
    q_s the head's after s steps on its own features. Both at `temperature`.

    batch: tokens (B, T), taps (B, T, 3d), final (B, T, d) (the target's normed last hidden state),
    mask (B, T) (positions whose next token is distilled); `weights` (B,) per sequence (default 1)
    and `denom` the weighted token count of the whole batch over microbatches and ranks (default:
    this batch's). With `lse` (B, T), the log-partition of the target's *full-vocabulary* sampling
    logits, every step also measures sum_t (1 - TV(p_full, q_s)): the acceptance estimate.
    Returns (loss, [per step: {"kl", "agree", and with lse "accepted", "count"}])."""
    tokens, taps, final, mask = batch
    B, T = tokens.shape
    weights = torch.ones(B, device=tokens.device) if weights is None else weights
    with torch.no_grad():  # the target's logits of the next token over the draft vocab
        w = target.lm_head.weight[head.d2t].float()  # (N, d)
        z = (final.float() @ w.T) / temperature  # (B, T, N)
        logp = z.log_softmax(-1)
        p_full = None  # (B, T, N): the draft vocabulary's slice of the full p (lse is only set on the mask)
        if lse is not None:
            p_full = torch.where(mask.unsqueeze(-1), (z - lse.unsqueeze(-1)).exp(), 0.0)
    shifted = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
    feature = head.project(shifted)  # pair j: (feature of position j-1, token j)
    total, steps = 0.0, []
    for s, out in enumerate(ttt_layer(head, feature, tokens, target.embed_tokens, unroll)):
        logq = (head.draft_logits(out) / temperature).log_softmax(-1)  # (B, T, N)
        # step s predicts from s own features back: its first s positions have no such history (they
        # are prompt positions, outside the mask, for any prompt longer than the unroll)
        valid = mask.clone()
        valid[:, :s] = False
        loss_s = weighted_kl(logp, logq, valid, weights, denom=denom)
        total = total + (0.8 ** s) * loss_s
        with torch.no_grad():
            n = valid.sum().clamp_min(1)
            stat = {"kl": loss_s.item(), "agree": ((logq.argmax(-1) == logp.argmax(-1)) & valid).sum().item() / n.item()}
            if p_full is not None:
                stat["accepted"] = (accepted_mass(p_full, logq.exp()) * valid).sum().item()
                stat["count"] = int(valid.sum())
        steps.append(stat)
    return total, steps


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
    order = torch.randperm(len(seqs.tokens), generator=gen).tolist()
    for i in range(0, len(order), batch):
        yield collate(seqs, feats, order[i:i + batch])[:4]


def new_head(target, draft_vocab: torch.Tensor, seed: int) -> EagleHead:
    cfg = EagleConfig.for_target(target.cfg, len(draft_vocab))
    torch.manual_seed(seed)
    head = EagleHead(cfg)
    with torch.no_grad():
        head.d2t.copy_(draft_vocab)
        for name, p in head.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        # start the output head from the target's (frozen) head rows: a strong initialisation
        head.lm_head.weight.copy_(target.lm_head.weight[draft_vocab].float())
    return head


def untrained_head(target, prompts: list[list[int]], *, seed: int, draft_vocab: int = 8192) -> EagleHead:
    """A head with nothing learned yet, for a cold start that only online distillation improves: random
    layers, the draft vocabulary the most frequent tokens of `prompts` (then the lowest ids, which
    BPE gives its most frequent merges), output rows copied from the target's head (as `new_head`)."""
    vocab = draft_vocabulary(Sequences(prompts, [len(p) for p in prompts]), draft_vocab, target.cfg.vocab_size)
    return new_head(target, vocab, seed)


def cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def pretrain(target, tokenizer, out_dir, *, problems: list, held_out: int, new_tokens: int,
             temperature: float = 1.0, draft_vocab: int = 8192, epochs: int = 4, batch: int = 8, unroll: int = 3,
             lr: float = 1e-3, checkpoint_every: int = 50, seed: int = 0, held_out_ks=range(1, 7),
             log=print) -> dict:
    """The whole pretraining job on `problems` (the last `held_out` of them held out): target
    rollouts, draft vocabulary, features, TTT training, held-out acceptance. Writes the head,
    train_report.json and history.jsonl into `out_dir`."""
    out_dir = Path(out_dir)
    target.requires_grad_(False)
    prompts = len(problems) - held_out
    all_prompts = [chat_prompt(tokenizer, p.messages()) for p in problems]
    train_prompts, held_prompts = all_prompts[:prompts], all_prompts[prompts:]
    eos = [tokenizer.eos_token_id]

    # Eager engines: a one-off job whose batch shrinks through every bucket would spend longer
    # compiling them (cold) than generating.
    engine = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=32, eos_token_ids=eos, eager=True)
    seqs, t_gen = timed(sample_rollouts, engine, train_prompts, new_tokens, temperature, seed)
    n_tok = sum(len(t) - n for t, n in zip(seqs.tokens, seqs.prompt_lens))
    log(f"rollouts: {len(seqs.tokens)} sequences, {n_tok} generated tokens in {t_gen:.0f} s")
    vocab = draft_vocabulary(seqs, draft_vocab, target.cfg.vocab_size)
    head = new_head(target, vocab, seed)
    feats, t_feat = timed(target_features, target, seqs, head.cfg.feature_layers)
    log(f"target features: {t_feat:.0f} s; head has {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters")

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    total = -(-len(seqs.tokens) // batch) * epochs
    gen = torch.Generator().manual_seed(seed)
    history, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc="drafter KD", file=sys.stderr)
    head.train()
    for epoch in range(epochs):
        for mb in make_batches(seqs, feats, batch, gen):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            loss, per_step = head_loss(head, target, mb, unroll)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": loss.item(),
                            "agree_per_unroll": [round(st["agree"], 4) for st in per_step]})
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{per_step[0]['agree']:.2f}")
            bar.update()
            if step % checkpoint_every == 0:
                save_eagle(head, out_dir / "checkpoint")
    bar.close()
    t_train = time.perf_counter() - t0
    head.eval()
    save_eagle(head, out_dir)

    # Held-out acceptance: greedy SD with the new head on prompts it never saw.
    acceptance = {}
    for k in held_out_ks:
        sd = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=32, eos_token_ids=eos,
                           drafter=head.to(target.embed_tokens.weight.dtype), num_draft_tokens=k, eager=True)
        sd.generate(held_prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
        acceptance[k] = {"accept_len": round(sd.stats.accept_len, 3),
                         "accept_per_pos": [round(a, 3) for a in sd.stats.accept_per_pos]}
        log(f"held-out k={k}: {acceptance[k]['accept_len']:.2f} tokens per verify step, per position "
            f"{acceptance[k]['accept_per_pos']}")
    report = {"prompts": prompts, "held_out": held_out, "generated_tokens": n_tok,
              "rollout_s": round(t_gen, 1), "features_s": round(t_feat, 1), "train_s": round(t_train, 1),
              "steps": step, "final_loss": history[-1]["loss"] if history else None,
              "held_out_greedy": acceptance}
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return report
