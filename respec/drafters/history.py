"""A model-free drafter: propose what followed the same words before.

For each row, find the longest suffix of its latest tokens (up to `max_match` tokens, at least
`min_match`) that occurred earlier in the text it can see, and propose the tokens that followed
that occurrence. What a row can see is everything RL generates for the same prompt:
  * its prompt and its own text so far,
  * its group siblings' text (the G samples of one prompt decode together),
  * earlier rollouts of the same prompt (a dataset that cycles over epochs), the last `window`.
Serving engines have only the first; the last two are what RL has on top (SuffixDecoding, arXiv
2411.04975; DAS, arXiv 2511.13841).

Drafting costs no forward: one dictionary lookup per suffix length per row. The index maps every
n-gram (n = 1..max_match) to the latest place it occurred with a continuation; it is updated
incrementally as text arrives (`catch_up`), and rebuilt for a prompt only when `window` documents
have left it.

The draft is deterministic: q is a point mass on the proposal (`Drafts.q` is None), so a draft d
is accepted with probability p(d) and a rejection resamples from p with d removed
(respec/speculative.py). That caps acceptance at the target's max p per position, whatever the
drafter: on high-entropy text (a small model at temperature 1) it pays little; it pays where text
repeats. How many tokens a row proposes (its match's continuation, capped) is known before
drafting, as exactness requires. Unlike a model drafter, the proposals depend on the siblings'
text so far, so a row's sampled tokens (not their distribution) depend on what shares its batch.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from respec.drafters import DraftBatch, Drafter, Drafts


class SuffixIndex:
    """The n-grams (n = 1..max_n) of a prompt's documents, each mapped to the latest (document,
    position) that continued it. Documents are token lists that only grow."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.docs: dict[int, list[int]] = {}
        self.indexed: dict[int, int] = {}  # doc -> tokens whose n-grams ending before them are indexed
        self.latest: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (doc, position after it)

    def extend(self, doc: int, tokens: list[int]) -> None:
        """Document `doc` is now `tokens` (a prefix of it was given before)."""
        self.docs[doc] = tokens
        start, latest = self.indexed.get(doc, 1), self.latest
        for end in range(start, len(tokens)):  # tokens[end] continues every n-gram ending at end - 1
            last, at = tuple(tokens[max(0, end - self.max_n): end]), (doc, end)  # (its n-grams: suffixes of it)
            for n in range(1, len(last) + 1):
                latest[last[-n:]] = at
        self.indexed[doc] = max(start, len(tokens))

    def keep_only(self, docs: list[int]) -> None:
        """Drop every document not in `docs` and re-index the rest (in the given order, oldest first,
        so the latest occurrence still wins)."""
        kept = [(d, self.docs[d]) for d in docs]
        self.docs, self.indexed, self.latest = {}, {}, {}
        for d, t in kept:
            self.extend(d, t)

    def propose(self, doc: int, min_n: int, limit: int) -> tuple[list[int], int]:
        """The continuation (at most `limit` tokens) of the longest suffix of `doc` (>= min_n tokens)
        seen before, and that suffix's length; ([], 0) if there is none. A continuation that runs
        into the end of its document (a loop in the row's own text, say) is extended by matching
        again on the text plus the proposal so far."""
        text, out, first = self.docs[doc], [], 0
        tail = text[-self.max_n:]  # all a lookup reads (suffixes of at most max_n): no copy of the text
        while len(out) < limit:
            more, n = self._continuation(tail + out if out else text, min_n, limit - len(out))
            if not more:
                break
            out, first = out + more, first or n
        return out, first

    def _continuation(self, tokens: list[int], min_n: int, limit: int) -> tuple[list[int], int]:
        for n in range(min(self.max_n, len(tokens)), min_n - 1, -1):
            hit = self.latest.get(tuple(tokens[len(tokens) - n:]))
            if hit is not None:
                src, pos = hit
                return self.docs[src][pos: pos + limit], n
        return [], 0


class HistoryDrafter(Drafter):
    kind = "history"

    def __init__(self, *, max_match: int = 8, min_match: int = 2, window: int = 32, max_prompts: int = 4096):
        self.max_match = max_match  # longest suffix looked up (tokens)
        self.min_match = min_match  # shortest suffix worth proposing from
        self.window = window  # finished rollouts kept per prompt
        self.max_prompts = max_prompts  # prompts kept (least recently used dropped first)
        self.index: OrderedDict[tuple[int, ...], SuffixIndex] = OrderedDict()  # prompt -> its documents
        self.past: dict[tuple[int, ...], list[int]] = {}  # prompt -> finished documents, oldest first
        self.doc: dict[int, tuple[tuple[int, ...], int]] = {}  # live seq id -> (prompt, document)
        self.crowded: set[tuple[int, ...]] = set()  # prompts due for a rebuild (too many evicted documents)
        self.next_doc = 0

    def _index_of(self, s) -> SuffixIndex:
        key = tuple(s.prompt)
        if key not in self.index:
            self.index[key] = SuffixIndex(self.max_match)
            self.past[key] = []
            if len(self.index) > self.max_prompts:
                old, _ = self.index.popitem(last=False)
                del self.past[old]
        self.index.move_to_end(key)
        return self.index[key]

    def catch_up(self, seqs, k: int) -> None:
        """Index whatever the rows emitted since the last step (new rows: their prompt and text)."""
        for key in self.crowded:  # prompts with `window` evicted documents piled up: rebuild once
            if key in self.index:
                past = self.past[key]
                del past[: len(past) - self.window]
                live = [d for p, d in self.doc.values() if p == key]
                self.index[key].keep_only(sorted(past + live))
        self.crowded.clear()
        for s in seqs:
            index = self._index_of(s)
            if s.id not in self.doc:
                self.doc[s.id] = (tuple(s.prompt), self.next_doc)
                self.next_doc += 1
            index.extend(self.doc[s.id][1], s.tokens)

    def proposals(self, batch: DraftBatch) -> list[tuple[list[int], int]]:
        """Each real row's (proposal, length of the suffix it matched)."""
        return [self.index[tuple(s.prompt)].propose(self.doc[s.id][1], self.min_match, cap) if cap else ([], 0)
                for s, cap in zip(batch.seqs, batch.max_drafts_list)]

    def offers(self, batch: DraftBatch, min_match: int) -> list[list[int]]:
        """Each real row's proposal where its suffix match is at least `min_match` tokens long and its
        continuation fills the row's draft length (what a hybrid drafter takes over a model's), else []."""
        return [prop if match >= min_match and len(prop) == cap else []
                for (prop, match), cap in zip(self.proposals(batch), batch.max_drafts_list)]

    def draft(self, batch: DraftBatch) -> Drafts:
        return Drafts.proposed([prop for prop, _ in self.proposals(batch)], batch.tokens.shape[0], batch.k,
                               batch.tokens.device)

    def forget(self, seq) -> None:
        """The sequence's text stays as an earlier rollout of its prompt, whether it finished or was
        preempted (then the readmitted sequence starts a new document: the same prefix twice does no
        harm). A prompt keeps its live documents and its last `window` finished ones: evicted ones
        leave the index once `window` of them have piled up, at the next `catch_up` (so a batch of
        rows finishing together costs one rebuild)."""
        if seq.id not in self.doc:
            return
        key, doc = self.doc.pop(seq.id)
        if key in self.past:
            self.past[key].append(doc)
            if len(self.past[key]) >= 2 * self.window:
                self.crowded.add(key)

    def state_dict(self) -> dict:
        """Every prompt's documents and index as they are, least recently used prompt first. The
        n-gram map is kept, not rebuilt from the documents on loading: which occurrence an n-gram
        points to depends on the order the rows' text arrived in, and a rebuilt one would propose
        differently. Each entry is a span of its document, so it is written as three integers
        (document, end, n), not as the n-gram itself. (After a Ctrl-C that abandons a rollout, its
        partial text is history too.)"""
        prompts = []
        for key, index in self.index.items():
            spans = array("i")  # (doc, end, n) per n-gram: the n-gram is docs[doc][end - n: end]
            for gram, (doc, end) in index.latest.items():
                spans.extend((doc, end, len(gram)))
            prompts.append({"prompt": list(key), "docs": {doc: list(t) for doc, t in index.docs.items()},
                            "indexed": dict(index.indexed), "spans": spans.tobytes(), "past": list(self.past[key])})
        return {"prompts": prompts, "crowded": sorted(self.crowded), "next_doc": self.next_doc}

    def load_state_dict(self, state: dict) -> None:
        self.index.clear()
        self.past.clear()
        self.doc.clear()
        for saved in state.get("prompts", []):
            key, index = tuple(saved["prompt"]), SuffixIndex(self.max_match)
            index.docs, index.indexed = {doc: list(t) for doc, t in saved["docs"].items()}, dict(saved["indexed"])
            spans = array("i")
            spans.frombytes(saved["spans"])
            for i in range(0, len(spans), 3):
                doc, end, n = spans[i: i + 3]
                index.latest[tuple(index.docs[doc][end - n: end])] = (doc, end)
            self.index[key], self.past[key] = index, list(saved["past"])
        self.crowded = {tuple(key) for key in state.get("crowded", [])}
        self.next_doc = state.get("next_doc", 0)
