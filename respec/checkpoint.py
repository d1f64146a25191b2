"""Checkpoints of a training run, with `torch.distributed.checkpoint` (DCP), written atomically.

Layout of a run directory:

    RUN_DIR/config.json            every setting of the run
    RUN_DIR/metrics.jsonl          one JSON object per step
    RUN_DIR/checkpoints/step_000010/   DCP files (actor, optimizer, LR schedule, drafter, step) +
                                       extras.pt (components the same on every rank: the drafter's
                                       online learner, the rollout seeds, the replays, the solver's
                                       acceptance) + state_rank{r}.pt (each rank's own: its drafter's
                                       earlier rollouts) + rng_rank{r}.pt (its random states)
    RUN_DIR/checkpoints/latest     the name of the newest complete checkpoint
    RUN_DIR/hf/                    the final actor as a Hugging Face checkpoint
    RUN_DIR/drafter/               the final drafter (with online distillation), for `--drafter DIR`

A checkpoint is written into a hidden temporary directory by every rank, then (after a barrier)
rank 0 lists its files with their sizes (`manifest.json`), renames it into place, and only then
replaces `latest` (write + os.replace). A run killed at any moment leaves `latest` naming a complete
checkpoint, or no `latest` at all; never a half-written one. Older checkpoints beyond `keep` are
removed after the new one is in place. A failed write (a full disk: respec/storage.py) removes the
partial files and says so in one line (`CheckpointError`).

What the file system did after the write is another matter (a copy cut short, a disk that lost the
last blocks): `resume_point` checks the files against the manifest before anything is read, sets a
damaged checkpoint aside (`step_000040.damaged`) and resumes from the newest whole one, or refuses.

Besides the tensors DCP shards, a checkpoint holds *components*: objects with `state_dict()` and
`load_state_dict()` (torchtitan's `Stateful`), each handing over its own state by name, so that
the trainer never packs or unpacks another object's fields. `shared` ones are the same on every
rank (rank 0 writes them); `per_rank` ones differ by rank (each writes its own: a rank's drafter
has seen only its own prompts).

Each rank saves only its own shards (DCP); resuming with a different number of ranks is DCP's
resharding, but respec's data split follows the world size, so an exact continuation needs the
same number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from respec import storage
from respec.distributed import Dist, barrier

LATEST = "latest"
EXTRAS = "extras.pt"  # the shared components
RANK_STATE = "state_rank{}.pt"  # each rank's own components


MANIFEST = "manifest.json"  # every file of the checkpoint and its size, written last
STEP_NAME = re.compile(r"step_\d{6}")
DAMAGED = ".damaged"  # the suffix a damaged checkpoint is set aside under (never deleted)


class CheckpointError(storage.WriteError):
    """A checkpoint could not be written; its partial files are gone and `latest` is unchanged."""


class CheckpointReadError(ValueError):
    """No complete checkpoint to resume from, or one that cannot be read: one line for the user."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names (the newest one written in full), or None."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (not the temporary or damaged ones)."""
    root = checkpoint_root(run_dir)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and STEP_NAME.fullmatch(p.name)) if root.is_dir() else []


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files (one phrase naming the file), or None if they are
    whole: each file of its manifest present at its size; a checkpoint written before manifests,
    its archives readable and its DCP data files as long as their index says."""
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sizes.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size:,} of its {size:,} bytes"
        return None
    return _legacy_damage(path)


def _legacy_damage(path: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a missing or cut .metadata: pickle, OSError, ...
        return f".metadata is unreadable ({type(e).__name__})"
    ends: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None:
            return f"{name} is missing"
        if size < end:
            return f"{name} has {size:,} of at least {end:,} bytes"
    for file in sorted(path.glob("*.pt")):
        if not zipfile.is_zipfile(file):
            return f"{file.name} is cut short or not a checkpoint file"
    return None


def resume_point(run_dir: Path, d: Dist, log=print) -> Path | None:
    """The checkpoint a resumed run starts from: the one `latest` names if its files are whole, else
    the newest earlier one that is (said on `log`), or None where the run has none. The main rank
    sets each damaged checkpoint aside (`step_000040.damaged`: kept, never read again or pruned) and
    points `latest` at the one chosen. None complete: `CheckpointReadError`, nothing changed."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    damaged = []
    chosen = None
    for candidate in [latest] + [p for p in reversed(_checkpoints(run_dir)) if p.name < latest.name]:
        problem = damage(candidate)
        if problem is None:
            chosen = candidate
            break
        damaged.append((candidate, problem))
    barrier(d)  # every rank has read the files before any is moved
    if chosen is None:
        first, problem = damaged[0]
        raise CheckpointReadError(f"--resume {run_dir}: checkpoint {first.name} is damaged ({problem}) and no earlier "
                                  "checkpoint is complete; nothing was changed (start a new run)")
    if damaged and d.main:
        for path, problem in damaged:
            path.rename(path.with_name(path.name + DAMAGED))
            log(f"checkpoint {path.name} is damaged ({problem}): set aside as {path.name + DAMAGED}")
        _point_latest_at(checkpoint_root(run_dir), chosen.name)
        log(f"resuming from {chosen.name}, the newest complete checkpoint")
    barrier(d)
    return chosen


def _point_latest_at(root: Path, name: str) -> None:
    storage.write_text(root / LATEST, name + "\n")  # (written aside and renamed: never half a name)


@contextlib.contextmanager
def _single_process_quiet(d: Dist):
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        if d.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(actor, optimizer, scheduler, drafter, progress: dict) -> dict:
    state = {
        "actor": get_model_state_dict(actor),
        "optimizer": get_optimizer_state_dict(actor, optimizer),
        "scheduler": scheduler.state_dict(),
        "progress": dict(progress),
    }
    if drafter is not None:
        state["drafter"] = drafter.state_dict()
    return state


def save(run_dir: Path, step: int, d: Dist, *, actor, optimizer, scheduler, drafter=None, progress: dict,
         keep: int = 2, shared: dict | None = None, per_rank: dict | None = None) -> Path:
    """Write the checkpoint of `step` (every rank calls this) and point `latest` at it. `shared` and
    `per_rank`: components by name (see the module docstring), their `state_dict()`s written with
    torch.save, by rank 0 and by every rank."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash at this step
        tmp.mkdir(parents=True)
    barrier(d)
    try:
        with _single_process_quiet(d):
            dcp.save(_app_state(actor, optimizer, scheduler, drafter, progress), checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
        if per_rank:
            torch.save({name: c.state_dict() for name, c in per_rank.items()}, tmp / RANK_STATE.format(d.rank))
        if shared and d.main:
            torch.save({name: c.state_dict() for name, c in shared.items()}, tmp / EXTRAS)
        barrier(d)
        if d.main:  # every rank's files are in: their sizes, for `damage` to check on a resume
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1) + "\n")
            if final.exists():  # a resumed run redoing a step it had checkpointed: replace that one
                shutil.rmtree(final)
            tmp.rename(final)
            _point_latest_at(root, name)
    except BaseException as e:  # a full disk, a lost mount (DCP wraps a writer thread's error)
        failure = storage.write_failure(tmp, e)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"{previous.name} is still the latest" if previous else "there is no earlier checkpoint"
        raise CheckpointError(f"cannot write checkpoint {name} in {root} ({failure.cause}); {kept}") from e
    if d.main:
        for old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load(path: Path, d: Dist, *, actor, optimizer, scheduler, drafter=None, shared: dict | None = None,
         per_rank: dict | None = None) -> dict:
    """Restore everything `save` wrote into the live objects; returns the saved progress dict. A
    component the checkpoint does not hold (one written before it existed) keeps its fresh state."""
    try:
        return _load(path, d, actor=actor, optimizer=optimizer, scheduler=scheduler, drafter=drafter, shared=shared,
                     per_rank=per_rank)
    except BaseException as e:  # whole files whose contents cannot be read (`resume_point` checked the sizes)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        cause = next((line.strip() for x in storage.causes(e) for line in str(x).splitlines()[-1:] if line.strip()),
                     type(e).__name__)
        raise CheckpointReadError(f"checkpoint {path} cannot be read ({cause}); nothing was changed") from e


def _load(path: Path, d: Dist, *, actor, optimizer, scheduler, drafter, shared, per_rank) -> dict:
    state = _app_state(actor, optimizer, scheduler, drafter, {"step": 0, "data_position": 0})
    with _single_process_quiet(d):
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(actor, state["actor"])
    set_optimizer_state_dict(actor, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if drafter is not None:
        drafter.load_state_dict(state["drafter"])
    rng = path / f"rng_rank{d.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    for file, components in ((EXTRAS, shared), (RANK_STATE.format(d.rank), per_rank)):
        saved = torch.load(path / file, weights_only=False) if components and (path / file).is_file() else {}
        for name, component in (components or {}).items():
            if name in saved:
                component.load_state_dict(saved[name])
    return state["progress"]


def full_actor_state(actor) -> dict[str, torch.Tensor]:
    """The actor's whole state dict on the CPU of every rank (an all-gather when sharded)."""
    return get_model_state_dict(actor, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(actor, out_dir: Path, d: Dist, *, tokenizer=None) -> None:
    """Write the actor as a Hugging Face checkpoint (config.json, safetensors, tokenizer) that
    transformers' AutoModelForCausalLM loads; with LoRA, the merged weights. Every rank takes part
    in the gather; rank 0 writes."""
    from models.decoder import Decoder
    from models.loading import save_hf_checkpoint

    from respec import lora

    state = full_actor_state(actor)
    if lora.has_lora(actor):  # the merged weights: a plain checkpoint any loader reads
        state = lora.merged(state, lora.scalings(actor))
    if d.main:
        with torch.device("meta"):
            model = Decoder(actor.cfg)
        state = {k: v.float() for k, v in state.items()}
        if actor.cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        save_hf_checkpoint(model, out_dir, tokenizer)
    barrier(d)
