"""`generate.py --sweep`: fixed k against the adaptive policy, measured against the cost model.

In one run, for a target and a drafter:
  1. the cost model (respec/solver.py) is loaded from the cache directory or profiled and fitted;
  2. grid: for every batch size and every k in 0..K, a greedy rollout of `--new-tokens` tokens per
     row (EOS ignored, so the batch stays full) is timed, next to the model's prediction made
     *before* the run from the acceptance estimate so far (the drafter's training report, then
     what earlier SD runs observed). `measured_tok_s` is the decoding steps' throughput, which is
     what the cost model predicts (and what k changes); `rollout_tok_s` includes the prefill;
     each is the fastest of `--sweep-reps` runs;
  3. adaptive: the same rollouts with the policy choosing k at every step;
  4. long tail: a GRPO-shaped rollout, `--longtail-samples` completions of task prompts in groups
     of `--longtail-group` siblings, sampled at `--longtail-temperature` with natural EOS, so the
     active batch shrinks as rows finish; run with always-SD at the best single k, never-SD and
     adaptive, `--sweep-reps` times each with the same per-row seeds in every policy, and compared
     by pooled tokens/s. Sampled completions are equal only in distribution (SD draws other
     uniforms than plain decoding), so their lengths differ between runs; pooling reps evens that
     out. At temperature 0 the three runs produce the very same tokens (checked), and their
     seconds compare directly.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

from respec import storage
from respec.engine import EngineStats, RolloutEngine, SamplingParams
from respec.profiling import StepTimer, warmup
from respec.solver import AdaptiveK, FixedK, conditional_acceptance, cost_key, drafter_alpha, load_or_profile
from respec.tasks import chat_prompt, make_problems


def timed_rollout(engine, prompts, params, policy) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, policy=policy)
    return time.perf_counter() - t0, out


def best_of(reps: int, engine, prompts, params, policy) -> tuple[float, float, EngineStats]:
    """The fastest of `reps` identical rollouts (this machine's load varies between runs; the
    fastest is the least disturbed): (decode-phase tok/s, rollout seconds, that run's stats)."""
    best = None
    for _ in range(reps):
        seconds, _ = timed_rollout(engine, prompts, params, policy)
        if best is None or engine.stats.decode_tok_s > best[0]:
            best = (engine.stats.decode_tok_s, seconds, engine.stats)
    return best


def run_sweep(args, model, tokenizer, drafter, eos_token_ids) -> dict:
    if drafter is None:
        raise ValueError("--sweep needs a --drafter")
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot is not None and plot.exists():
        raise ValueError(f"{plot} exists; refusing to overwrite it")
    K = args.k
    batches = sorted(args.batch_sizes)
    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                           compile_mode=args.compile_mode,
                           max_batch=max(batches + [args.longtail_samples]), drafter=drafter, num_draft_tokens=K,
                           eos_token_ids=eos_token_ids, run_ahead=args.run_ahead, attention=args.attention)
    prompts_all = [chat_prompt(tokenizer, p.messages()) for p in make_problems(args.task, max(batches), seed=args.seed)]
    need = sum(engine.blocks.blocks_for(len(p) + args.new_tokens + K + 1) for p in prompts_all)
    if need > engine.blocks.num_blocks - 1:
        raise ValueError(f"batch {max(batches)} needs {need} KV blocks, the cache has {engine.blocks.num_blocks - 1}: "
                         f"raise --kv-cache-gb")

    warmup(engine, batches + [args.longtail_samples], ks=list(range(K + 1)))  # every (bucket, k) a rollout can meet
    key = cost_key(args.model, args.drafter, engine)
    mean_prompt = sum(len(p) for p in prompts_all) / len(prompts_all)
    profile_batches = sorted({batches[0], batches[-1], *batches[1:-1:2]})
    t0 = time.perf_counter()
    costs, cached = load_or_profile(StepTimer(engine), key, batch_sizes=profile_batches,
                                    ks=sorted({0, 1, max(1, K // 2), K}),
                                    contexts=(round(mean_prompt), round(mean_prompt + args.new_tokens)))
    profile_s = time.perf_counter() - t0
    print(f"cost model {'loaded from cache' if cached else f'profiled and fitted in {profile_s:.0f} s'}: "
          f"median fit error {costs.rel_error:.1%}", flush=True)
    policy = AdaptiveK(costs, K, drafter_alpha(args.drafter, K))
    print(f"initial acceptance estimate: {[round(a, 3) for a in policy.alpha]}", flush=True)

    # Acceptance so far, pooled over every SD run of the sweep: per draft position, the rows that
    # reached it and those that accepted it (the engine's counts)
    accepted_at, reached_at = [0] * K, [0] * K

    def learn(stats):
        for j, (a, r) in enumerate(zip(stats.sd_accepted_at[:K], stats.sd_reached_at[:K])):
            accepted_at[j] += a
            reached_at[j] += r
        policy.set_alpha(conditional_acceptance(accepted_at, reached_at))

    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_on_eos=False)
    context = mean_prompt + args.new_tokens / 2
    grid, adaptive = [], []
    for b in batches:
        prompts = prompts_all[:b]
        for k in range(K + 1):
            predicted = policy.throughput(b, k, context)
            tok_s, seconds, stats = best_of(args.sweep_reps, engine, prompts, greedy, FixedK(k))
            if k:  # what this run taught about acceptance
                learn(stats)
            grid.append({"batch": b, "k": k, "predicted_tok_s": round(predicted, 2),
                         "measured_tok_s": round(tok_s, 2),
                         "rollout_tok_s": round(b * args.new_tokens / seconds, 2),
                         "accept_len": round(stats.accept_len, 3) if k else None})
            print(f"  batch {b:>3} k={k}: measured {grid[-1]['measured_tok_s']:8.1f} tok/s, predicted "
                  f"{predicted:8.1f}", flush=True)
        tok_s, seconds, stats = best_of(args.sweep_reps, engine, prompts, greedy, policy)
        chosen = Counter(stats.chosen_k).most_common(1)[0][0]
        adaptive.append({"batch": b, "k_chosen": chosen, "measured_tok_s": round(tok_s, 2),
                         "rollout_tok_s": round(b * args.new_tokens / seconds, 2),
                         "k_per_step": dict(Counter(stats.chosen_k))})
        print(f"  batch {b:>3} adaptive (k={chosen} most often): {adaptive[-1]['measured_tok_s']:8.1f} tok/s", flush=True)

    # The best single k > 0 over the grid (geometric mean of measured throughput over batch sizes).
    def score(k):
        return sum(math.log(g["measured_tok_s"]) for g in grid if g["k"] == k)
    best_k = max(range(1, K + 1), key=score)
    G = args.longtail_group
    groups = make_problems(args.task, -(-args.longtail_samples // G), seed=args.seed + 1)
    long_prompts = [chat_prompt(tokenizer, p.messages()) for p in groups for _ in range(G)][:args.longtail_samples]
    T = args.longtail_temperature

    def natural(rep):  # each row its own seed, the same in every policy
        return [SamplingParams(max_new_tokens=args.longtail_tokens, temperature=T, seed=rep * 1_000_003 + i)
                for i in range(len(long_prompts))]

    longtail = {"samples": len(long_prompts), "group": G, "temperature": T, "reps": args.sweep_reps,
                "always_sd_k": best_k}
    outputs = {}
    for name, pol in (("never_sd", FixedK(0)), ("always_sd", FixedK(best_k)), ("adaptive", policy)):
        seconds, out = 0.0, []
        for rep in range(args.sweep_reps):
            s, o = timed_rollout(engine, long_prompts, natural(rep), pol)
            seconds, out = seconds + s, out + o
        outputs[name] = [o.token_ids for o in out]
        tokens = sum(len(o.token_ids) for o in out)
        longtail[f"{name}_s"] = round(seconds, 2)
        longtail[f"{name}_tokens"] = tokens
        longtail[f"{name}_tok_s"] = round(tokens / seconds, 2)
        if name == "always_sd":
            longtail["always_sd_accept_len"] = round(engine.stats.accept_len, 3)  # its last rep
        lengths = sorted(len(o.token_ids) for o in out)
        print(f"  long tail {name}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s), "
              f"lengths {lengths[0]}..{lengths[len(lengths) // 2]}..{lengths[-1]}", flush=True)
    longtail["tokens"] = longtail["never_sd_tokens"]
    longtail["same_tokens"] = (outputs["always_sd"] == outputs["never_sd"] == outputs["adaptive"]) if T == 0 else None
    longtail["adaptive_k_per_step"] = [[b, k] for b, k in zip(engine.stats.batch_sizes, engine.stats.chosen_k)]

    report = {"model": args.model, "drafter": args.drafter, "dtype": str(engine.dtype).removeprefix("torch."),
              "max_k": K, "new_tokens": args.new_tokens, "cost_model": {**costs.to_json(), "cached": cached},
              "grid": grid, "adaptive": adaptive, "longtail": longtail}
    print_sweep(report)
    if plot is not None:
        plot_sweep(report, plot)
        print(f"plot: {plot}")
    return report


def print_sweep(report: dict) -> None:
    rows = report["grid"]
    errors = sorted(abs(r["predicted_tok_s"] - r["measured_tok_s"]) / r["measured_tok_s"] for r in rows)
    print(f"\nmedian |predicted - measured| / measured over the grid: {errors[len(errors) // 2]:.1%}")
    print(f"{'batch':>5} " + " ".join(f"{'k=' + str(k):>9}" for k in range(report["max_k"] + 1))
          + f" {'adaptive':>9} {'k*':>3} {'vs best':>8}")
    for a in report["adaptive"]:
        cells = [r for r in rows if r["batch"] == a["batch"]]
        best = max(r["measured_tok_s"] for r in cells)
        print(f"{a['batch']:>5} " + " ".join(f"{r['measured_tok_s']:>9.1f}" for r in cells)
              + f" {a['measured_tok_s']:>9.1f} {a['k_chosen']:>3} {a['measured_tok_s'] / best:>7.2f}x")
    lt = report["longtail"]
    print(f"long tail ({lt['samples']} samples, groups of {lt['group']}, T={lt['temperature']}): never-SD {lt['never_sd_tok_s']:.1f} tok/s, always-SD k={lt['always_sd_k']} "
          f"{lt['always_sd_tok_s']:.1f} tok/s, adaptive {lt['adaptive_tok_s']:.1f} tok/s "
          f"({lt['adaptive_tok_s'] / max(lt['never_sd_tok_s'], lt['always_sd_tok_s']):.2f}x the better fixed policy)")


def plot_sweep(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in range(report["max_k"] + 1):
        rows = [r for r in report["grid"] if r["k"] == k]
        b = [r["batch"] for r in rows]
        line, = ax.plot(b, [r["measured_tok_s"] for r in rows], "o-", label=f"k={k} measured")
        ax.plot(b, [r["predicted_tok_s"] for r in rows], "--", color=line.get_color(), alpha=0.7)
    ad = report["adaptive"]
    ax.plot([a["batch"] for a in ad], [a["measured_tok_s"] for a in ad], "k*", markersize=12, label="adaptive")
    for a in ad:
        ax.annotate(f"k={a['k_chosen']}", (a["batch"], a["measured_tok_s"]), textcoords="offset points", xytext=(4, 6))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{report['model']} {report['dtype']}: measured (solid) vs predicted (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with storage.writing(path):
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
