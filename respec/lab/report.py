"""The report of a side-by-side experiment (respec/lab/experiment.py): Markdown and plots.

    python -m respec.lab.report runs/exp            # writes runs/exp/BENCHMARKS.md and runs/exp/plots/*.png

What it shows, per variant (seeds pooled; spread = min..max over seeds):
  * step time and its phases (rollout, reward, train, drafter), the rollout's share of the step;
  * end-to-end speedup over the baseline: per step (baseline step time / variant step time, same
    seed and step, averaged over seeds), its peak over steps, and on average (total baseline time /
    total variant time);
  * the mean completion length (runs sample different tokens, so their lengths drift apart and
    step time follows them: read every speedup next to it);
  * rollout tokens/s, the fraction of decoding steps that speculated, accept_len over the steps that
    speculated (and the drafter's 1 - TV estimate where it is distilled online);
  * the chosen k against the active batch size during one rollout of ReSpec (the long tail);
  * reward and accuracy curves with their seed spread;
  * with a fixed training set (`--train-size`), the same speeds from the second data epoch on, where
    last epoch's completions exist as replay drafts, and how long each seed's rollouts stayed the
    same tokens as the baseline's (the match rule's promise, up to bf16 flips).
The baseline is the `baseline` variant, or without one `per-prompt` (SD off with the seeding the
replay variant uses, so both roll out the same tokens).
It reads only what the runs wrote (metrics.jsonl); nothing is measured here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from respec.run_plots import mean, read_metrics

PHASES = (("rollout_s", "rollout"), ("reward_s", "reward"), ("train_s", "train"), ("drafter_s", "drafter"))


def load(out: Path) -> tuple[dict, dict[str, dict[int, list[dict]]]]:
    """(settings, {variant: {seed: metrics rows}}) of the runs that have metrics."""
    manifest = Path(out) / "experiment.json"
    if not manifest.is_file():
        raise ValueError(f"{out} is not an experiment directory (no experiment.json)")
    cfg = json.loads(manifest.read_text())
    runs: dict[str, dict[int, list[dict]]] = {}
    for variant in cfg["variants"]:
        for seed in cfg["seeds"]:
            path = Path(out) / variant / f"seed{seed}"
            if (path / "metrics.jsonl").is_file():
                runs.setdefault(variant, {})[seed] = read_metrics(path)
    if baseline_of(runs) is None:
        raise ValueError(f"{out} has no baseline run with metrics yet")
    return cfg, runs


BASELINES = ("baseline", "per-prompt")  # SD off: fresh noise every step, or the replay variant's seeding


def baseline_of(runs: dict) -> str | None:
    return next((b for b in BASELINES if b in runs), None)


def respec_variant(cfg: dict, runs: dict) -> str | None:
    name = "rkd+adaptive+async" if cfg.get("respec_async") == "on" else "rkd+adaptive"
    return name if name in runs else None


def speculated(rows: list[dict]) -> list[dict]:
    """The steps whose rollout took at least one speculative step (accept_len means something)."""
    return [r for r in rows if r.get("sd_fraction", 0) > 0]


def per_step(seeds: dict[int, list[dict]], key: str, *, sd_only: bool = False) -> list[float]:
    """The seed mean of `key` at every step all seeds reached, over the seeds that have it (NaN
    where none has: a gap in a curve, e.g. the acceptance estimate before the first distillation);
    with `sd_only`, over the seeds whose rollout speculated at that step."""
    n = min(len(rows) for rows in seeds.values())
    out = []
    for i in range(n):
        rows = [rs[i] for rs in seeds.values()]
        vals = [r[key] for r in (speculated(rows) if sd_only else rows) if r.get(key) is not None]
        out.append(mean(vals) if vals else float("nan"))
    return out


def speedups(base: dict[int, list[dict]], var: dict[int, list[dict]]) -> tuple[list[float], float]:
    """(per-step speedup, seed mean; total-time speedup) over the seeds and steps both have."""
    seeds = sorted(set(base) & set(var))
    n = min(min(len(base[s]), len(var[s])) for s in seeds)
    steps = [mean(base[s][i]["step_s"] / var[s][i]["step_s"] for s in seeds) for i in range(n)]
    total = sum(base[s][i]["step_s"] for s in seeds for i in range(n)) / sum(var[s][i]["step_s"] for s in seeds
                                                                           for i in range(n))
    return steps, total


def first_last(rows_by_seed: dict[int, list[dict]], key: str, n: int = 5) -> str:
    """mean of the first n steps -> the last n, with the seed spread of each."""
    rows_by_seed = {s: rows for s, rows in rows_by_seed.items() if rows}
    if not rows_by_seed:
        return "-"
    firsts = [mean(r[key] for r in rows[:n]) for rows in rows_by_seed.values()]
    lasts = [mean(r[key] for r in rows[-n:]) for rows in rows_by_seed.values()]
    spread = lambda xs: f" ({min(xs):.2f}..{max(xs):.2f})" if len(xs) > 1 else ""  # noqa: E731
    return f"{mean(firsts):.3f}{spread(firsts)} -> {mean(lasts):.3f}{spread(lasts)}"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def table(cfg: dict, runs: dict) -> str:
    base_name = baseline_of(runs)
    base = runs[base_name]
    respec = respec_variant(cfg, runs)
    head = ["variant", "seeds", "step s", "rollout / reward / train / drafter s", "rollout share", "response len",
            "rollout tok/s", "SD steps", "accept_len first 5 -> last 5 SD steps", "speedup avg (peak)",
            "reward first 5 -> last 5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, seeds in runs.items():
        rows = [r for rs in seeds.values() for r in rs]
        phases = " / ".join(f"{mean(r[k] for r in rows):.2f}" for k, _ in PHASES)
        share = sum(r["rollout_s"] for r in rows) / sum(r["step_s"] for r in rows)
        tok_s = sum(r["rollout_tok_s"] * r["rollout_s"] for r in rows) / max(sum(r["rollout_s"] for r in rows), 1e-9)
        sd = mean(r["sd_fraction"] for r in rows)
        accept = first_last({seed: speculated(rs) for seed, rs in seeds.items()}, "accept_len")
        per, total = speedups(base, seeds)
        speed = f"{total:.2f}x ({max(per):.2f}x)" if variant != base_name else "1"
        name = f"**{variant}** (respec)" if variant == respec else variant
        length = mean(r["response_len_mean"] for r in rows)
        lines.append(f"| {name} | {len(seeds)} | {mean(r['step_s'] for r in rows):.2f} | {phases} | {share:.0%} | "
                     f"{length:.0f} | {tok_s:.0f} | {sd:.0%} | {accept} | {speed} | {first_last(seeds, 'reward_mean')} |")
    return "\n".join(lines)


def later_epochs(runs: dict) -> str | None:
    """Speeds from the second data epoch on (a fixed `--train-size` set; None without one), each
    variant against the baseline over the same seeds and steps: rollout tokens/s (all tokens over
    all rollout seconds) and step time, their ratios, the share of tokens that were replay drafts, and
    per seed the last step through which the variant's rollouts matched the baseline's (reward and
    mean length equal at every step up to it)."""
    base_name = baseline_of(runs)
    base = runs[base_name]
    firsts = [next((r["step"] for r in rs if r.get("epoch", 0) >= 1), None) for rs in base.values()]
    if not firsts or None in firsts:
        return None
    first = max(firsts)
    head = ["variant", "seeds", "steps", "rollout s", "rollout tok/s", "rollout tok/s vs baseline", "step s",
            "step time vs baseline", "replay share of tokens", "SD steps", "same rollouts as the baseline through step"]
    lines = [f"From the second data epoch on (steps {first} and later):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sums(rows):
        tokens = sum(r["rollout_tok_s"] * r["rollout_s"] for r in rows)
        return tokens / max(sum(r["rollout_s"] for r in rows), 1e-9), sum(r["step_s"] for r in rows) / len(rows)

    for variant, seeds in runs.items():
        common = sorted(set(seeds) & set(base))
        n = min(min(len(seeds[s]), len(base[s])) for s in common)
        mine = [r for s in common for r in seeds[s][first - 1:n]]
        theirs = [r for s in common for r in base[s][first - 1:n]]
        if not mine:
            continue
        (tok_s, step_s), (base_tok_s, base_step_s) = sums(mine), sums(theirs)
        same = []
        for s in common:
            agree = 0
            for v, b in zip(seeds[s], base[s]):
                if (v["reward_mean"], v["response_len_mean"]) != (b["reward_mean"], b["response_len_mean"]):
                    break
                agree = v["step"]
            same.append(str(agree))
        ratio = lambda x: "-" if variant == base_name else f"{x:.2f}x"  # noqa: E731
        lines.append(f"| {variant} | {len(common)} | {first}-{n} | {mean(r['rollout_s'] for r in mine):.2f} | "
                     f"{tok_s:.1f} | {ratio(tok_s / base_tok_s)} | {step_s:.2f} | {ratio(base_step_s / step_s)} | "
                     f"{mean(r.get('replay_token_frac', 0.0) for r in mine):.0%} | "
                     f"{mean(r['sd_fraction'] for r in mine):.0%} | {'-' if variant == base_name else ' / '.join(same)} |")
    return "\n".join(lines)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(variant: dict[int, list[dict]], baseline: dict[int, list[dict]], key: str = "reward_mean"):
    """The variant's reward minus the baseline's, paired by seed (the same seed: the same prompts in
    the same order) and step: each seed's mean over the steps both ran, then the mean over seeds
    with a 95% t-interval over seeds (None with one seed). Per-step differences of one seed are not
    independent (a policy's reward moves slowly), so the interval is taken over seeds, not steps.
    Returns (mean, half-width or None, number of seeds)."""
    diffs = []
    for seed in sorted(set(variant) & set(baseline)):
        pairs = list(zip(variant[seed], baseline[seed]))
        if pairs:
            diffs.append(mean([v[key] - b[key] for v, b in pairs]))
    if not diffs:
        return float("nan"), None, 0
    n = len(diffs)
    half = T_975.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return mean(diffs), half, n


def reward_table(runs: dict) -> str:
    """Each seed's run-mean reward (+- its standard error over the run's steps) and accuracy, and
    the reward difference to the baseline paired by seed and step, with a 95% interval over seeds:
    a variant differs from the baseline when the interval leaves out 0."""
    def per_seed(seeds: dict[int, list[dict]], key: str) -> list[list[float]]:
        return [[r[key] for r in rows] for _, rows in sorted(seeds.items())]

    def std_error(xs: list[float]) -> float:
        return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")

    base = baseline_of(runs)
    head = ["variant", "reward, run mean per seed (+- standard error over steps)", "accuracy, run mean per seed",
            "reward - baseline, paired (95% interval over seeds)", "differs from baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, seeds in runs.items():
        rewards = per_seed(seeds, "reward_mean")
        if variant == base:
            diff, differs = "-", "-"
        else:
            d, half, n = paired_difference(seeds, runs[base])
            diff = f"{d:+.3f}" + (f" [{d - half:+.3f}, {d + half:+.3f}]" if half is not None else " (one seed)")
            differs = "-" if half is None else ("yes" if d - half > 0 or d + half < 0 else "no")
        lines.append(f"| {variant} | {' / '.join(f'{mean(xs):.3f} +- {std_error(xs):.3f}' for xs in rewards)} | "
                     f"{' / '.join(f'{mean(xs):.3f}' for xs in per_seed(seeds, 'accuracy'))} | {diff} | {differs} |")
    return "\n".join(lines)


def plots(cfg: dict, runs: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {v: f"C{i}" for i, v in enumerate(runs)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    # 1. phases of the mean step, per variant
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(runs)
    bottom = [0.0] * len(names)
    for key, label in PHASES:
        vals = [mean(r[key] for rs in runs[v].values() for r in rs) for v in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, vals)]
    ax.set_ylabel("seconds per RL step (mean)")
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend()
    save(fig, "phases.png")

    # 2. speedup over the baseline per step; 3. rollout tokens/s; 4. accept_len
    fig, (sp, tok, acc) = plt.subplots(1, 3, figsize=(15, 3.8))
    base = baseline_of(runs)
    for v, seeds in runs.items():
        per, _ = speedups(runs[base], seeds)
        steps = range(1, len(per) + 1)
        if v != base:
            sp.plot(steps, per, color=colors[v], marker="o", ms=3, label=v)
        tok.plot(range(1, len(per_step(seeds, "rollout_tok_s")) + 1), per_step(seeds, "rollout_tok_s"),
                 color=colors[v], label=v)
        if mean(r["sd_fraction"] for rs in seeds.values() for r in rs) > 0:
            acc_vals = per_step(seeds, "accept_len", sd_only=True)  # gaps where no seed speculated
            acc.plot(range(1, len(acc_vals) + 1), acc_vals, color=colors[v], marker="o", ms=3, label=v)
            if all("accept_est" in r for rs in seeds.values() for r in rs[1:]):
                est = per_step(seeds, "accept_est")
                acc.plot(range(1, len(est) + 1), est, color=colors[v], ls="--", label=f"{v} (1 - TV estimate)")
    sp.axhline(1.0, color="gray", lw=0.8)
    for ax, ylabel in ((sp, "speedup over baseline (step time)"), (tok, "rollout tokens/s"),
                       (acc, "accept_len (tokens per verify step)")):
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, "speed.png")

    # 5. chosen k against the active batch in one rollout of ReSpec: the one that speculated most
    respec = respec_variant(cfg, runs)
    if respec is not None:
        seed, row = max(((seed, r) for seed, rs in sorted(runs[respec].items()) for r in rs),
                        key=lambda sr: (sum(k > 0 for _, k in sr[1].get("k_trace") or []), len(sr[1].get("k_trace") or [])))
        trace = row.get("k_trace") or []
        if trace:
            fig, ax = plt.subplots(figsize=(7, 3.8))
            ax.plot([b for b, _ in trace], color="C0", label="active batch")
            ax.set_xlabel(f"decoding step (rollout of RL step {row['step']}, seed {seed}, {respec})")
            ax.set_ylabel("active sequences")
            ax2 = ax.twinx()
            ax2.step(range(len(trace)), [k for _, k in trace], color="C3", where="post", label="chosen k")
            ax2.set_ylabel("draft length k (0 = plain decoding)")
            ax2.set_ylim(-0.2, max(1, max(k for _, k in trace)) + 0.5)
            ax.legend(loc="upper center")
            ax2.legend(loc="upper right")
            save(fig, "k_vs_batch.png")

    # 6. reward and accuracy: seed mean with min..max band
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key in zip(axes, ("reward_mean", "accuracy")):
        for v, seeds in runs.items():
            n = min(len(rs) for rs in seeds.values())
            vals = [[rs[i][key] for rs in seeds.values()] for i in range(n)]
            steps = range(1, n + 1)
            ax.plot(steps, [mean(x) for x in vals], color=colors[v], label=v)
            if len(seeds) > 1:
                ax.fill_between(steps, [min(x) for x in vals], [max(x) for x in vals], color=colors[v], alpha=0.15)
        ax.set_xlabel("RL step")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "reward.png")
    return written


def report(out: Path) -> Path:
    cfg, runs = load(out)
    pngs = plots(cfg, runs, Path(out) / "plots")
    steps = {v: min(len(rs) for rs in seeds.values()) for v, seeds in runs.items()}
    cmd = " ".join(["python -m respec.lab.experiment --out", str(out), "--steps", str(cfg["steps"]), "--seeds",
                    ",".join(map(str, cfg["seeds"])), "--variants", ",".join(cfg["variants"])]
                   + (["--respec-async", "on"] if cfg.get("respec_async") == "on" else [])
                   + (["--", *cfg["train_args"]] if cfg["train_args"] else []))
    text = "\n".join([
        f"## Side by side: {', '.join(runs)}",
        "",
        f"Command: `{cmd}`, then `python -m respec.lab.report {out}`.  ",
        f"Machine: {machine()}.  ",
        f"Experiment started {cfg.get('started', '?')}; report written {time.strftime('%Y-%m-%d %H:%M')}; "
        f"steps per run: {', '.join(f'{v} {n}' for v, n in steps.items())}.",
        "",
        table(cfg, runs),
        "",
        reward_table(runs),
        "",
        *([later, ""] if (later := later_epochs(runs)) else []),
        *[f"![{p.stem}](plots/{p.name})" for p in pngs],
        "",
    ])
    path = Path(out) / "BENCHMARKS.md"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m respec.lab.report EXPERIMENT_DIR", file=sys.stderr)
        return 2
    try:
        path = report(Path(argv[0]))
    except ValueError as e:
        print(f"respec.lab.report: error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
