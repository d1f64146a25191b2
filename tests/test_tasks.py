"""Tasks and rewards: reasoning-gym by name with options, answer extraction, the built-in rewards
and a user's reward function called as TRL calls it (data files: tests/test_data.py)."""

from __future__ import annotations

import math

import pytest

from respec.rewards import Rewards, is_formatted
from respec.tasks import LettersTask, ReasoningGymTask, extract_answer, make_task


def test_reasoning_gym_task_with_options_is_deterministic():
    task = ReasoningGymTask("basic_arithmetic", {"allow_negation": False}, seed=3)
    a, b = task.problems(10, 4), task.problems(10, 4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in task.problems(11, 1)] == [a[1].question]
    p = a[0]
    assert p.score(f"so the result is {p.answer}") == 1.0
    assert p.score(f"Answer: {int(p.answer) + 1}") == 0.0
    assert p.score("no idea") == 0.0
    assert p.messages()[0]["role"] == "system" and "Answer:" in p.messages()[0]["content"]


def test_unknown_task_and_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="cannot create reasoning-gym task 'no_such_task'"):
        make_task(task="no_such_task")
    with pytest.raises(ValueError, match="basic_arithmetic"):
        make_task(task="basic_arithmetic", config={"min_terms": 5, "max_terms": 2})


@pytest.mark.parametrize("config", [{}, {"min_terms": 3, "max_terms": 3}, {"operators": ["+", "-", "*"], "max_digits": 3,
                                                                          "min_terms": 2, "max_terms": 5}])
def test_builtin_arithmetic_equals_reasoning_gyms_basic_arithmetic(config):
    """--task arithmetic (respec/arithmetic_task.py) against reasoning-gym itself: the same
    questions, answers and keys for 300 data positions of a fixed training set and of the endless
    stream, and the same score for every kind of answer a completion yields."""
    for train_size in (0, 40):
        ours = make_task(task="arithmetic", config=config, seed=5, train_size=train_size).problems(0, 300)
        theirs = make_task(task="basic_arithmetic", config=config, seed=5, train_size=train_size).problems(0, 300)
        assert [(p.question, p.answer, p.key) for p in ours] == [(p.question, p.answer, p.key) for p in theirs]
    assert len({p.question for p in ours}) > 20  # (not one problem over and over)
    for mine, rg in zip(ours[:60], theirs[:60]):
        right = mine.answer
        for completion in (f"Answer: {right}", f"so it is {right}.", f"Answer: {right}0", f"Answer: x{right}y",
                           f"Answer: {int(right) + 1}", "Answer: ", "nothing", f"Answer: {right} apples"):
            assert mine.score(completion) == rg.score(completion), completion


def test_builtin_arithmetic_refuses_what_it_does_not_generate():
    with pytest.raises(ValueError, match="generates no parentheses"):
        make_task(task="arithmetic", config={"allow_parentheses": True})
    with pytest.raises(ValueError, match="operators among"):
        make_task(task="arithmetic", config={"operators": ["/"]})
    with pytest.raises(ValueError, match="has no option 'format_style'"):
        make_task(task="arithmetic", config={"format_style": "natural"})


def test_extract_answer():
    assert extract_answer("2 + 3 = 5.\nAnswer: 5") == "5"
    assert extract_answer("answer: 1,234.") == "1,234"
    assert extract_answer("first 3 then 7") == "7"
    assert extract_answer("nothing") is None


def test_format_reward():
    assert is_formatted("step\nAnswer: 12")
    assert is_formatted("**Answer:** 12")
    assert not is_formatted("the answer is 12")
    assert not is_formatted("Answer:")
    task = ReasoningGymTask("basic_arithmetic", seed=0)
    p = task.problems(0, 1)[0]
    s, t = Rewards(format_weight=0.1).score([p, p], [f"Answer: {p.answer}", f"it is {p.answer}"], [[], []])
    assert (s.reward, s.correct, s.formatted) == (pytest.approx(1.1), 1.0, True)
    assert (t.reward, t.formatted) == (1.0, False)
    assert s.parts == {"correctness": 1.0, "format": 1.0}


def test_letters_toy_task():
    p = LettersTask().problems(0, 1)[0]
    assert p.score("abcd") == 1.0 and p.score("ab12") == 0.5 and p.score("") == 0.0


USER_REWARDS = """
def length_penalty(completions, **kwargs):
    return [-len(c) / 100 for c in completions]


def exact(prompts, completions, completion_ids, answer, **kwargs):
    # TRL's way: a list per column, one value per completion; None = not scored
    return [None if a == "skip" else float(c.strip() == a) for c, a in zip(completions, answer)]


def chatty(completions, **kwargs):
    return [float(c[0]["role"] == "assistant") for c in completions]


def broken(completions, **kwargs):
    return 1.0


def crash(completions, **kwargs):
    raise KeyError("solution")
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)  # importable as a module from the working directory, as with python -m
    return tmp_path / "my_rewards.py"


def test_user_reward_functions_are_called_as_trl_calls_them(user_rewards):
    from respec.tasks import Problem, scorer_for

    plain = [Problem("q", a, scorer_for(a), row={"answer": a}) for a in ("x y", "skip")]
    chat = Problem("", "x", scorer_for("x"), turns=[{"role": "user", "content": "q"}], row={"answer": "x"})
    rewards = Rewards(["my_rewards:exact", f"{user_rewards}:length_penalty:0.5", "format:0.1"])
    s = rewards.score(plain, ["x y", "Answer: x y"], [[1], [2]])
    assert s[0].parts == {"exact": 1.0, "length_penalty": -0.03, "format": 0.0}
    assert s[0].reward == pytest.approx(1.0 - 0.015)
    assert math.isnan(s[1].parts["exact"])  # None: not scored, adds nothing
    assert s[1].reward == pytest.approx(0.5 * -0.11 + 0.1)
    # the accuracy metric is the task's own check: an answer in words counts on an `Answer:` line
    judged = Rewards(["my_rewards:length_penalty"]).score(plain[:1] * 2, ["x y", "Answer: x y"], [[1], [2]])
    assert [j.correct for j in judged] == [0.0, 1.0] and s[0].correct == 0.0
    assert Rewards(["my_rewards:chatty"]).score([chat], ["x"], [[1]])[0].reward == 1.0  # conversational
    assert not rewards.scores_numbers_only and Rewards().scores_numbers_only


@pytest.mark.parametrize("spec,needle", [
    ("nope", "expected a built-in"),
    ("my_rewards:missing", "has no function 'missing'"),
    ("no_such_module:fn", "cannot import no_such_module"),
    ("missing.py:fn", "no file missing.py"),
    ("my_rewards:broken", "must return a list of numbers"),
    ("my_rewards:crash", "reward function crash raised KeyError: 'solution'"),
])
def test_bad_reward_specs_are_one_line_errors(user_rewards, spec, needle):
    from respec.tasks import Problem, scorer_for

    with pytest.raises(ValueError, match=needle):
        Rewards([spec]).score([Problem("q", "1", scorer_for("1"))], ["1"], [[1]])
