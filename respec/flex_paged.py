"""Paged attention that reads the block pool in place: `flex_attention` with a paged block mask.

The landed path (respec/paged_attention.py) gathers each row's blocks into a contiguous copy and
hands SDPA a dense (B, 1, n_rep*T, W*bs) mask: on a GPU that is two gather kernels with layout
copies and a mask tensor per layer. Here the pool itself is the key/value sequence of one batch
entry, `(1, Hkv, num_blocks * bs, D)`, that every row broadcasts against, and a block mask tells
flex_attention which of its blocks a row reads and in which positions:
  * its kv blocks are the row's block table (the pool's blocks are the mask's blocks: the mask's
    kv block size is the cache's block size), and only as many entries as its newest query needs;
  * `mask_mod(b, h, q, kv)` turns the physical slot `kv` into the row's logical position through
    `logical` (B, num_blocks): which entry of the row's table holds each block, -1 where none. A
    query sees a key at logical position <= its own, never the null block (a padding row sees
    nothing and gets zeros, finite as the gather path's garbage).
Compiled for CUDA, flex_attention becomes one Triton kernel per layer (its main kernel: the decode
kernel's conditions, below, are not met) that loads the row's blocks through the table: no copy,
no mask tensor; its tiles are set to the cache's blocks (`tile_options`). The block mask is built once per forward and shared by every layer.

Where it runs: eager anywhere (torch's unfused reference, used to test it against the gather path
on a CPU) and compiled for CUDA. Compiled for a CPU, torch 2.13's flex_attention generated C++ that
failed to compile or gave wrong values for these masks, so an engine on a CPU runs this path eager
only (`check_runs_on`). The landed path stays the default until a GPU shows this one faster.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

NULL_BLOCK = 0  # respec/paged_attention.py's null block (that module imports this one)
Q_BLOCK = 128  # the mask's query block: one block holds any decode, verify or prompt chunk up to 128 tokens


def check_runs_on(device: torch.device, backend: str | None, mode: str | None = None) -> None:
    """Refuse where this path is known not to work: compiled by inductor for a CPU (module
    docstring), and regional graphs with a dynamic batch (`mode` regional-dynamic: the block mask is
    built outside them, its tensors at the step's rows, which pins the graphs' dynamic rows to one
    size). backend: the torch.compile backend, None for eager."""
    if torch.device(device).type == "cpu" and backend == "inductor":
        raise ValueError("--attention flex runs compiled on CUDA only (torch's compiled CPU flex_attention fails "
                         "for paged masks); on a CPU run it eager (as the tests do), or use attention gather")
    if mode == "regional-dynamic":
        raise ValueError("--attention flex does not run with --compile-mode regional-dynamic (its block mask is built "
                         "outside the regional graphs, at one batch size): use the whole-step path or attention gather")


def check_queries(widest: int) -> None:
    """The block mask has one query block (`Q_BLOCK` tokens): an engine whose widest decode or
    verify step has more queries (a replay's `--replay-k` drafts + 1) is refused, where its kernel's
    second query tile would read past the mask (the prefill gathers, whatever its length)."""
    if widest > Q_BLOCK:
        raise ValueError(f"--attention flex verifies at most {Q_BLOCK} tokens a step (one query block of its mask); "
                         f"this engine's widest verify is {widest} (--replay-k or k + 1): lower it or use "
                         "--attention gather")


def require_cuda_compiled(device: torch.device, compiled: bool) -> None:
    """The option's rule for a run (train.py, generate.py): compiled for CUDA. Eager, flex_attention
    scores every query against the whole pool (torch's unfused reference), fine for a test's small
    pool, not for a run's."""
    if torch.device(device).type != "cuda" or not compiled:
        raise ValueError(f"--attention flex reads the KV pool in place through flex_attention compiled for CUDA; "
                         f"this run is {'compiled' if compiled else 'eager'} on {torch.device(device).type}: "
                         f"use --attention gather")


def paged_block_mask(block_tables: torch.Tensor, positions: torch.Tensor, num_blocks: int,
                     block_size: int) -> BlockMask:
    """The block mask of one forward: block_tables (B, W) int64, positions (B, T) of the new tokens
    (already written to the pool), a pool of `num_blocks` blocks of `block_size` slots.

    Two (B, num_blocks) int32 tensors are written per forward (`logical`, and `kv_indices`, which
    flex_attention sizes by the kv blocks of the whole key sequence): at a GPU's pool of ~10^5
    blocks and 64 rows, ~50 MB a step; a cost the GPU check's flex bench includes."""
    B, W = block_tables.shape
    T = positions.shape[1]
    dev = block_tables.device
    entry = torch.arange(W, dtype=torch.int32, device=dev).expand(B, W)
    logical = torch.full((B, num_blocks), -1, dtype=torch.int32, device=dev)
    logical.scatter_(1, block_tables, entry)  # the null block's entry is arbitrary: mask_mod never reads it
    newest = positions.amax(1)  # (B,) a row reads its table up to its newest query's block
    used = (newest // block_size + 1).clamp(max=W).to(torch.int32)
    kv_num_blocks = used.view(B, 1, 1)
    kv_indices = torch.zeros(B, 1, 1, num_blocks, dtype=torch.int32, device=dev)  # flex wants one slot per block
    # the table's entries in its first W slots: scattered, not sliced in, as a table can be wider than
    # the pool has blocks (its width rounded up to a power of two), and a slice would tie the graph's
    # width to the pool's size; entries past the pool's last block are null blocks, like the last's
    slot = torch.arange(W, device=dev).clamp(max=num_blocks - 1).expand(B, W)
    kv_indices.view(B, num_blocks).scatter_(1, slot, block_tables.to(torch.int32))

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        entry_of = logical[b, block]
        query_pos = positions[b, q_idx.clamp(max=T - 1)]  # (a kernel may evaluate the padding of its query block)
        return (block != NULL_BLOCK) & (entry_of >= 0) & (entry_of * block_size + kv_idx % block_size <= query_pos)

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(Q_BLOCK, block_size), mask_mod=mask_mod,
                                    seq_lengths=(T, num_blocks * block_size), compute_q_blocks=False)


def tile_options(block_size: int, queries) -> dict:
    """The compiled kernel's Triton tiles, as flex_attention's `kernel_options`. Inductor's main flex
    kernel, the one a decode or verify step of these models reaches (its decode kernel wants a static
    batch and a power-of-two ratio of query to kv heads: 9/3 for SmolLM2, 7/1 for Qwen2.5-7B), refuses
    to compile unless the mask's kv block, the cache's 16-slot block, is a multiple of its BLOCK_N,
    whose CUDA defaults are 32-128 ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N").
    So a kv tile is a cache block (up to 64 slots of one), and a query tile covers the step's
    `queries` (a power of two, at least 16, tl.dot's least; 64 where the count is symbolic), within
    the mask's query block."""
    kv = math.gcd(block_size, 64)
    if kv < 16:
        raise ValueError(f"--attention flex needs a cache block of a multiple of 16 slots, got {block_size}")
    q = min(Q_BLOCK, max(16, 1 << (queries - 1).bit_length())) if isinstance(queries, int) else 64
    return {"BLOCK_N": kv, "BLOCK_M": q}


def flex_paged_attention(q: torch.Tensor, pool: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q (B, T, H, D) against one layer's pool (2, num_blocks, bs, Hkv, D) -> (B, T, H, D)."""
    _, n, bs, hkv, d = pool.shape
    k = pool[0].view(1, n * bs, hkv, d).transpose(1, 2)  # (1, Hkv, n*bs, D): a view, no copy
    v = pool[1].view(1, n * bs, hkv, d).transpose(1, 2)
    o = flex_attention(q.transpose(1, 2), k, v, block_mask=block_mask, enable_gqa=q.shape[2] != hkv,
                       kernel_options=tile_options(bs, q.shape[1]))
    return o.transpose(1, 2)
