"""Replay: last epoch's completion of the same prompt and sample as the draft.

RL revisits its prompts every epoch with a policy that moved little. A request may carry an
earlier completion of the same (training-set row, sample): its *replay* (`RolloutEngine.generate`'s
`replays`). While the row's text so far equals the replay's beginning, the drafter proposes the
replay's next tokens; after the first difference it proposes nothing for that row. It costs no
forward and, like every draft, changes no token: the target keeps a draft only where it is the
token plain decoding draws there (respec/speculative.py).

How far a replay is accepted depends on the noise. With the same seed as last time
(`--rollout-seeds per-prompt`, respec/rollout_seeds.py) the new completion equals the old one up
to the first position where the moved policy draws another token: long runs of accepted drafts.
With fresh noise each draft is accepted with the target's probability of it, p(d), as any
deterministic draft.

The proposals are deterministic and known before anything is sampled, so the engine can give
replay rows a longer verify than the model drafter's k (`long_drafts`, the engine's `replay_k`),
apart from the other rows (respec/engine.py).

`ReplayStore` keeps the last completion of every (row, sample) for the trainer: token ids only,
4 bytes per token (1,000 prompts x G = 4 x 64 tokens: 1 MB), the least recently written dropped
past `max_tokens`.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from respec.drafters import DraftBatch, Drafter, Drafts


class ReplayDrafter(Drafter):
    kind = "replay"

    def __init__(self):
        self.matched: dict[int, int] = {}  # seq id -> leading tokens of its text known to equal its replay
        self.diverged: set[int] = set()  # seq ids whose text left their replay

    def _position(self, s) -> int | None:
        """Where the row's text is in its replay (its output's length), or None if it has no replay
        or its text left it. Only the tokens emitted since the last call are compared, and nothing
        of the replay is copied: a step costs what it emitted, not what is left."""
        replay = getattr(s, "replay", None)
        if replay is None or s.id in self.diverged:
            return None
        out, start = s.out, self.matched.get(s.id, 0)
        n = len(out)
        if n > len(replay) or any(replay[i] != out[i] for i in range(start, n)):
            self.diverged.add(s.id)
            return None
        self.matched[s.id] = n
        return n

    def long_drafts(self, seqs) -> list[int]:
        """Tokens each row could propose now (known before drafting): its replay's remaining length."""
        return [0 if (n := self._position(s)) is None else len(s.replay) - n for s in seqs]

    def offers(self, seqs, caps: list[int], min_match: int = 0) -> list[list[int]]:
        """Each row's proposal: its replay's next tokens, at most `caps[i]` (`min_match`, a history
        drafter's threshold, does not apply: a replay is the row's own continuation)."""
        out = []
        for s, cap in zip(seqs, caps):
            n = self._position(s) if cap else None
            out.append([] if n is None else list(s.replay[n: n + cap]))
        return out

    def draft(self, batch: DraftBatch) -> Drafts:
        return Drafts.proposed(self.offers(batch.seqs, batch.max_drafts_list), batch.tokens.shape[0], batch.k,
                               batch.tokens.device)

    def forget(self, seq) -> None:
        self.matched.pop(seq.id, None)
        self.diverged.discard(seq.id)


class ReplayStore:
    """The last completion of each (training-set row, sample), token ids only."""

    def __init__(self, max_tokens: int = 50_000_000):
        self.max_tokens = max_tokens
        self.items: OrderedDict[tuple[int, int], array] = OrderedDict()
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: int, sample: int) -> list[int] | None:
        ids = self.items.get((key, sample))
        return None if ids is None else ids.tolist()

    def put(self, key: int, sample: int, token_ids: list[int]) -> None:
        old = self.items.pop((key, sample), None)
        self.tokens -= 0 if old is None else len(old)
        self.items[(key, sample)] = array("i", token_ids)
        self.tokens += len(token_ids)
        while self.tokens > self.max_tokens and len(self.items) > 1:
            _, dropped = self.items.popitem(last=False)
            self.tokens -= len(dropped)

    def nbytes(self) -> int:
        return 4 * self.tokens

    def state_dict(self) -> dict:
        """For checkpoints: a resumed run drafts from the same replays (its tokens would not differ
        without them, only its speed)."""
        return {"keys": [list(k) for k in self.items], "tokens": [ids.tobytes() for ids in self.items.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        self.tokens = 0
        for (key, sample), raw in zip(state.get("keys", []), state.get("tokens", [])):
            ids = array("i")
            ids.frombytes(raw)
            self.put(int(key), int(sample), ids.tolist())
