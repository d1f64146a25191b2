"""A model drafter and the history drafter side by side, chosen per row.

Each SD step, a row drafts from history where its suffix match is long (at least `min_match`
tokens, and the continuation fills the row's draft length): repeated text, where a deterministic
proposal is accepted with the target's own high probability. Every other row takes the model's
(stochastic) drafts. The choice depends only on what is known before anything is sampled (the
rows' text, its siblings' and earlier rollouts'), never on the model's sampled drafts, so each
row's q is still the distribution its drafts came from: the model's, or a point mass (`Drafts.point`
marks those rows; the acceptance test needs no dense q for them).

The model drafter keeps its own state as if it drafted every row (it does: its drafts for history
rows are computed and discarded), so switching a row between the two costs nothing.
"""

from __future__ import annotations

import torch

from respec.drafters import DraftBatch, Drafter, Drafts, EngineView
from respec.drafters.history import HistoryDrafter


class HybridDrafter(Drafter):
    def __init__(self, model: Drafter, history: HistoryDrafter | None = None, *, min_match: int = 4):
        self.model, self.history = model, history if history is not None else HistoryDrafter()
        self.min_match = min_match  # shortest suffix match whose continuation replaces the model's drafts
        self.feature_layers, self.pool_shape, self.module = model.feature_layers, model.pool_shape, model.module
        self.history_rows = 0  # rows that drafted from history (statistics)

    def check(self, target) -> None:
        self.model.check(target)

    def describe(self) -> str:
        return f"hybrid({self.model.describe()}, history)"

    def attach(self, view: EngineView) -> None:
        self.view = view  # the model drafter keeps the (packed) weights it runs
        self.model.attach(view)
        self.history.attach(view)

    def sync(self) -> None:
        self.model.sync()

    def on_prefill(self, *args) -> None:
        self.model.on_prefill(*args)

    def on_decode(self, *args) -> None:
        self.model.on_decode(*args)

    def catch_up(self, seqs, k: int) -> None:
        self.model.catch_up(seqs, k)
        self.history.catch_up(seqs, k)

    def draft(self, batch: DraftBatch) -> Drafts:
        rows, k = batch.tokens.shape[0], batch.k
        use = torch.zeros(rows, dtype=torch.bool)
        hist = torch.zeros(rows, k, dtype=torch.int64)
        for i, ((prop, match), cap) in enumerate(zip(self.history.proposals(batch), batch.max_drafts_list)):
            if match >= self.min_match and len(prop) == cap:
                use[i] = True
                hist[i, :cap] = torch.tensor(prop, dtype=torch.int64)
        drafts = self.model.draft(batch)
        if not use.any():
            return drafts
        self.history_rows += int(use.sum())
        dev = batch.tokens.device
        use, hist = use.to(dev), hist.to(dev)
        return Drafts(torch.where(use.view(-1, 1), hist, drafts.tokens), drafts.lengths, drafts.q, point=use)

    def commit(self, seqs, n, tokens, taps) -> None:
        self.model.commit(seqs, n, tokens, taps)

    def forget(self, seq) -> None:
        self.model.forget(seq)
        self.history.forget(seq)

    def assume_cached(self, seq) -> None:
        self.model.assume_cached(seq)
        self.history.assume_cached(seq)
