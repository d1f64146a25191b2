"""The drafter interface: what the rollout engine asks of any drafter, whatever its kind.

A drafter proposes up to k tokens per row; the engine verifies them with one target forward and
accepts each row's prefix exactly (`respec/speculative.py`). The engine never asks which kind of
drafter it holds: it calls these hooks, in this order, and each kind keeps its own per-sequence
state behind them (a new kind is one new file in this folder):

  on_prefill(seqs, ...)   sequences were admitted (or readmitted after a preemption): their prompt
                          and text were cached by the target, and their first token sampled
  on_decode(seqs, ...)    a plain decode step (SD off this step) emitted one token per row
  catch_up(seqs, k)       before an SD step: consume whatever was emitted while SD was off (a
                          model drafter's prompt too: it is fed in the first step that drafts a row)
  draft(batch)            propose up to `batch.max_drafts[i]` tokens per row -> `Drafts`
  commit(seqs, n, ...)    after the verify: row i kept its first n[i] drafts and one target token
                          (also for rows it did not draft this step: a hybrid's proposer rows)
  forget(seq)             the sequence finished, was preempted or abandoned: drop its state

A drafter whose state between two SD steps can live on the device (`runs_ahead`: the EAGLE head,
whose next input is the verify's own output; the history drafter on a GPU, its rows' texts and
suffix match there, history_ahead.py) lets SD steps run ahead of the host
(respec/sd_ahead.py): after `catch_up`, `ahead_state(batch)` lays its rows' state out on the device,
then each step `draft_ahead(batch, state)` proposes and `advance(state, ...)` moves the state past
the verify without the host; the run ends with one `commit` of the last verify, as a step would.
A drafter that runs ahead only some of the time (a hybrid: its model's steps run ahead, its
model-free proposers' need the host) says so per step: `holds_back(seqs, caps)` is true where a run
ahead would forgo proposals the rows have now, and the engine then takes the step step by step.

Between rollouts a drafter may carry state from one to the next (a history drafter's earlier
rollouts of each prompt): `state_dict()` / `load_state_dict()` hand it to checkpoints, so that a
resumed run drafts as the uninterrupted one would. Weights are not part of it (the trainer
checkpoints a head's weights), nor is per-sequence state (no sequence lives between rollouts).

How the drafts are verified is the engine's choice (respec/speculative.py). Under the match rule
(the default) a draft is accepted iff it equals the token the target itself draws there, so the
rollout is plain decoding's whatever a drafter proposes; a drafter that samples should then draw
with the target's own noise (`DraftBatch.coupled`), which is what makes its drafts agree often.
Under the rejection rule the draft's distribution matters for exactness: `Drafts.q` is the
distribution each proposal was sampled from, or None for a deterministic drafter (point masses: a
draft d is accepted with probability p(d), and a rejection resamples from p with d removed).
Anything that decides how many tokens a row proposes must be known before the draft is sampled,
never depend on the sampled tokens themselves, or q stops being the drafts' distribution.

A drafter that can offer some rows a long deterministic continuation, known before drafting (replay),
also has `long_drafts(seqs)`: each row's offer length (0: none); the engine verifies those rows
apart, with a longer draft than k.

Kinds: `eagle.py` (an EAGLE-3-style head on the target's features), `layers.py` (a small causal LM
over the target's vocabulary, e.g. the target's own first layers), `history.py` (model-free: the
continuation of the longest suffix match in the row's prompt, its own text, its group siblings' and
earlier rollouts of the same prompt), `replay.py` (model-free: last epoch's completion of the same
prompt and sample), `hybrid.py` (model-free proposers first, a model drafter for the other rows),
and, for the lab, `oracle.py` (the target's own continuation, each token kept with probability a).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from respec.host_copy import to_device
from respec.sampling import RowSampling


@dataclass
class EngineView:
    """What a drafter may use of the engine that runs it."""

    target: torch.nn.Module  # the target as the engine runs it (packed linears on CPU); its embedding feeds heads
    draft_pools: list  # the drafter's own KV pools (its `pool_shape`), addressed by the target's block tables
    steps: object  # compile/policy.py CompiledSteps: `get(fn, **static)` compiles a step function
    tables: Callable  # tables(seqs, rows=None) -> (rows, W) block tables of those sequences
    device: torch.device
    dtype: torch.dtype  # the rollout dtype
    pack_weights: bool  # whether the engine packs linears (compile/cpu_linear.py); drafters with weights follow
    max_len: int  # the target's context: no row's text grows past it
    # whether the engine runs SD steps ahead of the host now (its `run_ahead`; read when asked: a
    # bench turns it off for a rollout step by step)
    runs_ahead: Callable[[], bool] = lambda: False


@dataclass
class DraftBatch:
    """One SD step's rows, padded by the engine to a batch bucket (`rows` >= len(seqs); padding rows
    have max_drafts 0, position 0 and null block tables)."""

    seqs: list  # the running sequences, rows 0..len(seqs)-1
    k: int  # draft length of this step (the widest any row may propose)
    tokens: torch.Tensor  # (rows,) each row's newest token, at `positions`, not yet in any cache
    positions: torch.Tensor  # (rows,)
    block_tables: torch.Tensor  # (rows, W) the target's; a drafter's own pools use the same blocks
    sampling: RowSampling  # (rows,) each per-row sampling parameters (respec/sampling.py)
    use_filter: bool  # whether any row filters (top-k / top-p / min-p): a static flag of the compiled steps
    coupled: bool  # draw proposals with the target's own noise (the match rule, respec/speculative.py)
    max_drafts: torch.Tensor  # (rows,) int64 most tokens each row may propose (room left; <= k)
    max_drafts_list: list[int]  # the same for the real rows, on the host
    # (rows,) int64 tokens each row may still emit (at least its max_drafts + 1): what the verify's
    # next inputs for a run ahead of the host count down (respec/speculative.py `next_inputs`)
    left: torch.Tensor | None = None


@dataclass
class Drafts:
    tokens: torch.Tensor  # (rows, k) proposals; entries past a row's length are ignored
    lengths: torch.Tensor  # (rows,) int64 how many each row proposed (<= max_drafts)
    q: torch.Tensor | None  # (rows, k, V) sampling log-probs each proposal was drawn from; None = point masses
    point: torch.Tensor | None = None  # (rows,) bool: these rows' proposals are point masses whatever q says
    lengths_list: list[int] | None = None  # the real rows' lengths on the host; None: each proposed its
    # max_drafts. All zero (a history drafter that matched nothing) -> the engine decodes plainly instead
    kinds: list[str] | None = None  # the real rows' drafter kinds (a hybrid's); None: all the drafter's `kind`

    @staticmethod
    def proposed(proposals: list[list[int]], rows: int, k: int, device, kinds: list[str] | None = None) -> "Drafts":
        """A model-free drafter's drafts: each real row's proposal (a list of token ids, possibly
        empty), padded to (rows, k) as the verify takes them; point masses (q None)."""
        lengths = [len(prop) for prop in proposals]
        padded = [prop + [0] * (k - len(prop)) for prop in proposals] + [[0] * k] * (rows - len(proposals))
        tokens, counts = to_device(torch.device(device), padded, lengths + [0] * (rows - len(lengths)))  # one copy
        return Drafts(tokens, counts, None, lengths_list=lengths, kinds=kinds)


class Drafter:
    """Base class: every hook a no-op except `draft`. See the module docstring for the protocol."""

    kind: str = "model"  # what per-kind acceptance statistics call its rows
    feature_layers: tuple[int, ...] = ()  # target blocks whose outputs (concatenated) the drafter reads
    pool_shape: tuple[int, int, int] | None = None  # (layers, kv heads, head dim) of its own KV pools
    module: torch.nn.Module | None = None  # its weights, if any (online distillation swaps them in)
    runs_ahead: bool = False  # its state between SD steps can stay on the device (respec/sd_ahead.py)

    def check(self, target) -> None:
        """Raise ValueError (one line) if this drafter cannot serve `target`."""

    def describe(self) -> str:
        """The drafter's architecture (not its weights): step costs depend on it, so the solver's
        cost profile is cached per description."""
        return type(self).__name__

    def attach(self, view: EngineView) -> None:
        """Keep what the drafter uses of the engine; a drafter with weights runs them as the engine
        runs the target's (`runner`: packed linears on CPU, compile/cpu_linear.py)."""
        from compile.cpu_linear import packed_view, packing_available

        self.view = view
        packed = view.pack_weights and packing_available(view.device, view.dtype)
        self.runner = packed_view(self.module) if packed and self.module is not None else self.module

    def sync(self) -> None:
        """The weights in `module` changed (an online distillation update): refresh the packed copy."""
        from compile.cpu_linear import repack

        if self.runner is not self.module:
            repack(self.runner)

    def on_prefill(self, seqs, tokens, positions, valid, block_tables, taps, first_tokens) -> None:
        """tokens, positions, valid (B, T): the right-padded prefill; taps (B, T, F) the target's
        features at `feature_layers` (None without); first_tokens (B,) the sampled first tokens."""

    def on_decode(self, seqs, taps, next_tokens) -> None:
        """taps (rows, F) the target's features of each row's input token; next_tokens (rows,)."""

    def catch_up(self, seqs, k: int) -> None:
        pass

    def settle(self, seqs, k: int) -> None:
        """Consume everything the rows hold pending now, as the first SD step of them would (a model
        drafter feeds on the prompt there): what the engine does untimed before it times an SD
        step (`RolloutEngine.time_step`), so that a cost profile prices the steps, not the prompts."""
        self.catch_up(seqs, k)

    def draft(self, batch: DraftBatch) -> Drafts:
        raise NotImplementedError

    def ahead_state(self, batch: DraftBatch):
        """With `runs_ahead`: the rows' state on the device before the first step of a run (after
        `catch_up`), for `draft_ahead`."""
        raise NotImplementedError

    def holds_back(self, seqs, caps: list[int]) -> bool:
        """With `runs_ahead`: whether the rows (each drafting up to `caps[i]`) have proposals now
        that a run ahead would forgo; the engine then takes this step step by step."""
        return False

    @property
    def ahead_kind(self) -> str:
        """What the statistics call the rows of a run ahead (`kind`; a hybrid's: its model's rows)."""
        return self.kind

    def draft_ahead(self, batch: DraftBatch, state) -> Drafts:
        """With `runs_ahead`: `draft` from `state`, nothing read from the host; each row proposes
        at most its cap (a model drafter: `batch.max_drafts`, returned as `Drafts.lengths`; a
        model-free one may propose fewer, its lengths on the device only)."""
        raise NotImplementedError

    def advance(self, state, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                taps: torch.Tensor | None):
        """With `runs_ahead`: the state after a verify, from its pairs (respec/speculative.py
        `next_inputs`): tokens (rows, k+1) it verified, each emitted at positions (rows, k+1) where
        `valid` (rows, k+1), taps (rows, k+1, F) the target's features there; device ops only."""
        raise NotImplementedError

    def ran_ahead(self, seqs) -> None:
        """With `runs_ahead`: a run of these rows ended and its tokens are recorded in them (the rows
        that ended in it too, before `forget`)."""

    def long_drafts(self, seqs) -> list[int] | None:
        """Tokens each row could propose now, known before drafting, for a longer verify than k
        (a replay's remaining continuation); None: this drafter has no such proposals."""
        return None

    def commit(self, seqs, n: list[int], tokens: torch.Tensor, taps: torch.Tensor | None) -> None:
        """Rows still running after the verify: row i kept n[i] drafts and tokens[i, n[i]];
        tokens (rows, k+1) and taps (rows, k+1, F) are the verify's, for the k+1 verified positions."""

    def forget(self, seq) -> None:
        pass

    def state_dict(self) -> dict:
        """What the drafter carries from one rollout to the next, as new containers (a later rollout
        does not change a state taken before it); {}: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Carry `state` (a `state_dict()`, possibly of another process) into the next rollout."""


class NoDrafter(Drafter):
    """What an engine without speculative decoding holds: every hook a no-op, and nothing to draft
    (its engine has k = 0, so it never asks)."""

    kind = "none"

    def draft(self, batch: DraftBatch) -> Drafts:
        raise RuntimeError("this engine has no drafter: it never speculates")
