"""Training with respec: GRPO with speculative rollouts (default), or drafter pretraining.

  python train.py                                  # the default run: SmolLM2-135M on basic_arithmetic, ReSpec mode
  torchrun --nproc_per_node=2 train.py             # the same, data-parallel with FSDP2 (gloo on CPU)
  python train.py --task products --task-config '{"min_terms": 2, "max_terms": 2}' --steps 50
  python train.py --data gsm8k.jsonl --sd off      # JSONL rows: GSM8K, prompt/answer or chat (respec/data.py)
  python train.py --model Qwen/Qwen2.5-0.5B-Instruct --data openai/gsm8k --data-split train --prompt-column question
  python train.py --reward my_rewards:brevity:0.2 --reward correctness   # your TRL-style reward functions
  python train.py --config run.yaml --max_steps 40  # options from a file (TRL's names too); flags override it
  python train.py --resume runs/grpo-20261123-101500 --steps 40    # continue a run (more steps)
  python train.py --stage drafter --out runs/drafter                # pretrain an EAGLE-style head

Every run directory holds config.json, metrics.jsonl, completions.jsonl (the completions with their
rewards), plots/, TensorBoard events (tensorboard/), checkpoints and the final actor (hf/).
Multi-node: torchrun's usual rendezvous, e.g. `torchrun --nnodes=2 --nproc_per_node=8
--rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...` on every node.

A run that seems stuck: every checkpoint and every phase after the last step says on stderr when it
starts and how long it took (`[teardown] export hf/ ... 0.4 s`), and `kill -USR1 PID` prints every
thread's stack (faulthandler; a fatal error prints them too) while the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

from compile.policy import use_persistent_cache
from models.loading import ModelLoadError, load_model, load_tokenizer
from respec import checkpoint, distributed, guards, host_memory, metrics, storage
from respec.cli import OneLineParser, add_options, given_options, option_fields, refuse_inert
from respec.config import TrainConfig, default_prompts
from respec.drafter_choice import default_head_dir, ensure_head, split_spec
from respec.drafter_training import DrafterConfig
from respec.run_plots import plot_run, read_evaluations
from respec.trainer import Trainer, run_data


CONFIGS = {"grpo": TrainConfig, "drafter": DrafterConfig}
# what a resumed run may change: how long it runs and what it writes, never what or how it learns
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "export_hf", "progress", "report_to", "log_completions",
             "eval_every", "eval_at_start", "eval_prompts", "eval_data", "eval_temperature", "eval_generations",
             "eval_max_new_tokens")


# TRL options with no direct counterpart here, and what to use instead
NOT_HERE = {
    "per_device_train_batch_size": "respec counts prompts, not completions: --prompts P (P x --group completions "
                                   "per step, over all ranks)",
    "gradient_accumulation_steps": "the update splits into microbatches by itself (--micro-tokens); "
                                   "--minibatches sets optimizer steps per rollout",
    "num_train_epochs": "give --steps (RL steps)",
    "use_vllm": "the rollout is respec's own engine (--sd for speculative decoding)",
    "scale_rewards": "advantages are scaled by their group's std (TRL's 'group'); --no-std-scaling centres them "
                     "only (TRL's 'none'); a batch-wide std ('batch') is not offered",
    "logging_steps": "every step is logged to RUN_DIR/metrics.jsonl",
    "bf16": "--train-dtype sets the training forward's autocast dtype and --dtype the rollout's; both are bf16 "
            "where the hardware has it (auto)",
    "fp16": "fp16 training would need loss scaling, which respec does not do: --train-dtype bf16 or fp32",
    "reward_weights": "give each reward function its weight: --reward correctness:1.0 --reward mymod:fn:0.5",
    "peft_config": "LoRA is set by --lora-r, --lora-alpha, --lora-dropout and --lora-target-modules",
    "use_peft": "give --lora-r R (TRL's lora_r default is 16) to train LoRA adapters instead of the whole actor",
    "save_strategy": "a checkpoint every --checkpoint-every RL steps, and one at the end",
    "eval_strategy": "--eval-every N RL steps (and --eval-at-start)",
    "per_device_eval_batch_size": "the evaluation decodes all of a rank's --eval-prompts together",
}


def build_parser() -> tuple[OneLineParser, dict[str, set[str]]]:
    """The parser, its options generated from TrainConfig and DrafterConfig (respec/cli.py), and
    which options each stage takes."""
    p = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--stage", choices=list(CONFIGS), default="grpo", help="grpo (default) or drafter pretraining")
    p.add_argument("--config", type=Path, help="YAML or JSON file of options (option names as keys, TRL's names "
                   "too); flags on the command line override it")
    p.add_argument("--resume", type=Path, help="continue this run directory from its last checkpoint (with its own "
                   f"settings; only {', '.join(map(flag_name, RESUMABLE))} may change)")
    p.add_argument("--eager", dest="compile", action="store_const", const="off", default=argparse.SUPPRESS,
                   help="the same as --compile off")
    return p, add_options(p, CONFIGS)


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """(namespace, the options given, checked against the stage and, for a new run, against each other:
    an option the others make inert is refused): bad input exits with one line."""
    parser, stages = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        name = arg[2:].split("=")[0].replace("-", "_") if arg.startswith("--") else ""
        if name in NOT_HERE:
            parser.error(f"{arg.split('=')[0]}: no such option here; {NOT_HERE[name]}")
    try:
        ns, given = given_options(parser, argv, CONFIGS, NOT_HERE, switches={"eager": "--eager"})
    except ValueError as e:
        parser.error(str(e))
    foreign = [n for n in given if n not in stages[ns.stage]]
    if foreign:
        parser.error(f"{flag_name(foreign[0])} does not apply to --stage {ns.stage}")
    if ns.resume is not None and ns.stage != "grpo":
        parser.error("--resume continues a GRPO run; --stage drafter starts a new head")
    if ns.resume is None:  # (a resumed run's options are checked against its own, by resumed_config)
        try:
            refuse_inert(CONFIGS[ns.stage](**given), given)
        except ValueError as e:
            parser.error(str(e))
    return ns, given


def flag_name(name: str) -> str:
    f = option_fields(TrainConfig).get(name) or option_fields(DrafterConfig)[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(msg: str) -> None:
    """Every rank but the main one logs nothing."""


def teardown(what: str, d: distributed.Dist):
    """A phase after the last step, announced on the main rank as it starts and ends (guards.py)."""
    return guards.announced("teardown", what, log if d.main else quiet)


# ----------------------------------------------------------------------------------------------
def run_drafter(cfg: DrafterConfig, d: distributed.Dist) -> int:
    """--stage drafter: pretrain an EAGLE-style head by distillation from the target, on this
    process's device (one process: the pretraining is not distributed)."""
    from respec.drafter_training import pretrain

    if d.world > 1:
        raise ValueError(f"--stage drafter runs in one process, not {d.world} ranks: start it without torchrun")
    if not cfg.out:
        raise ValueError("--stage drafter needs --out DIR")
    out = Path(cfg.out)
    if out.exists():
        raise ValueError(f"{out} exists; refusing to overwrite it (choose a new --out)")
    task = cfg.make_task(seed=cfg.seed, numeric_answers=False, answers_required=False)  # the answers are not scored here
    target = load_model(cfg.model, dtype=cfg.dtype, device=d.device)
    tok = load_tokenizer(cfg.model)
    out.mkdir(parents=True)
    report = pretrain(target, tok, out, problems=task.problems(0, cfg.prompts + cfg.held_out), held_out=cfg.held_out,
                      new_tokens=cfg.new_tokens, temperature=cfg.temperature, draft_vocab=cfg.draft_vocab,
                      epochs=cfg.epochs, batch=cfg.batch, unroll=cfg.unroll, lr=cfg.lr, decay=cfg.step_decay,
                      tv_weight=cfg.tv_weight, max_batch=cfg.max_batch, seed=cfg.seed, log=log,
                      progress=cfg.progress)
    print(json.dumps({"sampled": report["held_out_sampled"], "greedy": report["held_out_greedy"]}))
    return 0


# ----------------------------------------------------------------------------------------------
def check_parts(cfg: TrainConfig) -> None:
    """The checks of options that need the parts they name (TrainConfig.validate checks the rest
    and knows none of them): the drafter spec's form, the trackers and their packages. One line
    each (ValueError), before anything is built."""
    split_spec(cfg.drafter)
    metrics.trackers(cfg.report_to)


def new_config(given: dict, world: int = 1) -> TrainConfig:
    """A new run's config: the options given, TrainConfig's defaults for the rest."""
    cfg = TrainConfig(**given)
    if "prompts" not in given:
        cfg.prompts = default_prompts(world)
    return cfg


def resumed_config(run: Path, given: dict) -> TrainConfig:
    """The config a run was started with (config.json), with the RESUMABLE options given now; any
    other option given with a different value is refused, and so is one the run's options make inert."""
    path = run / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run}: not a training run directory (no config.json)")
    try:
        cfg = TrainConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--resume {run}: config.json is unreadable ({type(e).__name__})") from None
    for name, value in given.items():
        if name in RESUMABLE:
            setattr(cfg, name, value)
        elif value != getattr(cfg, name) and not (name == "out" and Path(value) == run):
            raise ValueError(f"--resume {run}: {flag_name(name)} cannot change in a resumed run ({getattr(cfg, name)!r} "
                             f"there, {value!r} given); start a new run for that")
    refuse_inert(cfg, given)
    return cfg


def peak_memory_gb() -> float:
    """This process's peak resident memory in GiB."""
    return host_memory.peak_rss_bytes() / 2**30


def summary(history: list[dict], run_dir: Path, wall_s: float, prep: dict, verify: str = "match",
            peak_source: str = "", kd_async: bool = True) -> str:
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    rollout = sum(r["rollout_s"] for r in history)
    step = sum(r["step_s"] for r in history)
    lines = [
        f"run {run_dir}: {len(history)} steps in {wall_s:.0f} s wall "
        f"(compile {prep.get('compile_s', 0):.0f} s, SD cost profile {prep.get('profile_s', 0):.0f} s"
        + (f", the default head pretrained in {prep['pretrain_s']:.0f} s" if prep.get("pretrain_s") else "")
        + (f", the default head weighed in {prep['pilot_s']:.1f} s (not made)" if prep.get("pilot_s") else "") + ")",
        f"reward  first {len(first)} steps {mean(first, 'reward_mean'):.3f}  ->  last {len(last)} steps "
        f"{mean(last, 'reward_mean'):.3f}   (accuracy {mean(first, 'accuracy'):.3f} -> {mean(last, 'accuracy'):.3f})",
        f"rollout {rollout / step:.0%} of step time; {sum(r['rollout_tok_s'] * r['rollout_s'] for r in history) / rollout:.0f} "
        f"tokens/s; SD on in {mean(history, 'sd_fraction'):.0%} of decoding steps; accept_len "
        f"{mean([r for r in history if r['accept_len']] or history[:1], 'accept_len'):.2f}",
        f"update MFU {mean(history, 'train_mfu'):.1%} (model FLOPs over the update's time alone, of the peak in the "
        f"training dtype: {peak_source or 'unknown'})",
    ]
    if any("sd_saved_s" in r for r in history):  # the adaptive solver's own account
        errors = [r["accept_est_error"] for r in history if "accept_est_error" in r]
        saved = sum(r.get("sd_saved_s", 0.0) for r in history)
        lines.append(f"SD {'saved' if saved >= 0 else 'cost'} an estimated {abs(saved):.1f} s of decoding (the cost "
                     "model at the measured acceptance)" + (f"; the solver's acceptance estimate off by "
                     f"{sum(errors) / len(errors):+.2f} tokens per verify on average over the {len(errors)} steps "
                     "that speculated (accept_est_error)" if errors else "; it never speculated"))
    est = [r["accept_est"] for r in history if "accept_est" in r]
    if est:
        rule = "a draw under the match rule" if verify == "match" else "1 - TV"
        background = sum(r.get("kd_s", 0.0) for r in history) if kd_async else 0.0
        lines.append(f"drafter distillation {mean(history, 'drafter_s'):.1f} s per step on the critical path"
                     + (f", {background:.0f} s in all in the background (beside the rollouts and updates, on their "
                        "cores)" if kd_async else "") + f"; estimated accept_len ({rule}) {est[0]:.2f} -> {est[-1]:.2f}")
    evals = read_evaluations(run_dir)
    if evals:
        passes = lambda r: "".join(f", {k.removeprefix('eval_').replace('_at_', '@')} {v:.3f}"  # noqa: E731
                                   for k, v in r.items() if k.startswith("eval_pass_at_"))
        lines.append("held-out pass@1 " + "  ->  ".join(f"{r['eval_accuracy']:.3f} (step {r['step']}{passes(r)})"
                                                         for r in (evals[0], evals[-1])[:len(evals)]))
    lines += [
        f"peak resident memory {peak_memory_gb():.2f} GiB (this process)",
        f"metrics {run_dir / 'metrics.jsonl'}, plots {run_dir / 'plots'}, final actor {run_dir / 'hf'}"
        + (f", final drafter {run_dir / 'drafter'}" if (run_dir / "drafter").is_dir() else ""),
    ]
    return "\n".join(lines)


def head_missing(cfg: TrainConfig) -> bool:
    """Whether `--drafter` asks for the default head (`auto`) and the cache has none for this setting."""
    if cfg.drafter == "none" or split_spec(cfg.drafter)[0] != "auto":
        return False
    name = cfg.task if cfg.data is None else str(cfg.data)
    return not (default_head_dir(cfg.model, name, cfg.task_config, cfg.max_new_tokens) / "config.json").is_file()


def untrained_spec(spec: str) -> str:
    """`spec` with an untrained head of the default head's shape in place of the default head."""
    _, free = split_spec(spec)
    return "+".join(["random", *free])


def decide_head(trainer: Trainer, cfg: TrainConfig, wanted: str, make_head, run_dir: Path, d) -> dict:
    """A run that asked for a default head the cache lacks started with an untrained one (`head_missing`).
    With its cost model fitted, `--pretrain-drafter auto` pretrains the default head where it can pay
    back within the run (respec/drafter_choice.py `pretraining_payback`, then the pretraining's own
    pilot: `pretrain_default_head`) and drafts with it; else
    the run keeps the untrained head, distilled online within the distillation's budget
    (`Trainer.keep_untrained_head`), and its config.json says so (a resumed run goes on with what it
    had). With `off` the untrained head is a cold start (`--drafter random`'s). Returns the timings
    for the summary."""
    payback = trainer.head_payback() if cfg.pretrain_drafter == "auto" else None  # (--sd adaptive: a cost model)
    untrained = ("starting from an untrained head, distilled online (--pretrain-drafter on makes the default "
                 "head anyway)")
    if payback is not None and d.main:
        log(f"drafter: no cached default head; its pretraining would take at least about {payback.cost_s:.0f} s "
            f"(this run's cost model, counted low) and speculation could save at most {payback.saved_s:.0f} s in "
            "this run (every draft accepted): " + ("its pilot decides" if payback.pays else untrained))
    if payback is None:  # --pretrain-drafter off: a cold start
        return {"pretrain_s": 0.0}
    t0 = time.perf_counter()
    directory = None
    if payback.pays:  # the pilot, and the pretraining where the pilot's figure is below what it could save
        directory = trainer.apart_from_rollout(lambda: make_head(wanted, budget_s=payback.saved_s,
                                                                 machine=payback.machine))
    if distributed.all_reduce_max([float(directory is None)], d)[0] > 0:  # (every rank alike)
        if payback.pays and d.main:
            log("drafter: " + untrained)
        trainer.keep_untrained_head()
        return {"pretrain_s": 0.0, "pilot_s": round(time.perf_counter() - t0, 1) if payback.pays else 0.0}
    trainer.adopt_head(directory)
    cfg.drafter = wanted
    if d.main:
        storage.write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return {"pretrain_s": round(time.perf_counter() - t0, 1)}


def run_grpo(ns, given: dict, d: distributed.Dist) -> int:
    if ns.resume is not None:
        cfg = resumed_config(ns.resume, given)
        run_dir = ns.resume
        start = checkpoint.resume_point(run_dir, d, log if d.main else quiet)  # (a damaged one: the one before)
    else:
        cfg = new_config(given, d.world)
        run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")
        if run_dir.exists():
            raise ValueError(f"{run_dir} exists; refusing to overwrite it (choose a new --out, or --resume it)")
        start = None
    cfg.out = str(run_dir)
    cfg.validate(d.world)
    check_parts(cfg)
    if cfg.export_hf and Path(cfg.export_hf).exists():
        raise ValueError(f"--export-hf {cfg.export_hf} exists; refusing to overwrite it")

    wall = time.perf_counter()
    tok = load_tokenizer(cfg.model)
    data = run_data(cfg, tok)  # bad data fails here, before a default head is pretrained
    make_head = partial(ensure_head, model=cfg.model, task_name=cfg.task if cfg.data is None else str(cfg.data),
                        task=cfg.pretraining_task(), tokenizer=tok, task_config=cfg.task_config,
                        max_new_tokens=cfg.max_new_tokens, pretrain_here=d.node_main,
                        wait=lambda: distributed.barrier(d), log=log if d.main else quiet, dtype=cfg.dtype,
                        device=d.device, seed=cfg.seed, k=cfg.k, temperature=cfg.temperature, progress=cfg.progress)
    wanted = None  # a spec whose default head waits for the cost model's word (pretraining_payback)
    if cfg.sd != "off":  # the default head, pretrained once where the cache lacks it (the first rank of each node)
        deferred = cfg.pretrain_drafter == "off" or (cfg.pretrain_drafter == "auto" and cfg.sd == "adaptive")
        # (every rank alike: a node whose cache lacks the head makes every rank wait for the cost model)
        if ns.resume is None and deferred and distributed.all_reduce_max([float(head_missing(cfg))], d)[0] > 0:
            wanted, cfg.drafter = cfg.drafter, untrained_spec(cfg.drafter)  # a head of its shape, untrained
        else:
            make_head(cfg.drafter)
    trainer = Trainer(cfg, d=d, run_dir=run_dir, data=data, tokenizer=tok, log=log if d.main else quiet)
    if d.main and ns.resume is None:
        with storage.writing(run_dir):
            run_dir.mkdir(parents=True)
            storage.write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    distributed.barrier(d)
    if start is None and ns.resume is not None:
        trainer.forget_metrics_after(0)
        if d.main:
            log(f"{run_dir} has no complete checkpoint yet: starting it from step 0")
    prep = trainer.start(start)
    if wanted is not None:
        prep.update(decide_head(trainer, cfg, wanted, make_head, run_dir, d))
    if start is not None and d.main:
        log(f"resumed {run_dir} from {start.name} (step {trainer.step})")
    history = trainer.run()  # (its last checkpoint announced as the others are)
    # The run's own copy of the final actor, replaced only once the new one is complete.
    with teardown("export hf/", d):
        fresh = run_dir / ".hf.tmp"
        if d.main:
            shutil.rmtree(fresh, ignore_errors=True)
        checkpoint.export_hf(trainer.actor, fresh, d, tokenizer=trainer.tok)
        if d.main:
            shutil.rmtree(run_dir / "hf", ignore_errors=True)
            fresh.rename(run_dir / "hf")
    if cfg.export_hf:
        with teardown(f"export --export-hf {cfg.export_hf}", d):
            checkpoint.export_hf(trainer.actor, Path(cfg.export_hf), d, tokenizer=trainer.tok)
    if trainer.learner is not None:
        with teardown("export drafter/", d):
            trainer.learner.export(run_dir / "drafter")
    if d.main:
        with teardown("plots", d):
            plot_run(run_dir)
        if history:
            with teardown("summary", d):
                print(summary(history, run_dir, time.perf_counter() - wall, prep, cfg.verify, trainer.peak_source,
                              kd_async=cfg.drafter_async),
                      flush=True)
    return 0


def main(argv=None) -> int:
    ns, given = parse_args(argv)
    use_persistent_cache()
    d = distributed.init()
    code = 1  # an unexpected exception: its traceback follows the teardown
    try:
        code = run_drafter(DrafterConfig(**given), d) if ns.stage == "drafter" else run_grpo(ns, given, d)
    except (ModelLoadError, ValueError) as e:  # bad input: nothing was started
        if d.main:
            print(f"train.py: error: {e}", file=sys.stderr)
        code = 2
    except (guards.RunFailed, storage.WriteError) as e:  # the run stopped; what it saved before is kept
        if d.main:
            print(f"train.py: error: {e}", file=sys.stderr)
        code = 1
    except guards.RunInterrupted as e:
        if d.main:
            print(f"train.py: {e}", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:  # a second Ctrl-C
        if d.main:
            print("train.py: interrupted (a second Ctrl-C: no checkpoint written for the step in progress)",
                  file=sys.stderr)
        code = 130
    finally:
        # announced where there is something to tear down, and never after bad input (one line)
        with guards.announced("teardown", "device sync, process group", log if d.main and code != 2
                              and distributed.has_teardown() else quiet):
            distributed.shutdown(clean=code == 0)
    return code


def dump_stacks_on_signal() -> None:
    """Every thread's stack on stderr at a fatal error (a segfault, an abort in a library) and on
    `kill -USR1` (the run goes on). Set where the process starts, not in `main`, which tests call
    with a stderr that has no file descriptor."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)


if __name__ == "__main__":
    dump_stacks_on_signal()
    sys.exit(main())
