"""Pre-packed linear layers for CPU decoding.

Decoding reads every weight once per step, so its speed is the speed at which matrix products
stream weights from memory. Plain `F.linear` falls well short of that on CPU; oneDNN with each
weight reordered once into its blocked layout does much better. Measured over 30 SmolLM2-sized
layers plus the 49k-token head (one forward's worth of weights):
  * fp32 on a 2-core AVX2 EPYC (538 MB): F.linear 53 / 121 / 113 / 144 ms at batch 1 / 4 / 8 / 32,
    packed 47 / 52 / 53 / 110 ms;
  * bf16 on a 2-core AVX-512-BF16 machine (265 MB): F.linear 25.6 / 27.5 ms at batch 1 / 8,
    packed 17.8 / 19.0 ms.

`torch.compile` does the same reordering only under `freezing`, which turns the weights into
constants of the graph: useless for RL, where the actor changes every step. Here the packed weight
is an ordinary tensor passed to an opaque custom op, so the compiled graph takes it as an input and
`repack()` after an optimizer step refreshes it with no recompilation.

One exception, compiled only: a linear over a single row (a batch-1 decode step) runs as `gemv`, a
product and a sum that inductor turns into one vectorised loop over the weight rows, fused with its
neighbours. It streams the weights faster than oneDNN's call does at one row, in bf16 and fp32
(docs/benchmarks.md); from two rows on it loses (the loop re-reads each weight row per input row
without sharing the loads), so it is used for exactly one.

`packed_view(model)` returns a copy of the module tree that shares every parameter with `model`
but runs its `nn.Linear`s through packed weights (a second copy of the weights in memory: the cost
of the speed-up). On CUDA, and for bf16 on CPUs without native bf16, it is not used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from models.loading import cpu_native_bf16


# Defined with the low-level `torch.library.Library` API rather than `torch.library.custom_op`:
# the latter's Python wrapper measured ~50-90 us more per call, and a decoding step makes 121.
_lib = torch.library.Library("respec", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias, SymInt out_features) -> Tensor")


def _packed_linear(x, packed_weight, bias, out_features):
    """y = x @ W^T + b with W in oneDNN's blocked layout (from `_reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


# CompositeExplicitAutograd, not CPU: the packed weight is an MkldnnCPU tensor.
_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("respec::packed_linear")
def _(x, packed_weight, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True on CPU for fp32, and for bf16 where the CPU has native bf16 (oneDNN refuses otherwise)."""
    supported = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_native_bf16())
    return (torch.device(device).type == "cpu" and supported and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


GEMV_ROWS = 1  # linears over at most this many rows run as `gemv` inside compiled graphs (see above)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b for a few rows, written as a product and a sum so that inductor compiles it into
    one vectorised loop over W's rows: W (N, K) is read once, each row against every x row, with an
    fp32 accumulator."""
    y = (weight.unsqueeze(-2).float() * x.reshape(1, -1, x.shape[-1]).float()).sum(-1)  # (N, rows)
    y = y.t().reshape(*x.shape[:-1], weight.shape[0])
    return (y if bias is None else y + bias.float()).to(x.dtype)


class PackedLinear(nn.Module):
    """Runs like `linear` (same weight and bias objects) through a packed copy of its weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear  # shares parameters with the trained model; not called here
        self.out_features = linear.out_features
        self.register_buffer("packed", torch.empty(0), persistent=False)
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        w = self.linear.weight.detach()
        # The batch-size hint picks oneDNN's blocking. Measured: fp32 packed for batch 1 runs 2-4x
        # slower at batch 8-64 than packed for 64, and no faster at batch 1; bf16 was measured
        # with hint 1 only.
        hint = 64 if w.dtype == torch.float32 else 1
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if torch.compiler.is_compiling() and statically_known_true(rows <= GEMV_ROWS):  # static shapes only
            return gemv(x, self.linear.weight, self.linear.bias)
        return torch.ops.respec.packed_linear(x, self.packed, self.linear.bias, self.out_features)


def packed_view(model: nn.Module) -> nn.Module:
    """A copy of `model` sharing all parameters and buffers, with its Linears packed."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    view = copy.deepcopy(model, memo)
    for module in list(view.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return view


def repack(view: nn.Module) -> None:
    """Refresh every packed weight from its (updated) parameter, e.g. after an optimizer step."""
    for m in view.modules():
        if isinstance(m, PackedLinear):
            m.repack()


def unpack(view: nn.Module) -> None:
    """Drop every packed weight (stale once the parameters change; `repack` makes them again): the
    memory of a second copy of the weights, free while the model trains."""
    for m in view.modules():
        if isinstance(m, PackedLinear):
            m.packed = torch.empty(0)
