"""SD's speed at a controlled acceptance: the oracle drafter against plain decoding, per shape,
batch size and acceptance, and the solver's choice against the best fixed k.

    python -m respec.lab.oracle_sweep --json sweep.json     # the 135M, Qwen2.5-0.5B, 1.5B and 7B shapes (a GPU's run)
    python -m respec.lab.oracle_sweep --quick               # the tiny model, eager: a smoke run on any machine

Random weights make a real drafter's acceptance meaningless, so the drafts come from the oracle
(respec/drafters/oracle.py): the target's own continuation from a plain pass, each token kept with
probability a. For every shape and batch size: one plain rollout (`--new-tokens` per row, sampled,
EOS ignored so the batch stays full) gives the rows' continuations and the plain throughput; then,
for each a, SD with every fixed k of `--ks` and with the solver (respec/solver.py AdaptiveK, told
the true acceptance a per position, deciding from the cost model fitted on this machine over the
grid a training run profiles: batch 1, 4, 16, 64 up to the sweep's largest, k 0, 1, K/2 and K). Each SD rollout should give the plain
one's tokens (the match rule; `same_tokens`: in bf16 a wider forward may round a near tie the other
way, and the oracle then stops drafting for that row). Throughput is the
decoding steps' (what k changes), the best of `--reps` rollouts.

Per (shape, batch, a): `sd_x_plain` (the best fixed k against plain), `best_k` (0: plain is the
best), and `solver_x_best` (the solver against the best of plain and every fixed k; the goal is
>= 0.95 everywhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from respec import storage

SHAPES = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
GOAL = 0.95


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def best_of(reps: int, engine, prompts, params, **kw):
    """(decode tok/s, the completions, that run's stats) of the fastest of `reps` rollouts."""
    best = None
    for _ in range(reps):
        out = engine.generate(prompts, params, **kw)
        if best is None or engine.stats.decode_tok_s > best[0]:
            best = (engine.stats.decode_tok_s, [c.token_ids for c in out], engine.stats)
    return best


def sweep_shape(spec: str, args, device: torch.device) -> list[dict]:
    from models.loading import load_model
    from respec.drafters.oracle import OracleDrafter
    from respec.engine import RolloutEngine, SamplingParams
    from respec.profiling import StepTimer, warmup
    from respec.solver import AdaptiveK, FixedK, cost_key, load_or_profile

    model = load_model(spec, device=device, dtype=args.dtype, seed=args.seed)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    K = max(args.ks)
    biggest = max(args.batch_sizes)
    kw = dict(kv_cache_bytes=int(args.kv_cache_gb * 2**30), max_batch=biggest, eager=args.eager,
              compile_mode=args.compile_mode)
    plain = RolloutEngine(model, **kw)
    oracle = OracleDrafter(1.0, seed=args.seed)
    sd = RolloutEngine(model, drafter=oracle, num_draft_tokens=K, **kw)
    context = args.prompt_len + args.new_tokens
    t0 = time.perf_counter()
    warmup(plain, args.batch_sizes, max_context=context, progress=False)
    warmup(sd, args.batch_sizes, ks=[0, *args.ks], max_context=context, progress=False)
    # the solver as a run has it: the trainer's profile grid (batch 1, 4, 16, 64, k 0, 1, K/2, K), up to
    # the sweep's largest batch, at this length
    grid = sorted({b for b in (1, 4, 16, 64) if b <= biggest} | {biggest})
    costs, cached = load_or_profile(StepTimer(sd), cost_key(spec, oracle.describe(), sd), batch_sizes=grid,
                                    contexts=(args.prompt_len, context), progress=False)
    print(f"{spec}: compiled, warmed and {'loaded' if cached else 'profiled'} the cost model in "
          f"{time.perf_counter() - t0:.0f} s (median fit error {costs.rel_error:.1%})", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    prompts_all = torch.randint(3, model.cfg.vocab_size, (biggest, args.prompt_len), generator=g).tolist()
    rows = []
    for b in args.batch_sizes:
        prompts = prompts_all[:b]
        params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed + i, stop_on_eos=False)
                  for i in range(b)]
        plain_tok_s, truth, _ = best_of(args.reps, plain, prompts, params)
        for a in args.accepts:
            oracle.accept = a
            fixed, same, accept_len = {0: plain_tok_s}, True, {}
            for k in args.ks:
                tok_s, got, stats = best_of(args.reps, sd, prompts, params, replays=truth, policy=FixedK(k))
                fixed[k], same, accept_len[k] = tok_s, same and got == truth, round(stats.accept_len, 3)
            policy = AdaptiveK(costs, K, [a] * K)
            solver_tok_s, got, stats = best_of(args.reps, sd, prompts, params, replays=truth, policy=policy)
            same = same and got == truth
            best_k = max(fixed, key=fixed.get)
            row = {"shape": spec, "dtype": dtype, "batch": b, "accept": a, "plain_tok_s": round(plain_tok_s, 1),
                   "fixed_tok_s": {str(k): round(v, 1) for k, v in fixed.items()}, "accept_len": accept_len,
                   "best_k": best_k, "sd_x_plain": round(max(fixed[k] for k in args.ks) / plain_tok_s, 3),
                   "solver_tok_s": round(solver_tok_s, 1), "solver_k": dict(Counter(stats.chosen_k)),
                   "solver_x_best": round(solver_tok_s / fixed[best_k], 3), "same_tokens": same}
            rows.append(row)
            print(f"  batch {b:>4} a={a:.2f}: plain {plain_tok_s:9.1f} tok/s, best k={best_k} "
                  f"({row['sd_x_plain']:.2f}x plain at its best SD k), solver {solver_tok_s:9.1f} "
                  f"({row['solver_x_best']:.2f}x the best; k {dict(sorted(row['solver_k'].items()))})"
                  f"{'' if same else ', TOKENS DIFFER'}", flush=True)
    del plain, sd, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m respec.lab.oracle_sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)} (random weights)")
    p.add_argument("--accepts", type=_floats, default=[0.5, 0.7, 0.9], help="the oracle's acceptance per draft, a")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--ks", type=_ints, default=[1, 2, 3, 4], help="the fixed draft lengths; the solver chooses up to the largest")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="default: 8 on a GPU, 0.5 on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU or a CPU with native bf16, else fp32; fp32 "
                   "keeps SD's tokens plain decoding's on a CPU (bf16 may round a near tie otherwise)")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the tiny model, eager, fp32, batch 1 and 4, a 0.5 and 0.9, k 1 and 3, "
                   "24 tokens")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU is available")
        if args.json is not None and args.json.exists():
            raise ValueError(f"{args.json} exists; refusing to overwrite it")
        if args.quick:
            args.shapes, args.eager, args.batch_sizes, args.accepts, args.ks = "tiny", True, [1, 4], [0.5, 0.9], [1, 3]
            args.dtype = "fp32"
            args.new_tokens, args.reps = min(args.new_tokens, 24), 2
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in shapes if s not in SHAPES and s != "tiny"]
        if unknown:
            raise ValueError(f"unknown shape {unknown[0]!r} (choose from {', '.join(SHAPES)})")
        if not args.accepts or any(not 0 <= a <= 1 for a in args.accepts):
            raise ValueError(f"--accepts must be in [0, 1], got {args.accepts}")
        if not args.ks or args.ks[0] < 1 or not args.batch_sizes or args.batch_sizes[0] < 1:
            raise ValueError("--ks and --batch-sizes must be positive")
        if args.kv_cache_gb is None:
            args.kv_cache_gb = 8.0 if device.type == "cuda" else 0.5
    except ValueError as e:
        print(f"oracle_sweep: {e}", file=sys.stderr)
        return 2
    rows = []
    for shape in shapes:
        rows += sweep_shape(shape if shape == "tiny" else f"random-{shape}", args, device)
    worst = min(r["solver_x_best"] for r in rows)
    print(f"solver against the best fixed k: worst {worst:.2f}x (goal >= {GOAL}: {'met' if worst >= GOAL else 'NOT met'}); "
          f"tokens equal to plain decoding's in {sum(r['same_tokens'] for r in rows)}/{len(rows)}")
    if args.json is not None:
        report = {"device": str(device), "torch": torch.__version__, "new_tokens": args.new_tokens,
                  "prompt_len": args.prompt_len, "reps": args.reps, "eager": args.eager, "results": rows}
        storage.write_text(args.json, json.dumps(report, indent=1) + "\n")
    # in fp32 SD must give plain decoding's tokens; in bf16 a flip is reported, not a failure
    return 0 if all(r["same_tokens"] for r in rows if r["dtype"] == "float32") else 1


if __name__ == "__main__":
    sys.exit(main())
