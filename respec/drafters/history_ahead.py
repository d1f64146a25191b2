"""The history drafter's suffix match on the device, for SD steps run ahead of the host.

`respec/drafters/history.py` finds each row's match on the host, from an index written per token:
a few dictionary lookups a row, but a host step between every two verifies, and host work that grows
with the rows. Here the same question is answered by brute force on the device, so that the drafter's
state between two steps is device tensors and its steps can run ahead (respec/sd_ahead.py):

* the run's text, one tensor `docs` (D, C + 1): row i's own text in doc i (the batch's padding rows
  hold empty ones), then every earlier document the rows' prompts hold in the host index (group
  siblings' and earlier rollouts'), then one empty document; -1 past each document's end, and the
  last column a place nothing reads, where the writes of a verify's unused slots go. The rows' own
  texts are sent once a run; a prompt's earlier documents stay on the device from one run to the
  next while they are the same;
* each row's visible documents `seen` (rows, V): its prompt's documents (its own, its siblings',
  the earlier ones), oldest first, padded with the empty one;
* after a verify (`advance`), each row's emitted tokens are written at their positions in its own
  document, on the device.

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
own: `own_shapes`); `lay_out` builds the state on the host at a run's start.
"""

from __future__ import annotations

import torch

from respec.drafters import Drafts
from respec.host_copy import to_device

PAD = -1  # past a document's end
NOTHING = -2  # before a row's text starts (matches nothing, not even PAD)


def propose(docs, lengths, seen, left, *, k: int, max_match: int, min_match: int):
    """Each row's proposal: (tokens (rows, k), lengths (rows,)). docs (D, C + 1), lengths (D,) the
    documents and their lengths, row i's own text being document i; seen (rows, V) each row's
    visible documents, oldest first (a later one wins a tie); left (rows,) tokens each row may still
    emit (0: a padding row), so that it proposes at most min(k, left - 1)."""
    rows, V = seen.shape
    C = docs.shape[1] - 1
    dev = docs.device
    at = lengths[:rows].view(rows, 1) - 1 - torch.arange(max_match, device=dev).view(1, -1)
    suffix = torch.where(at >= 0, docs[:rows].gather(1, at.clamp(min=0)), NOTHING)  # (rows, n): last token first
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


def write(docs, lengths, left, tokens, positions, valid) -> None:
    """Each row's verified tokens (rows, k+1) written in its own document at `positions` where
    `valid` (invalid ones to the last column, which nothing reads), its length and room moved: in
    place."""
    rows = tokens.shape[0]
    C = docs.shape[1] - 1
    docs[:rows].scatter_(1, torch.where(valid, positions, C), tokens)
    lengths[:rows] = lengths[:rows].maximum(torch.where(valid, positions + 1, 0).amax(1))
    left.sub_(valid.sum(1))


write.own_shapes = True


def lay_out(drafter, batch) -> tuple:
    """A run's state (docs, lengths, seen, left) on the device: the rows' documents as the host
    index holds them after `catch_up` (see the module docstring), in one host-to-device copy: the
    rows' own texts, and each prompt's earlier documents where they are not on the device from the
    run before (`drafter.ahead_docs`: kept while they are the same)."""
    seqs, rows, dev = batch.seqs, batch.tokens.shape[0], batch.tokens.device
    own = {}  # (the prompt's index, document) -> the row whose own text it is
    indexes = {}  # id -> the rows' prompts' indexes, in the rows' order
    for i, s in enumerate(seqs):
        _, doc, index = drafter.doc[s.id]
        own[id(index), doc] = i
        indexes.setdefault(id(index), index)
    # as wide as any document, or as any row can grow (its token limit, within the target's context)
    C = max(max(min(len(s.tokens) + s.params.max_new_tokens - len(s.out), drafter.view.max_len) for s in seqs),
            max(len(t) for index in indexes.values() for t in index.docs.values()))
    C = -(-C // 64) * 64
    # each prompt's earlier documents: a block of rows after the rows' own, the last run's where it
    # holds the same documents, as long, as wide; the others sent with the rows' own texts
    blocks, at, placed, send = [], rows, {}, []
    for key, index in indexes.items():
        past = [d for d in sorted(index.docs) if (key, d) not in own]
        what = (tuple(past), tuple(len(index.docs[d]) for d in past))
        last = drafter.ahead_docs.get(key)
        if last is None or last[0] is not index or last[1] != what or last[2] != C:
            last = (index, what, C, len(send))  # (its tensors: rows of this run's copy)
            send += [index.docs[d] for d in past]
        blocks.append((key, last))
        placed |= {(key, d): at + j for j, d in enumerate(past)}
        at += len(past)
    placed |= own
    empty = at
    seen = []  # each row's prompt's documents, oldest first
    for s in seqs:
        index = drafter.doc[s.id][2]
        seen.append([placed[id(index), d] for d in sorted(index.docs)])
    # (a power of two: few shapes; at least 2, as the compiled search would specialise a size of 1)
    V = max(2, 1 << (max(map(len, seen)) - 1).bit_length())
    seen = [m + [empty] * (V - len(m)) for m in seen] + [[empty] * V] * (rows - len(seqs))
    pad = [PAD] * (C + 1)
    texts = [s.tokens for s in seqs] + [[]] * (rows - len(seqs) + 1) + send  # (rows, the empty one, the sent)
    sent, sent_lengths, seen = to_device(dev, [t + pad[len(t):] for t in texts], [len(t) for t in texts], seen)
    cache, parts = {}, []
    for key, block in blocks:
        if len(block) == 4:  # (sent now: rows + 1 + its start)
            first, n = rows + 1 + block[3], len(block[1][0])
            block = block[:3] + (sent[first: first + n], sent_lengths[first: first + n])
        cache[key] = block
        parts.append(block[3:])
    drafter.ahead_docs = cache  # (the prompts of this run only)
    docs = torch.cat([sent[:rows]] + [b[0] for b in parts] + [sent[rows: rows + 1]])
    lengths = torch.cat([sent_lengths[:rows]] + [b[1] for b in parts] + [sent_lengths[rows: rows + 1]])
    real = torch.arange(rows, device=dev) < len(seqs)
    return docs, lengths, seen, torch.where(real, batch.left, 0)


def draft(drafter, batch, state) -> Drafts:
    """Every row's proposal from `state`, on the device."""
    docs, lengths, seen, left = state
    step = drafter.view.steps.get(propose, k=batch.k, max_match=drafter.max_match, min_match=drafter.min_match)
    tokens, count = step(docs, lengths, seen, left)
    return Drafts(tokens, count, None)


def advance(drafter, state, tokens, positions, valid) -> tuple:
    """`state` after a verify of `tokens` (rows, k+1) emitted at `positions` where `valid`."""
    drafter.view.steps.get(write)(*state[:2], state[3], tokens, positions, valid)
    return state
