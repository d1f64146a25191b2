"""Rewards: a weighted sum of reward functions, built-in or the user's (`--reward`, repeatable).

    --reward correctness          the task's score of the leniently extracted answer (0..1)
    --reward format:0.1           1 for a strict `Answer: <x>` line, weight 0.1
    --reward my_rewards:length    a function of the module my_rewards (importable, or a .py file:
    --reward path/to/r.py:fn:0.5  path/to/r.py:fn), weight 0.5 (1 if not given)

Without `--reward` the reward is `correctness + format_weight * format` (`--format-weight`, 0.1):
SmolLM2-135M writes a strict `Answer:` line in only a few percent of completions, so a strict-format
reward alone would give GRPO almost no signal; the lenient correctness term gives signal from the
first step and the format term lets a run show the format being learned as well.

A user's function is called as TRL's `GRPOTrainer` calls reward functions, once per step for all of
this process's completions:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

`completions` are strings, or `[{"role": "assistant", "content": text}]` where the prompt came as
chat turns (TRL's conversational format), and `prompts` the matching prompt text or turns; each
other column of the data row (e.g. `answer`) is a keyword argument holding one value per
completion. A `None` means the function does not score that completion (it adds 0). Existing TRL
reward functions therefore run unchanged; declare `**kwargs` to accept the columns you don't use.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*:\s*\S", re.IGNORECASE | re.MULTILINE)


def is_formatted(text: str) -> bool:
    """True if some line starts with `Answer:` followed by an answer."""
    return _ANSWER_LINE.search(text) is not None


def correctness(*, problems, texts, **_) -> list[float]:
    """The task's score of the answer extracted from each completion."""
    return [p.score(t) for p, t in zip(problems, texts)]


def formatting(*, texts, **_) -> list[float]:
    return [float(is_formatted(t)) for t in texts]


BUILTIN: dict[str, Callable] = {"correctness": correctness, "format": formatting}


@dataclass
class Scored:
    reward: float  # what GRPO optimises: the weighted sum
    correct: float  # the task's score, 0..1 (the accuracy metric; also when no reward uses it)
    formatted: bool  # a strict `Answer:` line was written
    parts: dict[str, float] = field(default_factory=dict)  # each reward function's value


@dataclass
class RewardFunction:
    name: str
    weight: float
    fn: Callable
    builtin: bool


def parse_reward(spec: str) -> RewardFunction:
    """`name[:weight]` for a built-in, `module:function[:weight]` or `file.py:function[:weight]`."""
    parts = spec.split(":")
    weight = 1.0
    if len(parts) > 1:
        try:
            value = float(parts[-1])
        except ValueError:
            value = math.nan
        if math.isfinite(value):  # a weight; `nan` or `inf` is a function's name (mymod:nan), not one
            weight, parts = value, parts[:-1]
    if len(parts) == 1:
        if parts[0] not in BUILTIN:
            raise ValueError(f"--reward {spec}: expected a built-in ({', '.join(BUILTIN)}) or module:function[:weight]")
        return RewardFunction(parts[0], weight, BUILTIN[parts[0]], True)
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--reward {spec}: expected module:function[:weight]")
    module_name, fn_name = parts
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ValueError(f"--reward {spec}: no file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"respec_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # a module beside the command, as `python -m` finds it
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # the user's module: any error while importing it
        raise ValueError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {module_name} has no function {fn_name!r}")
    return RewardFunction(fn_name, weight, fn, False)


class Rewards:
    """The reward functions of a run; `score` gives one `Scored` per completion."""

    def __init__(self, specs: list[str] | None = None, *, format_weight: float = 0.1):
        specs = list(specs) if specs else ["correctness", f"format:{format_weight}"]
        self.functions = [parse_reward(s) for s in specs]
        names = [f.name for f in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"--reward: the same function named twice ({', '.join(names)})")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    @property
    def needs_answers(self) -> bool:
        """Whether the data must carry reference answers: the built-in correctness compares them (a
        user's functions may judge prompt-only data)."""
        return any(f.name == "correctness" for f in self.functions)

    @property
    def scores_numbers_only(self) -> bool:
        """Whether the built-in correctness is the only judge of answers (then they must be numbers)."""
        return any(f.name == "correctness" for f in self.functions) and all(f.builtin for f in self.functions)

    def score(self, problems: list, texts: list[str], completion_ids: list[list[int]]) -> list[Scored]:
        values = {}
        for f in self.functions:
            if f.builtin:
                out = f.fn(problems=problems, texts=texts)
            else:
                try:
                    out = f.fn(**trl_arguments(problems, texts, completion_ids))
                except Exception as e:  # the user's code: one line that names it
                    message = str(e).splitlines()[0] if str(e) else ""
                    raise ValueError(f"reward function {f.name} raised {type(e).__name__}: {message}") from e
            values[f.name] = checked(f.name, out, len(texts))
        builtin_correctness = any(f.builtin and f.name == "correctness" for f in self.functions)
        scored = []
        for i, (p, t) in enumerate(zip(problems, texts)):
            parts = {name: v[i] for name, v in values.items()}
            reward = sum(f.weight * parts[f.name] for f in self.functions if not math.isnan(parts[f.name]))
            correct = parts["correctness"] if builtin_correctness else p.score(t)
            scored.append(Scored(reward, correct, is_formatted(t), parts))
        return scored


def trl_arguments(problems: list, texts: list[str], completion_ids: list[list[int]]) -> dict:
    """The keyword arguments TRL gives a reward function (module docstring)."""
    chat = [p.conversational for p in problems]
    kwargs = {
        "prompts": [p.messages() if c else p.messages()[-1]["content"] for p, c in zip(problems, chat)],
        "completions": [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)],
        "completion_ids": completion_ids,
    }
    columns = [k for k in problems[0].row if k not in kwargs] if problems else []
    for k in columns:
        kwargs[k] = [p.row.get(k) for p in problems]
    return kwargs


def checked(name: str, out, n: int) -> list[float]:
    """A reward function's output as n floats (None -> NaN: not scored), or one clear error (a NaN or
    infinite reward would turn the group's advantages, and so the update, into NaN)."""
    try:
        values = [math.nan if v is None else float(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"reward function {name} must return a list of numbers (or None), got "
                         f"{type(out).__name__}") from None
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} values for {n} completions")
    bad = next((i for i, (v, raw) in enumerate(zip(values, out)) if raw is not None and not math.isfinite(v)), None)
    if bad is not None:  # NaN here means "not scored", which a function says with None
        raise ValueError(f"reward function {name} returned {values[bad]} for completion {bad} (of {n}): a reward "
                         "must be a finite number, or None where the function does not score a completion")
    return values
