"""Data parallelism for the trainer: process groups, FSDP2 on the actor, and the rollout copy.

The same code runs as one process (`python train.py`) and under torchrun
(`torchrun --nproc_per_node=N train.py`, NCCL on CUDA, gloo on CPU). Multi-node uses torchrun's
usual rendezvous, e.g. on each of two nodes:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

Parallelism is applied from outside the model (as torchtitan does): `apply_fsdp` calls
`fully_shard` on each decoder block, then on the root, under one `MixedPrecisionPolicy`. Each rank
rolls out its own share of the prompts with a full, unsharded copy of the actor (`RolloutCopy`),
refreshed from the shards after every update. In one process nothing is sharded and the rollout
engine reads the actor's own tensors: no copy at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT = timedelta(minutes=45)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """The first rank of its node: writes what every rank of the node reads from its cache."""
        return self.local_rank == 0


def init(device_kind: str = "auto") -> Dist:
    """Join torchrun's process group if launched by torchrun, else run as a single process."""
    cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if cuda:  # fp32 matrix products (the trainer's fp32 master weights, the head's loss) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # A first run may pretrain the default drafter and compile every step shape while the other
        # ranks wait at a barrier: minutes, past NCCL's default 10-minute timeout on a slow node.
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=COLLECTIVE_TIMEOUT)
    return Dist(rank, world, local, device)


def shutdown(*, clean: bool = False) -> None:
    """The end of the process: the device's queued work finished, then the process group left.

    The device is synchronised first, so that NCCL's teardown does not race kernels still queued
    (a collective, an asynchronous copy) and an error in them is raised here rather than lost in a
    destructor. A barrier comes before `destroy_process_group` (a collective call in some NCCL
    versions) only when `clean`, this rank having finished its run: after an error a rank may be
    inside a collective the others never reach, and a barrier would wait out COLLECTIVE_TIMEOUT
    (45 minutes). A clean rank whose peer failed later is no such risk under torchrun, which ends
    every worker when one exits with an error."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def has_teardown() -> bool:
    """Whether `shutdown` has anything to do (a process group, or a device with queued work)."""
    return dist.is_initialized() or (torch.cuda.is_available() and torch.cuda.is_initialized())


def _all_reduce(values: list[float], d: Dist, op) -> list[float]:
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few floats over ranks (metrics, token counts). Identity in one process."""
    return _all_reduce(values, d, dist.ReduceOp.SUM)


def all_reduce_named(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Sum named floats over ranks, by name (one all-reduce over the sorted keys): adding a
    metric cannot shift the others."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_sum([float(values[k]) for k in keys], d)))


def all_reduce_max(values: list[float], d: Dist) -> list[float]:
    """Elementwise max of a few floats over ranks (the slowest rank's phase time)."""
    return _all_reduce(values, d, dist.ReduceOp.MAX)


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's `obj` (picklable) as a list in rank order on the main rank, None elsewhere."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj, d: Dist) -> list:
    """Every rank's `obj` (picklable) as a list in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def apply_fsdp(model, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32) -> None:
    """Shard `model` (a models.decoder.Decoder) over the default process group: each block, then
    the root (embedding, final norm, head). Blocks reshard after forward (their parameters are
    gathered again for backward); the root keeps its parameters, which backward needs first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def load_sharded(load, d: Dist, *, param_dtype: torch.dtype, shard: bool, prepare=None):
    """`load()` (a Decoder, from any format), `prepare(model)`d (LoRA's adapters) and, with `shard`,
    sharded with FSDP2 (`apply_fsdp`). With several ranks only the main rank ever holds the model
    whole: it loads it, every other rank builds it on the meta device from the main rank's config,
    all shard it, and the main rank's weights (the adapters' initial values too) go to every rank's
    shards (`set_model_state_dict`, broadcast from rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from models.decoder import Decoder

    full = load() if d.main else None
    if full is not None and prepare is not None:
        prepare(full)
    if d.world == 1:
        if shard:
            apply_fsdp(full, param_dtype=param_dtype)
        return full
    cfg, requires_grad = all_gather((full.cfg, {n: p.requires_grad for n, p in full.named_parameters()})
                                    if d.main else None, d)[0]
    with torch.device("meta"):
        model = Decoder(cfg)
    if prepare is not None:
        prepare(model)
    apply_fsdp(model, param_dtype=param_dtype)
    model.to_empty(device=d.device)
    model.tie_weights()
    model.init_buffers(d.device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    return model.eval()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor parameter gathered whole; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class RolloutCopy:
    """The weights the rollout engine reads.

    `model` is the actor itself when nothing is sharded and the rollout dtype is the training
    dtype; otherwise a separate unsharded Decoder in the rollout dtype, refreshed by `sync` from
    the actor's (sharded) parameters after every optimizer step. An actor with LoRA adapters
    (respec/lora.py) always has a copy: the rollout reads the merged weights."""

    def __init__(self, actor, *, dtype: torch.dtype, sharded: bool, captured: bool = False):
        from respec import lora

        self.actor = actor
        self.captured = captured  # the engine captures its steps by hand (`--compile-mode graphs`): see `release`
        self.lora_scale = lora.scalings(actor) if lora.has_lora(actor) else None
        self.shared = not sharded and next(actor.parameters()).dtype == dtype and self.lora_scale is None
        if self.shared:
            self.model = actor
            return
        from models.decoder import Decoder

        with torch.device("meta"):
            copy = Decoder(actor.cfg)
        device = next(actor.parameters()).device
        copy.to_empty(device=device)
        copy.tie_weights()
        copy.init_buffers(device)
        self.model = copy.to(dtype).eval().requires_grad_(False)
        self.shapes = {name: p.shape for name, p in self.model.named_parameters()}
        self.released = False
        self.sync()

    def release(self) -> None:
        """While the actor trains, when nothing reads the copy until `sync`: on a CPU its weights are
        dropped (their memory is the update's: 0.25 GiB of SmolLM2-135M in bf16) and `sync` makes
        them again, in the same Parameter objects (every module that shares them sees the new ones).
        Not on a GPU, where graphs captured over the copy read its weights at fixed addresses, nor
        where the engine's steps are captured by hand on a CPU (their simulation checks the same)."""
        if self.shared or self.captured or next(self.model.parameters()).device.type != "cpu":
            return
        for p in self.model.parameters():
            p.data = p.data.new_empty(0)
        self.released = True

    @torch.no_grad()
    def sync(self) -> None:
        if self.shared:
            return
        mine = dict(self.model.named_parameters())
        if self.released:
            for name, p in mine.items():
                p.data = p.data.new_empty(self.shapes[name])
            self.released = False
        if self.lora_scale is not None:  # W + (alpha / r) B A, from the gathered base and adapters
            from respec import lora

            state = {name: full_tensor(p.detach()) for name, p in self.actor.named_parameters()}
            for name, t in lora.merged(state, self.lora_scale).items():
                mine[name].copy_(t)
            return
        for name, p in self.actor.named_parameters():  # every rank takes part in each all-gather
            mine[name].copy_(full_tensor(p.detach()))
