"""How a training run stops (respec/guards.py): Ctrl-C in a rollout writes a checkpoint that resumes
exactly; non-finite losses skip updates and stop the run after three bad steps in a row, the last
good checkpoint kept; a checkpoint that cannot be written (a full disk) leaves the previous one as
the latest. Each ends with one line and a non-zero exit code."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from respec import checkpoint, distributed, grpo, guards
from respec.config import TrainConfig
from respec.trainer import Trainer
from test_trainer import ROOT, TOY, exact, metrics, train


def toy_trainer(tmp_path, tokenizer, **kw) -> Trainer:
    cfg = TrainConfig(**{**dict(model="tiny", task="toy-letters", steps=6, prompts=4, group=8, max_new_tokens=8,
                                temperature=0.05, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, sd="off",
                                compile="off", progress=False), **kw})
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path / "run", tokenizer=tokenizer, log=lambda m: None)
    trainer.start()
    return trainer


def test_ctrl_c_in_a_rollout_checkpoints_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = [*TOY, "--steps", "5", "--checkpoint-every", "100"]  # no checkpoint but the final one and Ctrl-C's
    train(*args, "--out", str(straight))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--out", str(stopped)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (stopped / "metrics.jsonl").is_file():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)  # during step 2 (its rollout, most likely) or right after step 1
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: the checkpoint of step" in lines[-1] and "--resume" in lines[-1], lines[-3:]
    saved = checkpoint.latest_checkpoint(stopped)
    assert saved is not None and len(metrics(stopped)) == int(saved.name.split("_")[1]) < 5
    train("--resume", str(stopped), "--no-progress")
    assert exact(metrics(stopped)) == exact(metrics(straight))


def test_non_finite_loss_skips_updates_then_stops(tmp_path, tokenizer, monkeypatch):
    trainer = toy_trainer(tmp_path, tokenizer, checkpoint_every=1)
    real = grpo.policy_loss

    def nan_after_the_first_step(*args, **kwargs):
        terms = real(*args, **kwargs)
        if trainer.step >= 1:  # (steps done so far) step 1 is good, every later loss is NaN
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(grpo, "policy_loss", nan_after_the_first_step)
    saved = {}
    original_save = trainer.save

    def save_and_remember():  # the actor as the last checkpoint has it
        original_save()
        saved.update({k: v.clone() for k, v in trainer.actor.state_dict().items()})

    trainer.save = save_and_remember
    with pytest.raises(guards.RunFailed, match=r"not finite in 3 steps in a row \(steps 2-4\).*step 1\) is kept"):
        trainer.run()
    rows = metrics(trainer.run_dir)
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1, 1]
    assert rows[0]["grad_norm"] > 0 and all(r["grad_norm"] is None for r in rows[1:])
    assert checkpoint.latest_checkpoint(trainer.run_dir).name == "step_000001"  # bad steps are not checkpointed
    assert all(torch.equal(v, saved[k]) for k, v in trainer.actor.state_dict().items())  # no bad update applied


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    trainer = toy_trainer(tmp_path, tokenizer, steps=3, checkpoint_every=1)
    real = checkpoint.dcp.save
    calls = {"n": 0}

    def disk_full_on_the_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real(*args, **kwargs)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", disk_full_on_the_second)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint step_000002.*No space left.*"
                                                          "step_000001 is still the latest"):
        trainer.run()
    root = checkpoint.checkpoint_root(trainer.run_dir)
    assert checkpoint.latest_checkpoint(trainer.run_dir).name == "step_000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no partial files left


def test_cli_reports_run_failures_in_one_line(tmp_path, monkeypatch, capsys):
    import train as train_py

    def fail(*args, **kwargs):
        raise checkpoint.CheckpointError("cannot write checkpoint step_000001 ([Errno 28] No space left on device); "
                                         "there is no earlier checkpoint")

    monkeypatch.setattr(train_py, "run_grpo", fail)
    assert train_py.main(["--model", "tiny", "--sd", "off"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: cannot write checkpoint")
