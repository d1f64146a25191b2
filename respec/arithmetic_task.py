"""`--task arithmetic`: reasoning-gym's `basic_arithmetic` without reasoning-gym.

A machine with no package index and no reasoning-gym (the lent GPU machine) still needs the
default run's task. This one generates, for the configurations the default run and the long
setting use (no parentheses, no division), the problems reasoning-gym's `basic_arithmetic` generates
from the same seed, and scores an answer as its default scorer does; tests/test_tasks.py checks
both against reasoning-gym, problem for problem.

Problem i draws from `random.Random(seed + i)`, in this order: the number of terms, the number of
digits, every operand in 0..10^digits, every operator; the question is "Calculate <expression>."
with single spaces. An answer scores 1 if it is the reference exactly, len(reference) / len(answer)
if it contains the reference, else 0.
"""

from __future__ import annotations

import functools
import random

from respec.tasks import DEFAULT_TASK, DEFAULT_TASK_CONFIG, IndexedTask, Problem

NAME = "arithmetic"
OPERATORS = ("+", "-", "*")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_KNOWN = {"min_terms", "max_terms", "min_digits", "max_digits", "operators", "allow_parentheses", "allow_negation"}


def score(answer: str, reference: str) -> float:
    """reasoning-gym's default scoring of an extracted answer."""
    if not answer:
        return 0.0
    if answer == reference:
        return 1.0
    return len(reference) / len(answer) if reference in answer else 0.0


class ArithmeticTask(IndexedTask):
    """Problems as `basic_arithmetic` with respec's default options, overridden by `config`;
    `train_size` N > 0: the fixed set of its first N problems, shuffled per epoch (as
    respec/tasks.py ReasoningGymTask)."""

    name = NAME

    def __init__(self, config: dict | None = None, seed: int = 0, system_prompt: str | None = None,
                 train_size: int = 0):
        cfg = {**DEFAULT_TASK_CONFIG[DEFAULT_TASK], **(config or {})}
        unknown = sorted(set(cfg) - _KNOWN)
        if unknown:
            raise ValueError(f"--task {NAME} has no option {unknown[0]!r} (it takes {', '.join(sorted(_KNOWN))})")
        if cfg["allow_parentheses"]:
            raise ValueError(f"--task {NAME} generates no parentheses: use --task basic_arithmetic (reasoning-gym)")
        ops = tuple(cfg["operators"])
        if not ops or any(op not in OPERATORS for op in ops):
            raise ValueError(f"--task {NAME} takes operators among {' '.join(OPERATORS)}, got {list(ops)}")
        if not 0 < cfg["min_terms"] <= cfg["max_terms"] or not 0 < cfg["min_digits"] <= cfg["max_digits"]:
            raise ValueError(f"--task {NAME}: need 0 < min_terms <= max_terms and 0 < min_digits <= max_digits")
        self.terms, self.digits, self.ops = (cfg["min_terms"], cfg["max_terms"]), (cfg["min_digits"], cfg["max_digits"]), ops
        self.seed, self.system, self.size = seed, system_prompt, train_size or None

    def item(self, index: int) -> tuple[str, str]:
        """(question, answer) of problem `index`."""
        rng = random.Random(self.seed + index)
        n_terms = rng.randint(*self.terms)
        n_digits = rng.randint(*self.digits)
        operands = [rng.randint(0, 10**n_digits) for _ in range(n_terms)]
        ops = [rng.choice(self.ops) for _ in range(n_terms - 1)]
        value, text = operands[0], [str(operands[0])]
        for op, x in zip(ops, operands[1:]):
            value = _APPLY[op](value, x)
            text += [op, str(x)]
        return f"Calculate {' '.join(text)}.", str(value)

    def problem(self, key: int) -> Problem:
        question, answer = self.item(key)
        return Problem(question, answer, functools.partial(score, reference=answer), system=self.system,
                       row={"answer": answer}, key=key)
