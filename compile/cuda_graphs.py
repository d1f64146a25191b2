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
not cloned out, gives wrong tokens there as it would on a GPU. A capture also freezes where its
kernels read everything else (the weights, the pools, the sampler's tables): a tensor replaced
after the capture, rather than copied into, is one a CUDA graph never reads (it reads the freed
old memory), while a re-run on the CPU reads the new one and gives the same tokens. So the
simulated step's graphs are compiled `noting_reads` (compile/policy.py), and a replay whose graphs
are handed any tensor at another address than the capture's raises.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Callable

import torch

_CAPTURES = 0  # graphs captured in this process (what a timed region must not contain)
_RUNNING = threading.local()  # .graph: the SimulatedGraph whose step this thread runs, if any


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


def noting_reads(backend, options: dict | None = None) -> Callable:
    """`backend` (a torch.compile backend, or its name; inductor's `options` given here) whose graphs,
    at every call, tell the SimulatedGraph this thread is running (if any) every tensor they are
    handed: the step's own inputs and all it reads from outside (the parameters, the pools, a table
    in a global), which is what a CUDA graph's capture fixes the address of."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        inner = partial(compile_fx, config_patches=dict(options or {}))
    else:
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_noting(gm, example_inputs):
        compiled = inner(gm, example_inputs)

        def run(*args):
            graph = getattr(_RUNNING, "graph", None)
            if graph is not None:  # (a boxed call hands one list)
                graph.note(args[0] if len(args) == 1 and isinstance(args[0], list) else args)
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)
        return run

    return compile_noting


class SimulatedGraph:
    """A CUDA graph's contract on any device: a replay runs `fn` on the inputs captured (the static
    buffers) and writes its results into the outputs' fixed tensors, which a later replay overwrites;
    and where `fn`'s graphs were compiled `noting_reads`, a replay whose graphs are handed a tensor
    at another address than at the capture raises (a CUDA graph would read the capture's)."""

    def __init__(self, fn: Callable, inputs: tuple, pool, warm_runs: int):
        for _ in range(warm_runs):
            fn(*inputs)
        self.fn, self.inputs = fn, inputs
        self.outputs, self.reads = self._run()  # the capture
        self.pool = pool

    def _run(self) -> tuple:
        """`fn` on the static inputs: (its outputs, the addresses its graphs were handed, call by call)."""
        self._noted = []
        _RUNNING.graph = self
        try:
            out = self.fn(*self.inputs)
        finally:
            _RUNNING.graph = None
        return out, self._noted

    def note(self, handed) -> None:
        self._noted.append(tuple((_address(t), tuple(t.shape)) if isinstance(t, torch.Tensor) else None
                                 for t in handed))

    def replay(self) -> None:
        outputs, reads = self._run()
        if reads != self.reads:
            raise RuntimeError(f"a replay's graph was handed {_moved(self.reads, reads)} at another address than "
                               "at its capture: a CUDA graph reads the captured address (copy into the tensor "
                               "instead of replacing it)")
        for mine, new in zip(self.outputs, outputs):
            if isinstance(mine, torch.Tensor):
                mine.copy_(new)


def _address(t: torch.Tensor) -> int:
    """Where `t`'s data is (a oneDNN-packed CPU weight, respec's cpu_linear.py, has no pointer to
    give: the tensor itself stands for it)."""
    return id(t) if t.layout == torch._mkldnn else t.data_ptr()


def _moved(captured: list, replayed: list) -> str:
    """The first tensor two runs' noted addresses disagree on, in words."""
    if len(captured) != len(replayed):
        return f"{len(replayed)} graph calls where the capture made {len(captured)} (and so its tensors)"
    for c, (was, now) in enumerate(zip(captured, replayed)):
        for i, (a, b) in enumerate(zip(was, now)):
            if a != b:
                return f"input {i} of call {c} (shape {list((b or a)[1])})"
    return "its inputs"


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
