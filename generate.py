"""Generate with respec's rollout engine, or benchmark it against transformers' `generate`.

  python generate.py                                    # a reasoning-gym problem, answered and scored
  python generate.py --model smollm2-135m --chat --prompt "What is 7 + 5?"
  python generate.py --bench --batch-sizes 1,8,32 --new-tokens 128 --json bench.json
  python generate.py --bench --temperature 1 --drafter auto --batch-sizes 1,4,16,64   # SD as RL samples

The benchmark runs both engines in one process on the same weights, dtype, prompts and number of
new tokens (greedy, EOS ignored) and reports tokens/s, respec's time per decoding step, and the
roofline: the bytes of weights one step must read divided by this machine's streaming read
bandwidth, measured in the same run. With --temperature > 0 it samples as RL rollouts do (each row
its own seed, stopping at EOS), compares respec's plain decoding with speculative decoding, and
skips transformers (its sampled tokens could not be compared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from compile.policy import COMPILE_MODES, require_tensorrt, use_persistent_cache
from models.loading import ModelLoadError, load_model, load_tokenizer, resolve_checkpoint, resolve_dtype, save_hf_checkpoint
from respec.cli import OneLineParser, positive_float, positive_int, positive_int_list
from respec.engine import RolloutEngine, SamplingParams
from respec.speculative import VERIFY_RULES
from respec.drafter_choice import choose_drafter
from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems, make_task


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, tiny, random-*), .gguf file, HF checkpoint dir or Hub id (owner/name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on GPUs and CPUs with native bf16, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eager", action="store_true", help="no torch.compile (same tokens, slower)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="how the steps are compiled (compile/policy.py; default: whole on CUDA, regional on CPU); "
                        "regional-dynamic: one graph for all batch sizes; tensorrt: the whole step by "
                        "Torch-TensorRT (CUDA, requirements-trt.txt)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-mb", type=positive_int, default=None,
                      help="size of the paged KV cache in MiB (default 1024; the same option as train.py's)")
    size.add_argument("--kv-cache-gb", type=positive_float, default=None, help="the same in GiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drafter", help="speculative decoding with this drafter, as train.py's --drafter: a directory "
                                     "from train.py --stage drafter, auto (the default head train.py uses for --task, "
                                     "pretrained once if missing), random, history (model-free: suffix matches in the "
                                     "text), first:N (the target's first N layers), or a model spec + '+history' (per "
                                     "row: history where its suffix match is long, the model elsewhere)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per speculative step (with --drafter)")
    p.add_argument("--verify", default="match", choices=VERIFY_RULES,
                   help="how drafts are verified: match (SD emits plain decoding's tokens) or rejection (speculative "
                        "sampling: the same distribution, other tokens)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="text to complete; default: a problem of --task")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    g.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym task used when no --prompt is given")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true", help="benchmark respec against transformers' generate")
    b.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32])
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
    from respec.trainer import TrainConfig

    chosen = choose_drafter(spec, target=model, k=k, model=args.model, task_name=args.task,
                            task=make_task(task=args.task), tokenizer=tokenizer,
                            rollout_dtype=next(model.parameters()).dtype, max_new_tokens=TrainConfig.max_new_tokens,
                            seed=args.seed, dtype=args.dtype, temperature=TrainConfig.temperature,
                            log=lambda m: print(m, file=sys.stderr))
    return chosen.drafter


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg_eos = model.cfg.eos_token_id
    ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
def sampling_params(args) -> SamplingParams:
    """The generation flags as the engine's SamplingParams (checked by `main` before anything loads)."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


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
    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eos_token_ids=eos_ids(tokenizer, model),
                           eager=args.eager, compile_mode=args.compile_mode, drafter=drafter,
                           num_draft_tokens=args.k if drafter else 0, verify=args.verify)
    engine.check_request(prompt, params)
    engine.warmup([1], use_filter=args.temperature > 0 and (args.top_p < 1 or args.top_k > 0))
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
def read_bandwidth_gbs(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Streaming read bandwidth: best of `repeats` sums over a buffer of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def flip_rate(got: list[list[int]], want: list[list[int]]) -> float:
    """Per-token rate at which two decodings that should agree token for token part: rows that part,
    over the tokens compared up to and including each row's first difference (after it, the texts
    differ and nothing more is comparable). In floating point a wider forward can round a logit
    differently and tip a near-tie (respec/speculative.py)."""
    parted, compared = 0, 0
    for a, b in zip(got, want):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if common is None and len(a) == len(b):
            compared += len(a)
        else:
            parted += 1
            compared += (min(len(a), len(b)) if common is None else common) + 1
    return parted / max(compared, 1)


def bench_prompts(tokenizer, n: int, seed: int, task: str = DEFAULT_TASK) -> list[list[int]]:
    """`n` chat prompts of `task`'s problems (different texts and lengths)."""
    return [chat_prompt(tokenizer, p.messages()) for p in make_problems(task, n, seed=seed)]


def hf_model_for(spec: str, model, tokenizer, dtype, device, tmp: Path):
    """transformers' model on the very weights respec runs."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ckpt = resolve_checkpoint(spec)
    if ckpt is None:  # a random preset: write it out as a Hugging Face checkpoint first
        ckpt = tmp / "hf"
        save_hf_checkpoint(model, ckpt, tokenizer)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def hf_generate(hf, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy `generate` that runs past EOS (exactly `new_tokens` per row); (tokens, seconds)."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(hf.device)
    t0 = time.perf_counter()
    out = hf.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=tokenizer.pad_token_id)
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return out[:, batch["input_ids"].shape[1]:].tolist(), elapsed


def run_bench(args, model, tokenizer, dtype) -> dict:
    device = torch.device(args.device)
    bandwidth = read_bandwidth_gbs(device)
    weight_bytes = model.num_weight_bytes()
    roofline_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    sampled = args.temperature > 0
    print(f"model {args.model}  dtype {str(dtype).removeprefix('torch.')}  weights read per step "
          f"{weight_bytes / 1e6:.0f} MB  read bandwidth {bandwidth:.1f} GB/s  roofline {roofline_ms:.1f} ms/step"
          + (f"  sampling T={args.temperature}, stopping at EOS" if sampled else ""), flush=True)

    def params(b: int, rollout: int = 0) -> list[SamplingParams]:
        """Greedy past EOS (comparable with transformers token for token), or sampled as RL samples:
        each row its own seed (another set per past rollout), stopping at EOS."""
        if not sampled:
            return [SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_on_eos=False)] * b
        return [SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, seed=args.seed * 1_000_003 + rollout * 10_007 + i) for i in range(b)]

    eos = eos_ids(tokenizer, model)
    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                           compile_mode=args.compile_mode, max_batch=max(args.batch_sizes), eos_token_ids=eos)
    prompts_for = {b: bench_prompts(tokenizer, b, args.seed, args.task) for b in args.batch_sizes}
    for b, prompts in prompts_for.items():  # all rows must fit the cache at once, or preemption enters the numbers
        need = sum(engine.blocks.blocks_for(len(p) + args.new_tokens + args.k + 1) for p in prompts)
        if need > engine.blocks.num_blocks - 1:
            raise ValueError(f"batch {b} needs {need} KV blocks, the cache has {engine.blocks.num_blocks - 1}: raise --kv-cache-gb")
    drafter = make_drafter(args.drafter, model, args.k, args, tokenizer)
    sd_engine = None
    if drafter is not None:
        sd_engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                                  compile_mode=args.compile_mode, max_batch=max(args.batch_sizes), drafter=drafter,
                                  num_draft_tokens=args.k, verify=args.verify,
                                  eos_token_ids=eos)
        sd_engine.time_phases = True  # where an SD step's time goes (a device sync per phase on GPUs)
    use_filter = sampled and (args.top_p < 1 or args.top_k > 0)
    # every shape the timed runs meet: each batch bucket (rows finish at different steps), the draft
    # and verify steps, and (with per-shape CUDA graphs) every block-table width up to the longest row
    longest = max(len(p) for prompts in prompts_for.values() for p in prompts) + args.new_tokens
    compile_s = engine.warmup(args.batch_sizes, use_filter=use_filter, max_context=longest)
    if sd_engine is not None:
        compile_s += sd_engine.warmup(args.batch_sizes, use_filter=use_filter, max_context=longest)
    hf = None
    if not sampled:
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_model_for(args.model, model, tokenizer, dtype, device, Path(tmp))
    results = []
    for b in args.batch_sizes:
        prompts = prompts_for[b]
        engine.stats = type(engine.stats)()
        with engine.steps.timed() as unwarmed:
            t0 = time.perf_counter()
            ours = engine.generate(prompts, params(b))
            respec_s = time.perf_counter() - t0
        plain_tokens = sum(len(o.token_ids) for o in ours)
        step_ms = engine.stats.decode_s / max(engine.stats.decode_steps, 1) * 1e3
        row = {"batch": b, "respec_tok_s": round(plain_tokens / respec_s, 2),
               "tokens_per_row": round(plain_tokens / b, 1), "step_ms": round(step_ms, 2),
               "roofline_ms": round(roofline_ms, 4), "unwarmed_shapes": list(unwarmed)}
        if hf is not None:
            with torch.no_grad():
                hf_generate(hf, tokenizer, prompts, 2)  # warm-up
                theirs, hf_s = hf_generate(hf, tokenizer, prompts, args.new_tokens)
            row |= {"hf_tok_s": round(b * args.new_tokens / hf_s, 2),
                    "same_tokens_as_hf": f"{sum(o.token_ids == t for o, t in zip(ours, theirs))}/{b}"}
        if sd_engine is not None:
            for r in range(args.past_rollouts):  # earlier rollouts of these prompts (the history drafter keeps them)
                sd_engine.generate(prompts, params(b, rollout=r + 1))
            sd_engine.stats = type(sd_engine.stats)()
            with sd_engine.steps.timed() as unwarmed:
                t0 = time.perf_counter()
                spec = sd_engine.generate(prompts, params(b))
                sd_s = time.perf_counter() - t0
            row["unwarmed_shapes"] += unwarmed
            st = sd_engine.stats
            sd_tokens = sum(len(x.token_ids) for x in spec)
            per_step = lambda t: round(t / max(st.sd_steps, 1) * 1e3, 2)  # noqa: E731  ms per SD step
            row |= {"sd_draft_ms": per_step(st.sd_phase_s["draft"]), "sd_verify_ms": per_step(st.sd_phase_s["verify"]),
                    "sd_host_ms": per_step(st.sd_phase_s["host"])}
            row |= {"sd_tok_s": round(sd_tokens / sd_s, 2), "sd_tokens_per_row": round(sd_tokens / b, 1),
                    "accept_len": round(st.accept_len, 3), "sd_step_fraction": round(st.sd_steps / max(len(st.chosen_k), 1), 3),
                    "accept_per_pos": [round(a, 3) for a in st.accept_per_pos]}
            if not sampled or args.verify == "match":  # SD's tokens should then be plain decoding's
                row["sd_same_as_plain"] = f"{sum(x.token_ids == o.token_ids for x, o in zip(spec, ours))}/{b}"
                row["sd_flips_per_1k_tokens"] = round(1000 * flip_rate([x.token_ids for x in spec],
                                                                       [o.token_ids for o in ours]), 2)
        results.append(row)
        print(f"  batch {b}: done", flush=True)
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "compile_s": round(compile_s, 1),
              "drafter": args.drafter, "k": args.k if drafter is not None else 0, "temperature": args.temperature,
              "past_rollouts": args.past_rollouts, "read_bandwidth_gb_s": round(bandwidth, 1),
              "weight_bytes": weight_bytes, "new_tokens": args.new_tokens, "results": results}
    print_table(report)
    return report


def print_table(report: dict) -> None:
    sampled = report.get("temperature", 0) > 0
    unwarmed = sum(len(r.get("unwarmed_shapes", [])) for r in report["results"])
    if unwarmed:  # a CUDA graph recorded (or a TensorRT engine built) inside a timed run
        print(f"\nwarning: {unwarmed} timed step call(s) met a shape the warm-up had not called twice: the times "
              f"below include graph recording (see unwarmed_shapes in the JSON)")
    print(f"\n{report['model']} {report['dtype']}, {report['new_tokens']} new tokens"
          + (f" at most, T={report['temperature']}, EOS stops" if sampled else "") + f", compile {report['compile_s']} s")
    if not sampled:
        head = (f"{'batch':>5} {'respec tok/s':>13} {'hf tok/s':>10} {'speed-up':>9} {'step ms':>8} {'roofline ms':>12} "
                f"{'x roofline':>11} {'same as hf':>11}")
        print(head)
        print("-" * len(head))
        for r in report["results"]:
            print(f"{r['batch']:>5} {r['respec_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['respec_tok_s'] / r['hf_tok_s']:>8.2f}x"
                  f" {r['step_ms']:>8.1f} {r['roofline_ms']:>12.2f} {r['step_ms'] / max(r['roofline_ms'], 1e-9):>10.2f}x"
                  f" {r['same_tokens_as_hf']:>11}")
    sd_rows = [r for r in report["results"] if "sd_tok_s" in r]
    if sd_rows:
        past = f", {report['past_rollouts']} past rollouts of the prompts" if report.get("past_rollouts") else ""
        print(f"\nspeculative decoding, drafter {report['drafter']}, k={report['k']}{past}")
        print(f"{'batch':>5} {'plain tok/s':>12} {'sd tok/s':>9} {'vs plain':>9} {'accept len':>11} {'SD steps':>9} "
              f"{'tokens/row':>11} {'same as plain':>14} {'plain step ms':>14} {'SD step ms: draft + verify + host':>34}"
              f"  accepted per position")
        for r in sd_rows:
            phases = f"{r['sd_draft_ms']:.1f} + {r['sd_verify_ms']:.1f} + {r['sd_host_ms']:.1f}"
            print(f"{r['batch']:>5} {r['respec_tok_s']:>12.1f} {r['sd_tok_s']:>9.1f} {r['sd_tok_s'] / r['respec_tok_s']:>8.2f}x"
                  f" {r['accept_len']:>11.2f} {r['sd_step_fraction']:>9.0%} {r['sd_tokens_per_row']:>11}"
                  f" {r.get('sd_same_as_plain', '-'):>14} {r['step_ms']:>14.1f} {phases:>34}  {r['accept_per_pos']}")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
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
                               eos_ids(tokenizer, model))
            if args.json is not None:
                write_json(args.json, report)
        elif args.bench:
            report = run_bench(args, model, tokenizer, dtype)
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
