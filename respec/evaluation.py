"""The held-out evaluation of a GRPO run (`--eval-every`, `--eval-at-start`): a fixed set of
problems, each completed `--eval-generations` times at `--eval-temperature`, decoded without
speculation (the solver's statistics stay the rollouts').

Reported (the metrics.jsonl fields):
  eval_accuracy     pass@1: the share of correct completions, over problems and samples (greedy
                    and one sample, the default: the share of problems solved)
  eval_pass_at_N    with N = --eval-generations > 1: the share of problems with at least one
                    correct completion among their N (the unbiased estimator of Chen et al. 2021,
                    arXiv 2107.03374, with k = n is exactly that)
  eval_reward_mean  the reward, over problems and samples
  eval_s            seconds

The sampling noise is fixed: sample g of problem i always uses the same seed, so two evaluations
differ only by the policy (common random numbers: the difference between steps is not drowned by
fresh noise).
"""

from __future__ import annotations

import dataclasses
import time

from respec import distributed
from respec.rollout_seeds import eval_seed
from respec.sampling import SamplingParams
from respec.solver import FixedK
from respec.tasks import PromptFormat


def held_out_problems(cfg, task, *, numeric_answers: bool, answers_required: bool = True) -> list:
    """The fixed held-out set: `--eval-data`, else the task's problems under another seed
    (reasoning-gym generates new ones; with a fixed training set, only problems outside it), else the
    first rows of `--data` (not held out: said in --eval-data's help)."""
    if cfg.eval_data:
        task = dataclasses.replace(cfg, data=cfg.eval_data, train_size=0, task_config={}).make_task(  # (--task's options)
            seed=cfg.seed, numeric_answers=numeric_answers, answers_required=answers_required)
        return task.problems(0, cfg.eval_prompts)
    if cfg.data is not None:
        return task.problems(0, cfg.eval_prompts)
    other = dataclasses.replace(cfg, train_size=0).make_task(seed=cfg.seed + 1, numeric_answers=numeric_answers)
    if not getattr(task, "size", None):
        return other.problems(0, cfg.eval_prompts)
    seen = {str(p.messages()) for p in task.problems(0, task.size)}
    fresh = [p for p in other.problems(0, 50 * cfg.eval_prompts) if str(p.messages()) not in seen]
    return fresh[:cfg.eval_prompts]


@dataclasses.dataclass
class Evaluation:
    problems: list
    # how each completion samples (respec/config.py `TrainConfig.eval_sampling`); its seed is the run's,
    # from which each (problem, sample) has its own fixed noise (rollout_seeds.eval_seed)
    sampling: SamplingParams = dataclasses.field(default_factory=lambda: SamplingParams(max_new_tokens=64,
                                                                                         temperature=0.0))
    generations: int = 1  # completions per problem

    def run(self, engine, tokenizer, rewards, d: distributed.Dist, *, prompt: PromptFormat = PromptFormat()) -> dict:
        """Evaluate the engine's current weights; every rank takes problems r, r+W, ... and the
        sums are reduced over ranks."""
        t0 = time.perf_counter()
        n = self.generations
        mine = list(range(d.rank, len(self.problems), d.world))
        requests = [(i, g) for i in mine for g in range(n)]
        params = [dataclasses.replace(self.sampling, seed=eval_seed(self.sampling.seed, i, g)) for i, g in requests]
        ids = {i: prompt.ids(tokenizer, self.problems[i]) for i in mine}
        outs = engine.generate([ids[i] for i, _ in requests], params, policy=FixedK(0)) if requests else []
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        scored = rewards.score([self.problems[i] for i, _ in requests], texts, [o.token_ids for o in outs])
        correct = [s.correct >= 1.0 for s in scored]
        solved = sum(any(correct[j * n:(j + 1) * n]) for j in range(len(mine)))
        sums = distributed.all_reduce_named({"problems": len(mine), "n": len(scored), "correct": sum(correct),
                                             "solved": solved, "reward": sum(s.reward for s in scored)}, d)
        total = max(sums["n"], 1)
        out = {"eval_accuracy": round(sums["correct"] / total, 4), "eval_reward_mean": round(sums["reward"] / total, 4)}
        if n > 1:
            out[f"eval_pass_at_{n}"] = round(sums["solved"] / max(sums["problems"], 1), 4)
        out["eval_s"] = round(time.perf_counter() - t0, 3)
        return out
