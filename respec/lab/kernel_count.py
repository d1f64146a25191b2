"""How many kernels one decoding step launches, from a torch.profiler trace.

A small model's decoding step on a GPU is bound by launches, not by its arithmetic: a few hundred
kernels of 2-4 us each, even replayed from a CUDA graph. The count, per step and per layer, says
how far a step is from the handful a layer needs (generate.py --bench reports it; the GPU check
records it).

One synthetic step (respec/profiling.py, after its shape is warm: compiled, and recorded where the
step replays CUDA graphs) runs under the profiler with every function `engine.steps.get` hands out
marked ("respec.step"); the count is what runs under those marks, the prefill left out:
  * on CUDA, the device kernels the marked calls launched (correlated by the profiler, those of a
    CUDA graph replay included);
  * elsewhere, the operators they ran that have no operators inside them and compute something
    (views, allocations and no-op conversions left out: `NO_KERNEL`), which an eager step on a GPU
    would each launch as a kernel. A compiled CPU step's generated C++ kernels do not show, only
    what it calls out to, so a CPU count of a compiled step is a floor.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from respec.profiling import synthetic_steps

MARK = "respec.step"
# leaf operators that launch nothing: views, allocations, dtype queries, no-op conversions
NO_KERNEL = {f"aten::{op}" for op in (
    "as_strided", "view", "_reshape_alias", "reshape", "_unsafe_view", "alias", "detach", "expand", "slice",
    "select", "unsqueeze", "squeeze", "transpose", "permute", "t", "empty", "empty_strided", "empty_like",
    "resize_", "result_type", "real", "lift_fresh", "to", "contiguous", "view_as", "split", "chunk", "unbind")}


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def kernels_per_step(engine, batch: int, k: int = 0, context: int = 64) -> dict:
    """{"kernels_per_step", "kernels_per_layer", "counted": "cuda kernels" | "leaf operators"} of
    one decoding step (k = 0) or SD step with k drafts, at `batch` rows of `context` tokens."""
    synthetic_steps(engine, batch, k, context, engine.steps.warm_calls + 1)  # the shape warm first
    steps, get = engine.steps, engine.steps.get

    def marked(fn, **static_kwargs):
        step = get(fn, **static_kwargs)

        def run(*args, **kwargs):
            with record_function(MARK):
                return step(*args, **kwargs)
        return run

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps.get = marked
    try:
        with profile(activities=activities) as prof:
            synthetic_steps(engine, batch, k, context, 1)
            if cuda:
                torch.cuda.synchronize(engine.device)
    finally:
        del steps.get  # the method again
    marks = [e for e in prof.events() if e.name == MARK]
    if not marks:
        raise RuntimeError("the profiled step ran none of the engine's step functions")
    inside = [d for m in marks for d in _descendants(m)]
    if cuda:
        count = sum(len(e.kernels) for e in marks + inside)
    else:
        count = sum(1 for e in inside if not e.cpu_children and e.name not in NO_KERNEL)
    layers = engine.model.cfg.num_layers
    return {"kernels_per_step": count, "kernels_per_layer": round(count / layers, 1),
            "counted": "cuda kernels" if cuda else "leaf operators"}
