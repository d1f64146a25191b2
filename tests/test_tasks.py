"""Tasks and rewards: reasoning-gym by name with options, GSM8K JSONL files, answer extraction,
the format reward."""

from __future__ import annotations

import json

import pytest

from respec.rewards import is_formatted, score
from respec.tasks import JsonlTask, LettersTask, ReasoningGymTask, extract_answer, make_task


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
    s = score(p, f"Answer: {p.answer}", format_weight=0.1)
    assert (s.reward, s.correct, s.formatted) == (pytest.approx(1.1), 1.0, True)
    s = score(p, f"it is {p.answer}", format_weight=0.1)
    assert (s.reward, s.formatted) == (1.0, False)


def test_jsonl_task(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i} + 1000?", "answer": f"{i} + 1000 = {i + 1000}\n#### {i + 1000:,}"}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = make_task(data=path, seed=1)
    first = task.problems(0, 5)
    assert sorted(p.question for p in first) == sorted(r["question"] for r in rows)  # one pass = each once
    assert [p.question for p in task.problems(0, 5)] == [p.question for p in first]
    p = first[0]
    n = int(p.question.split()[2]) + 1000
    assert p.score(f"The sum is {n:,}.") == 1.0 and p.score(f"Answer: {n}") == 1.0
    assert p.score(f"Answer: {n + 1}") == 0.0
    assert len(task.problems(3, 10)) == 10  # cycles past the end


def test_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        JsonlTask(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3:"):
        JsonlTask(broken)
    with pytest.raises(ValueError, match="cannot read data file"):
        JsonlTask(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no problems"):
        JsonlTask(tmp_path / "empty.jsonl")


def test_letters_toy_task():
    p = LettersTask().problems(0, 1)[0]
    assert p.score("abcd") == 1.0 and p.score("ab12") == 0.5 and p.score("") == 0.0
