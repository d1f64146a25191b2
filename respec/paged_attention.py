"""Attention over a paged KV cache: write the new keys/values into their slots, then read every
sequence's keys/values back through its block table and run SDPA.

The cache is one pool tensor per layer, `(2, num_blocks, block_size, Hkv, D)` (K at index 0, V at
1). Separate tensors per layer, rather than views of one big tensor, keep a layer's forward a
function of tensors that alias nothing else, which is what lets `compile/` compile one decoder
block once and reuse that graph for every layer. Block 0 is the *null block*: it is never handed
to a sequence, so padding rows and padding tokens write there and unused block-table entries point
there. Its contents are garbage but finite, and the mask below never lets a real query see them.

GQA without expanding K/V: the `n_rep` query heads that share one KV head are folded into the query
length, `q (B, Hkv, n_rep*T, D)` against `k (B, Hkv, S, D)`. SDPA then sees plain multi-head
attention with Hkv heads and never copies K/V n_rep times.

The gather uses `index_select` on the flattened table: on CPU, advanced indexing `pool[tables]`
measured 3-10x slower for the same copy. Chosen over flex_attention with a paged block mask
because gather + SDPA is one code path that runs eager, compiled, on CPU and on CUDA, and at the
context lengths of RL rollouts the gather is a small fraction of a decoding step (the weights
dominate; see `generate.py --bench`).

One exception: a compiled *decode* step on CPU (one query token per row) runs `pool_attention`,
the same attention written as two products-and-sums that index the pool through the block table.
Inductor fuses them into the decoder block's kernel, with no gather copy and no call out to SDPA,
whose CPU kernel costs more than the arithmetic at a handful of query rows (docs/benchmarks.md).
With several query tokens per row (the verify) SDPA stayed faster, so it stays.

`attention="flex"` (respec/flex_paged.py) reads the pool in place instead, through flex_attention
and a paged block mask: for CUDA, where the gather's copies and the mask are kernels of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from respec.flex_paged import flex_paged_attention, paged_block_mask

NULL_BLOCK = 0  # block id reserved for padding writes and unused table entries
ATTENTION_KINDS = ("gather", "flex")  # PagedKV.build's `attention`: the landed gather + SDPA, or flex_paged


@dataclass
class LayerKV:
    """What one layer's attention needs: its pool and the batch's addressing."""

    pool: torch.Tensor  # (2, num_blocks, block_size, Hkv, D) this layer's keys (0) and values (1)
    block_tables: torch.Tensor  # (B, W) int64 block ids, position p lives in block_tables[b, p // bs]
    slot_mapping: torch.Tensor  # (B*T,) int64 flat slot (block * bs + offset) for each new token
    mask: torch.Tensor | None  # (B, 1, n_rep*T, W*bs) bool, True where the query may attend (gather)
    block_mask: object = None  # flex_attention's BlockMask in its place (attention="flex")


@dataclass
class PagedKV:
    """Everything one forward needs to use the paged cache, as explicit tensors."""

    pools: list[torch.Tensor]  # one (2, num_blocks, block_size, Hkv, D) pool per layer
    block_tables: torch.Tensor  # (B, W)
    slot_mapping: torch.Tensor  # (B*T,)
    mask: torch.Tensor | None  # (B, 1, n_rep*T, W*bs)
    block_mask: object = None  # flex_attention's BlockMask (attention="flex")

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.pools[i], self.block_tables, self.slot_mapping, self.mask, self.block_mask)

    @staticmethod
    def build(pools, block_tables, positions, n_rep: int, valid=None, attention: str = "gather") -> "PagedKV":
        """Slots and causal mask from the block tables and the new tokens' positions (B, T).

        A query at position p sees keys at positions 0..p, so the mask also hides everything past a
        sequence's real length (stale slots after a rollback, the null block's garbage). Tokens with
        `valid` False (padding) write to the null block instead of their position's slot. With
        `attention="flex"` the mask is a paged block mask instead (respec/flex_paged.py)."""
        bs = pools[0].shape[2]
        B, T = positions.shape
        block = block_tables.gather(1, positions // bs)  # (B, T)
        slots = block * bs + positions % bs  # (B, T)
        if valid is not None:
            slots = torch.where(valid, slots, NULL_BLOCK * bs)
        slot_mapping = slots.reshape(-1)  # (B*T,)
        if attention == "flex":
            return PagedKV(list(pools), block_tables, slot_mapping, None,
                           paged_block_mask(block_tables, positions, pools[0].shape[1], bs))
        key_pos = torch.arange(block_tables.shape[1] * bs, device=positions.device)  # (S,)
        mask = key_pos.view(1, 1, -1) <= positions.unsqueeze(-1)  # (B, T, S)
        mask = mask.unsqueeze(1).expand(B, n_rep, T, -1).reshape(B, 1, n_rep * T, -1)
        return PagedKV(list(pools), block_tables, slot_mapping, mask)


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the new keys/values (B, T, Hkv, D) at their slots.

    One `index_put_` on a view of the whole pool, on purpose: compiled, inductor turns that into an
    in-place scatter, while `index_copy_` into `pool[0]` (a view of a view) was functionalized into
    a copy of the entire pool on every call (measured: 70 ms instead of 0.07 ms for a 100 MB pool)."""
    _, n, bs, hkv, d = kv.pool.shape
    which = torch.arange(2, device=k.device).view(2, 1)  # 0 = keys, 1 = values
    new = torch.stack([k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)])  # (2, B*T, Hkv, D)
    kv.pool.view(2, n * bs, hkv, d).index_put_((which, kv.slot_mapping.view(1, -1)), new)


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """(N, bs, Hkv, D) pool -> (B, Hkv, W*bs, D): each row's blocks in table order."""
    B, W = block_tables.shape
    _, bs, hkv, d = pool.shape
    return pool.index_select(0, block_tables.reshape(-1)).view(B, W * bs, hkv, d).transpose(1, 2)


def _fold_gqa(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, T, H, D) -> (B, Hkv, n_rep*T, D): the query heads of one KV head become extra rows."""
    B, T, H, D = q.shape
    return q.view(B, T, hkv, H // hkv, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, -1, D)


def _unfold_gqa(o: torch.Tensor, T: int) -> torch.Tensor:
    """(B, Hkv, n_rep*T, D) -> (B, T, H, D)."""
    B, hkv, _, D = o.shape
    return o.view(B, hkv, -1, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, -1, D)


def paged_attention(q: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """q (B, T, H, D) attends to its sequence's cached keys/values; returns (B, T, H, D)."""
    T = q.shape[1]
    if kv.block_mask is not None:
        return flex_paged_attention(q, kv.pool, kv.block_mask)
    if T == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():  # see the module docstring
        return pool_attention(q, kv)
    k = gather_kv(kv.pool[0], kv.block_tables)  # (B, Hkv, S, D)
    v = gather_kv(kv.pool[1], kv.block_tables)
    o = F.scaled_dot_product_attention(_fold_gqa(q, k.shape[1]), k, v, attn_mask=kv.mask)
    return _unfold_gqa(o, T)


def pool_attention(q: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """The same attention written as two products-and-sums that read keys and values straight from
    the pool through the block table (no gather copy). Compiled, inductor fuses each into one loop
    nest with an fp32 accumulator; eager it would materialise (B, Hkv, R, S, D) products."""
    B, T, H, D = q.shape
    _, n, bs, hkv, _ = kv.pool.shape
    W = kv.block_tables.shape[1]
    k = kv.pool[0][kv.block_tables].view(B, W * bs, hkv, D).permute(0, 2, 1, 3)  # (B, Hkv, S, D) indirect loads
    v = kv.pool[1][kv.block_tables].view(B, W * bs, hkv, D).permute(0, 2, 1, 3)
    qf = _fold_gqa(q, hkv).float() * D ** -0.5  # (B, Hkv, R, D), R = n_rep * T
    scores = (qf.unsqueeze(3) * k.unsqueeze(2).float()).sum(-1)  # (B, Hkv, R, S)
    probs = scores.masked_fill(~kv.mask, float("-inf")).softmax(-1)
    o = (probs.unsqueeze(-1) * v.unsqueeze(2).float()).sum(3)  # (B, Hkv, R, D)
    return _unfold_gqa(o.to(q.dtype), T)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over contiguous (B, T, H|Hkv, D) tensors: training and the reference
    path the paged one is tested against."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )  # (B, H, T, D)
    return o.transpose(1, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention over an explicit key set: q (B, T, H, D) against k, v (B, S, Hkv, D), with mask (T, S)
    or (B, 1, T, S) bool, True where the query may attend (every row needs one True). Returns (B, T, H, D).
    For callers whose keys are not one causal sequence (the EAGLE head's training-time test)."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )  # (B, H, T, D)
    return o.transpose(1, 2)
