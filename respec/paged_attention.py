"""Attention over a paged KV cache: write the new keys/values into their slots, then read every
sequence's keys/values back through its block table and run SDPA.

The cache is one tensor `(L, 2, num_blocks, block_size, Hkv, D)` (nano-vllm's layout: a view per
layer, K at index 0 and V at 1). Block 0 is the *null block*: it is never handed to a sequence, so
padding rows and padding tokens write there and unused block-table entries point there. Its
contents are garbage but finite, and the mask below never lets a real query see them.

GQA without expanding K/V: the `n_rep` query heads that share one KV head are folded into the query
length, `q (B, Hkv, n_rep*T, D)` against `k (B, Hkv, S, D)`. SDPA then sees plain multi-head
attention with Hkv heads and never copies K/V n_rep times.

Chosen over flex_attention with a paged block mask because gather + SDPA is one code path that
runs eager, compiled, on CPU and on CUDA, and at the context lengths of RL rollouts the gather is
a small fraction of a decoding step (the weights dominate; see `generate.py --bench`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NULL_BLOCK = 0  # block id reserved for padding writes and unused table entries


@dataclass
class PagedKV:
    """Everything one forward needs to use the paged cache, as explicit tensors."""

    cache: torch.Tensor  # (L, 2, num_blocks, block_size, Hkv, D) the block pool of every layer
    block_tables: torch.Tensor  # (B, W) int64 block ids, position p lives in block_tables[b, p // bs]
    slot_mapping: torch.Tensor  # (B*T,) int64 flat slot (block * bs + offset) for each new token
    mask: torch.Tensor  # (B, 1, n_rep*T, W*bs) bool, True where the query may attend

    @staticmethod
    def build(cache, block_tables, positions, n_rep: int, valid=None) -> "PagedKV":
        """Slots and causal mask from the block tables and the new tokens' positions (B, T).

        A query at position p sees keys at positions 0..p, so the mask also hides everything past a
        sequence's real length (stale slots after a rollback, the null block's garbage). Tokens with
        `valid` False (padding) write to the null block instead of their position's slot."""
        bs = cache.shape[3]
        B, T = positions.shape
        block = block_tables.gather(1, positions // bs)  # (B, T)
        slots = block * bs + positions % bs  # (B, T)
        if valid is not None:
            slots = torch.where(valid, slots, NULL_BLOCK * bs)
        slot_mapping = slots.reshape(-1)  # (B*T,)
        key_pos = torch.arange(block_tables.shape[1] * bs, device=positions.device)  # (S,)
        mask = key_pos.view(1, 1, -1) <= positions.unsqueeze(-1)  # (B, T, S)
        mask = mask.unsqueeze(1).expand(B, n_rep, T, -1).reshape(B, 1, n_rep * T, -1)
        return PagedKV(cache, block_tables, slot_mapping, mask)


def write_kv(kv: PagedKV, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the new keys/values (B, T, Hkv, D) of `layer` at their slots."""
    _, _, n, bs, hkv, d = kv.cache.shape
    kv.cache[layer, 0].view(n * bs, hkv, d).index_copy_(0, kv.slot_mapping, k.reshape(-1, hkv, d))
    kv.cache[layer, 1].view(n * bs, hkv, d).index_copy_(0, kv.slot_mapping, v.reshape(-1, hkv, d))


def _fold_gqa(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, T, H, D) -> (B, Hkv, n_rep*T, D): the query heads of one KV head become extra rows."""
    B, T, H, D = q.shape
    return q.view(B, T, hkv, H // hkv, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, -1, D)


def _unfold_gqa(o: torch.Tensor, T: int) -> torch.Tensor:
    """(B, Hkv, n_rep*T, D) -> (B, T, H, D)."""
    B, hkv, _, D = o.shape
    return o.view(B, hkv, -1, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, -1, D)


def paged_attention(q: torch.Tensor, kv: PagedKV, layer: int) -> torch.Tensor:
    """q (B, T, H, D) attends to its sequence's cached keys/values; returns (B, T, H, D)."""
    B, T, H, D = q.shape
    k_pool, v_pool = kv.cache[layer, 0], kv.cache[layer, 1]  # (N, bs, Hkv, D)
    hkv = k_pool.shape[2]
    k = k_pool[kv.block_tables].flatten(1, 2).transpose(1, 2)  # (B, Hkv, S, D)
    v = v_pool[kv.block_tables].flatten(1, 2).transpose(1, 2)  # (B, Hkv, S, D)
    o = F.scaled_dot_product_attention(_fold_gqa(q, hkv), k, v, attn_mask=kv.mask)
    return _unfold_gqa(o, T)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over contiguous (B, T, H|Hkv, D) tensors: training and the reference
    path the paged one is tested against."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )  # (B, H, T, D)
    return o.transpose(1, 2)
