"""Fake CUDA on a CPU-only machine: tensors that say `device="cuda"` and hold no data.

Under `fake_cuda()` every tensor is a FakeTensor (torch._subclasses): shapes, dtypes and devices
propagate as on a GPU, and an op that mixes a CUDA tensor with a CPU one (other than a 0-dim
scalar, as CUDA allows) raises FakeTensorDeviceMismatchError, as it would on a GPU. So the
engine, the drafters and the trainer can be run with `device="cuda"` here, and a CPU tensor created
inside a CUDA path fails a CPU test.

Two things FakeTensorMode alone does not do on a CPU-only build of torch, done here by a
TorchFunctionMode: moving a CPU tensor to CUDA (`.to("cuda")`, `.cuda()`: torch refuses before any
fake dispatch, as it is not built with CUDA) becomes an empty CUDA tensor of the same shape, and the
host reads of values a fake tensor does not have (`.tolist()`, `.item()`) return zeros, and indexing
(`t[i]`, `t[i] = v`: its Python binding takes a CUDA device guard, which a CPU-only build lacks)
goes through the aten ops it stands for (select, slice, unsqueeze, index, index_put_), as do
`copy_` into a CUDA tensor and `~t`; `torch.cuda.mem_get_info` answers for a fake 80 GiB card
with `FREE_BYTES` free (a test may lower it). The values
are meaningless, so tests under fake CUDA check devices and shapes, never tokens. And `Module.to`
swaps a fake parameter for its converted copy (torch.utils.swap_tensors), which refuses while the
fake mode's memo holds a weak reference to it: the memo is emptied first.

Every host read of a CUDA tensor (`.tolist()`, `.item()`, `.cpu()`, `.to("cpu")`, a blocking
`copy_` into a host tensor) is counted (`FakeCuda.host_reads`; a `copy_(..., non_blocking=True)`
into a host buffer apart, `FakeCuda.async_reads`): on a GPU each is a device-to-host copy the host waits for, so a count per
step is the number of times a step stalls the host (respec.lab.host_overhead, tests/test_cuda_path.py).
Every host-to-device copy is counted too (`FakeCuda.uploads`: host data made a CUDA tensor, a CPU
tensor moved or copied to CUDA): on a GPU each is a copy the host issues, and from pageable memory
one it waits for.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

from respec import sampling


def _zeros_like_list(t: torch.Tensor):
    zero = False if t.dtype == torch.bool else 0 if not t.is_floating_point() else 0.0
    if t.dim() == 0:
        return zero
    return [_zeros_like_list(t[0]) for _ in range(t.shape[0])] if t.dim() > 1 else [zero] * t.shape[0]


def _basic_indexing(t: torch.Tensor, key) -> tuple[torch.Tensor, list]:
    """`t` with the ints, slices, None and Ellipsis of `key` applied (as torch's own indexing does,
    before any tensor index), and the tensor indices left for aten.index, one per remaining dim."""
    key = list(key) if isinstance(key, tuple) else [key]
    key = [torch.tensor(k) if isinstance(k, list) else k for k in key]
    used = sum(1 for k in key if k is not None and k is not Ellipsis and not (isinstance(k, torch.Tensor) and k.dtype == torch.bool))
    used += sum(k.dim() for k in key if isinstance(k, torch.Tensor) and k.dtype == torch.bool)
    if Ellipsis in [k for k in key if not isinstance(k, torch.Tensor)]:
        at = next(i for i, k in enumerate(key) if k is Ellipsis and not isinstance(k, torch.Tensor))
        key[at: at + 1] = [slice(None)] * (t.dim() - used)
    dim, tensors = 0, []
    for k in key:
        if k is None:
            t = t.unsqueeze(dim)
            tensors.append(None)
            dim += 1
        elif isinstance(k, bool) or isinstance(k, torch.Tensor):
            tensors.append(k if isinstance(k, torch.Tensor) else torch.tensor(k))
            dim += 1
        elif isinstance(k, int):
            t = torch.ops.aten.select.int(t, dim, k)
        elif isinstance(k, slice):
            step = 1 if k.step is None else k.step
            t = torch.ops.aten.slice.Tensor(t, dim, k.start, k.stop, step)
            tensors.append(None)
            dim += 1
        else:
            raise TypeError(f"fake_cuda: cannot index with {type(k).__name__}")
    return t, tensors


def _getitem(t: torch.Tensor, key) -> torch.Tensor:
    t, tensors = _basic_indexing(t, key)
    return torch.ops.aten.index.Tensor(t, tensors) if any(x is not None for x in tensors) else t


def _setitem(t: torch.Tensor, key, value) -> None:
    t, tensors = _basic_indexing(t, key)
    value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=t.dtype, device=t.device)
    if any(x is not None for x in tensors):
        torch.ops.aten.index_put_(t, tensors, value)
    else:
        torch.ops.aten.copy_.default(t, value)


class FakeCuda:
    """What a `fake_cuda()` block counted: `host_reads`, the reads of CUDA tensors the host waits
    for, and `async_reads`, the non-blocking copies into host buffers (a host read that waits only
    if the device has not got that far: respec/run_ahead.py `Behind`)."""

    def __init__(self):
        self.host_reads = 0
        self.async_reads = 0
        self.uploads = 0  # host-to-device copies: host data made a CUDA tensor, a CPU tensor moved or copied in


class _HostMoves(TorchFunctionMode):
    """CPU -> CUDA moves and host reads of fake tensors (see the module docstring)."""

    def __init__(self, counts: FakeCuda):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            t = args[0]
            if func is torch.Tensor.cuda:
                device, dtype = torch.device("cuda", 0), t.dtype
            elif args[1:] and isinstance(args[1], torch.Tensor):
                device, dtype = args[1].device, args[1].dtype
            else:
                device, dtype, *_ = torch._C._nn._parse_to(*args[1:], **kwargs)
                dtype = dtype or t.dtype
            if device is not None and torch.device(device).type == "cuda":  # torch refuses even cuda -> cuda
                if t.device.type == "cuda":
                    return t if dtype == t.dtype else func(t, dtype)
                self.counts.uploads += 1
                return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device,
                                           requires_grad=t.requires_grad)
            if device is not None and torch.device(device).type == "cpu" and t.device.type == "cuda":
                self.counts.host_reads += 1
        if func is torch.Tensor.cpu and args[0].device.type == "cuda":
            self.counts.host_reads += 1
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            return _getitem(*args)
        if func is torch.Tensor.__setitem__ and args[0].device.type == "cuda":
            return _setitem(*args)
        if func is torch.Tensor.copy_ and args[0].device.type == "cuda":
            self.counts.uploads += args[1].device.type != "cuda"
            return torch.ops.aten.copy_.default(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cuda" and not isinstance(args[0], torch.Tensor):
            self.counts.uploads += 1
        if func is torch.Tensor.copy_ and args[1].device.type == "cuda":  # a read into a host buffer
            if kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self.counts.async_reads += 1
            else:
                self.counts.host_reads += 1
        if func is torch.Tensor.__invert__ and args[0].device.type == "cuda":
            return torch.ops.aten.bitwise_not.default(args[0])
        if func is torch.Tensor.item:
            self.counts.host_reads += args[0].device.type == "cuda"
            return _zeros_like_list(args[0].reshape(()))
        return func(*args, **kwargs)


CARD_BYTES = 80 << 30  # the fake card's memory
fake_tolist = FakeTensor.tolist


@contextlib.contextmanager
def fake_cuda(free_bytes: int = CARD_BYTES):
    """Run the block with fake tensors in which `device="cuda"` works on any machine, on a card with
    `free_bytes` of its memory free; yields the block's `FakeCuda` counts."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    swap, mem_get_info = torch.utils.swap_tensors, torch.cuda.mem_get_info

    def swap_unmemoised(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return swap(t1, t2)

    torch.utils.swap_tensors = swap_unmemoised
    torch.cuda.mem_get_info = lambda device=None: (free_bytes, CARD_BYTES)
    counts = FakeCuda()

    def tolist(t):  # FakeTensor's own reads element by element: one read, as on a GPU
        counts.host_reads += t.device.type == "cuda"
        return _zeros_like_list(t)

    FakeTensor.tolist = tolist
    try:
        with mode, _HostMoves(counts):
            yield counts
    finally:
        FakeTensor.tolist = fake_tolist
        torch.utils.swap_tensors, torch.cuda.mem_get_info = swap, mem_get_info
        sampling._VOCAB_HASHES.clear()  # fake tables must not outlive their mode (the next one refuses them)
