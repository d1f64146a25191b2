"""Training with respec.

  python train.py --stage drafter --model smollm2-135m --out runs/drafter
      pretrain an EAGLE-style draft head by distillation from the target (respec/drafter_training.py)

GRPO training of the actor with online drafter distillation is the `grpo` stage (not built yet).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from models.eagle import save_eagle
from models.loading import ModelLoadError, load_model, load_tokenizer
from respec import drafter_training as dt
from respec.cli import OneLineParser, positive_int
from respec.engine import RolloutEngine, SamplingParams
from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems


def parse_args(argv=None):
    p = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["drafter"], required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    p.add_argument("--out", type=Path, required=True, help="new directory for the drafter (never overwritten)")
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--prompts", type=positive_int, default=192, help="training prompts (target rollouts)")
    p.add_argument("--held-out", type=positive_int, default=16, help="prompts for the final acceptance measurement")
    p.add_argument("--new-tokens", type=positive_int, default=96, help="rollout length")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--draft-vocab", type=positive_int, default=8192)
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--unroll", type=positive_int, default=3, help="training-time-test steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_drafter(args) -> dict:
    from tqdm import tqdm

    target = load_model(args.model, dtype=args.dtype)
    target.requires_grad_(False)
    tok = load_tokenizer(args.model)
    problems = make_problems(args.task, args.prompts + args.held_out, seed=args.seed)
    prompts = [chat_prompt(tok, p.messages()) for p in problems]
    train_prompts, held_out = prompts[: args.prompts], prompts[args.prompts:]

    # Eager engines: a one-off job whose batch shrinks through every bucket would spend longer
    # compiling them (cold) than generating.
    engine = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=32, eos_token_ids=[tok.eos_token_id], eager=True)
    seqs, t_gen = dt.timed(dt.sample_rollouts, engine, train_prompts, args.new_tokens, args.temperature, args.seed)
    n_tok = sum(len(t) - n for t, n in zip(seqs.tokens, seqs.prompt_lens))
    log(f"rollouts: {len(seqs.tokens)} sequences, {n_tok} generated tokens in {t_gen:.0f} s")
    vocab = dt.draft_vocabulary(seqs, args.draft_vocab, target.cfg.vocab_size)
    head = dt.new_head(target, vocab, args.seed)
    feats, t_feat = dt.timed(dt.target_features, target, seqs, head.cfg.feature_layers)
    log(f"target features: {t_feat:.0f} s; head has {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters")

    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(seqs.tokens) // args.batch)
    total = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    history, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc="drafter KD", file=sys.stderr)
    head.train()
    for epoch in range(args.epochs):
        for batch in dt.make_batches(seqs, feats, args.batch, gen):
            for group in opt.param_groups:
                group["lr"] = dt.cosine_lr(step, total, args.lr)
            loss, per_step = dt.head_loss(head, target, batch, args.unroll)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": loss.item(),
                            "agree_per_unroll": [round(a, 4) for _, a in per_step]})
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{per_step[0][1]:.2f}")
            bar.update()
            if step % args.checkpoint_every == 0:
                save_eagle(head, args.out / "checkpoint")
    bar.close()
    t_train = time.perf_counter() - t0
    head.eval()
    save_eagle(head, args.out)

    # Held-out acceptance: greedy SD with the new head on prompts it never saw.
    acceptance = {}
    for k in range(1, 7):
        sd = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=32, eos_token_ids=[tok.eos_token_id],
                           drafter=head.to(target.embed_tokens.weight.dtype), num_draft_tokens=k, eager=True)
        sd.generate(held_out, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0))
        acceptance[k] = {"accept_len": round(sd.stats.accept_len, 3),
                         "accept_per_pos": [round(a, 3) for a in sd.stats.accept_per_pos]}
        log(f"held-out k={k}: {acceptance[k]['accept_len']:.2f} tokens per verify step, per position "
            f"{acceptance[k]['accept_per_pos']}")
    report = {"model": args.model, "task": args.task, "prompts": args.prompts, "held_out": args.held_out,
              "generated_tokens": n_tok, "rollout_s": round(t_gen, 1), "features_s": round(t_feat, 1),
              "train_s": round(t_train, 1), "steps": step, "final_loss": history[-1]["loss"] if history else None,
              "held_out_greedy": acceptance}
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.out.exists():
            raise ValueError(f"{args.out} exists; refusing to overwrite it (choose a new --out)")
        if not 0 <= args.temperature:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        args.out.mkdir(parents=True)
        report = run_drafter(args)
    except (ModelLoadError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report["held_out_greedy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
