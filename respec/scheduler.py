"""Which sequences run, and the KV slots they hold: admission, slot reservation (with preemption)
and release, for the rollout engine (respec/engine.py), which only computes.

    admit(waiting, running)           -> the waiting sequences that fit, their prompt blocks allocated
    reserve(waiting, running, caps)   -> the rows that still run, each with its draft cap and slots
                                         for its newest token and those drafts (the newest rows
                                         preempted back to `waiting` while the pool runs dry)
    release(seq)                      -> a finished, preempted or abandoned sequence's blocks and
                                         drafter state go

Preemption is recompute: a preempted sequence keeps its text and is admitted again later, when a
prefill rebuilds its cache (and its drafter's state).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Row:
    """A running sequence in this step, with the most drafts it proposes (0: a plain decode row)."""
    seq: object
    cap: int


class Scheduler:
    def __init__(self, blocks, *, max_batch: int, max_prefill_tokens: int, forget):
        self.blocks = blocks  # respec/kv_cache.py BlockManager
        self.max_batch = max_batch  # most sequences running at once
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens per prefill batch
        self.forget = forget  # the drafter's hook for a sequence that leaves

    def admit(self, waiting: deque, running: list) -> list:
        """Waiting sequences, from the front, while the batch, the prefill budget and the pool have
        room for each one's text plus its first new token (so admission cannot preempt at once)."""
        admitted = []
        while waiting and len(running) + len(admitted) < self.max_batch:
            s = waiting[0]
            n = len(s.tokens)
            longest = max([n] + [len(a.tokens) for a in admitted])
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            if self.blocks.blocks_for(n + 1) > self.blocks.num_free:
                break
            self.blocks.allocate(s.id, n)
            admitted.append(waiting.popleft())
        return admitted

    def reserve(self, waiting: deque, running: list, rows: list[Row]) -> list[Row]:
        """Slots for every row's newest token and its drafts, preempting from the back (the most
        recently admitted) while the pool runs dry; returns the rows that still run (`running` is
        shortened in place, the preempted go back to the front of `waiting`)."""
        rows = list(rows)  # one per running sequence, in the same order
        # (n new slots take at most blocks_for(n + block_size - 1) new blocks: when those fit, nothing to count)
        bound = sum(self.blocks.blocks_for(r.cap + self.blocks.block_size) for r in rows)
        while bound > self.blocks.num_free and \
                sum(self.blocks.extra_blocks(r.seq.id, r.cap + 1) for r in rows) > self.blocks.num_free:
            rows.pop()
            victim = running.pop()
            self.release(victim)  # its drafter state is rebuilt by the prefill that readmits it
            waiting.appendleft(victim)
        self.blocks.append_each([r.seq.id for r in rows], [r.cap + 1 for r in rows])
        return rows

    def release(self, s) -> None:
        self.blocks.free(s.id)
        self.forget(s)
