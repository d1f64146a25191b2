"""The episode: one completion of one prompt and everything a GRPO step learns about it.

The rollout makes one per request (a prompt's G samples are G episodes); the rewards and the
group's advantage are written onto it; after that the update (respec/update.py), the metrics
(respec/metrics.py), the completions log, the replay store and the seeds all read episodes, never
lists kept in step by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec.engine import Completion
from respec.grpo import group_advantages
from respec.rewards import Scored


@dataclass
class Episode:
    problem: object  # respec/tasks.py Problem: messages(), answer, key
    prompt_index: int  # the prompt's index in the step's global order (0 .. P-1)
    key: int  # the prompt's row in the training set (its data position on an endless task)
    sample: int  # g: which of the prompt's G samples
    seed: int  # the rollout's sampling seed (respec/rollout_seeds.py)
    prompt_ids: list[int]
    completion: Completion | None = None  # tokens, the rollout's own log-probs and `verified` flags, finish reason
    text: str = ""  # the completion decoded
    score: Scored | None = None  # reward, correctness, format, each reward function's value
    advantage: float = 0.0

    @property
    def tokens(self) -> list[int]:
        """Prompt and completion: what the training forward reads."""
        return self.prompt_ids + self.completion.token_ids

    @property
    def truncated(self) -> bool:
        """Cut at the completion length limit (not ended by EOS)."""
        return self.completion.finish_reason == "length"


def set_advantages(episodes: list[Episode], group: int, *, scale_by_std: bool) -> list[bool]:
    """Each episode's advantage within its group (consecutive runs of `group` episodes, one prompt
    each); returns per group whether it carries signal (its rewards are not all equal)."""
    r = torch.tensor([e.score.reward for e in episodes], dtype=torch.float32).view(-1, group)
    for e, a in zip(episodes, group_advantages(r, scale_by_std=scale_by_std).view(-1).tolist()):
        e.advantage = a
    return [len(set(row)) > 1 for row in r.tolist()]
