"""Rule-based rewards: the task's correctness score plus an optional small format reward.

reward = correctness + format_weight * formatted, where correctness is the task's score (0..1) of
the leniently extracted answer (`respec/tasks.py`) and `formatted` is 1 when the completion ends
its reasoning with a strict `Answer: <x>` line. SmolLM2-135M writes that line in only a few percent
of completions, so a strict-format-only reward would give GRPO almost no signal; the lenient
correctness term gives signal from the first step and the format term lets a run show the format
being learned as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from respec.tasks import Problem

_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*:\s*\S", re.IGNORECASE | re.MULTILINE)


def is_formatted(text: str) -> bool:
    """True if some line starts with `Answer:` followed by an answer."""
    return _ANSWER_LINE.search(text) is not None


@dataclass
class Scored:
    reward: float  # what GRPO optimises
    correct: float  # the task's score, 0..1
    formatted: bool  # a strict `Answer:` line was written


def score(problem: Problem, completion: str, *, format_weight: float = 0.0) -> Scored:
    correct = problem.score(completion)
    formatted = is_formatted(completion)
    return Scored(correct + format_weight * float(formatted), correct, formatted)
