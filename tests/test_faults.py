"""Faults a run meets on real files (respec/storage.py, respec/checkpoint.py): a checkpoint cut short
is named in one line and a resume starts from the newest complete one, or refuses and changes
nothing; a disk that fills during a run stops it with one line naming the path and the free space,
what was saved before staying readable (on a small tmpfs, where this machine lets a test mount one);
a reward that is not finite is refused with the function named; a killed writer's temporary files
are removed by the next write of the same thing, a live writer's never."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from respec import checkpoint, distributed, storage
from test_trainer import ROOT, TOY, exact, metrics, train


def snapshot(path: Path) -> dict[str, int]:
    """Every file under `path` and its size (hidden ones too)."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def cut_in_half(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    """A finished 3-step toy run with a checkpoint after every step (the last two kept)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    train(*TOY, "--steps", "3", "--checkpoint-every", "1", "--out", str(run))
    return run


# ----------------------------------------------------------------------------------------------
# A checkpoint cut short
def test_a_cut_checkpoint_is_named_and_the_resume_starts_from_the_one_before(three_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    first_run = metrics(run)
    cut_in_half(run / "checkpoints" / "step_000003" / "__0_0.distcp")  # the largest file, as a crash mid-save leaves it
    out = train("--resume", str(run), "--steps", "4", "--no-progress")
    err = out.stderr.splitlines()
    assert any("checkpoint step_000003 is damaged (__0_0.distcp has" in line and "set aside as step_000003.damaged"
               in line for line in err), err[:5]
    assert any("resuming from step_000002, the newest complete checkpoint" in line for line in err), err[:5]
    root = checkpoint.checkpoint_root(run)
    assert (root / "step_000003.damaged" / "__0_0.distcp").is_file()  # kept, not deleted
    assert checkpoint.latest_checkpoint(run).name == "step_000004"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert exact(rows[:3]) == exact(first_run)  # step 3 again, from step 2's checkpoint: the same step (exact resume)


def test_a_run_whose_only_checkpoint_is_cut_is_refused_and_left_as_it_was(three_checkpoints, tmp_path, capsys):
    import train as train_py

    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    for name in ("step_000002", "step_000003"):  # every checkpoint damaged: nothing to fall back to
        cut_in_half(run / "checkpoints" / name / "extras.pt")
    before = snapshot(run)
    assert train_py.main(["--resume", str(run), "--steps", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint step_000003 is damaged (extras.pt has" in err[0] \
        and "no earlier checkpoint is complete; nothing was changed" in err[0], err
    assert snapshot(run) == before


def test_damage_is_found_with_and_without_a_manifest(three_checkpoints, tmp_path):
    """`damage` checks the sizes a manifest lists; a checkpoint written before manifests, by the
    structure of its files (DCP's index of its data file, the archives' directories)."""
    path = tmp_path / "step"
    shutil.copytree(three_checkpoints / "checkpoints" / "step_000003", path)
    assert checkpoint.damage(path) is None
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.damage(path) is None  # whole, without a manifest
    for name, needle in (("__0_0.distcp", "__0_0.distcp has"), ("rng_rank0.pt", "rng_rank0.pt is cut short"),
                         (".metadata", ".metadata is unreadable")):
        shutil.rmtree(path)
        shutil.copytree(three_checkpoints / "checkpoints" / "step_000003", path)
        (path / checkpoint.MANIFEST).unlink()
        cut_in_half(path / name)
        assert needle in (checkpoint.damage(path) or ""), name
    (path / ".metadata").unlink()
    assert ".metadata is unreadable" in checkpoint.damage(path)


def test_a_whole_checkpoint_that_cannot_be_read_is_one_line(three_checkpoints, tmp_path, tokenizer, monkeypatch):
    from respec.config import TrainConfig
    from respec.trainer import Trainer

    cfg = TrainConfig(model="tiny", task="toy-letters", prompts=4, group=8, max_new_tokens=8, sd="off",
                      compile="off", progress=False)
    trainer = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path, tokenizer=tokenizer, log=lambda m: None)

    def unreadable(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    monkeypatch.setattr(checkpoint.dcp, "load", unreadable)
    with pytest.raises(checkpoint.CheckpointReadError, match=r"step_000003 cannot be read \(PytorchStreamReader"):
        trainer.start(three_checkpoints / "checkpoints" / "step_000003")


# ----------------------------------------------------------------------------------------------
# A disk that fills during a run
@contextlib.contextmanager
def small_filesystem(size: str):
    """A tmpfs of `size` (e.g. 4m) mounted for the block; the test is skipped where none can be."""
    where = Path(tempfile.mkdtemp(prefix="respec-tmpfs-"))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                              text=True)
    except OSError as e:
        done = subprocess.CompletedProcess([], 1, "", str(e))
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a {size} tmpfs here ({(done.stderr.strip().splitlines() or ['not permitted'])[-1]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


# (the toy run's checkpoint is ~51 MB: actor and AdamW state; its Hugging Face export ~16 MB)
@pytest.mark.parametrize("size, steps, needle, kept", [
    ("4m", 3, "cannot write checkpoint step_000001 in {run}/checkpoints (No space left on device; ", None),
    ("80m", 3, "cannot write checkpoint step_000002 in {run}/checkpoints (No space left on device; ", "step_000001"),
    ("60m", 1, "cannot write {run}/.hf.tmp (No space left on device; ", "step_000001"),
])
def test_a_disk_that_fills_during_a_run_stops_it_with_one_line(size, steps, needle, kept):
    with small_filesystem(size) as disk:
        run = disk / "run"
        out = train(*TOY, "--steps", str(steps), "--checkpoint-every", "1", "--keep-checkpoints", "1", "--out", str(run),
                    check=False)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 1, out.stderr[-2000:]
        assert last.startswith("train.py: error: " + needle.format(run=run)) and "free on its filesystem" in last, last
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert json.loads((run / "config.json").read_text())["steps"] == steps
        assert [r["step"] for r in metrics(run)] == list(range(1, len(metrics(run)) + 1))  # whole lines only
        assert all(json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines())
        root = checkpoint.checkpoint_root(run)
        assert sorted(p.name for p in root.iterdir()) == (["latest", kept] if kept else [])  # no partial files
        if kept:
            assert checkpoint.latest_checkpoint(run).name == kept and checkpoint.damage(root / kept) is None


def test_a_failed_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    storage.append_lines(log, ['{"step": 1}'])
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, text):
            self.f.write(text[:5])  # part of it lands, then the disk is full
            self.f.flush()
            raise OSError(28, os.strerror(28))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: FullFile(real_open(*a, **k)))
    with pytest.raises(storage.WriteError, match=r"cannot write .*metrics.jsonl \(No space left on device; .* free"):
        storage.append_lines(log, ['{"step": 2}'])
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


def test_an_error_that_is_no_failed_write_passes_through(tmp_path):
    with pytest.raises(RuntimeError, match="a bug"):
        with storage.writing(tmp_path / "file"):  # plenty of space: not taken for a full disk
            raise RuntimeError("a bug")
    with pytest.raises(storage.WriteError, match=r"cannot write .*file \(Permission denied; "):
        with storage.writing(tmp_path / "file"):
            raise PermissionError(13, "Permission denied")


# ----------------------------------------------------------------------------------------------
# Rewards that are not finite
NAN_REWARDS = textwrap.dedent("""
    def nan_fn(completions, **kwargs):
        return [float("nan")] * len(completions)

    calls = []

    def nan_later(completions, **kwargs):
        calls.append(1)
        return [float("inf") if len(calls) > 1 else 0.5] * len(completions)

    def none_fn(completions, **kwargs):
        return [None] * len(completions)
""")


def test_a_reward_that_is_not_finite_is_refused_with_the_function_named(tmp_path, capsys):
    import train as train_py

    (tmp_path / "nanrewards.py").write_text(NAN_REWARDS)
    module = str(tmp_path / "nanrewards.py")
    run = tmp_path / "run"
    assert train_py.main([*TOY, "--reward", f"{module}:nan_fn", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward function nan_fn returned nan for completion 0" in err[0], err
    assert not run.exists()  # refused where the functions are first called, before anything is written
    # finite on the first call (the check before the run), infinite in the first step: the step stops
    assert train_py.main([*TOY, "--reward", f"{module}:nan_later", "--steps", "2", "--out", str(run)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 1: reward function nan_later returned inf for completion 0" in last \
        and "no checkpoint was written" in last, last
    assert not (run / "metrics.jsonl").exists()
    # None (not scored) is not a bad reward
    assert train_py.main([*TOY, "--reward", f"{module}:none_fn", "--reward", "correctness", "--steps", "1",
                          "--out", str(tmp_path / "none")]) == 0


# ----------------------------------------------------------------------------------------------
# Temporary files of interrupted cache writes
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from respec import storage
    with storage.staging(Path(sys.argv[1])) as tmp:
        (tmp / "half-written").write_text("x")
        print(tmp, flush=True)
        time.sleep(600)
""")


def start_writer(final: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_writers_staging_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "STALE_AFTER_S", 0.0)
    final = tmp_path / "cache" / "drafters" / "0123456789abcdef"
    killed, killed_tmp = start_writer(final)
    live, live_tmp = start_writer(final)
    try:
        os.kill(killed.pid, signal.SIGKILL)  # as a killed pretraining: its folder stays behind
        killed.wait(timeout=30)
        assert killed_tmp.is_dir() and live_tmp.is_dir()
        with storage.staging(final) as mine:
            assert not killed_tmp.exists()  # removed by the next write of the same thing
            assert live_tmp.is_dir()  # another process still writing it: kept
            assert mine.is_dir() and mine.name.startswith(final.name + ".tmp")
        assert not mine.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    with storage.staging(final):
        assert not live_tmp.exists()
    assert sorted(os.listdir(final.parent)) == []


def test_the_default_heads_pretraining_writes_through_a_staging_folder(tmp_path, monkeypatch, tokenizer):
    """A killed pretraining's folder (`drafters/<key>.tmpXXXXXXXX`) is gone after the next one."""
    from respec import drafter_choice, drafter_training
    from respec.tasks import make_task

    monkeypatch.setattr(storage, "STALE_AFTER_S", 0.0)
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    head = drafter_choice.default_head_dir("tiny", "toy-letters")
    stale = head.with_name(head.name + ".tmpdeadbeef")
    stale.mkdir(parents=True)
    (stale / "history.jsonl").write_text("{}\n")
    old = time.time() - 3600
    os.utime(stale, (old, old))

    def pretend(target, tokenizer, out_dir, **kwargs):  # what the pretraining leaves, without its minutes
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(drafter_training, "pretrain", pretend)
    drafter_choice.pretrain_default_head("tiny", head, tokenizer, make_task(task="toy-letters"), log=lambda m: None)
    assert (head / "config.json").is_file() and not stale.exists()
    assert sorted(p.name for p in head.parent.iterdir()) == [head.name]
