"""Tasks: reasoning-gym problems, rendered as chat prompts, and how completions are scored.

reasoning-gym generates problems offline from a seed and scores answers itself; respec adds only
the prompt wording and a lenient answer extraction. The lenient part matters for a small model:
SmolLM2-135M rarely writes a strict `Answer: x` line, but often ends with the right number, and
an RL run needs some reward signal from its first step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The default task: easy enough that SmolLM2-135M-Instruct gets some answers right.
DEFAULT_TASK = "basic_arithmetic"
DEFAULT_TASK_CONFIG = {
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-")),
}

# Asking for steps makes the model write a short reasoning trace (greedy SmolLM2: 8-125 tokens on
# basic_arithmetic, against 7-11 for a bare answer): the spread of lengths RL rollouts have.
INSTRUCTION = "Think step by step, then end your reply with a line of the form 'Answer: <answer>'."

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer, as reasoning-gym states it
    entry: dict = field(repr=False)  # reasoning-gym's full entry (its scorer needs it)
    dataset: object = field(repr=False)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"{self.question}\n{INSTRUCTION}"}]

    def score(self, completion: str) -> float:
        """reasoning-gym's score of the answer extracted from `completion` (0 if none)."""
        answer = extract_answer(completion)
        return 0.0 if answer is None else float(self.dataset.score_answer(answer, self.entry))


def extract_answer(text: str) -> str | None:
    """The text after the last `Answer:` if there is one, else the last number in the text."""
    idx = text.lower().rfind("answer:")
    if idx >= 0:
        tail = text[idx + len("answer:"):].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def make_problems(task: str, n: int, seed: int = 0, **config) -> list[Problem]:
    """`n` problems of the reasoning-gym dataset `task` (its default config unless respec has one
    for it, overridden by `config`)."""
    import reasoning_gym

    options = {**DEFAULT_TASK_CONFIG.get(task, {}), **config}
    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed, **options)
    except Exception as e:  # unknown names and bad options surface as several exception types
        raise ValueError(f"cannot create reasoning-gym task {task!r}: {str(e).splitlines()[0]}") from e
    return [Problem(e["question"], str(e["answer"]), e, dataset) for e in dataset]


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
