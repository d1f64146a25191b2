"""The paged KV cache: a block pool per layer, and the block manager that hands blocks out.

Memory is carved into blocks of `block_size` token slots. A sequence owns a list of blocks, its
*block table*; token position p lives in slot `p % block_size` of block `table[p // block_size]`.
Sequences grow one block at a time, so a batch of rollouts of very different lengths wastes at
most one partly filled block each, and a finished sequence gives its blocks back at once.

The verbs (all host-side bookkeeping; no tensor is touched here):
  allocate(seq, n)   a new sequence with room for its first n tokens
  append(seq, n)     room for n more tokens (decoding: 1; verification: k+1)
  truncate(seq, n)   forget the last n tokens, returning blocks no longer needed (SD rollback)
  free(seq)          the sequence is done or preempted: all its blocks go back to the free list
Running out of blocks raises `OutOfBlocks`; the engine answers by preempting a sequence, never by
dropping one. Block 0 is never handed out (the null block, see `respec/paged_attention.py`).
"""

from __future__ import annotations

import math
import mmap

import torch

from respec.paged_attention import NULL_BLOCK


def default_pool_bytes(device, *, gpu_fraction: float = 0.4, cpu_bytes: int = 1 << 30,
                       most: int | None = None) -> int:
    """The KV pool's size when none is given: on a GPU a fraction of the memory free now (call it
    once the models are loaded; the rest is left to the optimizer's state and the activations of
    training), elsewhere a fixed 1 GiB (enough for 64 rows of 700 tokens of SmolLM2-135M); either
    way no more than `most`, what the run can ever fill (`pool_bytes_for`): a GPU's pool is zeroed
    when it is made, and memory nobody uses is time and room lost (a CPU pool takes memory only as
    its blocks are first written: `zeroed`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = int(free * gpu_fraction)
    else:
        size = cpu_bytes
    return size if most is None else min(size, most)


def pool_bytes_for(*, rows: int, tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   block_size: int = 16, draft_shape: tuple[int, int, int] | None = None) -> int:
    """Bytes of a pool (`PagedKVCache`'s layout) that holds `rows` sequences of `tokens` tokens each,
    and its null block."""
    per_token = num_layers * num_kv_heads * head_dim
    if draft_shape is not None:
        per_token += draft_shape[0] * draft_shape[1] * draft_shape[2]
    blocks = rows * -(-tokens // block_size) + 1
    return 2 * blocks * block_size * per_token * dtype.itemsize


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than an allocation needs."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: the most recently freed (cache-warm) block is reused first.
        self.free_blocks: list[int] = [b for b in range(num_blocks - 1, 0, -1) if b != NULL_BLOCK]
        self.tables: dict[int, list[int]] = {}  # sequence id -> block ids, in position order
        self.lengths: dict[int, int] = {}  # sequence id -> token slots in use

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: int, n: int) -> int:
        """Blocks that `append(seq, n)` would take from the free list."""
        length = self.lengths[seq]
        return self.blocks_for(length + n) - len(self.tables[seq])

    def allocate(self, seq: int, num_tokens: int) -> None:
        if seq in self.tables:
            raise ValueError(f"sequence {seq} already has blocks")
        self.tables[seq], self.lengths[seq] = [], 0
        try:
            self.append(seq, num_tokens)
        except OutOfBlocks:
            del self.tables[seq], self.lengths[seq]
            raise

    def append(self, seq: int, n: int) -> None:
        need = self.extra_blocks(seq, n)
        if need > len(self.free_blocks):
            raise OutOfBlocks(f"need {need} blocks, {len(self.free_blocks)} free")
        for _ in range(need):
            self.tables[seq].append(self.free_blocks.pop())
        self.lengths[seq] += n

    def append_each(self, seqs: list[int], counts: list[int]) -> None:
        """`append(seq, n)` for each pair, the caller having made sure the blocks they take are free;
        a sequence whose last block has room takes no block and costs one addition."""
        size, lengths, tables = self.block_size, self.lengths, self.tables
        for seq, n in zip(seqs, counts):
            if lengths[seq] + n <= len(tables[seq]) * size:
                lengths[seq] += n
            else:
                self.append(seq, n)

    def truncate(self, seq: int, n: int) -> None:
        if not 0 <= n <= self.lengths[seq]:
            raise ValueError(f"cannot truncate {n} tokens from a sequence of {self.lengths[seq]}")
        self.lengths[seq] -= n
        keep = self.blocks_for(self.lengths[seq])
        table = self.tables[seq]
        while len(table) > keep:
            self.free_blocks.append(table.pop())

    def free(self, seq: int) -> None:
        self.free_blocks.extend(reversed(self.tables.pop(seq)))
        del self.lengths[seq]

    def check_invariants(self) -> None:
        """Every block is free or owned by exactly one sequence, and tables fit their lengths."""
        owned = [b for t in self.tables.values() for b in t]
        everything = owned + self.free_blocks
        assert len(everything) == len(set(everything)) == self.num_blocks - 1, "a block is lost or shared"
        assert NULL_BLOCK not in everything, "the null block was handed out"
        for seq, table in self.tables.items():
            assert len(table) == self.blocks_for(self.lengths[seq]), f"table of {seq} does not fit its length"


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor that, on the CPU, takes memory only where it is written: an anonymous mapping,
    whose pages the OS hands out zero-filled on first touch. A pool sized for the longest rows the
    engine could hold then costs what the rollouts write into it (the block manager hands out the
    lowest and the most recently freed blocks first), not its capacity: 1 GiB zeroed up front was
    1 GiB of resident memory however short the run's sequences. Elsewhere: `torch.zeros`."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize)  # the tensor keeps the mapping alive
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class PagedKVCache:
    """The block pools, one `(2, num_blocks, block_size, Hkv, D)` tensor per layer, plus the block
    manager that hands their blocks out (a block id names the same slots in every layer)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity_bytes: int,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 draft_shape: tuple[int, int, int] | None = None):
        """`draft_shape` = (layers, kv heads, head dim) of a drafter: it gets pools of its own with the
        same blocks (a block id names the same token slots in the target's and the drafter's pools),
        and the capacity in bytes covers both."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = num_layers * num_kv_heads * head_dim
        if draft_shape is not None:
            per_token += draft_shape[0] * draft_shape[1] * draft_shape[2]
        self.bytes_per_block = 2 * block_size * per_token * itemsize
        num_blocks = int(capacity_bytes // self.bytes_per_block)
        if num_blocks < 2:
            raise ValueError(
                f"KV cache of {capacity_bytes / 2**30:.3g} GiB holds {num_blocks} blocks of "
                f"{self.bytes_per_block / 2**20:.2f} MiB; it needs at least 2"
            )
        if torch.device(device).type == "cuda":  # one line, not an out-of-memory traceback
            free, total = torch.cuda.mem_get_info(device)
            if num_blocks * self.bytes_per_block > free:
                raise ValueError(f"a KV cache of {capacity_bytes / 2**30:.3g} GiB does not fit the "
                                 f"{free / 2**30:.1f} GiB free on {device} ({total / 2**30:.0f} GiB in all)")
        self.block_size = block_size
        # Zeros, not empty: the null block and stale slots are read (then masked), so keep them finite.
        self.pools = [zeroed((2, num_blocks, block_size, num_kv_heads, head_dim), dtype, device)
                      for _ in range(num_layers)]
        dl, dh, dd = draft_shape or (0, 0, 0)
        self.draft_pools = [zeroed((2, num_blocks, block_size, dh, dd), dtype, device) for _ in range(dl)]
        self.blocks = BlockManager(num_blocks, block_size)

    def block_table_rows(self, seqs: list[int], width: int, rows: int | None = None) -> list[list[int]]:
        """The block tables of `seqs` as `rows` host lists of `width`, padded with the null block."""
        rows = len(seqs) if rows is None else rows
        tables = self.blocks.tables
        padded = [tables[s] + [NULL_BLOCK] * (width - len(tables[s])) for s in seqs]
        return padded + [[NULL_BLOCK] * width] * (rows - len(seqs))

    def block_tables(self, seqs: list[int], width: int, rows: int | None = None) -> torch.Tensor:
        """(rows, width) int64 block tables of `seqs`, padded with the null block (host -> device)."""
        padded = self.block_table_rows(seqs, width, rows)
        return torch.tensor(padded, dtype=torch.int64).to(self.pools[0].device, non_blocking=True)
