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

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compile.policy import require_tensorrt, use_persistent_cache
from respec.flex_paged import require_cuda_compiled
from models.loading import ModelLoadError, eos_token_ids, load_model, load_tokenizer, resolve_dtype
from respec import storage
from respec.cli import (DefaultsFormatter, Needs, OneLineParser, add_options, given_options, non_negative_int, option,
                        positive_float, positive_int, positive_int_list, refuse_inert, shared)
from respec.config import TrainConfig
from respec.drafter_training import DrafterConfig
from respec.drafter_choice import choose_drafter, ensure_head
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import warmup
from respec.tasks import chat_prompt, make_problems, make_task


# what makes an option inert (respec/cli.py `refuse_inert`)
NEEDS_DRAFTER = Needs("drafter", lambda drafter: drafter != "none", "without a --drafter nothing is drafted")
NEEDS_RUN = Needs(("bench", "sweep"), lambda bench, sweep: bench or sweep, "neither --bench nor --sweep is given")
NEEDS_SWEEP = Needs("sweep", lambda sweep: sweep, "no --sweep is given")
NEEDS_NO_RUN = Needs(("bench", "sweep"), lambda bench, sweep: not (bench or sweep), "--bench and --sweep make their "
                     "own prompts of --task and generate --new-tokens for each")
NOT_SWEEP = Needs("sweep", lambda sweep: not sweep, "--sweep decodes greedily (its long tail samples at "
                  "--longtail-temperature)")
SAMPLED = Needs("temperature", lambda t: t > 0, "--temperature 0 decodes greedily")


@dataclass
class GenerateConfig:
    """generate.py's options, declared as train.py's are (respec/cli.py); an option both scripts take
    is TrainConfig's field (`shared`): one help text, this script's default."""
    model: str = shared(TrainConfig, "model")
    device: str | None = option(None, "cpu, cuda or cuda:N", shown="cuda if there is a GPU, else cpu")
    dtype: str = shared(TrainConfig, "dtype")
    eager: bool = option(False, "no torch.compile (same tokens, slower); with --bench, transformers' static-cache "
                         "baseline runs uncompiled too", flag="--eager")
    compile_mode: str | None = shared(TrainConfig, "compile_mode",
                                      needs=Needs("eager", lambda eager: not eager, "--eager compiles nothing"))
    kv_cache_mb: int = shared(TrainConfig, "kv_cache_mb", 1024, parse=positive_int)
    run_ahead: int = shared(TrainConfig, "run_ahead", parse=non_negative_int)
    attention: str = shared(TrainConfig, "attention")
    kv_cache_gb: float | None = option(None, "the KV block pool in GiB instead (not with --kv-cache-mb)",
                                       parse=positive_float, shown="--kv-cache-mb's")
    seed: int = shared(TrainConfig, "seed")
    # --- what is generated ---
    prompt: str | None = option(None, "text to complete", shown="a problem of --task, in the chat template",
                                needs=NEEDS_NO_RUN)
    chat: bool = option(False, "wrap --prompt in the model's chat template", flag="--chat",
                        needs=Needs("prompt", lambda prompt: prompt is not None, "without --prompt the problem of "
                                    "--task is put in the chat template anyway"))
    task: str = shared(TrainConfig, "task")
    max_new_tokens: int = shared(TrainConfig, "max_new_tokens", 256, parse=positive_int, needs=NEEDS_NO_RUN)
    temperature: float = shared(TrainConfig, "temperature", 0.0, needs=NOT_SWEEP)
    top_p: float = shared(TrainConfig, "top_p", needs=(NOT_SWEEP, SAMPLED))
    top_k: int = shared(TrainConfig, "top_k", needs=(NOT_SWEEP, SAMPLED))
    min_p: float = shared(TrainConfig, "min_p", needs=(NOT_SWEEP, SAMPLED))
    # --- speculative decoding ---
    drafter: str = shared(TrainConfig, "drafter", "none")
    k: int = shared(TrainConfig, "k", needs=NEEDS_DRAFTER)
    draft_temperature: float = shared(TrainConfig, "draft_temperature", parse=positive_float, needs=NEEDS_DRAFTER)
    verify: str = shared(TrainConfig, "verify", needs=(NEEDS_DRAFTER, Needs("sweep", lambda sweep: not sweep,
                                                                            "--sweep verifies by the match rule")))
    # --- the benchmark (respec/lab/bench.py) ---
    bench: bool = option(False, "benchmark respec against transformers' generate", flag="--bench")
    # (--bench's SD rollout: adaptive profiles the cost model on the SD engine, or reads it from the cache)
    sd: str = shared(TrainConfig, "sd", "on", needs=(NEEDS_DRAFTER, Needs("bench", lambda bench: bench,
                                                                        "only --bench has an SD rollout to choose")))
    batch_sizes: list[int] = option([1, 8, 32], "comma-separated batch sizes of --bench and --sweep",
                                    parse=positive_int_list, needs=NEEDS_RUN)
    new_tokens: int = shared(DrafterConfig, "new_tokens", 128, parse=positive_int, needs=NEEDS_RUN)
    json: Path | None = option(None, "write the --bench or --sweep results here (an existing file is never "
                               "overwritten)", parse=Path, needs=NEEDS_RUN)
    reps: int = option(1, "timed rollouts of each arm per batch size, plain and SD alternated (plain, SD, SD, plain, "
                       "...), each SD one from the same drafter and solver state; the mean times count",
                       parse=positive_int, needs=Needs("bench", lambda bench: bench, "only --bench times rollouts "
                                                       "against each other"))
    past_rollouts: int = option(0, "rollouts of the same prompts (other seeds) generated before the timed SD one, "
                                "as RL sees its prompts again each epoch; what the history drafter can draw on",
                                needs=(NEEDS_DRAFTER, Needs("bench", lambda bench: bench, "only --bench times a "
                                                            "rollout after earlier ones")))
    # --- the adaptive SD sweep (respec/lab/sweep.py) ---
    sweep: bool = option(False, "measure tokens/s for every k = 0..--k and the adaptive policy at each of "
                         "--batch-sizes, against the fitted cost model, plus a long-tail rollout", flag="--sweep")
    longtail_samples: int = option(32, "rollouts in the long-tail run", parse=positive_int, needs=NEEDS_SWEEP)
    longtail_group: int = option(8, "siblings per prompt in the long-tail run (G)", parse=positive_int,
                                 needs=NEEDS_SWEEP)
    longtail_temperature: float = option(1.0, "sampling temperature of the long-tail run, natural EOS (0: greedy, "
                                         "the same tokens checked)", needs=NEEDS_SWEEP)
    longtail_tokens: int = option(256, "token limit of a long-tail rollout", parse=positive_int, needs=NEEDS_SWEEP)
    sweep_reps: int = option(2, "runs per grid point (the fastest counts)", parse=positive_int, needs=NEEDS_SWEEP)
    plot: Path | None = option(None, "PNG of measured and predicted throughput", parse=Path, shown="next to --json",
                               needs=NEEDS_SWEEP)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    add_options(p, {"generate": GenerateConfig})
    return p


def parse_args(argv=None) -> GenerateConfig:
    """The options, each given one checked against the others (one that does nothing is refused):
    bad input exits with one line."""
    p = build_parser()
    _, given = given_options(p, sys.argv[1:] if argv is None else list(argv), {"generate": GenerateConfig})
    if "kv_cache_mb" in given and "kv_cache_gb" in given:
        p.error("argument --kv-cache-gb: not allowed with argument --kv-cache-mb")
    args = GenerateConfig(**given)
    try:
        refuse_inert(args, given)
    except ValueError as e:
        p.error(str(e))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.kv_cache_gb = args.kv_cache_gb or args.kv_cache_mb / 1024
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


def make_drafter(spec: str, model, k: int, args, tokenizer):
    """The drafter a --drafter spec names (None for none), chosen as train.py chooses it
    (respec/drafter_choice.py): `auto` is the default head train.py's default run uses for --task."""
    chosen = choose(spec, model, k, args, tokenizer)
    return None if chosen is None else chosen.drafter


def choose(spec: str, model, k: int, args, tokenizer):
    """`make_drafter`'s choice whole (respec/drafter_choice.py `Chosen`: the drafter, and the solver's
    prior acceptance where the drafter has one); None for none."""
    if spec == "none":
        return None
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    task = make_task(task=args.task)
    common = dict(model=args.model, task_name=args.task, task=task, tokenizer=tokenizer,
                  max_new_tokens=TrainConfig.max_new_tokens, seed=args.seed)
    ensure_head(spec, **common, dtype=args.dtype, device=next(model.parameters()).device, k=k,
                temperature=TrainConfig.temperature, log=lambda m: print(m, file=sys.stderr))
    return choose_drafter(spec, target=model, k=k, rollout_dtype=next(model.parameters()).dtype,
                          draft_temperature=args.draft_temperature, **common)


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
                           num_draft_tokens=args.k if drafter else 0, verify=args.verify, run_ahead=args.run_ahead,
                           attention=args.attention)
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
    storage.write_text(path, json.dumps(data, indent=2) + "\n")  # (a full disk: one line, the old file kept)


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
        if args.attention == "flex":
            require_cuda_compiled(device, not args.eager)
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

            chosen = choose(args.drafter, model, args.k, args, tokenizer) if args.sd != "off" else None
            report = run_bench(args, model, tokenizer, dtype, chosen and chosen.drafter, eos_token_ids(tokenizer, model),
                               prior=chosen and chosen.prior)
            if args.json is not None:
                write_json(args.json, report)
        else:
            run_generate(args, model, tokenizer)
    except (ModelLoadError, ValueError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    except storage.WriteError as e:  # (the drafter cache, --json, the plot: a full disk)
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
