"""How the engine's steps are compiled: shape buckets, `torch.compile` settings, warm-up, caches.

Policy, and why:
  * Batch sizes go through buckets (1, 2, 4, 8, ...): the engine pads the active batch up to the
    next bucket with rows that do nothing. Every bucket is one static-shape graph.
  * The block-table width (how much context the longest sequence has) is a *dynamic* dimension:
    it changes every `block_size` tokens, and the only ops that see it are a gather, a mask and
    SDPA, which cost the same compiled either way. Bucketing it too would multiply compile time.
  * Prefill runs compiled with dynamic shapes (its prompt lengths vary without bound); it runs once
    per sequence, so its speed matters less than decode's.
  * `mode="reduce-overhead"` (CUDA graphs) on CUDA; the default mode on CPU.
  * The inductor cache lives under respec's cache directory, so a second run skips codegen.
  * `eager=True` returns the plain functions: the debugging path, tested to give the same tokens.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from models.loading import cache_dir

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_TABLE_WIDTH = 4  # block-table widths below this are padded up (keeps the dynamic dim > 1)


def use_persistent_cache() -> None:
    """Point inductor's on-disk cache into respec's cache directory (unless the user set one)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def batch_bucket(n: int, max_batch: int) -> int:
    for b in BATCH_BUCKETS:
        if b >= n:
            return min(b, max(max_batch, n))
    return n


def buckets_up_to(max_batch: int) -> list[int]:
    return sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)})


def table_width(num_blocks: int) -> int:
    """Block-table width for a batch whose longest sequence has `num_blocks` blocks."""
    return max(MIN_TABLE_WIDTH, num_blocks)


class CompiledSteps:
    """The engine's step functions, compiled (or not), keyed by the flags baked into a graph."""

    def __init__(self, *, eager: bool, device: torch.device):
        self.eager = eager
        self.device = device
        self._cache: dict = {}
        if not eager:
            use_persistent_cache()

    def get(self, fn, *, dynamic: bool = False, **static_kwargs):
        """`fn` with `static_kwargs` bound, compiled once per distinct (fn, kwargs)."""
        key = (fn, dynamic, tuple(sorted(static_kwargs.items())))
        if key not in self._cache:
            bound = partial(fn, **static_kwargs)
            if self.eager:
                self._cache[key] = bound
            else:
                mode = "reduce-overhead" if self.device.type == "cuda" and not dynamic else None
                self._cache[key] = torch.compile(bound, fullgraph=True, dynamic=dynamic, mode=mode)
        return self._cache[key]

    @staticmethod
    def mark_dynamic_width(block_tables: torch.Tensor) -> None:
        torch._dynamo.mark_dynamic(block_tables, 1, min=MIN_TABLE_WIDTH, max=1 << 20)
