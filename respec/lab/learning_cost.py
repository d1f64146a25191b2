"""The learning cost of reusing rollout noise: the report of an experiment that trains on a fixed set
with fresh noise every step (`baseline`) and with a prompt's noise reused across epochs
(`per-prompt`, `per-prompt+reseed2`, `per-prompt+reseed4`; respec/rollout_seeds.py).

    python -m respec.lab.experiment --out runs/cost --steps 20 --seeds 0,1,2,3,4 \\
        --variants baseline,per-prompt,per-prompt+reseed2,per-prompt+reseed4 -- \\
        --train-size 8 --prompts 4 --eval-every 10 --eval-temperature 1 --eval-generations 4
    python -m respec.lab.learning_cost runs/cost [runs/cost-more-seeds ...] [--greedy-eval]

Several experiment directories may be given (the same settings, other seeds: two series run side by
side); their runs are pooled per variant. Per variant and seed it reads what the runs wrote:

  held-out     the last evaluation's pass@1 and pass@N (sampled at the run's --eval-temperature,
               the same noise per problem in every run: common random numbers), and with
               --greedy-eval the final actor's greedy accuracy on the same held-out problems,
               evaluated here once (RUN/greedy_eval.json keeps it; a later report reads it back)
  ever solved  the share of the training set with at least one correct completion during the run
               (completions.jsonl)
  signal       groups with signal (rewards not all equal) per data epoch, and over the run
  reward       the training reward of the first and the last epoch (biased upward by reuse: a
               reused seed tends to reproduce a rewarded completion)
  entropy      the policy's mean token entropy over the last epoch

and pairs every variant with `baseline` by seed: the per-seed difference, its mean and a 95%
t-interval over seeds. A difference is resolved when the interval leaves out 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from respec.cli import OneLineParser
from respec.run_plots import epoch_means, mean
from respec.lab.report import T_975

BASELINE = "baseline"


def runs_of(dirs: list[Path]) -> dict[str, dict[int, Path]]:
    """{variant: {seed: run directory}} of the finished runs (their final actor written), pooled over
    experiment directories of the same settings."""
    pooled: dict[str, dict[int, Path]] = defaultdict(dict)
    first = None
    for out in dirs:
        manifest = Path(out) / "experiment.json"
        if not manifest.is_file():
            raise ValueError(f"{out} is not an experiment directory (no experiment.json)")
        cfg = json.loads(manifest.read_text())
        same = {k: cfg[k] for k in ("steps", "train_args")}
        if first is not None and same != first:
            raise ValueError(f"{out} was run with other settings than {dirs[0]} ({same} against {first})")
        first = same
        for variant in cfg["variants"]:
            for seed in cfg["seeds"]:
                if not (Path(out) / variant / f"seed{seed}" / "hf").is_dir():  # not started, or still running
                    continue
                if seed in pooled[variant]:
                    raise ValueError(f"{variant} seed {seed} is in two of the experiment directories")
                pooled[variant][seed] = Path(out) / variant / f"seed{seed}"
    return dict(pooled)


def greedy_eval(run: Path) -> dict:
    """The final actor (RUN/hf) evaluated greedily on the run's held-out problems, as train.py's
    `--eval-every` would with `--eval-temperature 0`; kept in RUN/greedy_eval.json."""
    kept = run / "greedy_eval.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    from models.loading import eos_token_ids, load_model, load_tokenizer, resolve_dtype
    from respec import distributed, rewards
    from respec.config import TrainConfig
    from respec.engine import RolloutEngine
    from respec.evaluation import Evaluation, held_out_problems
    from respec.kv_cache import default_pool_bytes
    from respec.tasks import PromptFormat

    if not (run / "hf").is_dir():
        raise ValueError(f"{run} has no final actor (hf/): is the run finished?")
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    tok = load_tokenizer(cfg.model)
    scoring = rewards.Rewards(cfg.rewards, format_weight=cfg.format_weight)
    answers = {"numeric_answers": scoring.scores_numbers_only, "answers_required": scoring.needs_answers}
    problems = held_out_problems(cfg, cfg.make_task(seed=cfg.seed, **answers), numeric_answers=answers[
        "numeric_answers"], answers_required=answers["answers_required"])
    model = load_model(str(run / "hf"), dtype=resolve_dtype(cfg.dtype, "cpu"), device="cpu")
    engine = RolloutEngine(model, kv_cache_bytes=default_pool_bytes("cpu"), max_batch=cfg.max_batch,
                           eos_token_ids=eos_token_ids(tok, model), eager=True)
    evaluation = Evaluation(problems, dataclasses.replace(cfg.eval_sampling(), temperature=0.0))
    out = evaluation.run(engine, tok, scoring, distributed.Dist(),
                         prompt=PromptFormat.make(cfg.raw_prompts, cfg.chat_template_kwargs))
    out["problems"] = len(problems)
    kept.write_text(json.dumps(out) + "\n")
    return out


def ever_solved(run: Path) -> float:
    """The share of the training set's problems with a correct completion at some step."""
    seen, solved = set(), set()
    with open(run / "completions.jsonl") as f:
        for line in f:
            row = json.loads(line)
            problem = json.dumps(row["prompt"])
            seen.add(problem)
            if (row["rewards"].get("correctness") or 0) >= 1:
                solved.add(problem)
    return len(solved) / max(len(seen), 1)


def by_epoch(rows: list[dict], key: str) -> list[float]:
    """The mean of `key` over the steps of each data epoch, in order."""
    return [value for _, value in epoch_means(rows, key)]


def measures(run: Path, greedy: bool) -> dict[str, float]:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "reward_mean" in r]  # the step-0 evaluation row has no step metrics
    evaluated = [r for r in rows if "eval_accuracy" in r]
    out: dict[str, float] = {}
    if evaluated:
        last = evaluated[-1]
        out["held-out pass@1"] = last["eval_accuracy"]
        for key, value in last.items():
            if key.startswith("eval_pass_at_"):
                out[f"held-out pass@{key.rsplit('_', 1)[1]}"] = value
    if greedy:
        out["held-out greedy"] = greedy_eval(run)["eval_accuracy"]
    out["ever solved"] = ever_solved(run)
    signal = by_epoch(steps, "groups_with_signal")
    out["signal, run"] = mean(signal)
    out["signal, last half"] = mean(signal[len(signal) // 2:])
    reward = by_epoch(steps, "reward_mean")
    out["reward, epoch 1"], out["reward, last epoch"] = reward[0], reward[-1]
    out["entropy, last epoch"] = by_epoch(steps, "entropy")[-1]
    return out


def interval(diffs: list[float]) -> str:
    d = mean(diffs)
    if len(diffs) < 2:
        return f"{d:+.3f} (one seed)"
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    resolved = " **resolved**" if d - half > 0 or d + half < 0 else ""
    return f"{d:+.3f} ({d - half:+.3f} .. {d + half:+.3f}){resolved}"


def report(dirs: list[Path], greedy: bool = False) -> str:
    runs = runs_of(dirs)
    if BASELINE not in runs:
        raise ValueError("no baseline runs (fresh noise every step) to pair with")
    got = {v: {s: measures(p, greedy) for s, p in sorted(seeds.items())} for v, seeds in runs.items()}
    names = list(next(iter(got[BASELINE].values())))
    lines = ["Per variant, the mean over seeds (each seed's value in brackets, seeds " +
             ", ".join(map(str, sorted(got[BASELINE]))) + "):", "",
             "| variant | seeds | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
    for variant, seeds in got.items():
        cells = [f"{mean([m[n] for m in seeds.values()]):.3f} ({' / '.join(f'{m[n]:.2f}' for m in seeds.values())})"
                 for n in names]
        lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired by seed against {BASELINE} (mean difference, 95% t-interval over seeds):", "",
              "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for variant, seeds in got.items():
        if variant == BASELINE:
            continue
        common = [s for s in seeds if s in got[BASELINE]]
        lines.append(f"| {variant} | " + " | ".join(
            interval([seeds[s][n] - got[BASELINE][s][n] for s in common]) for n in names) + " |")
    lines += ["", "Groups with signal per data epoch (mean over seeds):", ""]
    signal = {v: [by_epoch([json.loads(x) for x in open(p / "metrics.jsonl") if '"reward_mean"' in x],
                           "groups_with_signal") for p in runs[v].values()] for v in runs}
    epochs = min(len(s) for per in signal.values() for s in per)
    lines += ["| variant | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
              "|---|" + "---:|" * epochs]
    for variant, per in signal.items():
        lines.append(f"| {variant} | " + " | ".join(f"{mean([s[e] for s in per]):.2f}" for e in range(epochs)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m respec.lab.learning_cost", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dirs", type=Path, nargs="+", help="experiment directories (respec.lab.experiment --out)")
    p.add_argument("--greedy-eval", action="store_true",
                   help="also evaluate every run's final actor greedily on its held-out problems")
    args = p.parse_args(argv)
    try:
        print(report(args.dirs, greedy=args.greedy_eval))
    except (ValueError, OSError, KeyError) as e:
        return p.fail(f"error: missing field {e}" if isinstance(e, KeyError) else f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
