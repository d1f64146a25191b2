"""What a user coming from TRL's GRPOTrainer meets: defaults in --help, config files with flag, field
and TRL names, prompt-only data and raw prompts, the evaluation's pass@k, trackers, and the bad
inputs of those surfaces (one line, nothing written)."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from respec import distributed
from respec.config import TrainConfig
from respec.engine import Completion
from respec.evaluation import Evaluation
from respec.rewards import Rewards, parse_reward
from respec.sampling import SamplingParams
from respec.tasks import Problem, PromptFormat, scorer_for

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_every_default_of_both_scripts():
    import argparse

    import generate
    import train as train_py

    parser, _ = train_py.build_parser()
    fields = TrainConfig.__dataclass_fields__
    helps = {a.dest: parser._get_formatter()._expand_help(a) for a in parser._actions
             if a.dest in fields and a.help not in (None, argparse.SUPPRESS)}
    missing = [name for name, text in helps.items() if "(default: " not in text]
    assert not missing, missing
    assert "(default: auto+history)" in helps["drafter"] and "(default: 0.1)" in helps["format_weight"]
    assert "(default: on)" in helps["drafter_async"] and "(default: off)" in helps["progress"]
    text = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    assert f"(default: {TrainConfig.k})" in " ".join(text.split("\n  --k K", 1)[1].split("--verify")[0].split())
    assert generate.parse_args([]).k == TrainConfig.k


def test_config_file_takes_flag_names_field_names_and_trl_values(tmp_path, capsys):
    import train as train_py

    conf = tmp_path / "run.yaml"
    conf.write_text("model: tiny\nreward: [correctness]\nno_progress: true\neager: true\nno_std_scaling: true\n"
                    "log_completions: true\ngradient_checkpointing: true\ntop_k: 5\nreport_to: none\n"
                    "dataset_name: openai/gsm8k\ndataset_config: main\n")
    _, given = train_py.parse_args(["--config", str(conf)])
    cfg = train_py.new_config(given)
    cfg.validate(1)
    assert cfg.rewards == ["correctness"] and cfg.progress is False and cfg.compile == "off"
    assert cfg.scale_adv_by_std is False and cfg.log_completions == "all" and cfg.gradient_checkpointing
    assert (cfg.top_k, cfg.report_to, cfg.data_config) == (5, ["none"], "main")
    (tmp_path / "fields.yaml").write_text("progress: false\nrewards: [format]\n")
    _, given = train_py.parse_args(["--config", str(tmp_path / "fields.yaml"), "--no-progress"])
    assert given == {"progress": False, "rewards": ["format"]}

    for text, needle in [("scale_rewards: batch\n", "a batch-wide std ('batch') is not offered"),
                         ("bf16: true\n", "--train-dtype sets the training forward's autocast dtype"),
                         ("reward_weights: [1.0, 0.2]\n", "--reward correctness:1.0"),
                         ("no_progress: maybe\n", "no_progress must be true or false"),
                         ("eager: 1\n", "eager must be true or false")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            train_py.parse_args(["--config", str(bad)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], (text, err)


@pytest.mark.parametrize("args, needle", [
    (["--data", "ROWS", "--data-split", "nosuchsplit"], "is a data file, which has one split"),
    (["--data", "ROWS", "--data-config", "main"], "is a data file; --data-config names a configuration"),
    (["--data-split", "test"], "--data-split does not apply: without --data the problems are a generated --task"),
    (["--train-dtype", "fp16"], "would need loss scaling"),
    (["--reward", "ONE_VALUE"], "returned 1 values for 2 completions"),
    (["--eval-every", "1", "--eval-generations", "4"], "would repeat one greedy completion"),
    (["--raw-prompts", "--chat-template-kwargs", '{"enable_thinking": false}'],
     "--chat-template-kwargs does not apply: --raw-prompts leaves out the chat template"),
    (["--raw-prompts", "--data", "CHAT"], "--raw-prompts needs plain-text prompts"),
    (["--report-to", "mlflow"], "--report-to mlflow: choose from tensorboard, wandb, trackio"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--min-p", "1"], "--min-p must be in [0, 1)"),
    (["--lora-r", "4", "--lora-target-modules", "lm_head"], "--lora-target-modules lm_head: choose from"),
])
def test_bad_inputs_of_the_newer_surfaces_are_one_line(tmp_path, capsys, args, needle):
    import train as train_py

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}) + "\n")
    (tmp_path / "one.py").write_text("def one(completions, **kw):\n    return [1.0]\n")
    subst = {"ROWS": str(rows), "CHAT": str(chat), "ONE_VALUE": f"{tmp_path / 'one.py'}:one"}
    out = tmp_path / "run"
    try:
        code = train_py.main(["--model", "tiny", "--sd", "off", *[subst.get(a, a) for a in args], "--out", str(out),
                              "--no-progress"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], (code, err)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--lora-r", "0", "--lora-alpha", "16"], "--lora-alpha does not apply: --lora-r 0 trains the whole actor"),
    (["--lora-dropout", "0.1"], "--lora-dropout does not apply: --lora-r 0"),
    (["--lora-target-modules", "all-linear"], "--lora-target-modules does not apply: --lora-r 0"),
    (["--reseed-every", "2"], "--reseed-every does not apply: --rollout-seeds per-step"),
    (["--rollout-seeds", "per-step", "--reseed-every", "0"], "--reseed-every does not apply"),  # the default, typed
    (["--data-split", "train"], "--data-split does not apply: without --data"),
    (["--data-config", "main"], "--data-config does not apply: without --data"),
    (["--prompt-column", "question"], "--prompt-column does not apply: without --data"),
    (["--answer-column", "answer"], "--answer-column does not apply: without --data"),
    (["--data", "ROWS", "--train-size", "4"], "--train-size does not apply: a --data set is already a fixed training"),
    (["--data", "ROWS", "--task-config", '{"min_terms": 2}'], "--task-config does not apply: --data replaces"),
    (["--data", "ROWS", "--task", "toy-letters"], "--task does not apply: --data replaces the generated --task"),
    (["--eval-temperature", "0.5"], "--eval-temperature does not apply: there is no held-out evaluation without"),
    (["--eval-every", "0", "--eval-prompts", "8"], "--eval-prompts does not apply: there is no held-out evaluation"),
    (["--eval-generations", "2"], "--eval-generations does not apply"),
    (["--eval-max-new-tokens", "8"], "--eval-max-new-tokens does not apply"),
    (["--eval-data", "ROWS"], "--eval-data does not apply"),
    (["--eager", "--compile-mode", "regional"], "--compile-mode does not apply: --compile off (--eager) compiles"),
    (["--raw-prompts", "--system-prompt", "Be brief."], "--system-prompt does not apply: --raw-prompts leaves out"),
    (["--reward", "correctness", "--format-weight", "0.2"], "--format-weight does not apply: --reward replaces"),
    (["--is-cap", "2"], "--is-cap does not apply: --is-correction off corrects nothing"),
    (["--stage", "drafter", "--data-split", "test"], "--data-split does not apply: without --data"),
])
def test_an_option_that_does_not_apply_is_refused(tmp_path, capsys, args, needle):
    """An option that another option's value makes inert: one line naming both, exit code 2,
    nothing written (a value equal to the default too: a user who typed it expects it to matter)."""
    import train as train_py

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "2"}\n')
    out = tmp_path / "run"
    line = refused(train_py.main, ["--model", "tiny", *([] if "--stage" in args else ["--sd", "off"]),
                                   *[str(rows) if a == "ROWS" else a for a in args], "--out", str(out), "--no-progress"],
                   capsys, "train.py")
    assert needle in line, line
    assert not out.exists()


def refused(main, argv: list[str], capsys, prog: str) -> str:
    """The one line `main(argv)` refused with (exit code 2)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), (code, err)
    return err[0]


def test_the_same_options_apply_once_what_they_need_is_given():
    """The inert cases above with the option that makes each apply: accepted (the refusal is the
    condition's, not the option's)."""
    import train as train_py

    for args in (["--lora-r", "4", "--lora-alpha", "16", "--lora-dropout", "0.1"],
                 ["--rollout-seeds", "per-prompt", "--reseed-every", "2"],
                 ["--data", "rows.jsonl", "--data-split", "test", "--prompt-column", "q", "--answer-column", "a"],
                 ["--eval-at-start", "--eval-temperature", "0.5"], ["--eval-every", "2", "--eval-data", "x.jsonl"],
                 ["--compile", "on", "--compile-mode", "regional"], ["--is-correction", "token_mask", "--is-cap", "2"],
                 ["--train-size", "4", "--task-config", '{"min_terms": 2}'], ["--format-weight", "0.2"]):
        _, given = train_py.parse_args(args)
        assert len(given) == len([a for a in args if a.startswith("--")]), (args, given)


def test_an_option_of_a_config_file_that_does_not_apply_is_refused(tmp_path, capsys):
    import train as train_py

    conf = tmp_path / "run.yaml"
    conf.write_text("model: tiny\nlora_alpha: 16\n")
    out = tmp_path / "run"
    try:
        code = train_py.main(["--config", str(conf), "--sd", "off", "--out", str(out), "--no-progress"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--lora-alpha does not apply: --lora-r 0" in err[0], err
    assert not out.exists()
    _, given = train_py.parse_args(["--config", str(conf), "--lora-r", "8"])  # a flag may make the file's apply
    assert given == {"model": "tiny", "lora_alpha": 16.0, "lora_r": 8}


def test_a_resumed_run_refuses_what_its_own_options_make_inert(tmp_path):
    import dataclasses

    import train as train_py

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(model="tiny", out=str(run)))))
    with pytest.raises(ValueError, match="--eval-temperature does not apply: there is no held-out evaluation"):
        train_py.resumed_config(run, {"eval_temperature": 0.5})
    cfg = train_py.resumed_config(run, {"eval_every": 5, "eval_temperature": 0.5})
    assert (cfg.eval_every, cfg.eval_temperature) == (5, 0.5)


@pytest.mark.parametrize("args, needle", [
    (["--k", "-1"], "--k does not apply: without a --drafter nothing is drafted"),
    (["--drafter", "none", "--k", "3"], "--k does not apply: without a --drafter"),
    (["--draft-temperature", "0.7"], "--draft-temperature does not apply: without a --drafter"),
    (["--verify", "rejection"], "--verify does not apply: without a --drafter"),
    (["--past-rollouts", "2"], "--past-rollouts does not apply: without a --drafter"),
    (["--drafter", "history", "--past-rollouts", "2"], "--past-rollouts does not apply: only --bench"),
    (["--new-tokens", "8"], "--new-tokens does not apply: neither --bench nor --sweep is given"),
    (["--batch-sizes", "1,2"], "--batch-sizes does not apply: neither --bench nor --sweep"),
    (["--json", "OUT"], "--json does not apply: neither --bench nor --sweep"),
    (["--bench", "--sweep-reps", "1"], "--sweep-reps does not apply: no --sweep is given"),
    (["--plot", "OUT"], "--plot does not apply: no --sweep"),
    (["--longtail-tokens", "8"], "--longtail-tokens does not apply: no --sweep"),
    (["--chat"], "--chat does not apply: without --prompt"),
    (["--bench", "--prompt", "hi"], "--prompt does not apply: --bench and --sweep make their own prompts"),
    (["--bench", "--max-new-tokens", "8"], "--max-new-tokens does not apply: --bench and --sweep"),
    (["--top-p", "0.9"], "--top-p does not apply: --temperature 0 decodes greedily"),
    (["--sweep", "--drafter", "history", "--temperature", "1"], "--temperature does not apply: --sweep decodes"),
    (["--eager", "--compile-mode", "whole"], "--compile-mode does not apply: --eager compiles nothing"),
    (["--drafter", "history", "--k", "-1"], "--k must be >= 1, got -1"),  # applies: the value check speaks
])
def test_an_option_generate_does_not_use_is_refused(tmp_path, capsys, args, needle):
    import generate

    out = tmp_path / "out.json"
    line = refused(generate.main, ["--model", "tiny", *[str(out) if a == "OUT" else a for a in args]], capsys,
                   "generate.py")
    assert needle in line, line
    assert not out.exists()


def test_an_option_both_scripts_take_has_one_help_text():
    """generate.py declares the options it shares with train.py from train.py's fields: the same
    help text in both parsers (the defaults may differ), right for both."""
    import generate
    import train as train_py

    def helps(parser):
        return {a.dest: a.help.split(" (default: ")[0] for a in parser._actions
                if a.option_strings and a.dest != "help"}

    train_helps, generate_helps = helps(train_py.build_parser()[0]), helps(generate.build_parser())
    both = set(train_helps) & set(generate_helps)
    assert {"model", "task", "dtype", "seed", "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "drafter",
            "k", "draft_temperature", "verify", "compile_mode", "kv_cache_mb", "new_tokens"} <= both, both
    assert len(both) >= 10  # (the comparison has something to compare)
    assert {name: train_helps[name] for name in both} == {name: generate_helps[name] for name in both}
    assert "(0: all)" in generate_helps["top_k"]
    assert "none (no speculation)" in generate_helps["drafter"] and "replay (" in generate_helps["drafter"]


def test_every_condition_names_options_of_its_script():
    """A `needs` names options the script has (a misspelt one would never refuse anything)."""
    import generate
    from respec.cli import option_fields

    checked = 0
    for cls in (TrainConfig, generate.GenerateConfig):
        fields = option_fields(cls)
        for f in fields.values():
            for need in f.metadata["needs"]:
                assert set(need.names()) <= set(fields), (cls.__name__, f.name, need.names())
                checked += 1
    assert checked >= 30, checked


def test_a_missing_tracker_package_is_one_line(monkeypatch):
    import importlib.util

    from train import check_parts

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report-to wandb needs the wandb package \(pip install wandb; "
                                         r"respec logs offline"):
        check_parts(TrainConfig(report_to=["tensorboard,wandb"]))


def test_reward_weights_must_be_finite_and_nan_is_a_name(tmp_path):
    (tmp_path / "odd.py").write_text("def nan(completions, **kw):\n    return [0.5] * len(completions)\n")
    f = parse_reward(f"{tmp_path / 'odd.py'}:nan")
    assert (f.name.endswith("nan"), f.weight) == (True, 1.0)
    assert parse_reward(f"{tmp_path / 'odd.py'}:nan:0.25").weight == 0.25
    with pytest.raises(ValueError, match="cannot import correctness"):  # inf is no weight: correctness:inf a function
        parse_reward("correctness:inf:1")


def test_prompt_only_data_with_a_reward_of_ones_own(tmp_path, tokenizer):
    from respec.data import DataError
    from respec.trainer import Trainer

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Write a haiku.", "topic": "rain"}) + "\n"
                    + json.dumps({"prompt": "Write a limerick.", "topic": "sun"}) + "\n")
    (tmp_path / "judge.py").write_text("def short(completions, topic, **kw):\n"
                                       "    return [float(len(c) < 40) for c in completions]\n")
    cfg = dict(model="tiny", data=str(data), sd="off", compile="off", progress=False)
    with pytest.raises(DataError, match="prompts.jsonl:1: no 'answer' column, which the built-in correctness"):
        Trainer(TrainConfig(**cfg), d=distributed.Dist(), run_dir=tmp_path / "run", tokenizer=tokenizer)
    trainer = Trainer(TrainConfig(**cfg, rewards=[f"{tmp_path / 'judge.py'}:short"]), d=distributed.Dist(),
                      run_dir=tmp_path / "run", tokenizer=tokenizer)
    problems = trainer.task.problems(0, 2)
    assert sorted(p.row["topic"] for p in problems) == ["rain", "sun"] and all(p.answer == "" for p in problems)
    assert [s.reward for s in trainer.rewards.score(problems, ["ok", "x" * 50], [[], []])] == [1.0, 0.0]
    assert not (tmp_path / "run").exists()


def test_data_config_reaches_the_datasets_loader(monkeypatch):
    import datasets

    from respec.data import RowsTask

    seen = {}

    def fake_load_dataset(path, name=None, split=None):
        seen.update(path=path, name=name, split=split)
        return [{"question": "1+1?", "answer": "#### 2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = RowsTask("openai/gsm8k", split="test", config="main")
    assert seen == {"path": "openai/gsm8k", "name": "main", "split": "test"}
    assert task.name == "openai/gsm8k (main)[test]" and task.problems(0, 1)[0].answer == "2"


def test_a_dataset_repository_with_configurations(tmp_path):
    """A Hugging Face dataset laid out as on the Hub (a README whose YAML names two configurations
    and their files), read from a local directory: --data-config picks one, --data-split a split of
    it; without a config the first (the default) is read."""
    from respec.data import DataError, RowsTask

    repo = tmp_path / "gsm8k-like"
    for config, n in (("main", 3), ("socratic", 2)):
        (repo / config).mkdir(parents=True)
        for split, offset in (("train", 0), ("test", 100)):
            rows = [{"question": f"{config} {i + offset}?", "answer": f"... #### {i + offset}"} for i in range(n)]
            (repo / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n  default: true\n"
        "- config_name: socratic\n  data_files:\n  - split: train\n    path: socratic/train.jsonl\n"
        "  - split: test\n    path: socratic/test.jsonl\n---\n")
    socratic = RowsTask(str(repo), split="test", config="socratic")
    assert socratic.size == 2 and sorted(p.answer for p in socratic.problems(0, 2)) == ["100", "101"]
    assert socratic.problems(0, 1)[0].question.startswith("socratic 10")
    assert RowsTask(str(repo)).size == 3  # the default configuration, train split
    with pytest.raises(DataError, match="nosuch"):
        RowsTask(str(repo), config="nosuch")


def test_raw_prompts_and_chat_template_kwargs(tokenizer):
    problem = Problem("What is 1+1?", "2", scorer_for("2"))
    raw = PromptFormat.make(raw=True).ids(tokenizer, problem)
    assert raw == tokenizer.encode("What is 1+1?") and tokenizer.decode(raw) == "What is 1+1?"
    chat = PromptFormat.make().ids(tokenizer, problem)
    assert len(chat) > len(raw) and "system" in tokenizer.decode(chat)

    class Recording:
        def apply_chat_template(self, messages, **kw):
            self.kw = kw
            return "text"

        def encode(self, text, add_special_tokens=True):
            return [1, 2]

    rec = Recording()
    assert PromptFormat.make(template_kwargs={"enable_thinking": False}).ids(rec, problem) == [1, 2]
    assert rec.kw == {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
    with pytest.raises(ValueError, match="chat turns"):
        PromptFormat.make(raw=True).ids(tokenizer, Problem("", "2", scorer_for("2"),
                                                           turns=[{"role": "user", "content": "hi"}]))


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return f"Answer: {ids[0]}"

    def encode(self, text, add_special_tokens=True):
        return [0]


class _Engine:
    """Answers `right[(problem, sample)]` correctly (the problem's index), else wrongly; records the
    seeds it was asked for."""

    def __init__(self, right):
        self.right, self.seeds = right, []

    def generate(self, prompts, params, policy=None):
        self.seeds.append([p.seed for p in params])
        n = len(params) // len(set(map(tuple, prompts)) or {()}) if prompts else 1
        outs = []
        for j, p in enumerate(prompts):
            i, g = p[0], j % n
            outs.append(Completion([i if (i, g) in self.right else 99], [0.0], "stop"))
        return outs


def test_evaluation_pass_at_1_and_pass_at_n_by_hand():
    problems = [Problem(f"q{i}", str(i), scorer_for(str(i))) for i in range(4)]
    prompt = types.SimpleNamespace(ids=lambda tok, p: [int(p.question[1:])])
    # problem 0: 3 of 4 samples right; problem 1: 1 of 4; problems 2, 3: none
    engine = _Engine({(0, 0), (0, 1), (0, 2), (1, 3)})
    ev = Evaluation(problems, SamplingParams(max_new_tokens=8, temperature=1.0), generations=4)
    out = ev.run(engine, _Tok(), Rewards(["correctness"]), distributed.Dist(), prompt=prompt)
    assert out["eval_accuracy"] == pytest.approx(4 / 16) and out["eval_pass_at_4"] == pytest.approx(2 / 4)
    again = ev.run(engine, _Tok(), Rewards(["correctness"]), distributed.Dist(), prompt=prompt)
    assert engine.seeds[0] == engine.seeds[1] and len(set(engine.seeds[0])) == 16  # fixed, distinct noise
    assert again["eval_accuracy"] == out["eval_accuracy"]
    greedy = Evaluation(problems, generations=1).run(_Engine({(0, 0), (1, 0)}), _Tok(), Rewards(["correctness"]),
                                                     distributed.Dist(), prompt=prompt)
    assert greedy["eval_accuracy"] == 0.5 and not any(k.startswith("eval_pass_at") for k in greedy)


def test_trackers_get_every_step(tmp_path, monkeypatch):
    from respec.metrics import MetricsLog

    calls = []

    def fake(name):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        run = types.SimpleNamespace(log=lambda m, step: calls.append((name, "log", step, m)),
                                    finish=lambda: calls.append((name, "finish")))
        mod.init = lambda **kw: calls.append((name, "init", kw["project"], kw["name"], kw.get("mode"))) or run
        mod.log = run.log
        mod.finish = run.finish
        mod.Table = lambda columns, data: ("table", tuple(columns), [tuple(r) for r in data])
        monkeypatch.setitem(sys.modules, name, mod)

    fake("wandb")
    fake("trackio")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLog(tmp_path, main=True, report_to=["wandb,trackio"], config={"lr": 1e-3})
    log.write({"step": 1, "reward_mean": 0.5, "mismatch_worst": {"token": "x"}, "flag": True})
    log.table("completions", [{"step": 1, "completion": "Answer: 2", "rewards": {"c": 1.0}}], step=1)
    log.close()
    table = ("table", ("step", "completion", "rewards"), [(1, "Answer: 2", '{"c": 1.0}')])
    assert ("wandb", "log", 1, {"completions": table}) in calls and ("trackio", "log", 1, {"completions": table}) in calls
    assert ("wandb", "init", "respec", tmp_path.name, "offline") in calls  # offline unless asked otherwise
    assert ("trackio", "init", "respec", tmp_path.name, None) in calls
    assert ("wandb", "log", 1, {"reward_mean": 0.5}) in calls and ("trackio", "log", 1, {"reward_mean": 0.5}) in calls
    assert ("wandb", "finish") in calls and ("trackio", "finish") in calls
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["flag"] is True
    assert not (tmp_path / "tensorboard").exists()


def test_evaluation_at_start_sampled_with_pass_at_n_in_a_run(tmp_path):
    """A toy run with the evaluation before the first step, sampled, N = 2, every step, with
    gradient checkpointing, top-k and min-p: step 0 in metrics.jsonl, pass@2 beside pass@1, the summary
    and the reward plot."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--task", "toy-letters",
                          "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--steps", "2", "--sd", "off",
                          "--eager", "--no-progress", "--eval-at-start", "--eval-every", "1", "--eval-prompts", "3",
                          "--eval-temperature", "1", "--eval-generations", "2", "--gradient-checkpointing",
                          "--top-k", "20", "--min-p", "0.05", "--out", str(run)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "eval_accuracy", "eval_pass_at_2", "eval_reward_mean", "eval_s"}
    assert all(r["eval_accuracy"] <= r["eval_pass_at_2"] for r in rows)
    assert "held-out pass@1" in out.stdout and "pass@2" in out.stdout
    assert (run / "plots" / "reward.png").is_file()


def test_held_out_data_beside_a_task_with_a_fixed_training_set(tmp_path, tokenizer):
    """--eval-data with --task's own options (--train-size, --task-config): those are the training
    task's, not the held-out file's."""
    from respec.config import TrainConfig
    from respec.evaluation import held_out_problems

    rows = tmp_path / "held_out.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n')
    cfg = TrainConfig(model="tiny", task="basic_arithmetic", task_config={"min_terms": 2, "max_terms": 2}, train_size=8,
                      eval_every=1, eval_data=str(rows), eval_prompts=2)
    problems = held_out_problems(cfg, cfg.make_task(seed=0), numeric_answers=True)
    assert [p.answer for p in problems] == ["2", "4"]


ENABLING = {"data": "rows.jsonl", "is_correction": "token_mask"}  # values that make an aliased option apply


def test_every_trl_alias_in_a_config_file_maps_to_its_option(tmp_path):
    """Each TRL name an option declares, written in a config file, sets that option (with the value
    given); the same name on the command line does too."""
    import train as train_py
    from respec.cli import option_fields

    checked = 0
    for stage, cls in train_py.CONFIGS.items():
        for name, f in option_fields(cls).items():
            kind, choices = str(f.type).split("|")[0].strip(), f.metadata["choices"]
            value = {"int": 7, "float": 0.5, "bool": False, "list": ["correctness"], "dict": {"a": 1}}.get(
                kind, choices[-1] if choices else "x")
            # with what the option needs to apply (given alone, it would be refused as inert)
            enable = {n: ENABLING[n] for need in f.metadata["needs"] if f.metadata["aliases"] and not need.holds(cls())
                      for n in need.names()}
            flags = [t for n, v in enable.items() for t in (f"--{n.replace('_', '-')}", v)]
            for alias in f.metadata["aliases"]:
                conf = tmp_path / f"{alias}.json"
                conf.write_text(json.dumps({alias: value, **enable}))
                _, given = train_py.parse_args(["--stage", stage, "--config", str(conf)])
                assert given == {name: value, **enable}, (alias, given)
                if kind not in ("list", "dict", "bool"):
                    _, given = train_py.parse_args(["--stage", stage, f"--{alias}", str(value), *flags])
                    assert given == {name: value, **enable}, (alias, given)
                checked += 1
    assert checked >= 20, checked  # (the aliases exist: the loop is not empty)


def test_the_readme_trl_example_runs_as_written(tmp_path):
    """README, "Coming from TRL": the reward functions (the code block's right column) and the respec
    command, run as written but for the model (the tiny one: the real one would need a download),
    one step and a CPU's quick settings."""
    import shlex

    readme = (ROOT / "README.md").read_text().split("## Coming from TRL", 1)[1]
    block = readme.split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    col = block[0].index("# my_rewards.py")
    code = [line[col:] for line in block if len(line) > col and line[col - 1] == " "]
    code = [c for c in code if c.startswith(("def ", "    "))]
    assert any(c.startswith("def correct") for c in code) and any(c.startswith("def brevity") for c in code)
    (tmp_path / "my_rewards.py").write_text("\n".join(code) + "\n")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)})
                                                 + "\n" for i in range(8)))
    command = readme.split("# respec (", 1)[1].split("\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"] and "--model" in argv
    argv[argv.index("--model") + 1] = "tiny"
    argv[1] = str(ROOT / "train.py")
    out = subprocess.run([sys.executable, *argv[1:], "--max_steps", "1", "--sd", "off", "--eager",
                          "--no-progress", "--max_completion_length", "8"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "respec" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]["rewards"]) == {"correct", "brevity"}
