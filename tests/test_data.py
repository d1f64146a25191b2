"""Training data from files and Hugging Face datasets (respec/data.py): each row format, the
system prompt, column names, and malformed rows named by file and line."""

from __future__ import annotations

import json
import re

import pytest

from respec.data import DataError, RowsTask
from respec.tasks import SYSTEM_PROMPT


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k_rows_cycle_in_a_seeded_order(tmp_path):
    rows = [{"question": f"What is {i} + 1000?", "answer": f"{i} + 1000 = {i + 1000}\n#### {i + 1000:,}"}
            for i in range(5)]
    task = RowsTask(write(tmp_path / "gsm.jsonl", rows + [""]), seed=1)
    first = task.problems(0, 5)
    assert sorted(p.question for p in first) == sorted(r["question"] for r in rows)  # one pass = each once
    assert [p.question for p in RowsTask(str(tmp_path / "gsm.jsonl"), seed=1).problems(0, 5)] == \
        [p.question for p in first]
    p = first[0]
    n = int(p.question.split()[2]) + 1000
    assert p.score(f"The sum is {n:,}.") == 1.0 and p.score(f"Answer: {n}") == 1.0
    assert p.score(f"Answer: {n + 1}") == 0.0
    assert p.messages() == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p.question}]
    assert p.row["answer"] == [r for r in rows if r["question"] == p.question][0]["answer"]  # for reward functions
    assert len(task.problems(3, 10)) == 10  # cycles past the end


def test_prompt_chat_and_messages_formats(tmp_path):
    plain = RowsTask(write(tmp_path / "plain.jsonl", [{"prompt": "What is 2+2?", "answer": 4, "level": 1}]),
                     system_prompt="Be brief.").problems(0, 1)[0]
    assert plain.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert plain.answer == "4" and plain.row == {"answer": 4, "level": 1} and not plain.conversational
    bare = RowsTask(str(tmp_path / "plain.jsonl"), system_prompt="").problems(0, 1)[0]
    assert bare.messages() == [{"role": "user", "content": "What is 2+2?"}]

    own_system = [{"role": "system", "content": "Terse."}, {"role": "user", "content": "3+3?"}]
    chat = RowsTask(write(tmp_path / "chat.jsonl", [{"prompt": own_system, "answer": "6"}])).problems(0, 1)[0]
    assert chat.conversational and chat.messages() == own_system  # the conversation's own system turn wins
    turns = [{"role": "user", "content": "5+5?"}, {"role": "assistant", "content": "10"}]  # reference solution last
    msgs = RowsTask(write(tmp_path / "msgs.jsonl", [{"messages": turns, "answer": "10"}])).problems(0, 1)[0]
    assert msgs.messages() == [{"role": "system", "content": SYSTEM_PROMPT}, turns[0]]

    named = RowsTask(write(tmp_path / "named.jsonl", [{"problem": "7-1?", "solution": "6"}]), prompt_column="problem",
                     answer_column="solution").problems(0, 1)[0]
    assert named.question == "7-1?" and named.answer == "6" and named.score("Answer: 6") == 1.0


def test_malformed_rows_are_named_by_file_and_line(tmp_path):
    good = {"prompt": "1+1?", "answer": "2"}
    cases = [
        ([good, '{"prompt": "oops"'], "bad.jsonl:2: not valid JSON"),
        ([good, {"prompt": "2+2?"}], "bad.jsonl:2: no 'answer' column"),
        ([good, "[1, 2]"], "bad.jsonl:2: expected a JSON object"),
        ([good, {"prompt": [{"role": "user"}], "answer": "1"}], "bad.jsonl:2: column 'prompt' must be"),
        ([good, {"prompt": "", "answer": "1"}], "bad.jsonl:2: column 'prompt' must be"),
        ([good, {"prompt": "q", "answer": ""}], "bad.jsonl:2: column 'answer' must be"),
        ([good, {"prompt": "q", "answer": "#### \\frac{5}{6}"}], "bad.jsonl:2: answer '\\\\frac{5}{6}' is not a number"),
        ([{"text": "q", "answer": "1"}], "no prompt column"),
    ]
    for rows, needle in cases:
        with pytest.raises(DataError, match=re.escape(needle)):
            RowsTask(write(tmp_path / "bad.jsonl", rows))
    # an answer that is no number is fine where the caller's reward scores it (exact match for accuracy)
    p = RowsTask(write(tmp_path / "frac.jsonl", [{"prompt": "q", "answer": "#### \\frac{5}{6}"}]),
                 numeric_answers=False).problems(0, 1)[0]
    assert p.answer == "\\frac{5}{6}" and p.score("Answer: \\frac{5}{6}.") == 1.0 and p.score("Answer: 5/6") == 0.0
    with pytest.raises(DataError, match="data not found"):
        RowsTask(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="has no rows"):
        RowsTask(write(tmp_path / "empty.jsonl", [""]))


def test_hugging_face_datasets_from_disk_and_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"{i} + 1?", "answer": str(i + 1)} for i in range(4)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "test": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "saved"))
    task = RowsTask(str(tmp_path / "saved"))
    assert sorted(p.question for p in task.problems(0, 4)) == sorted(r["question"] for r in rows)
    assert len(RowsTask(str(tmp_path / "saved"), split="test").located_problems()) == 2
    with pytest.raises(DataError, match="has no split 'validation' \\(it has train, test\\)"):
        RowsTask(str(tmp_path / "saved"), split="validation")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    located = RowsTask(str(tmp_path / "rows.parquet")).located_problems()
    assert [w for w, _ in located][:2] == [f"{tmp_path / 'rows.parquet'}[train] row 0",
                                           f"{tmp_path / 'rows.parquet'}[train] row 1"]
    datasets.Dataset.from_list([{"question": "q", "answer": "x"}]).to_parquet(str(tmp_path / "words.parquet"))
    with pytest.raises(DataError, match=r"words.parquet\[train\] row 0: answer 'x' is not a number"):
        RowsTask(str(tmp_path / "words.parquet"))
