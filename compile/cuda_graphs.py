"""A compiled step captured by hand as one CUDA graph per input shape, and replayed without dynamo.

`--compile-mode graphs` (compile/policy.py): the whole step compiled once by inductor with its
batch and block-table width dynamic, without inductor's CUDA-graph trees; `StepGraphs` then
captures it with `torch.cuda.CUDAGraph` the first time it meets each input shape (a batch bucket x
a power-of-two table width x the step's static flags), as nano-vllm captures one graph per batch
size. A call of a shape already captured is, on the host:

  1. a dictionary lookup of the shape (the tensors' sizes and dtypes, the other arguments' identity);
  2. one copy per tensor argument into the graph's static input buffers (device to device, or
     from pinned memory, queued without waiting);
  3. `graph.replay()`;
  4. a clone of each output (a graph's outputs live at addresses its next replay overwrites).

Under the CUDA-graph trees (`--compile-mode whole`) every call also runs dynamo's guards over the
step's ~190 parameters and 30 pools, the trees' bookkeeping and their own output copies; on the H200
the 135M shape's decode step took 3.05 ms at batch 1, flat in batch and 40x its weight-read time
(docs/benchmarks.md): host- and launch-bound. Dynamo runs here only while a shape is captured.

Capturing a shape runs the step on its first inputs: `warm_runs` times on a side stream (cuBLAS and
the allocator set up outside the capture), then once under capture (which only records). What the
step writes in place (the KV pools: each row's new keys and values at its slots) it writes again,
identically, on every run of the same inputs, and the step keeps no other state (its sampling noise
is a function of each row's seed and position, respec/sampling.py), so the extra runs change nothing
the replay does not. Every graph allocates from one memory pool: they are replayed one at a time and
their outputs are cloned before the next.

The KV pools, the weights and anything else passed inside a list or a module are used where they
are: the engine keeps them at fixed addresses (a weight sync copies in place). Tensor arguments are
the per-step inputs and are always copied.

On a CPU there are no CUDA graphs: `SimulatedGraph` stands in with the same contract (its replay
runs the step on the static input buffers and writes the results into the outputs' fixed tensors),
so tests/test_cuda_path.py checks the buffering on the CPU: an input not copied in, or an output
not cloned out, gives wrong tokens there as it would on a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch

_CAPTURES = 0  # graphs captured in this process (what a timed region must not contain)


def captures() -> int:
    """Shapes captured so far in this process, by every StepGraphs."""
    return _CAPTURES


def shape_key(args: tuple) -> tuple:
    """What a captured graph is specific to: each tensor argument's size and dtype, and every other
    argument's identity (the pools' list, the module: the same objects call after call) or value."""
    return tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor)
                 else a if a is None or isinstance(a, (bool, int, float, str)) else id(a) for a in args)


class CudaGraph:
    """`fn(*inputs)` captured as one CUDA graph into `pool`, after `warm_runs` runs on a side stream."""

    def __init__(self, fn: Callable, inputs: tuple, pool, warm_runs: int):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warm_runs):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: the drafter's background distillation may use the device from its own thread
        # meanwhile, which a global capture mode would refuse
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*inputs)
        self.pool = self.graph.pool()

    def replay(self) -> None:
        self.graph.replay()


class SimulatedGraph:
    """A CUDA graph's contract on any device: a replay runs `fn` on the inputs captured (the static
    buffers) and writes its results into the outputs' fixed tensors, which a later replay overwrites."""

    def __init__(self, fn: Callable, inputs: tuple, pool, warm_runs: int):
        for _ in range(warm_runs):
            fn(*inputs)
        self.fn, self.inputs = fn, inputs
        self.outputs = fn(*inputs)
        self.pool = pool

    def replay(self) -> None:
        for mine, new in zip(self.outputs, self.fn(*self.inputs)):
            if isinstance(mine, torch.Tensor):
                mine.copy_(new)


class StepGraphs:
    """`fn`, a compiled step, captured per input shape and replayed (module docstring).
    `on_capture(args)` is told of every capture (before it runs)."""

    def __init__(self, fn: Callable, device: torch.device, *, warm_runs: int = 2,
                 on_capture: Callable | None = None):
        self.fn = fn
        self.graph_type = CudaGraph if torch.device(device).type == "cuda" else SimulatedGraph
        self.warm_runs = warm_runs
        self.on_capture = on_capture
        self.graphs: dict[tuple, tuple[object, list]] = {}  # shape -> (graph, its static input buffers)
        self.pool = None  # one memory pool for every graph

    def __call__(self, *args):
        key = shape_key(args)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args)
        else:
            graph, buffers = entry
            for buf, a in zip(buffers, args):
                if buf is not None:
                    buf.copy_(a, non_blocking=True)
        graph, _ = entry
        graph.replay()
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in graph.outputs)

    def _capture(self, args: tuple) -> tuple[object, list]:
        global _CAPTURES
        if self.on_capture is not None:
            self.on_capture(args)
        buffers = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
        inputs = tuple(a if buf is None else buf for a, buf in zip(args, buffers))
        graph = self.graph_type(self.fn, inputs, self.pool, self.warm_runs)
        self.pool = graph.pool
        _CAPTURES += 1
        return graph, buffers
