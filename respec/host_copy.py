"""A step's small integer inputs moved to the device in one copy.

On a GPU each `torch.tensor(host_list, device="cuda")` is a copy of its own from pageable memory,
which the host waits for: a speculative step's inputs (the rows' newest tokens, their positions,
their draft caps and block tables; then the drafts and how many each row has) were six such
copies, a plain step's three. `to_device` packs them into one int64 buffer in pinned memory and
copies it once without blocking the host; each input is a view of the device copy, starting at a
multiple of 16 bytes (compiled steps assume aligned inputs and copy any that are not). On a CPU each
input is a tensor of its own (there is no copy to save), read from an `array` of the ints.
"""

from __future__ import annotations

from array import array
from itertools import chain

import torch

ALIGN = 2  # int64 elements per 16 bytes


def to_device(device: torch.device, *parts: list) -> list[torch.Tensor]:
    """Each part (a list of ints, or a non-empty list of equal-length lists of ints) as an int64
    tensor on `device` (1-d or 2-d), all in one host-to-device copy on a GPU."""
    if device.type == "cpu":
        return [host_tensor(p) for p in parts]
    if device.type != "cuda":
        return [torch.tensor(p, dtype=torch.int64, device=device) for p in parts]
    flat, spans = packed(parts)
    host = torch.tensor(flat, dtype=torch.int64, pin_memory=torch.cuda.is_available())
    return views(host.to(device, non_blocking=True), spans)


def host_tensor(part: list) -> torch.Tensor:
    """A list of ints (or of equal-length lists of ints) as an int64 CPU tensor, through an
    `array` of machine integers: a few microseconds for a step's thousand numbers, where
    `torch.tensor` converts them one by one (tens of microseconds)."""
    nested = bool(part) and isinstance(part[0], list)
    flat = array("q", chain.from_iterable(part) if nested else part)
    if not flat:
        return torch.zeros((len(part), 0) if nested else (0,), dtype=torch.int64)
    t = torch.frombuffer(flat, dtype=torch.int64)  # (shares the array's memory, and keeps it alive)
    return t.view(len(part), -1) if nested else t


def packed(parts) -> tuple[list[int], list[tuple[int, tuple[int, ...]]]]:
    """The parts as one flat list, each starting at a multiple of ALIGN, and each one's (start, shape)."""
    flat, spans = [], []
    for p in parts:
        start = len(flat)
        if p and isinstance(p[0], list):
            shape = (len(p), len(p[0]))
            for row in p:
                flat += row
        else:
            shape = (len(p),)
            flat += p
        spans.append((start, shape))
        flat += [0] * (-len(flat) % ALIGN)
    return flat, spans


def views(flat: torch.Tensor, spans) -> list[torch.Tensor]:
    """The parts `packed` laid out, as views of `flat`."""
    return [flat[start: start + (shape[0] * shape[1] if len(shape) == 2 else shape[0])].view(shape)
            for start, shape in spans]
