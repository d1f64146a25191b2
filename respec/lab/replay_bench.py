"""Replay drafts after real policy drift: rollout speed with and without them, and the forecast.

    python -m respec.lab.replay_bench --steps-between 4 --batch-sizes 1,4,16 --json replay.json
    python -m respec.lab.replay_bench --model tiny --task toy-letters --steps-between 1 --batch-sizes 1,2  # smoke

1. A fixed training set (`--train-size` problems, `--group` samples each) is rolled out once by the
   starting policy with per-prompt seeds (respec/rollout_seeds.py): the replays.
2. `--steps-between` GRPO steps on that set (SD off; `--prompts` per step, so 4 steps of 4 prompts
   are one epoch of 16): the policy drifts as a run's does between two visits of a prompt
   (`--steps-before` trains first, for a later epoch of a run, where the policy has settled more).
3. For each batch size B: the moved policy rolls out the same requests with the same seeds
   (`--requests` of them, at most B decoding at once), plainly and with speculative decoding whose
   drafter has the replays (`--drafter`, default `replay`), alternating `--reps` times, the
   fastest of each kept (this machine's load varies). Under the match rule both give the very same
   tokens (checked: `same_as_plain`), so their times compare directly. The SD rollouts share one
   solver, its estimate calibrated after each by what it measured (`end_rollout`), as a run's is
   from one step to the next: only the first starts from the prior.

Before the SD rollouts it prints a forecast per batch size: the plain and the replay rollout's
decoding time simulated step by step from each row's common prefix with its replay and the fitted
cost model (respec/solver.py), beside the measured figures afterwards: with each step as the solver
plans it at the replay drafts' true acceptance (`forecast_decode_speedup`), and with every replay
row verifying at every step (`forecast_every_step_speedup`). `plain_tok_s` and
`sd_tok_s` count the whole rollout (prefill included); `accept_len` is tokens per row per verify.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from respec.cli import OneLineParser, json_object, positive_int, positive_int_list


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def forecast(rows: list[tuple[int, int, int]], batch: int, costs, replay_k: int, context: float,
             policy=None, max_new_tokens: int = 0) -> tuple[float, float, float]:
    """Decoding seconds of plain decoding and of replay SD for rows (completion length, common prefix
    with its replay, replay length), `batch` decoding at once, from the cost model; and the replay
    drafts' conditional acceptance in that SD rollout (accepted / reached). The prefill samples each
    row's first token in both. A replay row verifies min(cap, replay left) drafts of which those
    inside the common prefix are accepted, plus the target's token. Without `policy`, every replay row
    verifies at every step (cap `replay_k`) and the other rows decode plainly, in a step of their own
    or riding along in the replay rows' verify, whichever the cost model finds cheaper. With one
    (an AdaptiveK), each step is what its `plan` makes of the rows as the engine would ask it (the
    replays' lengths, `max_new_tokens` for each row's room; each row's tokens left once none waits),
    the other rows' groups as plain steps."""
    def run(speculate: bool) -> tuple[float, float]:
        waiting = [[n, p, r, 1] for n, p, r in rows]  # the last entry: tokens emitted
        active, seconds, counts = [], 0.0, [0, 0]
        while waiting or active:
            while waiting and len(active) < batch:
                active.append(waiting.pop(0))
            offered = [row for row in active if speculate and row[3] <= row[1] and row[3] < row[2]]
            caps = {id(row): replay_k for row in offered}
            together = False
            if offered and policy is not None:
                offers = [row[2] - row[3] if row in offered else 0 for row in active]
                room = [max_new_tokens - e - 1 for *_, e in active]
                remaining = None if waiting else [o or (r - e if r > e else rm + 1)
                                                  for o, (_, _, r, e), rm in zip(offers, active, room)]
                groups = policy.plan(room, offers, context, max_k=0, max_long=replay_k, remaining=remaining)
                long = [g for g in groups if g.long]
                caps = {id(active[i]): c for g in long for i, c in zip(g.rows, g.caps) if c}
                together = any(not all(g.offered) for g in long)  # (the others ride along)
            replay = [row for row in offered if caps.get(id(row))]
            plain = [row for row in active if row not in replay]
            if replay:
                width = max(min(caps[id(row)], row[2] - row[3]) for row in replay)
                apart = costs.verify_s(len(replay), width + 1, context) + (
                    costs.step_s(len(plain), 0, context) if plain else 0.0)
                joint = costs.verify_s(len(active), width + 1, context)
                seconds += joint if together else (min(apart, joint) if policy is None else apart)
                for row in replay:
                    n, p, r, e = row
                    drafts = min(caps[id(row)], r - e)
                    kept = max(0, min(drafts, p - e))
                    counts[0] += kept
                    counts[1] += min(kept + 1, drafts)
                    row[3] = min(n, e + kept + 1)
            elif plain:
                seconds += costs.step_s(len(plain), 0, context)
            for row in plain:
                row[3] += 1
            active = [row for row in active if row[3] < row[0]]
        return seconds, counts[0] / max(counts[1], 1)

    plain_s, _ = run(False)
    sd_s, beta = run(True)
    return plain_s, sd_s, beta


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m respec.lab.replay_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model preset, file or directory (default %(default)s)")
    p.add_argument("--task", default=None, help="reasoning-gym task (default: train.py's)")
    p.add_argument("--task-config", type=json_object, default=None, help="the task's options as JSON (as train.py's)")
    p.add_argument("--train-size", type=positive_int, default=16, help="problems in the fixed set (default %(default)s)")
    p.add_argument("--prompts", type=positive_int, default=4, help="prompts per GRPO step (default %(default)s)")
    p.add_argument("--group", type=positive_int, default=4, help="samples per prompt (default %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="completion limit (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--steps-between", type=int, default=4, help="GRPO steps between the two rollouts (default "
                   "%(default)s: one epoch of the default set)")
    p.add_argument("--steps-before", type=int, default=0, help="GRPO steps before the first rollout (a later "
                   "epoch of a run; default %(default)s)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 4, 16], help="comma-separated (default 1,4,16)")
    p.add_argument("--requests", type=positive_int, default=16, help="requests rolled out per batch size (at least "
                   "the batch size; default %(default)s)")
    p.add_argument("--drafter", default="replay", help="drafter spec as train.py's, with replay (default %(default)s)")
    p.add_argument("--k", type=positive_int, default=3, help="the model drafter's largest k (default %(default)s)")
    p.add_argument("--replay-k", type=positive_int, default=16, help="most replay drafts per verify (default "
                   "%(default)s)")
    p.add_argument("--reps", type=positive_int, default=2, help="timed rollouts of each kind per batch size, the "
                   "fastest kept (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="rollout dtype (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here (never overwritten)")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        return p.fail(f"{args.json} exists; refusing to overwrite it")
    if "replay" not in args.drafter.split("+"):
        return p.fail(f"--drafter {args.drafter} has no replay part (e.g. replay, auto+replay+history)")
    if args.steps_between < 0 or args.steps_before < 0:
        return p.fail(f"--steps-between and --steps-before must be >= 0, got {args.steps_between}, "
                       f"{args.steps_before}")
    try:
        report = run(args)
    except ValueError as e:
        return p.fail(f"{e}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def run(args) -> dict:
    from compile.policy import use_persistent_cache
    from respec import distributed
    from respec.drafter_choice import choose_drafter, ensure_head
    from respec.engine import RolloutEngine, SamplingParams
    from respec.rollout_seeds import RolloutSeeds
    from respec.profiling import StepTimer
    from respec.solver import AdaptiveK, cost_key, load_or_profile
    from respec.tasks import chat_prompt
    from respec.config import TrainConfig
    from respec.trainer import Trainer

    use_persistent_cache()
    task = {"task": args.task} if args.task else {}
    cfg = TrainConfig(model=args.model, **task, task_config=args.task_config, train_size=args.train_size, prompts=args.prompts, group=args.group,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      steps=max(args.steps_before + args.steps_between, 1),
                      rollout_seeds="per-prompt", sd="off", progress=False, log_completions="none", seed=args.seed,
                      dtype=args.dtype)
    cfg.validate(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, d=distributed.Dist(), run_dir=Path(tmp), log=log)
        trainer.start()
        problems = trainer.task.problems(0, args.train_size)
        keys = [pr.key for pr in problems]
        seeds = RolloutSeeds("per-prompt", seed=args.seed, group=args.group).step_seeds(0, keys, [0] * len(keys))
        prompts = [chat_prompt(trainer.tok, pr.messages()) for pr in problems for _ in range(args.group)]
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=s)
                  for s in seeds]
        def train(steps: int) -> None:
            for _ in range(steps):
                m = trainer.train_step()
                trainer.step += 1
                log(f"GRPO step {trainer.step}: reward {m['reward_mean']:.3f}, {m['step_s']:.1f} s")

        train(args.steps_before)
        old = [c.token_ids for c in trainer.engine.generate(prompts, params)]
        t0 = time.perf_counter()
        train(args.steps_between)
        drift_s = time.perf_counter() - t0
        model = trainer.rollout.model
        eos = sorted(trainer.engine.eos)
        common = dict(model=args.model, task_name=cfg.task, task=cfg.pretraining_task(), tokenizer=trainer.tok,
                      task_config=cfg.task_config, max_new_tokens=args.max_new_tokens, seed=args.seed)
        ensure_head(args.drafter, **common, temperature=args.temperature, log=log, dtype=cfg.dtype)
        chosen = choose_drafter(args.drafter, target=model, k=args.k, rollout_dtype=trainer.rollout_dtype,
                                draft_temperature=cfg.draft_temperature, **common)
        biggest = max(args.batch_sizes)
        plain = RolloutEngine(model, kv_cache_bytes=512 << 20, eos_token_ids=eos, eager=True, max_batch=biggest)
        sd = RolloutEngine(model, kv_cache_bytes=512 << 20, eos_token_ids=eos, eager=True, max_batch=biggest,
                           drafter=chosen.drafter, num_draft_tokens=args.k, replay_k=args.replay_k)
        key = cost_key(args.model, sd.drafter.describe(), sd)
        costs, _ = load_or_profile(StepTimer(sd), key,
                                   batch_sizes=sorted({1, *args.batch_sizes}),
                                   ks=sorted({0, 1, args.k, args.replay_k}),
                                   contexts=(64, 64 + args.max_new_tokens), progress=False)
        new = [c.token_ids for c in plain.generate(prompts, params)]  # the moved policy, for the forecast
        prefix = [common_prefix(a, b) for a, b in zip(old, new)]
        context = sum(map(len, prompts)) / len(prompts) + args.max_new_tokens / 2
        results = []
        # one solver for every SD rollout, carried from one to the next as a run carries it
        solver = AdaptiveK(costs, args.k, chosen.prior)
        for batch in args.batch_sizes:
            n = min(len(prompts), max(batch, args.requests))
            rows = [(len(new[i]), prefix[i], len(old[i])) for i in range(n)]
            plain_f, every_f, beta = forecast(rows, batch, costs, args.replay_k, context)
            # the solver's plan of each step at the replay drafts' true acceptance (one beta for
            # every position, as the solver keeps it)
            judge = AdaptiveK(costs, 1, beta=beta)
            _, sd_f, _ = forecast(rows, batch, costs, args.replay_k, context, policy=judge,
                                  max_new_tokens=args.max_new_tokens)
            log(f"B={batch}: forecast decode speedup {plain_f / sd_f:.2f}x as the solver plans, "
                f"{plain_f / every_f:.2f}x verifying every replay row at every step")
            plain.limit_batch(batch)
            sd.limit_batch(batch)
            best = {"plain": None, "sd": None}
            for _ in range(args.reps):
                for name, engine in (("plain", plain), ("sd", sd)):
                    t0 = time.perf_counter()
                    out = engine.generate(prompts[:n], params[:n], replays=old[:n] if name == "sd" else None,
                                          policy=solver if name == "sd" else None)
                    seconds = time.perf_counter() - t0
                    if name == "sd":
                        solver.end_rollout()  # (its estimate calibrated by what the rollout measured, as in a run)
                    if best[name] is None or seconds < best[name][0]:
                        best[name] = (seconds, out.stats, [o.token_ids for o in out])
            (ps, pst, ptok), (ss, sst, stok) = best["plain"], best["sd"]
            tokens = sum(map(len, ptok))
            kinds = sst.sd_kinds.get("replay", {})
            results.append({
                "batch": batch, "requests": n,
                "max_active": max(pst.batch_sizes + sst.batch_sizes),  # the most rows that decoded at once
                "plain_tok_s": round(tokens / ps, 2), "sd_tok_s": round(sum(map(len, stok)) / ss, 2),
                "speedup": round(ps / ss, 3),
                "plain_decode_tok_s": round(pst.decode_tok_s, 2), "sd_decode_tok_s": round(sst.decode_tok_s, 2),
                "decode_speedup": round(sst.decode_tok_s / max(pst.decode_tok_s, 1e-9), 3),
                "forecast_decode_speedup": round(plain_f / sd_f, 3),
                "forecast_every_step_speedup": round(plain_f / every_f, 3),
                "accept_len": round(sst.accept_len, 3),
                "replay_accept_len": round(kinds.get("emitted", 0) / max(kinds.get("rows", 0), 1), 3),
                "replay_token_frac": round(kinds.get("accepted", 0) / max(tokens, 1), 4),
                "same_as_plain": stok == ptok,
                "flipped_rows": sum(a != b for a, b in zip(stok, ptok)),
                "sd_phase_s": {k: round(v, 3) for k, v in sst.sd_phase_s.items()},
                "decode_s": {"plain": round(pst.decode_s, 3), "sd": round(sst.decode_s, 3)},
            })
            print(json.dumps(results[-1]), flush=True)
    lengths = [len(t) for t in new]
    report = {
        "model": args.model, "task": cfg.task, "dtype": str(trainer.rollout_dtype).removeprefix("torch."),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "train_size": args.train_size, "group": args.group,
        "steps_before": args.steps_before, "steps_between": args.steps_between, "drift_s": round(drift_s, 1), "temperature": args.temperature,
        "drafter": args.drafter, "k": args.k, "replay_k": args.replay_k,
        "mean_common_prefix": round(sum(prefix) / len(prefix), 2),
        "prefix_token_share": round(sum(prefix) / max(sum(lengths), 1), 4),
        "identical": sum(p == len(t) == len(o) for p, t, o in zip(prefix, new, old)), "completions": len(new),
        "cost_model": list(costs.coef), "results": results,
    }
    print(f"\n{args.model} {report['dtype']}, T = {args.temperature}, {args.steps_between} GRPO steps of drift: "
          f"common prefix {report['mean_common_prefix']} tokens ({report['prefix_token_share']:.0%} of all), "
          f"{report['identical']}/{len(new)} identical")
    print("| batch | plain tok/s | SD tok/s | speedup | decode speedup | forecast | forecast, every step | accept len | "
          "replay tokens | same |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['batch']} | {r['plain_tok_s']} | {r['sd_tok_s']} | {r['speedup']}x | {r['decode_speedup']}x | "
              f"{r['forecast_decode_speedup']}x | {r['forecast_every_step_speedup']}x | {r['accept_len']} | {r['replay_token_frac']:.0%} | "
              f"{r['same_as_plain']} |")
    return report


if __name__ == "__main__":
    sys.exit(main())
