"""Tasks: where problems come from, how they become chat prompts, and how answers are checked.

Two sources, one interface (`problems(start, n)`: the problems at data positions start..start+n-1,
the same every time, so a resumed run sees exactly the data it would have seen):

* `ReasoningGymTask`: a reasoning-gym dataset by name with its own options. reasoning-gym
  generates problem i from (seed, i) offline and scores answers itself.
* `JsonlTask`: a GSM8K-format file, one JSON object per line with `question` and `answer`, the
  answer ending in `#### <number>`; cycled in a seeded order, one shuffle per pass.

respec adds the prompt wording (a system prompt asking for an `Answer:` line) and a lenient answer
extraction. The lenient part matters for a small model: SmolLM2-135M rarely writes a strict
`Answer: x` line but often ends with the right number, and an RL run needs some reward signal from
its first step. The format itself is rewarded separately (`respec/rewards.py`).
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The default task: easy enough that SmolLM2-135M-Instruct gets some answers right.
DEFAULT_TASK = "basic_arithmetic"
DEFAULT_TASK_CONFIG = {
    # "Calculate 5 - 3.": no negative operands, no parentheses (SmolLM2-135M, T=1: 21% correct)
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"),
                             allow_negation=False, allow_parentheses=False),
}

# Asking for steps makes the model write a short reasoning trace (greedy SmolLM2: 8-125 tokens on
# basic_arithmetic, against 7-11 for a bare answer): the spread of lengths RL rollouts have.
INSTRUCTION = "Think step by step, then end your reply with a line of the form 'Answer: <answer>'."
SYSTEM_PROMPT = "You are a careful assistant who solves problems. " + INSTRUCTION

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_DATASET_SIZE = 10**7  # reasoning-gym generates item i on demand: the size only bounds the index


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer
    scorer: Callable[[str], float] = field(repr=False)  # extracted answer -> score in [0, 1]

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.question}]

    def score(self, completion: str) -> float:
        """The task's score of the answer extracted from `completion` (0 if there is none)."""
        answer = extract_answer(completion)
        return 0.0 if answer is None else float(self.scorer(answer))


def extract_answer(text: str) -> str | None:
    """The text after the last `Answer:` if there is one, else the last number in the text."""
    idx = text.lower().rfind("answer:")
    if idx >= 0:
        tail = text[idx + len("answer:"):].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


class ReasoningGymTask:
    """reasoning-gym's dataset `name` with respec's default options for it (if any), overridden by
    `config`."""

    def __init__(self, name: str, config: dict | None = None, seed: int = 0):
        import reasoning_gym

        self.name = name
        self.config = {**DEFAULT_TASK_CONFIG.get(name, {}), **(config or {})}
        try:
            self.dataset = reasoning_gym.create_dataset(name, size=_DATASET_SIZE, seed=seed, **self.config)
        except Exception as e:  # unknown names and bad options surface as several exception types
            raise ValueError(f"cannot create reasoning-gym task {name!r}: {str(e).splitlines()[0]}") from e

    def problems(self, start: int, n: int) -> list[Problem]:
        out = []
        for i in range(start, start + n):
            entry = self.dataset[i % _DATASET_SIZE]
            out.append(Problem(entry["question"], str(entry["answer"]),
                               lambda a, e=entry: self.dataset.score_answer(a, e)))
        return out


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def numeric_scorer(reference: str) -> Callable[[str], float]:
    """1 if the answer is the reference number (commas and a trailing period ignored), else 0."""
    ref = _number(reference)

    def score(answer: str) -> float:
        found = _NUMBER.findall(answer)
        value = _number(found[-1]) if found else None
        return float(ref is not None and value is not None and abs(value - ref) < 1e-6)

    return score


class JsonlTask:
    """GSM8K-format problems from a file: `{"question": ..., "answer": "... #### 42"}` per line."""

    def __init__(self, path: str | Path, seed: int = 0):
        path = Path(path)
        self.name, self.seed = str(path), seed
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read data file {path}: {e.strerror if isinstance(e, OSError) else e}") from e
        self.items: list[tuple[str, str]] = []
        self.linenos: list[int] = []  # the file line of each item
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], str(row["answer"])
                if not isinstance(question, str) or "####" not in answer:
                    raise ValueError
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'question' and an 'answer' "
                                 "ending in '#### <number>'") from None
            self.items.append((question, answer.rsplit("####", 1)[1].strip()))
            self.linenos.append(lineno)
        if not self.items:
            raise ValueError(f"data file {path} has no problems")

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def located_problems(self) -> list[tuple[str, Problem]]:
        """Every problem with where it comes from ("file:line"), so all can be checked up front."""
        return [(f"{self.name}:{lineno}", Problem(q, a, numeric_scorer(a)))
                for lineno, (q, a) in zip(self.linenos, self.items)]

    def problems(self, start: int, n: int) -> list[Problem]:
        out = []
        for i in range(start, start + n):
            epoch, j = divmod(i, len(self.items))
            question, answer = self.items[self._order(epoch)[j]]
            out.append(Problem(question, answer, numeric_scorer(answer)))
        return out


class LettersTask:
    """`toy-letters`, a toy task for the random `tiny` model: the reward is the fraction of the
    completion's characters that are ASCII letters. A random model's completions already vary in
    that fraction, so GRPO has signal from the first step and the reward rises within a few dozen
    steps: what the tests and the one-minute walk-through need."""

    name = "toy-letters"

    def problems(self, start: int, n: int) -> list["LettersProblem"]:
        return [LettersProblem(i) for i in range(start, start + n)]


@dataclass
class LettersProblem:
    index: int
    answer: str = ""

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"Write some letters ({self.index})."}]

    def score(self, completion: str) -> float:
        return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def make_task(*, task: str | None = None, config: dict | None = None, data: str | Path | None = None,
              seed: int = 0):
    """`--data FILE` (GSM8K JSONL) if given, else `toy-letters` or the reasoning-gym task `task`."""
    if data is not None:
        return JsonlTask(data, seed=seed)
    if task == LettersTask.name:
        return LettersTask()
    return ReasoningGymTask(task or DEFAULT_TASK, config, seed=seed)


def make_problems(task: str, n: int, seed: int = 0, **config) -> list[Problem]:
    """The first `n` problems of the task `task` (reasoning-gym's, or toy-letters)."""
    return make_task(task=task, config=config, seed=seed).problems(0, n)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
