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

    from respec.lab.plot import measured_acceptance, plot_run

    rows = [{"step": i + 1, "accept_len": a, "sd_fraction": f, "reward_mean": 0.1, "accuracy": 0.1, "format_rate": 1.0,
             "rollout_s": 1.0, "reward_s": 0.0, "train_s": 1.0, "drafter_s": 0.0, "rollout_tok_s": 10.0}
            for i, (a, f) in enumerate([(1.4, 0.3), (0.0, 0.0), (1.6, 0.1)])]
    assert measured_acceptance(rows) == [(1, 1.4), (3, 1.6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(tmp_path)
    assert (tmp_path / "plots" / "acceptance.png") in written
