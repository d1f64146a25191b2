"""Tasks: where problems come from, how they become chat prompts, and how answers are checked.

Three sources, one interface (`problems(start, n)`: the problems at data positions start..start+n-1,
the same every time, so a resumed run sees exactly the data it would have seen; each `Problem.key`
is its row in the training set, the same in every epoch, and `size` is the number of rows, None for
an endless stream):

* `ReasoningGymTask`: a reasoning-gym dataset by name with its own options. reasoning-gym
  generates problem i from (seed, i) offline and scores answers itself. Endless by default; with
  `train_size` N a fixed set (problems 0..N-1), visited in epochs, one seeded shuffle per epoch.
* `respec.data.RowsTask`: rows of a JSONL file or a Hugging Face dataset (GSM8K, prompt/answer and
  chat formats), cycled in a seeded order, one shuffle per pass.
* `LettersTask`: a toy task for the random `tiny` model.
* `respec.arithmetic_task.ArithmeticTask` (`--task arithmetic`): reasoning-gym's `basic_arithmetic`
  (its no-parentheses configurations) without reasoning-gym, for a machine that cannot install it.

respec adds the prompt wording (a system prompt asking for an `Answer:` line, `--system-prompt`
replaces it) and a lenient answer
extraction. The lenient part matters for a small model: SmolLM2-135M rarely writes a strict
`Answer: x` line but often ends with the right number, and an RL run needs some reward signal from
its first step. The format itself is rewarded separately (`respec/rewards.py`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
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
    question: str  # the user's message (empty when `turns` holds the conversation)
    answer: str  # the reference answer
    scorer: Callable[[str], float] = field(repr=False)  # extracted answer -> score in [0, 1]
    system: str | None = None  # the system prompt; None = SYSTEM_PROMPT, "" = none
    turns: list[dict] | None = None  # a conversation given as chat turns (the data's), ending with the user's
    row: dict = field(default_factory=dict, repr=False)  # the data row's other columns (for reward functions)
    key: int = -1  # its row in the training set: the same problem has the same key in every epoch

    @property
    def conversational(self) -> bool:
        return self.turns is not None

    def messages(self) -> list[dict]:
        turns = self.turns if self.turns is not None else [{"role": "user", "content": self.question}]
        system = SYSTEM_PROMPT if self.system is None else self.system
        if not system or turns[0]["role"] == "system":  # a conversation's own system turn wins
            return list(turns)
        return [{"role": "system", "content": system}, *turns]

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


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The rows of a finite training set in the order epoch `epoch` visits them: one seeded shuffle
    per epoch, the same on every rank and after a resume."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class IndexedTask:
    """A task whose problem i is generated from (seed, i): data position -> problem index (endless,
    or a fixed set of `size` problems visited in epochs, one seeded shuffle each) -> `problem(i)`."""

    seed: int
    size: int | None

    def row_at(self, position: int) -> int:
        """The problem (dataset index) at a data position."""
        if self.size is None:
            return position % _DATASET_SIZE
        epoch, j = divmod(position, self.size)
        return self._order(epoch)[j]

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> list[int]:
        return epoch_order(self.size, self.seed, epoch)

    def problems(self, start: int, n: int) -> list[Problem]:
        return [self.problem(self.row_at(i)) for i in range(start, start + n)]

    def problem(self, key: int) -> Problem:
        raise NotImplementedError


class ReasoningGymTask(IndexedTask):
    """reasoning-gym's dataset `name` with respec's default options for it (if any), overridden by
    `config`; `train_size` N > 0: the fixed set of its first N problems, shuffled per epoch."""

    def __init__(self, name: str, config: dict | None = None, seed: int = 0, system_prompt: str | None = None,
                 train_size: int = 0):
        import reasoning_gym

        self.name, self.system, self.seed = name, system_prompt, seed
        self.size = train_size or None
        self.config = {**DEFAULT_TASK_CONFIG.get(name, {}), **(config or {})}
        try:
            self.dataset = reasoning_gym.create_dataset(name, size=_DATASET_SIZE, seed=seed, **self.config)
        except Exception as e:  # unknown names and bad options surface as several exception types
            raise ValueError(f"cannot create reasoning-gym task {name!r}: {str(e).splitlines()[0]}") from e

    def problem(self, key: int) -> Problem:
        entry = self.dataset[key]
        return Problem(entry["question"], str(entry["answer"]), lambda a, e=entry: self.dataset.score_answer(a, e),
                       system=self.system, row={"answer": str(entry["answer"])}, key=key)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def is_number(text: str) -> bool:
    """Whether a reference answer is a number `numeric_scorer` can compare (commas allowed)."""
    return _NUMBER.fullmatch(text.strip().rstrip(".")) is not None


def numeric_scorer(reference: str) -> Callable[[str], float]:
    """1 if the answer is the reference number (commas and a trailing period ignored), else 0."""
    ref = _number(reference)

    def score(answer: str) -> float:
        found = _NUMBER.findall(answer)
        value = _number(found[-1]) if found else None
        return float(ref is not None and value is not None and abs(value - ref) < 1e-6)

    return score


def scorer_for(reference: str) -> Callable[[str], float]:
    """The numeric comparison for a number; else an exact match after trimming, case and a final
    period ignored (what the `accuracy` metric counts when a user's reward does the scoring)."""
    if is_number(reference):
        return numeric_scorer(reference)
    norm = lambda t: t.strip().rstrip(".").strip().lower()  # noqa: E731
    return lambda answer: float(norm(answer) == norm(reference))


class LettersTask:
    """`toy-letters`, a toy task for the random `tiny` model: the reward is the fraction of the
    completion's characters that are ASCII letters. A random model's completions already vary in
    that fraction, so GRPO has signal from the first step and the reward rises within a few dozen
    steps: what the tests and the one-minute walk-through need."""

    name = "toy-letters"

    def __init__(self, train_size: int = 0, seed: int = 0):
        self.size, self.seed = train_size or None, seed

    def problems(self, start: int, n: int) -> list["LettersProblem"]:
        if self.size is None:
            return [LettersProblem(i) for i in range(start, start + n)]
        return [LettersProblem(epoch_order(self.size, self.seed, i // self.size)[i % self.size])
                for i in range(start, start + n)]


@dataclass
class LettersProblem:
    index: int
    answer: str = ""
    row: dict = field(default_factory=dict, repr=False)
    conversational = False

    @property
    def key(self) -> int:
        return self.index

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"Write some letters ({self.index})."}]

    def score(self, completion: str) -> float:
        return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def make_task(*, task: str | None = None, config: dict | None = None, seed: int = 0, system_prompt: str | None = None,
              train_size: int = 0):
    """`toy-letters` or the reasoning-gym task `task` (a fixed set of `train_size` problems if > 0).
    `system_prompt`: None = respec's (SYSTEM_PROMPT), "" = none. (Data from files: respec/data.py.)"""
    if train_size < 0:
        raise ValueError(f"--train-size must be >= 0, got {train_size}")
    if task == LettersTask.name:
        return LettersTask(train_size, seed)
    if task == "arithmetic":  # basic_arithmetic without reasoning-gym (respec/arithmetic_task.py)
        from respec.arithmetic_task import ArithmeticTask

        return ArithmeticTask(config, seed=seed, system_prompt=system_prompt, train_size=train_size)
    return ReasoningGymTask(task or DEFAULT_TASK, config, seed=seed, system_prompt=system_prompt,
                            train_size=train_size)


def make_problems(task: str, n: int, seed: int = 0, **config) -> list[Problem]:
    """The first `n` problems of the task `task` (reasoning-gym's, or toy-letters)."""
    return make_task(task=task, config=config, seed=seed).problems(0, n)


def chat_prompt(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's turn;
    `template_kwargs` go to the template (Qwen3's `enable_thinking`, ...)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes the prompt's token ids: its messages in the chat template (with the
    system prompt, and `template_kwargs` for the template), or, `raw`, its text as it is, tokenized as
    the tokenizer does by default: no template, no system turn (TRL's way with plain-text prompts)."""
    raw: bool = False
    template_kwargs: tuple = ()  # (name, value) pairs, so that the format is hashable

    @classmethod
    def make(cls, raw: bool = False, template_kwargs: dict | None = None) -> "PromptFormat":
        if raw and template_kwargs:
            raise ValueError("--chat-template-kwargs apply to the chat template, which --raw-prompts leaves out")
        return cls(raw, tuple(sorted((template_kwargs or {}).items())))

    def ids(self, tokenizer, problem: "Problem") -> list[int]:
        if not self.raw:
            return chat_prompt(tokenizer, problem.messages(), **dict(self.template_kwargs))
        if problem.conversational:
            raise ValueError("--raw-prompts needs plain-text prompts; this data's prompts are chat turns")
        return tokenizer.encode(problem.question)
