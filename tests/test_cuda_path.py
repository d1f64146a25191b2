"""The CUDA path, checked on the CPU (tests/test_cuda.py checks it on a GPU, where one is lent).

Two halves:
  * The whole-step compile path (the one CUDA graphs use) traced on the CPU with `aot_eager`
    behind a backend that reads what inductor's CUDA-graph check reads: which inputs a graph
    mutates in place and which it may treat as static addresses. Inductor records CUDA graphs only
    for a graph whose every mutated input is static, so the KV pools must be the only mutated
    inputs and all marked static (compile/policy.py). Also: the same tokens as eager (plain, EAGLE
    and history SD), one graph per (step function, k) across batch sizes, and a warm-up after
    which a timed region meets no shape it has not called twice (the condition for no CUDA graph
    to be recorded inside a timed run).
  * The model, the engine (plain, EAGLE and history SD) and the trainer built and run with
    `device="cuda"` on fake tensors (tests/fake_cuda.py): an op that mixes a CPU tensor into a
    CUDA path raises here as it would on a GPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from compile.policy import CompiledSteps
from models.loading import load_model
from respec.drafters.history import HistoryDrafter
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import warmup
from tests.fake_cuda import fake_cuda
from tests.test_eagle import head_for

PROMPTS = [[1, 2, 3, 4, 5], [7] * 30, [9, 8, 7], [11] * 3, [300, 200, 100, 50, 25]]
REPEATING = [[5, 6, 7, 8] * 6, [9, 10, 11] * 7, [12, 13] * 9]  # the history drafter finds matches here


class GraphInspector:
    """A torch.compile backend: aot_eager, recording for each graph the inputs it mutates in place
    and the inputs inductor would take as static (the two sets its CUDA-graph check compares)."""

    def __init__(self):
        self.graphs: list[dict] = []

    def __call__(self, gm, example_inputs):
        def inspect(graph, inputs):
            meta = torch._guards.TracingContext.get().fw_metadata
            index = {node: i for i, node in enumerate(graph.graph.find_nodes(op="placeholder"))}
            copies = graph.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
            mutated = sorted({index[n.args[0]] for n in copies if n.args[0] in index})
            self.graphs.append({"mutated": mutated, "static": set(meta.static_input_indices),
                                "mutated_shapes": [tuple(inputs[i].shape) for i in mutated]})
            return make_boxed_func(graph.forward)

        # keep_inference_input_mutations: the in-place writes stay in the graph as copy_ into the
        # inputs, as inductor compiles them
        return aot_autograd(fw_compiler=inspect, keep_inference_input_mutations=True)(gm, example_inputs)


def drafter_of(kind, model):
    return {"plain": lambda: None, "eagle": lambda: head_for(model, 300),
            "history": lambda: HistoryDrafter(min_match=1)}[kind]()


def whole_step_engine(model, kind, inspector=None, **kw):
    drafter = drafter_of(kind, model)
    engine = RolloutEngine(model, kv_cache_bytes=64 << 20, eager=inspector is None, compile_mode="whole", max_batch=8,
                           drafter=drafter, num_draft_tokens=3 if drafter is not None else 0, **kw)
    if inspector is not None:
        engine.steps.backend = inspector
    return engine


def rollout(engine, kind):
    """Rows of different lengths, so the batch goes through buckets 8, 4 and 2 (greedy on repeating
    prompts for the history drafter, which then proposes; sampled at T = 0.8 otherwise)."""
    prompts = REPEATING if kind == "history" else PROMPTS
    params = [SamplingParams(max_new_tokens=8 + 6 * i, seed=i, temperature=0.0 if kind == "history" else 0.8,
                             stop_on_eos=False) for i in range(len(prompts))]
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.parametrize("kind", ["plain", "eagle", "history"])
def test_whole_step_graphs_are_what_cuda_graphs_need(tiny, kind):
    want = rollout(whole_step_engine(tiny, kind), kind)
    inspector = GraphInspector()
    engine = whole_step_engine(tiny, kind, inspector)
    assert rollout(engine, kind) == want
    assert engine.steps.mode == "whole"
    if kind != "plain":
        assert engine.stats.sd_steps > 0
    pool_shape = tuple(engine.cache.pools[0].shape)
    draft_shapes = {tuple(p.shape) for p in engine.cache.draft_pools}
    for g in inspector.graphs:
        assert g["mutated"], "a step that writes no KV pool"
        assert set(g["mutated"]) <= g["static"], f"mutated inputs not static: {sorted(set(g['mutated']) - g['static'])}"
        assert set(g["mutated_shapes"]) <= {pool_shape} | draft_shapes, g["mutated_shapes"]  # only the pools
    # one graph per (step function, k) for every batch size: plain decoding; + the verify at k = 3;
    # + the head's draft step (EAGLE)
    assert len(inspector.graphs) == {"plain": 1, "history": 2, "eagle": 3}[kind]
    assert set(engine.stats.batch_sizes) >= {1, 2, 3}


def test_unmarked_pools_fail_the_static_check(tiny, monkeypatch):
    """The check above has power: without `static_inputs` the pools are mutated but not static
    (inductor would skip CUDA graphs for every step)."""
    monkeypatch.setattr(CompiledSteps, "static_inputs", lambda self, tensors: None)
    inspector = GraphInspector()
    rollout(whole_step_engine(tiny, "plain", inspector), "plain")
    assert inspector.graphs and all(not set(g["mutated"]) <= g["static"] for g in inspector.graphs)


@pytest.mark.parametrize("kind", ["plain", "history"])
def test_warmup_leaves_no_shape_to_record_in_a_timed_region(tiny, kind):
    """After `warmup` (each batch bucket, k and block-table width called twice) a timed rollout
    meets only warm shapes; without it, it does not (so the check can fail)."""
    prompts = REPEATING if kind == "history" else PROMPTS
    longest = max(map(len, prompts)) + 8 + 6 * (len(prompts) - 1)

    cold = whole_step_engine(tiny, kind, GraphInspector())
    with cold.steps.timed() as unwarmed:
        rollout(cold, kind)
    assert unwarmed

    warm = whole_step_engine(tiny, kind, GraphInspector())
    warmup(warm, [len(prompts)], max_context=longest, progress=False)
    with warm.steps.timed() as unwarmed:
        rollout(warm, kind)
    assert warm.stats.decode_steps > 0 and unwarmed == []


# ----------------------------------------------------------------------------------------------
def fake_cuda_rollout(kind: str) -> int:
    model = load_model("tiny", device="cuda", dtype=torch.bfloat16)
    drafter = drafter_of(kind, model)
    drafter = drafter.to("cuda", torch.bfloat16) if isinstance(drafter, torch.nn.Module) else drafter
    engine = RolloutEngine(model, kv_cache_bytes=16 << 20, eager=True, max_batch=8, drafter=drafter,
                           num_draft_tokens=3 if drafter is not None else 0)
    assert engine.device.type == "cuda" and all(p.device.type == "cuda" for p in engine.cache.pools)
    out = engine.generate(REPEATING, [SamplingParams(max_new_tokens=6 + i, temperature=0.8, seed=i, stop_on_eos=False)
                                      for i in range(len(REPEATING))])
    assert [len(o.token_ids) for o in out] == [6, 7, 8]
    return engine.stats.sd_steps


@pytest.mark.parametrize("kind", ["plain", "eagle", "history"])
def test_engine_on_fake_cuda(kind):
    with fake_cuda():
        sd_steps = fake_cuda_rollout(kind)
    assert (sd_steps > 0) == (kind != "plain")


def test_a_cpu_tensor_in_a_cuda_step_fails_on_fake_cuda(monkeypatch):
    """The fake-CUDA tests have power: a step that gets its sampling tensors on the CPU fails."""
    def row_params_on_the_cpu(self, seqs, rows):
        params, use_filter = original(self, seqs, rows)
        return [t.cpu() for t in params], use_filter

    original = RolloutEngine._row_params
    monkeypatch.setattr(RolloutEngine, "_row_params", row_params_on_the_cpu)
    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError):
        fake_cuda_rollout("plain")


@pytest.mark.parametrize("sd", ["off", "history"])
def test_trainer_builds_and_rolls_out_on_fake_cuda(tokenizer, sd):
    """The trainer's construction on `cuda` (actor, rollout copy, optimizer, engine, drafter) and a
    rollout of its engine. (The update cannot run here: autograd takes a CUDA device guard, which a
    CPU-only build of torch lacks; tests/test_cuda.py runs it on a GPU.)"""
    from respec import distributed
    from respec.config import TrainConfig
    from respec.trainer import Trainer

    cfg = TrainConfig(model="tiny", task="toy-letters", steps=1, prompts=2, group=2, max_new_tokens=6, compile="off",
                      progress=False, kv_cache_mb=16, sd="off" if sd == "off" else "on",
                      drafter="none" if sd == "off" else sd, k=2)
    with tempfile.TemporaryDirectory() as tmp, fake_cuda():
        trainer = Trainer(cfg, d=distributed.Dist(device=torch.device("cuda")), run_dir=Path(tmp), tokenizer=tokenizer,
                          log=lambda m: None)
        assert {p.device.type for p in trainer.actor.parameters()} == {"cuda"}
        assert {p.device.type for p in trainer.rollout.model.parameters()} == {"cuda"}
        out = trainer.engine.generate(REPEATING[:2], SamplingParams(max_new_tokens=6, stop_on_eos=False))
    assert [len(o.token_ids) for o in out] == [6, 6]
    assert (trainer.engine.stats.sd_steps > 0) == (sd != "off")
