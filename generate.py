"""Generate with respec's rollout engine, or benchmark it against transformers' `generate`.

  python generate.py                                    # a reasoning-gym problem, answered and scored
  python generate.py --model smollm2-135m --chat --prompt "What is 7 + 5?"
  python generate.py --bench --batch-sizes 1,8,32 --new-tokens 128 --json bench.json

The benchmark runs both engines in one process on the same weights, dtype, prompts and number of
new tokens (greedy, EOS ignored) and reports tokens/s, respec's time per decoding step, and the
roofline: the bytes of weights one step must read divided by this machine's streaming read
bandwidth, measured in the same run.
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

from compile.policy import use_persistent_cache
from models.loading import ModelLoadError, load_model, load_tokenizer, resolve_checkpoint, resolve_dtype, save_hf_checkpoint
from models.drafter import truncated_drafter
from models.eagle import check_eagle_fits, load_eagle
from respec.cli import OneLineParser, positive_float, positive_int, positive_int_list
from respec.engine import RolloutEngine, SamplingParams
from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="preset (smollm2-135m, tiny), .gguf file or HF checkpoint dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on GPUs and CPUs with native bf16, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eager", action="store_true", help="no torch.compile (same tokens, slower)")
    p.add_argument("--kv-cache-gb", type=positive_float, default=1.0, help="size of the paged KV cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drafter", help="speculative decoding with this drafter: a directory from train.py --stage "
                                     "drafter, or first:N (the target's first N layers)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per speculative step (with --drafter)")
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
    w = p.add_argument_group("adaptive SD sweep")
    w.add_argument("--sweep", action="store_true", help="measure tokens/s for every k = 0..--k and the adaptive "
                   "policy at each of --batch-sizes, against the fitted cost model, plus a long-tail rollout")
    w.add_argument("--longtail-samples", type=positive_int, default=32, help="rollouts in the long-tail run")
    w.add_argument("--longtail-tokens", type=positive_int, default=256, help="token limit of a long-tail rollout")
    w.add_argument("--sweep-reps", type=positive_int, default=2, help="runs per grid point (the fastest counts)")
    w.add_argument("--plot", type=Path, help="PNG of measured and predicted throughput (default: next to --json)")
    return p.parse_args(argv)


def parse_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is available")
    return device


def make_drafter(spec: str | None, model, k: int):
    """The drafter a --drafter spec names (None without one)."""
    if spec is None:
        return None
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    kind, _, arg = spec.partition(":")
    if kind == "first" and arg.isdigit():
        return truncated_drafter(model, int(arg))
    if Path(spec).is_dir():
        param = next(model.parameters())
        head = load_eagle(spec, dtype=param.dtype, device=param.device)
        check_eagle_fits(model, head)
        return head
    raise ValueError(f"drafter not found: {spec!r} (expected a drafter directory from train.py --stage drafter, "
                     f"or first:N for the target's first N layers)")


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
    drafter = make_drafter(args.drafter, model, args.k)
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
                           eager=args.eager, drafter=drafter, num_draft_tokens=args.k if drafter else 0)
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


def bench_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """`n` chat prompts of reasoning-gym problems (different texts and lengths)."""
    return [chat_prompt(tokenizer, p.messages()) for p in make_problems(DEFAULT_TASK, n, seed=seed)]


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
    print(f"model {args.model}  dtype {str(dtype).removeprefix('torch.')}  weights read per step "
          f"{weight_bytes / 1e6:.0f} MB  read bandwidth {bandwidth:.1f} GB/s  roofline {roofline_ms:.1f} ms/step",
          flush=True)
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_on_eos=False)
    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                           max_batch=max(args.batch_sizes))
    prompts_for = {b: bench_prompts(tokenizer, b, args.seed) for b in args.batch_sizes}
    for b, prompts in prompts_for.items():  # all rows must fit the cache at once, or preemption enters the numbers
        need = sum(engine.blocks.blocks_for(len(p) + args.new_tokens) for p in prompts)
        if need > engine.blocks.num_blocks - 1:
            raise ValueError(f"batch {b} needs {need} KV blocks, the cache has {engine.blocks.num_blocks - 1}: raise --kv-cache-gb")
    drafter = make_drafter(args.drafter, model, args.k)
    sd_engine = None
    if drafter is not None:
        sd_engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                                  max_batch=max(args.batch_sizes), drafter=drafter, num_draft_tokens=args.k)
    compile_s = engine.warmup(args.batch_sizes)
    if sd_engine is not None:  # the draft and verify shapes of every bucket (rows finish at different steps)
        compile_s += sd_engine.warmup(args.batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model_for(args.model, model, tokenizer, dtype, device, Path(tmp))
    results = []
    for b in args.batch_sizes:
        prompts = prompts_for[b]
        engine.stats.decode_s, engine.stats.decode_steps = 0.0, 0
        t0 = time.perf_counter()
        ours = engine.generate(prompts, greedy)
        respec_s = time.perf_counter() - t0
        step_ms = engine.stats.decode_s / max(engine.stats.decode_steps, 1) * 1e3
        with torch.no_grad():
            hf_generate(hf, tokenizer, prompts, 2)  # warm-up
            theirs, hf_s = hf_generate(hf, tokenizer, prompts, args.new_tokens)
        same = sum(o.token_ids == t for o, t in zip(ours, theirs))
        sd = {}
        if sd_engine is not None:
            sd_engine.stats = type(sd_engine.stats)()
            t0 = time.perf_counter()
            spec = sd_engine.generate(prompts, greedy)
            sd_s = time.perf_counter() - t0
            st = sd_engine.stats
            sd = {"sd_tok_s": round(b * args.new_tokens / sd_s, 2), "accept_len": round(st.accept_len, 3),
                  "accept_per_pos": [round(a, 3) for a in st.accept_per_pos],
                  "sd_same_as_plain": f"{sum(x.token_ids == o.token_ids for x, o in zip(spec, ours))}/{b}"}
        results.append({
            "batch": b,
            "respec_tok_s": round(b * args.new_tokens / respec_s, 2),
            "hf_tok_s": round(b * args.new_tokens / hf_s, 2),
            "step_ms": round(step_ms, 2),
            "roofline_ms": round(roofline_ms, 2),
            "same_tokens_as_hf": f"{same}/{b}",
            **sd,
        })
        print(f"  batch {b}: done", flush=True)
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "compile_s": round(compile_s, 1),
              "drafter": args.drafter, "k": args.k if drafter is not None else 0,
              "read_bandwidth_gb_s": round(bandwidth, 1), "weight_bytes": weight_bytes,
              "new_tokens": args.new_tokens, "results": results}
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['model']} {report['dtype']}, {report['new_tokens']} new tokens, compile {report['compile_s']} s")
    head = f"{'batch':>5} {'respec tok/s':>13} {'hf tok/s':>10} {'speed-up':>9} {'step ms':>8} {'roofline ms':>12} {'x roofline':>11} {'same as hf':>11}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(f"{r['batch']:>5} {r['respec_tok_s']:>13.1f} {r['hf_tok_s']:>10.1f} {r['respec_tok_s'] / r['hf_tok_s']:>8.2f}x"
              f" {r['step_ms']:>8.1f} {r['roofline_ms']:>12.1f} {r['step_ms'] / r['roofline_ms']:>10.2f}x {r['same_tokens_as_hf']:>11}")
    sd_rows = [r for r in report["results"] if "sd_tok_s" in r]
    if sd_rows:
        print(f"\nspeculative decoding, drafter {report['drafter']}, k={report['k']}")
        print(f"{'batch':>5} {'sd tok/s':>9} {'vs plain':>9} {'accept len':>11} {'same as plain':>14}  accepted per position")
        for r in sd_rows:
            print(f"{r['batch']:>5} {r['sd_tok_s']:>9.1f} {r['sd_tok_s'] / r['respec_tok_s']:>8.2f}x {r['accept_len']:>11.2f}"
                  f" {r['sd_same_as_plain']:>14}  {r['accept_per_pos']}")


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
        device = parse_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model = load_model(args.model, dtype=dtype, device=device, seed=args.seed)
        tokenizer = load_tokenizer(args.model)
        if args.bench and args.sweep:
            raise ValueError("--bench and --sweep are separate runs: choose one")
        if args.sweep:
            from respec.sweep import run_sweep

            report = run_sweep(args, model, tokenizer, make_drafter(args.drafter, model, args.k), eos_ids(tokenizer, model))
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
