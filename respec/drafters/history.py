"""A model-free drafter: propose what followed the same words before.

For each row, find the longest suffix of its latest tokens (up to `max_match` tokens, at least
`min_match`) that occurred earlier in the text it can see, and propose the tokens that followed
that occurrence. What a row can see is everything RL generates for the same prompt:
  * its prompt and its own text so far,
  * its group siblings' text (the G samples of one prompt decode together),
  * earlier rollouts of the same prompt (a dataset that cycles over epochs), the last `window`.
Serving engines have only the first; the last two are what RL has on top (SuffixDecoding, arXiv
2411.04975; DAS, arXiv 2511.13841).

Drafting costs no forward: a few dictionary lookups per row (`SuffixIndex`: the latest place of
the longest match, found from where its last three tokens occurred). The index is updated
incrementally as text arrives (`catch_up`, four writes per token), and rebuilt for a prompt only
when `window` documents have left it.

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

from respec.drafters import DraftBatch, Drafter, Drafts, history_ahead


def _place(doc: int, end: int) -> int:
    """A place in the index, packed: document `doc`, the token after an n-gram at `end`."""
    return doc << 32 | end


def _unplace(place: int) -> tuple[int, int]:
    """(document, end) of a packed place."""
    return place >> 32, place & 0xFFFFFFFF


def _key(tokens: list[int]) -> int:
    """A few tokens (at most 3: the 1-, 2- and 3-gram maps) packed into one int, as `extend` writes them."""
    key = 0
    for t in tokens:
        key = key << 32 | t
    return key


class SuffixIndex:
    """Where the suffixes of a prompt's documents occurred with a continuation. Documents are token
    lists that only grow; every document starts with the same `shared` tokens (the prompt).

    Written per token as the text arrives (`extend`):
      * `full`: each max_n-gram -> the latest place after it;
      * `single`, `pair`: each token and each 2-gram (packed into an int) -> the latest place after it;
      * `places`: each 3-gram (packed) -> every place after it, oldest first.
    A lookup (`propose`) asks `full` for the text's last max_n tokens; failing that, it walks the
    newest `scan` places of its last 3 tokens, newest first, and extends each match backwards token
    by token, keeping the longest (the newest of equals); failing that, the latest place of its last
    2 tokens, then of its last one. That is the longest suffix seen (up to max_n) at its latest
    place, as long as it is max_n or at most 2 tokens long, or among the last `scan` occurrences of
    its last three: four writes per token instead of one per n-gram length (8), in about half the
    memory. The prompt is indexed once, with the first document: a later document starts after it,
    where its own text begins to differ."""

    def __init__(self, max_n: int, shared: int = 0, scan: int = 32):
        if max_n < 3:
            raise ValueError(f"max_n must be >= 3, got {max_n}")
        self.max_n, self.shared, self.scan = max_n, shared, scan
        self.docs: dict[int, list[int]] = {}
        self.indexed: dict[int, int] = {}  # doc -> tokens whose n-grams ending before them are indexed
        self.full: dict[tuple[int, ...], int] = {}
        self.single: dict[int, int] = {}
        self.pair: dict[int, int] = {}
        self.places: dict[int, array] = {}
        self.prompt_indexed = False  # the `shared` prefix indexed (by the first document)

    def extend(self, doc: int, tokens: list[int]) -> None:
        """Document `doc` is now `tokens` (a prefix of it was given before)."""
        self.docs[doc] = tokens
        start = self.indexed.get(doc)
        if start is None:  # a new document: its prompt's n-grams are there already, but for the first
            start = max(self.shared, 1) if self.prompt_indexed else 1
        full, single, pair, places, at, n = self.full, self.single, self.pair, self.places, _place(doc, 0), self.max_n
        for end in range(start, len(tokens)):  # tokens[end] continues every n-gram ending at end - 1
            key = tokens[end - 1]
            single[key] = at | end
            if end >= 2:
                key |= tokens[end - 2] << 32
                pair[key] = at | end
                if end >= 3:
                    key |= tokens[end - 3] << 64
                    seen = places.get(key)
                    if seen is None:
                        places[key] = array("q", (at | end,))
                    else:
                        seen.append(at | end)
                    if end >= n:
                        full[tuple(tokens[end - n: end])] = at | end
        self.indexed[doc] = max(start, len(tokens))
        self.prompt_indexed = self.prompt_indexed or len(tokens) >= self.shared

    def note(self, doc: int, tokens: list[int]) -> None:
        """Document `doc` is now `tokens`, not indexed yet (`catch_up` indexes it)."""
        self.docs[doc] = tokens

    def catch_up(self) -> None:
        """Index what every document gained since it was last indexed, document by document."""
        for d, t in list(self.docs.items()):
            if self.indexed.get(d, -1) < len(t):
                self.extend(d, t)

    def keep_only(self, docs: list[int], index: bool = True) -> None:
        """Drop every document not in `docs` and re-index the rest (in the given order, oldest first,
        so the latest occurrence still wins; not `index`: only noted, for `catch_up`)."""
        kept = [(d, self.docs[d]) for d in docs]
        self.docs, self.indexed, self.full, self.single, self.pair, self.places = {}, {}, {}, {}, {}, {}
        self.prompt_indexed = False
        for d, t in kept:
            self.extend(d, t) if index else self.note(d, t)

    def propose(self, doc: int, min_n: int, limit: int) -> tuple[list[int], int]:
        """The continuation (at most `limit` tokens) of the longest suffix of `doc` (>= min_n tokens)
        seen before, and that suffix's length; ([], 0) if there is none. A continuation that runs
        into the end of its document (a loop in the row's own text, say) is extended by matching
        again on the text plus the proposal so far."""
        text, out, first = self.docs[doc], [], 0
        tail = text[-self.max_n:]  # all a lookup reads (suffixes of at most max_n): no copy of the text
        while len(out) < limit:
            more, n = self._continuation(tail + out if out else tail, min_n, limit - len(out))
            if not more:
                break
            out, first = out + more, first or n
        return out, first

    def _after(self, place: int, limit: int) -> list[int]:
        doc, end = _unplace(place)
        return self.docs[doc][end: end + limit]

    def _before(self, place: int, n: int) -> list[int]:
        doc, end = _unplace(place)
        return self.docs[doc][end - n: end]

    def _continuation(self, tokens: list[int], min_n: int, limit: int) -> tuple[list[int], int]:
        """What followed the longest match of a suffix of `tokens` (at most max_n of them)."""
        L = len(tokens)
        if L >= self.max_n:
            place = self.full.get(tuple(tokens[L - self.max_n:]))
            if place is not None:
                return self._after(place, limit), self.max_n
        if L >= 3:
            seen = self.places.get(_key(tokens[-3:]))
            if seen is not None:  # (no match is max_n long now)
                best, best_n, most, docs = 0, 0, min(self.max_n - 1, L), self.docs
                for i in range(len(seen) - 1, max(len(seen) - self.scan, 0) - 1, -1):
                    place = seen[i]
                    text, end, n = docs[place >> 32], place & 0xFFFFFFFF, 3  # (`_unplace`, inline in the scan)
                    while n < most and n < end and text[end - 1 - n] == tokens[L - 1 - n]:
                        n += 1
                    if n > best_n:
                        best, best_n = place, n
                        if n == most:
                            break
                if best_n >= min_n:
                    return self._after(best, limit), best_n
                return [], 0  # (a 3-token match was the longest, and it is too short)
        if L >= 2 and min_n <= 2:
            place = self.pair.get(_key(tokens[-2:]))
            if place is not None:
                return self._after(place, limit), 2
        if L >= 1 and min_n <= 1:
            place = self.single.get(tokens[-1])
            if place is not None:
                return self._after(place, limit), 1
        return [], 0

    def spans(self) -> dict:
        """The maps as places (packed ints, `_place`): the n-grams are read back from the documents."""
        places = array("q")
        for seen in self.places.values():
            places.append(len(seen))
            places.extend(seen)
        return {"full": array("q", self.full.values()).tobytes(),
                "single": array("q", self.single.values()).tobytes(), "pair": array("q", self.pair.values()).tobytes(),
                "places": places.tobytes(), "shared": self.shared, "prompt_indexed": self.prompt_indexed}

    def load_spans(self, saved: dict) -> None:
        self.shared, self.prompt_indexed = saved["shared"], saved["prompt_indexed"]
        full, single, pair, places = (array("q") for _ in range(4))
        full.frombytes(saved["full"])
        single.frombytes(saved["single"])
        pair.frombytes(saved["pair"])
        places.frombytes(saved["places"])
        for place in full:
            self.full[tuple(self._before(place, self.max_n))] = place
        for place in single:
            self.single[_key(self._before(place, 1))] = place
        for place in pair:
            self.pair[_key(self._before(place, 2))] = place
        i = 0
        while i < len(places):  # each 3-gram's count, then its places
            n = places[i]
            self.places[_key(self._before(places[i + 1], 3))] = places[i + 1: i + 1 + n]
            i += 1 + n


class HistoryDrafter(Drafter):
    kind = "history"

    def __init__(self, *, max_match: int = 8, min_match: int = 2, window: int = 32, max_prompts: int = 4096,
                 ahead: bool | None = None):
        self.ahead = ahead  # SD steps run ahead, matched on the device (None: on a GPU, `attach`)
        self.max_match = max_match  # longest suffix looked up (tokens)
        self.min_match = min_match  # shortest suffix worth proposing from
        self.window = window  # finished rollouts kept per prompt
        self.max_prompts = max_prompts  # prompts kept (least recently used dropped first)
        self.index: OrderedDict[tuple[int, ...], SuffixIndex] = OrderedDict()  # prompt -> its documents
        self.past: dict[tuple[int, ...], list[int]] = {}  # prompt -> finished documents, oldest first
        # live seq id -> (prompt, document, the prompt's index): a step finds a row's index without
        # building and hashing its prompt again (a tuple of a hundred tokens, twice a row a step)
        self.doc: dict[int, tuple[tuple[int, ...], int, SuffixIndex]] = {}
        self.crowded: set[tuple[int, ...]] = set()  # prompts due for a rebuild (too many evicted documents)
        self.store = None  # the documents on the device, for runs ahead (history_ahead.py `DocStore`)
        self.behind: set[tuple[int, ...]] = set()  # prompts whose documents were noted, not indexed (`on_device`)
        self.changes = 0  # times a prompt's set of documents changed (one added or dropped; `history_ahead.Laid`)
        self.next_doc = 0

    @property
    def runs_ahead(self) -> bool:
        return bool(self.ahead)

    @property
    def on_device(self) -> bool:
        """Every SD step matched on the device, where this drafter runs ahead and so does its engine:
        the runs, and the steps taken one by one between them (from the same documents there, laid
        out again by what they gained). The host index then only notes the documents; its maps are
        written when read (`proposals`, `state_dict`), document by document (not in the order the
        rows' text arrived: where the engine stops running ahead, the host proposes from them)."""
        return bool(self.ahead) and getattr(self, "view", None) is not None and self.view.runs_ahead()

    def attach(self, view) -> None:
        super().attach(view)
        if self.ahead is None:
            self.ahead = view.device.type == "cuda"

    def ahead_state(self, batch: DraftBatch):
        """The rows' documents on the device, for a run of SD steps matched there
        (respec/drafters/history_ahead.py); after `catch_up`."""
        return history_ahead.lay_out(self, batch)

    def draft_ahead(self, batch: DraftBatch, state) -> Drafts:
        return history_ahead.draft(self, batch, state)

    def advance(self, state, tokens, positions, valid, taps):
        return history_ahead.advance(self, state, tokens, positions, valid)

    def ran_ahead(self, seqs) -> None:
        if self.store is not None:
            self.store.ran([self.doc[s.id][1] for s in seqs], [len(s.tokens) for s in seqs])

    def _index_of(self, s) -> SuffixIndex:
        key = tuple(s.prompt)
        if key not in self.index:
            self.index[key] = SuffixIndex(self.max_match, len(s.prompt))
            self.past[key] = []
            if len(self.index) > self.max_prompts:
                old, _ = self.index.popitem(last=False)
                del self.past[old]
        self.index.move_to_end(key)
        return self.index[key]

    def catch_up(self, seqs, k: int) -> None:
        """Index whatever the rows emitted since the last step (new rows: their prompt and text)."""
        lazy = self.on_device
        for key in self.crowded:  # prompts with `window` evicted documents piled up: rebuild once
            if key in self.index:
                past = self.past[key]
                del past[: len(past) - self.window]
                live = [d for p, d, _ in self.doc.values() if p == key]
                self.index[key].keep_only(sorted(past + live), index=not lazy)
                self.changes += 1
                if lazy:
                    self.behind.add(key)
        self.crowded.clear()
        touched = set()  # the prompts marked as used this step (once each, not once a row)
        for s in seqs:
            live = self.doc.get(s.id)
            if live is None:
                live = self.doc[s.id] = (tuple(s.prompt), self.next_doc, self._index_of(s))
                self.next_doc += 1
                self.changes += 1
            key, doc, index = live
            if id(index) not in touched:
                touched.add(id(index))
                self.index.move_to_end(key)
                if lazy:
                    self.behind.add(key)
            if lazy:
                index.note(doc, s.tokens)
            else:
                index.extend(doc, s.tokens)

    def _index_behind(self) -> None:
        """Index the documents `catch_up` only noted."""
        for key in self.behind:
            if key in self.index:
                self.index[key].catch_up()
        self.behind.clear()

    def proposals(self, seqs, caps: list[int]) -> list[tuple[list[int], int]]:
        """Each row's (proposal of at most `caps[i]` tokens, length of the suffix it matched)."""
        if self.behind:
            self._index_behind()
        doc = self.doc
        return [doc[s.id][2].propose(doc[s.id][1], self.min_match, cap) if cap else ([], 0)
                for s, cap in zip(seqs, caps)]

    def offers(self, seqs, caps: list[int], min_match: int) -> list[list[int]]:
        """Each row's proposal where its suffix match is at least `min_match` tokens long and its
        continuation fills the row's draft length (what a hybrid drafter takes over a model's), else []."""
        return [prop if match >= min_match and len(prop) == cap else []
                for (prop, match), cap in zip(self.proposals(seqs, caps), caps)]

    def draft(self, batch: DraftBatch) -> Drafts:
        if self.on_device:  # (the lengths read back: the engine decodes plainly where none proposed)
            out = self.draft_ahead(batch, self.ahead_state(batch))
            out.lengths_list = out.lengths[: len(batch.seqs)].tolist()
            return out
        return Drafts.proposed([prop for prop, _ in self.proposals(batch.seqs, batch.max_drafts_list)],
                               batch.tokens.shape[0], batch.k, batch.tokens.device)

    def forget(self, seq) -> None:
        """The sequence's text stays as an earlier rollout of its prompt, whether it finished or was
        preempted (then the readmitted sequence starts a new document: the same prefix twice does no
        harm; the document keeps the text as it was, not the readmitted row's list, which grows).
        A prompt keeps its live documents and its last `window` finished ones: evicted ones
        leave the index once `window` of them have piled up, at the next `catch_up` (so a batch of
        rows finishing together costs one rebuild)."""
        if seq.id not in self.doc:
            return
        key, doc, index = self.doc.pop(seq.id)
        if seq.finish_reason is None and doc in index.docs:
            index.docs[doc] = list(index.docs[doc])
        if key in self.past:
            self.past[key].append(doc)
            if len(self.past[key]) >= 2 * self.window:
                self.crowded.add(key)

    def state_dict(self) -> dict:
        """Every prompt's documents and index as they are, least recently used prompt first. The
        maps are kept, not rebuilt from the documents on loading: which occurrence an n-gram points
        to depends on the order the rows' text arrived in, and a rebuilt one would propose
        differently. Each entry is a place in a document (`SuffixIndex.spans`), not the n-gram
        itself. (After a Ctrl-C that abandons a rollout, its partial text is history too.)"""
        self._index_behind()
        prompts = []
        for key, index in self.index.items():
            prompts.append({"prompt": list(key), "docs": {doc: list(t) for doc, t in index.docs.items()},
                            "indexed": dict(index.indexed), "past": list(self.past[key]), **index.spans()})
        return {"prompts": prompts, "crowded": sorted(self.crowded), "next_doc": self.next_doc}

    def load_state_dict(self, state: dict) -> None:
        """(A state saved before the index took its present form, one map per n-gram length, is
        re-indexed from its documents, oldest first.)"""
        self.index.clear()
        self.past.clear()
        self.doc.clear()
        self.store = None  # (its document numbers are the saved state's now)
        self.behind.clear()
        for saved in state.get("prompts", []):
            key, index = tuple(saved["prompt"]), SuffixIndex(self.max_match, len(saved["prompt"]))
            index.docs, index.indexed = {doc: list(t) for doc, t in saved["docs"].items()}, dict(saved["indexed"])
            if "places" in saved:
                index.load_spans(saved)
            else:
                index.keep_only(sorted(index.docs))
            self.index[key], self.past[key] = index, list(saved["past"])
        self.crowded = {tuple(key) for key in state.get("crowded", [])}
        self.next_doc = state.get("next_doc", 0)
