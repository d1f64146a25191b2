"""The drafter's online learner: distils the EAGLE head from the actor while GRPO trains it.

The actor changes every RL step, so a drafter fitted once goes stale. The learner owns the head's
master weights, its schedule and its export; it holds no engine. The drafter flows one way: each
hook returns what changed (`DrafterUpdate`: new weights and their version, the acceptance estimate,
the figures), and the trainer applies it (the weights into the head the engine drafts with, the
estimate to the solver). The trainer calls three hooks, and its checkpoints hold `state_dict()`:

  before_rollout()                          a finished background update, to apply before the rollout
  after_update(model, episodes, ...)        the step's episodes, weighted by w(r), distilled from
                                            the updated actor when `due` (below); a synchronous
                                            update is returned at once
  export(dir)                               the head as trained so far, with its estimate as a prior

Inside, `submit` hands the work the step's completions and their weights w(r):

  1. teacher signal: one no-grad forward of the *updated* actor (the rollout copy) over the
     sequences (each prompt once for its G samples) gives what the head needs, the outputs of its three feature layers and the final
     hidden state, plus the log-partition of the full-vocabulary logits (for the acceptance
     estimate); stored with each sequence's weight in a replay buffer;
  2. every `interval` steps one drafter update: `epochs` passes over the buffer in minibatches of
     `batch` sequences (over all ranks), each one AdamW step on the training-time-test loss of
     respec/distill.py weighted as respec/kd_loss.py says, its forward under autocast to the
     rollout dtype (bf16 where native; fp32 master weights and optimizer); the buffer is then emptied;
  3. from the same forwards (first pass only: data the head has not been trained on yet), the
     acceptance estimate alpha_j = mean over tokens of 1 - TV(p_actor, q_draft) at draft position j,
     which goes to the solver (`AdaptiveK.set_alpha`): a drafter that starts weak is trained while
     SD stays off, and SD turns itself on once the estimate says it pays;
  4. `collect` hands the new weights out (the trainer copies them into the head the engine drafts
     with, in the rollout dtype), always between rollouts.

When to distil (`due`, the schedule in one place): after every RL step whose rollout drafted with
the head, and every `idle_interval` steps while the rollouts do not (the solver keeps the head off;
verifies of replayed or history drafts do not count, since they do not use the head). Distilling
still pays then, since the head must keep up with the actor for its acceptance estimate to turn SD
back on, but not every step: where SD stays off for most decoding steps a distillation per step
costs more than it can buy (docs/benchmarks.md measures it). And within a `budget`: the
distillation's seconds so far (in line, or in the background, where on a CPU it takes the cores of
the rollout beside it), with the next one's, at most that share of the run's plus the decoding time
the speculation has saved so far (the solver's account: each verify against plain decoding's time
for its tokens, from the cost model and what the verify emitted). The next one is expected to take
what the last one took; before the first, what the step's actor update took (a distillation is a
forward of the actor over the step's sequences and a training pass of the head on them: measured
at 0.6-2.3x the update on a 2-core CPU). The distillation is an investment the speculation repays:
a small share to keep the head and its estimate from going stale, and whatever SD earned back. A
head that comes with an acceptance estimate of its own (an exported head's report, the default
head's) waits for its budget like any later distillation (`budgeted`), and so does the untrained
head a run keeps where the default head's pretraining could not pay back within it (train.py
`decide_head`: its distillation cannot be assumed to either); an untrained one asked for
(`--drafter random`) is distilled at the first step whatever it costs, since until then the solver
has no estimate that could turn SD on.
On a few CPU cores a distillation after every step cost more time than the speculation it enabled
saved (docs/benchmarks.md); on a GPU it has a stream of its own and no bound.

In line or in the background: with `async_update` (the trainer's default, `--drafter-async on`),
steps 1-3 run in a background thread (on CUDA on a stream of their own) while the next rollout runs,
drafting with the previous weights; `collect` after that rollout waits for it and hands the new
weights out. Everything the thread reads (the rollout copy of the actor) stays unchanged until the
next actor update, which comes after `collect`. On few CPU cores the two share the cores
(docs/benchmarks.md measures what the overlap gains and costs).

Data parallelism: the head (10M parameters for SmolLM2) is replicated on every rank and its
gradients all-reduced (summed; each rank's loss is divided by the *global* weighted token count).
Minibatches are not shuffled: minibatch m is the m-th `batch / world` sequences of every rank, which
(prompts being dealt round-robin, `batch` a multiple of world x group) is the same set of sequences
on any number of ranks, so N ranks take the same drafter updates as one process.
Sharding it would save ~40 MB of optimizer state per rank at the price of FSDP collectives on every
minibatch. The reductions run on a gloo process group of their own, over CPU tensors (the gradients
as one flat buffer per optimizer step): a background update issues them from its thread while the
main thread issues the trainer's (NCCL on GPUs) in another order, and two NCCL communicators used
concurrently from two threads can deadlock (each rank's kernels of one wait for peers stuck behind
kernels of the other); gloo's run on CPU threads and never queue behind a GPU kernel.

Departures from the paper: the teacher signal is recomputed after the update by a forward of the
rollout copy (the training forward's activations are from the pre-update actor, and on CPU the
no-grad forward in the rollout dtype is cheap); the replay buffer holds the last `interval` steps
only, no older rollouts.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from models.eagle import EagleHead, save_eagle
from respec import storage
from respec.config import KDConfig
from respec.distill import Sequences, collate, head_loss, target_features
from respec.grpo import warmup_cosine
from respec.kd_loss import sequence_weights
from respec.solver import expected_tokens


@dataclass
class DrafterUpdate:
    """A finished distillation, for the trainer to apply before the next rollout."""

    stats: dict  # its figures for the step's metrics (kd_*, and alpha_est / accept_est when finite)
    head: EagleHead | None = None  # the learner's master weights, to copy into the head the engine drafts
    # with; None: unchanged since the last update handed out
    version: int = 0  # the learner's update count those weights are
    alpha_est: list[float] | None = None  # the head's acceptance estimate for the solver (None: none usable)


@dataclass
class _Item:
    tokens: list[int]  # prompt + completion
    prompt_len: int
    weight: float  # w(r)
    feats: tuple  # (taps (T, 3d), final (T, d), lse (T,)) from the updated actor, CPU fp32


class OnlineLearner:
    """See the module docstring. `head` is the trainable fp32 master copy (the engine drafts with a
    copy of its weights in the rollout dtype, which the trainer refreshes from `DrafterUpdate`s)."""

    def __init__(self, head: EagleHead, cfg: KDConfig, *, world: int = 1, k: int = 3, main: bool = True,
                 budgeted: bool = False):
        cfg.validate()
        self.cfg, self.k, self.world, self.main = cfg, k, world, main
        self.budgeted = budgeted  # its first distillation waits for the budget too (below, `due`)
        # the latest finite acceptance estimate: the solver's, and the exported head's prior
        self.last_alpha_est: list[float] | None = None
        self.head = head.float().train().requires_grad_(True)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                     fused=True)
        self.buffer: list[_Item] = []
        self.updates = 0  # drafter updates done (the learner's version)
        self.opt_steps = 0  # drafter optimizer steps taken (the LR warm-up counts them)
        self.live_version = 0  # the version last handed out (what the engine drafts with)
        self.last_submit: int | None = None  # the RL step last handed over
        self.spent_s = 0.0  # seconds of distillation so far (in line or in the background)
        self.run_s = 0.0  # seconds of RL steps so far (`account`): the budget is a share of them
        self.saved_s = 0.0  # decoding seconds SD saved so far, the solver's estimate (`account`): earned back
        self.last_s: float | None = None  # seconds the last distillation took: what the next is expected to
        self.update_s = 0.0  # seconds the last step's actor update took: what the first is expected to (`account`)
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # the head's own (module docstring)
        self.stream = torch.cuda.Stream() if next(head.parameters()).device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: dict | None = None  # stats of the last finished work, not yet collected

    # --- what the GRPO trainer calls ---------------------------------------------------------
    def before_rollout(self) -> DrafterUpdate | None:
        """Between rollouts: a finished background update (None: nothing finished)."""
        return self.collect() if self.cfg.async_update else None

    def after_update(self, model, episodes, drafted: bool, step: int) -> DrafterUpdate | None:
        """After the actor's update (`model` holds its new weights): distil this step's episodes if
        it is due, each weighted by w(r) (rewards normalised over every rank's batch); a synchronous
        update is returned at once."""
        if not self.due(step, drafted):
            return None
        rewards = torch.tensor([e.score.reward for e in episodes], dtype=torch.float32)
        advantages = torch.tensor([e.advantage for e in episodes], dtype=torch.float32)
        n, total, sq = self._all_reduce([rewards.numel(), float(rewards.sum()), float((rewards ** 2).sum())])
        mean = total / n
        weights = sequence_weights(self.cfg.weighting, rewards, advantages, mean=mean,
                                   std=math.sqrt(max(sq / n - mean ** 2, 0.0)))
        self.submit(model, [e.tokens for e in episodes], [len(e.prompt_ids) for e in episodes], weights, step)
        return None if self.cfg.async_update else self.collect()

    def export(self, out_dir: Path) -> None:
        """The head as trained so far (`--drafter DIR` loads it), with its last acceptance estimate
        as the solver's prior; written aside and swapped in (main rank only)."""
        if not self.main:
            return
        with storage.staging(out_dir) as tmp:
            save_eagle(self.head, tmp)
            if self.last_alpha_est:
                (tmp / "train_report.json").write_text(json.dumps({"alpha_estimate": self.last_alpha_est}) + "\n")
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)

    # ------------------------------------------------------------------------------------------
    def due(self, step: int, drafted: bool) -> bool:
        """Whether RL step `step` is distilled (see the module docstring): after a rollout in which
        the head drafted, else once every `idle_interval` steps; and only while the distillation's
        time so far plus the next one's expected time is within its `budget` share of the run's plus
        what SD saved so far. The first one is due at once where there is no budget (1) or the head
        is not `budgeted` (an untrained head asked for).
        Every rank must pass the same `drafted`; the budget's times are summed over ranks."""
        if self.last_submit is None and (not self.budgeted or self.cfg.budget >= 1):
            return True
        since = step - self.last_submit if self.last_submit is not None else step + 1
        if not (drafted or since >= self.cfg.idle_interval):
            return False
        if self.cfg.budget >= 1:
            return True
        # (before any step is accounted, the cost is unknown: not yet)
        expected = self.last_s if self.last_s is not None else self.update_s or math.inf
        spent, run, saved, expected = self._all_reduce([self.spent_s, self.run_s, self.saved_s, expected])
        return spent + expected <= self.cfg.budget * run + max(saved, 0.0)

    def account(self, step_s: float, saved_s: float = 0.0, update_s: float = 0.0) -> None:
        """An RL step's wall time, which the distillation's `budget` is a share of; the decoding time
        SD saved in its rollout (negative: what it cost), which the distillation may spend too; and
        its actor update's time, what a first distillation is expected to take."""
        self.run_s += step_s
        self.saved_s += saved_s
        self.update_s = update_s

    def submit(self, model, seqs: list[list[int]], prompt_lens: list[int], weights: torch.Tensor, step: int) -> None:
        """Hand over one RL step's sequences (after the actor's update; `model` holds its new weights)."""
        self.wait()
        self.last_submit = step
        work = lambda: self._work(model, seqs, prompt_lens, weights, step)  # noqa: E731
        if not self.cfg.async_update:
            work()
            return
        if self.stream is not None:  # the side stream must see the actor's freshly updated weights
            self.stream.wait_stream(torch.cuda.current_stream())
        self._thread = threading.Thread(target=self._run_guarded, args=(work,), name="drafter-kd", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until background work (if any) is done; re-raise its error in this thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.stream is not None:
                torch.cuda.current_stream().wait_stream(self.stream)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"drafter update failed: {error}") from error

    def collect(self) -> DrafterUpdate | None:
        """Wait for the submitted work and hand its outcome out (None if nothing finished since the
        last call): new weights where an update ran, and an acceptance estimate where it is finite
        (a diverged actor as teacher says nothing; the solver keeps its own). Call between rollouts."""
        self.wait()
        result, self._result = self._result, None
        if result is None:
            return None
        update = DrafterUpdate(result, version=self.updates)
        if self.live_version != self.updates:
            update.head, self.live_version = self.head, self.updates
        if "alpha_est" in result:
            if all(math.isfinite(a) for a in result["alpha_est"]):
                update.alpha_est = self.last_alpha_est = result["alpha_est"]
            else:
                update.stats = {k: v for k, v in result.items() if k not in ("alpha_est", "accept_est")}
        return update

    # ------------------------------------------------------------------------------------------
    def _run_guarded(self, work) -> None:
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    work()
            else:
                work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e

    def _work(self, model, seqs, prompt_lens, weights, step) -> None:
        t0 = time.perf_counter()
        feats = target_features(model, Sequences(seqs, prompt_lens), self.head.cfg.feature_layers,
                                temperature=self.cfg.temperature)
        self.buffer += [_Item(s, p, float(w), f) for s, p, w, f in zip(seqs, prompt_lens, weights.tolist(), feats)]
        teacher_s = time.perf_counter() - t0
        stats = {"kd_step": step, "kd_teacher_s": round(teacher_s, 3)}
        if (step + 1) % self.cfg.interval == 0:
            stats.update(self._update(model))
        stats["kd_s"] = round(time.perf_counter() - t0, 3)
        self.spent_s += stats["kd_s"]  # (read by `due` after this thread is joined)
        self.last_s = stats["kd_s"]
        self._result = stats

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.group is None:
            return values
        t = torch.tensor(values, dtype=torch.float64)  # gloo: on the CPU
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def _all_reduce_grads(self) -> None:
        grads = [p.grad for p in self.head.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).cpu()
        dist.all_reduce(flat, group=self.group)
        for g, part in zip(grads, flat.to(grads[0].device).split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def _update(self, model) -> dict:
        """One drafter update over the buffer (see the module docstring)."""
        cfg, items = self.cfg, self.buffer
        seqs = Sequences([it.tokens for it in items], [it.prompt_len for it in items])
        feats = [it.feats for it in items]
        weights = torch.tensor([it.weight for it in items])
        per_rank = max(1, cfg.batch // self.world)  # the same on every rank: local batches are equal
        minibatches = [list(range(i, min(i + per_rank, len(items)))) for i in range(0, len(items), per_rank)]
        accepted, counts = [0.0] * cfg.unroll, [0] * cfg.unroll
        kl_sum, kl_n, opt_steps = 0.0, 0, 0
        device = self.head.fc.weight.device
        # the forward in the rollout copy's dtype (bf16 where it is native: `--dtype auto`), as in
        # pretraining; the master weights, AdamW and the loss's softmaxes stay fp32
        compute_dtype = model.embed_tokens.weight.dtype
        self.head.train()
        for epoch in range(cfg.epochs):
            for idx in minibatches:
                tokens, taps, final, mask, lse = (t.to(device) for t in collate(seqs, feats, idx))
                w = weights[idx].to(device)
                (denom,) = self._all_reduce([float((w.view(-1, 1) * mask).sum())])
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    loss, per_step = head_loss(self.head, model, (tokens, taps, final, mask), cfg.unroll,
                                               weights=w, denom=max(denom, 1e-12), temperature=cfg.temperature,
                                               lse=lse if epoch == 0 else None, verify=cfg.verify,
                                               draft_temperature=cfg.draft_temperature)
                if epoch == 0:
                    for s, st in enumerate(per_step):
                        accepted[s] += st["accepted"]
                        counts[s] += st["count"]
                kl_sum += per_step[0]["kl"]
                kl_n += 1
                if denom <= 0:  # every weight 0 (e.g. advantage weighting, no group with signal)
                    continue
                (bad,) = self._all_reduce([0.0 if torch.isfinite(loss) else 1.0])  # every rank agrees
                if bad:  # a diverged actor as teacher: keep the head as it is
                    continue
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.group is not None:
                    self._all_reduce_grads()
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), cfg.grad_clip)
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * warmup_cosine(self.opt_steps, total=0, warmup=cfg.warmup, min_ratio=1.0)
                self.opt.step()
                self.opt_steps += 1
                opt_steps += 1
        self.head.eval()
        self.buffer = []
        self.updates += 1
        sums = self._all_reduce(accepted + [float(c) for c in counts] + [kl_sum])  # (each rank's KL is its share)
        alpha = [a / max(c, 1.0) for a, c in zip(sums[:cfg.unroll], sums[cfg.unroll:2 * cfg.unroll])]
        return {
            "kd_updates": self.updates,
            "kd_opt_steps": opt_steps,
            "kd_loss": round(sums[-1] / max(kl_n, 1), 5),  # step-0 weighted KL, mean over minibatches
            "kd_weight_mean": round(float(weights.mean()), 4),
            # the head before this update (version `alpha_est_version`: the one that drafted this step's
            # rollout when the update is synchronous) against the updated actor, on this step's rollouts
            "alpha_est": [round(a, 4) for a in alpha],
            "alpha_est_version": self.updates - 1,
            "accept_est": round(expected_tokens(alpha, self.k), 4),
        }

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs to continue exactly (call between steps: waits for the thread)."""
        self.wait()
        return {"head": self.head.state_dict(), "optimizer": self.opt.state_dict(), "updates": self.updates,
                "opt_steps": self.opt_steps, "live_version": self.live_version, "buffer": self.buffer,
                "result": self._result, "last_submit": self.last_submit, "last_alpha_est": self.last_alpha_est,
                "spent_s": self.spent_s, "run_s": self.run_s, "saved_s": self.saved_s, "last_s": self.last_s,
                "update_s": self.update_s}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        self.updates, self.live_version, self.opt_steps = state["updates"], state["live_version"], state["opt_steps"]
        self.buffer, self._result = state["buffer"], state["result"]
        self.last_submit = state.get("last_submit")
        self.spent_s, self.run_s = state.get("spent_s", 0.0), state.get("run_s", 0.0)
        self.saved_s = state.get("saved_s", 0.0)
        self.last_s, self.update_s = state.get("last_s"), state.get("update_s", 0.0)
        self.last_alpha_est = state.get("last_alpha_est")
