"""The GRPO trainer end to end on the tiny model: it learns a toy task, the exported Hugging Face
checkpoint is the actor, resuming is exact (also after SIGKILL), two data-parallel ranks under
torchrun equal one process, and bad input ends with one line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.loading import cpu_native_bf16
from respec import checkpoint, distributed
from respec.config import TrainConfig
from respec.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# The toy run every test here uses: tiny random model, toy-letters task, sharp sampling so that GRPO
# reweights a few dozen likely tokens (see respec/tasks.py, LettersTask).
TOY = ["--model", "tiny", "--task", "toy-letters", "--prompts", "4", "--group", "8", "--max-new-tokens", "8",
       "--temperature", "0.05", "--lr", "1e-3", "--sd", "off", "--eager", "--no-progress",
       "--warmup-steps", "0", "--min-lr-ratio", "1"]
# What a step's metrics must reproduce exactly (everything but the clocks).
EXACT = ["step", "reward_mean", "reward_std", "accuracy", "response_len_mean", "loss", "kl", "entropy",
         "clip_frac", "grad_norm", "lr", "trained_tokens", "decode_steps"]


def train(*args, torchrun: int = 0, check: bool = True, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                "--standalone"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if torchrun else None
    out = subprocess.run(launcher + [str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def exact(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in rows]


# ----------------------------------------------------------------------------------------------
def test_reward_rises_and_export_equals_actor(tmp_path, tokenizer):
    cfg = TrainConfig(model="tiny", task="toy-letters", steps=12, prompts=4, group=8, max_new_tokens=8,
                      temperature=0.05, lr=1e-3, warmup_steps=0, sd="off", compile="off", progress=False,
                      log_completions="5", eval_every=4, eval_prompts=6)
    d = distributed.Dist()
    run = tmp_path / "run"
    trainer = Trainer(cfg, d=d, run_dir=run, tokenizer=tokenizer, log=lambda m: None)
    run.mkdir()
    trainer.start()
    before = trainer.evaluate()  # the held-out set, greedy, before any update
    history = trainer.run()
    rewards = [m["reward_mean"] for m in history]
    # the untrained policy's first rollout against the last three (the rise may come within 2 steps)
    first, last = rewards[0], sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards

    # What the run wrote besides metrics.jsonl: the first 5 completions of every step with their
    # rewards (the same as the step's), the held-out evaluation every 4 steps, TensorBoard events.
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [s for s in range(1, 13) for _ in range(5)]
    assert [(r["prompt_index"], r["sample"]) for r in logged[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    for r in logged:
        assert r["reward"] == pytest.approx(r["rewards"]["correctness"] + 0.1 * r["rewards"]["format"], abs=2e-4)
        assert r["tokens"] <= 8 and r["prompt"][-1]["role"] == "user" and isinstance(r["completion"], str)
    assert [m["step"] for m in history if "eval_accuracy" in m] == [4, 8, 12]
    evals = [m for m in history if "eval_accuracy" in m]
    assert all(0 <= m["eval_accuracy"] <= 1 for m in evals)
    assert evals[-1]["eval_reward_mean"] > before["eval_reward_mean"] + 0.1, (before, evals)  # greedy letters too
    assert all("rewards/correctness" in m and "rewards/format" in m for m in history)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("reward_mean")] == pytest.approx(rewards)
    # completions cut at the 8-token limit: each has 8 tokens, so they bound the mean length from below
    for m in history:
        assert 0 <= m["truncated_frac"] <= 1 and 8 * m["truncated_frac"] <= m["response_len_mean"] + 1e-6, m
        assert m["truncated_frac"] == 1 or m["response_len_mean"] < 8  # all 8 long: all were cut
    assert all(m["grad_norm"] > 0 for m in history[:3])

    # The exported directory loads in transformers and gives the actor's logits.
    from conftest import hf_from_dir

    checkpoint.export_hf(trainer.actor, tmp_path / "hf", d, tokenizer=tokenizer)
    hf = hf_from_dir(tmp_path / "hf")
    ids = torch.tensor([[1, 50, 400, 7000, 12, 9, 33]])
    with torch.no_grad():
        ours = trainer.actor.logits(trainer.actor(ids))
        theirs = hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() < 1e-4


def test_resume_is_exact_including_after_sigkill(tmp_path):
    straight, split, killed = tmp_path / "straight", tmp_path / "split", tmp_path / "killed"
    train(*TOY, "--steps", "4", "--checkpoint-every", "2", "--out", str(straight))
    # 2 steps, then --resume for 2 more (a constant LR: the schedule does not depend on --steps)
    train(*TOY, "--steps", "2", "--checkpoint-every", "2", "--out", str(split))
    assert checkpoint.latest_checkpoint(split).name == "step_000002"
    train("--resume", str(split), "--steps", "4", "--no-progress")
    assert exact(metrics(split)) == exact(metrics(straight))

    # SIGKILL in the middle of step 3 (step 2's checkpoint complete), then resume.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TOY, "--steps", "4", "--checkpoint-every", "1",
                             "--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = checkpoint.latest_checkpoint(killed)
        if latest is not None and latest.name == "step_000002":
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_checkpoint(killed).name in ("step_000002", "step_000003")
    resumed_from = checkpoint.latest_checkpoint(killed).name
    out = train("--resume", str(killed), "--no-progress")
    assert f"resumed {killed} from {resumed_from}" in out.stderr
    assert exact(metrics(killed)) == exact(metrics(straight))
    assert (killed / "hf" / "model.safetensors").is_file()


@pytest.mark.skipif(not cpu_native_bf16(), reason="bf16 is emulated on this CPU (~20x slower than fp32); the "
                    "check runs where bf16 is native, and in the GPU check's GRPO stage")
def test_resume_is_exact_in_bf16(tmp_path):
    """bf16 rollouts and a bf16-autocast training forward resume as exactly as fp32 (TOY's `auto` is
    fp32 on a CPU without native bf16, so the test above may not cover it): a checkpoint holds the
    fp32 master weights and AdamW's fp32 moments, the bf16 rollout copy is cast again from the
    restored master (`Trainer.after_update`), and the autocast forward rounds the same inputs the
    same way, so nothing depends on whether the process was restarted."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*TOY, "--prompts", "2", "--group", "4", "--dtype", "bf16", "--train-dtype", "bf16", "--checkpoint-every", "1"]
    train(*args, "--steps", "2", "--out", str(straight))
    train(*args, "--steps", "1", "--out", str(split))
    train("--resume", str(split), "--steps", "2", "--no-progress")
    assert exact(metrics(split)) == exact(metrics(straight))
    assert max_abs_diff(split / "hf" / "model.safetensors", straight / "hf" / "model.safetensors") == 0


def one_and_two_ranks(tmp_path, args: list[str]) -> tuple[Path, Path]:
    """The same run in one process and under torchrun with two ranks; fp32 throughout (bf16
    autocast, the default where bf16 is native, rounds differently for the two runs' microbatch
    shapes: entropy off by ~1%)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(*args, "--dtype", "fp32", "--train-dtype", "fp32", "--out", str(one))
    train(*args, "--dtype", "fp32", "--train-dtype", "fp32", "--out", str(two), torchrun=2)
    return one, two


def max_abs_diff(file_a: Path, file_b: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_ranks_equal_one_process(tmp_path):
    """Also with the behaviour correction on and the per-sequence loss (whose denominators count the
    sequences of every rank)."""
    one, two = one_and_two_ranks(tmp_path, [*TOY, "--steps", "3", "--checkpoint-every", "3",
                                            "--is-correction", "token_truncate", "--loss-type", "grpo"])
    a, b = metrics(one), metrics(two)
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "accuracy", "response_len_mean", "trained_tokens"):  # (decode steps are per rank)
            assert ra[k] == rb[k], (k, ra, rb)
        assert ra["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # fp32 rollouts: the weights are ~1
        for k in ("loss", "entropy", "grad_norm", "clip_frac", "is_weight_mean", "mismatch_logratio_mean"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra, rb)
    worst = max_abs_diff(one / "hf" / "model.safetensors", two / "hf" / "model.safetensors")
    assert worst < 1e-5, worst


def test_fsdp_in_one_torchrun_process_equals_the_unsharded_run(tmp_path):
    """`--fsdp on` shards the actor in a one-rank process group (how the GPU check exercises
    FSDP2 on one GPU): the same run as without sharding, a resume included."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    args = [*TOY, "--dtype", "fp32", "--train-dtype", "fp32"]
    train(*args, "--steps", "3", "--checkpoint-every", "2", "--out", str(plain))
    train(*args, "--steps", "2", "--checkpoint-every", "2", "--fsdp", "on", "--out", str(sharded), torchrun=1)
    train("--resume", str(sharded), "--steps", "3", "--no-progress", torchrun=1)
    assert json.loads((sharded / "config.json").read_text())["fsdp"] == "on"
    for ra, rb in zip(metrics(plain), metrics(sharded), strict=True):
        for k in ("reward_mean", "accuracy", "response_len_mean", "trained_tokens"):
            assert ra[k] == rb[k], (k, ra, rb)
        for k in ("loss", "entropy", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra, rb)
    out = train(*TOY, "--fsdp", "on", "--out", str(tmp_path / "no"), check=False)  # no process group
    assert out.returncode == 2 and "--fsdp on needs a process group" in out.stderr
    assert not (tmp_path / "no").exists()


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "oops"\n')
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    long = tmp_path / "long.jsonl"  # its second problem is longer than tiny's 2048-token context
    long.write_text('{"question": "1+1?", "answer": "#### 2"}\n' + '{"question": "' + "one " * 3000
                    + '?", "answer": "#### 1"}\n')
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    cases = {
        "unknown task": (["--task", "no_such_task"], "cannot create reasoning-gym task"),
        "unreadable data": (["--data", str(tmp_path / "missing.jsonl")], "data not found"),
        "malformed line": (["--data", str(malformed)], "malformed.jsonl:2:"),
        "prompt too long": (["--data", str(long)], "long.jsonl:2: prompt of"),
        "G < 2": (["--group", "1"], "--group must be >= 2"),
        "bad task config": (["--task-config", "{not json"], "--task-config/--task_config: not valid JSON"),
        "existing out": (["--out", str(existing)], "refusing to overwrite"),
        "not a run": (["--resume", str(not_a_run)], "not a training run directory"),
        "minibatches": (["--prompts", "3", "--minibatches", "2"], "not divisible by --minibatches"),
    }
    import train as train_py  # in this process: each case ends before anything starts (test_bad_flags_are_one_line)

    for name, (args, message) in cases.items():
        run_dir = tmp_path / f"run-{name.replace(' ', '_')}"
        extra = [] if "--out" in args or "--resume" in args else ["--out", str(run_dir)]
        try:
            code = train_py.main(["--model", "tiny", "--sd", "off", "--no-progress", *args, *extra])
        except SystemExit as e:  # argparse
            code = e.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (name, lines[-20:])
        assert len(lines) == 1 and message in lines[0], (name, lines)
        assert not run_dir.exists(), name
    assert (existing / "keep.txt").read_text() == "precious" and sorted(os.listdir(existing)) == ["keep.txt"]
    assert os.listdir(not_a_run) == []
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        TrainConfig(prompts=3).validate(2)


def test_several_updates_per_rollout_with_kl(tmp_path, tokenizer):
    """epochs x minibatches > 1 recomputes old log-probs before the first update (so later updates
    have ratio != 1 and can clip), and the KL to the reference is > 0 once the actor moves."""
    cfg = TrainConfig(model="tiny", task="toy-letters", steps=2, prompts=4, group=8, max_new_tokens=8,
                      temperature=0.05, lr=1e-3, warmup_steps=0, epochs=2, minibatches=2, kl_coef=0.1,
                      micro_tokens=64, sd="off", compile="off", progress=False)
    trainer = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path, tokenizer=tokenizer, log=lambda m: None)
    assert trainer.reference is not None
    trainer.start()
    history = trainer.run()
    assert all(m["kl"] >= 0 for m in history) and history[-1]["kl"] > 0  # k3 >= 0; > 0 once the actor moved
    assert any(m["clip_frac"] > 0 for m in history)  # later minibatches ran off-policy
    assert trainer.scheduler.last_epoch == 2 * 2 * 2  # steps x epochs x minibatches optimizer steps
    assert all(math.isfinite(m["loss"]) for m in history)


# The toy run with speculative rollouts and the drafter distilled online from an untrained head.
# (no time budget: a budget's decisions follow the clock, and these compare runs step for step)
KD_TOY = [a for a in TOY if a not in ("--sd", "off")] + ["--sd", "on", "--k", "2", "--drafter", "random",
                                                          "--drafter-update", "rkd", "--drafter-budget", "1"]
KD_EXACT = EXACT + ["accept_len", "alpha_measured", "drafter_version", "kd_step", "kd_loss", "alpha_est"]


def test_online_kd_async_resume_is_exact(tmp_path):
    """A background drafter update in flight at a checkpoint: the resumed run drafts with the same
    (not yet swapped) weights and swaps the same update in after its next rollout."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*KD_TOY, "--drafter-async", "on", "--checkpoint-every", "2"]
    train(*args, "--steps", "4", "--out", str(straight))
    train(*args, "--steps", "2", "--out", str(split))
    train("--resume", str(split), "--steps", "4", "--no-progress")
    rows = metrics(straight)
    assert [{k: r.get(k) for k in KD_EXACT} for r in metrics(split)] == [{k: r.get(k) for k in KD_EXACT} for r in rows]
    assert [r["drafter_version"] for r in rows] == [0, 0, 1, 2]  # async: a rollout drafts one update behind
    assert [r.get("kd_step") for r in rows] == [None, 0, 1, 2]  # an update's stats arrive with the next rollout
    assert all(r["alpha_measured"] for r in rows)  # every rollout speculated and measured its acceptance
    assert (straight / "drafter" / "model.safetensors").is_file()


def test_online_kd_two_ranks_equal_one_process(tmp_path):
    """The replicated head with all-reduced gradients (in the background thread, the default) takes
    the same updates as one process."""
    # a drafter minibatch of 2 prompts x 8 samples: one prompt per rank (round-robin), as in one process
    one, two = one_and_two_ranks(tmp_path, [*KD_TOY, "--steps", "3", "--drafter-batch", "16"])
    a, b = metrics(one), metrics(two)
    assert [r.get("kd_updates") for r in a] == [r.get("kd_updates") for r in b] == [None, 1, 2]  # one step behind
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["kd_loss"] == pytest.approx(ra["kd_loss"], rel=1e-3)
        assert rb["alpha_est"] == pytest.approx(ra["alpha_est"], abs=1e-4)
    worst = max_abs_diff(one / "drafter" / "model.safetensors", two / "drafter" / "model.safetensors")
    assert worst < 1e-5, worst


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--lr", "-1"], "--lr and --grad-clip must be positive"),
    (["--kl-coef", "-0.1"], "--kl-coef >= 0"),
    (["--k", "0"], "must be positive, got 0"),
    (["--steps", "ten"], "invalid int value"),
    (["--prompts", "-4"], "must be positive"),
    (["--sd", "sometimes"], "invalid choice"),
    (["--compile", "maybe"], "invalid choice"),
    (["--dtype", "fp16"], "fp16 on CPU"),
    (["--drafter-update", "bogus"], "invalid choice"),
    (["--drafter-async", "maybe"], "expected on or off"),
    (["--drafter-lr", "0"], "--drafter-lr must be positive"),
    (["--draft-temperature", "0"], "--draft-temperature must be > 0"),
    (["--drafter-batch", "0"], "must be positive"),
    (["--sd", "on", "--drafter", "no/such/drafter"], "drafter not found"),
    (["--model", "no/such/model"], "model path not found"),
    (["--model", "model.gguf"], "GGUF file not found"),
    (["--data", "EMPTY"], "has no rows"),
    (["--compile", "off", "--compile-mode", "regional-dynamic"], "--compile-mode does not apply: --compile off"),
    (["--compile-mode", "tensorrt", "--compile", "on"], "CUDA GPUs only"),
    (["--attention", "flex"], "--attention flex reads the KV pool in place through flex_attention compiled for CUDA"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, args, needle):
    """Every flag with a wrong value: one line on stderr, exit code 2, no run directory."""
    import train as train_py

    (tmp_path / "empty.jsonl").write_text("\n")
    args = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in args]
    out = tmp_path / "run"
    try:
        code = train_py.main(["--model", "tiny", "--sd", "off", *args, "--out", str(out), "--no-progress"])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], (code, err)
    assert not out.exists()


def test_model_directory_with_a_missing_shard(tmp_path, tokenizer):
    """A checkpoint whose index names a shard that is not there: one line, nothing created."""
    from models.loading import random_model, save_hf_checkpoint
    from models.decoder import PRESETS

    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(random_model(PRESETS["tiny"]), ckpt, tokenizer)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    out = train("--model", str(ckpt), "--sd", "off", "--out", str(tmp_path / "run"), check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "missing shard model-00002-of-00002" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_history_and_hybrid_drafters_in_grpo(tmp_path):
    """`--drafter history` (model-free, nothing to distil), `--drafter random+history` (per row
    beside a head distilled online) and `--drafter first:2` (the actor's own first layers) run GRPO
    with speculative rollouts; toy-letters repeats itself, so the history drafts get accepted."""
    for spec in ("history", "random+history", "first:2"):
        run = tmp_path / spec.replace(":", "-")
        train(*[a for a in TOY if a not in ("--sd", "off")], "--sd", "on", "--k", "2", "--drafter", spec,
              "--steps", "2", "--out", str(run))
        rows = metrics(run)
        assert len(rows) == 2 and all(r["sd_fraction"] > 0 for r in rows)
        assert spec == "first:2" or any(r["accept_len"] > 1 for r in rows)  # (the actor's first layers: no claim)
        assert ("drafter_version" in rows[-1]) and (run / "drafter").is_dir() == (spec == "random+history")


def test_history_drafter_resume_is_exact(tmp_path):
    """The history drafter keeps earlier rollouts of each prompt as draft sources; a resumed run
    drafts from the checkpointed ones. Under the match rule the tokens never depend on the drafter,
    but what it proposes does: 2 steps + a resume to 3 give the straight run's tokens *and* its SD
    statistics (a resume that lost the history would accept fewer drafts in step 3). A fixed set of
    4 prompts (one epoch per step), so every step revisits the prompts the history holds."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*[a for a in TOY if a not in ("--sd", "off")], "--sd", "on", "--drafter", "history", "--k", "3",
            "--train-size", "4", "--max-new-tokens", "16", "--checkpoint-every", "2", "--log-completions", "all"]
    train(*args, "--steps", "3", "--out", str(straight))
    train(*args, "--steps", "2", "--out", str(split))
    train("--resume", str(split), "--steps", "3", "--no-progress")
    drafted = EXACT + ["sd_fraction", "accept_len", "alpha_measured"]
    rows = metrics(straight)
    assert [{k: r[k] for k in drafted} for r in metrics(split)] == [{k: r[k] for k in drafted} for r in rows]
    assert rows[2]["accept_len"] > 1  # the history's drafts are accepted (what a lost history would change)
    completions = lambda run: [(r["step"], r["prompt_index"], r["sample"], r["completion"])  # noqa: E731
                               for r in map(json.loads, (run / "completions.jsonl").read_text().splitlines())]
    assert completions(split) == completions(straight)


def test_adaptive_solver_reports_its_error_and_resumes_exactly(tmp_path, monkeypatch):
    """`--sd adaptive`: each step that speculated reports `accept_est_error` (what the solver expected
    of its verifies minus what they emitted, tokens per verify), and a resumed run's solver chooses
    as the straight one's (its calibration and margin travel in the checkpoint): the same decoding
    steps, SD share and acceptance. The cost model is this test's own (a machine where a verify costs
    little more than a plain step, fitted exactly), so that whether SD pays does not depend on the
    machine the test runs on."""
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*[a for a in TOY if a not in ("--sd", "off")], "--sd", "adaptive", "--drafter", "history", "--k", "3",
            "--train-size", "4", "--max-new-tokens", "16", "--checkpoint-every", "2"]
    train(*args, "--steps", "1", "--out", str(tmp_path / "profiled"))  # measures and caches the cost profile
    (profile,) = (tmp_path / "cache" / "costs").glob("*.json")
    data = json.loads(profile.read_text())
    profile.write_text(json.dumps({**data, "coef": [0.01, 0.0005, 0.0001, 0.0, 0.0002, 0.0], "rel_error": 0.0}))
    train(*args, "--steps", "4", "--out", str(straight))
    train(*args, "--steps", "2", "--out", str(split))
    train("--resume", str(split), "--steps", "4", "--no-progress")
    rows = metrics(straight)
    spec = [r for r in rows if r["sd_fraction"] > 0]
    assert spec and all(abs(r["accept_est_error"]) < 16 for r in spec), rows  # (a finite figure on each)
    assert all(("accept_est_error" in r) == (r["sd_fraction"] > 0) for r in rows)
    chosen = EXACT + ["sd_fraction", "accept_len", "alpha_measured", "accept_est_error"]
    assert [{k: r.get(k) for k in chosen} for r in metrics(split)] == [{k: r.get(k) for k in chosen} for r in rows]


def test_peak_flops_from_the_datasheet_table_or_a_timed_gemm():
    """The MFU's denominator: a known GPU's dense datasheet figure, found by the name torch reports
    (the most specific pattern wins), in the training dtype; fp32 on TF32 tensor cores unless the
    matmul precision is "highest". An unknown GPU is timed; a CPU is timed in the training dtype."""
    from respec import metrics

    bf16 = {name: metrics.datasheet_peak(name, torch.bfloat16)
            for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                         "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA GH200 480GB", "NVIDIA L40S",
                         "NVIDIA L4", "NVIDIA GeForce RTX 4090")}
    assert {name: round(found[0] / 1e12, 2) for name, found in bf16.items()} == {
        "NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
        "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA GH200 480GB": 989.4,
        "NVIDIA L40S": 362.05, "NVIDIA L4": 121.0, "NVIDIA GeForce RTX 4090": 165.2}
    assert bf16["NVIDIA H200"][1] == "NVIDIA H200, dense bf16, vendor datasheet"
    assert metrics.datasheet_peak("NVIDIA A100-SXM4-80GB", torch.float32) == (156e12, "NVIDIA A100-SXM4-80GB, dense "
                                                                                        "tf32, vendor datasheet")
    assert metrics.datasheet_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False)[0] == 19.5e12
    assert metrics.datasheet_peak("NVIDIA A10G", torch.bfloat16) is None  # no public datasheet: timed
    assert metrics.datasheet_peak("Tesla T4", torch.bfloat16) is None
    flops, source = metrics.peak_flops(torch.float32, torch.device("cpu"))
    assert source == "timed 1024^3 CPU GEMM" and 1e8 < flops < 1e14


def test_default_sizes_fit_any_number_of_ranks():
    """The default prompt count divides among 1..8 ranks; micro-batch and KV pool sizes of 0 mean
    'sized for the device'."""
    from respec.config import default_prompts

    for world in range(1, 9):
        n = default_prompts(world)
        assert n >= 4 and n % world == 0 and n < 4 + world
        TrainConfig(prompts=n).validate(world)
    TrainConfig(micro_tokens=0, kv_cache_mb=0).validate(1)
    with pytest.raises(ValueError, match="--kv-cache-mb must be >= 0"):
        TrainConfig(kv_cache_mb=-1).validate(1)


def test_drafter_pretraining_refuses_several_ranks(tmp_path):
    """`--stage drafter` is one process: under torchrun every rank would pretrain into one --out."""
    import train as train_py

    _, given = train_py.parse_args(["--stage", "drafter", "--model", "tiny", "--out", str(tmp_path / "head")])
    with pytest.raises(ValueError, match="runs in one process, not 2 ranks"):
        train_py.run_drafter(train_py.DrafterConfig(**given), distributed.Dist(rank=0, world=2))
    assert not (tmp_path / "head").exists()


def test_options_from_a_config_file_flags_and_trl_names(tmp_path, capsys):
    """`--config FILE` (YAML or JSON) with TRL's option names; flags override the file; an option of
    the other stage, or an unknown one, is one line."""
    import train as train_py

    conf = tmp_path / "run.yaml"
    conf.write_text("model: tiny\nnum_generations: 8\nlearning_rate: 1e-4\nmax_completion_length: 32\n"
                    "reward_funcs: [correctness]\nprogress: false\ntask_config: {min_terms: 2}\ndrafter_async: off\n")
    _, given = train_py.parse_args(["--config", str(conf), "--max_new_tokens", "16", "--beta", "0.01"])
    cfg = train_py.new_config(given)
    assert (cfg.model, cfg.group, cfg.lr, cfg.max_new_tokens, cfg.kl_coef) == ("tiny", 8, 1e-4, 16, 0.01)
    assert cfg.rewards == ["correctness"] and cfg.progress is False and cfg.task_config == {"min_terms": 2}
    assert cfg.drafter_async is False and cfg.steps == TrainConfig.steps  # not given: the default
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 7, "save_steps": 3}))
    _, given = train_py.parse_args(["--config", str(tmp_path / "run.json"), "--save_steps", "5"])
    assert given == {"steps": 7, "checkpoint_every": 5}

    (tmp_path / "unknown.yaml").write_text("per_device_batch: 3\n")
    for argv, needle in [
        (["--stage", "drafter", "--kl-coef", "0.1"], "--kl-coef does not apply to --stage drafter"),
        (["--draft-vocab", "100"], "--draft-vocab does not apply to --stage grpo"),
        (["--config", str(tmp_path / "unknown.yaml")], "unknown option 'per_device_batch'"),
        (["--config", str(tmp_path / "missing.yaml")], "--config"),
        (["--stage", "drafter", "--resume", str(tmp_path)], "--resume continues a GRPO run"),
        (["--per_device_train_batch_size", "8"], "no such option here; respec counts prompts"),
    ]:
        with pytest.raises(SystemExit) as e:
            train_py.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_resume_takes_only_the_options_a_run_can_change(tmp_path):
    import dataclasses

    import train as train_py

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(model="tiny", lr=1e-3, out=str(run))
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    cfg = train_py.resumed_config(run, {"steps": 40, "lr": 1e-3, "progress": False, "out": str(run)})
    assert (cfg.steps, cfg.lr, cfg.progress) == (40, 1e-3, False)  # the same lr given again is fine
    with pytest.raises(ValueError, match=r"--lr cannot change in a resumed run \(0.001 there, 0.01 given\)"):
        train_py.resumed_config(run, {"lr": 1e-2})
    with pytest.raises(ValueError, match="--group cannot change"):
        train_py.resumed_config(run, {"group": 16})


def test_answers_that_are_no_numbers_need_a_reward_that_scores_them(tmp_path, tokenizer):
    """The built-in correctness compares numbers: data whose answers are not is refused before
    anything is written, and accepted once the user's own reward function does the scoring."""
    data = tmp_path / "frac.jsonl"
    data.write_text(json.dumps({"prompt": "5/6 as a fraction?", "answer": "\\frac{5}{6}"}) + "\n")
    (tmp_path / "judge.py").write_text("def judge(completions, answer, **kw):\n"
                                       "    return [float(a in c) for c, a in zip(completions, answer)]\n")
    cfg = dict(model="tiny", data=str(data), sd="off", compile="off", progress=False)
    with pytest.raises(ValueError, match=r"frac.jsonl:1: answer '\\\\frac\{5\}\{6\}' is not a number"):
        Trainer(TrainConfig(**cfg), d=distributed.Dist(), run_dir=tmp_path / "run", tokenizer=tokenizer)
    trainer = Trainer(TrainConfig(**cfg, rewards=[f"{tmp_path / 'judge.py'}:judge"]), d=distributed.Dist(),
                      run_dir=tmp_path / "run", tokenizer=tokenizer)
    problem = trainer.task.problems(0, 1)[0]
    assert [s.reward for s in trainer.rewards.score([problem] * 2, ["it is \\frac{5}{6}", "5/6"], [[], []])] == [1, 0]
    assert not (tmp_path / "run").exists()


def test_replay_with_per_prompt_seeds_in_grpo(tmp_path):
    """A fixed set of 4 prompts (one epoch per step) with per-prompt seeds: from the second epoch on
    every row drafts from last epoch's completion and most of the rollout comes from replays. The
    rollout is the one SD off gives (every step's metrics equal), a resumed run drafts from the
    checkpointed replays as the uninterrupted one does, and two ranks equal one process."""
    args = [*[a for a in TOY if a not in ("--sd", "off")], "--k", "2", "--dtype", "fp32", "--train-dtype", "fp32",
            "--train-size", "4", "--rollout-seeds", "per-prompt", "--checkpoint-every", "2",
            "--lr", "1e-5"]  # (a policy that moves little, as a real run's does per epoch)
    on, off, split = tmp_path / "on", tmp_path / "off", tmp_path / "split"
    train(*args, "--sd", "on", "--drafter", "replay+history", "--steps", "4", "--out", str(on))
    rows = metrics(on)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["replay_rows"] == 0 and all(r["replay_rows"] == 32 for r in rows[1:])
    assert rows[0]["replay_token_frac"] == 0 and all(r["replay_token_frac"] > 0.3 for r in rows[1:])
    assert all(r["sd_rows_replay"] > 0 and r["replay_tokens_per_verify"] > 2 for r in rows[1:])
    train(*args, "--sd", "off", "--steps", "4", "--out", str(off))
    same = [k for k in EXACT if k != "decode_steps"]
    assert [{k: r[k] for k in same} for r in metrics(off)] == [{k: r[k] for k in same} for r in rows]

    train(*args, "--sd", "on", "--drafter", "replay+history", "--steps", "2", "--out", str(split))
    train("--resume", str(split), "--steps", "4", "--no-progress")
    replayed = ["replay_rows", "replay_token_frac", "sd_rows_replay"]
    assert [{k: r[k] for k in replayed} for r in metrics(split)] == [{k: r[k] for k in replayed} for r in rows]

    two = tmp_path / "two"
    train(*args, "--sd", "on", "--drafter", "replay+history", "--steps", "3", "--out", str(two), torchrun=2)
    tokens = ["reward_mean", "accuracy", "response_len_mean", "trained_tokens"] + replayed  # (the loss: to rounding)
    assert [{k: r[k] for k in tokens} for r in metrics(two)] == [{k: r[k] for k in tokens} for r in rows[:3]]


def test_masked_truncated_completions_leave_the_loss(tmp_path):
    """TRL's mask_truncated_completions: with every completion cut at --max-new-tokens (the tiny
    random model never says EOS in 8 tokens) nothing is left to train on; without it, all is."""
    masked, kept = tmp_path / "masked", tmp_path / "kept"
    train(*TOY, "--steps", "1", "--mask-truncated-completions", "--out", str(masked))
    train(*TOY, "--steps", "1", "--out", str(kept))
    (m,), (k,) = metrics(masked), metrics(kept)
    assert m["truncated_frac"] == k["truncated_frac"] == 1.0
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
    assert k["grad_norm"] > 0


def test_checkpointing_is_on_by_default_on_a_cpu_and_changes_no_update(tmp_path, tokenizer):
    """`--gradient-checkpointing`: alone on, `off` off, not given auto (on a CPU, off on a GPU); the
    recomputed backward, under bf16 autocast without the weight-cast cache, moves the actor exactly
    as the plain one does (two runs of two steps, bf16 training forward, weights compared)."""
    import train as train_py
    from respec.update import checkpointing

    given = lambda *a: train_py.parse_args(list(a))[1].get("gradient_checkpointing", "absent")  # noqa: E731
    assert (given("--gradient-checkpointing"), given("--gradient-checkpointing", "off"), given()) == (True, False, "absent")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for value, on_cpu, on_gpu in ((None, True, False), (True, True, True), (False, False, False)):
        cfg = TrainConfig(gradient_checkpointing=value).update()
        assert (checkpointing(cfg, cpu), checkpointing(cfg, gpu)) == (on_cpu, on_gpu)
    weights = []
    for ckpt in (False, True):
        cfg = TrainConfig(model="tiny", task="toy-letters", steps=2, prompts=2, group=4, max_new_tokens=8, lr=1e-3,
                          warmup_steps=0, micro_tokens=64, sd="off", compile="off", progress=False,
                          train_dtype="bf16", gradient_checkpointing=ckpt, report_to=["none"])
        (tmp_path / str(ckpt)).mkdir()
        trainer = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path / str(ckpt), tokenizer=tokenizer,
                          log=lambda m: None)
        trainer.start()
        trainer.run()
        weights.append({n: p.detach().clone() for n, p in trainer.actor.named_parameters()})
    for n, w in weights[0].items():
        torch.testing.assert_close(weights[1][n], w, rtol=0, atol=1e-6)
    initial = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path / "x", tokenizer=tokenizer, log=lambda m: None).actor
    moved = sum(int(not torch.equal(p, weights[0][n])) for n, p in initial.named_parameters())
    assert moved > 0  # the updates moved weights: equality says something


def test_a_missing_default_head_is_pretrained_only_where_it_can_pay(tmp_path, monkeypatch, capsys):
    """`--drafter auto+history` with no cached default head starts from an untrained head of its
    shape and asks the fitted cost model (`pretraining_payback`) before pretraining one: `off` never
    pretrains; `auto` on a compute-bound machine (this test's own profile: a verify costs its width)
    does not; where the bound says it could pay, the pretraining's pilot weighs it against the bound's
    savings (a stand-in's figure: above them, the untrained head stays); where it pays, the head pretrained then (a stand-in: an untrained head of another seed
    and draft vocabulary, with a held-out report) is what the engine drafts with, the solver's
    estimate is its report's and its first distillation is budgeted (as the kept untrained head's
    is where the pretraining does not pay). config.json says what ran."""
    import train as train_py
    from models.eagle import load_eagle, save_eagle
    from models.loading import load_model
    from respec import drafter_choice, host_memory
    from respec import trainer as trainer_mod
    from respec.drafter_choice import Payback
    from respec.drafter_training import untrained_head

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    pretrained = []

    pilot = {"s": 0.0}  # what the stand-in's pilot measures the pretraining at
    budgets = []

    def apart(fn, model, path, tokenizer, task, **kw):  # the pretraining, without its minutes
        assert fn is drafter_choice.pretrain_default_head
        budgets.append(kw["budget_s"])
        if pilot["s"] >= kw["budget_s"]:  # (pretrain_default_head: its pilot's figure against the budget)
            return False
        pretrained.append(path)
        head = untrained_head(load_model("tiny", dtype=torch.float32), [[5, 6, 7, 8]], seed=11)
        head.d2t.copy_(head.d2t.roll(1))  # a draft vocabulary of its own
        save_eagle(head, path)
        (path / "train_report.json").write_text(json.dumps(
            {"held_out_sampled": {"3": {"accept_per_pos": [0.8, 0.6, 0.45]}}}))
        return True

    monkeypatch.setattr(host_memory, "run_apart", apart)
    adopted = {}
    adopt = trainer_mod.Trainer.adopt_head

    def watched(self, directory):
        before = self.engine.drafter.module.d2t.clone()
        adopt(self, directory)
        clone = lambda m: {k: t.clone() for k, t in m.state_dict().items()}  # noqa: E731
        adopted.update(before=before, master=clone(self.master), live=clone(self.engine.drafter.module),
                       directory=directory,
                       alpha=list(self.policy.alpha), budgeted=self.learner.budgeted)

    monkeypatch.setattr(trainer_mod.Trainer, "adopt_head", watched)
    kept = []
    keep = trainer_mod.Trainer.keep_untrained_head

    def watched_keep(self):
        keep(self)
        kept.append(self.learner.budgeted)

    monkeypatch.setattr(trainer_mod.Trainer, "keep_untrained_head", watched_keep)
    args = [*[a for a in TOY if a not in ("--sd", "off")], "--sd", "adaptive", "--k", "3", "--steps", "1",
            "--log-completions", "all"]

    def run(name: str, *extra: str) -> tuple[dict, str]:
        capsys.readouterr()
        assert train_py.main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "config.json").read_text()), capsys.readouterr().err

    config, _ = run("off", "--pretrain-drafter", "off")  # (and caches the cost profile)
    assert not pretrained and config["drafter"] == "random+history" and not kept  # (a cold start's distillation)
    (profile,) = (tmp_path / "cache" / "costs").glob("*.json")
    data = json.loads(profile.read_text())
    profile.write_text(json.dumps({**data, "coef": [0.001, 0.0, 0.01, 0.0, 0.0002, 0.0], "rel_error": 0.0}))
    config, err = run("compute-bound")
    assert not pretrained and config["drafter"] == "random+history" and "starting from an untrained head" in err
    assert not adopted and kept == [True]  # its distillation waits for its budget

    monkeypatch.setattr(trainer_mod, "pretraining_payback", lambda costs, **kw: Payback(1.0, 2.0))
    pilot["s"] = 3.0  # the bound says it could pay, the pilot measures more than it could save
    config, err = run("pilot-declines")
    assert budgets == [2.0] and not pretrained and config["drafter"] == "random+history"
    assert "its pilot decides" in err and "starting from an untrained head" in err
    assert not adopted and kept == [True, True]
    pilot["s"] = 1.5
    config, err = run("pays")
    assert len(pretrained) == 1 and config["drafter"] == "auto+history" and "its pilot decides" in err and len(kept) == 2
    head = load_eagle(pretrained[0])
    live = adopted["live"]
    assert adopted["directory"] == pretrained[0] and torch.equal(live["d2t"], head.d2t)
    for name, t in head.state_dict().items():  # the master copy: exactly; the engine's: in its dtype
        assert torch.equal(adopted["master"][name], t), name
        assert torch.equal(live[name], t.to(live[name].dtype)), name
    assert adopted["alpha"] == pytest.approx([0.8, 0.75, 0.75]) and adopted["budgeted"]
    assert not torch.equal(adopted["before"], head.d2t)  # (the run's untrained head had a vocabulary of its own)
    # the rollout's weights, dropped while the head was made, came back: the same tokens as without it
    completions = lambda name: [json.loads(line)["completion"]  # noqa: E731
                                for line in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
    assert completions("pays") == completions("compute-bound") and len(completions("pays")) == 32
