"""The sampling seed of every completion of a rollout: fresh noise each step, or a prompt's own
noise reused across epochs.

respec's sampling noise is counter-based (respec/sampling.py): (seed, position) fixes the noise of
every position, so a completion is a deterministic function of the policy and its seed.

* `per-step` (the default): completion `index` (global prompt * G + sample) of `step` draws a seed
  from (run seed, step, index). Every rollout is fresh noise: plain GRPO.
* `per-prompt`: sample g of the training-set row `key` draws a seed from (run seed, key, g,
  generation). While the generation stays the same, the next epoch's completion of (key, g) equals
  the last one up to the first position where the moved policy draws another token, which makes
  last epoch's completion a draft the target accepts until there (`respec/drafters/replay.py`).

Reusing noise is a sampling choice with a learning cost, not an exact one: the policy of epoch e
was trained on the completion that noise produced in epoch e - 1, so given the policy the reused
noise is not fresh. A rewarded completion tends to reproduce itself, a group with no signal stays
frozen, and the independent samples a prompt gets shrink from G x epochs toward G. Two remedies:

* `reseed_every` R > 0: sample g's generation is (epoch + g * R // G) // R, so each sample gets
  new noise every R epochs, staggered by g: every group gets about G / R fresh samples in every
  epoch (R = 1: fresh noise every epoch, as per-step).
* a group whose rewards were all equal (no signal: nothing to learn from it) is reseeded for its
  next visit (`observe`).

Two visits of one row within one step (a step that straddles an epoch boundary when the set's
size is not a multiple of the prompts per step) get different seeds: the second visit counts as
a repeat (`repeat` in the hash), so one (prompt, g) never gives the same completion twice in a
batch.
"""

from __future__ import annotations

import hashlib

SEED_MODES = ("per-step", "per-prompt")


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def eval_seed(seed: int, problem: int, sample: int) -> int:
    """The seed of sample `sample` of held-out problem `problem` (respec/evaluation.py): the same at
    every evaluation of a run, apart from every rollout's."""
    return _seed("eval", seed, problem, sample)


def request_seed(seed: int, step: int, index: int) -> int:
    """The per-step seed of completion `index` (global prompt * G + sample) of `step`: the same on
    any number of ranks and after a resume."""
    return _seed(seed, step, index)


class RolloutSeeds:
    def __init__(self, mode: str = "per-step", *, seed: int = 0, group: int = 4, reseed_every: int = 0):
        if mode not in SEED_MODES:
            raise ValueError(f"--rollout-seeds must be one of {', '.join(SEED_MODES)}, got {mode!r}")
        if reseed_every < 0:
            raise ValueError(f"--reseed-every must be >= 0 (0: never), got {reseed_every}")
        self.mode, self.seed, self.group, self.reseed_every = mode, seed, group, reseed_every
        self.reseeds: dict[int, int] = {}  # row key -> times its group was reseeded for having no signal

    def generation(self, key: int, sample: int, epoch: int) -> int:
        """How many times sample `sample` of row `key` has had new noise by `epoch`."""
        R = self.reseed_every
        staggered = (epoch + sample * R // self.group) // R if R else 0
        return staggered + self.reseeds.get(key, 0)

    def step_seeds(self, step: int, keys: list[int], epochs: list[int]) -> list[int]:
        """The seeds of a step's P x G completions (global order: prompt-major), from each prompt's
        row key and the epoch its data position falls in."""
        G = self.group
        if self.mode == "per-step":
            return [request_seed(self.seed, step, i * G + g) for i in range(len(keys)) for g in range(G)]
        seen: dict[int, int] = {}
        out = []
        for key, epoch in zip(keys, epochs):
            repeat = seen.get(key, 0)  # earlier visits of this row in this step
            seen[key] = repeat + 1
            for g in range(G):
                parts = (self.seed, "prompt", key, g, self.generation(key, g, epoch))
                out.append(_seed(*parts, repeat) if repeat else _seed(*parts))
        return out

    def observe(self, keys: list[int], signal: list[bool]) -> None:
        """A step's groups (global, every rank the same): those without signal get new noise next time."""
        if self.mode != "per-prompt":
            return
        for key, has_signal in zip(keys, signal):
            if not has_signal:
                self.reseeds[key] = self.reseeds.get(key, 0) + 1

    def state_dict(self) -> dict:
        return {"reseeds": dict(self.reseeds)}

    def load_state_dict(self, state: dict) -> None:
        self.reseeds = {int(k): int(v) for k, v in state.get("reseeds", {}).items()}
