"""Drafters side by side, chosen per row: model-free proposers first, a model drafter for the rest.

A *proposer* is a deterministic, model-free drafter with `offers(seqs, caps)`: the tokens it stands
behind for each row, or none (replay: the row's last-epoch completion while the text still follows
it, respec/drafters/replay.py; history: a suffix match of at least `min_match` tokens whose
continuation fills the row's draft length, respec/drafters/history.py). Each SD step a row drafts
from the first proposer, in the order given, that offers it something; every other row takes the
model's (stochastic) drafts, if there is a model. The choice depends only on what is known before
anything is sampled, never on the model's drafts, so each row's q is still the distribution its
drafts came from: the model's, or a point mass (`Drafts.point` marks those rows).

The model drafter drafts the whole batch whenever some row needs it (its drafts for proposer rows
are computed and discarded, so it keeps its state as if it drafted every row); in a batch where
every row has an offer it does not run, and takes the verified tokens at `commit` as it takes a
plain decode step's. `long_drafts` passes on the proposers' (replay's) long proposals, which the
engine verifies apart from the model's rows, or with the other rows riding along undrafted (their
cap 0: the model does not run for them; respec/engine.py).

Run ahead of the host (respec/sd_ahead.py): where the model's state stays on the device (the EAGLE
head) and `ahead` is on (by default on a GPU, where a step's host work costs more than a decode
step of a small model), steps in which no proposer offers any row anything run ahead with the
model drafting every row; the proposers see the run's text when it ends, and a step with an offer
is taken step by step (`holds_back`). Within a run the proposers offer nothing, so a match that
appears mid-run waits for the run's end (at most `run_ahead` steps, or until the batch changes).
On a CPU the host's share of a step is small and every step asks the proposers (`ahead` off).
Tokens are the same either way under the match rule (the drafts do not change them); under the
rejection rule each row's drafts still come from the distribution its q says.
"""

from __future__ import annotations

import torch

from respec.drafters import DraftBatch, Drafter, Drafts, EngineView
from respec.drafters.history import HistoryDrafter
from respec.host_copy import to_device


class HybridDrafter(Drafter):
    kind = "hybrid"

    def __init__(self, model: Drafter | None, *proposers: Drafter, min_match: int = 4, ahead: bool | None = None):
        self.model = model
        self.proposers = proposers or (HistoryDrafter(),)
        self.min_match = min_match  # shortest history match whose continuation replaces the model's drafts
        self.ahead = ahead  # the model's steps run ahead where no proposer offers (None: on a GPU, `attach`)
        self._held = None  # `holds_back`'s choice, for the `draft` of the same step: (rows' ids, lengths, caps), choice
        self.parts = ([model] if model is not None else []) + list(self.proposers)
        if model is not None:
            self.feature_layers, self.pool_shape, self.module = model.feature_layers, model.pool_shape, model.module

    def check(self, target) -> None:
        for part in self.parts:
            part.check(target)

    def describe(self) -> str:
        kinds = [self.model.describe()] if self.model is not None else []
        return f"hybrid({', '.join(kinds + [p.kind for p in self.proposers])})"

    @property
    def runs_ahead(self) -> bool:
        return bool(self.ahead) and self.model is not None and self.model.runs_ahead

    def attach(self, view: EngineView) -> None:
        self.view = view  # the model drafter keeps the (packed) weights it runs
        if self.ahead is None:
            self.ahead = view.device.type == "cuda"
        for part in self.parts:
            part.attach(view)

    def sync(self) -> None:
        if self.model is not None:
            self.model.sync()

    def on_prefill(self, *args) -> None:
        for part in self.parts:
            part.on_prefill(*args)

    def on_decode(self, *args) -> None:
        for part in self.parts:
            part.on_decode(*args)

    def catch_up(self, seqs, k: int) -> None:
        """The proposers catch up on the rows' text; the model only when it drafts (`draft`,
        `ahead_state`): in a step where every row has an offer it does not run, and the pairs it
        has not seen wait for the step it runs in, as a plain step's do."""
        for p in self.proposers:
            p.catch_up(seqs, k)

    def settle(self, seqs, k: int) -> None:
        self.catch_up(seqs, k)
        if self.model is not None:
            self.model.settle(seqs, k)

    def long_drafts(self, seqs) -> list[int] | None:
        offers = [o for p in self.proposers if (o := p.long_drafts(seqs)) is not None]
        return [max(row) for row in zip(*offers)] if offers else None

    def _choose(self, seqs, caps: list[int]) -> tuple[list[list[int] | None], list[str]]:
        """Each row's proposal from the first proposer that offers one (None: the model's row), and
        its kind."""
        n = len(seqs)
        chosen: list[list[int] | None] = [None] * n
        kinds = ["model" if self.model is not None else "none"] * n
        for p in self.proposers:
            if all(c is not None for c in chosen):
                break
            for i, prop in enumerate(p.offers(seqs, caps, self.min_match)):
                if chosen[i] is None and prop:
                    chosen[i], kinds[i] = prop, p.kind
        return chosen, kinds

    @staticmethod
    def _key(seqs, caps: list[int]) -> tuple:
        return [s.id for s in seqs], [len(s.tokens) for s in seqs], list(caps)

    def holds_back(self, seqs, caps: list[int]) -> bool:
        """Some row has a proposer's offer now (the proposers caught up on the rows' text first); the
        choice is kept for the step's `draft` if the step is taken step by step with the same rows."""
        for p in self.proposers:
            p.catch_up(seqs, max(caps, default=0))
        chosen = self._choose(seqs, caps)
        self._held = (self._key(seqs, caps), chosen)
        return any(c is not None for c in chosen[0])

    @property
    def ahead_kind(self) -> str:
        return "model"  # (a run ahead drafts every row with the model)

    def ahead_state(self, batch: DraftBatch):
        self.model.catch_up(batch.seqs, batch.k)
        return self.model.ahead_state(batch)

    def draft_ahead(self, batch: DraftBatch, state) -> Drafts:
        return self.model.draft_ahead(batch, state)

    def advance(self, state, tokens, positions, valid, taps):
        return self.model.advance(state, tokens, positions, valid, taps)

    def ran_ahead(self, seqs) -> None:
        self.model.ran_ahead(seqs)

    def draft(self, batch: DraftBatch) -> Drafts:
        rows, n, caps = batch.tokens.shape[0], len(batch.seqs), batch.max_drafts_list
        held, self._held = self._held, None
        chosen, kinds = held[1] if held is not None and held[0] == self._key(batch.seqs, caps) else \
            self._choose(batch.seqs, caps)
        fixed = Drafts.proposed([c or [] for c in chosen], rows, batch.k, batch.tokens.device, kinds)
        # rows the model drafts for: no proposal and room for drafts (a row riding along in a replay
        # verify has none); where no row needs it, the model does not run
        if self.model is None or not any(c is None and cap > 0 for c, cap in zip(chosen, batch.max_drafts_list)):
            return fixed
        self.model.catch_up(batch.seqs, batch.k)
        drafts = self.model.draft(batch)
        if all(c is None for c in chosen):
            return Drafts(drafts.tokens, drafts.lengths, drafts.q, kinds=kinds)
        # (decided on the host: asking the device tensor would make the host wait for the device)
        point = to_device(batch.tokens.device, [int(c is not None) for c in chosen] + [0] * (rows - n))[0] != 0
        lengths = [m if c is not None else cap for c, m, cap in zip(chosen, fixed.lengths_list, batch.max_drafts_list)]
        return Drafts(torch.where(point.view(-1, 1), fixed.tokens, drafts.tokens),
                      torch.where(point, fixed.lengths, drafts.lengths), drafts.q, point=point, lengths_list=lengths,
                      kinds=kinds)

    def commit(self, seqs, n, tokens, taps) -> None:
        self._held = None
        for part in self.parts:
            part.commit(seqs, n, tokens, taps)

    def forget(self, seq) -> None:
        self._held = None
        for part in self.parts:
            part.forget(seq)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        for part, saved in zip(self.parts, state.get("parts", [])):
            part.load_state_dict(saved)
