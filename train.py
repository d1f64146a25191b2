"""Training with respec: GRPO with speculative rollouts (default), or drafter pretraining.

  python train.py                                  # the default run: SmolLM2-135M on basic_arithmetic, ReSpec mode
  torchrun --nproc_per_node=2 train.py             # the same, data-parallel with FSDP2 (gloo on CPU)
  python train.py --task products --task-config '{"min_terms": 2, "max_terms": 2}' --steps 50
  python train.py --data gsm8k.jsonl --sd off      # GSM8K-format JSONL ("question", "answer" ending in "#### N")
  python train.py --resume runs/grpo-20261123-101500 --steps 40    # continue a run (more steps)
  python train.py --stage drafter --out runs/drafter                # pretrain an EAGLE-style head

Multi-node: torchrun's usual rendezvous, e.g. `torchrun --nnodes=2 --nproc_per_node=8
--rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...` on every node.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from compile.policy import COMPILE_MODES, use_persistent_cache
from models.loading import ModelLoadError, load_model, load_tokenizer
from respec import checkpoint, distributed, guards
from respec.cli import OneLineParser, positive_int
from respec.tasks import make_task
from respec.trainer import TrainConfig, Trainer, default_prompts


def parse_args(argv=None):
    p = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    d = TrainConfig()
    p.add_argument("--stage", choices=["grpo", "drafter"], default="grpo")
    # --- model and data ---
    p.add_argument("--model", default=d.model, help="preset (smollm2-135m, tiny), .gguf file or HF checkpoint dir")
    p.add_argument("--task", default=d.task, help="reasoning-gym dataset name")
    p.add_argument("--task-config", default="{}", help="reasoning-gym options as JSON, e.g. '{\"min_terms\": 2}'")
    p.add_argument("--data", default=None, help="GSM8K-format JSONL file (question, answer '... #### N') instead of --task")
    p.add_argument("--format-weight", type=float, default=d.format_weight, help="reward for a strict 'Answer:' line")
    # --- GRPO ---
    p.add_argument("--steps", type=positive_int, default=None, help=f"RL steps (default {d.steps})")
    p.add_argument("--prompts", type=positive_int, default=None,
                   help=f"prompts per step, over all ranks (P; default {d.prompts}, rounded up to a multiple of the ranks) "
                        "[drafter: training prompts, default 192]")
    p.add_argument("--group", type=int, default=d.group, help="samples per prompt (G >= 2)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens, help="completion length limit (tokens)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default {d.lr}) [drafter: 1e-3]")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="optimizer steps of LR warm-up")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor, as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    p.add_argument("--clip-low", type=float, default=d.clip_low, help="ratio clipped below at 1 - this")
    p.add_argument("--clip-high", type=float, default=d.clip_high, help="ratio clipped above at 1 + this")
    p.add_argument("--kl-coef", type=float, default=d.kl_coef, help="k3 KL to the initial model (0: no reference)")
    p.add_argument("--no-std-scaling", action="store_true", help="advantages centred only (Dr. GRPO)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over each rollout (default {d.epochs}) [drafter: over its data, default 4]")
    p.add_argument("--minibatches", type=positive_int, default=d.minibatches, help="optimizer steps per pass")
    p.add_argument("--micro-tokens", type=positive_int, default=d.micro_tokens,
                   help="padded tokens per forward/backward (default: 512 on CPU, 8192 on a GPU)")
    # --- speculative decoding ---
    p.add_argument("--sd", choices=["off", "on", "adaptive"], default=d.sd, help="adaptive: the solver picks k per step")
    p.add_argument("--drafter", default=d.drafter,
                   help="EAGLE head dir, 'auto' (cached default, pretrained once), 'random' (untrained: cold start), "
                        "'history' (model-free: suffix matches in the prompt's rollouts; nothing to distil), 'none', "
                        "or a head + '+history' (e.g. auto+history: history where its match is long, the head elsewhere)")
    p.add_argument("--k", type=positive_int, default=d.k, help="largest draft length")
    # --- the drafter's online distillation ---
    p.add_argument("--drafter-update", choices=["frozen", "kd", "rkd", "akd"], default=d.drafter_update,
                   help="frozen | kd (uniform) | rkd (reward-weighted) | akd (positive advantages only)")
    p.add_argument("--drafter-async", choices=["on", "off"], default="on" if d.drafter_async else "off",
                   help="drafter update in a background thread, overlapped with the next rollout")
    p.add_argument("--drafter-lr", type=float, default=d.drafter_lr, help="the head's AdamW learning rate")
    p.add_argument("--drafter-warmup", type=int, default=d.drafter_warmup,
                   help="drafter optimizer steps of linear LR warm-up (0: none)")
    p.add_argument("--drafter-batch", type=positive_int, default=d.drafter_batch,
                   help="sequences per drafter optimizer step, over all ranks")
    p.add_argument("--drafter-epochs", type=positive_int, default=d.drafter_epochs,
                   help="passes over the replay buffer per drafter update")
    p.add_argument("--drafter-idle-interval", type=positive_int, default=d.drafter_idle_interval,
                   help="RL steps between distillations while the rollouts do not speculate (1: every step)")
    p.add_argument("--drafter-update-interval", type=positive_int, default=d.drafter_update_interval,
                   help="RL steps between drafter updates (the replay buffer holds that many steps)")
    # --- system ---
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32", "fp16"], help="rollout dtype")
    p.add_argument("--train-dtype", default=d.train_dtype, choices=["auto", "bf16", "fp32", "fp16"],
                   help="autocast dtype of the training forward (weights stay fp32)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=d.compile,
                   help="torch.compile the rollout engine (auto: on CUDA only; a cold CPU compile takes minutes)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=d.compile_mode,
                   help="how a compiled engine compiles its steps (compile/policy.py; default: whole on CUDA, "
                        "regional on CPU; regional-dynamic: one graph for all batch sizes)")
    p.add_argument("--eager", action="store_true", help="the same as --compile off")
    p.add_argument("--kv-cache-mb", type=positive_int, default=d.kv_cache_mb,
                   help="KV block pool per rank in MiB (default: 1024 on CPU; on a GPU 40%% of its free memory)")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="most sequences decoding at once per rank")
    # --- run ---
    p.add_argument("--out", type=Path, default=None, help="new run directory (default runs/grpo-<time>; never overwritten)")
    p.add_argument("--resume", type=Path, default=None, help="continue this run directory from its last checkpoint")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints)
    p.add_argument("--export-hf", type=Path, default=None, help="also write the final actor here (HF checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    # --- drafter pretraining (--stage drafter) ---
    p.add_argument("--held-out", type=positive_int, default=16, help="[drafter] prompts for the acceptance measurement")
    p.add_argument("--draft-vocab", type=positive_int, default=8192, help="[drafter] draft vocabulary size")
    p.add_argument("--batch", type=positive_int, default=8, help="[drafter] sequences per optimizer step")
    p.add_argument("--unroll", type=positive_int, default=3, help="[drafter] training-time-test steps")
    p.add_argument("--new-tokens", type=positive_int, default=96, help="[drafter] rollout length")
    p.add_argument("--step-decay", type=float, default=1.0, help="[drafter] loss weight of TTT step s is this^s")
    p.add_argument("--tv-weight", type=float, default=0.0,
                   help="[drafter] weight of the TV(p, q) term (1 - acceptance) beside the KL")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
def run_drafter(args, d: distributed.Dist) -> int:
    """--stage drafter: pretrain an EAGLE-style head by distillation from the target, on this
    process's device (one process: the pretraining is not distributed)."""
    from respec.drafter_training import pretrain

    if d.world > 1:
        raise ValueError(f"--stage drafter runs in one process, not {d.world} ranks: start it without torchrun")
    if args.out is None:
        raise ValueError("--stage drafter needs --out DIR")
    if args.out.exists():
        raise ValueError(f"{args.out} exists; refusing to overwrite it (choose a new --out)")
    target = load_model(args.model, dtype=args.dtype, device=d.device)
    tok = load_tokenizer(args.model)
    task = make_task(task=args.task, config=json.loads(args.task_config), data=args.data, seed=args.seed)
    prompts = args.prompts or 192
    args.out.mkdir(parents=True)
    report = pretrain(target, tok, args.out, problems=task.problems(0, prompts + args.held_out), held_out=args.held_out,
                      new_tokens=args.new_tokens, temperature=args.temperature, draft_vocab=args.draft_vocab,
                      epochs=args.epochs or 4, batch=args.batch, unroll=args.unroll,
                      lr=args.lr if args.lr is not None else 1e-3, decay=args.step_decay, tv_weight=args.tv_weight,
                      max_batch=args.max_batch, seed=args.seed, log=log)
    print(json.dumps({"sampled": report["held_out_sampled"], "greedy": report["held_out_greedy"]}))
    return 0


# ----------------------------------------------------------------------------------------------
def config_from_args(args, world: int = 1) -> TrainConfig:
    try:
        task_config = json.loads(args.task_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"--task-config is not valid JSON: {e.msg}") from None
    if not isinstance(task_config, dict):
        raise ValueError("--task-config must be a JSON object")
    return TrainConfig(
        model=args.model, task=args.task, task_config=task_config, data=args.data, format_weight=args.format_weight,
        steps=args.steps or TrainConfig.steps, prompts=args.prompts or default_prompts(world), group=args.group,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        lr=args.lr if args.lr is not None else TrainConfig.lr,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, clip_low=args.clip_low, clip_high=args.clip_high, kl_coef=args.kl_coef,
        scale_adv_by_std=not args.no_std_scaling, epochs=args.epochs or TrainConfig.epochs, minibatches=args.minibatches,
        micro_tokens=args.micro_tokens, sd=args.sd, drafter=args.drafter, k=args.k,
        drafter_update=args.drafter_update, drafter_async=args.drafter_async == "on", drafter_lr=args.drafter_lr,
        drafter_warmup=args.drafter_warmup,
        drafter_batch=args.drafter_batch, drafter_epochs=args.drafter_epochs,
        drafter_update_interval=args.drafter_update_interval, drafter_idle_interval=args.drafter_idle_interval,
        dtype=args.dtype,
        train_dtype=args.train_dtype, compile="off" if args.eager else args.compile,
        compile_mode=args.compile_mode, kv_cache_mb=args.kv_cache_mb, max_batch=args.max_batch,
        seed=args.seed, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        export_hf=str(args.export_hf) if args.export_hf else None, progress=not args.no_progress,
    )


def resumed_config(args) -> TrainConfig:
    """The config a run was started with (config.json), with --steps / --export-hf / --no-progress
    taken from this command line."""
    run = args.resume
    path = run / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run}: not a training run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
        cfg = TrainConfig(**saved)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--resume {run}: config.json is unreadable ({type(e).__name__})") from None
    if args.steps:
        cfg.steps = args.steps
    if args.export_hf:
        cfg.export_hf = str(args.export_hf)
    cfg.progress = not args.no_progress
    return cfg


def summary(history: list[dict], run_dir: Path, wall_s: float, prep: dict) -> str:
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    rollout = sum(r["rollout_s"] for r in history)
    step = sum(r["step_s"] for r in history)
    lines = [
        f"run {run_dir}: {len(history)} steps in {wall_s:.0f} s wall "
        f"(compile {prep.get('compile_s', 0):.0f} s, SD cost profile {prep.get('profile_s', 0):.0f} s)",
        f"reward  first {len(first)} steps {mean(first, 'reward_mean'):.3f}  ->  last {len(last)} steps "
        f"{mean(last, 'reward_mean'):.3f}   (accuracy {mean(first, 'accuracy'):.3f} -> {mean(last, 'accuracy'):.3f})",
        f"rollout {rollout / step:.0%} of step time; {sum(r['rollout_tok_s'] * r['rollout_s'] for r in history) / rollout:.0f} "
        f"tokens/s; SD on in {mean(history, 'sd_fraction'):.0%} of decoding steps; accept_len "
        f"{mean([r for r in history if r['accept_len']] or history[:1], 'accept_len'):.2f}",
        f"train phase MFU {mean(history, 'train_mfu'):.1%} (of the measured GEMM peak in the training dtype)",
    ]
    est = [r["accept_est"] for r in history if "accept_est" in r]
    if est:
        lines.append(f"drafter distillation {mean(history, 'drafter_s'):.1f} s per step on the critical path; estimated "
                     f"accept_len (1 - TV) {est[0]:.2f} -> {est[-1]:.2f}")
    lines += [
        f"metrics {run_dir / 'metrics.jsonl'}, plots {run_dir / 'plots'}, final actor {run_dir / 'hf'}"
        + (f", final drafter {run_dir / 'drafter'}" if (run_dir / "drafter").is_dir() else ""),
    ]
    return "\n".join(lines)


def run_grpo(args, d: distributed.Dist) -> int:
    from respec.lab.plot import plot_run

    if args.resume is not None:
        cfg = resumed_config(args)
        run_dir = args.resume
        start = checkpoint.latest_checkpoint(run_dir)
    else:
        cfg = config_from_args(args, d.world)
        run_dir = args.out or Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")
        if run_dir.exists():
            raise ValueError(f"{run_dir} exists; refusing to overwrite it (choose a new --out, or --resume it)")
        start = None
    cfg.out = str(run_dir)
    cfg.validate(d.world)
    if cfg.export_hf and Path(cfg.export_hf).exists():
        raise ValueError(f"--export-hf {cfg.export_hf} exists; refusing to overwrite it")

    task = make_task(task=cfg.task, config=cfg.task_config, data=cfg.data, seed=cfg.seed)  # bad data fails here

    wall = time.perf_counter()
    trainer = Trainer(cfg, d=d, run_dir=run_dir, task=task, log=log if d.main else (lambda m: None))
    if d.main and args.resume is None:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    distributed.barrier(d)
    if start is None and args.resume is not None:
        trainer.forget_metrics_after(0)
        if d.main:
            log(f"{run_dir} has no complete checkpoint yet: starting it from step 0")
    prep = trainer.start(start)
    if start is not None and d.main:
        log(f"resumed {run_dir} from {start.name} (step {trainer.step})")
    history = trainer.run()
    # The run's own copy of the final actor, replaced only once the new one is complete.
    fresh = run_dir / ".hf.tmp"
    if d.main:
        shutil.rmtree(fresh, ignore_errors=True)
    checkpoint.export_hf(trainer.actor, fresh, d, tokenizer=trainer.tok)
    if d.main:
        shutil.rmtree(run_dir / "hf", ignore_errors=True)
        fresh.rename(run_dir / "hf")
    if cfg.export_hf:
        checkpoint.export_hf(trainer.actor, Path(cfg.export_hf), d, tokenizer=trainer.tok)
    trainer.export_drafter(run_dir / "drafter")
    if d.main:
        plot_run(run_dir)
        if history:
            print(summary(history, run_dir, time.perf_counter() - wall, prep), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    use_persistent_cache()
    d = distributed.init()
    try:
        return run_drafter(args, d) if args.stage == "drafter" else run_grpo(args, d)
    except (ModelLoadError, ValueError) as e:  # bad input: nothing was started
        if d.main:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (guards.RunFailed, checkpoint.CheckpointError) as e:  # the run stopped; its last checkpoint is kept
        if d.main:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except guards.RunInterrupted as e:
        if d.main:
            print(f"train.py: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C
        if d.main:
            print("train.py: interrupted (a second Ctrl-C: no checkpoint written for the step in progress)",
                  file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
