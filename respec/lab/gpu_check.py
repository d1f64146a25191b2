"""The prepared GPU check: one command that runs and measures respec's CUDA path.

    python -m respec.lab.gpu_check --out gpu-check            # on a CUDA machine, ~5 minutes
    python -m respec.lab.gpu_check --out /tmp/c --quick       # the same stages on the tiny model (any machine)

It writes everything into `--out` (at most 8 files):
  check.log           every stage's command and output
  summary.json / .md  what was measured, and each goal met or not
  bench-*.json        the `generate.py --bench` reports
  grpo-metrics.jsonl  the GRPO run's per-step metrics
  inductor-cache.tgz  the compile cache, if small: unpack it into $RESPEC_CACHE to rerun warm

The stages, in order (each a subprocess with its own time limit; a failed or skipped stage is
recorded and the next one runs):
  1. tests/test_cuda.py (logits and generation against transformers, CUDA graphs against eager,
     SD losslessness, the trainer's resume; two ranks where two GPUs exist);
  2. `generate.py --bench`, plain against transformers' `generate` (greedy, the same weights) and
     SD with the history drafter: SmolLM2-135M-shaped at batch 1, 8, 64, Qwen2.5-0.5B-shaped at
     batch 1, 8, and Qwen2.5-1.5B-shaped at batch 1 against the weight-read roofline;
  3. the solver's cost profile on this GPU, and the batch size where SD stops paying;
  4. GRPO under `torchrun --nproc_per_node=1` in ReSpec mode (adaptive SD, online distillation in
     the background), a checkpoint, and a resume;
  5. the logs searched for "skipping cudagraphs" (every stage runs with TORCH_LOGS=perf_hints).

Random weights at real shapes throughout: the machine this is made for has no model hub, and
SmolLM2's GGUF (98 MB) is too large to send along. Their tokenizer is SmolLM2's: set
RESPEC_TOKENIZER to a directory holding its tokenizer files where the GGUF package is not installed.
Prompts come from the built-in toy-letters task (no reasoning-gym needed). With random weights the
history drafter sees greedy text that loops, so its acceptance is an upper bound on what a real
model's text gives: the SD rows measure the mechanics (draft, verify, roll back), not a drafter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDAGRAPH_SKIP = "skipping cudagraphs"


def bench_runs(quick: bool) -> list[dict]:
    """(name, generate.py arguments, what its figures are compared with)."""
    if quick:
        return [{"name": "tiny", "args": ["--model", "tiny", "--batch-sizes", "1,2", "--new-tokens", "8",
                                          "--drafter", "history", "--k", "3"]}]
    return [
        {"name": "smollm2-135m", "args": ["--model", "random-smollm2-135m", "--batch-sizes", "1,8,64",
                                          "--new-tokens", "128", "--drafter", "history", "--k", "3"], "goal_x_hf": 3.0},
        {"name": "qwen2.5-0.5b", "args": ["--model", "random-qwen2.5-0.5b", "--batch-sizes", "1,8",
                                          "--new-tokens", "128"], "goal_x_hf": 3.0},
        {"name": "qwen2.5-1.5b", "args": ["--model", "random-qwen2.5-1.5b", "--batch-sizes", "1",
                                          "--new-tokens", "64"], "goal_x_roofline": 3.0},
    ]


class Check:
    def __init__(self, out: Path, budget_s: float, quick: bool, device: str):
        self.out, self.quick, self.device = out, quick, device
        self.deadline = time.monotonic() + budget_s
        self.log = open(out / "check.log", "a", buffering=1)
        self.summary: dict = {"stages": {}}
        self.env = {**os.environ, "TORCH_LOGS": "perf_hints", "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stage: str, cmd: list[str], limit_s: float) -> subprocess.CompletedProcess | None:
        """Run `cmd` with at most `limit_s` (and what is left of the budget); its output goes to the log."""
        limit = min(limit_s, self.left())
        if limit < 20:
            self.summary["stages"][stage] = {"status": "not run: out of time"}
            return None
        self.log.write(f"\n===== {stage}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            self.log.write((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
            self.log.write((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
            self.summary["stages"][stage] = {"status": f"timed out after {limit:.0f} s"}
            return None
        self.log.write(proc.stdout + proc.stderr)
        seconds = round(time.monotonic() - t0, 1)
        skips = (proc.stdout + proc.stderr).count(CUDAGRAPH_SKIP)
        self.summary["stages"][stage] = {"status": "ok" if proc.returncode == 0 else f"failed ({proc.returncode})",
                                         "seconds": seconds, "cudagraph_skips": skips}
        return proc

    # ------------------------------------------------------------------------------------------
    def environment(self) -> None:
        import torch
        import transformers

        env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
               "device": self.device}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "gpus": torch.cuda.device_count()}
        self.summary["environment"] = env

    def tests(self) -> None:
        proc = self.run("cuda tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       "tests/test_cuda.py"], 150)
        if proc is not None:
            tail = (proc.stdout.strip().splitlines() or [""])[-1]
            self.summary["stages"]["cuda tests"]["result"] = tail

    def bench(self) -> None:
        self.summary["bench"] = {}
        for run in bench_runs(self.quick):
            path = self.out / f"bench-{run['name']}.json"
            cmd = [sys.executable, "generate.py", "--bench", "--task", "toy-letters", "--device", self.device,
                   *run["args"], "--json", str(path)]
            if self.quick:
                cmd.append("--eager")
            self.run(f"bench {run['name']}", cmd, 150)
            if path.is_file():
                report = json.loads(path.read_text())
                self.summary["bench"][run["name"]] = {"goal_x_hf": run.get("goal_x_hf"),
                                                      "goal_x_roofline": run.get("goal_x_roofline"),
                                                      "compile_s": report["compile_s"], "rows": report["results"]}

    def costs(self) -> None:
        proc = self.run("cost profile", [sys.executable, "-m", "respec.lab.gpu_check", "--costs-only", "--device",
                                         self.device] + (["--quick"] if self.quick else []), 120)
        if proc is not None and proc.returncode == 0:
            self.summary["costs"] = json.loads(proc.stdout.strip().splitlines()[-1])

    def grpo(self) -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="grpo-")) / "run"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", "train.py"]
        args = ["--model", "tiny", "--task", "toy-letters", "--prompts", "2", "--group", "4", "--max-new-tokens", "32",
                "--sd", "adaptive", "--drafter", "random", "--k", "2", "--drafter-batch", "8", "--no-progress"]
        first = self.run("grpo", [*torchrun, *args, "--steps", "2", "--checkpoint-every", "2", "--out", str(run_dir)],
                         150)
        if first is None or first.returncode != 0:
            return
        self.run("grpo resume", [*torchrun, "--resume", str(run_dir), "--steps", "3", "--no-progress"], 90)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            (self.out / "grpo-metrics.jsonl").write_text(metrics.read_text())
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            keys = ("step", "rollout_s", "train_s", "drafter_s", "rollout_tok_s", "sd_fraction", "accept_len",
                    "reward_mean")
            self.summary["grpo"] = [{k: r.get(k) for k in keys} for r in rows]

    def pack_cache(self, limit_bytes: int = 48 << 20) -> None:
        """The inductor cache of this run, for a warm rerun (if it fits what comes back from a call)."""
        from models.loading import cache_dir

        cache = cache_dir() / "inductor"
        if not cache.is_dir():
            return
        path = self.out / "inductor-cache.tgz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(cache, arcname="inductor")
        if path.stat().st_size > limit_bytes:
            path.unlink()
            self.summary["inductor_cache"] = "too large to keep"
        else:
            self.summary["inductor_cache"] = f"{path.name} ({path.stat().st_size >> 20} MiB)"

    # ------------------------------------------------------------------------------------------
    def finish(self) -> None:
        skips = sum(s.get("cudagraph_skips", 0) for s in self.summary["stages"].values())
        self.summary["cudagraph_skips"] = skips
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        (self.out / "summary.md").write_text(render(self.summary))
        self.log.close()


def render(summary: dict) -> str:
    """summary.json as a short Markdown report, goals included."""
    env = summary.get("environment", {})
    lines = [f"# GPU check: {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, Python {env.get('python')}", "", "## Stages", "",
             "| stage | status | seconds | 'skipping cudagraphs' lines |", "|---|---|---:|---:|"]
    for name, s in summary["stages"].items():
        lines.append(f"| {name} | {s['status']}{' - ' + s['result'] if s.get('result') else ''} | "
                     f"{s.get('seconds', '-')} | {s.get('cudagraph_skips', '-')} |")
    for name, b in summary.get("bench", {}).items():
        lines += ["", f"## generate.py --bench, {name} (random weights), compile {b['compile_s']} s", "",
                  "| batch | respec tok/s | transformers tok/s | x transformers | step ms | roofline ms | x roofline "
                  "| same tokens | SD tok/s | SD x plain | accept len |", "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in b["rows"]:
            x_hf = r["respec_tok_s"] / r["hf_tok_s"] if r.get("hf_tok_s") else None
            x_roof = r["step_ms"] / r["roofline_ms"]
            sd = r.get("sd_tok_s")
            sd_x = f"{sd / r['respec_tok_s']:.2f}x" if sd else "-"
            lines.append(f"| {r['batch']} | {r['respec_tok_s']:.0f} | {r.get('hf_tok_s', '-')} | "
                         f"{'-' if x_hf is None else f'{x_hf:.2f}x'} | {r['step_ms']:.2f} | {r['roofline_ms']:.3f} | "
                         f"{x_roof:.1f}x | {r.get('same_tokens_as_hf', '-')} | {sd if sd else '-'} | "
                         f"{sd_x} | {r.get('accept_len', '-')} |")
        goal = b.get("goal_x_hf")
        if goal:
            worst = min((r["respec_tok_s"] / r["hf_tok_s"] for r in b["rows"] if r["batch"] in (1, 8) and r.get("hf_tok_s")),
                        default=None)
            if worst is not None:
                lines.append(f"\nGoal >= {goal}x transformers at batch 1 and 8: {'met' if worst >= goal else 'NOT met'} "
                             f"(worst {worst:.2f}x)")
        goal = b.get("goal_x_roofline")
        if goal:
            r = b["rows"][0]
            x = r["step_ms"] / r["roofline_ms"]
            lines.append(f"\nGoal: decode step within {goal}x of the roofline at batch {r['batch']}: "
                         f"{'met' if x <= goal else 'NOT met'} ({x:.1f}x)")
    if "costs" in summary:
        c = summary["costs"]
        lines += ["", "## Cost model fitted on this device", "", f"coefficients (s): {c['coef']}, median fit error "
                  f"{c['rel_error']:.1%}", "", "| acceptance per draft | largest batch where SD pays (k) |", "|---:|---|"]
        lines += [f"| {a} | {c['sd_pays_up_to'][a]} |" for a in c["sd_pays_up_to"]]
    if "grpo" in summary:
        lines += ["", "## GRPO (tiny model, ReSpec mode, torchrun --nproc_per_node=1)", "",
                  "| step | rollout s | train s | drafter s | rollout tok/s | SD steps | accept len |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in summary["grpo"]:
            lines.append(f"| {r['step']} | {r['rollout_s']} | {r['train_s']} | {r['drafter_s']} | {r['rollout_tok_s']} | "
                         f"{r['sd_fraction']} | {r['accept_len']} |")
    lines += ["", f"'skipping cudagraphs' in the logs: {summary.get('cudagraph_skips', '-')} line(s)",
              f"inductor cache: {summary.get('inductor_cache', '-')}", ""]
    return "\n".join(lines)


def profile_costs_here(device: str, quick: bool) -> dict:
    """The solver's cost model for the SmolLM2-shaped target with the history drafter on `device`,
    and for a few acceptance rates the largest batch size at which the policy still speculates."""
    from models.loading import cache_dir, load_model
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine
    from respec.solver import AdaptiveK, cost_key, load_or_profile

    spec = "tiny" if quick else "random-smollm2-135m"
    model = load_model(spec, device=device)
    engine = RolloutEngine(model, kv_cache_bytes=1 << 30, max_batch=64, drafter=HistoryDrafter(), num_draft_tokens=3,
                           eager=quick)
    batches, ks = ((1, 2), (0, 1, 3)) if quick else ((1, 8, 64), (0, 1, 3))
    engine.warmup(list(batches), ks=list(ks), progress=False)
    key = cost_key(spec, engine.drafter.describe(), engine)
    costs, _ = load_or_profile(engine, key, cache_dir() / "costs" / f"{key}.json", batch_sizes=batches, ks=ks,
                               contexts=(64, 192), progress=False)
    pays = {}
    for a in (0.3, 0.5, 0.7, 0.9):
        policy = AdaptiveK(costs, 3, [a] * 3)
        chosen = [(b, policy.choose(b, 128)) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
        on = [(b, k) for b, k in chosen if k > 0]
        pays[str(a)] = f"{on[-1][0]} (k={on[-1][1]})" if on else "never"
    return {"coef": [round(c, 6) for c in costs.coef], "rel_error": costs.rel_error, "sd_pays_up_to": pays}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m respec.lab.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for everything the check writes (must not exist)")
    p.add_argument("--budget-s", type=float, default=290, help="wall-clock budget of the whole check")
    p.add_argument("--quick", action="store_true", help="the tiny model everywhere, eager (a smoke run on any machine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--costs-only", action="store_true", help=argparse.SUPPRESS)  # stage 3, run in a subprocess
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.costs_only:
        print(json.dumps(profile_costs_here(device, args.quick)))
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.out.exists():
        print(f"{args.out} exists; refusing to overwrite it", file=sys.stderr)
        return 2
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU is available (run with --quick --device cpu for a smoke run)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True)
    check = Check(args.out, args.budget_s, args.quick, device)
    t0 = time.monotonic()
    check.environment()
    for stage in (check.tests, check.bench, check.costs, check.grpo):
        try:
            stage()
        except Exception as e:  # noqa: BLE001 - recorded, and the next stage runs
            check.summary["stages"][stage.__name__] = {"status": f"error: {type(e).__name__}: {e}"}
    check.pack_cache()
    check.summary["seconds"] = round(time.monotonic() - t0, 1)
    check.finish()
    print((args.out / "summary.md").read_text())
    failed = [n for n, s in check.summary["stages"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
