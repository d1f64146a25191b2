"""Where one decode step's and one verify step's time goes, on this machine.

    python -m respec.lab.profile_step                                  # SmolLM2, bf16, B = 1, 8, 16, k = 3
    python -m respec.lab.profile_step --model tiny --batch-sizes 1,2 --reps 2   # a smoke run

The engine's own steps on synthetic sequences (`respec/profiling.py` synthetic_steps: a repeating text,
so the history drafter proposes all k tokens and the verify is k + 1 wide), each timed per part by
wrapping the regions the step functions already take as arguments (`run_block`, `sample_fn`,
`verify_fn`): the decoder blocks, the output head, the sampler (or the acceptance test), and the
rest of the step (embedding, the paged-KV metadata, the engine's Python around the step: block
tables, per-row tensors, the host sync and bookkeeping; for SD, the history drafter's proposals).
On the eager path torch.profiler then splits the blocks' time into the weight-bound matrix
products, attention (the K/V gather, the cache write, SDPA) and the rest (norms, RoPE, SwiGLU's
elementwise work, dispatch). With `--compile` the regions are the compiled ones (regional, the CPU
default), so the block and tail times are what the bench's engine pays; a compiled region is
opaque to the op split.

The roofline column is the weights one step must read at the read bandwidth measured in the same
run (as `generate.py --bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

from respec.profiling import synthetic_steps

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "respec::packed_linear",
              "mkldnn::_linear_pointwise"}
ATTENTION_OPS = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::index", "aten::index_select", "aten::gather", "aten::index_put_", "aten::_index_put_impl_"}
PARTS = ("blocks", "head", "sampling", "rest")


class PartTimer:
    """Seconds per part, accumulated while `on` (CPU: every op is synchronous)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - t0
            return out
        return timed


def timed_regions(engine, timer: PartTimer) -> None:
    """Make the engine's steps run with their regions timed (blocks, head, sampler/acceptance)."""
    from models.decoder import call_block
    from respec.sampling import sample, sampling_logprobs
    from respec.speculative import accept_drafts, match_drafts, next_inputs

    def sample_watch(model, hidden, seeds, temperature, top_k, top_p, min_p, next_pos, eos_ids, watching, *,
                     use_filter):  # steps.sample_watch, split
        logits = timer.wrap("head", model.logits)(hidden)

        def sampler():
            tokens, logprobs = sample(sampling_logprobs(logits, temperature, top_k, top_p, use_filter=use_filter,
                                                        min_p=min_p), temperature, seeds, next_pos)
            return tokens, logprobs, ((tokens.unsqueeze(1) == eos_ids).any(1) & watching).any(), next_pos
        return timer.wrap("sampling", sampler)()

    def verify_tail(target, hidden, drafts, lengths, q, point, seeds, temperature, top_k, top_p, min_p, positions,
                    left, eos_ids, watching, *, use_filter, rule, late):  # speculative.verify_tail, split
        B, k1 = drafts.shape[0], drafts.shape[1] + 1
        logits = timer.wrap("head", target.logits)(hidden)

        def tail():
            rep = lambda t: t.repeat_interleave(k1)  # noqa: E731
            p = sampling_logprobs(logits.flatten(0, 1), rep(temperature), rep(top_k), rep(top_p),
                                  use_filter=use_filter, min_p=rep(min_p)).view(B, k1, -1)
            if rule == "match":
                tokens, logprobs, n = match_drafts(p, drafts, lengths, temperature, seeds, positions)
            else:
                tokens, logprobs, n = accept_drafts(p, q, drafts, lengths, temperature, seeds, positions, point)
            return tokens, logprobs, n, *next_inputs(tokens, n, positions, left, lengths, eos_ids, watching, late=late)
        return timer.wrap("sampling", tail)()

    get = engine.steps.get

    def get_timed(fn, **static):
        step = get(fn, **static)
        if engine.steps.mode == "eager":  # the split regions, run eagerly
            extra = {"run_block": timer.wrap("blocks", call_block)}
            extra |= {"sample_fn": sample_watch} if fn.__name__ == "decode_step" else {}
            extra |= {"verify_fn": verify_tail} if fn.__name__ == "verify_step" else {}
            return partial(step, **extra)
        if not isinstance(step, partial):  # whole-step graphs have no regions to time
            return step
        # compiled regions: the block, and the tail (head + sampler or acceptance test in one graph)
        kw = dict(step.keywords)
        for name, part in (("run_block", "blocks"), ("sample_fn", "head+sampling"), ("verify_fn", "head+sampling")):
            if name in kw:
                kw[name] = timer.wrap(part, kw[name])
        return partial(step.func, *step.args, **kw)
    engine.steps.get = get_timed


def profile(engine, batch: int, k: int, context: int, reps: int, split_ops: bool) -> dict:
    """Per-step milliseconds of each part, for `reps` steps after a warm-up."""
    timer = PartTimer()
    timed_regions(engine, timer)
    synthetic_steps(engine, batch, k, context, engine.steps.warm_calls)  # warm (and compiled)
    timer.on = True
    times = synthetic_steps(engine, batch, k, context, reps)
    timer.on = False
    total = sum(times)
    row = {"total": total / reps * 1e3}
    row |= {part: s / reps * 1e3 for part, s in timer.seconds.items()}
    row["rest"] = row["total"] - sum(s for p, s in row.items() if p != "total")
    if split_ops:  # a profiled run of the same steps: the blocks' op mix, as shares of their time
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use cost
            synthetic_steps(engine, batch, k, context, 1)
        timer.seconds.clear()
        timer.on = True
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            synthetic_steps(engine, batch, k, context, reps)
        timer.on = False
        ops = defaultdict(float)
        for e in prof.key_averages():
            kind = "matmul" if e.key in MATMUL_OPS else "attention" if e.key in ATTENTION_OPS else None
            if kind:
                ops[kind] += e.self_cpu_time_total / 1e6  # seconds over the profiled steps
        blocks = max(timer.seconds["blocks"], 1e-9)
        # the head's matrix product is a matmul outside the blocks: taken out by its own timing
        matmul = min(max(ops["matmul"] - timer.seconds["head"], 0.0) / blocks, 1.0)
        attention = min(ops["attention"] / blocks, 1.0 - matmul)
        row["blocks: matmul"] = row["blocks"] * matmul
        row["blocks: attention"] = row["blocks"] * attention
        row["blocks: other"] = row["blocks"] * (1.0 - matmul - attention)
    del engine.steps.get  # the class's own again
    return {k: round(v, 2) for k, v in row.items()}


def main(argv=None) -> int:
    from compile.policy import use_persistent_cache
    from respec.lab.bench import read_bandwidth_gbs
    from models.loading import ModelLoadError, load_model, resolve_dtype
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine

    p = argparse.ArgumentParser(prog="python -m respec.lab.profile_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--batch-sizes", default="1,8,16", help="comma-separated")
    p.add_argument("--k", type=int, default=3, help="draft length of the verify step")
    p.add_argument("--context", type=int, default=128, help="tokens already in each row's cache")
    p.add_argument("--reps", type=int, default=5, help="timed steps per shape")
    p.add_argument("--compile", action="store_true", help="the compiled engine instead of eager")
    p.add_argument("--compile-mode", default="regional", choices=["regional", "regional-dynamic", "whole", "graphs"],
                   help="with --compile (whole: one graph per step, not split into parts)")
    p.add_argument("--json", type=Path, help="write the table here (never overwritten)")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        print(f"profile_step: {args.json} exists; refusing to overwrite it", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        print(f"profile_step: --batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    use_persistent_cache()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    try:
        model = load_model(args.model, dtype=dtype)
    except ModelLoadError as e:
        print(f"profile_step: {e}", file=sys.stderr)
        return 2
    engine = RolloutEngine(model, kv_cache_bytes=1 << 30, eager=not args.compile, max_batch=max(batches),
                           compile_mode=args.compile_mode if args.compile else None, drafter=HistoryDrafter(),
                           num_draft_tokens=args.k)
    bandwidth = read_bandwidth_gbs(torch.device("cpu"))
    roofline = model.num_weight_bytes() / (bandwidth * 1e9) * 1e3
    rows = []
    for b in batches:
        for k in (0, args.k):
            row = {"step": "decode" if k == 0 else f"verify k={k}", "batch": b,
                   **profile(engine, b, k, args.context, args.reps, split_ops=not args.compile)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."),
              "compiled": args.compile_mode if args.compile else "eager",
              "context": args.context, "read_bandwidth_gb_s": round(bandwidth, 1), "roofline_ms": round(roofline, 2),
              "torch_threads": torch.get_num_threads(), "rows": rows}
    cols = ["total", "blocks", "blocks: matmul", "blocks: attention", "blocks: other", "head", "sampling",
            "head+sampling", "rest"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(f"\n{args.model} {report['dtype']}, {report['compiled']}, context "
          f"{args.context}, roofline {roofline:.1f} ms/step ({bandwidth:.1f} GB/s); ms per step")
    print("| step | batch | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['step']} | {r['batch']} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
