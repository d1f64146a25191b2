"""Pretraining an EAGLE-style head by distillation from the target (the loss and the target's
features are respec/distill.py's, shared with the online learner).

  1. the target answers task prompts (reasoning-gym problems in the chat template: what RL will roll
     out), sampled by the rollout engine;
  2. the draft vocabulary is the most frequent tokens of those sequences;
  3. one target forward per sequence gives the features (outputs of the feature layers) and the
     target's next-token distribution at every position;
  4. the head is trained with forward KL(p_target || q_head) over the draft vocabulary (optionally
     plus TV(p, q), the acceptance it costs: `head_loss`), at the rollout temperature, with a
     training-time-test (TTT) unroll: unroll step s feeds the head its own output features of step
     s-1 (shifted by one position), as drafting does after the first token, and attends exactly as
     the s-th draft does at inference: to keys made from true target features up to the drafting
     point and to the keys of its own earlier draft steps after it (`unroll_mask`). The unroll runs
     the head's own layer (`ttt_layer`), only the key set and mask are its own. Steps weigh alike by
     default: at k = 3 a later draft is accepted only after the earlier ones, and it is the weakest;
  5. held-out acceptance: speculative decoding with the new head at the rollout temperature, to
     natural EOS, on prompts it never saw.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from models.eagle import EagleConfig, EagleHead, cast_head, save_eagle
from respec.cli import option
from respec.data import DataConfig
from respec.distill import Sequences, head_loss, make_batches, target_features
from respec.drafters.eagle import EagleDrafter
from respec.engine import RolloutEngine, SamplingParams
from respec.grpo import warmup_cosine
from respec.speculative import DRAFT_TEMPERATURE
from respec.tasks import chat_prompt

@dataclass
class DrafterConfig(DataConfig):
    """`train.py --stage drafter`: pretraining an EAGLE-style head (`pretrain`)."""
    out: str = option("", "new directory for the head (required)", aliases=("output_dir",))
    prompts: int = option(192, "training prompts (the target's rollouts of them are the data)")
    held_out: int = option(16, "prompts held out for the acceptance measurement")
    new_tokens: int = option(96, "rollout length (tokens)")
    temperature: float = option(1.0, "rollout sampling temperature (the one RL samples at)")
    draft_vocab: int = option(8192, "draft vocabulary size (the most frequent tokens of the rollouts)")
    epochs: int = option(4, "passes over the rollouts")
    batch: int = option(8, "sequences per optimizer step")
    unroll: int = option(3, "training-time-test steps")
    lr: float = option(1e-3, "peak AdamW learning rate (warm-up, then cosine)", aliases=("learning_rate",))
    step_decay: float = option(1.0, "loss weight of training-time-test step s is this^s")
    tv_weight: float = option(0.0, "weight of the TV(p, q) term (1 - acceptance) beside the KL")
    max_batch: int = option(64, "most sequences decoding at once")
    dtype: str = option("auto", "the target's dtype (auto: bf16 where native)", choices=("auto", "bf16", "fp32"))
    seed: int = option(0, "seed of the rollouts and the head's initialisation")
    progress: bool = option(True, "no progress bar", flag="--no-progress")


def sample_rollouts(engine, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int) -> Sequences:
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + i) for i in range(len(prompts))]
    out = engine.generate(prompts, params)
    return Sequences([p + o.token_ids for p, o in zip(prompts, out)], [len(p) for p in prompts])


def draft_vocabulary(seqs: Sequences, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent token ids of the sequences (completions and prompts), most frequent
    first; ties and unseen tokens filled by id order."""
    counts = Counter(tok for t in seqs.tokens for tok in t)
    order = sorted(range(vocab_size), key=lambda i: -counts[i])  # a stable sort: ties stay in id order
    return torch.tensor(order[:size], dtype=torch.int64)


def new_head(target, draft_vocab: torch.Tensor, seed: int) -> EagleHead:
    """A fresh fp32 head on the target's device (initialised on the CPU: the same weights anywhere)."""
    cfg = EagleConfig.for_target(target.cfg, len(draft_vocab))
    torch.manual_seed(seed)
    head = EagleHead(cfg)
    with torch.no_grad():
        head.d2t.copy_(draft_vocab)
        for name, p in head.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        head = head.to(target.lm_head.weight.device)
        # start the output head from the target's (frozen) head rows: a strong initialisation
        head.lm_head.weight.copy_(target.lm_head.weight[head.d2t].float())
    return head


def untrained_head(target, prompts: list[list[int]], *, seed: int, draft_vocab: int = 8192) -> EagleHead:
    """A head with nothing learned yet, for a cold start that only online distillation improves: random
    layers, the draft vocabulary the most frequent tokens of `prompts` (then the lowest ids, which
    BPE gives its most frequent merges), output rows copied from the target's head (as `new_head`)."""
    vocab = draft_vocabulary(Sequences(prompts, [len(p) for p in prompts]), draft_vocab, target.cfg.vocab_size)
    return new_head(target, vocab, seed)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def train_head(head: EagleHead, target, seqs: Sequences, feats, *, epochs: int, batch: int, unroll: int, lr: float,
               temperature: float = 1.0, decay: float = 1.0, tv_weight: float = 0.0, seed: int = 0,
               compute_dtype: torch.dtype = torch.float32, checkpoint: Path | None = None,
               checkpoint_every: int = 50, progress: bool = True) -> list[dict]:
    """AdamW with a warm-up and cosine decay over `epochs` passes of `head_loss`; `feats` must carry
    the log-partition (`target_features(..., temperature=...)`). The forward runs under autocast to
    `compute_dtype` (weights, optimizer and the loss's softmaxes stay fp32). Returns the history, one
    entry per optimizer step, with the acceptance estimate (1 - TV) per unroll step on that batch."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, fused=True)
    total = -(-len(seqs.tokens) // batch) * epochs
    gen = torch.Generator().manual_seed(seed)
    history, step = [], 0
    bar = tqdm(total=total, desc="drafter KD", file=sys.stderr, disable=not progress)
    head.train()
    for epoch in range(epochs):
        for tokens, taps, final, mask, lse in make_batches(seqs, feats, batch, gen):
            for group in opt.param_groups:
                group["lr"] = lr * warmup_cosine(step, total=total, warmup=min(20, total // 10), min_ratio=0.0)
            device = head.fc.weight.device
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                loss, per_step = head_loss(head, target, (tokens, taps, final, mask), unroll, temperature=temperature,
                                           lse=lse, decay=decay, tv_weight=tv_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            accept = [st["accepted"] / max(st["count"], 1) for st in per_step]
            history.append({"step": step, "epoch": epoch, "loss": loss.item(),
                            "agree_per_unroll": [round(st["agree"], 4) for st in per_step],
                            "accept_est_per_unroll": [round(a, 4) for a in accept]})
            bar.set_postfix(loss=f"{loss.item():.3f}", accept=f"{sum(accept):.2f}")
            bar.update()
            if checkpoint is not None and step % checkpoint_every == 0:
                save_eagle(head, checkpoint)
    bar.close()
    head.eval()
    return history


@torch.no_grad()
def held_out_acceptance(target, head: EagleHead, prompts: list[list[int]], *, k: int, new_tokens: int,
                        temperature: float, eos: list[int], seed: int = 0, max_batch: int = 64) -> dict:
    """Speculative decoding with `head` at draft length k on `prompts` (to their natural EOS or
    `new_tokens`): tokens per verify step and the fraction of rows accepting each draft position."""
    drafter = EagleDrafter(cast_head(head, target.embed_tokens.weight.dtype), DRAFT_TEMPERATURE)  # as a run drafts
    sd = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=max_batch, eos_token_ids=eos,
                       drafter=drafter, num_draft_tokens=k, eager=True)
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + i) for i in range(len(prompts))]
    sd.generate(prompts, params)
    return {"accept_len": round(sd.stats.accept_len, 3), "accept_per_pos": [round(a, 3) for a in sd.stats.accept_per_pos]}


def pretraining_pilot(target, tokenizer, *, problems: list, held_out: int, new_tokens: int,
                      temperature: float = 1.0, draft_vocab: int = 8192, epochs: int = 4, batch: int = 8,
                      unroll: int = 3, lr: float = 1e-3, decay: float = 1.0, max_batch: int = 64, seed: int = 0,
                      decode_steps: int = 8) -> dict:
    """What `pretrain` with these arguments will take on this machine, from its own units timed here
    (seconds, per part, and the pilot's own time): its rollout engine's prefill of one batch of
    prompts and `decode_steps` steps at that batch, the target's features of `batch` sequences, and
    one of the head's optimizer steps on them (after one untimed), each times how often `pretrain`
    does it. Sequences count at their full length: decoding runs to a batch's longest row, and the
    features and the training pad each batch to its longest sequence, which at the rollout
    temperature nearly always runs to the length (where rows end early this counts high). The decode
    steps are timed at the prompts' context (low: a step's attention grows with it), and the held-out
    measurement (`held_out` rows verifying a few drafts each) as `new_tokens` steps of that batch."""
    t_pilot = time.perf_counter()
    target.requires_grad_(False)
    n_train = len(problems) - held_out
    prompts = [chat_prompt(tokenizer, p.messages()) for p in problems[:min(n_train, max_batch)]]
    # rollouts: a prefill of one batch and `decode_steps` steps (no EOS: every row decodes them)
    engine = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=len(prompts), eager=True)
    engine.generate(prompts, [SamplingParams(max_new_tokens=1 + decode_steps, temperature=temperature, seed=seed + i,
                                             stop_on_eos=False) for i in range(len(prompts))])
    prefill_s, step_s = engine.stats.prefill_s, engine.stats.decode_s / max(engine.stats.decode_steps, 1)
    del engine
    # features and training: `batch` sequences of the prompt and a whole rollout (the prompt's tokens again)
    seqs = Sequences([p + (p * (new_tokens // max(len(p), 1) + 1))[:new_tokens] for p in prompts[:batch]],
                     [len(p) for p in prompts[:batch]])
    head = new_head(target, draft_vocabulary(seqs, draft_vocab, target.cfg.vocab_size), seed)
    feats, t_feat = timed(target_features, target, seqs, head.cfg.feature_layers, temperature=temperature)
    step = partial(train_head, head, target, seqs, feats, epochs=1, batch=len(seqs.tokens), unroll=unroll, lr=lr,
                   temperature=temperature, decay=decay, seed=seed, compute_dtype=target.embed_tokens.weight.dtype,
                   progress=False)
    step()  # (the first optimizer step also allocates what the later ones reuse)
    _, t_train = timed(step)
    batches = -(-n_train // max_batch)
    parts = {"rollout_s": batches * (prefill_s + new_tokens * step_s),
             "features_s": n_train * t_feat / len(seqs.tokens),
             "train_s": -(-n_train // batch) * epochs * t_train,
             "held_out_s": new_tokens * step_s if held_out else 0.0}
    return {**{k: round(v, 1) for k, v in parts.items()}, "total_s": round(sum(parts.values()), 1),
            "prefill_s": round(prefill_s, 3), "decode_step_s": round(step_s, 4),
            "pilot_s": round(time.perf_counter() - t_pilot, 1)}


def pretrain(target, tokenizer, out_dir, *, problems: list, held_out: int, new_tokens: int,
             temperature: float = 1.0, draft_vocab: int = 8192, epochs: int = 4, batch: int = 8, unroll: int = 3,
             lr: float = 1e-3, decay: float = 1.0, tv_weight: float = 0.0, max_batch: int = 64,
             checkpoint_every: int = 50, seed: int = 0, held_out_ks=range(1, 7), greedy: bool = True,
             log=print, progress: bool = True) -> dict:
    """The whole pretraining job on `problems` (the last `held_out` of them held out): target
    rollouts, draft vocabulary, features, TTT training, held-out acceptance. Writes the head,
    train_report.json and history.jsonl into `out_dir`.

    The held-out acceptance is measured as RL will meet it: speculative decoding at the rollout
    `temperature` to each completion's natural EOS (and, with `greedy`, also at temperature 0)."""
    out_dir = Path(out_dir)
    target.requires_grad_(False)
    prompts = len(problems) - held_out
    all_prompts = [chat_prompt(tokenizer, p.messages()) for p in problems]
    train_prompts, held_prompts = all_prompts[:prompts], all_prompts[prompts:]
    eos = [tokenizer.eos_token_id]

    # An eager engine at a large batch: a one-off job whose batch shrinks through every bucket would
    # spend longer compiling (cold) than generating, and decoding is cheaper per token the more rows
    # share one read of the weights.
    engine = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=max_batch, eos_token_ids=eos, eager=True)
    seqs, t_gen = timed(sample_rollouts, engine, train_prompts, new_tokens, temperature, seed)
    del engine
    n_tok = sum(len(t) - n for t, n in zip(seqs.tokens, seqs.prompt_lens))
    log(f"rollouts: {len(seqs.tokens)} sequences, {n_tok} generated tokens in {t_gen:.0f} s")
    vocab = draft_vocabulary(seqs, draft_vocab, target.cfg.vocab_size)
    head = new_head(target, vocab, seed)
    feats, t_feat = timed(target_features, target, seqs, head.cfg.feature_layers, temperature=temperature)
    log(f"target features: {t_feat:.0f} s; head has {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters")

    history, t_train = timed(train_head, head, target, seqs, feats, epochs=epochs, batch=batch, unroll=unroll, lr=lr,
                             temperature=temperature, decay=decay, tv_weight=tv_weight, seed=seed,
                             compute_dtype=target.embed_tokens.weight.dtype,  # the target's: bf16 where native
                             checkpoint=out_dir / "checkpoint", checkpoint_every=checkpoint_every, progress=progress)
    save_eagle(head, out_dir)

    # Held-out acceptance on prompts the head never saw.
    sampled, greedy_acc = {}, {}
    t0 = time.perf_counter()
    for k in held_out_ks:
        sampled[k] = held_out_acceptance(target, head, held_prompts, k=k, new_tokens=new_tokens,
                                         temperature=temperature, eos=eos, seed=seed + 10**6, max_batch=max_batch)
        log(f"held-out k={k}, T={temperature:g}: {sampled[k]['accept_len']:.2f} tokens per verify step, per position "
            f"{sampled[k]['accept_per_pos']}")
        if greedy:
            greedy_acc[k] = held_out_acceptance(target, head, held_prompts, k=k, new_tokens=new_tokens,
                                                temperature=0.0, eos=eos, max_batch=max_batch)
            log(f"held-out k={k}, greedy: {greedy_acc[k]['accept_len']:.2f} tokens per verify step, per position "
                f"{greedy_acc[k]['accept_per_pos']}")
    t_held = time.perf_counter() - t0
    report = {"prompts": prompts, "held_out": held_out, "generated_tokens": n_tok,
              "rollout_s": round(t_gen, 1), "features_s": round(t_feat, 1), "train_s": round(t_train, 1),
              "held_out_s": round(t_held, 1), "steps": len(history),
              "final_loss": history[-1]["loss"] if history else None,
              "temperature": temperature, "held_out_sampled": sampled, "held_out_greedy": greedy_acc}
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return report
