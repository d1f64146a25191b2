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

import math
import time
from dataclasses import dataclass

import torch

from models.eagle import EagleConfig, EagleHead


@dataclass
class Sequences:
    tokens: list[list[int]]  # prompt + completion
    prompt_lens: list[int]


def sample_rollouts(engine, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int) -> Sequences:
    from respec.engine import SamplingParams

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


@torch.no_grad()
def target_features(target, seqs: Sequences, feature_layers, batch: int = 8):
    """Per sequence: (taps (T, 3d), final normed hidden (T, d)) from one causal target forward."""
    feats = []
    for i in range(0, len(seqs.tokens), batch):
        group = seqs.tokens[i:i + batch]
        T = max(map(len, group))
        ids = torch.zeros(len(group), T, dtype=torch.int64)
        for j, t in enumerate(group):
            ids[j, :len(t)] = torch.tensor(t)
        hidden, taps = target(ids.to(target.embed_tokens.weight.device), hidden_layers=feature_layers)
        taps = torch.cat(taps, dim=-1)
        for j, t in enumerate(group):  # right padding never affects earlier positions (causal)
            feats.append((taps[j, :len(t)].float().cpu(), hidden[j, :len(t)].float().cpu()))
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


def head_loss(head: EagleHead, target, batch, unroll: int):
    """Summed over TTT steps: weighted mean soft cross-entropy to the target over the draft vocab."""
    tokens, taps, final, mask = batch  # (B, T), (B, T, 3d), (B, T, d), (B, T) positions with a next token
    B, T = tokens.shape
    with torch.no_grad():  # the target's distribution of the next token, restricted to the draft vocab
        w = target.lm_head.weight[head.d2t].float()  # (N, d)
        p = (final @ w.T).log_softmax(-1)  # (B, T, N)
    shifted = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
    feature = head.project(shifted)  # pair j: (feature of position j-1, token j)
    total, steps = 0.0, []
    m = mask.float()
    for s, out in enumerate(ttt_layer(head, feature, tokens, target.embed_tokens, unroll)):
        logq = head.draft_logits(out).log_softmax(-1)
        ce = -(p.exp() * logq).sum(-1)  # (B, T)
        # step s predicts from s own features back: its first s positions have no such history
        valid = m.clone()
        valid[:, :s] = 0
        loss_s = (ce * valid).sum() / valid.sum().clamp_min(1)
        total = total + (0.8 ** s) * loss_s
        with torch.no_grad():
            agree = ((logq.argmax(-1) == p.argmax(-1)).float() * valid).sum() / valid.sum().clamp_min(1)
        steps.append((loss_s.item(), agree.item()))
    return total, steps


def make_batches(seqs: Sequences, feats, batch: int, gen: torch.Generator):
    order = torch.randperm(len(seqs.tokens), generator=gen).tolist()
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        T = max(len(seqs.tokens[j]) for j in idx)
        d3, d = feats[idx[0]][0].shape[-1], feats[idx[0]][1].shape[-1]
        tokens = torch.zeros(len(idx), T, dtype=torch.int64)
        taps = torch.zeros(len(idx), T, d3)
        final = torch.zeros(len(idx), T, d)
        mask = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, j in enumerate(idx):
            n = len(seqs.tokens[j])
            tokens[r, :n] = torch.tensor(seqs.tokens[j])
            taps[r, :n], final[r, :n] = feats[j]
            # train where the next token is part of the completion (what drafting will see)
            mask[r, max(seqs.prompt_lens[j] - 1, 0): n - 1] = True
        yield tokens, taps, final, mask


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


def cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
