"""The pure step functions the rollout engine runs: prefill and decode.

Each step takes all of its state as explicit tensors (token ids, positions, block tables, the
per-layer cache pools, per-row sampling parameters), writes the new tokens' keys/values into the
cache and returns the sampled tokens with their log-probs. No host syncs, no Python-side decisions
that depend on tensor values: that is what lets `compile/` compile them (whole, or region by
region: `run_block` runs one decoder block, `sample_fn` the output head and the sampler) with
static shapes, and lets the engine pad a batch to a bucket with rows that do nothing.

Padding conventions:
  * a padding *row* (decode, batch bucket) has position 0 and a block table of null blocks, so it
    writes to the null block and reads only its own garbage;
  * a padding *token* (prefill, right-padded prompts) has `valid = False` and position 0: it writes
    to the null block and, like every query, attends to at least one finite key.
"""

from __future__ import annotations

import torch

from respec.paged_attention import PagedKV
from respec.sampling import sample, sampling_logprobs


def right_padded(spans: list[tuple[list[int], int]]):
    """Token spans (ids, position of the first) as right-padded (tokens, positions, valid), (B, T),
    on the host. Padding has position 0 and valid False (see the conventions above)."""
    T = max(len(ids) for ids, _ in spans)
    tokens = torch.zeros(len(spans), T, dtype=torch.int64)
    positions = torch.zeros(len(spans), T, dtype=torch.int64)
    valid = torch.zeros(len(spans), T, dtype=torch.bool)
    for i, (ids, start) in enumerate(spans):
        n = len(ids)
        tokens[i, :n] = torch.tensor(ids)
        positions[i, :n] = torch.arange(start, start + n)
        valid[i, :n] = True
    return tokens, positions, valid


def sample_next(model, hidden, seeds, temperature, top_k, top_p, min_p, next_pos, *, use_filter: bool):
    """Output head and sampler: hidden (B, d) of each row's last token -> (tokens (B,), log-probs (B,)).
    `next_pos` (B,) is the position the sampled token will take (it keys the sampling noise)."""
    logprobs = sampling_logprobs(model.logits(hidden), temperature, top_k, top_p, use_filter=use_filter, min_p=min_p)
    return sample(logprobs, temperature, seeds, next_pos)


def prefill_step(model, pools, tokens, positions, valid, block_tables, last_index, seeds, temperature,
                 top_k, top_p, min_p, *, use_filter: bool, run_block=None, sample_fn=sample_next, hidden_layers=()):
    """Cache the prompts and sample each row's first new token.

    tokens, positions, valid: (B, T) right-padded prompts; last_index: (B,) index of each row's
    last real token; block_tables: (B, W); seeds, temperature, top_k, top_p, min_p: (B,). With
    `hidden_layers`, also returns those blocks' outputs concatenated (B, T, len * d)."""
    kv = PagedKV.build(pools, block_tables, positions, model.cfg.n_rep, valid=valid)
    out = model(tokens, positions, kv, run_block=run_block, hidden_layers=hidden_layers)
    hidden, taps = out if hidden_layers else (out, None)  # (B, T, d)
    last = hidden.gather(1, last_index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)  # (B, d)
    next_pos = positions.gather(1, last_index.view(-1, 1)).squeeze(1) + 1  # (B,) where the new token sits
    sampled = sample_fn(model, last, seeds, temperature, top_k, top_p, min_p, next_pos, use_filter=use_filter)
    return (*sampled, torch.cat(taps, dim=-1)) if hidden_layers else sampled


def sample_watch(model, hidden, seeds, temperature, top_k, top_p, min_p, next_pos, eos_ids, watching, *,
                 use_filter: bool):
    """The decode step's tail: `sample_next`, and whether a row it watches sampled EOS (a 0-d bool,
    the one value a run ahead reads each step: respec/run_ahead.py), and the positions of the next
    step's input tokens. eos_ids (1, E): the EOS ids (-1 where there are none); watching (B,) bool:
    the rows that stop at EOS (not the padding rows)."""
    tokens, logprobs = sample_next(model, hidden, seeds, temperature, top_k, top_p, min_p, next_pos,
                                   use_filter=use_filter)
    ended = ((tokens.unsqueeze(1) == eos_ids).any(1) & watching).any()  # (B, E) -> ()
    return tokens, logprobs, ended, next_pos


def decode_step(model, pools, tokens, positions, block_tables, eos_ids, watching, seeds, temperature, top_k, top_p,
                min_p, *, use_filter: bool, run_block=None, sample_fn=sample_watch, hidden_layers=(),
                attention: str = "gather"):
    """One token for every row. tokens, positions, watching, seeds, temperature, top_k, top_p, min_p:
    (B,); block_tables: (B, W); eos_ids (1, E). The input token's keys/values are written at
    `positions`. Returns the sampled tokens (B,), their log-probs (B,), whether a watched row sampled
    EOS (), the positions after (B,) and, with `hidden_layers`, those blocks' outputs for the input
    token, concatenated (B, len * d): what a run of steps needs to go on without the host
    (respec/run_ahead.py). `attention`: how the cache is read (respec/paged_attention.py)."""
    kv = PagedKV.build(pools, block_tables, positions.unsqueeze(1), model.cfg.n_rep, attention=attention)
    out = model(tokens.unsqueeze(1), positions.unsqueeze(1), kv, run_block=run_block, hidden_layers=hidden_layers)
    hidden, taps = out if hidden_layers else (out, None)  # (B, 1, d)
    sampled = sample_fn(model, hidden[:, 0], seeds, temperature, top_k, top_p, min_p, positions + 1, eos_ids,
                        watching, use_filter=use_filter)
    return (*sampled, torch.cat(taps, dim=-1)[:, 0]) if hidden_layers else sampled
