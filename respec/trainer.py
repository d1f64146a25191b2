"""The GRPO trainer: rollout through the (speculative) engine, rewards, the clipped GRPO update on an
FSDP2-sharded actor, checkpoints, metrics.

One step, as data flows (docs/walkthrough.md follows it through the files):

  1. data: the step's P prompts (data positions step*P .. step*P+P-1, so a resumed run sees the same
     data); rank r takes prompts r, r+W, r+2W, ... and rolls each out G times, each completion with
     its seed (respec/rollout_seeds.py: fresh per step, or a prompt's own across epochs) and, with a
     replay drafter, last epoch's completion of the same (prompt, sample);
  2. rollout: the engine generates all of this rank's P/W*G completions over one paged KV cache,
     with the SD policy (off / a fixed k / the adaptive solver) choosing k at every decoding step;
  3. rewards: the task's score of each completion (+ the optional format reward);
  4. advantages per group (a group lives on one rank), then `epochs` passes of `minibatches`
     optimizer steps each, the loss aggregated as `--loss-type` says (respec/grpo.py; by default
     a token-level mean over the global minibatch), with the rollout's own log-probs for the
     mismatch metrics and the optional correction;
  5. the rollout copy of the weights is refreshed from the updated actor, and the drafter is
     distilled from it (respec/online_learner.py: in the background, swapped in before the next
     rollout, by default);
  6. metrics to RUN_DIR/metrics.jsonl, a checkpoint every `checkpoint_every` steps.

Ctrl-C, a non-finite loss and a checkpoint that cannot be written stop the run as
respec/guards.py describes: with one line, and a checkpoint `--resume` can continue from.

Choices a reader should know:

* Two log-probs per completion token, kept apart. The ratio's pi_old is the training forward's
  before the update (with one pass, `epochs=1, minibatches=1`, the default, the same forward's,
  detached: the ratio is exactly 1 on the one update, with no extra pass). pi_rollout, what the
  engine sampled each token from (its own numerics: bf16 weights, paged attention, other batch
  shapes, the (k+1)-wide verify under SD), travels with each completion: its gap to pi_old is
  measured every step (respec/mismatch.py, the `mismatch_*` metrics, split by plain-decoding and
  SD-verify tokens: ReSpec's R1 shown, not assumed away), and `--is-correction` weights the
  surrogate by pi_old / pi_rollout, truncated or masked, as TRL and verl do (respec/grpo.py). With
  several passes the ratio keeps the first pass's pi_old and the correction the rollout's
  pi_rollout. With top-k, top-p or min-p the rollout's distribution is the filtered one and the
  trainer's is not: the gap then includes the filter's renormalisation.
* Minibatches are fixed, not shuffled: global minibatch m is the prompts m*P/M .. (m+1)*P/M-1 on
  any number of ranks, so one process and N ranks take the same optimizer steps on the same data.
* Each rank does the same number of forward/backward passes (microbatches are balanced across
  ranks): FSDP2's collectives must match one for one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.eagle import load_eagle
from models.loading import eos_token_ids, load_model, load_tokenizer, model_config, resolve_dtype
from respec import checkpoint, distributed, grpo, guards, host_memory, metrics, rewards
from respec.config import TrainConfig
from respec.drafter_choice import Chosen, Payback, choose_drafter, pretraining_payback, split_spec
from respec.drafters.replay import ReplayStore
from respec.engine import EngineStats, RolloutEngine, Stopped
from respec.flex_paged import require_cuda_compiled
from respec.episode import Episode, set_advantages
from respec.evaluation import Evaluation, held_out_problems
from respec.kv_cache import default_pool_bytes, pool_bytes_for
from respec.lora import apply_lora
from respec.online_learner import DrafterUpdate, OnlineLearner
from respec.profiling import StepTimer, warmup
from respec.rollout_seeds import RolloutSeeds
from respec.solver import AdaptiveK, FixedK, Policy, cost_key, drafter_alpha, load_or_profile
from respec.tasks import PromptFormat
from respec.update import MICRO_TOKENS, policy_update


@dataclass
class RunData:
    """What a run learns from, built and checked before anything heavy (train.py builds it before a
    default head is pretrained, so bad data costs no minutes): the rewards, the task, the prompt
    format and the held-out evaluation."""

    rewards: rewards.Rewards
    task: object  # respec/tasks.py: `problems(start, n)`
    prompt: PromptFormat
    evaluation: Evaluation


def run_data(cfg: TrainConfig, tokenizer, task=None) -> RunData:
    """The run's data, checked: every reward function callable on the first problems, every prompt
    of a task read from a file (and of the held-out set) within the model's context."""
    scorer = rewards.Rewards(cfg.rewards, format_weight=cfg.format_weight)
    numbers, required = scorer.scores_numbers_only, scorer.needs_answers  # what the rewards need of the answers
    task = task if task is not None else cfg.make_task(seed=cfg.seed, numeric_answers=numbers, answers_required=required)
    held_out = held_out_problems(cfg, task, numeric_answers=numbers, answers_required=required) \
        if cfg.eval_every or cfg.eval_at_start else []
    data = RunData(scorer, task, PromptFormat.make(cfg.raw_prompts, cfg.chat_template_kwargs),
                   Evaluation(held_out, cfg.eval_sampling(), generations=cfg.eval_generations))
    data.rewards.score(task.problems(0, 2), ["", ""], [[], []])  # a function that cannot be called: one line
    limit = model_config(cfg.model).max_position_embeddings
    located = getattr(task, "located_problems", None)  # (a generated task's prompts are short)
    for where, problem in [*(located() if located is not None else []),
                           *((f"held-out problem {i}", p) for i, p in enumerate(held_out))]:
        if (n := len(data.prompt.ids(tokenizer, problem))) >= limit:
            raise ValueError(f"{where}: prompt of {n} tokens does not fit the model's context of {limit}")
    return data


class Trainer:
    def __init__(self, cfg: TrainConfig, *, d: distributed.Dist, run_dir: Path, data: RunData | None = None,
                 tokenizer=None, log=None):
        """The run's collaborators, in the order they depend on each other; nothing trains, compiles
        or pretrains here (`start` compiles and plans; a default head is made by train.py, before or,
        where it waits for the cost model, after `start`: `adopt_head`)."""
        self.cfg, self.d, self.run_dir = cfg, d, Path(run_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if d.main else None)
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        data = data if data is not None else run_data(cfg, self.tok)
        self.rewards, self.task, self.prompt, self.evaluation = data.rewards, data.task, data.prompt, data.evaluation
        self.rollout_dtype = resolve_dtype(cfg.dtype, d.device)
        self.train_dtype = resolve_dtype(cfg.train_dtype, d.device)
        self._build_actor()  # the actor, its rollout copy, the reference, the optimizer and its schedule
        self._build_drafter()  # the drafter --drafter names, loaded
        self._build_engine()  # the KV pool and the rollout engine
        kd = cfg.kd(d.device.type) if self.master is not None else None  # the head's online distillation, unless frozen
        # a head with an acceptance estimate (a report's, not a cold start's) is distilled within its budget
        budgeted = bool(self.drafter_prior) and any(a > 0 for a in self.drafter_prior)
        self.learner = OnlineLearner(self.master, kd, world=d.world, k=cfg.k, main=d.main,
                                     budgeted=budgeted) if kd else None
        self.policy: Policy = FixedK(0)  # the SD policy of the rollouts: `start` makes it
        self.seeds = RolloutSeeds(cfg.rollout_seeds, seed=cfg.seed, group=cfg.group, reseed_every=cfg.reseed_every)
        # last epoch's completion of every (row, sample), where a replay drafter proposes from them
        self.replays = ReplayStore() if self.drafter is not None and "replay" in split_spec(cfg.drafter)[1] else None
        self.stop = guards.StopRequest()  # entered by run(): Ctrl-C asks the run to stop
        self.saved_step: int | None = None  # the step of the newest checkpoint written or resumed
        self.solver_state: dict | None = None  # the adaptive solver's state from a checkpoint (load_state_dict)
        self.step = 0
        self.started = False  # start() ran
        self.peak_flops, self.peak_source = 0.0, ""  # set by start(): FLOP/s over all ranks, and where from
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.metrics_log: metrics.MetricsLog | None = None  # run() opens it
        self.completions_path = self.run_dir / "completions.jsonl"

    def _build_actor(self) -> None:
        """The actor: fp32 master weights, sharded under torchrun (only rank 0 ever holds it whole).
        With LoRA only the adapters train; the rollout reads the merged weights (respec/lora.py)."""
        cfg, d = self.cfg, self.d
        torch.manual_seed(cfg.seed)
        load = lambda: load_model(cfg.model, dtype=torch.float32, device=d.device, seed=cfg.seed)  # noqa: E731
        sharded = d.world > 1 or cfg.fsdp == "on"
        self.actor = distributed.load_sharded(lambda: load().requires_grad_(True), d, param_dtype=self.train_dtype,
                                              shard=sharded, prepare=(lambda m: apply_lora(m, cfg.lora())) if cfg.lora_r
                                              else None)
        # Model FLOPs per trained token (forward + backward = 6 per weight): every weight but the
        # embedding's for every token, the output head's only for completion tokens (the only
        # positions it runs on, grpo.token_logprobs).
        self.n_params = sum(p.numel() for p in self.actor.parameters())
        self.n_head = self.actor.lm_head.weight.numel()
        self.n_body = self.n_params - self.actor.embed_tokens.weight.numel() - (
            0 if self.actor.cfg.tie_word_embeddings else self.n_head)
        self.rollout = distributed.RolloutCopy(self.actor, dtype=self.rollout_dtype, sharded=sharded,
                                               captured=cfg.compile_mode == "graphs")
        self.reference = None
        if cfg.kl_coef > 0:  # the frozen initial model, sharded like the actor (each rank keeps 1/W of it)
            self.reference = distributed.load_sharded(lambda: load().requires_grad_(False), d,
                                                      param_dtype=self.train_dtype, shard=d.world > 1)
        # fused: one kernel over all parameters, the fastest of torch's AdamW implementations here
        self.optimizer = torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=(0.9, 0.99), weight_decay=cfg.weight_decay, eps=1e-8, fused=True)
        total_updates = cfg.steps * cfg.epochs * cfg.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: grpo.warmup_cosine(s, total=total_updates, warmup=cfg.warmup_steps,
                                                         min_ratio=cfg.min_lr_ratio))
        self.update_cfg = cfg.update()
        self.micro_tokens = cfg.micro_tokens or MICRO_TOKENS.get(d.device.type, MICRO_TOKENS["cpu"])

    def _build_drafter(self) -> None:
        """The drafter `--drafter` names for the rollout model (None with SD off), its fp32 master
        weights where it has a head to distil, and the solver's prior acceptance."""
        cfg = self.cfg
        self.sd_reason = "--sd off" if cfg.sd == "off" else "no drafter (--drafter none)" if cfg.drafter == "none" else ""
        chosen = Chosen(None) if cfg.sd == "off" else choose_drafter(
            cfg.drafter, target=self.rollout.model, k=cfg.k, model=cfg.model,
            task_name=cfg.task if cfg.data is None else str(cfg.data), task=cfg.pretraining_task(), tokenizer=self.tok,
            task_config=cfg.task_config, max_new_tokens=cfg.max_new_tokens, rollout_dtype=self.rollout_dtype,
            seed=cfg.seed, draft_temperature=cfg.draft_temperature)
        self.drafter, self.master, self.drafter_prior = chosen.drafter, chosen.master, chosen.prior
        # the head's weights go into checkpoints; a model-free drafter has none, and `first:N` shares the actor's
        self.head_module = self.drafter.module if self.master is not None else None

    def _build_engine(self) -> None:
        """The rollout engine over a KV pool of `--kv-cache-mb`, or the default (after the models, on a
        GPU), at most what the engine can fill: its every row at the model's whole context."""
        cfg, model = self.cfg, self.actor.cfg
        most = pool_bytes_for(rows=cfg.max_batch, tokens=model.max_position_embeddings, num_layers=model.num_layers,
                              num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, dtype=self.rollout_dtype,
                              draft_shape=self.drafter.pool_shape if self.drafter is not None else None)
        pool = cfg.kv_cache_mb << 20 if cfg.kv_cache_mb else default_pool_bytes(self.d.device, most=most)
        compiled = cfg.compile == "on" or (cfg.compile == "auto" and self.d.device.type == "cuda")
        if cfg.attention == "flex":
            require_cuda_compiled(self.d.device, compiled)
        self.engine = RolloutEngine(self.rollout.model, kv_cache_bytes=pool, max_batch=cfg.max_batch,
                                    eos_token_ids=eos_token_ids(self.tok, self.actor), eager=not compiled,
                                    compile_mode=cfg.compile_mode, drafter=self.drafter,
                                    num_draft_tokens=cfg.k if self.drafter is not None else 0, verify=cfg.verify,
                                    replay_k=cfg.replay_k, run_ahead=cfg.run_ahead, attention=cfg.attention)

    # ------------------------------------------------------------------------------------------
    def start(self, checkpoint_dir: Path | None = None) -> dict:
        """Everything between building the collaborators (`__init__`) and the first step, in the
        order it must happen; returns timings.

          1. restore a checkpoint, if given: the actor, optimizer, scheduler and drafter weights, the
             learner's state, the drafter's earlier rollouts, and the solver's acceptance, which step
             3 starts from;
          2. compile the engine's step shapes (the drafter's too);
          3. the SD policy: fixed k, or the solver from the cost model (profiled once, cached) and the
             acceptance prior (the drafter's pretraining report, or what step 1 restored);
          4. the peak FLOP/s the MFU metric divides by (a GPU's datasheet figure, else a timed
             GEMM: respec/metrics.py `peak_flops`), summed over ranks."""
        if checkpoint_dir is not None:
            self._restore(checkpoint_dir)
        # the synthetic sequences that compile and time the steps leave no history behind: the
        # drafter carries into step 1 what it had (a resumed run, exactly what it was saved with)
        carried = self.drafter.state_dict() if self.drafter is not None else None
        out = self._compile_and_plan()
        if carried is not None:
            self.drafter.load_state_dict(carried)
        peak, self.peak_source = metrics.peak_flops(self.train_dtype, self.d.device)
        (self.peak_flops,) = distributed.all_reduce_sum([peak], self.d)
        self.log(f"peak {peak / 1e12:.3g} TFLOP/s per process in {self.train_dtype} ({self.peak_source}): "
                 "the MFU's denominator")
        self.started = True
        return out

    def _compile_and_plan(self) -> dict:
        """Steps 2 and 3 of `start`."""
        cfg, out = self.cfg, {}
        local_batch = cfg.prompts // self.d.world * cfg.group
        ks = [0] if self.drafter is None else ([0, cfg.k] if cfg.sd == "on" else list(range(cfg.k + 1)))
        out["compile_s"] = warmup(self.engine, [min(local_batch, cfg.max_batch)], ks=ks, progress=cfg.progress and self.d.main)
        if self.drafter is None:
            self.log(f"speculative decoding off: {self.sd_reason}")
        elif cfg.sd == "on":
            self.policy = FixedK(cfg.k)
        else:
            # step costs depend on the drafter's shape, not on its weights: one profile per architecture
            key = cost_key(cfg.model, self.engine.drafter.describe(), self.engine)
            t0 = time.perf_counter()
            batches = sorted({1, min(4, local_batch), min(16, local_batch), min(local_batch, cfg.max_batch)})
            costs, cached = load_or_profile(StepTimer(self.engine), key,
                                            batch_sizes=batches, ks=self._profiled_ks(),
                                            contexts=(64, 64 + cfg.max_new_tokens), progress=cfg.progress and self.d.main)
            out["profile_s"] = round(time.perf_counter() - t0, 1)
            self.policy = AdaptiveK(costs, cfg.k, self.drafter_prior)
            if self.solver_state:  # a resumed run's, as it was saved
                self.policy.load_state_dict(self.solver_state)
            self.log(f"SD adaptive: cost model {'cached' if cached else 'profiled'} (fit error {costs.rel_error:.1%}), "
                     f"initial acceptance {[round(a, 2) for a in self.policy.alpha]}")
        return out

    def head_payback(self) -> Payback | None:
        """After `start`: whether the default head's pretraining can pay back in the steps left
        (respec/drafter_choice.py `pretraining_payback`, from this run's fitted step costs; None
        without a cost model: a fixed k, whose user asked for speculation, always gets the head).
        Every rank decides alike: each figure is the largest over ranks."""
        if not isinstance(self.policy, AdaptiveK):
            return None
        cfg = self.cfg
        rows = min(cfg.prompts // self.d.world * cfg.group, cfg.max_batch)
        p = pretraining_payback(self.policy.costs, rows=rows, steps=cfg.steps - self.step,
                                max_new_tokens=cfg.max_new_tokens, k=cfg.k)
        cost, saved = distributed.all_reduce_max([p.cost_s, p.saved_s], self.d)
        return Payback(cost, saved, machine=self.policy.costs.key)

    @torch.no_grad()
    def adopt_head(self, directory: Path) -> None:
        """A head pretrained after `start` (the run began with an untrained one of the same shape):
        its weights into the master copy and the engine's, its held-out acceptance to the solver, and
        its first distillation budgeted like any later one."""
        head = load_eagle(directory, dtype=torch.float32, device=self.d.device)
        if head.cfg.to_json() != self.master.cfg.to_json():
            raise ValueError(f"the head in {directory} is not the shape this run compiled for")
        self.master.load_state_dict(head.state_dict())
        self.engine.load_drafter_weights(self.master)
        prior = drafter_alpha(directory, self.cfg.k)
        self.drafter_prior = prior
        if prior and isinstance(self.policy, AdaptiveK):
            self.policy.set_alpha(prior)
        if self.learner is not None:
            self.learner.budgeted = bool(prior) and any(a > 0 for a in prior)
        self.log(f"drafter: the default head from {directory}, initial acceptance "
                 f"{[round(a, 2) for a in self.policy.alpha] if isinstance(self.policy, AdaptiveK) else prior}")

    def apart_from_rollout(self, job):
        """`job()` (a default head pretrained after `start`, in a child process) while the rollout's
        copies of the weights are dropped, as during an update, and made again after it: beside the
        child the run holds the actor's master weights, not its rollout copies too."""
        self.engine.release_weights()
        self.rollout.release()
        self.release_host_memory()
        try:
            return job()
        finally:
            self.rollout.sync()
            self.engine.sync_weights()

    def keep_untrained_head(self) -> None:
        """The untrained head a run started with stays (the default head's pretraining could not pay
        back within it): its distillation, an investment of the same kind, waits for its budget
        from the first one on (respec/online_learner.py `due`)."""
        if self.learner is not None:
            self.learner.budgeted = True

    def _profiled_ks(self) -> list[int]:
        """Draft lengths the cost profile times: the model's, and a replay group's widest verify."""
        cfg = self.cfg
        ks = {0, 1, max(1, cfg.k // 2), cfg.k}
        if self.replays is not None and cfg.replay_k > cfg.k:
            ks.add(cfg.replay_k)
        return sorted(ks)

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """The RL steps up to `cfg.steps` (after `start`)."""
        if not self.started:
            raise RuntimeError("Trainer.start() must run before Trainer.run()")
        cfg, d = self.cfg, self.d
        history = []
        streak = guards.BadStepStreak(limit=3)
        stopped = False
        log = self.metrics_log = metrics.MetricsLog(self.run_dir, main=d.main, report_to=cfg.report_to,
                                                    config=dataclasses.asdict(cfg))
        if cfg.eval_at_start and self.step == 0:  # the policy before any update: metrics.jsonl's step 0
            before = {"step": 0, **self.evaluate()}
            log.write(before)
            self.log(f"step 0 | held-out acc {before['eval_accuracy']:.3f}")
        with self.stop:
            while self.step < cfg.steps:
                try:
                    m = self.train_step()
                except Stopped:  # Ctrl-C in a rollout: nothing has changed since the last completed step
                    stopped = True
                    break
                self.step += 1
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    m.update(self.evaluate())
                history.append(m)
                log.write(m)
                if d.main:
                    self.log(metrics.log_line(m))
                all_skipped = m["skipped_updates"] == cfg.epochs * cfg.minibatches
                if not all_skipped and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save()
                streak.record(all_skipped, self.step, self.saved_step)
                stopped = distributed.all_reduce_max([float(self.stop.requested)], d)[0] > 0  # every rank agrees
                if stopped:
                    break
        if stopped:
            if self.saved_step != self.step:
                self.save()
            raise guards.RunInterrupted(f"interrupted: the checkpoint of step {self.step} is in "
                                        f"{checkpoint.checkpoint_root(self.run_dir)}; continue with --resume {self.run_dir}")
        if self.learner is not None:  # the last step's update, if it ran in the background
            with guards.announced("teardown", "last drafter update", self.log):
                self.apply_drafter_update(self.learner.before_rollout())
        with guards.announced("teardown", "close the metrics log", self.log):  # trackers flush and finish
            log.close()
        return history

    def save(self) -> None:
        with guards.announced("checkpoint", f"step {self.step}", self.log):  # a hang in it names itself
            checkpoint.save(self.run_dir, self.step, self.d, actor=self.actor, optimizer=self.optimizer,
                            scheduler=self.scheduler, drafter=self.head_module,
                            progress={"step": self.step, "data_position": self.step * self.cfg.prompts},
                            keep=self.cfg.keep_checkpoints, **self.components())
        self.saved_step = self.step

    def _restore(self, path: Path) -> None:
        """Step 1 of `start`."""
        progress = checkpoint.load(path, self.d, actor=self.actor, optimizer=self.optimizer,
                                   scheduler=self.scheduler, drafter=self.head_module, **self.components())
        self.step = self.saved_step = int(progress["step"])
        self.after_update()
        self.forget_metrics_after(self.step)

    def components(self) -> dict[str, dict]:
        """What a checkpoint holds besides the actor, its optimizer and schedule and the head's weights
        (respec/checkpoint.py): each component by name, with its own `state_dict()`. Shared: the same
        on every rank. Per rank: the drafter, whose earlier rollouts (a history drafter's draft
        sources) are of the rank's own prompts; a drafter that carries nothing between rollouts
        hands over {}."""
        shared = {"trainer": self, "rollout_seeds": self.seeds, "drafter_learner": self.learner,
                  "replays": self.replays}
        return {"shared": {name: c for name, c in shared.items() if c is not None},
                "per_rank": {"drafter": self.drafter} if self.drafter is not None else {}}

    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint: the adaptive solver's acceptance (its online EMA)."""
        return {"solver_alpha": list(self.policy.alpha), "solver": self.policy.state_dict()} \
            if isinstance(self.policy, AdaptiveK) else {}

    def load_state_dict(self, state: dict) -> None:
        """Step 3 of `start` builds the solver with the restored acceptance."""
        self.drafter_prior = state.get("solver_alpha", self.drafter_prior)
        self.solver_state = state.get("solver")  # (a checkpoint written before the calibration has none)

    def forget_metrics_after(self, step: int) -> None:
        """Drop metrics and completions of steps after `step`: a run killed between checkpoints
        redoes them."""
        if self.d.main:
            metrics.forget_after([self.metrics_path, self.completions_path], step)
        distributed.barrier(self.d)

    def after_update(self) -> None:
        """The rollout engine reads the new weights (all-gather into the copy; repack). A background
        drafter update reads the rollout copy as its teacher: it must be done before the copy changes."""
        if self.learner is not None:
            self.learner.wait()
        self.rollout.sync()
        self.engine.sync_weights()

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One GRPO step, numbered as the module docstring numbers it."""
        cfg, d = self.cfg, self.d
        t_step = time.perf_counter()
        timings = {"drafter_s": 0.0}  # and each phase's seconds, as it ends
        episodes, epoch = self.make_episodes()  # 1. data
        drafter_version = self.learner.live_version if self.learner is not None else 0  # drafter updates in it
        with timed(timings, "rollout_s"):
            stats, replay_rows = self.generate(episodes)  # 2. rollout
        # the adaptive solver's prediction against this rollout's verifies; its calibration refitted
        solver = self.policy.end_rollout() if isinstance(self.policy, AdaptiveK) else None
        with timed(timings, "drafter_s", add=True):  # a background drafter update, for the next rollout
            kd = self.apply_drafter_update(self.learner.before_rollout()) if self.learner is not None else None
        self.engine.release_weights()  # nothing decodes until step 5 syncs the new weights
        self.rollout.release()  # (nor reads the rollout copy: the background distillation was joined above)
        self.release_host_memory()  # (after the background distillation, joined above, freed its memory)
        with timed(timings, "reward_s"):
            self.score(episodes)  # 3. rewards
        metrics.write_completions(self.completions_path, episodes, self.step + 1, cfg.log_completions, d,
                                  self.metrics_log)
        signal = set_advantages(episodes, cfg.group, scale_by_std=cfg.scale_adv_by_std)  # 4. advantages
        self.remember(episodes, signal)
        with timed(timings, "train_s"):  # the update alone: the MFU divides its FLOPs by this time
            upd = policy_update(self.actor, self.optimizer, self.scheduler, episodes, self.update_cfg, d,  # 4. update
                                reference=self.reference, micro_tokens=self.micro_tokens,
                                train_dtype=self.train_dtype, progress=cfg.progress)
            if d.device.type == "cuda":  # its kernels finished, not only queued
                torch.cuda.synchronize(d.device)
        with timed(timings, "sync_s"):
            self.after_update()  # 5. the rollout copy reads the new weights
        self.release_host_memory()
        # the drafter's online distillation from the updated actor, due when the head drafted in this
        # rollout (replay and history verifies do not use it), the same decision on every rank
        drafted = distributed.all_reduce_max([float(stats.proposed_by("model"))], d)[0] > 0
        if self.learner is not None:
            with timed(timings, "drafter_s", add=True):
                update = self.learner.after_update(self.rollout.model, episodes, drafted, self.step)
                kd = self.apply_drafter_update(update) or kd
        timings["step_s"] = time.perf_counter() - t_step
        if self.learner is not None:
            self.learner.account(timings["step_s"], solver.saved_s if solver is not None else 0.0, timings["train_s"])
        return self.step_metrics(episodes, stats, upd, timings, kd=kd, epoch=epoch,  # 6. metrics
                                 drafter_version=drafter_version, replay_rows=replay_rows, solver=solver)

    def release_host_memory(self) -> None:
        """On a CPU, what a phase freed goes back to the OS before the next one allocates
        (respec/host_memory.py); a GPU's memory is the caching allocator's business."""
        if self.d.device.type == "cpu":
            host_memory.release_free_memory()

    def step_metrics(self, episodes: list[Episode], stats: EngineStats, upd: dict, timings: dict, **step) -> dict:
        """Step 6: the step's line of metrics.jsonl (respec/metrics.py), over all ranks."""
        cfg = self.cfg
        if "mismatch_worst" in upd:
            upd["mismatch_worst"]["token"] = self.tok.decode([upd["mismatch_worst"]["token_id"]])
        inputs = metrics.StepInputs(
            step=self.step + 1, group=cfg.group, k=cfg.k, reward_names=self.rewards.names, timings=timings,
            update=upd, lr=self.scheduler.get_last_lr()[0],
            replay_store_bytes=self.replays.nbytes() if self.replays is not None else 0,
            flops_per_token=(self.n_body, self.n_head), peak_flops=self.peak_flops, **step)
        sums = distributed.all_reduce_named(metrics.rank_sums(episodes, stats, inputs), self.d)
        return metrics.step_metrics(sums, stats, inputs, self.d)

    def make_episodes(self) -> tuple[list[Episode], int]:
        """Step 1: this rank's episodes (its prompts r, r+W, ..., G samples each with its seed), and
        the data epoch of the step's first prompt."""
        cfg, d = self.cfg, self.d
        P, G = cfg.prompts, cfg.group
        problems = self.task.problems(self.step * P, P)
        # each problem's row in the training set (a task that does not say: its data position)
        keys = [k if (k := getattr(p, "key", -1)) >= 0 else self.step * P + i for i, p in enumerate(problems)]
        size = getattr(self.task, "size", None)
        epochs = [(self.step * P + i) // size if size else 0 for i in range(P)]
        seeds = self.seeds.step_seeds(self.step, keys, epochs)  # global order: prompt-major
        episodes = []
        for i in range(d.rank, P, d.world):
            prompt = self.prompt.ids(self.tok, problems[i])
            episodes += [Episode(problems[i], i, keys[i], g, seeds[i * G + g], prompt) for g in range(G)]
        return episodes, epochs[0]

    def generate(self, episodes: list[Episode]) -> tuple[EngineStats, int | None]:
        """Step 2: every episode's completion; the engine's statistics and the rows that had a replay."""
        cfg, d = self.cfg, self.d
        params = [cfg.sampling(e.seed) for e in episodes]
        replays = None if self.replays is None else [self.replays.get(e.key, e.sample) for e in episodes]
        with tqdm(total=len(episodes), desc=f"step {self.step + 1} rollout", disable=not (cfg.progress and d.main),
                  file=sys.stderr, leave=False) as bar:
            # one process abandons the rollout on Ctrl-C; ranks finish theirs and agree after the step
            stop = (lambda: self.stop.requested) if d.world == 1 else None  # noqa: E731
            completions = self.engine.generate([e.prompt_ids for e in episodes], params, replays=replays,
                                               policy=self.policy, on_finish=bar.update, should_stop=stop)
        for e, c in zip(episodes, completions):
            e.completion = c
        return completions.stats, None if replays is None else sum(r is not None for r in replays)

    def score(self, episodes: list[Episode]) -> None:
        """Step 3: each completion's text and rewards."""
        for e in episodes:
            e.text = self.tok.decode(e.completion.token_ids, skip_special_tokens=True)
        try:
            scored = self.rewards.score([e.problem for e in episodes], [e.text for e in episodes],
                                        [e.completion.token_ids for e in episodes])
        except ValueError as e:  # checked on two problems before the run; this one appeared in a step
            kept = f"the last checkpoint (step {self.saved_step}) is kept" if self.saved_step else "no checkpoint was written"
            raise guards.RunFailed(f"step {self.step + 1}: {e}; stopped, {kept}") from e
        for e, s in zip(episodes, scored):
            e.score = s

    def apply_drafter_update(self, update: DrafterUpdate | None) -> dict | None:
        """A finished drafter update into the rollout: its weights into the head the engine drafts
        with, its acceptance estimate to the adaptive solver; returns its figures for the step's
        metrics (None: nothing finished)."""
        if update is None:
            return None
        if update.head is not None:
            self.engine.load_drafter_weights(update.head)
        if update.alpha_est is not None and isinstance(self.policy, AdaptiveK):
            self.policy.set_alpha(update.alpha_est)
        return update.stats

    def remember(self, episodes: list[Episode], signal: list[bool]) -> None:
        """After the rewards: every rank learns every group's signal (the seeds reseed groups without
        one) and, with a replay drafter, every completion (the next epoch may roll a prompt out on
        another rank)."""
        G, keep = self.cfg.group, self.replays is not None
        local = [(episodes[j * G].key, has_signal,
                  [e.completion.token_ids for e in episodes[j * G:(j + 1) * G]] if keep else None)
                 for j, has_signal in enumerate(signal)]
        for part in distributed.all_gather(local, self.d):
            for key, has_signal, outs in part:
                self.seeds.observe([key], [has_signal])
                for g, ids in enumerate(outs or []):
                    self.replays.put(key, g, ids)

    def evaluate(self) -> dict:
        """The held-out evaluation (respec/evaluation.py) of the current weights."""
        return self.evaluation.run(self.engine, self.tok, self.rewards, self.d, prompt=self.prompt)


@contextlib.contextmanager
def timed(timings: dict, name: str, *, add: bool = False):
    """Seconds spent in the block, into timings[name] (added to it with `add`)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = (timings.get(name, 0.0) if add else 0.0) + time.perf_counter() - t0
