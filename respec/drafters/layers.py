"""A small causal LM over the target's vocabulary as a drafter (`models/drafter.py`), e.g. the
target's own first N layers.

Its state per sequence is how many leading tokens its KV cache holds (`drafted`); its pools are its
own, addressed by the target's block tables. An SD step feeds it the last two tokens (the one before
the newest may be missing: when every draft of the previous step was accepted, the drafter never
ran on the last of them), so `catch_up` caches all but those two.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from models.drafter import check_compatible
from respec.drafters import DraftBatch, Drafter, Drafts
from respec.paged_attention import PagedKV
from respec.speculative import draft_next
from respec.steps import right_padded


def layer_draft(drafter, draft_pools, prev_tokens, tokens, positions, block_tables, lengths, seeds, temperature,
                top_k, top_p, min_p, *, k: int, use_filter: bool, coupled: bool, run_block=None, draft_fn=draft_next):
    """k draft tokens per row from a causal LM with its own paged cache.

    tokens (B,): each row's newest token at `positions` (B,); prev_tokens (B,): the token before it.
    The first forward covers (previous, newest), the rest one token each; cache slots past a row's
    `lengths` (B,) are not written. `coupled`: draw with the target's own noise (the match rule,
    respec/speculative.py). Returns (drafts (B, k), q (B, k, V); None when coupled, which ignores it)."""
    B = tokens.shape[0]
    n_rep = drafter.cfg.n_rep
    inp = torch.stack([prev_tokens, tokens], dim=1)
    pos = torch.stack([(positions - 1).clamp_min(0), positions], dim=1)
    valid = None
    drafts, q = [], []
    for i in range(k):
        kv = PagedKV.build(draft_pools, block_tables, pos, n_rep, valid=valid)
        # (B, d), contiguous: the first forward covers two tokens, the rest one, and a tail compiled
        # for one stride would be compiled again for the other
        hidden = drafter(inp, pos, kv, run_block=run_block)[:, -1].contiguous()
        d_i, q_i = draft_fn(drafter, hidden, seeds, temperature, top_k, top_p, min_p, positions + 1 + i,
                            use_filter=use_filter,
                            coupled=coupled)
        drafts.append(d_i)
        if not coupled:  # (the match rule never reads q: k full-vocabulary rows a draft not kept)
            q.append(q_i)
        valid = (i + 1 < lengths).view(B, 1)  # draft i's slot is needed only to draft i+1
        inp, pos = d_i.view(B, 1), torch.where(valid, (positions + 1 + i).view(B, 1), positions.view(B, 1))
    return torch.stack(drafts, dim=1), torch.stack(q, dim=1) if q else None


class LayerDrafter(Drafter):
    def __init__(self, model):
        self.module = model
        self.pool_shape = (model.cfg.num_layers, model.cfg.num_kv_heads, model.cfg.head_dim)
        self.drafted: dict[int, int] = {}  # seq id -> leading tokens in the drafter's cache
        self.ran: set[int] = set()  # seq ids the last draft ran on

    def check(self, target) -> None:
        check_compatible(target, self.module)

    def describe(self) -> str:
        return json.dumps({"layers": dataclasses.asdict(self.module.cfg)}, sort_keys=True)

    def _cache(self, spans, seqs) -> None:
        """One eager right-padded forward caching token spans (ids, first position) of `seqs`."""
        dev = self.view.device
        tokens, positions, valid = (t.to(dev) for t in right_padded(spans))
        kv = PagedKV.build(self.view.draft_pools, self.view.tables(seqs), positions, self.module.cfg.n_rep, valid=valid)
        self.runner(tokens, positions, kv)

    def on_prefill(self, seqs, tokens, positions, valid, block_tables, taps, first_tokens) -> None:
        """Nothing cached yet: the prompt (and the text before a preemption) is cached in the first
        step that drafts the row (`catch_up`), so a row SD never turns on for costs no forward."""
        for s in seqs:
            self.drafted[s.id] = 0

    def catch_up(self, seqs, k: int) -> None:
        behind = [s for s in seqs if self.drafted[s.id] < len(s.tokens) - 2]
        if behind:
            self._cache([(s.tokens[self.drafted[s.id]: len(s.tokens) - 2], self.drafted[s.id]) for s in behind], behind)
            for s in behind:
                self.drafted[s.id] = len(s.tokens) - 2

    def draft(self, batch: DraftBatch) -> Drafts:
        pad = [0] * (batch.tokens.shape[0] - len(batch.seqs))
        prev = torch.tensor([s.tokens[-2] for s in batch.seqs] + pad, dtype=torch.int64, device=self.view.device)
        step = self.view.steps.get(layer_draft, k=batch.k, use_filter=batch.use_filter, coupled=batch.coupled)
        drafts, q = step(self.runner, self.view.draft_pools, prev, batch.tokens, batch.positions, batch.block_tables,
                         batch.max_drafts, *batch.sampling)
        self.ran = {s.id for s in batch.seqs}
        return Drafts(drafts, batch.max_drafts, q)

    def commit(self, seqs, n, tokens, taps) -> None:
        for s in seqs:  # where it did not draft, `catch_up` caches the new text later
            if s.id in self.ran:
                self.drafted[s.id] = len(s.tokens) - 2
        self.ran = set()

    def forget(self, seq) -> None:
        self.drafted.pop(seq.id, None)
