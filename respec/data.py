"""Training data from files and Hugging Face datasets: rows of a prompt and a reference answer.

    --data FILE.jsonl          one JSON object per line (read here, so errors name file:line)
    --data FILE.csv|.parquet|.json, or a directory, or owner/name
                               a Hugging Face dataset (`datasets`): a directory written by
                               `save_to_disk`, data files, or a dataset id from the local Hugging Face
                               cache (downloaded where the machine can reach the Hub); `--data-split`
                               picks a split, `--data-config` a configuration (openai/gsm8k: main)

Row formats, told apart by their columns:

    GSM8K      {"question": "...", "answer": "... #### 42"}
    prompt     {"prompt": "...", "answer": "42"}
    chat       {"prompt": [{"role": "user", "content": "..."}], "answer": "42"}   (TRL's conversational)
    messages   {"messages": [{"role": "user", "content": "..."}, ...], "answer": "42"}

The prompt is `--prompt-column` if given, else the first of `prompt`, `question`, `messages` that the
data has; the answer is `--answer-column` (`answer`), which prompt-only data may lack when no
built-in `correctness` reward needs it (the user's reward functions judge). A chat prompt's final assistant turn (a
reference solution) is left out. An answer with `####` keeps what follows it (GSM8K). The system
prompt (`--system-prompt`) is put first unless the row's conversation brings its own. The other
columns travel with each problem to the reward functions (`Problem.row`, respec/rewards.py).

Every row is parsed when the data is read, before a run writes anything: a malformed row is named
with its file and line (or its dataset row) in one line. Answers must be numbers (what the built-in
correctness reward compares) unless the caller says that another reward scores them
(`numeric_answers=False`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from respec.cli import Needs, option
from respec.tasks import DEFAULT_TASK, Problem, epoch_order, is_number, make_task, scorer_for

PROMPT_COLUMNS = ("prompt", "question", "messages")


class DataError(ValueError):
    """Data that cannot be trained on; the message names where, on one line."""


def read_rows(spec: str, split: str = "train", config: str | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """(name, [(where, row)]) of a JSONL file or a Hugging Face dataset (module docstring). A data
    file is one split: another `split` is refused, not ignored; `config` names a configuration of a
    dataset id (openai/gsm8k's `main`)."""
    path = Path(spec).expanduser()
    if path.is_file() and split != "train":
        raise DataError(f"--data-split {split}: {spec} is a data file, which has one split (give no --data-split)")
    if config is not None and path.is_file():
        raise DataError(f"--data-config {config}: {spec} is a data file; --data-config names a configuration of a "
                        "Hugging Face dataset (an id, or a dataset repository's directory)")
    if path.is_file() and path.suffix == ".jsonl":
        return str(path), _jsonl_rows(path)
    looks_like_file = path.suffix in (".jsonl", ".json", ".csv", ".parquet") or spec.startswith((".", "/", "~"))
    if path.exists() or "/" in spec and not looks_like_file:
        name = f"{spec}{f' ({config})' if config else ''}[{split}]"
        return name, _dataset_rows(spec, path, split, config)
    raise DataError(f"data not found: {spec} (a .jsonl file, a dataset file or directory, or a Hugging Face dataset id)")


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e.strerror if isinstance(e, OSError) else e}") from e
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{lineno}", row))
    return rows


def _dataset_rows(spec: str, path: Path, split: str, config: str | None = None) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            if config is not None:
                raise DataError(f"--data-config {config}: {spec} was written by save_to_disk, which keeps one "
                                "configuration")
            data = datasets.load_from_disk(str(path))  # written by save_to_disk
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{spec} has no split {split!r} (it has {', '.join(data)}): choose --data-split")
                data = data[split]
        elif path.is_file():
            kind = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".txt": "text"}.get(path.suffix)
            if kind is None:
                raise DataError(f"{spec}: unknown data file type {path.suffix!r} (.jsonl, .json, .csv or .parquet)")
            data = datasets.load_dataset(kind, data_files=str(path), split=split)
        else:
            data = datasets.load_dataset(spec, config, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (missing split, offline, bad files): one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "; name one with --data-config" if "config" in reason.lower() and config is None else ""
        raise DataError(f"cannot load dataset {spec} (split {split!r}): {reason[:200]}{hint}") from e
    return [(f"{spec}[{split}] row {i}", dict(row)) for i, row in enumerate(data)]


def _prompt(where: str, value, column: str) -> tuple[list[dict] | None, str | None]:
    """(conversation, None) for a chat prompt, (None, text) for a plain one."""
    if isinstance(value, str) and value.strip():
        return None, value
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value):
        turns = [{"role": t["role"], "content": t["content"]} for t in value]
        if turns[-1]["role"] == "assistant":  # a reference solution, not part of the prompt
            turns = turns[:-1]
        if turns and turns[-1]["role"] == "user":
            return turns, None
    raise DataError(f"{where}: column {column!r} must be a non-empty string or a list of chat turns "
                    "({'role': ..., 'content': ...}) ending with the user's")


class RowsTask:
    """A task made of data rows (module docstring); `problems(start, n)` cycles through them in a
    seeded order, one shuffle per pass, so a resumed run sees the data it would have seen."""

    def __init__(self, spec: str, *, split: str = "train", config: str | None = None, prompt_column: str | None = None,
                 answer_column: str = "answer", system_prompt: str | None = None, numeric_answers: bool = True,
                 answers_required: bool = True, seed: int = 0):
        self.name, rows = read_rows(spec, split, config)
        self.seed = seed
        if not rows:
            raise DataError(f"data {self.name} has no rows")
        columns = rows[0][1].keys()
        column = prompt_column or next((c for c in PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise DataError(f"{rows[0][0]}: no prompt column (expected one of {', '.join(PROMPT_COLUMNS)}, or name it "
                            f"with --prompt-column; the columns are {', '.join(columns)})")
        self.located: list[tuple[str, Problem]] = []
        for where, row in rows:
            if column not in row:
                raise DataError(f"{where}: no {column!r} column (--prompt-column names the prompt's column)")
            if answer_column not in row and answers_required:
                raise DataError(f"{where}: no {answer_column!r} column, which the built-in correctness reward needs "
                                "(--answer-column names it; prompt-only data needs a --reward of your own that scores "
                                "without one)")
            turns, text = _prompt(where, row[column], column)
            if answer_column not in row:  # prompt-only data: the user's reward functions judge
                extra = {k: v for k, v in row.items() if k != column}
                self.located.append((where, Problem(text or "", "", scorer_for(""), system=system_prompt, turns=turns,
                                                    row=extra, key=len(self.located))))
                continue
            answer = row[answer_column]
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
                raise DataError(f"{where}: column {answer_column!r} must be a non-empty string or a number")
            answer = str(answer)
            if "####" in answer:  # GSM8K: the solution, then "#### <answer>"
                answer = answer.rsplit("####", 1)[1]
            answer = answer.strip()
            if numeric_answers and not is_number(answer):
                raise DataError(f"{where}: answer {answer[:40]!r} is not a number, which the built-in correctness "
                                "reward compares: give a --reward module:function that scores such answers")
            extra = {k: v for k, v in row.items() if k != column}
            self.located.append((where, Problem(text or "", answer, scorer_for(answer), system=system_prompt,
                                                turns=turns, row=extra, key=len(self.located))))
        self.size = len(self.located)

    def located_problems(self) -> list[tuple[str, Problem]]:
        """Every problem with where it comes from, so that all can be checked up front."""
        return self.located

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.located), self.seed, epoch)

    def problems(self, start: int, n: int) -> list[Problem]:
        out = []
        for i in range(start, start + n):
            epoch, j = divmod(i, len(self.located))
            out.append(self.located[self._order(epoch)[j]][1])
        return out


# what makes the data options inert (respec/cli.py `refuse_inert`)
NEEDS_DATA = Needs("data", lambda data: data is not None, "without --data the problems are a generated --task")
NEEDS_TASK = Needs("data", lambda data: data is None, "--data replaces the generated --task")


@dataclass
class DataConfig:
    """The model and the data: the options train.py's stages share (respec/cli.py `option`)."""
    model: str = option("smollm2-135m", "preset (smollm2-135m, tiny, random-*), .gguf file, Hugging Face checkpoint "
                        "directory or Hub id (owner/name, from the local cache)", aliases=("model_name_or_path",))
    task: str = option(DEFAULT_TASK, "reasoning-gym dataset the problems come from (or toy-letters for the tiny "
                       "model, or arithmetic: basic_arithmetic without reasoning-gym)", needs=NEEDS_TASK)
    task_config: dict = option({}, "reasoning-gym options as JSON, e.g. '{\"min_terms\": 2}'", needs=NEEDS_TASK)
    train_size: int = option(0, "a fixed training set of the task's first N problems, visited in epochs (shuffled per "
                             "epoch); 0: a new problem at every data position",
                             needs=Needs("data", lambda data: data is None, "a --data set is already a fixed "
                                         "training set (--train-size picks one of a --task's problems)"))
    data: str | None = option(None, "JSONL file or Hugging Face dataset (file, directory or id) instead of --task: "
                              "GSM8K, prompt/answer or chat rows (respec/data.py)", aliases=("dataset_name",))
    data_split: str = option("train", "split of a Hugging Face dataset", aliases=("dataset_train_split",),
                             needs=NEEDS_DATA)
    data_config: str | None = option(None, "configuration of a Hugging Face dataset id (e.g. main for openai/gsm8k)",
                                     aliases=("dataset_config",), needs=NEEDS_DATA)
    prompt_column: str | None = option(None, "the data's prompt column", shown="the first of prompt, question, "
                                       "messages", needs=NEEDS_DATA)
    answer_column: str = option("answer", "the data's reference-answer column", needs=NEEDS_DATA)
    system_prompt: str | None = option(None, "system prompt ('' for none)",
                                       shown="respec's, which asks for an 'Answer:' line",
                                       needs=Needs("raw_prompts", lambda raw: not raw, "--raw-prompts leaves out the "
                                                   "chat template, where the system prompt goes"))

    def make_task(self, *, seed: int = 0, numeric_answers: bool = True, answers_required: bool = True):
        """The training problems these options name: `--data` (a file or a Hugging Face dataset) if
        given, else the generated `--task` (respec/tasks.py). `answers_required`: rows must have an
        answer (the built-in correctness reward compares it). The options that do not apply to the
        one chosen are refused where they are given (`refuse_inert`)."""
        if self.data is None:
            return make_task(task=self.task, config=self.task_config, seed=seed, system_prompt=self.system_prompt,
                             train_size=self.train_size)
        if self.train_size:  # (a config built in code: a given --train-size is refused before, by refuse_inert)
            raise ValueError("--train-size picks a fixed set of a --task's problems; a --data set is already one")
        return RowsTask(str(self.data), split=self.data_split, config=self.data_config, prompt_column=self.prompt_column,
                        answer_column=self.answer_column, system_prompt=self.system_prompt,
                        numeric_answers=numeric_answers, answers_required=answers_required, seed=seed)
