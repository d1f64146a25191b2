"""The EAGLE-3-style head as a drafter (`models/eagle.py` has the head itself).

The head drafts from the target's features: to propose the token after position j it consumes
the pair (target feature of position j-1, token j). Its per-sequence state is the *pending*
pairs: the ones whose token the target has emitted but the head has not consumed yet. After a
prefill that is the pair of the first sampled token; every plain decode step adds one; an SD step
consumes the last k+1 (`catch_up` consumes any older ones first) and leaves the verified ones
(`commit`). The head's KV cache lives in pools of its own addressed by the target's block tables,
so rolling back the target's slots rolls the head's back too.
"""

from __future__ import annotations

import json

import torch

from models.eagle import EagleHead, call_head, check_eagle_fits
from respec.drafters import DraftBatch, Drafter, Drafts
from respec.host_copy import to_device
from respec.paged_attention import PagedKV
from respec.sampling import sample, sampling_logprobs
from respec.speculative import draft_stream


def head_draft_next(head, hidden, seeds, temperature, top_k, top_p, min_p, next_pos, *, use_filter: bool,
                    coupled: bool):
    """The head's output layer and sampler: hidden (B, d) -> (draft tokens (B,) as target ids, the
    sampling log-probs they were drawn from, over the target vocabulary (B, V)).

    Top-k, top-p and min-p apply over the draft vocabulary: q may be any distribution as long as it is the
    one the draft came from. Drawn over the target's vocabulary (-inf outside the draft vocabulary),
    so each token draws the noise the target's own sample draws for it, block and token (respec/
    sampling.py), and `coupled` (the match rule) is Gumbel coupling with the target. A compiled
    region (compile/policy.py)."""
    q_small = sampling_logprobs(head.draft_logits(hidden), temperature, top_k, top_p, use_filter=use_filter,
                                min_p=min_p)  # (B, N)
    q = q_small.new_full((q_small.shape[0], head.cfg.target.vocab_size), float("-inf")).index_copy(-1, head.d2t, q_small)
    tokens, _ = sample(q, temperature, seeds, next_pos, stream=draft_stream(coupled))
    return tokens, q


def eagle_draft(head, target, head_pools, pend_taps, pend_tokens, pend_pos, pend_valid, positions, block_tables,
                lengths, seeds, temperature, top_k, top_p, min_p, *, k: int, use_filter: bool, coupled: bool,
                run_head=call_head, draft_fn=head_draft_next):
    """k draft tokens per row from an EAGLE head.

    pend_taps (B, k+1, 3d), pend_tokens / pend_pos / pend_valid (B, k+1): the pending pairs,
    right-padded; each row's last valid pair holds its newest token, at `positions` (B,). The head
    first consumes them (rewriting the slots it filled with its own features while drafting last
    time), then drafts k tokens feeding its own output features back. Its cache slots past a row's
    `lengths` (B,) are not written. `coupled`: draw with the target's own noise (the match rule,
    respec/speculative.py). Returns (drafts (B, k), q (B, k, V); None when coupled, which ignores it)."""
    B = positions.shape[0]
    embed = target.embed_tokens
    kv = PagedKV.build(head_pools, block_tables, pend_pos, head.n_rep, valid=pend_valid)
    out = run_head(head, head.project(pend_taps), pend_tokens, pend_pos, embed, kv.layer(0))  # (B, k+1, d)
    last = pend_valid.long().sum(1) - 1  # (B,)
    g = out.gather(1, last.view(B, 1, 1).expand(B, 1, out.shape[-1]))  # (B, 1, d)
    drafts, q = [], []
    for i in range(k):
        d_i, q_i = draft_fn(head, g[:, 0], seeds, temperature, top_k, top_p, min_p, positions + 1 + i,
                            use_filter=use_filter,
                            coupled=coupled)
        drafts.append(d_i)
        if not coupled:  # (the match rule never reads q: k full-vocabulary rows a draft not kept)
            q.append(q_i)
        if i < k - 1:  # the head's own feature for draft i, at its position (kept only where it is needed)
            needed = (i + 1 < lengths).view(B, 1)
            pos = torch.where(needed, (positions + 1 + i).view(B, 1), positions.view(B, 1))
            kv = PagedKV.build(head_pools, block_tables, pos, head.n_rep, valid=needed)
            g = run_head(head, g, d_i.view(B, 1), pos, embed, kv.layer(0))
    return torch.stack(drafts, dim=1), torch.stack(q, dim=1) if q else None


class PairLog:
    """Every row's pending pairs in one pair of device tensors, features (N, 3d) and tokens (N,),
    appended a step at a time: one copy a step whatever its rows, where slicing each row's pairs out
    of the step's outputs was two tensor ops a row. A row holds spans (start, count) of it. Entry 0
    is a zero pair (`ZERO`: zero features, token 0), what padding reads. Spans no row holds any
    more are reclaimed by `compact` once the log has grown past several times what the rows hold."""

    MIN_ROWS = 4096  # no compaction below this many pairs (a few MB)
    ZERO = 0  # the entry of the zero pair

    def __init__(self):
        self.features: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.size = 0
        self.check_at = self.MIN_ROWS  # the size at which to count what the rows hold

    def append(self, features: torch.Tensor, tokens: torch.Tensor) -> int:
        """features (m, 3d) and tokens (m,) at the end; returns where they start."""
        m = features.shape[0]
        if self.features is None:  # the zero pair first
            rows = max(2 * m + 1, 256)
            self.features, self.tokens = features.new_zeros(rows, features.shape[-1]), tokens.new_zeros(rows)
            self.size = 1
        elif self.size + m > self.features.shape[0]:
            self._resize(2 * (self.size + m))
        self.features[self.size: self.size + m] = features
        self.tokens[self.size: self.size + m] = tokens
        self.size += m
        return self.size - m

    def _resize(self, rows: int) -> None:
        features, tokens = self.features.new_empty(rows, self.features.shape[-1]), self.tokens.new_empty(rows)
        features[: self.size] = self.features[: self.size]
        tokens[: self.size] = self.tokens[: self.size]
        self.features, self.tokens = features, tokens

    def compact(self, spans: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """The log holding only the zero pair and `spans` (each row's list of (start, count)), in
        their order; returns the spans' new places."""
        take, moved, at = [self.ZERO], [], 1
        for row in spans:
            new = []
            for start, count in row:
                take += range(start, start + count)
                new.append((at, count))
                at += count
            moved.append(new)
        index = to_device(self.features.device, take)[0]
        self.features, self.tokens = self.features.index_select(0, index), self.tokens.index_select(0, index)
        self.size = at
        self.check_at = max(self.MIN_ROWS, 4 * at)
        return moved

    def clear(self) -> None:
        self.features = self.tokens = None
        self.size, self.check_at = 0, self.MIN_ROWS


class EagleDrafter(Drafter):
    """The EAGLE-style head as a drafter. `draft_temperature` tau: the head drafts from its
    distribution at the row's temperature times tau (tau < 1 sharpens it; greedy rows stay greedy).
    Any q is exact under either rule (the match rule ignores q; rejection sampling divides by the q
    the draft came from); tau only moves the acceptance (`python -m respec.lab.draft_temperature`)."""

    runs_ahead = True  # the pending pairs after a verify are the verify's own outputs (`advance`)

    def __init__(self, head: EagleHead, draft_temperature: float = 1.0):
        if draft_temperature <= 0:
            raise ValueError(f"draft temperature must be > 0, got {draft_temperature}")
        self.module = head
        self.draft_temperature = draft_temperature
        self.feature_layers = tuple(head.cfg.feature_layers)
        t = head.cfg.target
        self.pool_shape = (1, t.num_kv_heads, t.head_dim)
        # seq id -> its pending pairs, as spans (start, count) of `log`: a plain step appends one,
        # and they are gathered only when read (`_laid_out`, all rows at once), so a row that stays
        # off SD for hundreds of steps costs a step one tuple, not a copy of everything pending
        self.log = PairLog()
        self.pending: dict[int, list[tuple[int, int]]] = {}
        self.pending_start: dict[int, int] = {}  # seq id -> position of the first pending token
        self.consumed: set[int] = set()  # seq ids whose pending pairs the last draft consumed
        self._sampling = None  # (the rows' sampling parameters, the same at the head's temperature)

    def check(self, target) -> None:
        check_eagle_fits(target, self.module)

    def describe(self) -> str:
        return json.dumps(self.module.cfg.to_json(), sort_keys=True)

    def on_prefill(self, seqs, tokens, positions, valid, block_tables, taps, first_tokens) -> None:
        """The prompt's pairs (feature of position j-1, token j), j = 0..L-1 (a zero feature before
        the first token), and the first sampled token's, wait in the log with the row's others: the
        head consumes them in the first step it drafts the row in (`catch_up`), so a row SD never
        turns on for (a rollout whose batch never shrinks to where SD pays) costs the head no
        forward over its prompt. One copy for the batch (row i's pairs at i * (T + 1))."""
        B, T = tokens.shape
        features = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:B]], dim=1)  # (B, T + 1, F)
        pairs = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)
        pairs.scatter_(1, valid.long().sum(1, keepdim=True), first_tokens[:B].view(B, 1).to(pairs.dtype))
        at = self.log.append(features.reshape(B * (T + 1), -1), pairs.reshape(-1))
        for i, s in enumerate(seqs):
            self.pending[s.id], self.pending_start[s.id] = [(at + i * (T + 1), len(s.tokens) + 1)], 0

    def on_decode(self, seqs, taps, next_tokens) -> None:
        """The head will need (feature of the input token, the token sampled after it)."""
        at = self.log.append(taps[: len(seqs)], next_tokens[: len(seqs)])
        for i, s in enumerate(seqs):
            self.pending[s.id].append((at + i, 1))
        self._reclaim()

    def _reclaim(self) -> None:
        """Compact the log once it has grown past what the rows hold several times over."""
        if self.log.size >= self.log.check_at:
            ids = list(self.pending)
            for i, spans in zip(ids, self.log.compact([self.pending[i] for i in ids])):
                self.pending[i] = spans

    @staticmethod
    def _count(spans: list) -> int:
        """Pairs in a row's spans."""
        return sum(count for _, count in spans)

    def _laid_out(self, rows: list[tuple[list, int]], batch: int, width: int) -> tuple:
        """Rows' pairs as (features (batch, width, 3d), tokens, positions, valid (batch, width)),
        right-padded to `width`; `rows`: each real row's spans of the log and the position of its
        first pair, then `batch - len(rows)` padding rows (one zero pair at position 0). Padding sits
        at the row's first pending position and is not written (valid False), so no lookup goes past
        the row's block table. All rows at once: the host lists which pair of the log each slot
        takes (the zero pair where a row has fewer), sent in one copy; the device gathers them
        (`index_select`), a few kernels a step whatever the rows."""
        index, positions, valid = [], [], []
        ones, zeros, pad = [1] * width, [0] * width, [PairLog.ZERO] * width
        for spans, start in rows:
            if len(spans) == 1:  # (a row that drafted last step: its verified pairs, one span)
                first, m = spans[0]
                index += range(first, first + m)
            else:
                m = 0
                for first, count in spans:
                    index += range(first, first + count)
                    m += count
            index += pad[m:]
            positions.append([*range(start, start + m), *[start] * (width - m)])
            valid.append(ones[:m] + zeros[m:])
        index += pad * (batch - len(rows))
        positions += [zeros] * (batch - len(rows))
        valid += [ones[:1] + zeros[1:]] * (batch - len(rows))
        index, positions, valid = to_device(self.view.device, index, positions, valid)
        taps, tokens = self.log.features.index_select(0, index), self.log.tokens.index_select(0, index)
        return taps.view(batch, width, -1), tokens.view(batch, width), positions, valid != 0

    def catch_up(self, seqs, k: int) -> None:
        """Consume all but the newest pending pair (the SD step consumes that) of the rows with more
        than k+1 pending (SD was off for a while): one eager, right-padded forward."""
        behind = [s for s in seqs if self._count(self.pending[s.id]) > k + 1]
        if not behind:
            return
        rows = []
        for s in behind:  # the row's pairs but its newest
            spans, start = self.pending[s.id], self.pending_start[s.id]
            first, count = spans[-1]
            older = spans[:-1] + ([(first, count - 1)] if count > 1 else [])
            rows.append((older, start))
            self.pending[s.id] = [(first + count - 1, 1)]
            self.pending_start[s.id] = start + self._count(older)
        width = max(self._count(pairs) for pairs, _ in rows)
        taps, tokens, positions, valid = self._laid_out(rows, len(rows), width)
        kv = PagedKV.build(self.view.draft_pools, self.view.tables(behind), positions, self.runner.n_rep, valid=valid)
        self.runner(self.runner.project(taps), tokens, positions, self.view.target.embed_tokens, kv.layer(0))

    def draft(self, batch: DraftBatch) -> Drafts:
        return self.draft_ahead(batch, self.ahead_state(batch))

    def ahead_state(self, batch: DraftBatch) -> tuple:
        """The rows' pending pairs laid out (`_laid_out`, k+1 wide): (features, tokens, positions, valid),
        which the drafts from it consume."""
        self.consumed = {s.id for s in batch.seqs}
        return self._laid_out([(self.pending[s.id], self.pending_start[s.id]) for s in batch.seqs],
                              batch.tokens.shape[0], batch.k + 1)

    def draft_ahead(self, batch: DraftBatch, state: tuple) -> Drafts:
        step = self.view.steps.get(eagle_draft, k=batch.k, use_filter=batch.use_filter, coupled=batch.coupled)
        drafts, q = step(self.runner, self.view.target, self.view.draft_pools, *state, batch.positions,
                         batch.block_tables, batch.max_drafts, *self._head_sampling(batch.sampling))
        return Drafts(drafts, batch.max_drafts, q)

    def _head_sampling(self, sampling):
        """The rows' sampling parameters at the rollout temperature times the head's own factor; made
        once for the rows' parameters (the engine's object for as long as its rows stay the same)."""
        if self.draft_temperature == 1:
            return sampling
        if self._sampling is None or self._sampling[0] is not sampling:
            self._sampling = (sampling, sampling._replace(temperature=sampling.temperature * self.draft_temperature))
        return self._sampling[1]

    def advance(self, state: tuple, tokens, positions, valid, taps) -> tuple:
        """The verified pairs the head has not seen, as `commit` keeps them: pair j is (the target's
        feature at the verify's position j, token j emitted after it), valid up to the newest; the
        slots past it are not written (they sit at the row's first pair's position)."""
        return taps, tokens, positions, valid

    def commit(self, seqs, n, tokens, taps) -> None:
        """The verified pairs the head has not seen: up to the newest token (after the pairs still
        pending where it did not draft this step)."""
        width = tokens.shape[1]  # k + 1: row i's pairs start at i * width in the log
        at = self.log.append(taps.reshape(-1, taps.shape[-1]), tokens.reshape(-1))
        pending, starts, consumed = self.pending, self.pending_start, self.consumed
        for s, first, m in zip(seqs, range(at, at + width * len(seqs), width), n):
            if s.id in consumed:
                pending[s.id] = [(first, m + 1)]
                starts[s.id] = len(s.tokens) - 1 - m
            else:
                pending[s.id].append((first, m + 1))
        self.consumed = set()
        self._reclaim()

    def forget(self, seq) -> None:
        self.pending.pop(seq.id, None)
        self.pending_start.pop(seq.id, None)
        if not self.pending:  # no row left: the log's memory goes back
            self.log.clear()
