"""The history drafter's suffix match on the device, for SD steps run ahead of the host.

`respec/drafters/history.py` finds each row's match on the host, from an index written per token:
a few dictionary lookups a row, but a host step between every two verifies, and host work that grows
with the rows. Here the same question is answered by brute force on the device, so that the drafter's
state between two steps is device tensors and its steps can run ahead (respec/sd_ahead.py):

* the run's text lives in a store of documents on the device (`DocStore`), one a row of its tensor
  `docs` (slots, C + 1): every document the rows' prompts hold in the host index (each row's own,
  its group siblings', earlier rollouts'), -1 past each document's end, and the last column a place
  nothing reads, where the writes of a verify's unused slots go; two slots of the store's own, an
  empty document and the one the batch's padding rows write into. A document is sent once, by
  what it gained since it was last on the device: a new one's prompt is copied on the device from
  a document of the same prompt there; a row's text written by a run ahead (below) is not sent
  again; a finished document is never sent again while the store keeps it, nor looked at by the
  host (the host's work a layout grows with the rows, not with the rollouts their prompts hold);
* each row's own document `own` (rows,) and visible documents `seen` (rows, V): its prompt's
  documents (its own, its siblings', the earlier ones), oldest first, padded with the empty one;
* after a verify (`advance`), each row's emitted tokens are written at their positions in its own
  document, on the device; when the run ends the host text holds them too (`ran_ahead`).

A draft (`propose`) compares each row's last `max_match` tokens with the tokens before every place
of every document it sees (V x C places, `max_match` comparisons each: millions at 64 rows; on a
CPU that costs more than the host index's lookups, docs/benchmarks.md, so there the drafter matches
on the host; no GPU has timed it yet) and proposes what followed the place with the longest match (at
least `min_match` tokens), the latest of equals (a later document, then a later place), capped by
the row's room and by the end of that document. That is the longest suffix seen up to `max_match`,
where the host index takes the longest among the last few occurrences of its last three tokens: the
two may propose differently, and either is exact (a proposal is a point mass; `Drafts.q` None).
How many tokens a row proposes depends only on the text, never on what a draft samples.

`propose` and `write` are device helpers a run asks `CompiledSteps` for (their shapes are their
own: `own_shapes`); `lay_out` brings the store up to date and builds a run's state at its start,
and a step's between runs where the drafter matches on the device (`HistoryDrafter.on_device`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from respec.drafters import Drafts
from respec.host_copy import to_device

PAD = -1  # past a document's end
NOTHING = -2  # before a row's text starts (matches nothing, not even PAD)
EMPTY, SINK = 0, 1  # the store's own slots: an empty document (`seen`'s padding), the padding rows' own


def propose(docs, lengths, own, seen, left, *, k: int, max_match: int, min_match: int):
    """Each row's proposal: (tokens (rows, k), lengths (rows,)). docs (D, C + 1), lengths (D,) the
    documents and their lengths; own (rows,) each row's own document; seen (rows, V) each row's
    visible documents, oldest first (a later one wins a tie); left (rows,) tokens each row may still
    emit (0: a padding row), so that it proposes at most min(k, left - 1)."""
    rows, V = seen.shape
    C = docs.shape[1] - 1
    dev = docs.device
    at = lengths[own].view(rows, 1) - 1 - torch.arange(max_match, device=dev).view(1, -1)
    suffix = torch.where(at >= 0, docs[own.view(rows, 1), at.clamp(min=0)], NOTHING)  # (rows, n): last token first
    text = torch.nn.functional.pad(docs[seen][..., :C], (max_match, 0), value=PAD)  # (rows, V, n + C)
    # the place j (the token after a match, 0..C-1) matches m tokens: text[j - 1 - i] == suffix[i], i < m
    run = text[..., max_match - 1: max_match - 1 + C] == suffix[:, 0].view(rows, 1, 1)
    matched = run.long()
    for i in range(1, max_match):
        run = run & (text[..., max_match - 1 - i: max_match - 1 - i + C] == suffix[:, i].view(rows, 1, 1))
        matched = matched + run
    j = torch.arange(C, device=dev).view(1, 1, C)
    usable = (j >= 1) & (j < lengths[seen].unsqueeze(2)) & (matched >= min_match)
    order = torch.arange(V, device=dev).view(1, V, 1)
    score = torch.where(usable, (matched * V + order) * C + j, -1).view(rows, V * C)
    best, where = score.max(1)
    doc = seen.gather(1, (where // C).view(rows, 1)).view(rows)
    place = where % C
    caps = (left - 1).clamp(min=0, max=k)
    count = torch.minimum(caps, lengths[doc] - place).clamp(min=0) * (best >= 0)
    steps = torch.arange(k, device=dev).view(1, k)
    tokens = docs[doc.view(rows, 1), (place.view(rows, 1) + steps).clamp(max=C)]
    return torch.where(steps < count.view(rows, 1), tokens, 0), count


propose.own_shapes = True


def write(docs, lengths, own, left, tokens, positions, valid) -> None:
    """Each row's verified tokens (rows, k+1) written in its own document `own` at `positions` where
    `valid` (invalid ones to the last column, which nothing reads; so are the padding rows' places
    past it, all in one document nothing reads), its length and room moved: in place."""
    rows, k1 = tokens.shape
    C = docs.shape[1] - 1
    docs.index_put_((own.view(rows, 1).expand(rows, k1), torch.where(valid, positions, C).clamp(max=C)), tokens)
    lengths.index_put_((own,), lengths[own].maximum(torch.where(valid, positions + 1, 0).amax(1)))
    left.sub_(valid.sum(1))


write.own_shapes = True


def update(docs, lengths, values, place, start, count, dst, src, prompt, at, length) -> None:
    """The store brought up to the host (`lay_out`), in place: the tokens `values` written into
    document slots `place`, count[i] of them from position start[i]; then the first prompt[j]
    tokens of slot src[j] copied into slot dst[j]; then the lengths of slots `at` set to `length`."""
    n, dev = values.shape[0], docs.device
    rows_of = torch.repeat_interleave(place, count, output_size=n)
    first = torch.repeat_interleave(start - (count.cumsum(0) - count), count, output_size=n)
    docs.index_put_((rows_of, first + torch.arange(n, device=dev)), values)
    columns = torch.arange(docs.shape[1], device=dev).view(1, -1)
    docs[dst] = torch.where(columns < prompt.view(-1, 1), docs[src], docs[dst])
    lengths[at] = length


update.own_shapes = True


class Layout(NamedTuple):
    """A run's state on the device (`lay_out`): the store's documents and lengths (written in place
    by the run), each row's own document and visible ones, and each row's room."""
    docs: torch.Tensor
    lengths: torch.Tensor
    own: torch.Tensor
    seen: torch.Tensor
    left: torch.Tensor


class Laid(NamedTuple):
    """What a layout leaves for the next one, which reuses it where no prompt's set of documents has
    changed since (the drafter's `changes`, the store's `dropped`) and its rows are some of this
    one's, in a batch as wide: each row's own slot, its prompt, its visible slots; the documents not
    final after it (the only ones whose text may have grown); the rows' own and visible documents
    on the device, as it sent them."""
    changes: int
    dropped: int
    rows: int  # the batch's rows, padding included
    ids: tuple  # its sequences' ids, in order
    row: dict  # sequence id -> (its own slot, id of its prompt's index, its visible slots)
    pending: list  # (document, its index), the documents not final after the layout
    own: torch.Tensor
    seen: torch.Tensor


class DocStore:
    """Documents on the device, each in a slot (a row of `docs`), kept from one run to the next.
    `sent[d]`: how many of document d's first tokens the device holds as the host does (a document
    only grows; its text past that is sent, or was written there by a run ahead, `ran`); `final`:
    documents no row writes any more (finished, or left by a preempted row) whose text and length
    there are the host's, which a layout passes over. Slots are taken from `free`; where none is
    left, the documents the layout does not need are dropped (sent again if a later run needs them),
    then the store doubles; it widens when a run needs wider documents."""

    def __init__(self, device: torch.device):
        self.device = device
        self.docs = torch.full((16, 65), PAD, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(16, dtype=torch.int64, device=device)
        self.slot: dict[int, int] = {}  # document -> its slot
        self.sent: dict[int, int] = {}
        self.final: set[int] = set()
        self.free = list(range(15, SINK, -1))  # (popped from the end: the lowest slot first)
        self.listed: dict[int, tuple] = {}  # id(index) -> (its documents, `dropped`, them oldest first, their slots)
        self.dropped = 0  # times documents were dropped (a slot then may hold another)
        self.kept = 0  # documents the last layout needed and found on the device whole
        self.uploaded = 0  # tokens the last layout sent
        self.last: Laid | None = None  # what the last layout left for the next one (`lay_out`'s quick path)

    def make_room(self, width: int, new: int, needed) -> None:
        """At least `new` free slots and `width` columns (past the last one, where unused writes go),
        keeping the documents `needed()` gives."""
        if len(self.free) < new:
            keep = needed()
            for d in [d for d in self.slot if d not in keep]:
                self.free.append(self.slot.pop(d))
                self.sent.pop(d, None)
                self.final.discard(d)
            self.dropped += 1
        slots, columns = self.docs.shape
        if len(self.free) < new:
            grown = max(2 * slots, slots + new - len(self.free))
            self.free += range(grown - 1, slots - 1, -1)
            self.free.sort(reverse=True)
            slots = grown
        if width + 1 > columns or slots > self.docs.shape[0]:
            docs = torch.full((slots, max(width + 1, columns)), PAD, dtype=torch.int64, device=self.device)
            docs[: self.docs.shape[0], : columns - 1] = self.docs[:, : columns - 1]  # (not the old last column)
            lengths = self.lengths.new_zeros(slots)
            lengths[: self.lengths.shape[0]] = self.lengths
            self.docs, self.lengths = docs, lengths

    def ran(self, docs: list[int], lengths: list[int]) -> None:
        """A run ahead wrote these documents' tokens on the device, as far as the host's `lengths`
        now (a row that ended in the run was written past its end there: never read, a length caps it)."""
        for d, n in zip(docs, lengths):
            if d in self.slot:
                self.sent[d] = n


def lay_out(drafter, batch) -> Layout:
    """A run's state on the device: the store (`drafter.store`) brought up to the host index's
    documents of the rows' prompts after `catch_up` (see the module docstring), in one host-to-device
    copy: what each document gained since it was on the device and its length (the documents not
    `final`), the rows' own and visible documents. The host's work grows with the rows and with the
    documents still written, not with the finished ones; where no prompt's set of documents changed
    since the last layout and its rows are some of that one's (the steps between two runs, a run after
    some rows ended), only the documents still written are looked at (`_quick`)."""
    seqs, rows, dev = batch.seqs, batch.tokens.shape[0], batch.tokens.device
    store = drafter.store
    if store is None or store.device != dev:
        store = drafter.store = DocStore(dev)
    quick = _quick(drafter, store, seqs, rows)
    if quick is not None:
        return _laid(drafter, store, batch, *quick)
    indexes, own = {}, []  # id -> the rows' prompts' indexes, in the rows' order; each row's document
    for s in seqs:
        _, doc, index = drafter.doc[s.id]
        own.append(doc)
        indexes.setdefault(id(index), index)
    live = {doc for _, doc, _ in drafter.doc.values()}
    slot, sent, final = store.slot, store.sent, store.final
    # as wide as any document, or as any row can grow (its token limit, within the target's context)
    C = max(min(len(s.tokens) + s.params.max_new_tokens - len(s.out), drafter.view.max_len) for s in seqs)
    plan, new = [], 0  # each prompt's (index, its documents, oldest first, their slots if known, those to look at)
    for key, index in indexes.items():
        keys, known = tuple(index.docs), store.listed.get(key)
        if known is not None and known[0] == keys and known[1] == store.dropped:
            docs, slots = known[2], known[3]
        else:
            docs, slots = sorted(keys), None
        look = [d for d in docs if d not in final]
        for d in look:
            C, new = max(C, len(index.docs[d])), new + (d not in slot)
        plan.append((key, index, keys, docs, slots, look))
    C = -(-C // 64) * 64
    store.make_room(C, new, lambda: {d for p in plan for d in p[3]})
    # what each document gained: (slot, from, count) and the tokens; a new document's prompt copied
    # from a document of its prompt whose prompt is on the device (before this copy's writes: from
    # one whose tokens are sent now too where there is none)
    values, spans, copies, lengths, kept, seen, pending = [], ([], [], []), ([], [], []), ([], []), 0, {}, []
    for key, index, keys, docs, slots, look in plan:
        shared = index.shared
        source = next((d for d in docs if d in final and len(index.docs[d]) >= shared), None)
        for d in look:
            text, copied = index.docs[d], False
            if d not in slot:
                slot[d] = store.free.pop()
                if source is not None and 0 < shared <= len(text):
                    copies[0].append(slot[d]), copies[1].append(slot[source]), copies[2].append(shared)
                    sent[d], copied = shared, True
            n = sent.get(d, 0)
            if n < len(text):
                spans[0].append(slot[d]), spans[1].append(n), spans[2].append(len(text) - n)
                values += text[n:]
                sent[d] = len(text)
                kept -= 1
            if source is None and len(text) >= shared and not copied:
                source = d
            lengths[0].append(slot[d]), lengths[1].append(len(text))
            if d not in live:  # (its length set now, and no row writes it again)
                final.add(d)
            else:
                pending.append((d, index))
        kept += len(docs)
        if slots is None:
            slots = [slot[d] for d in docs]
            store.listed[key] = (keys, store.dropped, docs, slots)
        seen[key] = slots
    row = {s.id: (slot[d], key, seen[key]) for s, d, key in zip(seqs, own, (id(drafter.doc[s.id][2]) for s in seqs))}
    store.kept = kept
    store.last = Laid(drafter.changes, store.dropped, rows, (), row, pending, None, None)
    return _laid(drafter, store, batch, values, spans, copies, lengths)


def _quick(drafter, store: DocStore, seqs, rows: int):
    """`lay_out`'s update of the store where the last layout's lists still hold (see `Laid`): what
    the documents not final then gained, their lengths; those no row writes any more made final.
    None: lay out anew."""
    last = store.last
    if last is None or (last.changes, last.dropped, last.rows) != (drafter.changes, store.dropped, rows):
        return None
    known = last.row
    if any(s.id not in known for s in seqs):
        return None
    width = store.docs.shape[1] - 1
    if any(len(index.docs[d]) > width for d, index in last.pending):  # (a row of another batch grew)
        return None
    live = {doc for _, doc, _ in drafter.doc.values()}
    slot, sent, final = store.slot, store.sent, store.final
    values, spans, lengths, pending = [], ([], [], []), ([], []), []
    for d, index in last.pending:
        text, n, at = index.docs[d], sent.get(d, 0), slot[d]
        if n < len(text):
            spans[0].append(at), spans[1].append(n), spans[2].append(len(text) - n)
            values += text[n:]
            sent[d] = len(text)
        lengths[0].append(at), lengths[1].append(len(text))
        if d in live:
            pending.append((d, index))
        else:
            final.add(d)
    seen = {key: slots for _, key, slots in (known[s.id] for s in seqs)}
    store.kept = sum(map(len, seen.values())) - len(spans[0])
    store.last = last._replace(pending=pending)
    return values, spans, ([], [], []), lengths


def _laid(drafter, store: DocStore, batch, values, spans, copies, lengths) -> Layout:
    """The store's update sent and run (one host-to-device copy, one compiled call), and the run's
    state: the rows' own and visible documents sent with it where the last layout's do not serve."""
    seqs, rows, dev, last = batch.seqs, batch.tokens.shape[0], batch.tokens.device, store.last
    store.uploaded = len(values)
    # (each list at least two long, so that the compiled update never meets a size it specialises
    # on: two tokens written into the padding rows' slot, which nothing reads; two copies of nothing;
    # two lengths of the store's own slots)
    values += [PAD, PAD]
    for part, pad in zip(spans + copies + lengths, (SINK, 0, 1, SINK, SINK, 0, EMPTY, 0)):
        part += [pad] * 2
    spans[1][-1] = 1
    lengths[0][-1] = SINK
    ids = tuple(s.id for s in seqs)
    if ids == last.ids:
        update_args = to_device(dev, values, *spans, *copies, *lengths)
        own, seen = last.own, last.seen
    else:
        row = [last.row[i] for i in ids]
        V = max(2, 1 << (max(len(m) for _, _, m in row) - 1).bit_length())  # (a power of two: few shapes;
        # at least 2, as the compiled search would specialise a size of 1)
        seen = [m + [EMPTY] * (V - len(m)) for _, _, m in row] + [[EMPTY] * V] * (rows - len(seqs))
        own = [o for o, _, _ in row] + [SINK] * (rows - len(seqs))
        *update_args, own, seen = to_device(dev, values, *spans, *copies, *lengths, own, seen)
        store.last = last._replace(ids=ids, own=own, seen=seen)
    drafter.view.steps.get(update)(store.docs, store.lengths, *update_args)
    real = torch.arange(rows, device=dev) < len(seqs)
    return Layout(store.docs, store.lengths, own, seen, torch.where(real, batch.left, 0))


def draft(drafter, batch, state: Layout) -> Drafts:
    """Every row's proposal from `state`, on the device."""
    step = drafter.view.steps.get(propose, k=batch.k, max_match=drafter.max_match, min_match=drafter.min_match)
    tokens, count = step(state.docs, state.lengths, state.own, state.seen, state.left)
    return Drafts(tokens, count, None)


def advance(drafter, state: Layout, tokens, positions, valid) -> Layout:
    """`state` after a verify of `tokens` (rows, k+1) emitted at `positions` where `valid`."""
    drafter.view.steps.get(write)(state.docs, state.lengths, state.own, state.left, tokens, positions, valid)
    return state
