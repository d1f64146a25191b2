"""The drafter interface and its kinds: the history drafter's index, greedy SD token-identical and
sampled SD lossless with it (mixed per-row draft lengths and sampling settings in one batch), and
the engine's per-row bookkeeping (late admission, per-row draft caps, acceptance counts, EOS)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.decoder import PRESETS
from models.drafter import truncated_drafter
from models.loading import random_model
from respec.drafters.wrap import as_drafter
from respec.drafters.history import HistoryDrafter, SuffixIndex
from respec.drafters.hybrid import HybridDrafter
from respec.drafters.layers import LayerDrafter
from respec.engine import RolloutEngine, SamplingParams
from respec.paged_attention import PagedKV
from respec.solver import AdaptiveK, CostModel, Policy, conditional_acceptance
from tests.test_eagle import head_for
from tests.test_speculative import SHARPEN, SMALL, chi2_quantile_999, chi_square, exact_sequence_probs


def measured_alpha(stats) -> list[float]:
    """The engine's per-position conditional acceptance (respec/solver.py)."""
    return conditional_acceptance(stats.sd_accepted_at, stats.sd_reached_at)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, stop_on_eos=False, **kw)


# --- the history drafter's index ---------------------------------------------------------------
def test_suffix_index_proposes_the_continuation_of_the_longest_match():
    index = SuffixIndex(max_n=4)
    index.extend(0, [1, 2, 3, 4, 5, 9, 9])
    index.extend(1, [7, 3, 4, 6, 8])  # a sibling: "3 4" continued by 6 more recently
    index.extend(2, [2, 3, 4])  # the row drafting: its longest seen suffix is "2 3 4" (doc 0)
    assert index.propose(2, min_n=2, limit=3) == ([5, 9, 9], 3)
    assert index.propose(2, min_n=2, limit=1) == ([5], 3)
    index.extend(2, [2, 3, 4, 7])  # "4 7" and "7" were never continued: nothing >= 2 tokens matches
    assert index.propose(2, min_n=2, limit=3) == ([], 0)
    assert index.propose(2, min_n=1, limit=3) == ([3, 4, 6], 1)  # "7" was continued in doc 1
    index.extend(3, [3, 4])
    # the latest "3 4" (doc 2) continues with 7, to its end; "4 7" was never continued, so that is all
    assert index.propose(3, min_n=2, limit=4) == ([7], 2)
    # with single-token matches allowed, the proposal goes on from "7" (continued in doc 1)
    assert index.propose(3, min_n=1, limit=4) == ([7, 3, 4, 6], 2)
    index.keep_only([1, 3])  # docs 0 and 2 leave: "3 4" now continues with 6, from doc 1
    assert index.propose(3, min_n=2, limit=2) == ([6, 8], 2)


def _brute_force_proposal(docs: dict, log: list, doc: int, min_n: int, max_n: int, limit: int):
    """The continuation of the longest suffix of `doc` (min_n..max_n tokens) that occurred with a
    continuation, at its latest place in arrival order (`log`: (doc, end) as indexed), one lookup."""
    text = docs[doc]
    for n in range(min(max_n, len(text)), min_n - 1, -1):
        gram = text[len(text) - n:]
        for src, end in reversed(log):
            if end >= n and docs[src][end - n: end] == gram:
                return docs[src][end: end + limit], n
    return [], 0


@pytest.mark.parametrize("seed", range(3))
def test_suffix_index_finds_the_latest_longest_match_as_a_brute_force_search_does(seed):
    """Documents over a 4-token vocabulary (every suffix recurs) grow a few tokens at a time in
    turn; after each growth every document's proposal (one lookup: `limit` 1) equals the brute-force
    search's whenever the index scans every earlier place of the last 3 tokens; with a short scan
    it is the same where the longest match is at most 2 tokens, and otherwise the continuation of a
    real earlier occurrence of a suffix of the reported length (>= min_n), never longer than the
    longest."""
    gen = torch.Generator().manual_seed(seed)
    exact, short = SuffixIndex(max_n=6, scan=10 ** 9), SuffixIndex(max_n=6, scan=2)
    docs, log, differed = {d: [] for d in range(4)}, [], 0
    for _ in range(150):
        d = int(torch.randint(0, 4, (1,), generator=gen))
        before = len(docs[d])
        docs[d] = docs[d] + torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        log += [(d, end) for end in range(max(before, 1), len(docs[d]))]
        exact.extend(d, docs[d])
        short.extend(d, docs[d])
        for doc in docs:
            if not docs[doc]:
                continue
            for min_n in (1, 2, 4):
                want = _brute_force_proposal(docs, log, doc, min_n, 6, 1)
                assert exact._continuation(docs[doc][-6:], min_n, 1) == want
                got, n = short._continuation(docs[doc][-6:], min_n, 1)
                assert (got, n) == want if want[1] <= 2 else n <= want[1] and (n == 0 or n >= min_n)
                if n:
                    assert any(end >= n and docs[src][end - n: end] == docs[doc][-n:] and docs[src][end: end + 1] == got
                               for src, end in log)
                differed += (got, n) != want
    assert differed > 0  # the short scan was tested where it differs


def device_match_state(seed: int, rows: int = 12, C: int = 16):
    """Random texts over a 3-token vocabulary as `history_ahead.propose` takes them: (texts, docs,
    lengths, seen, left); row i's own text is text i, and it sees its own, some earlier documents
    and some other rows' (oldest first, padded with the last, empty one); rooms 0..6."""
    from respec.drafters.history_ahead import PAD

    gen = torch.Generator().manual_seed(seed)
    rnd = lambda hi: int(torch.randint(0, hi, (1,), generator=gen))  # noqa: E731
    texts = [torch.randint(0, 3, (rnd(C - 4),), generator=gen).tolist() for _ in range(rows + 6)] + [[]]
    docs = torch.full((len(texts), C + 1), PAD, dtype=torch.int64)
    for d, t in enumerate(texts):
        docs[d, : len(t)] = torch.tensor(t, dtype=torch.int64)
    seen = [sorted({i, *[rows + rnd(6) for _ in range(rnd(4))], *[rnd(rows) for _ in range(rnd(3))]}) for i in range(rows)]
    V = max(map(len, seen))
    seen = torch.tensor([m + [len(texts) - 1] * (V - len(m)) for m in seen])
    left = torch.tensor([rnd(7) for _ in range(rows)])
    return texts, docs, torch.tensor([len(t) for t in texts]), seen, left


@pytest.mark.parametrize("seed", range(3))
def test_device_suffix_match_is_a_brute_force_search(seed):
    """The history drafter's match on the device (respec/drafters/history_ahead.py `propose`) against
    a search in Python: rows whose own texts and visible documents (oldest first, the row's own
    among them, padded with an empty one) are random over a 3-token vocabulary; each row proposes
    what followed the place with the longest match of its last tokens (at most max_match, at least
    min_match), the latest of equals (a later document, then a later place), at most min(k, its
    room - 1) tokens and never past that document's end; nothing without such a match, and nothing
    for a padding row (room 0). Power: matches of several lengths, rows with none, proposals cut
    by a document's end and by a room."""
    from respec.drafters.history_ahead import propose

    k, max_match, min_match = 4, 5, 2
    texts, docs, lengths, seen, left = device_match_state(seed)
    rows = seen.shape[0]
    tokens, count = propose(docs, lengths, torch.arange(rows), seen, left, k=k, max_match=max_match, min_match=min_match)
    matched, cut = set(), 0
    for i in range(rows):
        own, best = texts[i], None
        for v, d in enumerate(seen[i].tolist()):
            doc = texts[d]
            for j in range(1, len(doc)):
                m = 0
                while m < max_match and m < j and m < len(own) and doc[j - 1 - m] == own[len(own) - 1 - m]:
                    m += 1
                if m >= min_match and (best is None or (m, v, j) > best[:3]):
                    best = (m, v, j, doc)
        cap = max(0, min(k, int(left[i]) - 1))
        want = [] if best is None else best[3][best[2]: best[2] + cap]
        assert count[i] == len(want) and tokens[i, : len(want)].tolist() == want, i
        matched.add(best[0] if best else 0)
        cut += best is not None and 0 < len(want) < cap
    assert len(matched) >= 3 and 0 in matched and cut > 0 and (left <= 1).any()


def test_device_suffix_match_compiled_equals_eager():
    """The match, the write and the store's update as a run asks `CompiledSteps` for them
    (`own_shapes`: one graph with dynamic shapes; inductor on the CPU) give what the eager functions
    give, at two shapes of the state and two k (the column past the documents, where unused slots
    go, aside)."""
    from compile.policy import CompiledSteps
    from respec.drafters.history_ahead import propose, update, write

    steps = CompiledSteps(eager=False, device=torch.device("cpu"))
    for seed, rows, C in ((0, 12, 16), (1, 7, 40)):
        _, docs, lengths, seen, left = device_match_state(seed, rows, C)
        for k in (3, 4):
            want = propose(docs, lengths, torch.arange(rows), seen, left, k=k, max_match=5, min_match=2)
            got = steps.get(propose, k=k, max_match=5, min_match=2)(docs, lengths, torch.arange(rows), seen, left)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        tokens = torch.randint(0, 3, (rows, 4))
        positions = lengths[:rows].view(rows, 1) + torch.arange(4).view(1, 4)
        valid = torch.arange(4).view(1, 4) <= torch.randint(0, 4, (rows, 1))
        own = torch.arange(rows)
        state = [t.clone() for t in (docs, lengths, left)]
        write(*state[:2], own, state[2], tokens, positions.clamp(max=C - 1), valid)
        compiled = [t.clone() for t in (docs, lengths, left)]
        steps.get(write)(*compiled[:2], own, compiled[2], tokens, positions.clamp(max=C - 1), valid)
        assert torch.equal(compiled[0][:, :C], state[0][:, :C])
        assert all(torch.equal(g, w) for g, w in zip(compiled[1:], state[1:]))
        assert not torch.equal(state[0][:, :C], docs[:, :C]) and not torch.equal(state[1], lengths)  # (the write wrote)
        # the store's update: spans of tokens written, prompts copied, lengths set (as `lay_out` pads them)
        D, cut = docs.shape[0], torch.randint(1, 4, (rows,))
        place, count = torch.randperm(D)[:rows], torch.randint(1, 4, (rows,))
        start = (C - count - 1).clamp(min=0)
        values = torch.randint(3, 9, (int(count.sum()),))
        copy = torch.randperm(D)[:4]
        args = (values, place, start, count, copy[:2], copy[2:], cut[:2], torch.arange(D), torch.randint(0, C, (D,)))
        eager, compiled = [[t.clone() for t in (docs, lengths)] for _ in range(2)]
        update(*eager, *args)
        steps.get(update)(*compiled, *args)
        assert all(torch.equal(g, w) for g, w in zip(compiled, eager)) and not torch.equal(eager[0], docs)


def _laid_out(drafter, seqs, rows: int, left: int = 5):
    """`history_ahead.lay_out` of `seqs` (after `catch_up`) in a batch of `rows`, and each row's own
    text and visible texts as the device holds them (up to each document's length there)."""
    from types import SimpleNamespace

    from respec.drafters.history_ahead import lay_out

    drafter.catch_up(seqs, 3)
    state = lay_out(drafter, SimpleNamespace(seqs=seqs, tokens=torch.zeros(rows), left=torch.full((rows,), left)))
    text = lambda slot: state.docs[slot, : state.lengths[slot]].tolist()  # noqa: E731
    return state, [text(s) for s in state.own.tolist()], [[text(s) for s in m] for m in state.seen.tolist()]


def _holds_what_the_host_holds(drafter, seqs, rows, own, seen) -> bool:
    """Each row's own document on the device is its text; its visible ones are its prompt's documents
    in the host index, oldest first, then empty ones; the padding rows' own and visible ones empty."""
    want_seen = []
    for s in seqs:
        index = drafter.doc[s.id][2]
        want_seen.append([index.docs[d] for d in sorted(index.docs)])
    V = len(seen[0])
    want_seen = [m + [[]] * (V - len(m)) for m in want_seen] + [[[]] * V] * (rows - len(seqs))
    return own == [s.tokens for s in seqs] + [[]] * (rows - len(seqs)) and seen == want_seen


def test_device_store_sends_each_document_once_and_holds_what_the_host_holds():
    """The history drafter's documents on the device (respec/drafters/history_ahead.py `DocStore`):
    after every layout each row's own and visible documents there are what the host index holds,
    while a layout sends only what a document gained since it was last on the device: nothing for a
    document unchanged or written there by a run ahead (`ran_ahead`; a row written past its end
    there, as a row that ended in a run is, cut back to the host's length), a new document's tokens
    after its prompt where a document of that prompt is there, everything for a new prompt's first;
    through the store's growth, its widening and its dropping of documents no layout needs. Power:
    a store told of a run's tokens that were never written on the device holds other texts."""
    from types import SimpleNamespace

    from compile.policy import CompiledSteps
    from respec.drafters.history_ahead import write
    from respec.engine import Sequence

    drafter = HistoryDrafter(ahead=True, min_match=1)
    drafter.view = SimpleNamespace(max_len=512, runs_ahead=lambda: True,  # (the host index only notes the text)
                                   steps=CompiledSteps(eager=True, device=torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (7 + i,), generator=gen).tolist() for i in range(12)]
    ids = iter(range(1000))

    def rows_of(which, group=2, out=3, max_new=20):
        return [Sequence(next(ids), prompts[p], SamplingParams(max_new_tokens=max_new),
                         out=torch.randint(3, 50, (out,), generator=gen).tolist()) for p in which for _ in range(group)]

    seqs = rows_of([0, 1])
    state, own, seen = _laid_out(drafter, seqs, 6)
    store = drafter.store
    assert _holds_what_the_host_holds(drafter, seqs, 6, own, seen)
    assert store.uploaded == len(prompts[0]) + len(prompts[1]) + 4 * 3  # (each prompt once, its siblings copy it)
    _, own, seen = _laid_out(drafter, seqs, 6)
    assert store.uploaded == 0 and store.kept == 4 and _holds_what_the_host_holds(drafter, seqs, 6, own, seen)
    seqs[1].extend([7, 8], [0.0, 0.0])  # (a step taken step by step: the host's text only)
    _, own, seen = _laid_out(drafter, seqs, 6)
    assert store.uploaded == 2 and _holds_what_the_host_holds(drafter, seqs, 6, own, seen)
    # a run ahead: two steps written on the device as its verifies write them; row 0 ends at its
    # first token of the second step (its other tokens there written on the device all the same)
    for step in range(2):
        state = _laid_out(drafter, seqs, 6)[0] if step == 0 else state
        tokens = torch.randint(3, 50, (6, 4), generator=gen)
        positions = state.lengths[state.own].view(6, 1) + torch.arange(4).view(1, 4)
        valid = torch.arange(4).view(1, 4) <= torch.tensor([2, 1, 0, 3, 0, 0]).view(6, 1)
        write(state.docs, state.lengths, state.own, state.left, tokens, positions, valid)
        for i, s in enumerate(seqs):
            kept = tokens[i, : int(valid[i].sum())].tolist()
            s.extend(kept[:1] if (step, i) == (1, 0) else kept, [0.0] * len(kept))
    drafter.ran_ahead(seqs)
    _, own, seen = _laid_out(drafter, seqs, 6)
    assert store.uploaded == 0 and _holds_what_the_host_holds(drafter, seqs, 6, own, seen)
    # no prompt's documents changed since: the last layout's lists serve (`_quick`), for the rows
    # left after row 0 ended (its document cut back to the host's length; the others in new places),
    # for some of them while a row of another batch (row 1) gains tokens, and for them all again
    listed = store.last.row
    drafter.forget(seqs[0])
    _, own, seen = _laid_out(drafter, seqs[1:], 6)
    assert store.uploaded == 0 and _holds_what_the_host_holds(drafter, seqs[1:], 6, own, seen)
    seqs[1].extend([11, 12], [0.0, 0.0])
    _, own, seen = _laid_out(drafter, seqs[2:], 6)
    assert store.uploaded == 2 and _holds_what_the_host_holds(drafter, seqs[2:], 6, own, seen)
    _, own, seen = _laid_out(drafter, seqs[1:], 6)  # (row 1's new tokens there since the layout before)
    assert store.uploaded == 0 and _holds_what_the_host_holds(drafter, seqs[1:], 6, own, seen)
    assert store.last.row is listed and store.kept == 4  # (none laid out anew)
    # the next rollout: the finished documents stay; a new document copies its prompt where one is there
    for s in seqs:
        drafter.forget(s)
    seqs = rows_of([0, 2], out=1)
    _, own, seen = _laid_out(drafter, seqs, 4)
    assert store.uploaded == 2 * 1 + len(prompts[2]) + 2 * 1 and store.kept == 2
    assert _holds_what_the_host_holds(drafter, seqs, 4, own, seen)
    # more documents than slots (the store grows), wider rows (it widens), then other prompts (it drops)
    for s in seqs:
        drafter.forget(s)
    slots, width = store.docs.shape
    for which, max_new in (([0, 3, 4, 5, 6, 7, 8], 80), ([9, 10, 11], 20), ([0], 20)):
        seqs = rows_of(which, group=3, max_new=max_new)
        _, own, seen = _laid_out(drafter, seqs, len(seqs))
        assert _holds_what_the_host_holds(drafter, seqs, len(seqs), own, seen)
        assert store.kept == (4 if max_new == 80 else 0)  # (prompt 0's kept through the growth)
        for s in seqs:
            drafter.forget(s)
    assert store.docs.shape[0] > slots and store.docs.shape[1] > width
    assert len(store.slot) < sum(len(index.docs) for index in drafter.index.values())  # (some dropped)
    # a row preempted (its document kept as it was then, and passed over from then on) and readmitted
    # (a new document, its text growing)
    seqs = rows_of([2], out=2)
    _laid_out(drafter, seqs, 2)
    frozen = list(seqs[0].tokens)
    drafter.forget(seqs[0])  # (not finished)
    for more in ([5, 6], [7]):
        seqs[0].extend(more, [0.0] * len(more))
        _, own, seen = _laid_out(drafter, seqs, 2)
        assert _holds_what_the_host_holds(drafter, seqs, 2, own, seen) and frozen in seen[0]
    # power: a run's tokens the device never saw, the store told they are there
    seqs = rows_of([1], out=2)
    _laid_out(drafter, seqs, 2)
    seqs[0].extend([9, 9], [0.0, 0.0])
    drafter.ran_ahead(seqs)
    _, own, seen = _laid_out(drafter, seqs, 2)
    assert not _holds_what_the_host_holds(drafter, seqs, 2, own, seen)


def test_device_store_lays_out_anew_where_a_prompts_documents_change():
    """The layout that reuses the last one's lists (`history_ahead._quick`) does not where a prompt's
    set of documents changed since: here the rows left after two ended, whose prompt's finished
    documents piled past `window` and were dropped by the host index's rebuild; the device's visible
    documents follow the host's."""
    from types import SimpleNamespace

    from compile.policy import CompiledSteps
    from respec.engine import Sequence

    drafter = HistoryDrafter(ahead=True, min_match=1, window=1)
    drafter.view = SimpleNamespace(max_len=512, runs_ahead=lambda: True,
                                   steps=CompiledSteps(eager=True, device=torch.device("cpu")))
    seqs = [Sequence(i, [5, 6, 7, 8], SamplingParams(max_new_tokens=20), out=[9 + i, 3]) for i in range(3)]
    _laid_out(drafter, seqs, 4)
    for s in seqs[:2]:
        drafter.forget(s)
    _, own, seen = _laid_out(drafter, seqs[2:], 4)
    index = drafter.index[(5, 6, 7, 8)]
    assert sorted(index.docs) == [1, 2]  # (document 0 dropped by the rebuild)
    assert _holds_what_the_host_holds(drafter, seqs[2:], 4, own, seen)


def test_suffix_index_indexes_the_prompt_once():
    """Every document of an index starts with its prompt: the second document indexes only from
    where its text begins (a prompt-internal match still proposes the prompt's continuation; the
    prompt's last tokens propose the latest document's first token), and the state round-trips."""
    prompt = [5, 6, 7, 8, 9]
    index = SuffixIndex(max_n=4, shared=len(prompt))
    index.extend(0, prompt + [1, 2])
    entries = sum(len(p) for p in index.places.values())
    index.extend(1, prompt + [3, 4])
    assert sum(len(p) for p in index.places.values()) == entries + 2  # "8 9 3" and "9 3 4" only
    index.extend(2, [5, 6])  # (a document is its prompt and more: this one only reads)
    index.docs[2] = [5, 6, 7]
    assert index._continuation([5, 6, 7], 2, 3) == ([8, 9, 1], 3)  # the prompt, then doc 0's text
    assert index._continuation([7, 8, 9], 2, 2) == ([3, 4], 3)  # the latest first token: doc 1's
    drafter = HistoryDrafter(max_match=4)
    drafter.index[tuple(prompt)], drafter.past[tuple(prompt)] = index, []
    loaded = HistoryDrafter(max_match=4)
    loaded.load_state_dict(drafter.state_dict())
    again = loaded.index[tuple(prompt)]
    assert (again.full, again.single, again.pair, again.places, again.shared) == (
        index.full, index.single, index.pair, index.places, 5)


def test_history_window_is_bounded():
    """A prompt keeps its live documents and at most 2 x window finished ones."""
    drafter = HistoryDrafter(window=3)
    seq = lambda i, out: type("S", (), {"id": i, "prompt": [1, 2], "out": out, "tokens": [1, 2] + out,  # noqa: E731
                                        "finish_reason": "stop"})()
    for i in range(20):
        s = seq(i, [3, 4, i + 10])
        drafter.catch_up([s], 0)
        index = drafter.index[(1, 2)]
        assert len(index.docs) <= 7 and len(drafter.past[(1, 2)]) <= 6
        drafter.forget(s)
    assert {t[-1] for t in index.docs.values()} >= {27, 28, 29}  # the newest stay


# --- SD with the history drafter -----------------------------------------------------------------
PROMPTS = [[5, 6, 7, 8] * 6, [9, 10, 11] * 4, [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("k", [1, 4])
def test_history_greedy_sd_equals_plain(tiny, k):
    """Greedy SD is token-identical to plain decoding; given one past rollout of the same prompts
    (the same greedy text), the history drafter's drafts are the target's own tokens."""
    prompts = [p for p in PROMPTS for _ in range(3)]  # three siblings per prompt
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(prompts, greedy(30))
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=HistoryDrafter(), num_draft_tokens=k)
    first = engine.generate(prompts, greedy(30))
    assert [g.token_ids for g in first] == [w.token_ids for w in want]
    engine.stats = type(engine.stats)()
    again = engine.generate(prompts, greedy(30))
    assert [g.token_ids for g in again] == [w.token_ids for w in want]
    assert measured_alpha(engine.stats) == [1.0] * k  # the past rollout is the text itself
    assert engine.stats.accept_len > 0.8 * (k + 1)


N_MIXED = 30_000
MIXED = [(1.0, 1.0), (0.7, 0.9)]  # (temperature, top_p), alternating rows of one batch


@pytest.mark.parametrize("kind", ["history", "hybrid"])
def test_sd_sampling_is_lossless_with_mixed_rows(kind):
    """Rows of one batch sample at two settings. `history`: the history drafter proposes 0..k
    tokens per row from its siblings' text (the same prompt). `hybrid`: per row, history point
    masses where the match is long, an independent small model's stochastic drafts elsewhere, in
    the same verify. Each setting's sequences must follow plain sampling's distribution
    (chi-square, with a power check)."""
    target = random_model(SMALL, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(SHARPEN)
    history = HistoryDrafter(min_match=1)
    drafter = history if kind == "history" else HybridDrafter(LayerDrafter(random_model(dataclasses.replace(
        SMALL, num_layers=1), seed=4)), history, min_match=2)
    lengths_seen = set()
    proposals = history.proposals

    def recorded(seqs, caps):
        out = proposals(seqs, caps)
        lengths_seen.update(len(p) for p, _ in out)
        return out

    history.proposals = recorded
    engine = RolloutEngine(target, kv_cache_bytes=256 << 20, block_size=4, max_batch=512, eager=True, drafter=drafter,
                           num_draft_tokens=3)
    # 5 tokens sampled, the first 3 compared (a marginal of the same distribution): after the
    # prefill's token the rows may draft up to 3, so every draft length 0..3 can occur
    prompt, length = [0, 1], 3
    params = [SamplingParams(max_new_tokens=length + 2, temperature=t, top_p=p, seed=i, stop_on_eos=False)
              for i in range(N_MIXED) for t, p in [MIXED[i % 2]]]
    out = engine.generate([prompt] * N_MIXED, params)
    assert engine.stats.sd_steps > 0 and len(lengths_seen - {0}) >= 2  # several draft lengths were proposed
    assert 0.2 < measured_alpha(engine.stats)[0] < 0.95  # drafts are really rejected sometimes
    if kind == "hybrid":  # both kinds of rows really occurred
        assert 0 < engine.stats.sd_kinds.get("history", {}).get("rows", 0) < engine.stats.sd_rows
    for j, (t, p) in enumerate(MIXED):
        probs = exact_sequence_probs(target, t, p, prompt=prompt, length=length)
        counts: dict = {}
        for o in out[j::2]:
            counts[tuple(o.token_ids[:length])] = counts.get(tuple(o.token_ids[:length]), 0) + 1
        n = N_MIXED // 2
        chi2, dof = chi_square(counts, probs, n)
        print(f"{kind}, T={t} top_p={p}: chi2 {chi2:.1f} on {dof} dof, alpha {measured_alpha(engine.stats)}")
        assert chi2 < chi2_quantile_999(dof)
        # power: a 2% bias (2% of the mass moved to one sequence) is rejected
        keys = list(probs)
        biased = torch.tensor([probs[s] for s in keys]) * 0.98
        biased[keys.index(sorted(probs, key=probs.get)[-2])] += 0.02
        draws = torch.multinomial(biased, n, replacement=True, generator=torch.Generator().manual_seed(j))
        fake = {}
        for i in draws.tolist():
            fake[keys[i]] = fake.get(keys[i], 0) + 1
        assert chi_square(fake, probs, n)[0] > chi2_quantile_999(dof)


# --- the engine's per-row bookkeeping ------------------------------------------------------------
class Schedule(Policy):
    """A policy replaying a fixed list of k (then the last one forever)."""

    def __init__(self, ks):
        self.ks, self.calls = list(ks), 0

    def choose(self, batch, context):
        self.calls += 1
        return self.ks[min(self.calls - 1, len(self.ks) - 1)]

    def plain_run(self):
        return 1  # (a k per step: asked at every step)

    def observe(self, *args):
        pass


@pytest.mark.parametrize("kind", ["eagle", "layers"])
def test_sd_turns_on_after_late_admissions(tiny, kind):
    """More requests than --max-batch (admitted at different times, with different prompt lengths)
    and SD off for a while, then on: the drafter's catch-up pads its rows without looking up
    positions past a row's block table; greedy tokens equal plain decoding."""
    prompts = [[3 + i] * (4 + 9 * i) for i in range(4)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, greedy(14))
    drafter = head_for(tiny, 3000) if kind == "eagle" else truncated_drafter(tiny, 1)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, max_batch=2, drafter=drafter,
                           num_draft_tokens=3, policy=Schedule([0] * 10 + [3]))
    got = engine.generate(prompts, greedy(14))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert engine.stats.sd_steps > 0


class RunsThenSpeculates(Schedule):
    """The schedule's plain plans let plain steps run ahead of the host (respec/run_ahead.py)."""

    def plain_run(self):
        return None


def recording_drafts(engine) -> list:
    """Every draft the engine's drafter proposes, as lists of its rows' tokens, in order (a drafter
    whose SD steps run ahead of the host drafts through `draft_ahead`, step by step too)."""
    drafts, name = [], "draft_ahead" if engine.drafter.runs_ahead else "draft"
    draft = getattr(engine.drafter, name)

    def recorded(batch, *state):
        out = draft(batch, *state)
        drafts.append(out.tokens[: len(batch.seqs)].tolist())
        return out
    setattr(engine.drafter, name, recorded)
    return drafts


@pytest.mark.parametrize("kind", ["eagle", "layers"])
def test_sd_turns_on_after_plain_steps_run_ahead(tiny, kind):
    """Plain steps run ahead of the host (the drafter fed each step's features and tokens from the
    device), then SD: the greedy tokens equal plain decoding's, and the drafter proposes exactly
    what it proposes after as many plain steps run one by one (its state is the same; the tokens
    are plain decoding's whatever it drafts, so they alone would not show it)."""
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(PROMPTS, greedy(30))
    drafter = head_for(tiny, 3000) if kind == "eagle" else truncated_drafter(tiny, 1)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                           num_draft_tokens=3, policy=RunsThenSpeculates([0, 3]), run_ahead=12)
    drafts = recording_drafts(engine)
    got = engine.generate(PROMPTS, greedy(30))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert engine.stats.ahead_steps == 12 and engine.stats.sd_steps > 0
    steps = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                          num_draft_tokens=3, policy=Schedule([0] * 12 + [3]), run_ahead=0)
    drafts_steps = recording_drafts(steps)
    steps.generate(PROMPTS, greedy(30))
    assert steps.stats.ahead_steps == 0 and len(drafts) == len(drafts_steps) >= 3
    assert drafts == drafts_steps
    assert len({t for d in drafts for row in d for t in row}) >= 3  # (drafts that say something)


@pytest.mark.parametrize("compacted", [False, True])
def test_eagle_drafts_are_the_heads_prediction_from_the_whole_text(tiny, monkeypatch, compacted):
    """Each SD step's first draft is what the head predicts after one causal pass over the row's
    whole text (the pairs of the target's feature before each token and the token: `ttt_layer` with
    one step, over a forward of the target on the text), whatever mix of prefill, plain steps (run
    ahead and one by one) and verifies fed its pending pairs; with the pair log compacted as often
    as it can be (`PairLog.MIN_ROWS` = 1) and never. The tokens are plain decoding's whatever the
    drafts, so only the drafts show a pair out of place."""
    from respec.distill import ttt_layer
    from respec.drafters import eagle

    import respec.sd_ahead

    monkeypatch.setattr(eagle.PairLog, "MIN_ROWS", 1 if compacted else 1 << 40)
    # SD steps one by one, each draft seen with its row's text as it is then (the head's drafts in SD
    # steps run ahead of the host are those of SD steps one by one: tests/test_sd_ahead.py)
    monkeypatch.setattr(respec.sd_ahead, "runs_ahead", lambda engine, groups, room, seqs: 0)
    compactions = []
    compact = eagle.PairLog.compact
    monkeypatch.setattr(eagle.PairLog, "compact", lambda log, spans: compactions.append(1) or compact(log, spans))
    head = head_for(tiny, 3000)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=head, num_draft_tokens=3,
                           policy=RunsThenSpeculates([0, 3, 0, 0, 3, 3, 0, 2, 3]), run_ahead=3)
    seen, draft = [], engine.drafter.draft

    def recorded(batch):
        out = draft(batch)
        seen.extend((list(s.tokens), d) for s, d, cap in zip(batch.seqs, out.tokens[:, 0].tolist(),
                                                              batch.max_drafts_list) if cap)
        return out
    engine.drafter.draft = recorded
    engine.generate(PROMPTS, greedy(24))
    assert engine.stats.ahead_steps > 0 and engine.stats.sd_steps >= 5
    assert bool(compactions) == compacted
    checked = 0
    with torch.no_grad():
        for text, got in seen:
            ids = torch.tensor([text])
            taps = torch.cat(tiny(ids, hidden_layers=head.cfg.feature_layers)[1], dim=-1)
            shifted = torch.cat([taps.new_zeros(1, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
            logits = head.draft_logits(ttt_layer(head, head.project(shifted), ids, tiny.embed_tokens, 1)[0][0, -1])
            top = logits.topk(2).values
            if top[0] - top[1] < 1e-4:  # a near tie: the engine's rounding may pick either
                continue
            assert got == head.d2t[logits.argmax()].item()
            checked += 1
    assert len(seen) >= 20 and checked >= 0.9 * len(seen)


def test_a_row_near_its_context_end_does_not_turn_sd_off_for_the_batch():
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=512, max_position_embeddings=48)
    model = random_model(cfg, seed=2)
    prompts = [[7] * 40, [1, 2, 3], [4, 5, 6, 7]]  # the first reaches the context end after 8 tokens
    want = RolloutEngine(model, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, greedy(30))
    engine = RolloutEngine(model, kv_cache_bytes=64 << 20, block_size=4, eager=True,
                           drafter=truncated_drafter(model, 2), num_draft_tokens=4)
    got = engine.generate(prompts, greedy(30))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len(got[0].token_ids) == 8 and got[0].finish_reason == "length"
    # every decoding step speculated while more than one row was running
    assert all(k == 4 for b, k in zip(engine.stats.batch_sizes, engine.stats.chosen_k) if b > 1)


def test_acceptance_counts_with_mixed_draft_lengths(tiny):
    """k alternates 1 and 3 with a drafter identical to the target: every proposed draft is
    accepted, so the conditional acceptance is 1 at every position (rows that never proposed a
    position do not count against it), in the engine's stats and in the solver's estimate."""
    policy = AdaptiveK(CostModel((0.0,) * 6), 3, [0.5, 0.5, 0.5])
    ks = [1, 3]
    policy.choose = lambda batch, context: ks[len(engine.stats.chosen_k) % 2]
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=truncated_drafter(tiny, 4),
                           num_draft_tokens=3, policy=policy)
    engine.generate(PROMPTS, greedy(40))
    st = engine.stats
    assert set(st.chosen_k) - {0} == {1, 3}  # (0: the last steps, where no row has room to draft)
    assert measured_alpha(st) == [1.0, 1.0, 1.0]
    assert st.sd_reached_at[0] > st.sd_reached_at[1] > 0
    # the solver's counts are the engine's: every draft it verified, accepted, blended with the 0.5 start
    assert policy.alpha == pytest.approx([(16 + r) / (32 + r) for r in st.sd_reached_at[:3]])


def test_accept_len_counts_only_emitted_tokens(tiny):
    """Rows that stop at EOS inside a verify emit fewer than n + 1 tokens: accept_len counts what
    was emitted, so SD steps' tokens add up to the completions' (after the prefill's first)."""
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=truncated_drafter(tiny, 4),
                           num_draft_tokens=4, eos_token_ids=list(range(0, 49152, 3)))  # a third of the vocabulary
    out = engine.generate([p for p in PROMPTS for _ in range(8)],
                          [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i) for i in range(24)])
    assert any(o.finish_reason == "stop" and len(o.token_ids) > 1 for o in out)
    st = engine.stats
    assert st.decode_steps == 0 and st.sd_emitted == sum(len(o.token_ids) for o in out) - st.prefill_tokens


def test_hybrid_greedy_sd_equals_plain(tiny):
    """The EAGLE head and the history drafter side by side: token-identical to plain decoding, and
    both kinds of rows occur once a past rollout of the same prompts exists."""
    prompts = [p for p in PROMPTS for _ in range(2)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(prompts, greedy(24))
    drafter = HybridDrafter(as_drafter(head_for(tiny, 3000)))
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=drafter, num_draft_tokens=3)
    assert drafter.ahead is False and not drafter.runs_ahead  # (on a CPU it asks history every step)
    sd_rows = history_rows = 0
    for _ in range(2):
        got = engine.generate(prompts, greedy(24))
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        sd_rows += got.stats.sd_rows  # each call's own statistics
        history_rows += got.stats.sd_kinds.get("history", {}).get("rows", 0)
    assert 0 < history_rows < sd_rows


def test_as_drafter_wraps_each_kind(tiny):
    assert type(as_drafter(head_for(tiny, 300))).__name__ == "EagleDrafter"
    assert type(as_drafter(truncated_drafter(tiny, 1))).__name__ == "LayerDrafter"
    history = HistoryDrafter()
    assert as_drafter(history) is history and as_drafter(None) is None


def test_default_head_key_covers_task_options_and_length():
    """Settings with other task options or completion lengths get heads pretrained on their own text."""
    from respec.drafter_choice import default_head_dir, pretrain_tokens

    base = default_head_dir("tiny", "basic_arithmetic")
    assert base == default_head_dir("tiny", "basic_arithmetic", {}, 64)
    assert default_head_dir("tiny", "basic_arithmetic", {"min_terms": 3, "max_terms": 3}) != base
    assert default_head_dir("tiny", "basic_arithmetic", max_new_tokens=96) != base
    assert default_head_dir("tiny", "products") != base
    assert pretrain_tokens(64) == 64 and pretrain_tokens(512) == 128  # rollouts up to the recipe's cap


def test_the_default_heads_pretraining_is_weighed_against_a_perfect_drafters_savings():
    """`pretraining_payback`: the pretraining's rollouts by the cost model, doubled, against every
    row's every token drafted perfectly at the best k, the drafts at their profiled cost. A machine where a verify costs
    its width (a compute-bound CPU) never pays; one where it costs a plain step (a GPU's small
    batches) pays; more steps or longer completions pay more, the pretraining capped at its length."""
    from respec.drafter_choice import DEFAULT_HEAD_RECIPE, PRETRAIN_PER_ROLLOUT, pretraining_payback
    from respec.solver import CostModel

    r = DEFAULT_HEAD_RECIPE
    cpu = CostModel((0.05, 0.0, 0.003, 1e-6, 0.009, 0.0))  # 50 ms a step, 3 ms a token (AVX2 fp32's fit)
    p = pretraining_payback(cpu, rows=16, steps=20, max_new_tokens=64, k=3)
    batches = -(-r["prompts"] // r["max_batch"])
    assert p.cost_s == pytest.approx(PRETRAIN_PER_ROLLOUT * batches * 64 * cpu.step_s(64, 0, 96))
    plain, best = cpu.step_s(16, 0, 96), cpu.step_s(16, 3, 96) / 4  # k = 3 is the best of 1..3 here
    assert best < min(cpu.step_s(16, 1, 96) / 2, cpu.step_s(16, 2, 96) / 3) and best > cpu.verify_s(16, 4, 96) / 4
    assert p.saved_s == pytest.approx(20 * 64 * (plain - best)) and not p.pays
    slow_drafts = CostModel((0.05, 0.0, 0.003, 1e-6, 0.2, 0.0))  # the same verifies, drafts dearer than they save
    assert pretraining_payback(slow_drafts, rows=16, steps=20, max_new_tokens=64, k=3).saved_s == 0
    flat = CostModel((0.003, 0.0, 1e-6, 0.0, 0.0003, 0.0))  # a step costs its launches, whatever its width
    assert pretraining_payback(flat, rows=16, steps=20, max_new_tokens=64, k=3).pays
    width = CostModel((0.0, 0.0, 0.003, 0.0, 0.0, 0.0))  # a verify costs exactly its width: nothing to save
    assert pretraining_payback(width, rows=16, steps=10**6, max_new_tokens=64, k=3).saved_s == 0
    longer = pretraining_payback(cpu, rows=4, steps=16, max_new_tokens=512, k=3)
    capped = pretraining_payback(cpu, rows=4, steps=16, max_new_tokens=128, k=3)
    assert longer.cost_s == pytest.approx(capped.cost_s) and longer.saved_s > 3.9 * capped.saved_s
    assert pretraining_payback(cpu, rows=16, steps=40, max_new_tokens=64, k=3).saved_s == pytest.approx(2 * p.saved_s)


def test_the_pretrainings_pilot_counts_each_part_as_often_as_pretrain_runs_it(tiny, tokenizer, monkeypatch, tmp_path):
    """`pretraining_pilot`: its rollout engine's prefill and decode steps as the engine timed them,
    times the batches and the length `pretrain` decodes; the features of one batch and one optimizer
    step (this test's stand-in times: 2 s and 0.5 s) times the sequences and the optimizer steps
    `pretrain` runs on the same arguments (its report's). `pretrain_default_head` with a budget
    makes nothing where the pilot's figure is above it (nothing in the cache, `pretrain` never
    called), and pretrains where it is below."""
    from respec import drafter_choice, drafter_training
    from respec.drafter_choice import pretrain_default_head
    from respec.tasks import make_task

    def stand_in(fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        return out, (2.0 if fn is drafter_training.target_features else 0.5)

    monkeypatch.setattr(drafter_training, "timed", stand_in)
    task = make_task(task="toy-letters")
    problems = task.problems(10**6, 14)
    kw = dict(problems=problems, held_out=2, new_tokens=6, epochs=2, batch=4, unroll=2, max_batch=5, draft_vocab=64)
    pilot = drafter_training.pretraining_pilot(tiny, tokenizer, **kw)
    n_train = 12
    assert pilot["features_s"] == pytest.approx(n_train * 2.0 / 4)
    assert pilot["train_s"] == pytest.approx(3 * 2 * 0.5)
    assert pilot["rollout_s"] == pytest.approx(3 * (pilot["prefill_s"] + 6 * pilot["decode_step_s"]), abs=0.06)
    assert pilot["prefill_s"] > 0 and pilot["decode_step_s"] > 0
    assert pilot["held_out_s"] == pytest.approx(6 * pilot["decode_step_s"], abs=0.06)
    parts = ("rollout_s", "features_s", "train_s", "held_out_s")
    assert pilot["total_s"] == pytest.approx(sum(pilot[k] for k in parts), abs=0.2)
    report = drafter_training.pretrain(tiny, tokenizer, tmp_path / "head", held_out_ks=[2], greedy=False,
                                       progress=False, log=lambda m: None, **kw)
    assert report["steps"] * 0.5 == pytest.approx(pilot["train_s"])  # the optimizer steps pretrain took
    assert report["prompts"] * 2.0 / 4 == pytest.approx(pilot["features_s"])  # the sequences it takes features of

    made, piloted = [], []

    def pilot_stand_in(*a, **k):
        piloted.append(1)
        return {**{p: 2.5 for p in parts}, "total_s": 10.0, "pilot_s": 1.0}

    monkeypatch.setattr(drafter_training, "pretraining_pilot", pilot_stand_in)
    monkeypatch.setattr(drafter_training, "pretrain",
                        lambda target, tok, out_dir, **k: made.append((Path(out_dir) / "config.json").write_text("{}")))
    head = tmp_path / "cache" / "drafters" / "key"  # (a cache with no drafters yet: its folder made as needed)
    logged = []
    assert not pretrain_default_head("tiny", head, tokenizer, task, budget_s=9.0, machine="m1", log=logged.append)
    assert not made and not head.exists() and "not made" in logged[-1] and len(piloted) == 1
    kept = drafter_choice.pilot_path(head, "m1")
    assert json.loads(kept.read_text())["total_s"] == 10.0  # what the next run on this machine reads
    assert drafter_choice.read_pilot(kept)["total_s"] == 10.0
    for broken in ("{", '{"total_s": 10.0}', "[]"):  # unreadable or incomplete: measured again
        stray = tmp_path / "stray.json"
        stray.write_text(broken)
        assert drafter_choice.read_pilot(stray) is None
    # a later run: no child process where the kept figure says no, the figure read where it says yes
    monkeypatch.setattr(drafter_choice, "default_head_dir", lambda *a, **k: head)
    monkeypatch.setattr(drafter_choice.host_memory, "run_apart", lambda *a, **k: pytest.fail("a child process"))
    assert drafter_choice.default_head("tiny", "toy-letters", task, tokenizer, log=logged.append, budget_s=9.0,
                                       machine="m1") is None
    assert "measured before on this machine" in logged[-1] and "not made" in logged[-1] and len(piloted) == 1
    monkeypatch.setattr(drafter_choice.host_memory, "run_apart", lambda fn, *a, **k: fn(*a, **k))
    assert drafter_choice.default_head("tiny", "toy-letters", task, tokenizer, log=logged.append, budget_s=11.0,
                                       machine="m1") == head
    assert len(made) == 1 and (head / "config.json").is_file() and len(piloted) == 1  # (the kept figure)
    assert "pretraining it" in logged[-3] and "measured before" in logged[-3]
    assert drafter_choice.pretrain_default_head("tiny", tmp_path / "other", tokenizer, task, log=logged.append)
    assert len(made) == 2 and len(piloted) == 1  # no budget (generate.py, --pretrain-drafter on): no pilot
    assert not pretrain_default_head("tiny", tmp_path / "third", tokenizer, task, budget_s=9.0, log=logged.append)
    assert len(piloted) == 2 and not list(tmp_path.glob("third*"))  # no machine named: measured, kept nowhere


def test_a_drafter_spec_is_the_drafters_it_names(tiny, tokenizer):
    """`--drafter`: a model part alone is that drafter (an EAGLE head, whose SD steps can run ahead of
    the host), with model-free parts a hybrid of exactly those, tried in the order named; model-free
    parts alone are that drafter or a hybrid of them. (A hybrid made of the model alone once added
    history proposals of its own: `random` and `auto` drafted as `random+history`.)"""
    from respec.drafter_choice import choose_drafter
    from respec.drafters.eagle import EagleDrafter
    from respec.drafters.replay import ReplayDrafter
    from respec.tasks import make_task

    def chosen(spec):
        return choose_drafter(spec, target=tiny, k=3, model="tiny", task_name="toy-letters",
                              task=make_task(task="toy-letters"), tokenizer=tokenizer,
                              rollout_dtype=torch.float32).drafter

    head = chosen("random")
    assert type(head) is EagleDrafter and head.runs_ahead
    both = chosen("random+replay+history")
    assert type(both) is HybridDrafter and not both.runs_ahead
    assert type(both.model) is EagleDrafter and [type(p) for p in both.proposers] == [ReplayDrafter, HistoryDrafter]
    assert [type(p) for p in chosen("random+history").proposers] == [HistoryDrafter]
    assert type(chosen("history")) is HistoryDrafter
    free = chosen("replay+history")
    assert type(free) is HybridDrafter and free.model is None


class _CachedAtOnce(LayerDrafter):
    """The reference: the prompt cached in the prefill, in one forward, `shift` positions late."""

    def __init__(self, model, shift=0):
        super().__init__(model)
        self.shift = shift

    def on_prefill(self, seqs, tokens, positions, valid, block_tables, taps, first_tokens) -> None:
        kv = PagedKV.build(self.view.draft_pools, block_tables, positions + self.shift, self.module.cfg.n_rep,
                           valid=valid)
        self.runner(tokens, positions + self.shift, kv)
        for s in seqs:
            self.drafted[s.id] = len(s.tokens)


def test_a_layer_drafters_prompt_waits_for_its_first_draft(tiny):
    """A small causal LM caches a row's prompt in the first step that drafts the row
    (`LayerDrafter.on_prefill`): the same drafts, step for step, as one that caches it in the
    prefill, and plain decoding's tokens; power: a prompt cached two positions late drafts
    otherwise."""
    from tests.test_eagle import _drafts

    small = dataclasses.replace(tiny.cfg, num_layers=2)  # (one layer of random weights drafts from the token alone)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_on_eos=False)
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS, params)
    runs = []
    for make in (lambda m: LayerDrafter(m), lambda m: _CachedAtOnce(m), lambda m: _CachedAtOnce(m, shift=2)):
        engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=make(random_model(small, seed=4)),
                               num_draft_tokens=3)
        runs.append(_drafts(engine, PROMPTS, params))
    (got, tokens), (ref, ref_tokens), (late, _) = runs
    assert tokens == ref_tokens == [w.token_ids for w in want]
    assert len(got) == len(ref) > 3
    for (t, n), (rt, rn) in zip(got, ref):
        assert torch.equal(n, rn) and torch.equal(t, rt)
    assert any(not torch.equal(t, lt) for (t, _), (lt, _) in zip(got, late))
