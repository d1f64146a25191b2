"""The CUDA path, checked on the CPU (tests/test_cuda.py checks it on a GPU, where one is lent).

Three parts:
  * The whole-step compile path (the one CUDA graphs use) traced on the CPU with `aot_eager`
    behind a backend that reads what inductor's CUDA-graph check reads: which inputs a graph
    mutates in place and which it may treat as static addresses. Inductor records CUDA graphs only
    for a graph whose every mutated input is static, so the KV pools must be the only mutated
    inputs and all marked static (compile/policy.py). Also: the same tokens as eager (plain, EAGLE
    and history SD), one graph per (step function, k) across batch sizes, and a warm-up after
    which a timed region meets no shape it has not called twice (the condition for no CUDA graph
    to be recorded inside a timed run).
  * The 32-bit index bound (compile/policy.py): on a GPU inductor indexes a kernel in 32 bits
    where it can, and where the declared ranges of the dynamic dimensions do not prove a tensor
    below 2^31 elements it installs a guard, which against a `mark_dynamic` range is an error. CPU
    inductor never does, so `IndexBounds` reads every traced tensor's element count under the
    declared ranges and installs that guard itself: too wide a range fails here as it did on an H200.
  * The model, the engine (plain, EAGLE and history SD) and the trainer built and run with
    `device="cuda"` on fake tensors (respec/lab/fake_cuda.py): an op that mixes a CPU tensor into a
    CUDA path raises here as it would on a GPU.

Private torch names are imported with a fallback, so the module imports on the torch a GPU
machine has (tests/test_cuda.py runs there and shares its prompts, tests/prompts.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import dataclasses

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
from torch.utils._sympy.value_ranges import bound_sympy

from compile import cuda_graphs
from compile.policy import BATCH_BUCKETS, INT32_MAX, CompiledSteps, largest_step_tensor
from models.decoder import PRESETS
from models.loading import load_model, random_model
from respec.drafters.history import HistoryDrafter
from respec.drafters.hybrid import HybridDrafter
from respec.drafters.replay import ReplayDrafter
from respec.drafters.wrap import as_drafter
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import synthetic_steps, warmup
from respec.sampling import padded_vocab
from respec.lab.fake_cuda import fake_cuda
from tests.prompts import PROMPTS, REPEATING
from tests.test_eagle import head_for

try:  # torch 2.13; older releases raise a plain RuntimeError naming the two devices
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
except ImportError:
    FakeTensorDeviceMismatchError = RuntimeError


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
            ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
            self.graphs.append({"mutated": mutated, "static": set(meta.static_input_indices),
                                "mutated_shapes": [tuple(inputs[i].shape) for i in mutated], "ops": ops})
            return make_boxed_func(graph.forward)

        # keep_inference_input_mutations: the in-place writes stay in the graph as copy_ into the
        # inputs, as inductor compiles them
        return aot_autograd(fw_compiler=inspect, keep_inference_input_mutations=True)(gm, example_inputs)


# Ops a step captured as a CUDA graph must not hold: a host read of a device value (an error while a
# stream captures) or a data-dependent shape, and a draw from torch's generator (the engine's noise is
# counter-based, respec/sampling.py: a draw would tie tokens to the order of calls, and the warm runs
# before a capture would advance it)
CAPTURE_FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "bernoulli", "normal",
                     "exponential", "multinomial", "uniform", "rand", "rand_like", "randn", "randn_like",
                     "randint", "randint_like", "randperm", "seed", "philox_rand", "run_with_rng_state"}


def capture_faults(graph: dict) -> list[str]:
    """The ops of an inspected graph (GraphInspector) that a CUDA graph's capture refuses or freezes."""
    return sorted(op for op in graph["ops"] if op.split(".")[-2 if op.count(".") >= 2 else -1].rstrip("_")
                  in CAPTURE_FORBIDDEN)


def drafter_of(kind, model):
    return {"plain": lambda: None, "eagle": lambda: head_for(model, 300),
            "history": lambda: HistoryDrafter(min_match=1),
            "history-ahead": lambda: HistoryDrafter(min_match=1, ahead=True)}[kind]()


def whole_step_engine(model, kind, inspector=None, *, mode="whole", **kw):
    drafter = drafter_of(kind, model)
    engine = RolloutEngine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 64 << 20), eager=inspector is None,
                           compile_mode=mode, max_batch=8,
                           drafter=drafter, num_draft_tokens=3 if drafter is not None else 0, **kw)
    if inspector is not None:
        engine.steps.backend = inspector
    return engine


def rollout(engine, kind):
    """Rows of different lengths, so the batch goes through buckets 8, 4 and 2 (greedy on repeating
    prompts for the history drafter, which then proposes; sampled at T = 0.8 otherwise)."""
    history = kind.startswith("history")
    prompts = REPEATING if history else PROMPTS
    params = [SamplingParams(max_new_tokens=8 + 6 * i, seed=i, temperature=0.0 if history else 0.8,
                             stop_on_eos=False) for i in range(len(prompts))]
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.parametrize("kind", ["plain", "eagle", "history"])
def test_whole_step_graphs_are_what_cuda_graphs_need(tiny, kind):
    """The whole-step graphs (what CUDA-graph trees record and `--compile-mode graphs` captures by
    hand) give the eager tokens, write only the KV pools, all static inputs, and hold no op a
    capture refuses or freezes (`capture_faults`)."""
    want = rollout(whole_step_engine(tiny, kind), kind)
    inspector = GraphInspector()
    engine = whole_step_engine(tiny, kind, inspector)
    assert rollout(engine, kind) == want
    assert engine.steps.mode == "whole"
    if kind != "plain":
        assert engine.stats.sd_steps > 0
    else:  # plain steps run ahead of the host (respec/run_ahead.py) through the same graph
        assert engine.stats.ahead_steps > engine.stats.decode_steps / 2
    pool_shape = tuple(engine.cache.pools[0].shape)
    draft_shapes = {tuple(p.shape) for p in engine.cache.draft_pools}
    for g in inspector.graphs:
        assert g["mutated"], "a step that writes no KV pool"
        assert set(g["mutated"]) <= g["static"], f"mutated inputs not static: {sorted(set(g['mutated']) - g['static'])}"
        assert set(g["mutated_shapes"]) <= {pool_shape} | draft_shapes, g["mutated_shapes"]  # only the pools
        assert not capture_faults(g), capture_faults(g)
    # one graph per (step function, k) for every batch size: plain decoding; + the verify at k = 3;
    # + the head's draft step (EAGLE)
    assert len(inspector.graphs) == {"plain": 1, "history": 2, "eagle": 3}[kind]
    assert set(engine.stats.batch_sizes) >= {1, 2, 3}


def test_the_capture_check_finds_host_reads_and_generator_draws():
    """Power of the check above: a step that reads a value back to the host or draws from torch's
    generator is named by `capture_faults`; its own arithmetic is not."""
    def step(x):
        count = (x > 0).sum().item()  # an int read back (a float one dynamo keeps on the device)
        return x * count + torch.rand_like(x) + torch.randn(3), torch.nonzero(x)

    inspector = GraphInspector()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        torch.compile(step, backend=inspector, fullgraph=True)(torch.ones(3))
    torch.compile(lambda x: x * 2 + 1, backend=inspector, fullgraph=True)(torch.ones(3))
    faults = [capture_faults(g) for g in inspector.graphs]
    assert faults[0] == ["aten._local_scalar_dense.default", "aten.nonzero.default", "aten.rand_like.default",
                         "aten.randn.default"], faults
    assert faults[1] == []


def test_engines_share_one_compiled_step_per_function_and_k(tiny):
    """A plain engine and an SD engine in one process (a benchmark's two) compile the decode step
    once between them: two graphs in all, the decode step and the k = 3 verify."""
    inspector = GraphInspector()
    rollout(whole_step_engine(tiny, "plain", inspector), "plain")
    sd = whole_step_engine(tiny, "history", inspector)
    rollout(sd, "history")
    assert sd.stats.sd_steps > 0 and sd.stats.decode_steps > 0
    assert len(inspector.graphs) == 2


def test_unmarked_pools_fail_the_static_check(tiny, monkeypatch):
    """The check above has power: without `static_inputs` the pools are mutated but not static
    (inductor would skip CUDA graphs for every step)."""
    monkeypatch.setattr(CompiledSteps, "static_inputs", lambda self, tensors: None)
    inspector = GraphInspector()
    rollout(whole_step_engine(tiny, "plain", inspector), "plain")
    assert inspector.graphs and all(not set(g["mutated"]) <= g["static"] for g in inspector.graphs)


def test_regional_dynamic_sd_steps_give_the_eager_tokens(tiny):
    """The GPU check's fallback path (`--compile-mode regional-dynamic`, its smoke stage's second):
    an SD verify writes k + 1 slots a row, so its slot mapping (rows x tokens, flattened) outgrows
    the rows' bound; declared with that bound it was a constraint violation in every verify of more
    than max_rows / (k + 1) rows (here 4 rows x 4 tokens against 8). Traced with an EAGLE head (the
    verify's blocks and the head's draft steps), the eager tokens."""
    kind = "eagle"
    want = rollout(whole_step_engine(tiny, kind), kind)
    engine = whole_step_engine(tiny, kind, GraphInspector(), mode="regional-dynamic")
    assert rollout(engine, kind) == want
    assert engine.stats.sd_steps > 0 and engine.steps.dynamic_batch


@pytest.mark.parametrize("kind", ["plain", "history", "history-ahead", "eagle"])
def test_warmup_leaves_no_shape_to_record_in_a_timed_region(tiny, kind):
    """After `warmup` (each batch bucket, k and block-table width called twice) a timed rollout
    meets only warm shapes; without it, it does not (so the check can fail)."""
    prompts = REPEATING if kind.startswith("history") else PROMPTS
    longest = max(map(len, prompts)) + 8 + 6 * (len(prompts) - 1)

    cold = whole_step_engine(tiny, kind, GraphInspector())
    with cold.steps.timed() as unwarmed:
        rollout(cold, kind)
    assert any("called 0x before" in u for u in unwarmed)  # predicted from the shapes,
    assert any("compiled inside the timed region" in u for u in unwarmed)  # and counted

    warm = whole_step_engine(tiny, kind, GraphInspector())
    warmup(warm, [len(prompts)], max_context=longest, progress=False)
    with warm.steps.timed() as unwarmed:
        rollout(warm, kind)
    assert warm.stats.decode_steps > 0 and unwarmed == []


# --- manual capture (compile/cuda_graphs.py), its buffering checked with simulated graphs ------------
def captured_engine(model, kind):
    """`--compile-mode graphs` traced with aot_eager: on the CPU each shape's graph is a
    SimulatedGraph (a replay runs the step on the static buffers into the outputs' fixed tensors)."""
    return whole_step_engine(model, kind, "aot_eager", mode="graphs")


@pytest.mark.parametrize("kind", ["plain", "eagle", "history"])
def test_captured_graphs_give_the_eager_tokens_and_capture_each_shape_once(tiny, kind):
    want = rollout(whole_step_engine(tiny, kind), kind)
    engine = captured_engine(tiny, kind)
    before = cuda_graphs.captures()
    assert rollout(engine, kind) == want
    first = cuda_graphs.captures() - before
    graphs = sum(len(step.graphs) for step in engine.steps._cache.values())
    assert first == graphs > 0  # one capture per input shape met
    if kind != "plain":
        assert engine.stats.sd_steps > 0
    assert rollout(engine, kind) == want  # replays only: nothing captured again
    assert cuda_graphs.captures() - before == first


def test_a_replay_that_skips_copying_its_inputs_in_gives_other_tokens(tiny, monkeypatch):
    """The test above has power: replaying on the first call's inputs (no copy into the static
    buffers) changes the tokens, and so does handing out the graph's outputs uncloned (a later
    replay overwrites what the run-ahead loop still holds)."""
    want = rollout(whole_step_engine(tiny, "plain"), "plain")

    def no_copy_in(self, *args):
        key = cuda_graphs.shape_key(args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, _ = self.graphs[key]
        graph.replay()
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in graph.outputs)

    with monkeypatch.context() as m:
        m.setattr(cuda_graphs.StepGraphs, "__call__", no_copy_in)
        assert rollout(captured_engine(tiny, "plain"), "plain") != want

    def no_clone_out(self, *args):
        original(self, *args)
        return self.graphs[cuda_graphs.shape_key(args)][0].outputs

    original = cuda_graphs.StepGraphs.__call__
    monkeypatch.setattr(cuda_graphs.StepGraphs, "__call__", no_clone_out)
    assert rollout(captured_engine(tiny, "plain"), "plain") != want


def test_a_replay_handed_a_replaced_tensor_is_refused():
    """The captured graphs' replays are checked for what a capture fixes: every tensor the step's
    graph is handed (its inputs, the weights, the pools) at the capture's address. The tests above
    pass that check on every replay (plain, EAGLE and history SD, two rollouts each); here it has
    power: a KV pool, then a weight's storage, replaced by a copy after the capture (the same
    values, so the tokens on the CPU are the same) is refused at the next replay, where a CUDA
    graph would read or write the old memory. (A refused rollout leaves its engine mid-step: each
    case has an engine of its own, the second replaying as the first did before the change.)"""
    model = load_model("tiny", dtype=torch.float32)
    engine = captured_engine(model, "plain")
    want = rollout(engine, "plain")
    engine.cache.pools[1] = engine.cache.pools[1].clone()
    with pytest.raises(RuntimeError, match="at another address than at its capture"):
        rollout(engine, "plain")
    engine = captured_engine(model, "plain")
    assert rollout(engine, "plain") == want and rollout(engine, "plain") == want  # (captured, then replayed)
    model.norm.weight.data = model.norm.weight.data.clone()
    with pytest.raises(RuntimeError, match="at another address than at its capture"):
        rollout(engine, "plain")


@pytest.mark.parametrize("dtype,sd", [("fp32", "off"), ("bf16", "off"), ("fp32", "head")])
def test_grpo_steps_on_captured_graphs_update_the_weights_in_place(tmp_path, tokenizer, dtype, sd):
    """Two GRPO steps with the engine's steps captured by hand (`--compile-mode graphs`, traced with
    aot_eager here): the second rollout replays the first one's graphs, which pass the check above
    only if every update reached the weights where the capture read them. It failed in both ways a
    CPU run refreshed them: oneDNN's packed copies made anew after each update (fp32: the actor is
    the rollout's model), and a rollout copy (bf16) dropped during the update and made again. Now a
    captured engine packs nothing and its copy is kept through the update (on a GPU neither happens).
    With an EAGLE head distilled online (in line), the second rollout drafts with the updated head,
    its weights copied into the head the graphs were captured over."""
    from respec import distributed
    from respec.config import TrainConfig
    from respec.trainer import Trainer

    drafting = dict(sd="on", k=2, drafter="random", drafter_update="rkd", drafter_async=False) if sd == "head" \
        else dict(sd="off")
    cfg = TrainConfig(model="tiny", task="toy-letters", steps=2, prompts=2, group=2, max_new_tokens=6, dtype=dtype,
                      compile="on", compile_mode="graphs", progress=False, kv_cache_mb=16, lr=1e-2,
                      warmup_steps=0, **drafting)
    trainer = Trainer(cfg, d=distributed.Dist(), run_dir=tmp_path / "run", tokenizer=tokenizer, log=lambda m: None)
    trainer.engine.steps.backend = "aot_eager"
    (tmp_path / "run").mkdir()
    trainer.start()
    before = [p.detach().clone() for p in trainer.rollout.model.parameters()]
    history = trainer.run()
    assert [m["step"] for m in history] == [1, 2]
    graphs = [g for step in trainer.engine.steps._cache.values() for g, _ in getattr(step, "graphs", {}).values()]
    assert graphs and all(g.reads for g in graphs)  # captured (at `start`), each noting what it was handed
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.rollout.model.parameters()))  # (it learned)
    if sd == "head":
        assert [m["drafter_version"] for m in history] == [0, 1] and all(m["sd_fraction"] > 0 for m in history)


def test_the_cuda_capture_calls_torch_as_a_capture_needs(monkeypatch):
    """CudaGraph cannot run without a GPU; here torch.cuda's stream and graph API are stand-ins that
    log their calls: warm runs on a side stream that waited for the current one, the current stream
    waiting for them, one capture into the shared pool (thread-local: the background distillation
    may use the device meanwhile), and the pool handed on to the next graph."""
    log = []

    class Stream:
        def wait_stream(self, other):
            log.append(("wait", self is current, other is current))

    class Graph:
        def __init__(self):
            self.replays = 0

        def pool(self):
            return "pool"

        def replay(self):
            self.replays += 1

    @contextlib.contextmanager
    def on_stream(stream):
        log.append(("side stream", stream is not current))
        yield

    @contextlib.contextmanager
    def capturing(graph, pool=None, capture_error_mode="global"):
        log.append(("capture", pool, capture_error_mode))
        yield

    current = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    calls = []
    step = lambda x: (calls.append(x.clone()) or x + 1,)  # noqa: E731
    graphs = cuda_graphs.StepGraphs(step, torch.device("cuda"), warm_runs=2)
    assert graphs.graph_type is cuda_graphs.CudaGraph
    graphs(torch.tensor([1]))
    graphs(torch.tensor([5]))  # replayed: copied in, not run
    graphs(torch.tensor([1, 2]))  # a new shape: captured into the same pool
    assert log[:5] == [("wait", False, True), ("side stream", True), ("wait", True, False),
                       ("capture", None, "thread_local"), ("wait", False, True)]
    assert ("capture", "pool", "thread_local") in log
    assert len(calls) == 6  # 2 warm runs + 1 captured run per shape
    first = graphs.graphs[cuda_graphs.shape_key((torch.tensor([1]),))]
    assert first[0].graph.replays == 2 and first[1][0].tolist() == [5]  # the second call's input, copied in


def test_warmup_captures_every_shape_a_timed_rollout_meets(tiny):
    prompts = REPEATING
    longest = max(map(len, prompts)) + 8 + 6 * (len(prompts) - 1)
    cold = captured_engine(tiny, "history")
    with cold.steps.timed() as unwarmed:
        rollout(cold, "history")
    assert any("not captured before" in u for u in unwarmed)
    assert any("CUDA graph(s) recorded inside the timed region" in u for u in unwarmed)
    warm = captured_engine(tiny, "history")
    warmup(warm, [len(prompts)], max_context=longest, progress=False)
    with warm.steps.timed() as unwarmed:
        rollout(warm, "history")
    assert warm.stats.sd_steps > 0 and unwarmed == []


# ----------------------------------------------------------------------------------------------
class IndexBounds:
    """A torch.compile backend: aot_eager, reading for every tensor of each traced forward graph the
    upper bound of its element count under the shape environment's declared ranges, and doing what
    inductor's GPU lowering does for 32-bit indexing (`can_use_32bit_indexing`): where the bound does
    not prove `numel <= 2^31 - 1` but the traced sizes satisfy it, it installs that guard. A guard
    that narrows a `mark_dynamic` range makes dynamo raise ConstraintViolationError, as on a GPU."""

    def __init__(self):
        self.tensors: list[tuple[float, str, str]] = []  # (upper bound, element count, node), every graph

    def __call__(self, gm, example_inputs):
        def inspect(graph, inputs):
            shape_env = torch._guards.TracingContext.get().fake_mode.shape_env
            for node in graph.graph.nodes:
                values = node.meta.get("val")
                for v in values if isinstance(values, (list, tuple)) else [values]:
                    if not isinstance(v, torch.Tensor) or isinstance(n := v.numel(), int):
                        continue
                    self.tensors.append((bound_sympy(n.node.expr, shape_env.var_to_range).upper, str(n), node.name))
                    bool(n <= INT32_MAX)  # a guard unless the declared ranges already prove it
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=inspect, keep_inference_input_mutations=True)(gm, example_inputs)

    def largest(self) -> tuple[float, str, str]:
        return max(self.tensors, key=lambda t: t[0])


def engine_of_every_step(vocab: int, backend, *, rows: int | None = None) -> RolloutEngine:
    """The whole-step engine at the largest batch bucket, with an EAGLE head (its draft step, a
    k = 3 verify with its q) and a replay drafter (the replay's 17-wide verify), on a tiny model with
    `vocab` tokens; `rows` overrides the declared row bound (the bound as once landed: 1 << 16)."""
    model = random_model(dataclasses.replace(PRESETS["tiny"], vocab_size=vocab), seed=0)
    drafter = HybridDrafter(as_drafter(head_for(model, 300)), ReplayDrafter())
    engine = RolloutEngine(model, kv_cache_bytes=32 << 20, eager=False, compile_mode="whole", max_batch=BATCH_BUCKETS[-1],
                           drafter=drafter, num_draft_tokens=3, replay_k=16)
    engine.steps.backend = backend
    if rows is not None:
        engine.steps.max_rows = rows
    return engine


def run_every_step(engine: RolloutEngine) -> None:
    """A decode step, a k = 3 SD step (the head's draft and the verify) and a replay's 16-draft verify."""
    for k in (0, 3, 16):
        synthetic_steps(engine, 3, k, 40, 1)


@pytest.mark.parametrize("vocab", [49152, 151936])  # SmolLM2's, Qwen2.5's
def test_compiled_steps_index_within_int32(vocab):
    """Every tensor of every traced whole-step graph (decode, the head's draft, verify at k = 3 and
    at the replay k = 16) is bounded below 2^31 elements by the declared ranges at the largest batch
    bucket (512 rows), so inductor needs no 32-bit guard; and the engine's own bound
    (`largest_step_tensor`, what it refuses by on CUDA) is at least the largest traced tensor."""
    bounds = IndexBounds()
    engine = engine_of_every_step(vocab, bounds)
    run_every_step(engine)
    called = {(name.split("(")[0], dict(shapes).get("drafts", (0, 0))[1]) for name, shapes in engine.steps.seen}
    assert called == {("decode_step", 0), ("eagle_draft", 0), ("verify_step", 3), ("verify_step", 16)}
    bound, numel, node = bounds.largest()
    assert bound <= INT32_MAX, f"{node}: {numel} elements, up to {bound} in the declared ranges"
    assert engine.steps.max_rows == 512
    claim, _ = largest_step_tensor(engine.model.cfg, rows=engine.steps.max_rows, width=engine.steps.max_width,
                                   block_size=engine.blocks.block_size, verify_width=17, vocab=padded_vocab(vocab),
                                   draft_pool_shape=engine.drafter.pool_shape)
    assert claim >= bound


def test_the_landed_row_bound_fails_the_int32_check():
    """The test above has power: rows declared up to 65,536 (the bound every graph died of on an
    H200) leave the logits unbounded below 2^31, and the guard inductor would install violates the
    declared range, as it did there."""
    bounds = IndexBounds()
    engine = engine_of_every_step(49152, bounds, rows=1 << 16)
    with pytest.raises(ConstraintViolationError, match=r"2147483647"):
        run_every_step(engine)
    bound, numel, _ = bounds.largest()
    assert bound > INT32_MAX


# ----------------------------------------------------------------------------------------------
def fake_cuda_rollout(kind: str) -> int:
    model = load_model("tiny", device="cuda", dtype=torch.bfloat16)
    if kind == "hybrid":  # the head and history side by side, as a training run's `auto+history`
        drafter = HybridDrafter(as_drafter(head_for(model, 300).to("cuda", torch.bfloat16)), HistoryDrafter())
    else:
        drafter = drafter_of(kind, model)
        drafter = drafter.to("cuda", torch.bfloat16) if isinstance(drafter, torch.nn.Module) else drafter
    engine = RolloutEngine(model, kv_cache_bytes=16 << 20, eager=True, max_batch=8, drafter=drafter,
                           num_draft_tokens=3 if drafter is not None else 0)
    assert engine.device.type == "cuda" and all(p.device.type == "cuda" for p in engine.cache.pools)
    out = engine.generate(REPEATING, [SamplingParams(max_new_tokens=6 + i, temperature=0.8, seed=i, stop_on_eos=False)
                                      for i in range(len(REPEATING))])
    assert [len(o.token_ids) for o in out] == [6, 7, 8]
    assert engine.stats.ahead_steps > 0 or kind != "plain"
    # on a GPU a hybrid's head steps run ahead of the host where history offers nothing, and the
    # history drafter's steps matched on the device (on a CPU neither does: respec/drafters/hybrid.py,
    # respec/drafters/history_ahead.py)
    assert (engine.drafter.runs_ahead and engine.stats.sd_ahead_steps > 0) == (kind in ("eagle", "history", "hybrid"))
    return engine.stats.sd_steps


@pytest.mark.parametrize("kind", ["plain", "eagle", "history", "hybrid"])
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


@pytest.mark.parametrize("sd", [False, True])
def test_a_decoding_step_reads_the_device_once(sd):
    """On a GPU every host read of a device tensor waits for the device. Counted on fake CUDA over
    rollouts of two lengths (the prefill's reads cancel), at 1 and 4 rows: an SD step (history
    drafter, k = 3) taken by itself reads its outputs back in one copy; plain steps run ahead of
    the host (respec/run_ahead.py) read one flag per step without blocking, and wait for the device
    once per run of up to 32 steps; so do the history drafter's SD steps matched on the device (at
    4 rows; respec/drafters/history_ahead.py), which send their inputs once per run. (The test below
    has the uploads of the other steps; the ones here are read here, each rollout run once.)"""
    from respec.lab.host_overhead import syncs_per_step

    counted = [syncs_per_step(rows, sd, run_ahead=0 if sd else 32) for rows in (1, 4)]
    assert [c["syncs"] for c in counted] == [1.0, 1.0]
    # step by step, an SD step sends its inputs in one copy and its drafts in one more (the test below);
    # plain steps run ahead send theirs once per run
    assert (counted[1]["uploads"] == 2.0) if sd else (counted[1]["uploads"] < 1.0)
    if sd:
        assert [c["blocking"] for c in counted] == [1.0, 1.0]
        # matched on the device, its steps run ahead: the host waits once per run, and sends the
        # rows' texts (and their prompts' earlier documents) once per run
        ahead = syncs_per_step(4, sd)
        assert ahead["syncs"] == 1.0 and 0 < ahead["blocking"] <= 1 / 16 and 0 < ahead["uploads"] <= 4 / 16
    else:
        assert all(0 < c["blocking"] <= 1 / 16 for c in counted)


def test_a_decoding_step_sends_its_inputs_in_one_copy():
    """On a GPU each host-to-device copy from pageable memory is a copy the host issues and waits
    for. Counted on fake CUDA (two rollout lengths, so the prefill's copies cancel): an SD step
    (history drafter, k = 3, 4 rows) sends its inputs (tokens, positions, block tables, draft caps)
    in one copy and the drafts in one more (respec/host_copy.py: they were six), and so does one
    with an EAGLE head step by step (the layout of its rows' pending pairs sent in one copy, the
    drafts on the device); a plain step one. Run ahead of the host, plain steps and the head's SD
    steps (respec/run_ahead.py, respec/sd_ahead.py) send theirs once per run, and read one flag a
    step without waiting for it: the host waits for the device once per run."""
    from respec.lab.host_overhead import syncs_per_step

    # (the history drafter's SD steps, by themselves and matched on the device, and plain steps run
    # ahead: counted in the test above)
    assert syncs_per_step(4, True, drafter="eagle", run_ahead=0) == {"syncs": 1.0, "blocking": 1.0, "uploads": 2.0}
    ahead = syncs_per_step(4, True, drafter="eagle")
    assert ahead["syncs"] == 1.0 and 0 < ahead["blocking"] <= 1 / 16 and 0 < ahead["uploads"] <= 4 / 16
    assert syncs_per_step(4, False, run_ahead=0)["uploads"] == 1.0


def test_a_cpu_steps_inputs_are_the_lists_values():
    """On a CPU `to_device` gives each part as an int64 tensor of its own, the list's values in its
    shape (read from an array of machine ints, not converted one by one): 1-d, 2-d, empty, large."""
    from respec.host_copy import to_device

    parts = ([5, -1, 2 ** 40], [[1, 2, 3], [4, 5, 6]], [], [[]], list(range(3000)))
    got = to_device(torch.device("cpu"), *parts)
    for part, t in zip(parts, got):
        want = torch.tensor(part, dtype=torch.int64)
        assert t.dtype == torch.int64 and t.device.type == "cpu" and t.shape == want.shape
        assert torch.equal(t, want)
    assert len({t.data_ptr() for t in got if t.numel()}) == 3  # (no part a view of another)


def test_the_upload_count_and_the_packed_copy():
    """Fake CUDA counts every host-to-device copy (host data made a CUDA tensor, a CPU tensor moved or
    copied in; a CUDA allocation is none); `to_device` sends its parts in one and gives each back in
    its shape, laid out at 16-byte boundaries with the values each part had."""
    from respec.host_copy import ALIGN, packed, to_device, views

    with fake_cuda() as counts:
        torch.tensor([1, 2], device="cuda"), torch.zeros(3, 2).to("cuda"), torch.zeros(2, device="cuda")
        torch.zeros(2, device="cuda").copy_(torch.ones(2))
        assert counts.uploads == 3
        got = to_device(torch.device("cuda"), [1, 2, 3], [[4, 5], [6, 7]], [8])
        assert counts.uploads == 4
        assert [(t.device.type, tuple(t.shape)) for t in got] == [("cuda", (3,)), ("cuda", (2, 2)), ("cuda", (1,))]
    parts = [[1, 2, 3], [[4, 5], [6, 7]], [8], [[9, 10, 11]]]
    flat, spans = packed(parts)
    out = views(torch.tensor(flat), spans)
    assert [t.tolist() for t in out] == parts and all(t.storage_offset() % ALIGN == 0 for t in out)


def test_the_host_read_count_has_power():
    """A step that reads its tokens and log-probabilities apart is counted as two reads; a
    non-blocking copy into a host buffer is counted apart, a blocking one as a read."""
    with fake_cuda() as counts:
        t = torch.zeros(4, dtype=torch.int64, device="cuda")
        t.tolist(), t.float().tolist(), t[0].item(), t.cpu()
        host = torch.empty(4, dtype=torch.int64)
        host.copy_(t, non_blocking=True)
        assert (counts.host_reads, counts.async_reads) == (4, 1)
        host.copy_(t)
    assert (counts.host_reads, counts.async_reads) == (5, 1)


def test_a_packed_read_gives_what_separate_reads_give():
    """The one-copy read of a GPU step (tokens, log-probabilities, accepted counts as one float64
    tensor) gives every value exactly, integers as ints, rows as rows."""
    from respec.engine import packed_read

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2**31 - 1, (5, 4), generator=gen)
    logprobs = -torch.rand(5, 4, generator=gen) * 30
    logprobs[0, 0] = float("-inf")
    n = torch.randint(0, 4, (5,), generator=gen)
    got = packed_read(tokens, logprobs, n)
    assert got == [tokens.tolist(), logprobs.tolist(), n.tolist()]
    assert all(type(v) is int for row in got[0] for v in row) and all(type(v) is int for v in got[2])


def test_the_kernel_count_grows_by_a_layers_kernels_per_layer():
    """The kernel count from a profiler trace (respec/lab/kernel_count.py) counts the step, not its
    prefill, and each layer's launches: an eager 4-layer model's plain step makes two layers' worth
    more than a 2-layer one's (a layer is at least its norms, projections, attention and MLP), about
    as many at 4 rows as at 1; a compiled step shows fewer (its fused kernels do not show on a CPU)."""
    from respec.lab.kernel_count import kernels_per_step

    def count(layers: int, eager: bool = True, batch: int = 1) -> int:
        model = random_model(dataclasses.replace(PRESETS["tiny"], num_layers=layers))
        engine = RolloutEngine(model, kv_cache_bytes=16 << 20, eager=eager, max_batch=4)
        return kernels_per_step(engine, batch)["kernels_per_step"]

    four, two = count(4), count(2)
    per_layer = (four - two) / 2
    assert per_layer >= 8 and four - 4 * per_layer > 0  # the head and sampler besides the layers
    assert abs(count(4, batch=4) - four) < per_layer  # launches do not grow with rows
    assert count(4, eager=False) < four
