"""Plots of a training run from its metrics.jsonl.

    python -m respec.plot RUN_DIR      # writes RUN_DIR/plots/*.png

Four figures: reward and accuracy per step; the step's phase times (rollout, reward, train,
drafter); rollout tokens/s with the fraction of decoding steps that speculated; acceptance length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
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
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    col = lambda key: [r.get(key, 0.0) for r in rows]  # noqa: E731
    written = []

    def finish(fig, ax, name, ylabel):
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, col("reward_mean"), marker="o", label="reward (mean)")
    ax.plot(steps, col("accuracy"), marker="s", label="accuracy")
    ax.plot(steps, col("format_rate"), marker="^", alpha=0.6, label="'Answer:' line written")
    finish(fig, ax, "reward.png", "per completion")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(rows)
    for key, label in (("rollout_s", "rollout"), ("reward_s", "reward"), ("train_s", "train"), ("drafter_s", "drafter")):
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
    ax.plot(steps, col("accept_len"), marker="o", label="measured accept_len (tokens per verify)")
    if any("accept_est" in r for r in rows):
        ax.plot(steps, col("accept_est"), marker="x", label="estimated (1 - TV)")
    finish(fig, ax, "acceptance.png", "tokens per verify step")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m respec.plot RUN_DIR", file=sys.stderr)
        return 2
    try:
        paths = plot_run(Path(argv[0]))
    except ValueError as e:
        print(f"respec.plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
