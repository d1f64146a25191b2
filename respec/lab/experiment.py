"""Side-by-side experiments: the same GRPO training with speculative decoding off, naive, and ReSpec's
way, plus the ablation ladder, over several seeds.

    python -m respec.lab.experiment --out runs/exp [--steps 30] [--seeds 0,1] [-- TRAIN_PY_ARGS ...]
    python -m respec.lab.report runs/exp          # BENCHMARKS.md sections and plots from it

Every variant trains the same model on the same task with the same global batch and seeds; only the
speculation differs (train.py flags):

    baseline            --sd off                                          no speculative decoding
    sd-naive            --sd on       --drafter-update frozen             always speculate, fixed drafter
    rkd                 --sd on       --drafter-update rkd --drafter-async off   + reward-weighted online KD
    rkd+adaptive        --sd adaptive --drafter-update rkd --drafter-async off   + the solver picks k
    rkd+adaptive+async  --sd adaptive --drafter-update rkd --drafter-async on    + the update overlapped
                                                                                 with the next rollout
    history+adaptive    --sd adaptive --drafter history                   the model-free drafter, no KD
    rkd+adaptive+async+history   as rkd+adaptive+async with --drafter auto+history (per row: history
                                 where its suffix match is long, the head elsewhere)

With a fixed training set (`-- --train-size N`), the seeding of the rollouts (respec/rollout_seeds.py):

    per-prompt          --sd off --rollout-seeds per-prompt               a prompt's noise reused every epoch
    per-prompt+reseed2  ... --reseed-every 2                              each sample new every 2 epochs
    per-prompt+reseed4  ... --reseed-every 4
    respec+replay       --sd adaptive --drafter auto+replay+history --rollout-seeds per-prompt (rkd, async)
                        ReSpec with last epoch's completions as drafts: the same tokens as per-prompt
    respec+replay+inline  ... --drafter-async off                           the distillation in line, not
                        beside the next rollout: the rollout's own speed, uncontended

(`rkd`, `rkd+adaptive`, `rkd+adaptive+async` are the paper's ablation ladder, its Figure 14.) The
report calls `rkd+adaptive+async` "respec" (train.py's default; `--respec-async off` names
`rkd+adaptive` instead, for machines where the overlap does not pay).

Each run is a train.py run directory, OUT/<variant>/seed<N>, with its log beside it (seed<N>.log).
Disk: a SmolLM2 run's checkpoint (actor, AdamW state, drafter) is ~1.7 GB; runs keep one while they
run and drop it when they finish (the report reads only metrics.jsonl; the final actor stays in
RUN_DIR/hf, ~0.5 GB). Keeping train.py's default two per run, 20 runs filled 70 GB here.
Running the same command again resumes the experiment: finished runs are skipped and interrupted
ones continue from their last checkpoint (`train.py --resume`); nothing is started over. The
settings are kept in OUT/experiment.json, and a different command line against the same OUT is
refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from respec.cli import OneLineParser, positive_int

ROOT = Path(__file__).resolve().parents[2]

VARIANTS: dict[str, list[str]] = {
    "baseline": ["--sd", "off"],
    "sd-naive": ["--sd", "on", "--drafter-update", "frozen"],
    "rkd": ["--sd", "on", "--drafter-update", "rkd", "--drafter-async", "off"],
    "rkd+adaptive": ["--sd", "adaptive", "--drafter-update", "rkd", "--drafter-async", "off"],
    "rkd+adaptive+async": ["--sd", "adaptive", "--drafter-update", "rkd", "--drafter-async", "on"],
    "history+adaptive": ["--sd", "adaptive", "--drafter", "history"],
    "rkd+adaptive+async+history": ["--sd", "adaptive", "--drafter", "auto+history", "--drafter-update", "rkd",
                                   "--drafter-async", "on"],
    "per-prompt": ["--sd", "off", "--rollout-seeds", "per-prompt"],
    "per-prompt+reseed2": ["--sd", "off", "--rollout-seeds", "per-prompt", "--reseed-every", "2"],
    "per-prompt+reseed4": ["--sd", "off", "--rollout-seeds", "per-prompt", "--reseed-every", "4"],
    "respec+replay": ["--sd", "adaptive", "--drafter", "auto+replay+history", "--rollout-seeds", "per-prompt",
                      "--drafter-update", "rkd", "--drafter-async", "on"],
    "respec+replay+inline": ["--sd", "adaptive", "--drafter", "auto+replay+history", "--rollout-seeds", "per-prompt",
                             "--drafter-update", "rkd", "--drafter-async", "off"],
}
# the variants for a fixed training set
SEEDING = ("per-prompt", "per-prompt+reseed2", "per-prompt+reseed4", "respec+replay", "respec+replay+inline")
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in SEEDING]
# flags the experiment sets itself: not allowed among the pass-through train.py arguments
OWN_FLAGS = ("--out", "--seed", "--steps", "--resume", "--sd", "--drafter-update", "--drafter-async", "--stage",
             "--keep-checkpoints", "--rollout-seeds", "--reseed-every")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = OneLineParser(prog="python -m respec.lab.experiment", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, required=True, help="experiment directory (created, or resumed if it exists)")
    p.add_argument("--steps", type=positive_int, default=30, help="RL steps of every run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every variant runs with each (three: "
                   "the reward comparison's interval is taken over seeds)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all but the seeding ones)")
    p.add_argument("--respec-async", choices=["on", "off"], default="on",
                   help="which ladder run the report calls 'respec' (on, as train.py's default: the one with the "
                        "update overlapped with the next rollout)")
    p.add_argument("--nproc", type=positive_int, default=1, help="ranks per run (torchrun --nproc_per_node)")
    args = p.parse_args(own)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.variants = [v for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants or not args.seeds:
        p.error(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(VARIANTS)})" if unknown
                else "no variants or seeds given")
    clash = [a for a in passthrough if a.split("=")[0] in OWN_FLAGS]
    if clash:
        p.error(f"{', '.join(clash)} is set by the experiment itself; not allowed after --")
    own_drafter = [v for v in args.variants if "--drafter" in VARIANTS[v]]
    if own_drafter and any(a.split("=")[0] == "--drafter" for a in passthrough):
        p.error(f"--drafter after -- would override the drafter of {', '.join(own_drafter)}: leave those variants out")
    args.train_args = passthrough
    return args


def settings(args) -> dict:
    """What defines the experiment (a resumed experiment must have the same)."""
    return {"steps": args.steps, "seeds": args.seeds, "variants": args.variants, "train_args": args.train_args,
            "respec_async": args.respec_async, "nproc": args.nproc}


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def finished(run: Path, steps: int) -> bool:
    metrics = run / "metrics.jsonl"
    return (run / "hf").is_dir() and metrics.is_file() and len(metrics.read_text().splitlines()) >= steps


def command(args, variant: str, seed: int) -> list[str]:
    run = run_dir(args.out, variant, seed)
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone"]
    if (run / "config.json").is_file():  # started before: continue it
        return launcher + [str(ROOT / "train.py"), "--resume", str(run), "--steps", str(args.steps), "--no-progress"]
    # every variant with a head drafts with the pretrained default head, whatever a run's cost model
    # would say of pretraining it (train.py's default weighs that per run; given after --, it still can)
    return launcher + [str(ROOT / "train.py"), "--pretrain-drafter", "on", *args.train_args, *VARIANTS[variant],
                       "--seed", str(seed),
                       "--steps", str(args.steps), "--out", str(run), "--keep-checkpoints", "1", "--no-progress"]


def main(argv=None) -> int:
    args = parse_args(argv)
    manifest = args.out / "experiment.json"
    want = settings(args)
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        saved.pop("started", None)
        if saved != want:
            print(f"respec.lab.experiment: error: {args.out} holds an experiment with other settings ({manifest}); "
                  "choose a new --out", file=sys.stderr)
            return 2
    elif args.out.exists() and any(args.out.iterdir()):
        print(f"respec.lab.experiment: error: {args.out} exists and is not an experiment directory", file=sys.stderr)
        return 2
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({**want, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    runs = [(v, s) for s in args.seeds for v in args.variants]
    for i, (variant, seed) in enumerate(runs, 1):
        run = run_dir(args.out, variant, seed)
        if finished(run, args.steps):
            print(f"[{i}/{len(runs)}] {variant} seed {seed}: done", flush=True)
            continue
        if run.is_dir() and not any(run.iterdir()):  # killed between creating it and writing its config
            run.rmdir()
        cmd = command(args, variant, seed)
        log = run.parent / f"seed{seed}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{i}/{len(runs)}] {variant} seed {seed}: {'resuming' if '--resume' in cmd else 'running'} "
              f"(log {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            print(f"respec.lab.experiment: error: {variant} seed {seed} failed (exit {code}); see {log}; run the same "
                  "command again to continue", file=sys.stderr)
            return 1
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # finished: the report needs only its metrics
        print(f"[{i}/{len(runs)}] {variant} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all {len(runs)} runs done; report: python -m respec.lab.report {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
