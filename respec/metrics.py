"""A GRPO step's metrics in one place: this rank's sums over its episodes and its rollout's engine
statistics, summed over ranks, the figures derived from them, the log line, and the writers
(RUN_DIR/metrics.jsonl, one JSON object per step, and TensorBoard events beside it).

The trainer hands over the step's episodes, the engine's statistics, the update's metrics and the
phase timings; every name that scripts rely on (metrics.jsonl's fields) is made here.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from respec import distributed, storage
from respec.engine import EngineStats
from respec.solver import Tally, conditional_acceptance
from respec.tasks import extract_answer

KINDS = ("model", "history", "replay")  # a hybrid drafter's rows, by the proposer that drafted them


@dataclass
class StepInputs:
    """What a step's metrics are made of, besides its episodes and the engine's statistics."""
    step: int  # 1-based, the step just finished
    group: int  # G
    k: int  # the largest draft length (one acceptance entry per position)
    reward_names: list[str]
    timings: dict  # rollout_s, reward_s, train_s (the update alone), sync_s, drafter_s (this rank's), step_s
    update: dict  # respec/update.py's metrics
    lr: float
    epoch: int  # the data epoch of the step's first prompt (0 on an endless task)
    drafter_version: int  # the drafter weights the rollout drafted with
    replay_rows: int | None  # rows that had a replay to draft from (None: no replay drafter)
    replay_store_bytes: int = 0
    kd: dict | None = None  # a finished drafter update's figures
    flops_per_token: tuple[float, float] = (0.0, 0.0)  # (body, output head) model FLOPs per trained token
    peak_flops: float = 1.0  # the devices' peak FLOP/s summed over ranks (the MFU's denominator, peak_flops())
    solver: Tally | None = None  # the adaptive solver's prediction against the rollout's verifies (None: no solver)


def rank_sums(episodes, stats: EngineStats, inputs: StepInputs) -> dict:
    """This rank's share of the step's counts, summed over ranks by name (every rank has the same names)."""
    per_pos = lambda counts: (counts + [0] * inputs.k)[:inputs.k]  # noqa: E731  one entry per draft position
    G = inputs.group
    rewards = [e.score.reward for e in episodes]
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
    return {
        "n": len(episodes), "r_sum": sum(rewards), "r_sq": sum(r * r for r in rewards),
        "correct": sum(e.score.correct >= 1.0 for e in episodes), "formatted": sum(e.score.formatted for e in episodes),
        "resp_tokens": sum(len(e.completion.token_ids) for e in episodes),
        "truncated": sum(e.truncated for e in episodes),
        "signal": sum(len(set(g)) > 1 for g in groups), "generated": stats.generated_tokens,
        **{f"rsum/{name}": sum(v for e in episodes if not math.isnan(v := e.score.parts[name]))
           for name in inputs.reward_names},
        **{f"rn/{name}": sum(not math.isnan(e.score.parts[name]) for e in episodes) for name in inputs.reward_names},
        "replay_rows": inputs.replay_rows or 0,
        **{f"kind/{kind}/{f}": stats.sd_kinds.get(kind, {}).get(f, 0) for kind in KINDS
           for f in ("rows", "emitted", "accepted")},
        "dsteps": len(stats.chosen_k), "sd_steps": sum(1 for k in stats.chosen_k if k > 0),
        "sd_rows": stats.sd_rows, "sd_emitted": stats.sd_emitted,
        **{f"accepted_{j}": a for j, a in enumerate(per_pos(stats.sd_accepted_at))},
        **{f"reached_{j}": a for j, a in enumerate(per_pos(stats.sd_reached_at))},
        **({"est_predicted": inputs.solver.predicted, "est_emitted": inputs.solver.emitted,
            "est_rows": inputs.solver.rows, "est_saved_s": inputs.solver.saved_s} if inputs.solver is not None else {}),
    }


def step_metrics(sums: dict, stats: EngineStats, inputs: StepInputs, d: distributed.Dist) -> dict:
    """metrics.jsonl's line for the step, from the summed `sums` and this rank's engine trace."""
    t = inputs.timings
    n, r_sum, r_sq, sd_rows = sums["n"], sums["r_sum"], sums["r_sq"], sums["sd_rows"]
    # conditional acceptance per draft position, from the engine's counts summed over ranks
    alpha = conditional_acceptance([sums[f"accepted_{j}"] for j in range(inputs.k)],
                                   [sums[f"reached_{j}"] for j in range(inputs.k)])
    rollout_max, train_max = distributed.all_reduce_max([t["rollout_s"], t["train_s"]], d)  # the slowest rank
    mean = r_sum / n
    upd = inputs.update
    body, head = inputs.flops_per_token
    return {
        "step": inputs.step,
        "reward_mean": round(mean, 4),
        "reward_std": round(math.sqrt(max(r_sq / n - mean ** 2, 0.0)), 4),
        "accuracy": round(sums["correct"] / n, 4),
        "format_rate": round(sums["formatted"] / n, 4),
        "groups_with_signal": round(sums["signal"] / (n / inputs.group), 4),
        "response_len_mean": round(sums["resp_tokens"] / n, 2),
        "truncated_frac": round(sums["truncated"] / n, 4),  # completions cut at --max-new-tokens
        # each reward function's mean (unweighted) over the completions it scored
        **{f"rewards/{name}": round(sums[f"rsum/{name}"] / max(sums[f"rn/{name}"], 1), 4)
           for name in inputs.reward_names},
        **upd,
        "lr": inputs.lr,
        "rollout_s": round(rollout_max, 3),
        "reward_s": round(t["reward_s"], 3),
        "train_s": round(train_max, 3),  # the policy update alone (what the MFU divides by)
        "sync_s": round(t["sync_s"], 3),  # the rollout copy refreshed from the updated actor
        "drafter_s": round(t["drafter_s"], 3),
        "step_s": round(t["step_s"], 3),
        "rollout_tok_s": round(sums["generated"] / max(rollout_max, 1e-9), 2),
        "sd_fraction": round(sums["sd_steps"] / max(sums["dsteps"], 1), 4),
        "accept_len": round(sums["sd_emitted"] / sd_rows, 4) if sd_rows else 0.0,
        "decode_steps": int(sums["dsteps"]),
        # (active batch, chosen k) of every decoding step of this rank's rollout: the long tail
        "k_trace": [[b, k] for b, k in zip(stats.batch_sizes, stats.chosen_k)],
        # conditional acceptance per draft position, measured in this rollout (empty without SD)
        "alpha_measured": [round(a, 4) for a in alpha],
        # what the solver expected of the rows it verified minus what they emitted, tokens per verify
        **({"accept_est_error": round((sums["est_predicted"] - sums["est_emitted"]) / sums["est_rows"], 4)}
           if sums.get("est_rows") else {}),
        # decoding time SD saved in the rollout (negative: cost), per rank, from the cost model and
        # the tokens each verify emitted (respec/solver.py Tally)
        **({"sd_saved_s": round(sums["est_saved_s"] / d.world, 3)} if "est_saved_s" in sums else {}),
        "drafter_version": inputs.drafter_version,
        "epoch": inputs.epoch,
        **replay_metrics(sums, inputs),
        **(inputs.kd or {}),
        "train_mfu": round(6 * (body * upd["trained_tokens"] + head * upd["trained_completion"])
                           / max(train_max, 1e-9) / inputs.peak_flops, 4),
    }


def replay_metrics(sums: dict, inputs: StepInputs) -> dict:
    """Rows per drafter kind and what replay drafts brought (empty without a hybrid or replay)."""
    has_replay = inputs.replay_rows is not None
    always = {"replay"} if has_replay else set()  # reported even when none of its rows verified
    out = {}
    for kind in KINDS:
        rows, emitted = sums[f"kind/{kind}/rows"], sums[f"kind/{kind}/emitted"]
        if not rows and kind not in always:
            continue
        out[f"sd_rows_{kind}"] = int(rows)
        out[f"accept_len_{kind}"] = round(emitted / rows, 4) if rows else 0.0
    if has_replay:
        out["replay_rows"] = int(sums["replay_rows"])  # rows that had a replay to draft from
        out["replay_token_frac"] = round(sums["kind/replay/accepted"] / max(sums["generated"], 1), 4)
        out["replay_tokens_per_verify"] = out.get("accept_len_replay", 0.0)
        out["replay_store_mb"] = round(inputs.replay_store_bytes / 2**20, 3)
    return out


def log_line(m: dict) -> str:
    """The step's one line on stderr."""
    skipped = f" | {m['skipped_updates']} update(s) skipped: non-finite loss" if m["skipped_updates"] else ""
    return (f"step {m['step']:>4}: reward {m['reward_mean']:.3f} acc {m['accuracy']:.3f} "
            f"len {m['response_len_mean']:.0f} | rollout {m['rollout_s']:.1f}s "
            f"({m['rollout_tok_s']:.0f} tok/s, SD {m['sd_fraction']:.0%}, accept {m['accept_len']:.2f}) "
            f"train {m['train_s']:.1f}s (MFU {m['train_mfu']:.1%}){skipped}"
            + (f" | held-out acc {m['eval_accuracy']:.3f}" if "eval_accuracy" in m else ""))


TRACKERS = ("tensorboard", "wandb", "trackio")  # --report-to (TRL's report_to), besides metrics.jsonl


def trackers(report_to: list[str]) -> list[str]:
    """The trackers `--report-to` names ("all": tensorboard and whichever of wandb and trackio are
    installed; "none": none); raises ValueError for an unknown one or a package that is missing."""
    import importlib.util

    names = [n.strip().lower() for item in report_to for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
    if unknown:
        raise ValueError(f"--report-to {unknown[0]}: choose from {', '.join(TRACKERS)}, all or none")
    installed = {n: importlib.util.find_spec(n) is not None for n in TRACKERS}
    if "all" in names:
        return [n for n in TRACKERS if installed[n]]
    chosen = list(dict.fromkeys(n for n in names if n != "none"))
    for n in chosen:
        if not installed[n]:
            raise ValueError(f"--report-to {n} needs the {n} package (pip install {n}"
                             + ("; respec logs offline, without an account)" if n == "wandb" else ")"))
    return chosen


class MetricsLog:
    """RUN_DIR/metrics.jsonl, written by the main rank, and the trackers of `--report-to`: TensorBoard
    events (RUN_DIR/tensorboard), a Weights & Biases run (offline, its files under RUN_DIR/wandb, for
    `wandb sync`; WANDB_MODE=online logs to the service) or a trackio run (a local project), numbers
    at the RL step, and the completions as a table where the tracker has tables."""

    def __init__(self, run_dir: Path, *, main: bool, report_to: list[str] = ("tensorboard",),
                 config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.main = main
        self.board = None
        self.runs = []  # (the tracker's module, for its Table; its run: log(dict, step=), finish())
        if not main:
            return
        chosen = trackers(list(report_to))
        if "tensorboard" in chosen:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        name = Path(run_dir).name
        if "wandb" in chosen:
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")  # local files unless the user asks for the service
            self.runs.append((wandb, wandb.init(project="respec", name=name, id=name, dir=str(run_dir), config=config,
                                                resume="allow", mode=mode)))
        if "trackio" in chosen:
            import trackio

            trackio.init(project="respec", name=name, config=config, resume="allow")
            self.runs.append((trackio, trackio))

    def write(self, m: dict) -> None:
        if not self.main:
            return
        storage.append_lines(self.path, [json.dumps(m)])
        numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.board is not None:
            with storage.writing(Path(self.board.log_dir)):
                for key, value in numbers.items():
                    self.board.add_scalar(key, value, m["step"])
                self.board.flush()
        for _, run in self.runs:
            run.log(numbers, step=m["step"])

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """Rows (dicts with the same keys) as a table, where the tracker has tables (W&B, trackio);
        values that are not numbers or strings are written as JSON."""
        if not rows or not self.runs:
            return
        columns = list(rows[0])
        data = [[v if isinstance(v, (int, float, str)) or v is None else json.dumps(v) for v in (r[c] for c in columns)]
                for r in rows]
        for module, run in self.runs:
            run.log({name: module.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
        for _, run in self.runs:
            run.finish()
        self.runs = []


def write_completions(path: Path, episodes, step: int, keep: str, d: distributed.Dist,
                      log: MetricsLog | None = None) -> None:
    """The step's completions with their rewards, appended to RUN_DIR/completions.jsonl by the main
    rank (`--log-completions`: all, none, or the first N of the step in global order), and as a
    table to the trackers of `log` that have tables."""
    if keep == "none":
        return
    rows = [{"step": step, "prompt_index": e.prompt_index, "sample": e.sample,
             "prompt": e.problem.messages(), "completion": e.text, "answer": e.problem.answer,
             "extracted": extract_answer(e.text), "reward": round(e.score.reward, 4),
             "rewards": {k: None if math.isnan(v) else round(v, 4) for k, v in e.score.parts.items()},
             "finish_reason": e.completion.finish_reason, "tokens": len(e.completion.token_ids)}
            for e in episodes]
    gathered = distributed.gather_to_main(rows, d)
    if gathered is None:
        return
    rows = sorted((r for part in gathered for r in part), key=lambda r: (r["prompt_index"], r["sample"]))
    if keep != "all":
        rows = rows[:int(keep)]
    storage.append_lines(path, [json.dumps(r) for r in rows])
    if log is not None:
        log.table("completions", rows, step)


def forget_after(paths: list[Path], step: int) -> None:
    """Drop the lines of steps after `step` from JSON-lines files (metrics, completions): a run
    killed between checkpoints redoes those steps; a line cut short by the kill goes too. Each file
    is rewritten aside and swapped in."""
    for path in paths:
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if (n := _step_of(line)) is not None and n <= step]
            storage.write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------
# The MFU's denominator: what this process's device can do at most, and where that figure came from.

# Dense tensor-core peaks in TFLOP/s (vendor datasheet, dense: NVIDIA's datasheets list most figures
# with 2:4 structured sparsity, marked with an asterisk, which are twice these): (pattern matched in
# torch.cuda.get_device_name(), bf16, tf32, fp32 without tensor cores). Most specific pattern first:
# "GH200" holds "H200", "L40S" holds "L4". bf16 with fp32 accumulation, as torch's matmuls use (a
# GeForce card does twice that with fp16 accumulation). The A10G (AWS) has no public datasheet:
# it is timed, as any GPU not listed.
GPU_PEAKS_TFLOPS = (
    (r"GB200", 2500.0, 1250.0, 80.0),
    (r"B200", 2250.0, 1100.0, 75.0),
    (r"GH200", 989.4, 494.7, 67.0),
    (r"H200 NVL", 835.5, 417.5, 60.0),
    (r"H200", 989.4, 494.7, 67.0),  # SXM
    (r"H100 NVL", 835.5, 417.5, 60.0),
    (r"H100 PCIe", 756.5, 378.0, 51.0),
    (r"H100", 989.4, 494.7, 67.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0, 156.0, 19.5),  # SXM4 and PCIe, 40 and 80 GB
    (r"L40S", 362.05, 183.0, 91.6),
    (r"L40\b", 181.05, 90.5, 90.5),
    (r"\bL4\b", 121.0, 60.0, 30.3),
    (r"\bA40\b", 149.7, 74.8, 37.4),
    (r"\bA10\b", 125.0, 62.5, 31.2),
    (r"RTX 4090", 165.2, 82.6, 82.6),
    (r"RTX 3090", 71.0, 35.6, 35.6),
)


def datasheet_peak(name: str, dtype: torch.dtype, *, tf32: bool = True) -> tuple[float, str] | None:
    """(FLOP/s, source) of the GPU called `name` in `dtype` from GPU_PEAKS_TFLOPS: bf16, or fp32 on
    TF32 tensor cores where `tf32` (torch's matmul precision "high", which respec sets on CUDA),
    else plain fp32. None for a GPU not in the table or a dtype it does not list."""
    for pattern, bf16, tf32_peak, fp32 in GPU_PEAKS_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype == torch.bfloat16:
                tflops, kind = bf16, "bf16"
            elif dtype == torch.float32:
                tflops, kind = (tf32_peak, "tf32") if tf32 else (fp32, "fp32")
            else:
                return None
            return tflops * 1e12, f"{name}, dense {kind}, vendor datasheet"
    return None


def timed_matmul(n: int, dtype: torch.dtype, device: torch.device, *, reps: int = 3) -> float:
    """FLOP/s of the best of `reps` (n x n) @ (n x n) products in `dtype` after one untimed one
    (CUDA events on a GPU: the device's own clock)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return 2 * n ** 3 / best


def peak_flops(dtype: torch.dtype, device: torch.device) -> tuple[float, str]:
    """(FLOP/s, source): the most this process's device does in `dtype`, the train phase's MFU
    denominator. A GPU in the table: its datasheet figure (a measured matmul falls short of it, and
    an MFU against the measurement would flatter the run by as much). Another GPU: a timed 8192^3
    matmul, large enough to fill it. A CPU has no such figure: a timed 1024^3 GEMM, which reaches the
    same rate as a 2048^3 one on a few cores in an eighth of the time (its cores are shared with
    whatever else runs, so the figure moves between runs)."""
    if device.type == "cuda":
        found = datasheet_peak(torch.cuda.get_device_name(device), dtype,
                               tf32=torch.get_float32_matmul_precision() != "highest")
        if found is not None:
            return found
        return timed_matmul(8192, dtype, device), "timed 8192^3 matmul"
    return timed_matmul(1024, dtype, device), "timed 1024^3 CPU GEMM"
