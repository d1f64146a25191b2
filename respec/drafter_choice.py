"""From a `--drafter` spec to the drafter the engine runs, in one place for train.py and generate.py.

Two steps, so that building a trainer trains nothing: `ensure_head` makes the default head where a
spec asks for it and the cache lacks it (generate.py calls it first; train.py too, or, where the
solver chooses k, only once its fitted cost model says the pretraining can pay back within the run,
`pretraining_payback`, and the pretraining's own pilot agrees), and `choose_drafter` only loads.

Specs: an EAGLE head directory; `auto` (the default head for this model and task, pretrained once
and cached); `random` (an untrained head, for a cold start that only online distillation
improves); `first:N` (the target's first N layers); the model-free `replay` (last epoch's
completion of the same prompt and sample) and `history` (suffix matches); and combinations joined
by `+`: a model spec first (or none), then model-free ones in the order they are tried per row
(`auto+replay+history`: replay where the row still follows its last completion, else history where
its suffix match is long, else the head; respec/drafters/hybrid.py). `none` is no drafter.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.eagle import EagleHead, cast_head, load_eagle
from models.loading import cache_dir, load_model, resolve_checkpoint
from respec import host_memory, storage
from respec.drafters import Drafter

# The default head's pretraining (respec/drafter_training.py: pretrain); part of its cache key.
# Sized for held-out acceptance at the rollout temperature within about three minutes on 2 CPU cores:
# the head overfits a few dozen rollouts (more epochs on them raise the training estimate, not the
# held-out one), so the budget goes to rollouts (decoded 64 rows at a time) and to a higher learning
# rate, with the forward in bf16 where native; equal TTT step weights (step_decay 1).
# Its rollouts are as long as the run's completions (--max-new-tokens), up to `max_new_tokens`.
DEFAULT_HEAD_RECIPE = dict(prompts=192, held_out=8, max_new_tokens=128, epochs=4, unroll=3, batch=8, lr=3e-3,
                           step_decay=1.0, max_batch=64)


@dataclass
class Chosen:
    drafter: Drafter | None  # what the engine drafts with (None: no speculative decoding)
    master: EagleHead | None = None  # fp32 weights online distillation trains (a head only)
    prior: list[float] | None = None  # the solver's initial acceptance per draft position (None: its default)
    directory: Path | None = None  # where the head came from


def _stderr(msg: str) -> None:
    """The pretraining's log where the caller's cannot travel to a child process."""
    print(msg, file=sys.stderr, flush=True)


def pretrain_tokens(max_new_tokens: int) -> int:
    """Tokens per pretraining rollout for runs whose completions are up to `max_new_tokens` long."""
    return min(max_new_tokens, DEFAULT_HEAD_RECIPE["max_new_tokens"])


@dataclass
class Payback:
    """Whether the default head's pretraining can pay back within the run it is made for."""

    cost_s: float  # the pretraining, estimated low: its rollouts by the cost model, doubled
    saved_s: float  # the most speculation could save in the run (every draft accepted, drafting at its cost)
    machine: str | None = None  # the run's cost-profile key: where the pretraining's pilot keeps its figures

    @property
    def pays(self) -> bool:
        return self.saved_s > self.cost_s


# The default head's pretraining took 2.5x (bf16, AMX) to 4.2x (fp32, AVX2) its rollouts' time on
# 2-core CPUs (docs/benchmarks.md): the target's features and the head's training come after them.
# `pretraining_payback` counts 2x, less than either.
PRETRAIN_PER_ROLLOUT = 2.0


def pretraining_payback(costs, *, rows: int, steps: int, max_new_tokens: int, k: int,
                        prompt_tokens: int = 64) -> Payback:
    """The default head's pretraining against what it could buy in a run of `steps` rollouts of
    `rows` rows (per process) and up to `max_new_tokens` tokens, both from the fitted step costs
    (`costs`: respec/solver.py CostModel) and both biased towards pretraining:

      cost   its rollouts, `prompts` rows decoded `max_batch` at a time for
             `pretrain_tokens(max_new_tokens)` steps each (at the rollout temperature one row of a
             batch nearly always runs to the length), times `PRETRAIN_PER_ROLLOUT` for the target's
             features and the head's training, less than they were measured to take;
      saved  every step decoding all its rows for `max_new_tokens` tokens, each SD step of k drafts
             accepted whole at the k that pays best, against plain decoding of the same tokens (an
             SD step's cost, its drafts' included, is the profile's: it times the run's untrained
             head, whose drafting costs what a trained one's does).

    Where `saved <= cost` the head is not worth making in the run it is made for, even drafting
    perfectly; else the pretraining's own pilot measures what it will take on this machine before it
    starts and weighs that against `saved` (`pretrain_default_head`'s `budget_s`). A later run with
    the same model, task and length decides again; `--pretrain-drafter on` makes the head anyway."""
    r = DEFAULT_HEAD_RECIPE
    n = pretrain_tokens(max_new_tokens)
    batches = -(-r["prompts"] // r["max_batch"])
    cost = PRETRAIN_PER_ROLLOUT * batches * n * costs.step_s(r["max_batch"], 0, prompt_tokens + n / 2)
    context = prompt_tokens + max_new_tokens / 2
    plain = costs.step_s(rows, 0, context)  # a token for every row
    best = min(costs.step_s(rows, j, context) / (j + 1) for j in range(1, max(k, 1) + 1))
    return Payback(cost_s=cost, saved_s=steps * max_new_tokens * max(plain - best, 0.0))


def default_head_dir(model: str, task: str, task_config: dict | None = None, max_new_tokens: int = 64) -> Path:
    """The cached default head of a model (spec), task (name or data file) with its options, and
    completion length: each setting gets a head pretrained on its own kind of text."""
    ckpt = resolve_checkpoint(model)
    ident = json.dumps([str(ckpt) if ckpt else model, task, task_config or {}, pretrain_tokens(max_new_tokens),
                        DEFAULT_HEAD_RECIPE], sort_keys=True)
    return cache_dir() / "drafters" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def pilot_path(head_dir: Path, machine: str) -> Path:
    """Where the pilot of a default head's pretraining (`pretrain_default_head`) keeps what it measured,
    next to the head's directory, per machine kind (`machine`: the run's cost-profile key, which
    names the model, dtype, CPU or GPU and torch version): a later run weighs it without measuring
    again."""
    return head_dir.with_name(f"{head_dir.name}.pilot-{machine}.json")


def read_pilot(path: Path | None) -> dict | None:
    """A pilot's figures as `pretrain_default_head` wrote them; None where there are none (or they
    do not read: measured again)."""
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    parts = ("total_s", "rollout_s", "features_s", "train_s", "held_out_s")  # (what `pilot_verdict` reports)
    return data if isinstance(data, dict) and all(isinstance(data.get(k), (int, float)) for k in parts) else None


def pilot_verdict(pilot: dict, budget_s: float, *, measured_now: bool) -> str:
    when = f"{pilot['pilot_s']:.0f} s" if measured_now else "measured before on this machine"
    return (f"drafter: its pilot ({when}) "
            f"put the pretraining at about {pilot['total_s']:.0f} s (rollouts {pilot['rollout_s']:.0f}, features "
            f"{pilot['features_s']:.0f}, training {pilot['train_s']:.0f}, held-out {pilot['held_out_s']:.0f}) against at "
            f"most {budget_s:.0f} s saved: " + ("pretraining it" if pilot["total_s"] < budget_s else "not made"))


def pretrain_default_head(model: str, path: Path, tokenizer, task, *, max_new_tokens: int = 64, dtype: str = "auto",
                          device="cpu", seed: int = 0, k: int = 3, temperature: float = 1.0, log=print,
                          progress: bool = True, budget_s: float | None = None, machine: str | None = None) -> bool:
    """A short `train.py --stage drafter` run on `device`, written to a temporary directory and
    renamed into place (an interrupted pretraining leaves nothing half-written in the cache, and the
    next one removes its debris: respec/storage.py `staging`; of two nodes pretraining into one
    shared cache, the first to finish wins and both use its head). With a `budget_s` (the most the
    head could save in the run that asks for it) a pilot first measures what the pretraining will
    take here (respec/drafter_training.py `pretraining_pilot`; kept at `pilot_path(path, machine)`
    where a `machine` is named, and read from there by the next run), and a pretraining that would
    take longer is not made. Returns whether the head was made."""
    from respec.drafter_training import pretrain, pretraining_pilot

    target = load_model(model, dtype=dtype, device=device)
    recipe = DEFAULT_HEAD_RECIPE
    # Problems from far beyond any data position a run reaches: the head never sees the RL prompts.
    problems = task.problems(10**6, recipe["prompts"] + recipe["held_out"])
    if budget_s is not None:
        kept = pilot_path(path, machine) if machine else None
        pilot = read_pilot(kept)
        if pilot is None:
            pilot = pretraining_pilot(target, tokenizer, problems=problems, held_out=recipe["held_out"],
                                      new_tokens=pretrain_tokens(max_new_tokens), temperature=temperature,
                                      epochs=recipe["epochs"], batch=recipe["batch"], unroll=recipe["unroll"],
                                      lr=recipe["lr"], decay=recipe["step_decay"], max_batch=recipe["max_batch"],
                                      seed=seed)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                storage.write_text(kept, json.dumps(pilot) + "\n")
            log(pilot_verdict(pilot, budget_s, measured_now=True))
        if pilot["total_s"] >= budget_s:
            return False
    with storage.staging(path) as tmp:  # (removes what a killed pretraining left)
        t0 = time.perf_counter()
        pretrain(target, tokenizer, tmp, problems=problems, held_out=recipe["held_out"],
                 new_tokens=pretrain_tokens(max_new_tokens), temperature=temperature, epochs=recipe["epochs"],
                 unroll=recipe["unroll"], batch=recipe["batch"], lr=recipe["lr"], decay=recipe["step_decay"],
                 max_batch=recipe["max_batch"], seed=seed, held_out_ks=[k], greedy=False, log=log, progress=progress)
        log(f"drafter pretrained in {time.perf_counter() - t0:.0f} s")
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    return True


def default_head(model: str, task_name: str, task, tokenizer, *, task_config: dict | None = None,
                 max_new_tokens: int = 64, pretrain_here: bool = True, wait=lambda: None, log=print,
                 **pretrain_kw) -> Path | None:
    """The directory of the default head for this model and task; a missing one is pretrained
    where `pretrain_here` (the first rank of each node: each node has its own cache), and every
    caller then `wait()`s for it. None where a `budget_s` in `pretrain_kw` kept it from being made
    (`pretrain_default_head`)."""
    directory = default_head_dir(model, task_name, task_config, max_new_tokens)
    budget_s, machine = pretrain_kw.get("budget_s"), pretrain_kw.get("machine")
    if budget_s is not None and not (directory / "config.json").is_file():
        measured = read_pilot(pilot_path(directory, machine)) if machine else None
        if measured is not None:  # (no child process to start: what an earlier run's pilot measured here)
            if pretrain_here:
                log(pilot_verdict(measured, budget_s, measured_now=False))
            if measured["total_s"] >= budget_s:
                wait()
                return None
    if not (directory / "config.json").is_file():
        if pretrain_here:
            log(f"no cached drafter for this model, task and length: "
                + ("weighing" if "budget_s" in pretrain_kw else "pretraining") + f" one into {directory} (once)")
            # in a child process: the run that follows starts from the head on disk, not beside the
            # memory the pretraining held (respec/host_memory.py)
            host_memory.run_apart(pretrain_default_head, model, directory, tokenizer, task,
                                  max_new_tokens=max_new_tokens, log=log if host_memory.picklable(log) else _stderr,
                                  **pretrain_kw)
        wait()
    return directory if (directory / "config.json").is_file() or "budget_s" not in pretrain_kw else None


def ensure_head(spec: str, *, model: str, task_name: str, task, tokenizer, task_config: dict | None = None,
                max_new_tokens: int = 64, **pretrain_kw) -> Path | None:
    """Where `spec` asks for the default head (`auto`, alone or with model-free parts): its directory,
    pretrained first if the cache lacks it (`default_head`'s other arguments: `pretrain_kw`; None where
    its `budget_s` kept it from being made); None for any other spec, which `choose_drafter` loads as
    it is."""
    if spec == "none" or split_spec(spec)[0] != "auto":
        return None
    return default_head(model, task_name, task, tokenizer, task_config=task_config, max_new_tokens=max_new_tokens,
                        **pretrain_kw)


MODEL_FREE = ("replay", "history")


def split_spec(spec: str) -> tuple[str | None, list[str]]:
    """A `--drafter` spec's model part (None: none) and its model-free parts, in order."""
    parts = spec.split("+")
    free = []
    while parts and parts[-1] in MODEL_FREE:
        free.insert(0, parts.pop())
    if len(set(free)) < len(free):
        raise ValueError(f"--drafter {spec}: a model-free drafter named twice")
    head = "+".join(parts) or None
    if head in ("none", ""):
        raise ValueError(f"--drafter {spec}: 'none' cannot be combined")
    return head, free


def choose_drafter(spec: str, *, target, k: int, model: str, task_name: str, task, tokenizer, rollout_dtype,
                   task_config: dict | None = None, max_new_tokens: int = 64, seed: int = 0,
                   draft_temperature: float = 1.0) -> Chosen:
    """The drafter `spec` names, for `target` (the rollout model), loaded: with `auto` the default
    head `ensure_head` made (a missing one is an error). A head drafts at the rollout temperature
    times `draft_temperature`; `random` draws its untrained head's vocabulary from `task`'s prompts."""
    from respec.drafter_training import untrained_head
    from respec.drafters.eagle import EagleDrafter
    from respec.drafters.history import HistoryDrafter
    from respec.drafters.hybrid import HybridDrafter
    from respec.drafters.replay import ReplayDrafter
    from respec.solver import drafter_alpha
    from respec.tasks import chat_prompt

    if spec == "none":
        return Chosen(None)
    head_spec, proposers = split_spec(spec)

    def combined(model: Drafter | None) -> Drafter:
        """The model drafter alone, or with the named proposers per row (a hybrid given none would
        add history of its own: `auto` is the head alone, `auto+history` the two)."""
        made = [ReplayDrafter() if p == "replay" else HistoryDrafter() for p in proposers]
        if not made:
            return model
        return HybridDrafter(model, *made) if model is not None or len(made) > 1 else made[0]

    if head_spec is None:
        return Chosen(combined(None))
    kind, _, layers = head_spec.partition(":")
    if kind == "first":  # the rollout model's first N layers: shares its weights, so it never goes stale
        from models.drafter import truncated_drafter
        from respec.drafters.wrap import as_drafter

        if not layers.isdigit():
            raise ValueError(f"--drafter {spec}: first:N needs a number of layers")
        return Chosen(combined(as_drafter(truncated_drafter(target, int(layers)))))
    if head_spec not in ("auto", "random") and not (Path(head_spec) / "config.json").is_file():
        raise ValueError(f"drafter not found: {head_spec!r} (expected a drafter directory from train.py --stage "
                         "drafter, auto, random, first:N, history, replay, or a model spec joined by '+' with replay "
                         "and/or history)")
    device = next(target.parameters()).device
    prior, directory = None, None
    if head_spec == "random":  # cold start: an untrained head that only online distillation improves
        problems = task.problems(10**6, 64)  # far beyond any RL data position, as pretraining
        prompts = [chat_prompt(tokenizer, p.messages()) for p in problems]
        master = untrained_head(target, prompts, seed=seed)
        prior = [0.0] * k  # known to accept nothing until the estimate says otherwise
    else:
        directory = Path(head_spec) if head_spec != "auto" else default_head_dir(model, task_name, task_config,
                                                                                 max_new_tokens)
        if not (directory / "config.json").is_file():
            raise ValueError(f"--drafter {spec}: no default head in {directory} (ensure_head makes it first)")
        prior = drafter_alpha(directory, k)
        master = load_eagle(directory, dtype=torch.float32, device=device)
    drafter = combined(EagleDrafter(cast_head(master, rollout_dtype), draft_temperature))  # the engine's copy
    return Chosen(drafter, master, prior, directory)
