"""Pre-packed linear layers for CPU decoding.

Decoding reads every weight once per step, so its speed is the speed at which matrix-vector
products stream weights from memory. On this class of CPU a plain bf16 `F.linear` on a
(batch, d) input reaches only about 10 GB/s over the whole model, while oneDNN with the weight
reordered once into its blocked layout reaches about 15 GB/s (measured with 30 SmolLM2-sized
layers plus the 49k head: 25.6 ms -> 17.8 ms per step at batch 1, 27.5 -> 19.0 ms at batch 8).

`torch.compile` does the same reordering only under `freezing`, which turns the weights into
constants of the graph: useless for RL, where the actor changes every step. Here the packed weight
is an ordinary tensor passed to an opaque custom op, so the compiled graph takes it as an input and
`repack()` after an optimizer step refreshes it with no recompilation.

`packed_view(model)` returns a copy of the module tree that shares every parameter with `model`
but runs its `nn.Linear`s through packed weights (a second copy of the weights in memory: the cost
of the speed-up). On CUDA, or for dtypes oneDNN does not pack, it is not used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.library.custom_op("respec::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """y = x @ W^T + b with W in oneDNN's blocked layout (from `_reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed_weight, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


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
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.linear.bias, self.out_features)


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
