"""The prepared GPU check: two commands that run and measure respec's CUDA path on a lent GPU.

    python -m respec.lab.gpu_check --part a --out DIR     # smoke, CUDA tests, the bench against transformers
    python -m respec.lab.gpu_check --part b --out DIR     # smoke, GRPO with FSDP2 and a resume, cost profile, larger shapes
    python -m respec.lab.gpu_check --part c --out DIR     # GRPO on the real model: SD off against ReSpec
    python -m respec.lab.gpu_check --part a --out DIR --quick --device cpu     # the same stages on the tiny model

Made for the machine it is lent on: a bare GPU box with torch and transformers but no model hub,
no GGUF package and no reasoning-gym, 10 minutes a command, 15 minutes in all, at most 8 files of
16 MiB coming back. So:
  * Everything it needs travels with the repository: random weights at real shapes (the models/
    presets), SmolLM2's tokenizer from models/tokenizers/smollm2, prompts from the built-in
    toy-letters task. A missing piece is named in one line in the first seconds (`preflight`).
    (The real model travels apart, in chunks: respec/lab/offline_bundle.py.)
  * A defect must not cost the session its figures. Each part starts with a smoke stage of well
    under a minute that compiles one decode and one verify graph at the SmolLM2 shape, records their
    CUDA graphs and replays them (`smoke_here`); if the whole-step path fails there, the smoke tries
    regional compilation, and the later stages run on the first path that worked (regional, else
    eager), which every stage's row and every bench table names.
  * Each part has its own wall-clock budget (`--budget-s`, default: PART_BUDGET_S) and each stage a
    cap sized for a cold start; a stage gets min(its cap, what is left) and is skipped, with a line
    saying so, when less than it needs is left. Stages run as subprocesses in their own process
    group: a cap first asks every process below it that can (train.py) for every thread's stack
    (SIGUSR1, faulthandler), then kills the group (torchrun's children too). The GRPO stage gives
    each of its three torchrun runs a cap of its own.
  * Results are written as they come: summary.json and summary.md after every stage (a stage that
    is running, or was killed by its cap, says so), check.log with each stage's command and output
    (the tail of it where a stage printed much). At most 8 files, each under 16 MiB (the inductor
    cache is packed only if it fits).
  * `--out` may exist if it is empty (the device tool's $OUT); relative paths are resolved first.

Part a, in order: the smoke stage; tests/test_cuda.py (logits and generation against transformers,
CUDA graphs against eager and recorded without skips, no recording inside a timed region, SD under
CUDA graphs, the compiled top-k/top-p/min-p sampler against eager, SD losslessness); then
`generate.py --bench` on the SmolLM2-135M shape: plain (steps run ahead of the host, and the
step-by-step loop beside them) against
transformers' `generate` (greedy, the same weights; eager, and with its static cache and compiled
decoding step, the fair baseline) and SD with the history drafter (its match on the device and its
steps run ahead of the host, respec/drafters/history_ahead.py, beside the step-by-step loop with
the host index), at batch 1, 8 and 32, with each compiled step's cold compile time and a kernel-launch microbenchmark. Every timed shape is warmed
up (called twice, for each block-table width) before timing; a timed region that compiles or
records a CUDA graph lists it (`unwarmed_shapes`), and the stage fails if one does. Then the
same bench at batch 1 and 32 with `--compile-mode graphs` (the step captured by hand, one CUDA graph
per shape, replayed without dynamo's guards: compile/cuda_graphs.py), and with `--attention flex`
(the decode and verify steps reading the KV pool in place, respec/flex_paged.py), if time is left:
each one's tokens against transformers' and its step time beside the landed path's (skipped, with
a line, where it cannot run: not CUDA, or the eager path).

Part b, in order: the smoke stage (warm if part a left its compile cache); GRPO under torchrun in one
process with FSDP2 forced on (`--fsdp on`), SD on with the history drafter, three steps straight
against two steps + a resume (the same tokens and SD statistics, losses within tolerance); the
solver's cost profile on this GPU (and the batch size where SD stops paying); then, if time
remains, the bench at the Qwen2.5-0.5B and 1.5B shapes and the oracle sweep (SD's speed at a
controlled acceptance, respec/lab/oracle_sweep.py, at the 135M shape).

Part c, on the real model (SmolLM2-135M-Instruct, carried in chunks by respec/lab/offline_bundle.py
and unpacked first; a session of its own: its budget is 9 minutes): GRPO with `--task arithmetic`
(reasoning-gym's basic_arithmetic without reasoning-gym, which the machine lacks), SD off against
ReSpec (`--sd adaptive --drafter auto+replay+history`: the default head pretrained there, then
distilled in the background), the same seeds, one after the other: the rollout-dominated setting
(one problem x 16 samples, <= 512 tokens, 3-term problems; seeds 0 and 1) and the default one
(seed 0), 4 steps each; per run the step time and rollout tokens/s over the steps after the first,
the reward, SD's share of the steps and the acceptance per drafter, and ReSpec's ratios to SD off.
Last, TRL's GRPOTrainer in the long setting (seed 0; respec/lab/trl_grpo.py: the same model,
prompts, group size, lengths and hyperparameters) and respec's step time against it; skipped with a
line where trl is not installed (the bundle carries it with `--with-trl`).

With random weights the history drafter sees greedy text that loops, so its acceptance is an upper
bound on what a real model's text gives: the SD rows measure the mechanics (draft, verify, roll
back), not a drafter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDAGRAPH_SKIP = "skipping cudagraphs"
# With a machine start (~90 s), a + b take ~10 minutes, leaving room for a rerun of a failed stage
# in the 12 minutes the two commands should take of a session's 15.
PART_BUDGET_S = {"a": 360, "b": 300, "c": 540}
SMOKE_MODES = ("whole", "regional-dynamic")  # the paths the smoke stage tries, in order; eager past them
MAX_FILE_BYTES = 15 << 20  # what comes back from the GPU machine: files up to 16 MiB
LOG_TAIL_BYTES = 256 << 10  # of each stage's output, kept in check.log


@dataclass
class Stage:
    name: str
    run: str  # the Check method that runs it
    cap_s: float  # the longest it may take, cold
    need_s: float  # not started with less than this left
    args: dict = field(default_factory=dict)


def bench_args(shape: str, quick: bool) -> list[str]:
    if quick:
        return ["--model", "tiny", "--batch-sizes", "1,2", "--new-tokens", "8", "--drafter", "history", "--k", "3"]
    return {"smollm2-135m": ["--model", "random-smollm2-135m", "--batch-sizes", "1,8,32", "--new-tokens", "128",
                             "--drafter", "history", "--k", "3"],
            "qwen2.5-0.5b": ["--model", "random-qwen2.5-0.5b", "--batch-sizes", "1,8", "--new-tokens", "128"],
            "qwen2.5-1.5b": ["--model", "random-qwen2.5-1.5b", "--batch-sizes", "1", "--new-tokens", "64"]}[shape]


# Caps and needs are cold-start estimates (docs/benchmarks.md, "GPU": what the H200 run measured).
PARTS = {
    "a": [Stage("smoke", "smoke", cap_s=60, need_s=30),
          Stage("cuda tests", "tests", cap_s=100, need_s=50),
          Stage("bench smollm2-135m", "bench", cap_s=170, need_s=90,
                args={"shape": "smollm2-135m", "goal_x_hf": 3.0}),
          # the step captured by hand, one CUDA graph per shape (compile/cuda_graphs.py), beside the
          # landed CUDA-graph trees above: the same tokens as transformers, and its step time
          Stage("bench smollm2-135m graphs", "bench", cap_s=120, need_s=60,
                args={"shape": "smollm2-135m", "mode": "graphs"}),
          # the decode and verify steps reading the pool in place (respec/flex_paged.py) beside the landed
          # gather path above: the same tokens as transformers, and its step time
          Stage("bench smollm2-135m flex", "bench", cap_s=120, need_s=60,
                args={"shape": "smollm2-135m", "attention": "flex"}),
          # SD with an (untrained) EAGLE head, k = 3 every step: its steps run ahead of the host
          # (respec/sd_ahead.py) beside the step-by-step loop, the same tokens and both speeds
          Stage("bench smollm2-135m head", "bench", cap_s=100, need_s=50,
                args={"shape": "smollm2-135m", "drafter": "random"})],
    "b": [Stage("smoke", "smoke", cap_s=45, need_s=20),
          Stage("grpo fsdp2 + resume", "grpo", cap_s=170, need_s=90),
          Stage("cost profile", "costs", cap_s=60, need_s=30),
          Stage("bench qwen2.5-0.5b", "bench", cap_s=60, need_s=45, args={"shape": "qwen2.5-0.5b", "goal_x_hf": 3.0}),
          Stage("bench qwen2.5-1.5b", "bench", cap_s=50, need_s=40,
                args={"shape": "qwen2.5-1.5b", "goal_x_roofline": 3.0}),
          Stage("oracle sweep", "oracle", cap_s=150, need_s=60)],
    "c": [Stage("smoke", "smoke", cap_s=45, need_s=20),
          Stage("grpo long", "arms", cap_s=330, need_s=120, args={"setting": "long"}),
          Stage("grpo default", "arms", cap_s=150, need_s=60, args={"setting": "default"}),
          Stage("trl grpo", "trl", cap_s=60, need_s=30)],
}
# Part c: GRPO on the real model, SD off against ReSpec, per setting: the train.py options (quick:
# the tiny model's), the seeds, and the run's steps. Long: the rollout-dominated setting of
# docs/benchmarks.md (one problem x 16 samples, <= 512 tokens, 3-term arithmetic).
ARM_SETTINGS = {
    "long": (["--prompts", "1", "--group", "16", "--max-new-tokens", "512", "--train-size", "4",
              "--task-config", '{"min_terms":3,"max_terms":3}'], (0, 1), 4),
    "default": ([], (0,), 4),
}
QUICK_ARM_SETTINGS = {
    "long": (["--prompts", "1", "--group", "4", "--max-new-tokens", "48", "--train-size", "4",
              "--task-config", '{"min_terms":3,"max_terms":3}'], (0,), 2),
    "default": (["--prompts", "2", "--group", "4", "--max-new-tokens", "24"], (0,), 2),
}
ARMS = {"sd off": ["--sd", "off"],
        "respec": ["--sd", "adaptive", "--drafter", "auto+replay+history"]}  # the head distilled in the background
QUICK_RESPEC = ["--sd", "adaptive", "--drafter", "random+replay+history"]  # (no default head for tiny to pretrain)
# the GRPO stage's first two torchrun runs' shares of the stage's cap (the first compiles); the resume
# gets what is left
GRPO_RUN_SHARE = {"straight": 0.4, "split": 0.3}
QUICK_SHAPES = {"smollm2-135m": "tiny"}  # --quick: the one bench, on the tiny model


def last_json(output: str) -> dict:
    """A child's result: the last line of its output that is a JSON object. Its stderr shares the
    stream (`Check.run`), so a warning printed after the result (at exit, say) is passed over."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("the child printed no JSON result")


def preflight(device: str) -> str | None:
    """The one-line reason the check cannot run here, or None."""
    if sys.version_info < (3, 10):
        return f"Python {platform.python_version()}: respec needs 3.10 or newer"
    for module in ("torch", "transformers", "safetensors", "tqdm", "pytest"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install {module})"
    import torch

    from models.loading import PRESET_TOKENIZER, TOKENIZER_ENV

    tokenizer = Path(os.environ.get(TOKENIZER_ENV) or PRESET_TOKENIZER)
    if not (tokenizer / "tokenizer.json").is_file():
        return f"no tokenizer at {tokenizer} (it travels with the repository: models/tokenizers/smollm2)"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA GPU is available (--quick --device cpu for a smoke run)"
    return None


class Check:
    def __init__(self, out: Path, part: str, budget_s: float, quick: bool, device: str):
        self.out, self.part, self.quick, self.device = out, part, quick, device
        self.deadline = time.monotonic() + budget_s
        self.log = open(out / "check.log", "a", buffering=1)
        self.summary: dict = {"part": part, "budget_s": budget_s, "quick": quick, "stages": {}}
        # the compile cache inside the run's own folder: a warm rerun on the same machine reuses it
        self.env = {**os.environ, "TORCH_LOGS": "perf_hints", "PYTHONUNBUFFERED": "1",
                    "RESPEC_CACHE": os.environ.get("RESPEC_CACHE", str(ROOT / ".respec-cache"))}
        self.t0 = time.monotonic()
        self.scratches: list[Path] = []  # the stages' temporary folders (`scratch`), removed at the end
        # the compile path the later stages run on: the smoke stage's first that worked
        self.path = "eager" if quick else SMOKE_MODES[0]

    def scratch(self, prefix: str) -> Path:
        """A temporary folder for a stage's training runs, removed once the stages end, however they
        end (`main`): what the check reports of them is in its summary, and their checkpoints (~150
        MB a run of the tiny model) would otherwise stay in the system's temporary folder, run after
        run."""
        path = Path(tempfile.mkdtemp(prefix=prefix))
        self.scratches.append(path)
        return path

    def remove_scratches(self) -> None:
        for path in self.scratches:
            shutil.rmtree(path, ignore_errors=True)
        self.scratches = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, stage: str, **fields) -> None:
        self.summary["stages"].setdefault(stage, {}).update(fields)
        self.write()

    def write(self) -> None:
        """summary.json and summary.md as they stand now (a killed check leaves what it had)."""
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        for name, text in (("summary.json", json.dumps(self.summary, indent=1) + "\n"),
                           ("summary.md", render(self.summary))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def run(self, stage: str, cmd: list[str], limit_s: float) -> subprocess.CompletedProcess | None:
        """Run `cmd` in its own process group for at most `limit_s`; its output (the tail of it) goes
        to the log. None if it was killed by the limit (recorded)."""
        self.log.write(f"\n===== {stage}: {' '.join(cmd)} (limit {limit_s:.0f} s)\n")
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as output:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                proc.wait(timeout=limit_s)
                killed = False
            except subprocess.TimeoutExpired:
                killed = True
                kill_group(proc)
            output.seek(0)
            text = output.read()
        self.log.write(text[-LOG_TAIL_BYTES:] if len(text) > LOG_TAIL_BYTES else text)
        seconds = round(time.monotonic() - t0, 1)
        skips = text.count(CUDAGRAPH_SKIP)
        if killed:
            self.record(stage, status=f"killed by its cap after {seconds:.0f} s", seconds=seconds, cudagraph_skips=skips)
            return None
        self.record(stage, status="ok" if proc.returncode == 0 else f"failed ({proc.returncode})", seconds=seconds,
                    cudagraph_skips=skips)
        return subprocess.CompletedProcess(cmd, proc.returncode, text, "")

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
        self.write()

    def compile_args(self, *, train: bool = False) -> list[str]:
        """The flags that put a generate.py (or, `train`, a train.py) run on the chosen path."""
        if self.path == "eager":
            return ["--compile", "off"] if train else ["--eager"]
        return ["--compile-mode", self.path]

    def smoke(self, stage: str, limit: float) -> None:
        """One decode and one verify graph at the real shape, compiled, recorded and replayed, on the
        whole-step path, else the next of SMOKE_MODES; the first that works is the later stages' path."""
        deadline = time.monotonic() + limit
        modes = ["eager"] if self.quick else list(SMOKE_MODES)
        for i, mode in enumerate(modes):
            share = (deadline - time.monotonic()) / (len(modes) - i) if i < len(modes) - 1 else deadline - time.monotonic()
            cmd = [sys.executable, "-m", "respec.lab.gpu_check", "--smoke-only", "--device", self.device,
                   "--compile-mode", mode] + (["--quick"] if self.quick else [])
            proc = self.run(f"{stage}: {mode}", cmd, max(share, 1))
            if proc is not None and proc.returncode == 0:
                self.path = mode
                self.summary["smoke"] = last_json(proc.stdout)
                self.record(stage, status="ok" if mode == modes[0] else f"ok on the fallback ({mode})", path=mode)
                return
        self.path = "eager"
        self.record(stage, status="failed: every compiled path; the later stages run eagerly", path="eager")

    def tests(self, stage: str, limit: float) -> None:
        # the trainer's CUDA tests are part b's GRPO stage (and two ranks need two GPUs)
        proc = self.run(stage, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                                "-k", "not trainer and not two_ranks"], limit)
        if proc is not None:
            lines = proc.stdout.strip().splitlines()
            self.record(stage, result=lines[-1] if lines else "")

    def bench(self, stage: str, limit: float, shape: str, goal_x_hf: float | None = None,
              goal_x_roofline: float | None = None, attention: str = "gather", mode: str | None = None,
              drafter: str | None = None) -> None:
        """`generate.py --bench` at `shape` on the smoke's path; with `attention` or `mode` (a compile
        mode: the step captured by hand), that variant at batch 1 and 32 beside the path's figures;
        with `drafter` (a model drafter: its SD steps run ahead and step by step), SD with it there."""
        name = QUICK_SHAPES.get(shape, shape) if self.quick else shape
        extra, path_args, path_name = [], self.compile_args(), self.path
        if drafter is not None:
            name = f"{name} {drafter} head"
            extra = ["--drafter", drafter, "--batch-sizes", "1,2" if self.quick else "1,32",
                     "--new-tokens", "8" if self.quick else "64"]
        variant = f"--attention {attention}" if attention != "gather" else f"--compile-mode {mode}" if mode else None
        if variant is not None:
            if self.device != "cuda" or self.path == "eager":
                self.record(stage, status=f"skipped: {variant} runs compiled on CUDA only")
                return
            if attention == "flex" and self.path == "regional-dynamic":  # (respec/flex_paged.py check_runs_on)
                self.record(stage, status="skipped: --attention flex does not run on the regional-dynamic fallback")
                return
            name = f"{name} {attention if attention != 'gather' else mode}"
            extra = ["--attention", attention] if attention != "gather" else []
            extra += ["--batch-sizes", "1,32", "--new-tokens", "64"]
            if mode:
                path_args, path_name = ["--compile-mode", mode], mode
        path = self.out / f"bench-{name.replace(' ', '-')}.json"
        cmd = [sys.executable, "generate.py", "--bench", "--task", "toy-letters", "--device", self.device,
               *bench_args(shape, self.quick), *extra, *path_args, "--json", str(path)]
        proc = self.run(stage, cmd, limit)
        self.record(stage, path=path_name)
        if proc is not None and proc.returncode == 0 and path.is_file():
            report = json.loads(path.read_text())
            unwarmed = sum(len(r.get("unwarmed_shapes", [])) for r in report["results"])
            top = ("attention", "compile_s", "first_call_s", "launch_us_eager", "launch_us_graph", "hf_static_compiled",
                   "hf_static_error", "kernels_batch", "kernels_per_step", "kernels_per_layer", "kernels_counted",
                   "sd_kernels_per_step", "kernels_error")
            self.summary.setdefault("bench", {})[name] = {"goal_x_hf": goal_x_hf, "goal_x_roofline": goal_x_roofline,
                                                          "path": path_name, **{k: report.get(k) for k in top},
                                                          "rows": report["results"]}
            if unwarmed:  # figures that include a graph recording are not figures
                self.record(stage, status=f"failed: {unwarmed} timed call(s) of shapes not warmed up")
            self.write()

    def oracle(self, stage: str, limit: float) -> None:
        """SD's speed at a controlled acceptance (respec/lab/oracle_sweep.py): the 135M shape at batch
        1-128, a = 0.5, 0.7, 0.9, plain against k = 1 and 3 and the solver (the larger shapes are
        the sweep's own run: `python -m respec.lab.oracle_sweep`, minutes a shape)."""
        path = self.out / "oracle-sweep.json"
        cmd = [sys.executable, "-m", "respec.lab.oracle_sweep", "--device", self.device, "--json", str(path)]
        cmd += ["--quick"] if self.quick else ["--shapes", "smollm2-135m", "--ks", "1,3", "--reps", "1",
                                               *(["--eager"] if self.path == "eager" else ["--compile-mode", self.path])]
        proc = self.run(stage, cmd, limit)
        self.record(stage, path=self.path)
        if proc is not None and path.is_file():
            self.summary["oracle"] = json.loads(path.read_text())["results"]
            self.write()

    def arms(self, stage: str, limit: float, setting: str) -> None:
        """GRPO on the real model (carried by respec/lab/offline_bundle.py), SD off against ReSpec,
        the same seeds, `--task arithmetic` (basic_arithmetic without reasoning-gym), one seed's two
        runs after the other; each run's metrics summarised as it ends."""
        if not self.quick:
            try:
                from models.loading import smollm2_gguf_path

                smollm2_gguf_path()
                __import__("gguf")
            except Exception as e:  # noqa: BLE001 - one line
                self.record(stage, status=f"failed: the real model is not here ({str(e).splitlines()[0]}): carry and "
                                          "unpack the bundle (python -m respec.lab.offline_bundle)")
                return
        options, seeds, steps = (QUICK_ARM_SETTINGS if self.quick else ARM_SETTINGS)[setting]
        model = "tiny" if self.quick else "smollm2-135m"
        deadline = time.monotonic() + limit
        runs = [(seed, arm) for seed in seeds for arm in ARMS]
        results = self.summary.setdefault("arms", {}).setdefault(setting, [])
        scratch = self.scratch(f"arms-{setting}-")
        for i, (seed, arm) in enumerate(runs):
            out = scratch / f"{arm.replace(' ', '-')}-{seed}"
            arm_args = QUICK_RESPEC if self.quick and arm == "respec" else ARMS[arm]
            cmd = [sys.executable, "train.py", "--model", model, "--task", "arithmetic", *options, "--steps", str(steps),
                   "--seed", str(seed), *arm_args, "--checkpoint-every", "1000", "--no-progress", "--out", str(out),
                   *self.compile_args(train=True)]
            share = (deadline - time.monotonic()) / (len(runs) - i)
            proc = self.run(f"{stage}: {arm}, seed {seed}", cmd, max(share, 1))
            metrics = out / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            results.append({"arm": arm, "seed": seed, "finished": proc is not None and proc.returncode == 0,
                            **arm_summary(rows)})
            self.write()
        done = all(r["finished"] for r in results)
        self.record(stage, path=self.path, status="ok" if done else "failed: a run did not finish (see its row)",
                    ratios=arm_ratios(results))

    def trl(self, stage: str, limit: float) -> None:
        """TRL's GRPOTrainer in the long setting, seed 0 (respec/lab/trl_grpo.py), beside respec's
        runs of it; skipped with a line where trl is not installed (carry it: offline_bundle
        --with-trl)."""
        try:
            __import__("trl")
        except ImportError:
            self.record(stage, status="skipped: trl is not installed here (carry it: python -m "
                                      "respec.lab.offline_bundle --with-trl)")
            return
        options, _, steps = (QUICK_ARM_SETTINGS if self.quick else ARM_SETTINGS)["long"]
        path = self.out / "trl-grpo.json"
        cmd = [sys.executable, "-m", "respec.lab.trl_grpo", "--model", "tiny" if self.quick else "smollm2-135m",
               "--task", "arithmetic", *options, "--steps", str(steps), "--seed", "0", "--device", self.device,
               "--json", str(path)]
        proc = self.run(stage, cmd, limit)
        if proc is None or proc.returncode != 0 or not path.is_file():
            return
        report = json.loads(path.read_text())
        ours = {r["arm"]: r["step_s"] for r in self.summary.get("arms", {}).get("long", []) if r["seed"] == 0}
        report["respec_x_trl"] = {arm: round(report["step_s_mean"] / s, 2) for arm, s in ours.items() if s}
        self.summary["trl"] = report
        self.write()

    def costs(self, stage: str, limit: float) -> None:
        cmd = [sys.executable, "-m", "respec.lab.gpu_check", "--costs-only", "--device", self.device,
               "--compile-mode", self.path]
        proc = self.run(stage, cmd + (["--quick"] if self.quick else []), limit)
        self.record(stage, path=self.path)
        if proc is not None and proc.returncode == 0:
            self.summary["costs"] = last_json(proc.stdout)
            self.write()

    def grpo(self, stage: str, limit: float) -> None:
        """Three GRPO steps straight, and two steps + a checkpoint + a resume to three: the resumed run
        must give the same tokens and SD statistics (the history drafter's state is checkpointed;
        losses within float tolerance: GPU reductions need not be bit-reproducible across processes).
        torchrun in one process, FSDP2 forced on, bf16 (the default on a GPU; the resume is exact in
        bf16, tests/test_trainer.py), SD on with the history drafter at T = 0.05 (a group's siblings
        write nearly the same text, so it drafts from the first step; a random head would start at
        acceptance 0), the engine on the smoke stage's path. Each run has its own cap
        (GRPO_RUN_SHARE), so a hang names its run, and its `[teardown]` lines name its phase."""
        scratch = self.scratch("grpo-")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", "train.py"]
        args = ["--model", "tiny", "--task", "toy-letters", "--prompts", "2", "--group", "4", "--max-new-tokens", "24",
                "--temperature", "0.05", "--sd", "on", "--drafter", "history", "--k", "3", "--fsdp", "on",
                "--no-progress", *self.compile_args(train=True)]
        self.record(stage, path=self.path)
        deadline = time.monotonic() + limit
        runs = [("straight", [*args, "--steps", "3", "--checkpoint-every", "3", "--out", str(scratch / "straight")]),
                ("split", [*args, "--steps", "2", "--checkpoint-every", "2", "--out", str(scratch / "split")]),
                ("resume", ["--resume", str(scratch / "split"), "--steps", "3", "--no-progress"])]
        for name, run_args in runs:
            left = deadline - time.monotonic()
            cap = min(GRPO_RUN_SHARE[name] * limit, left) if name in GRPO_RUN_SHARE else left
            proc = self.run(f"{stage}: {name}", [*torchrun, *run_args], max(cap, 1))
            if proc is None or proc.returncode != 0:
                self.record(stage, status=f"failed at the {name} run")
                return
        straight = [json.loads(line) for line in (scratch / "straight" / "metrics.jsonl").read_text().splitlines()]
        resumed = [json.loads(line) for line in (scratch / "split" / "metrics.jsonl").read_text().splitlines()]
        (self.out / "grpo-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resumed))
        keys = ("step", "rollout_s", "train_s", "drafter_s", "rollout_tok_s", "sd_fraction", "accept_len", "reward_mean")
        self.summary["grpo"] = [{k: r.get(k) for k in keys} for r in resumed]
        problems = resume_differences(straight, resumed)
        self.record(stage, status="ok" if not problems else f"failed: resume differs ({problems[0]})",
                    seconds=round(limit - (deadline - time.monotonic()), 1),
                    sd_steps_fraction=[r.get("sd_fraction") for r in resumed])

    def pack_cache(self) -> None:
        """The inductor cache of this run, for a warm rerun, if it fits what comes back."""
        cache = Path(self.env["RESPEC_CACHE"]) / "inductor"
        if not cache.is_dir():
            return
        path = self.out / "inductor-cache.tgz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(cache, arcname="inductor")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            path.unlink()
            self.summary["inductor_cache"] = f"not kept: {size >> 20} MiB is more than comes back"
        else:
            self.summary["inductor_cache"] = f"{path.name} ({size >> 20} MiB)"

    def stages(self) -> None:
        for stage in PARTS[self.part]:
            if self.quick and stage.run == "bench" and stage.args["shape"] not in QUICK_SHAPES:
                continue
            left = self.left()
            if left < stage.need_s:
                self.record(stage.name, status=f"not run: out of time ({left:.0f} s left, needs ~{stage.need_s:.0f})")
                continue
            self.record(stage.name, status="running")
            try:
                getattr(self, stage.run)(stage.name, min(stage.cap_s, left), **stage.args)
            except Exception as e:  # noqa: BLE001 - recorded, and the next stage runs
                self.record(stage.name, status=f"error: {type(e).__name__}: {e}")

    def finish(self) -> None:
        self.pack_cache()
        self.summary["cudagraph_skips"] = sum(s.get("cudagraph_skips", 0) for s in self.summary["stages"].values())
        self.write()
        self.log.close()


def arm_summary(rows: list[dict]) -> dict:
    """One GRPO run's metrics.jsonl rows -> its means (the step time and throughput over the steps
    after the first, which compiles), reward first and last, SD's share, acceptance per drafter."""
    def mean(key, rs):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    later = rows[1:] or rows
    kinds = sorted({k for r in rows for k in r if k.startswith("accept_len_")})
    return {"steps": len(rows), "step_s": mean("step_s", later), "rollout_s": mean("rollout_s", later),
            "rollout_tok_s": mean("rollout_tok_s", later), "sd_fraction": mean("sd_fraction", rows),
            "accept_len": mean("accept_len", rows), "reward_first": rows[0]["reward_mean"] if rows else None,
            "reward_last": rows[-1]["reward_mean"] if rows else None, "reward_mean": mean("reward_mean", rows),
            **{k: mean(k, rows) for k in kinds}}


def arm_ratios(results: list[dict]) -> dict:
    """ReSpec against SD off, per seed with both runs: rollout tokens/s (ReSpec / off) and step
    time (off / ReSpec): > 1 where ReSpec is faster."""
    out = {}
    for seed in sorted({r["seed"] for r in results}):
        by = {r["arm"]: r for r in results if r["seed"] == seed}
        off, on = by.get("sd off"), by.get("respec")
        if off and on and off.get("rollout_tok_s") and on.get("rollout_tok_s") and off.get("step_s") and on.get("step_s"):
            out[str(seed)] = {"rollout_tok_s_x": round(on["rollout_tok_s"] / off["rollout_tok_s"], 3),
                              "step_x": round(off["step_s"] / on["step_s"], 3)}
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """First every thread's stack, where a process can print it (train.py dumps them on SIGUSR1,
    faulthandler): a stage that hung says where. Then SIGTERM to the process group, SIGKILL to
    whatever is left after 10 s.

    SIGUSR1 goes only to the processes below `proc` that catch it, never to the whole group: its
    default action ends a process, and torchrun's agent, ended so, would leave its workers (in
    sessions of their own, out of the group's reach) running without the SIGTERM it forwards."""
    dumping = [pid for pid in descendants(proc.pid) if catches(pid, signal.SIGUSR1)]
    for pid in dumping:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    if dumping:
        time.sleep(2)  # faulthandler writes at once; the pipes and the log file catch up
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, by parent id (whatever their session: torchrun starts its
    workers in sessions of their own); [pid] where /proc cannot be read."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # (the name may hold spaces)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (sig - 1) & 1)


def resume_differences(straight: list[dict], resumed: list[dict]) -> list[str]:
    """How a resumed run's metrics differ from the straight run's (empty: the same run)."""
    if [r["step"] for r in straight] != [r["step"] for r in resumed]:
        return [f"steps {[r['step'] for r in straight]} vs {[r['step'] for r in resumed]}"]
    problems = []
    for a, b in zip(straight, resumed):
        for k in ("reward_mean", "accuracy", "response_len_mean", "trained_tokens", "sd_fraction", "accept_len"):
            if a.get(k) != b.get(k):
                problems.append(f"step {a['step']} {k}: {a.get(k)} vs {b.get(k)}")
        for k in ("loss", "entropy", "grad_norm"):
            x, y = a.get(k), b.get(k)
            if x is not None and y is not None and abs(x - y) > 1e-3 * abs(x) + 1e-5:
                problems.append(f"step {a['step']} {k}: {x} vs {y}")
    return problems


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _or_dash(x) -> str:
    return "-" if x is None else str(x)


def render(summary: dict) -> str:
    """summary.json as a short Markdown report, goals included."""
    env = summary.get("environment", {})
    lines = [f"# GPU check, part {summary.get('part')}: {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, Python {env.get('python')}", "",
             f"{summary.get('seconds', 0):.0f} s of a {summary.get('budget_s', 0):.0f} s budget", "", "## Stages", "",
             "| stage | status | compile path | seconds | 'skipping cudagraphs' lines |", "|---|---|---|---:|---:|"]
    for name, s in summary["stages"].items():
        lines.append(f"| {name} | {s.get('status')}{' - ' + s['result'] if s.get('result') else ''} | "
                     f"{s.get('path', '-')} | {s.get('seconds', '-')} | {s.get('cudagraph_skips', '-')} |")
    if "smoke" in summary:
        m = summary["smoke"]
        lines += ["", f"## Smoke: {m['model']}, batch {m['batch']}, path {m['path']}", "",
                  "| step | first call s (cold compile) | replay ms |", "|---|---:|---:|"]
        lines += [f"| {name} | {m['first_call_s'].get(name, '-')} | {m['replay_ms'][name]} |" for name in m["replay_ms"]]
    for name, b in summary.get("bench", {}).items():
        # two transformers baselines: eager (dynamic cache, uncompiled) and static (static cache, compiled by
        # generate); step ms: one decoding step alone (transformers': (T(N) - T(1)) / (N - 1))
        lines += ["", f"## generate.py --bench, {name} (random weights), path {b.get('path', '-')}, "
                  f"attention {b.get('attention') or 'gather'}, "
                  f"compile and warm-up {b['compile_s']} s", ""]
        if b.get("first_call_s"):
            lines += ["Cold compile per graph (first call, s): "
                      + ", ".join(f"{g} {t}" for g, t in b["first_call_s"].items()), ""]
        if b.get("launch_us_eager") is not None:
            graph = b.get("launch_us_graph")
            lines += [f"Kernel launch: {b['launch_us_eager']:.2f} us eager"
                      + (f", {graph:.2f} us inside a CUDA graph" if graph is not None else "") + ".", ""]
        if b.get("kernels_per_step") is not None:
            sd = b.get("sd_kernels_per_step")
            lines += [f"Kernels per plain step at batch {b['kernels_batch']} ({b['kernels_counted']}, profiler trace): "
                      f"{b['kernels_per_step']}, {b['kernels_per_layer']} per layer"
                      + (f"; per SD step: {sd}" if sd is not None else "") + ".", ""]
        elif b.get("kernels_error"):
            lines += [f"Kernel count failed: {b['kernels_error']}", ""]
        static = "compiled" if b.get("hf_static_compiled", True) else "eager"
        if b.get("hf_static_error"):
            lines += [f"hf static ({static}) failed at {b['hf_static_error']}", ""]
        lines += [f"hf eager: dynamic cache, uncompiled; hf static: static cache, {static}. "
                  "tok/s: whole generate calls; step ms: one decoding step alone.", "",
                  "| batch | respec tok/s | hf eager tok/s | x hf eager | hf static tok/s | x hf static | step ms "
                  "| hf eager step ms | hf static step ms | roofline ms | x roofline | same as hf eager "
                  "| same as hf static | SD tok/s | SD x plain | accept len | unwarmed |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
        for r in b["rows"]:
            roof = r.get("roofline_ms") or 0
            lines.append(f"| {r['batch']} | {r['respec_tok_s']:.0f} | {r.get('hf_tok_s', '-')} | "
                         f"{_ratio(r['respec_tok_s'], r.get('hf_tok_s'))} | {r.get('hf_static_tok_s', '-')} | "
                         f"{_ratio(r['respec_tok_s'], r.get('hf_static_tok_s'))} | {r['step_ms']:.2f} | "
                         f"{_or_dash(r.get('hf_decode_ms_per_step'))} | "
                         f"{_or_dash(r.get('hf_static_decode_ms_per_step'))} | "
                         f"{roof:.3f} | {_ratio(r['step_ms'], roof)} | {r.get('same_tokens_as_hf', '-')} | "
                         f"{r.get('same_tokens_as_hf_static', '-')} | {r.get('sd_tok_s', '-')} | "
                         f"{_ratio(r.get('sd_tok_s'), r['respec_tok_s'])} | {r.get('accept_len', '-')} | "
                         f"{len(r.get('unwarmed_shapes', []))} |")
        if any("step_by_step_ms" in r for r in b["rows"]):  # the run ahead against the step-by-step loop
            lines += ["", "| batch | step ms, run ahead | step ms, step by step | same tokens |", "|---:|---:|---:|---|"]
            lines += [f"| {r['batch']} | {r['step_ms']:.3f} | {_or_dash(r.get('step_by_step_ms'))} | "
                      f"{r.get('same_tokens_as_step_by_step', '-')} |" for r in b["rows"]]
        if any("sd_step_by_step_tok_s" in r for r in b["rows"]):  # SD run ahead against SD step by step
            lines += ["", "| batch | SD tok/s, run ahead | SD steps run ahead | SD tok/s, step by step | same tokens |",
                      "|---:|---:|---:|---:|---|"]
            lines += [f"| {r['batch']} | {r.get('sd_tok_s', '-')} | {r.get('sd_ahead_steps', '-')} of "
                      f"{r.get('sd_steps', '-')} | {r.get('sd_step_by_step_tok_s', '-')} | "
                      f"{r.get('sd_same_tokens_as_step_by_step', '-')} |" for r in b["rows"]]
        goal = b.get("goal_x_hf")
        ratios = [r["respec_tok_s"] / r["hf_tok_s"] for r in b["rows"] if r["batch"] in (1, 8) and r.get("hf_tok_s")]
        if goal and ratios:
            lines.append(f"\nGoal >= {goal}x transformers at batch 1 and 8: {'met' if min(ratios) >= goal else 'NOT met'} "
                         f"(worst {min(ratios):.2f}x)")
        fair = [r["respec_tok_s"] / r["hf_static_tok_s"] for r in b["rows"] if r["batch"] in (1, 8)
                and r.get("hf_static_tok_s")]
        if goal and fair:  # the goal was set against eager transformers; the fair baseline's ratio beside it
            lines.append(f"Against transformers' static cache ({static}) at batch 1 and 8: worst {min(fair):.2f}x")
        goal = b.get("goal_x_roofline")
        if goal and b["rows"] and b["rows"][0].get("roofline_ms"):
            r = b["rows"][0]
            x = r["step_ms"] / r["roofline_ms"]
            lines.append(f"\nGoal: decode step within {goal}x of the roofline at batch {r['batch']}: "
                         f"{'met' if x <= goal else 'NOT met'} ({x:.1f}x)")
    if "costs" in summary:
        c = summary["costs"]
        lines += ["", "## Cost model fitted on this device", "", f"coefficients (s): {c['coef']}, median fit error "
                  f"{c['rel_error']:.1%}", "", "| acceptance per draft | largest batch where SD pays (k) |", "|---:|---|"]
        lines += [f"| {a} | {c['sd_pays_up_to'][a]} |" for a in c["sd_pays_up_to"]]
    if "oracle" in summary:
        lines += ["", "## SD at a controlled acceptance (oracle drafter, random weights; decode tok/s)", "",
                  "| shape | batch | a | plain | best k | best SD x plain | solver x best | solver's k (steps) | same tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in summary["oracle"]:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['accept']} | {r['plain_tok_s']} | {r['best_k']} | "
                         f"{r['sd_x_plain']} | {r['solver_x_best']} | {r['solver_k']} | {r['same_tokens']} |")
    for setting, runs in summary.get("arms", {}).items():
        ratios = summary["stages"].get(f"grpo {setting}", {}).get("ratios", {})
        lines += ["", f"## GRPO, {setting} setting: SD off against ReSpec (means over the steps after the first)", "",
                  "| arm | seed | steps | step s | rollout s | rollout tok/s | reward first -> last | SD share "
                  "| accept len | per drafter |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in runs:
            kinds = ", ".join(f"{k.removeprefix('accept_len_')} {v}" for k, v in r.items()
                              if k.startswith("accept_len_") and v is not None)
            lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['step_s']} | {r['rollout_s']} | "
                         f"{r['rollout_tok_s']} | {r['reward_first']} -> {r['reward_last']} | {r['sd_fraction']} | "
                         f"{r['accept_len']} | {kinds or '-'} |")
        lines += [f"\nReSpec against SD off, seed {seed}: rollout tok/s {x['rollout_tok_s_x']}x, step time "
                  f"{x['step_x']}x" for seed, x in ratios.items()]
    if "trl" in summary:
        t = summary["trl"]
        lines += ["", f"## TRL {t['trl']} GRPOTrainer, long setting, seed 0: {t['steps']} steps, {t['step_s_mean']} s a step "
                  f"after the first (steps {t['step_s']}); respec's step against it: "
                  + (", ".join(f"{arm} {x}x" for arm, x in t.get("respec_x_trl", {}).items()) or "-")]
    if "grpo" in summary:
        lines += ["", "## GRPO (tiny model, torchrun, FSDP2 on, SD with the history drafter), after the resume", "",
                  "| step | rollout s | train s | drafter s | rollout tok/s | SD steps | accept len |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in summary["grpo"]:
            lines.append(f"| {r['step']} | {r['rollout_s']} | {r['train_s']} | {r['drafter_s']} | {r['rollout_tok_s']} | "
                         f"{r['sd_fraction']} | {r['accept_len']} |")
    lines += ["", f"'skipping cudagraphs' in the logs: {summary.get('cudagraph_skips', '-')} line(s)",
              f"inductor cache: {summary.get('inductor_cache', '-')}", ""]
    return "\n".join(lines)


def smoke_here(device: str, quick: bool, mode: str) -> dict:
    """The smoke stage, in a process of its own: at the SmolLM2-135M shape (random weights, bf16; the
    tiny model with `quick`) with the history drafter at k = 3, one decode and one verify graph on
    compile path `mode`, each called three times at batch 2 (compile, CUDA-graph recording, replay),
    the third call timed. The engine is built as the bench builds its engines (max batch 32, a 1 GiB
    cache), so the bench finds these graphs in the compile cache."""
    import torch

    from compile.policy import FIRST_CALL_S
    from models.loading import load_model
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine
    from respec.profiling import synthetic_steps

    spec = "tiny" if quick else "random-smollm2-135m"
    model = load_model(spec, device=device)
    engine = RolloutEngine(model, kv_cache_bytes=1 << 30, max_batch=32, drafter=HistoryDrafter(), num_draft_tokens=3,
                           eager=mode == "eager", compile_mode=None if mode == "eager" else mode)
    replay_ms = {}
    for name, k in (("decode", 0), ("verify k=3", 3)):
        times = synthetic_steps(engine, 2, k, 64, 3)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        replay_ms[name] = round(times[-1] * 1e3, 3)
    return {"model": spec, "batch": 2, "path": engine.steps.mode, "first_call_s": dict(FIRST_CALL_S),
            "replay_ms": replay_ms}


def profile_costs_here(device: str, quick: bool, mode: str | None = None) -> dict:
    """The solver's cost model for the SmolLM2-shaped target with the history drafter on `device`
    (compile path `mode`: the smoke stage's), and for a few acceptance rates the largest batch size at
    which the policy still speculates."""
    from models.loading import load_model
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine
    from respec.profiling import StepTimer, warmup
    from respec.solver import AdaptiveK, cost_key, load_or_profile

    spec = "tiny" if quick else "random-smollm2-135m"
    model = load_model(spec, device=device)
    eager = quick or mode == "eager"
    engine = RolloutEngine(model, kv_cache_bytes=1 << 30, max_batch=64, drafter=HistoryDrafter(), num_draft_tokens=3,
                           eager=eager, compile_mode=None if eager else mode)
    batches, ks, contexts = ((1, 2), (0, 1, 3), (64, 192)) if quick else ((1, 8, 64), (0, 1, 3), (64, 192))
    warmup(engine, list(batches), ks=list(ks), max_context=max(contexts), progress=False)
    key = cost_key(spec, engine.drafter.describe(), engine)
    costs, _ = load_or_profile(StepTimer(engine), key, batch_sizes=batches, ks=ks,
                               contexts=contexts, progress=False)
    pays = {}
    for a in (0.3, 0.5, 0.7, 0.9):
        policy = AdaptiveK(costs, 3, [a] * 3)
        chosen = [(b, policy.choose(b, 128)) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
        on = [(b, k) for b, k in chosen if k > 0]
        pays[str(a)] = f"{on[-1][0]} (k={on[-1][1]})" if on else "never"
    return {"coef": [round(c, 6) for c in costs.coef], "rel_error": costs.rel_error, "sd_pays_up_to": pays}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m respec.lab.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), default="a", help="a: smoke, CUDA tests, SmolLM2-shape bench; "
                   "b: smoke, GRPO with FSDP2 and a resume, cost profile, larger shapes; c: GRPO on the real model, "
                   "SD off against ReSpec (the model carried by respec/lab/offline_bundle.py)")
    p.add_argument("--out", type=Path, help="folder for everything the check writes (new, or empty)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget of the part in seconds (default: {PART_BUDGET_S})")
    p.add_argument("--quick", action="store_true", help="the tiny model everywhere, eager (a smoke run on any machine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    # the stages that run in a process of their own (their JSON on the last line of stdout)
    p.add_argument("--costs-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--smoke-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-mode", default=None, help=argparse.SUPPRESS)  # their compile path
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.costs_only:
        print(json.dumps(profile_costs_here(device, args.quick, args.compile_mode)))
        return 0
    if args.smoke_only:
        print(json.dumps(smoke_here(device, args.quick, args.compile_mode or SMOKE_MODES[0])))
        return 0
    if args.out is None:
        p.error("--out is required")
    out = args.out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"gpu_check: {out} exists and is not an empty folder; refusing to write into it", file=sys.stderr)
        return 2
    problem = preflight(device)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.part, args.budget_s or PART_BUDGET_S[args.part], args.quick, device)
    check.environment()
    try:
        check.stages()
    finally:
        check.remove_scratches()
    check.finish()
    print((out / "summary.md").read_text())
    failed = [n for n, s in check.summary["stages"].items() if s.get("status") != "ok"
              and not s.get("status", "").startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
