"""A run directory's files read back, and the run's own plots (train.py draws them when a run ends).

    read_metrics(run) / read_evaluations(run)    metrics.jsonl's RL steps / held-out evaluations
    plot_run(run)                                RUN_DIR/plots/*.png

Six figures per run: reward and accuracy per step; the step's phase times (rollout, reward, train,
weight sync, drafter); rollout tokens/s with the fraction of decoding steps that speculated;
acceptance length, measured and estimated (from the drafter's online distillation: 1 - TV, or a
draw under the match rule); the rollout/training mismatch (`mismatch_kl`, plain-decoding and
SD-verify tokens apart); groups with signal per step and per data epoch (a fixed `--train-size` set),
with the share of rollout tokens that came from replayed drafts (`replay_token_frac`). Comparisons
of several runs are the lab's (respec/lab/plot.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from respec import storage


def read_metrics(run_dir: Path) -> list[dict]:
    """The RL steps' rows of metrics.jsonl (without the evaluation before the first step, `--eval-at-start`)."""
    return [r for r in read_lines(run_dir) if r["step"] > 0]


def read_evaluations(run_dir: Path) -> list[dict]:
    """The held-out evaluations of a run (step 0: before the first update)."""
    return [r for r in read_lines(run_dir) if "eval_accuracy" in r]


def read_lines(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl (not a training run directory)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    with storage.writing(out):
        out.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    col = lambda key: [r.get(key, 0.0) for r in rows]  # noqa: E731
    written = []

    def finish(fig, ax, name, ylabel):
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a run that never speculated has no acceptance curve)
            ax.legend()
        fig.tight_layout()
        path = out / name
        try:
            with storage.writing(path):  # (a full disk: one line, not matplotlib's traceback)
                fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, col("reward_mean"), marker="o", label="reward (mean)")
    ax.plot(steps, col("accuracy"), marker="s", label="accuracy")
    ax.plot(steps, col("format_rate"), marker="^", alpha=0.6, label="'Answer:' line written")
    evaluated = read_evaluations(run_dir)  # --eval-every / --eval-at-start: the held-out set
    if evaluated:
        ax.plot([r["step"] for r in evaluated], [r["eval_accuracy"] for r in evaluated], marker="D", color="black",
                label="held-out pass@1")
        passes = [(r["step"], v, key) for r in evaluated for key, v in r.items() if key.startswith("eval_pass_at_")]
        if passes:
            ax.plot([p[0] for p in passes], [p[1] for p in passes], marker="D", color="grey",
                    label=f"held-out pass@{passes[0][2].rsplit('_', 1)[1]}")
    finish(fig, ax, "reward.png", "per completion")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(rows)
    for key, label in (("rollout_s", "rollout"), ("reward_s", "reward"), ("train_s", "train"), ("sync_s", "weight sync"),
                       ("drafter_s", "drafter")):
        vals = col(key)
        ax.bar(steps, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    finish(fig, ax, "phases.png", "seconds per step")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, col("rollout_tok_s"), marker="o", label="rollout tokens/s")
    ax2 = ax.twinx()
    ax2.plot(steps, col("sd_fraction"), color="tab:orange", marker="x", label="SD fraction of decode steps")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("SD fraction")
    ax2.legend(loc="lower right")
    finish(fig, ax, "throughput.png", "tokens/s")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    measured = measured_acceptance(rows)
    if measured:
        ax.plot(*zip(*measured), marker="o", linestyle="", label="measured accept_len (steps that speculated)")
    est = [(r["step"], r["accept_est"]) for r in rows if "accept_est" in r]
    if est:
        ax.plot(*zip(*est), marker="x", label="estimated (online distillation, at the largest k)")
    finish(fig, ax, "acceptance.png", "tokens per verify step")

    fig, ax = plt.subplots(figsize=(6, 3.5))  # the rollout/training mismatch (respec/mismatch.py)
    for suffix, label in (("", "all tokens"), ("_decode", "plain decoding"), ("_verify", "SD verify")):
        points = [(r["step"], r[f"mismatch_kl{suffix}"]) for r in rows if r.get(f"mismatch_kl{suffix}", 0) > 0]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"KL(rollout || train), {label}")
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("log")
    finish(fig, ax, "mismatch.png", "k3 estimate per token (nats)")

    fig, ax = plt.subplots(figsize=(6, 3.5))  # what noise reuse does to a fixed set (respec/rollout_seeds.py)
    ax.plot(steps, col("groups_with_signal"), marker=".", alpha=0.5, label="groups with signal")
    epochs = epoch_means(rows, "groups_with_signal")
    if len(epochs) > 1:
        ax.plot(*zip(*epochs), marker="s", color="black", label="groups with signal, epoch mean")
    if any(r.get("replay_token_frac") for r in rows):
        ax.plot(steps, col("replay_token_frac"), marker="x", color="tab:green", label="replay_token_frac")
    ax.set_ylim(0, 1.05)
    finish(fig, ax, "epochs.png", "share")
    return written


def epoch_means(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """(mean step, mean of `key`) per data epoch of a fixed training set (an endless task's steps are
    all in epoch 0: one point)."""
    epochs: dict[int, list[dict]] = {}
    for r in rows:
        epochs.setdefault(r.get("epoch", 0), []).append(r)
    return [(mean(r["step"] for r in rs), mean(r.get(key, 0.0) for r in rs)) for _, rs in sorted(epochs.items())]


def measured_acceptance(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, accept_len) of the steps whose rollout speculated; the others verified nothing, so
    they have no acceptance to draw (not 0 tokens per verify)."""
    return [(r["step"], r["accept_len"]) for r in rows if r.get("sd_fraction", 0) > 0]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
