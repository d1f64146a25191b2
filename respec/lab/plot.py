"""Plots of training runs from their metrics.jsonl.

    python -m respec.lab.plot RUN_DIR                                  # writes RUN_DIR/plots/*.png
    python -m respec.lab.plot --compare RUN_A RUN_B ... --out cmp.png  # several runs side by side

One run's figures are respec/run_plots.py's (train.py draws them when a run ends). The comparison:
measured accept_len, its estimate, and reward over RL steps, one colour per run (the run
directory's name).
"""

from __future__ import annotations

import sys
from pathlib import Path

from respec.run_plots import mean, measured_acceptance, plot_run, read_metrics


def acceptance_pairs(rows: list[dict]) -> list[tuple[list[float], list[float], float, float]]:
    """(estimated alpha, measured alpha, estimated accept_len, measured accept_len) for every rollout
    that speculated with the drafter version an estimate was computed for (paired by version, so
    synchronous and background updates pair alike)."""
    measured = {r["drafter_version"]: r for r in rows if r.get("alpha_measured")}
    out = []
    for r in rows:
        m = measured.get(r.get("alpha_est_version"))
        if "alpha_est" in r and m is not None:
            out.append((r["alpha_est"], m["alpha_measured"], r["accept_est"], m["accept_len"]))
    return out


def correlation(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def summary_table(run_dirs: list[Path], first: int = 5) -> str:
    """A Markdown table per run: accept_len and reward at the start and the end, the estimate's
    agreement with the measurement, and the drafter's cost per step."""
    head = ("| run | steps | accept_len first {n} -> last {n} | estimate first {n} -> last {n} | alpha_1 est vs "
            "measured: corr, mean gap | reward first {n} -> last {n} | step s | drafter s on the step |").format(n=first)
    lines = [head, "|" + "---|" * 8]
    for run in run_dirs:
        rows = read_metrics(run)
        acc = [r["accept_len"] for r in rows if r.get("accept_len")]
        est = [r["accept_est"] for r in rows if "accept_est" in r]
        pairs = acceptance_pairs(rows)
        a_est, a_meas = [p[0][0] for p in pairs], [p[1][0] for p in pairs]
        agreement = (f"{correlation(a_est, a_meas):.2f}, {mean([e - m for e, m in zip(a_est, a_meas)]):+.3f} "
                     f"({len(pairs)} steps)") if len(pairs) > 2 else "-"
        rewards = [r["reward_mean"] for r in rows]
        fmt = lambda xs: f"{mean(xs[:first]):.3f} -> {mean(xs[-first:]):.3f}" if xs else "-"  # noqa: E731
        lines.append(f"| {Path(run).name} | {len(rows)} | {fmt(acc)} | {fmt(est)} | {agreement} | {fmt(rewards)} | "
                     f"{mean([r['step_s'] for r in rows]):.2f} | {mean([r['drafter_s'] for r in rows]):.2f} |")
    return "\n".join(lines)


def plot_compare(run_dirs: list[Path], out: Path) -> Path:
    """accept_len (measured, solid; estimated, dashed) and reward per RL step for several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, rew) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(run_dirs):
        rows, color = read_metrics(run), f"C{i}"
        measured = measured_acceptance(rows)
        if measured:
            acc.plot(*zip(*measured), color=color, marker="o", ms=3, label=f"{Path(run).name}")
        est = [(r["step"], r["accept_est"]) for r in rows if "accept_est" in r]
        if est:
            acc.plot(*zip(*est), color=color, ls="--", label=f"{Path(run).name} (estimate)")
        rew.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], color=color, marker="o", ms=3,
                 label=Path(run).name)
    for ax, ylabel in ((acc, "accept_len (tokens per verify step)"), (rew, "mean reward")):
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    compare = argv[:1] == ["--compare"] and len(argv) >= 4 and argv[-2] == "--out"
    if not compare and (len(argv) != 1 or argv[0].startswith("-")):
        print("usage: python -m respec.lab.plot RUN_DIR | --compare RUN_DIR [RUN_DIR ...] --out FILE.png", file=sys.stderr)
        return 2
    try:
        if compare:
            out = Path(argv[-1])
            if out.exists():
                raise ValueError(f"{out} exists; refusing to overwrite it")
            runs = [Path(a) for a in argv[1:-2]]
            paths = [plot_compare(runs, out)]
            print(summary_table(runs))
        else:
            paths = plot_run(Path(argv[0]))
    except ValueError as e:
        print(f"respec.lab.plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
