"""The side-by-side experiment runner and its report on the tiny model: an experiment killed in the
middle of a run continues where it stopped, a different command line against the same directory
is refused, and the report has every variant's row and plot."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

from test_trainer import ROOT

TOY = ["--model", "tiny", "--task", "toy-letters", "--prompts", "4", "--group", "8", "--max-new-tokens", "8",
       "--temperature", "0.05", "--lr", "1e-3", "--eager", "--drafter", "random"]


def experiment(out, *extra, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "respec.lab.experiment", "--out", str(out), "--steps", "3", "--seeds", "0",
           "--variants", "baseline,rkd", *extra, "--", *TOY]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, **kw)


def test_experiment_resumes_and_reports(tmp_path):
    out = tmp_path / "exp"
    # Kill the whole experiment (runner and its train.py) once the baseline has a checkpointed step.
    proc = subprocess.Popen([sys.executable, "-m", "respec.lab.experiment", "--out", str(out), "--steps", "3", "--seeds",
                             "0", "--variants", "baseline,rkd", "--", *TOY, "--checkpoint-every", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "baseline" / "seed0" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file():
        assert proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "rkd").exists()

    # The same command again: the baseline resumes from its checkpoint, rkd runs, both complete.
    cmd_args = ["--", *TOY, "--checkpoint-every", "1"]
    done = subprocess.run([sys.executable, "-m", "respec.lab.experiment", "--out", str(out), "--steps", "3", "--seeds",
                           "0", "--variants", "baseline,rkd", *cmd_args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "baseline seed 0: resuming" in done.stdout and "rkd seed 0: running" in done.stdout
    for variant in ("baseline", "rkd"):
        rows = (out / variant / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3 and (out / variant / "seed0" / "hf").is_dir()
        assert not (out / variant / "seed0" / "checkpoints").exists()  # dropped once the run finished
    assert "--resume" in (out / "baseline" / "seed0.log").read_text()

    again = subprocess.run([sys.executable, "-m", "respec.lab.experiment", "--out", str(out), "--steps", "3", "--seeds",
                            "0", "--variants", "baseline,rkd", *cmd_args], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count(": done") == 2

    other = experiment(out)  # other settings (no --checkpoint-every): refused, nothing touched
    assert other.returncode == 2 and "other settings" in other.stderr and len(other.stderr.splitlines()) == 1

    report = subprocess.run([sys.executable, "-m", "respec.lab.report", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    text = (out / "BENCHMARKS.md").read_text()
    assert "| baseline | 1 |" in text and "| rkd | 1 |" in text and "python -m respec.lab.experiment" in text
    for png in ("phases", "speed", "reward"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 0 and f"plots/{png}.png" in text


def test_bad_experiment_arguments(tmp_path):
    bad = {
        "own flag": (["--", "--sd", "on"], "is set by the experiment itself"),
        "unknown variant": (["--variants", "baseline,turbo"], "unknown variant"),
        "bad seeds": (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
        "two drafters": (["--variants", "baseline,history+adaptive", "--", "--drafter", "runs/head"],
                         "would override the drafter of history+adaptive"),
    }
    for name, (args, needle) in bad.items():
        out = subprocess.run([sys.executable, "-m", "respec.lab.experiment", "--out", str(tmp_path / name), *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and needle in out.stderr and len(out.stderr.splitlines()) == 1, (name, out.stderr)
        assert not (tmp_path / name).exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    out = subprocess.run([sys.executable, "-m", "respec.lab.experiment", "--out", str(tmp_path / "notes")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not an experiment directory" in out.stderr
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]
    rep = subprocess.run([sys.executable, "-m", "respec.lab.report", str(tmp_path / "notes")], capture_output=True,
                         text=True, cwd=ROOT)
    assert rep.returncode == 2 and "not an experiment directory" in rep.stderr


def test_reward_table_pairs_seeds_with_the_baseline():
    from respec.lab.report import reward_table

    def run(*rewards):  # one seed's metrics rows
        return [{"reward_mean": r, "accuracy": r / 2} for r in rewards]

    runs = {"baseline": {0: run(0.4, 0.6), 1: run(0.6, 0.8), 2: run(0.2, 0.4)},  # run means 0.5, 0.7, 0.3
            "better": {0: run(0.5, 0.7), 1: run(0.8, 0.9), 2: run(0.3, 0.5)},  # +0.1, +0.15, +0.1 per seed
            "noise": {0: run(0.6, 0.8), 1: run(0.5, 0.7), 2: run(0.2, 0.4)},  # +0.2, -0.1, 0: no difference
            "one": {0: run(0.4, 0.6)}}
    lines = reward_table(runs).splitlines()
    assert lines[2] == "| baseline | 0.500 +- 0.100 / 0.700 +- 0.100 / 0.300 +- 0.100 | 0.250 / 0.350 / 0.150 | - | - |"
    # +0.117 +- 4.303 * 0.0289 / sqrt(3): the interval leaves out 0 although the ranges overlap
    assert lines[3].endswith("| +0.117 [+0.045, +0.188] | yes |"), lines[3]
    assert lines[4].endswith("| no |") and "[-0." in lines[4], lines[4]
    assert lines[5].endswith("| +0.000 (one seed) | - |"), lines[5]


def test_accept_len_counts_only_steps_that_speculated():
    from respec.lab.report import first_last, per_step, speculated

    adaptive = [{"sd_fraction": 0.0, "accept_len": 0.0}, {"sd_fraction": 0.1, "accept_len": 2.0},
                {"sd_fraction": 0.0, "accept_len": 0.0}, {"sd_fraction": 0.5, "accept_len": 3.0}]
    assert first_last({0: speculated(adaptive)}, "accept_len", n=1) == "2.000 -> 3.000"
    assert first_last({0: speculated(adaptive[:1])}, "accept_len") == "-"  # never speculated
    vals = per_step({0: adaptive, 1: [dict(r, sd_fraction=0.2, accept_len=1.0) for r in adaptive]}, "accept_len",
                    sd_only=True)
    assert vals == [1.0, 1.5, 1.0, 2.0]
    alone = per_step({0: adaptive}, "accept_len", sd_only=True)
    assert math.isnan(alone[0]) and alone[1] == 2.0 and math.isnan(alone[2])


def test_acceptance_plot_leaves_out_steps_that_did_not_speculate(tmp_path):
    import json

    from respec.run_plots import measured_acceptance, plot_run

    rows = [{"step": i + 1, "accept_len": a, "sd_fraction": f, "reward_mean": 0.1, "accuracy": 0.1, "format_rate": 1.0,
             "rollout_s": 1.0, "reward_s": 0.0, "train_s": 1.0, "drafter_s": 0.0, "rollout_tok_s": 10.0}
            for i, (a, f) in enumerate([(1.4, 0.3), (0.0, 0.0), (1.6, 0.1)])]
    assert measured_acceptance(rows) == [(1, 1.4), (3, 1.6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(tmp_path)
    assert (tmp_path / "plots" / "acceptance.png") in written
    assert (tmp_path / "plots" / "epochs.png") in written


def test_groups_with_signal_per_data_epoch():
    from respec.run_plots import epoch_means

    rows = [{"step": s, "epoch": (s - 1) // 2, "groups_with_signal": g} for s, g in enumerate([1.0, 0.5, 0.5, 0.0], 1)]
    assert epoch_means(rows, "groups_with_signal") == [(1.5, 0.75), (3.5, 0.25)]
    endless = [{"step": s, "epoch": 0, "groups_with_signal": 0.5} for s in (1, 2, 3)]
    assert epoch_means(endless, "groups_with_signal") == [(2.0, 0.5)]


def fake_experiment(out, seeds: list[int], runs: dict) -> None:
    """An experiment directory as respec.lab.experiment leaves it: runs[variant][seed] = (metrics rows,
    completion rows)."""
    import json

    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"steps": 4, "seeds": seeds, "variants": list(runs),
                                                     "train_args": ["--train-size", "2"]}))
    for variant, per_seed in runs.items():
        for seed, (rows, completions) in per_seed.items():
            run = out / variant / f"seed{seed}"
            (run / "hf").mkdir(parents=True)  # finished
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (run / "completions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in completions))


def test_learning_cost_pools_seeds_and_pairs_them_with_fresh_noise(tmp_path):
    from respec.lab.learning_cost import main, report

    def rows(signal, entropy, held_out):  # 4 steps, 2 per data epoch, the held-out evaluation at the last
        out = [{"step": i + 1, "epoch": i // 2, "reward_mean": 0.1 * (i + 1), "groups_with_signal": s,
                "entropy": e} for i, (s, e) in enumerate(zip(signal, entropy))]
        out[-1].update(eval_accuracy=held_out, eval_pass_at_4=min(1.0, 2 * held_out))
        return out

    def solved(*correct):  # one completion per problem of the set, in order
        return [{"prompt": [{"role": "user", "content": f"problem {i}"}], "rewards": {"correctness": c}}
                for i, c in enumerate(correct)]

    fresh = {s: (rows([0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.8, 0.8], 0.4 + 0.1 * s), solved(1.0, 0.0)) for s in (0, 1, 2)}
    reused = {s: (rows([0.5, 0.5, 0.25, 0.25 + 0.06 * s], [1.0, 1.0, 0.5, 0.5], 0.4 + 0.1 * s), solved(1.0, 1.0))
              for s in (0, 1, 2)}
    fake_experiment(tmp_path / "a", [0, 1], {"baseline": {s: fresh[s] for s in (0, 1)},
                                              "per-prompt": {s: reused[s] for s in (0, 1)}})
    fake_experiment(tmp_path / "b", [2], {"baseline": {2: fresh[2]}, "per-prompt": {2: reused[2]}})
    text = report([tmp_path / "a", tmp_path / "b"])
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| variant | seeds |"))
    assert head.split(" | ")[2:5] == ["held-out pass@1", "held-out pass@4", "ever solved"]
    base = next(line for line in lines if line.startswith("| baseline | 3 |"))
    assert "| 0.500 (0.40 / 0.50 / 0.60) |" in base and "| 0.500 (0.50 / 0.50 / 0.50) |" in base  # ever solved 1 of 2
    paired = next(line for line in lines if line.startswith("| per-prompt |") and "(" in line and ".." in line)
    cells = [c.strip() for c in paired.strip("|").split("|")][1:]
    assert cells[0].startswith("+0.000 (+0.000 .. +0.000)")  # same held-out accuracy in every seed
    assert cells[2] == "+0.500 (+0.500 .. +0.500) **resolved**"  # ever solved: 2 of 2 against 1 of 2
    # groups with signal over the run: epoch means (0.5, 0.25 + 0.03 s) against (0.5, 0.5): -0.125 +
    # 0.015 s, mean -0.11, interval +- 4.303 * 0.015 / sqrt(3)
    assert cells[3] == "-0.110 (-0.147 .. -0.073) **resolved**"
    assert cells[-1] == "-0.300 (-0.300 .. -0.300) **resolved**"  # entropy of the last epoch
    assert lines[-2].startswith("| baseline | 0.50 | 0.50 |") and lines[-1].startswith("| per-prompt | 0.50 | 0.28 |")

    fake_experiment(tmp_path / "c", [2], {"baseline": {2: fresh[2]}})
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 0  # a directory with fewer variants pools
    assert main([str(tmp_path / "b"), str(tmp_path / "c")]) == 2  # a seed in two directories: refused
    fake_experiment(tmp_path / "d", [3], {"per-prompt": {3: reused[0]}})  # a series without the baseline pools
    assert "| per-prompt | 4 |" in report([tmp_path / "a", tmp_path / "b", tmp_path / "d"])
    assert main([str(tmp_path / "nothing")]) == 2


def test_greedy_eval_of_the_final_actor_equals_the_runs_own(tmp_path):
    """The report's greedy evaluation of RUN/hf gives what the run's own greedy evaluation gave at
    its last step (the same held-out problems, the same weights)."""
    from respec.lab.learning_cost import greedy_eval
    from test_trainer import TOY as TRAIN_TOY
    from test_trainer import metrics, train

    run = tmp_path / "run"
    train(*TRAIN_TOY, "--steps", "2", "--train-size", "4", "--eval-every", "2", "--eval-prompts", "6",
          "--out", str(run))
    own = metrics(run)[-1]
    got = greedy_eval(run)
    assert got["problems"] == 6
    assert (got["eval_accuracy"], got["eval_reward_mean"]) == (own["eval_accuracy"], own["eval_reward_mean"])
    assert (run / "greedy_eval.json").is_file() and greedy_eval(run) == got


def test_report_from_the_second_epoch_against_the_same_seeding():
    """Without a `baseline` run, `per-prompt` (SD off, the replay variant's seeding) is the baseline;
    the later-epoch table compares steps of epoch >= 1 only and says how long rollouts matched."""
    from respec.lab.report import baseline_of, later_epochs, table

    def rows(rollout_s, tok_s, rewards, replay=0.0):
        return [{"step": i + 1, "epoch": i // 2, "rollout_s": r, "rollout_tok_s": t, "step_s": r + 1.0,
                 "reward_s": 0.0, "train_s": 1.0, "drafter_s": 0.0, "sd_fraction": 0.5 if replay else 0.0,
                 "accept_len": 2.0, "reward_mean": w, "accuracy": w, "response_len_mean": 10.0,
                 "replay_token_frac": replay} for i, (r, t, w) in enumerate(zip(rollout_s, tok_s, rewards))]

    runs = {"per-prompt": {0: rows([2, 2, 2, 2], [10, 10, 10, 10], [0.1, 0.2, 0.3, 0.4]),
                           1: rows([2, 2, 2, 2], [10, 10, 10, 10], [0.1, 0.2, 0.3, 0.4])},
            "respec+replay": {0: rows([4, 4, 1, 1], [5, 5, 20, 20], [0.1, 0.2, 0.3, 0.4], replay=0.5),
                              1: rows([4, 4, 1, 1], [5, 5, 20, 20], [0.1, 0.2, 0.9, 0.4], replay=0.5)}}
    assert baseline_of(runs) == "per-prompt" and "| per-prompt | 2 |" in table({}, runs)
    text = later_epochs(runs)
    assert "steps 3 and later" in text
    line = next(x for x in text.splitlines() if x.startswith("| respec+replay |"))
    # steps 3-4 only: 20 tok/s against 10 (2.00x), step 2 s against 3 s (1.50x); seed 1 parts at step 3
    assert line == "| respec+replay | 2 | 3-4 | 1.00 | 20.0 | 2.00x | 2.00 | 1.50x | 50% | 50% | 4 / 2 |", line
    endless = {"baseline": {0: [dict(r, epoch=0) for r in runs["per-prompt"][0]]}}
    assert later_epochs(endless) is None
