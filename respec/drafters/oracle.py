"""Oracle: the target's own continuation as the draft, each token kept with probability `a`.

For the lab, where random weights make any real drafter's acceptance meaningless: SD's mechanics
(draft, a (k+1)-wide verify, rollback) at an acceptance the bench sets. A first plain pass gives
each request its continuation; the SD pass hands it to the engine as the request's replay
(`RolloutEngine.generate(..., replays=)`), with the same seeds. Under the match rule the SD pass
then emits exactly that continuation (a draft is accepted iff it is plain decoding's token, and
plain decoding's tokens are the continuation), and the oracle proposes the continuation's next
tokens from the row's output length. Where a row's text leaves it anyway (in bf16 a wider forward
can round a near tie the other way: docs/benchmarks.md, "Flips in bf16") the oracle proposes
nothing more for that row, as a replay does; the sweep reports whether the tokens stayed equal.

Each position of a row's continuation is drawn once, when the row is first seen: kept with
probability `a`, else replaced by a token drawn uniformly from the vocabulary (which equals the
true one by chance, 1 / V). A draft i is then accepted iff positions 1..i were all kept (or agreed
by chance): tokens per verify at k drafts are sum_{i=0..k} a^i, the controlled acceptance the
oracle sweep (respec/lab/oracle_sweep.py) measures SD's speed at. Proposals are slices of the
row's drawn continuation: no per-step copy of the row's text.
"""

from __future__ import annotations

import torch

from respec.drafters import Drafter
from respec.drafters.replay import ReplayDrafter


class OracleDrafter(ReplayDrafter):
    """A replay drafter (where the row's text is in its continuation, `_position`) that drafts the
    continuation with replaced tokens, at the engine's k (no long verify of its own)."""

    kind = "oracle"
    long_drafts = Drafter.long_drafts  # None: verified at the engine's k, as a model drafter's would be

    def __init__(self, accept: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= accept <= 1.0:
            raise ValueError(f"the oracle's acceptance must be in [0, 1], got {accept}")
        self.accept, self.seed = accept, seed
        self.vocab = 0
        self.drawn: dict[int, list[int]] = {}  # seq id -> its continuation with the replaced tokens

    def describe(self) -> str:
        return f"OracleDrafter(accept={self.accept})"

    def check(self, target) -> None:
        self.vocab = target.cfg.vocab_size

    def _drawn(self, s) -> list[int] | None:
        """The row's continuation as drafted, drawn on first sight (a generator per row: the same
        draw whatever the batch or the order rows are seen in); None without one."""
        if s.id not in self.drawn:
            if getattr(s, "replay", None) is None:
                return None
            truth = torch.tensor(s.replay, dtype=torch.int64)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + s.id)
            kept = torch.rand(len(truth), generator=g) < self.accept
            noise = torch.randint(0, self.vocab, (len(truth),), generator=g)
            self.drawn[s.id] = torch.where(kept, truth, noise).tolist()
        return self.drawn[s.id]

    def offers(self, seqs, caps: list[int], min_match: int = 0) -> list[list[int]]:
        out = []
        for s, cap in zip(seqs, caps):
            n = self._position(s) if cap else None
            out.append([] if n is None else self._drawn(s)[n: n + cap])
        return out

    def forget(self, seq) -> None:
        super().forget(seq)
        self.drawn.pop(seq.id, None)
