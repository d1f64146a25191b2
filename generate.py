"""Generate with respec's rollout engine, or benchmark it against transformers' `generate`.

  python generate.py                                    # a reasoning-gym problem, answered and scored
  python generate.py --model smollm2-135m --chat --prompt "What is 7 + 5?"
  python generate.py --bench --batch-sizes 1,8,32 --new-tokens 128 --json bench.json
  python generate.py --bench --temperature 1 --drafter auto --batch-sizes 1,4,16,64   # SD as RL samples

The benchmark runs both engines in one process on the same weights, dtype, prompts and number of
new tokens (greedy, EOS ignored) and reports tokens/s, the time of one decoding step on each side,
and the roofline: the bytes of weights one step must read divided by this machine's streaming read
bandwidth, measured in the same run. transformers runs twice: eager, and with its static KV cache
and compiled decoding step (the fair baseline; uncompiled under --eager; see respec/lab/bench.py).
With --temperature > 0 it samples as RL rollouts do (each row its own seed, stopping at EOS),
compares respec's plain decoding with speculative decoding, and skips transformers (its sampled
tokens could not be compared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from compile.policy import COMPILE_MODES, require_tensorrt, use_persistent_cache
from models.loading import ModelLoadError, eos_token_ids, load_model, load_tokenizer, resolve_dtype
from respec.cli import DefaultsFormatter, OneLineParser, positive_float, positive_int, positive_int_list
from respec.drafter_choice import choose_drafter, ensure_head
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import warmup
from respec.speculative import DRAFT_TEMPERATURE, VERIFY_RULES
from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems, make_task


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, tiny, random-*), .gguf file, HF checkpoint dir or Hub id (owner/name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on GPUs and CPUs with native bf16, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--eager", action="store_true",
                   help="no torch.compile (same tokens, slower); with --bench, transformers' static-cache baseline "
                        "runs uncompiled too")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="how the steps are compiled (compile/policy.py; not given: whole on CUDA, regional on CPU); "
                        "regional-dynamic: one graph for all batch sizes; tensorrt: the whole step by "
                        "Torch-TensorRT (CUDA, requirements-trt.txt)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-mb", type=positive_int, default=None,
                      help="size of the paged KV cache in MiB (not given: 1024; the same option as train.py's)")
    size.add_argument("--kv-cache-gb", type=positive_float, default=None, help="the same in GiB")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise and of --task's problem")
    p.add_argument("--drafter", help="speculative decoding with this drafter, as train.py's --drafter: a directory "
                                     "from train.py --stage drafter, auto (the default head train.py uses for --task, "
                                     "pretrained once if missing), random, history (model-free: suffix matches in the "
                                     "text), first:N (the target's first N layers), or a model spec + '+history' (per "
                                     "row: history where its suffix match is long, the model elsewhere)")
    p.add_argument("--k", type=int, default=3, help="tokens drafted per speculative step (with --drafter; the largest "
                                                    "k of --sweep); train.py's --k has the same default")
    p.add_argument("--draft-temperature", type=positive_float, default=DRAFT_TEMPERATURE,
                   help="a head drafts at the sampling temperature times this (train.py's default)")
    p.add_argument("--verify", default="match", choices=VERIFY_RULES,
                   help="how drafts are verified: match (SD emits plain decoding's tokens) or rejection (speculative "
                        "sampling: the same distribution, other tokens)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="text to complete; default: a problem of --task")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    g.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym task used when no --prompt is given")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="completion length limit (tokens)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="sample only tokens at least this fraction as likely as the most likely one (0: off)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true", help="benchmark respec against transformers' generate")
    b.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32], help="comma-separated batch sizes")
    b.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per sequence")
    b.add_argument("--json", type=Path, help="write the benchmark results here (an existing file is never overwritten)")
    b.add_argument("--past-rollouts", type=int, default=0,
                   help="SD only: rollouts of the same prompts (other seeds) generated before the timed one, as RL "
                        "sees its prompts again each epoch; what the history drafter can draw on")
    w = p.add_argument_group("adaptive SD sweep")
    w.add_argument("--sweep", action="store_true", help="measure tokens/s for every k = 0..--k and the adaptive "
                   "policy at each of --batch-sizes, against the fitted cost model, plus a long-tail rollout")
    w.add_argument("--longtail-samples", type=positive_int, default=32, help="rollouts in the long-tail run")
    w.add_argument("--longtail-group", type=positive_int, default=8, help="siblings per prompt in the long-tail run (G)")
    w.add_argument("--longtail-temperature", type=float, default=1.0,
                   help="sampling temperature of the long-tail run, natural EOS (0: greedy, the same tokens checked)")
    w.add_argument("--longtail-tokens", type=positive_int, default=256, help="token limit of a long-tail rollout")
    w.add_argument("--sweep-reps", type=positive_int, default=2, help="runs per grid point (the fastest counts)")
    w.add_argument("--plot", type=Path, help="PNG of measured and predicted throughput (default: next to --json)")
    args = p.parse_args(argv)
    args.kv_cache_gb = args.kv_cache_mb / 1024 if args.kv_cache_mb else args.kv_cache_gb or 1.0
    return args


def parse_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is available")
    if device.type == "cuda":  # fp32 matrix products on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    return device


def make_drafter(spec: str | None, model, k: int, args, tokenizer):
    """The drafter a --drafter spec names (None without one), chosen as train.py chooses it
    (respec/drafter_choice.py): `auto` is the default head train.py's default run uses for --task."""
    if spec is None:
        return None
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    from respec.config import TrainConfig

    task = make_task(task=args.task)
    common = dict(model=args.model, task_name=args.task, task=task, tokenizer=tokenizer,
                  max_new_tokens=TrainConfig.max_new_tokens, seed=args.seed)
    ensure_head(spec, **common, dtype=args.dtype, device=next(model.parameters()).device, k=k,
                temperature=TrainConfig.temperature, log=lambda m: print(m, file=sys.stderr))
    chosen = choose_drafter(spec, target=model, k=k, rollout_dtype=next(model.parameters()).dtype,
                            draft_temperature=args.draft_temperature, **common)
    return chosen.drafter


# ---------------------------------------------------------------------------------------------
def sampling_params(args) -> SamplingParams:
    """The generation flags as the engine's SamplingParams (checked by `main` before anything loads)."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed)


def run_generate(args, model, tokenizer) -> None:
    drafter = make_drafter(args.drafter, model, args.k, args, tokenizer)
    problem = None
    if args.prompt is None:
        problem = make_problems(args.task, 1, seed=args.seed)[0]
        prompt = chat_prompt(tokenizer, problem.messages())
        print(f"[{args.task}] {problem.question}", flush=True)
    elif args.chat:
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt)
    params = sampling_params(args)
    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eos_token_ids=eos_token_ids(tokenizer, model),
                           eager=args.eager, compile_mode=args.compile_mode, drafter=drafter,
                           num_draft_tokens=args.k if drafter else 0, verify=args.verify)
    engine.check_request(prompt, params)
    warmup(engine, [1], use_filter=args.temperature > 0 and (args.top_p < 1 or args.top_k > 0 or args.min_p > 0))
    t0 = time.perf_counter()
    (completion,) = engine.generate([prompt], params)
    elapsed = time.perf_counter() - t0
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    print(text)
    n = len(completion.token_ids)
    print(f"-- {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s), finish: {completion.finish_reason}", file=sys.stderr)
    if drafter is not None:
        print(f"-- speculative: k={args.k}, {engine.stats.accept_len:.2f} tokens per verify step", file=sys.stderr)
    if problem is not None:
        print(f"-- reference answer: {problem.answer}   score: {problem.score(text):.2f}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_persistent_cache()
    try:
        if args.json is not None:
            if args.json.exists():
                raise ValueError(f"{args.json} exists; refusing to overwrite it")
            if not args.json.parent.is_dir():
                raise ValueError(f"directory {args.json.parent} does not exist")
        sampling_params(args).validate()  # --temperature, --top-p, --top-k
        if args.longtail_temperature < 0:
            raise ValueError(f"--longtail-temperature must be >= 0, got {args.longtail_temperature}")
        if args.past_rollouts < 0:
            raise ValueError(f"--past-rollouts must be >= 0, got {args.past_rollouts}")
        device = parse_device(args.device)
        if args.compile_mode == "tensorrt":
            require_tensorrt(device)
        dtype = resolve_dtype(args.dtype, device)
        model = load_model(args.model, dtype=dtype, device=device, seed=args.seed)
        tokenizer = load_tokenizer(args.model)
        if args.bench and args.sweep:
            raise ValueError("--bench and --sweep are separate runs: choose one")
        if args.sweep:
            from respec.lab.sweep import run_sweep

            report = run_sweep(args, model, tokenizer, make_drafter(args.drafter, model, args.k, args, tokenizer),
                               eos_token_ids(tokenizer, model))
            if args.json is not None:
                write_json(args.json, report)
        elif args.bench:
            from respec.lab.bench import run_bench

            report = run_bench(args, model, tokenizer, dtype, make_drafter(args.drafter, model, args.k, args, tokenizer),
                               eos_token_ids(tokenizer, model))
            if args.json is not None:
                write_json(args.json, report)
        else:
            run_generate(args, model, tokenizer)
    except (ModelLoadError, ValueError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
