"""How the engine's steps are compiled: regions, shape buckets, `torch.compile` settings, caches.

Policy, and why:
  * **Regional compilation on CPU.** The decode step is compiled region by region: one decoder
    block (a single graph, reused by all layers, since they share code and shapes and each gets
    its own cache pool) and the tails (output head + sampler; in speculative steps also the
    drafter's head + sampler and the target's head + acceptance test). Compiling the whole 30-layer step as
    one graph costs about 200 s per batch bucket on a 2-core CPU; the regions cost about 10 s, run
    as fast (the weights' matrix products dominate either way), and leave only ~30 cheap compiled
    calls per step in Python.
  * **Whole-step compilation on CUDA**, with CUDA graphs (`mode="reduce-overhead"`), where launch
    overhead, not compile time, is what matters. Three things keep the graphs on and few:
    - the KV pools are written in place by every step, and inductor records graphs only for
      functions whose mutated inputs are static: the engine marks its pools (`static_inputs`);
    - a graph's outputs live in memory its next replay overwrites: every output is copied out
      before the step returns (a few (B,) and (B, d) tensors), so what a drafter keeps stays valid;
    - a graph is recorded per input shape, so the block-table width (dynamic for the compiler)
      is rounded up to a power of two: ~6 widths per (batch bucket, k), not one per 16 tokens.
    The batch dimension is dynamic too (every per-row input's dim 0), so each step function is
    compiled once per k and sampling flag, not once per batch bucket (a cold compile of a 30-layer
    step takes tens of seconds even on a GPU host); the smallest bucket is 2 rows, since the compiler
    specialises a dimension of size 1. CUDA graphs are still recorded per bucket (a few runs each).
  * **Manual CUDA graphs** (`mode="graphs"`, compile/cuda_graphs.py): the whole step compiled once
    (batch and width dynamic, no CUDA-graph trees) and captured by hand, one `torch.cuda.CUDAGraph`
    per input shape, replayed after copying the step's inputs into static buffers: no dynamo
    guards, no tree bookkeeping per call. Until a GPU run shows it correct and faster, "whole" stays
    the CUDA default; on a CPU the replay is simulated (the same buffering, for the tests).
  * Batch sizes go through buckets (1, 2, 4, 8, ...): the engine pads the active batch up to the
    next bucket with rows that do nothing. Every bucket is one static-shape graph, except with a
    dynamic batch dimension (`regional-dynamic` and whole-step compilation): one graph for all
    buckets from 2 rows up (batch 1 is padded to 2). On 2 CPU cores (bf16, SmolLM2) that cut the cold
    compile of plain decoding from ~40 s per bucket to 34 s in all, but its decode steps at batch
    16-64 measured 16-86% slower than the static graphs' (docs/benchmarks.md): static buckets
    (`regional`) stay the CPU default.
  * The block-table width (how much context the longest sequence has) is a *dynamic* dimension:
    it changes every `block_size` tokens, and the only ops that see it are a gather, a mask and
    SDPA, which cost the same compiled either way. Bucketing it too would multiply compile time.
  * **Dynamic dimensions are bounded** by what the engine can use: rows by its largest batch
    bucket, the block-table width by the longest sequence its model or its KV pool can hold. On a
    GPU, inductor indexes a kernel's tensors in 32 bits when it can, and where it cannot prove a
    tensor's element count below 2^31 from the declared ranges it emits a guard for it; a guard that
    narrows a `mark_dynamic` range is a hard error (`ConstraintViolationError`), which is how every
    whole-step graph once failed on an H200 (rows declared up to 65,536 against `49152 * rows <=
    2**31 - 1`). So the ranges are declared tight, and the engine refuses on CUDA, in one line, a
    batch whose largest step tensor (`largest_step_tensor`: the logits of the widest verify, the
    gathered keys, the mask) would not index in 32 bits. CPU inductor indexes in 64 bits and never
    emits that guard; tests/test_cuda_path.py checks the bound on the traced graphs.
  * **One compiled function per (step, static arguments) per process**, shared by every engine
    (`_shared`): the plain and the speculative engine of a benchmark compile the decode step once.
    Per-shape artefacts (CUDA graphs) are still made per engine, since each has its own pools.
  * **TensorRT** (`mode="tensorrt"`, CUDA only, optional: requirements-trt.txt): the whole step
    compiled by Torch-TensorRT's `torch.compile` backend instead of inductor, with the same
    static pools and power-of-two table widths (one engine per shape), no CUDA graphs of ours.
  * **The sampler's graphs keep long integer chains apart** (`SAMPLER_OPTIONS`): inductor inlines a
    pointwise producer into its consumers unless it has more than a threshold of ops (torch 2.13:
    30 on a GPU, 50 on a CPU). The sampler's per-row hash (respec/sampling.py, ~48 integer ops)
    stays under the CPU's and was inlined into the per-token hash; generating C++ for the fused
    kernel then took ~27 s of a 33-s cold compile of `sample` alone on two cores. With the GPU's 30
    for the graphs that sample (the tails, and whole steps), the row hash is one small buffer: the
    same tokens, the same step times within noise, and a tail's cold compile 4-7 s instead of
    21-35 s on a CPU (docs/benchmarks.md). The decoder blocks' graphs keep the CPU's own threshold.
  * Prefill runs eagerly: its prompt lengths vary without bound, and it is a few large matrix
    products per sequence that compilation would not speed up.
  * The inductor cache lives under respec's cache directory, one directory per CPU vector ISA, so a
    second run skips codegen and never reads kernels written for another ISA.
  * `eager=True` returns the plain functions: the debugging path, tested to give the same tokens.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import time
from collections import Counter
from functools import partial

import torch

from compile import cuda_graphs
from models.decoder import call_block
from models.eagle import call_head
from models.loading import cache_dir
from respec.flex_paged import check_runs_on

COMPILE_MODES = ("regional", "regional-dynamic", "whole", "graphs", "tensorrt")  # besides eager (see above)
WHOLE_STEP_MODES = ("whole", "graphs", "tensorrt")  # the step compiled as one graph
INT32_MAX = 2**31 - 1  # the largest element count a kernel indexed in 32 bits may address
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Parameters of the step functions that name their sampling tails (output head + sampler, the
# drafter's head + sampler, the verify's head + acceptance test): regional compilation compiles
# each one's default, whatever function that is.
TAIL_PARAMS = ("sample_fn", "draft_fn", "verify_fn")
# inductor options of the graphs that sample (see the module docstring); a GPU's own default
SAMPLER_OPTIONS = {"realize_opcount_threshold": 30}
MIN_TABLE_WIDTH = 4  # block-table widths below this are padded up (keeps the dynamic dim > 1)


def cpu_isa_key() -> str:
    """The vector ISA CPU kernels are generated for: ATen's CPU capability (which
    ATEN_CPU_CAPABILITY can lower), with AMX named apart ("avx512-amx", "avx512", "avx2", ...)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability == "avx512" and torch.cpu._is_amx_tile_supported():
        capability += "-amx"
    return capability


def use_persistent_cache() -> None:
    """Point inductor's on-disk cache into respec's cache directory (unless the user set one), one
    directory per CPU vector ISA (`cpu_isa_key`).

    Per ISA because inductor's graph cache does not key its entries by the ISA their C++ kernels
    were written for: a directory filled on an AVX-512 CPU and read under AVX2 (another machine
    sharing the home directory, or ATEN_CPU_CAPABILITY=avx2) serves 16-lane kernels compiled as
    8-lane code: wrong tokens, or memory overwritten and the process aborted.

    Must run before anything touches inductor: the first use of inductor's cache (a CPU ISA probe
    is enough) writes its default, /tmp/torchinductor_<user>, into the same environment variable.
    The entry points (train.py, generate.py) and the tests' conftest call this first."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor" / cpu_isa_key()))


def configure_dynamo() -> None:
    """Dynamo settings the bucketing policy relies on.

    * No automatic dynamic shapes: after a second batch bucket dynamo would otherwise make the batch
      dimension symbolic and recompile, defeating the static per-bucket graphs.
    * A recompile limit high enough for every (bucket x sampling-flag) graph of one function; past
      the default (8 per code object) dynamo silently falls back to eager."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def batch_bucket(n: int, max_batch: int) -> int:
    for b in BATCH_BUCKETS:
        if b >= n:
            return min(b, max(max_batch, n))
    return n


def buckets_up_to(max_batch: int) -> list[int]:
    return sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)})


def table_width(num_blocks: int) -> int:
    """Block-table width for a batch whose longest sequence has `num_blocks` blocks."""
    return max(MIN_TABLE_WIDTH, num_blocks)


def _mark_dynamic(t: torch.Tensor, dim: int, low: int, high: int) -> None:
    """`t.shape[dim]` dynamic within [low, high]; left static where the range holds one size."""
    if high > low:
        torch._dynamo.mark_dynamic(t, dim, min=low, max=high)


def _mark_rows_dynamic(tensors, max_rows: int) -> None:
    """Dim 0 (the rows) of each tensor argument dynamic, from 2 up to `max_rows`, where it has more
    than one row (the compiler would specialise a dimension of size 1)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1:
            _mark_dynamic(t, 0, 2, max_rows)


def _mark_slots_dynamic(slot_mapping: torch.Tensor) -> None:
    """A regional step's slot mapping (rows x the step's tokens, flattened) dynamic without bounds:
    its size is the rows' times the tokens a row writes (k + 1 in a verify), which a bound of
    `max_rows` would refuse, and which the graph derives from the rows anyway."""
    if slot_mapping.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(slot_mapping, 0)


def _mark_width_dynamic(block_tables: torch.Tensor, mask: torch.Tensor | None = None, *,
                        max_width: int | None = None) -> None:
    """The block-table width dynamic: up to `max_width` blocks in whole-step graphs (the mask is
    built inside them), a bound the 32-bit check can use (see the module docstring). In regional
    graphs, which take the mask as an input, the width and the mask's key length are
    `maybe_mark_dynamic`, not `mark_dynamic`: a kernel may still bound the width (inductor's CPU
    reductions pick their split by size, and a graph loaded from the on-disk cache brings those
    bounds as guards); with a hard constraint that is an error, here it is a recompile."""
    if max_width is not None:
        _mark_dynamic(block_tables, 1, MIN_TABLE_WIDTH, max_width)
        return
    torch._dynamo.maybe_mark_dynamic(block_tables, 1)
    if mask is not None:
        torch._dynamo.maybe_mark_dynamic(mask, 3)


def largest_step_tensor(cfg, *, rows: int, width: int, block_size: int, verify_width: int, vocab: int,
                        draft_pool_shape: tuple | None = None) -> tuple[int, str]:
    """(elements, what) of the largest tensor a compiled step makes at `rows` rows, a block table
    `width` blocks wide and verifies `verify_width` positions wide (1: plain decoding): the logits
    and sampling tensors over `vocab` ids (the vocabulary as the sampler pads it), each layer's
    gathered keys (respec/paged_attention.py), the attention mask, and the same for a drafter with
    its own pools (`draft_pool_shape`: (layers, Hkv, D)). tests/test_cuda_path.py checks that no
    tensor of the traced graphs is larger."""
    keys = width * block_size  # cached positions a row's attention reads
    n_rep = cfg.num_heads // cfg.num_kv_heads
    sizes = {f"the logits ({rows} rows x {verify_width} positions x a vocabulary of {vocab:,})":
             rows * verify_width * vocab,
             f"the gathered keys ({rows} rows x {keys} positions x {cfg.num_kv_heads} heads x {cfg.head_dim})":
             rows * keys * cfg.num_kv_heads * cfg.head_dim,
             f"the attention mask ({rows} rows x {n_rep * verify_width} queries x {keys} positions)":
             rows * n_rep * verify_width * keys}
    if draft_pool_shape is not None:
        _, hkv, d = draft_pool_shape
        sizes[f"the drafter's gathered keys ({rows} rows x {keys} positions x {hkv} heads x {d})"] = rows * keys * hkv * d
    what = max(sizes, key=sizes.get)
    return sizes[what], what


def require_tensorrt(device: torch.device) -> None:
    """Torch-TensorRT registers its `torch.compile` backend on import; it runs on CUDA only."""
    if device.type != "cuda":
        raise ValueError(f"the tensorrt compile mode runs on CUDA GPUs only, not on {device}")
    try:
        importlib.import_module("torch_tensorrt")  # registers the "tensorrt" backend
    except ImportError:
        raise ValueError("the tensorrt compile mode needs torch-tensorrt: pip install -r requirements-trt.txt") from None


# Compiled functions of this process, shared by every engine (see the module docstring): torch.compile
# keeps one cache of graphs per call of torch.compile, so two engines that each compiled the same
# step would compile it twice.
_SHARED: dict = {}
# Seconds of the first call of each whole-step function in this process: its cold compile (and, under
# CUDA graphs, a warm-up run), what a GPU check reports per graph.
FIRST_CALL_S: dict[str, float] = {}


def _shared(key, make):
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def step_name(fn, static_kwargs: dict) -> str:
    """A step function with its static arguments, as the warm-up lists and FIRST_CALL_S name it."""
    return f"{fn.__name__}({', '.join(f'{k}={v}' for k, v in sorted(static_kwargs.items()))})"


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cuda_graph_recordings(device: torch.device) -> int:
    """CUDA graphs inductor's CUDA-graph trees have recorded on `device` so far (0 elsewhere): every
    node of the device's trees is one recording, and nodes are only ever added."""
    if device.type != "cuda":
        return 0
    from torch._inductor import cudagraph_trees

    index = device.index if device.index is not None else torch.cuda.current_device()
    manager = cudagraph_trees.get_manager(index, create_if_none_exists=False)
    if manager is None or manager.roots is None:
        return 0
    nodes, count = [n for roots in manager.roots.values() for n in roots], 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [c for children in node.children.values() for c in children]
    return count


class CompiledSteps:
    """The engine's step functions, compiled according to the policy above (or not at all).

    `max_batch` and `max_blocks` (the most blocks one sequence's table can hold) bound the dynamic
    dimensions (see the module docstring)."""

    def __init__(self, *, eager: bool, device: torch.device, mode: str | None = None, max_batch: int = 512,
                 max_blocks: int = 1 << 12):
        self.eager = eager
        self.device = torch.device(device)
        self.mode = "eager" if eager else mode or ("whole" if self.device.type == "cuda" else "regional")
        if self.mode != "eager" and self.mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r} (eager, {', '.join(COMPILE_MODES)})")
        # one graph for every batch size (see the module docstring), or one per batch bucket
        self.dynamic_batch = self.mode in ("regional-dynamic", *WHOLE_STEP_MODES)
        if self.mode == "tensorrt":
            require_tensorrt(self.device)
        # the declared ranges of the dynamic dimensions: the rows of the largest batch bucket and the
        # widest block table
        self.max_rows = self.batch_bucket(max_batch, max_batch)
        self.max_width = self.table_width(max_blocks)
        self._cache: dict = {}
        # the whole-step backend (aot_eager in the CPU tests of the CUDA path, tests/test_cuda_path.py)
        self.backend = "tensorrt" if self.mode == "tensorrt" else "inductor"
        # Per-shape graphs (CUDA-graph trees, TensorRT engines) are built on a shape's first calls:
        # cudagraph trees run a shape once to warm it up and record it on the second call. `seen`
        # counts the calls per (step, input shapes); a call inside `timed()` of a shape seen fewer
        # than `warm_calls` times before is listed in `unwarmed`, and so is any graph compiled or
        # CUDA graph recorded while it runs (what the shapes predict, and what happened).
        self.seen: Counter = Counter()
        self.timing = False
        self.unwarmed: list[str] = []
        if self.mode != "eager":
            use_persistent_cache()
            configure_dynamo()
            self._block = _shared(("block",), lambda: torch.compile(call_block, fullgraph=True, dynamic=False))
            self._head = _shared(("head",), lambda: torch.compile(call_head, fullgraph=True, dynamic=False))
        self._tails: dict = {}  # tail function -> its compiled version (one graph per batch bucket and k)

    def check_index_width(self, cfg, **sizes) -> None:
        """Raise ValueError (one line) where a compiled CUDA step with a dynamic batch could make a
        tensor too large to index in 32 bits at this engine's bounds (see the module docstring).
        `sizes`: `largest_step_tensor`'s other arguments."""
        if self.device.type != "cuda" or not self.dynamic_batch:
            return
        # regional graphs leave the width unbounded (`maybe_mark_dynamic`): the guards inductor puts
        # on it recompile (in 64 bits) rather than fail, so only the rows' tensors count there
        width = self.max_width if self.mode in WHOLE_STEP_MODES else 0
        size, what = largest_step_tensor(cfg, rows=self.max_rows, width=width, **sizes)
        if size > INT32_MAX:
            fits = next((b for b in reversed(BATCH_BUCKETS) if b < self.max_rows and largest_step_tensor(
                cfg, rows=b, width=width, **sizes)[0] <= INT32_MAX), None)
            advice = f"a batch of at most {fits} rows fits" if fits else "a smaller KV cache or context fits"
            raise ValueError(f"a compiled step at {self.max_rows} rows would hold {what}: {size:,} elements, more "
                             f"than a GPU kernel indexes in 32 bits (2^31 - 1); {advice}")

    def _tail(self, f):
        if f not in self._tails:
            graph = _shared(("tail", f), lambda: torch.compile(f, fullgraph=True, dynamic=False,
                                                                options=SAMPLER_OPTIONS))

            def rows_dynamic(*args, **kwargs):
                _mark_rows_dynamic(args, self.max_rows)
                return graph(*args, **kwargs)
            self._tails[f] = rows_dynamic if self.dynamic_batch else graph
        return self._tails[f]

    def _run_block(self, block, x, cos, sin, kv):
        _mark_width_dynamic(kv.block_tables, kv.mask)
        if self.dynamic_batch:
            _mark_rows_dynamic((x, cos, sin, kv.block_tables, kv.mask), self.max_rows)
            _mark_slots_dynamic(kv.slot_mapping)
        return self._block(block, x, cos, sin, kv)

    def _run_head(self, head, feature, tokens, positions, embed, kv):
        _mark_width_dynamic(kv.block_tables, kv.mask)
        if self.dynamic_batch:
            _mark_rows_dynamic((feature, tokens, positions, kv.block_tables, kv.mask), self.max_rows)
            _mark_slots_dynamic(kv.slot_mapping)
        return self._head(head, feature, tokens, positions, embed, kv)

    def batch_bucket(self, n: int, max_batch: int) -> int:
        """Rows a step of `n` sequences is padded to (with a dynamic batch dimension at least 2: the
        compiler would specialise a dimension of size 1, see above)."""
        rows = batch_bucket(n, max_batch)
        return max(rows, 2) if self.dynamic_batch else rows

    def table_width(self, num_blocks: int) -> int:
        """Block-table width for a batch whose longest sequence has `num_blocks` blocks (whole-step
        graphs: a power of two, see the module docstring)."""
        width = table_width(num_blocks)
        return 1 << (width - 1).bit_length() if self.mode in WHOLE_STEP_MODES else width

    def static_inputs(self, tensors) -> None:
        """Tensors every step reads and writes in place at a fixed address (the KV pools): whole-step
        CUDA graphs use them where they are instead of copying them in (and record at all)."""
        if self.mode in ("whole", "tensorrt"):
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    @property
    def graph_per_shape(self) -> bool:
        """Whether each input shape (batch bucket x table width) gets a graph of its own, made on its
        first calls (CUDA graphs, TensorRT engines): a warm-up must then meet every shape."""
        return self.mode in WHOLE_STEP_MODES

    @property
    def warm_calls(self) -> int:
        """Calls of each shape a warm-up must make before that shape is timed: two where a graph is
        recorded per shape on its second call (CUDA-graph trees, TensorRT engines), else one (the
        first call compiles, or captures its graph and replays it)."""
        return 2 if self.mode in ("whole", "tensorrt") else 1

    @contextlib.contextmanager
    def timed(self):
        """A timed region: any step it calls whose shape was not warmed (`warm_calls` earlier calls)
        is recorded in `unwarmed` (per-shape graphs only), and so is every graph compiled and every
        CUDA graph recorded inside it (in this process, by any engine), so a benchmark can refuse
        its figures."""
        self.unwarmed.clear()
        self.timing = True
        graphs, recordings = compiled_graphs(), cuda_graph_recordings(self.device) + cuda_graphs.captures()
        try:
            yield self.unwarmed
        finally:
            self.timing = False
            if (n := compiled_graphs() - graphs) > 0:
                self.unwarmed.append(f"{n} graph(s) compiled inside the timed region")
            if (n := cuda_graph_recordings(self.device) + cuda_graphs.captures() - recordings) > 0:
                self.unwarmed.append(f"{n} CUDA graph(s) recorded inside the timed region")

    def _count_call(self, name: str, inputs: dict) -> None:
        shapes = tuple((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor))
        key = (name, shapes)
        if self.timing and self.seen[key] < self.warm_calls:
            self.unwarmed.append(f"{name} {dict(shapes)} (called {self.seen[key]}x before)")
        self.seen[key] += 1

    def eager_fn(self, fn, **static_kwargs):
        """`fn` with `static_kwargs` bound, never compiled (prefill)."""
        return partial(fn, **static_kwargs)

    def get(self, fn, **static_kwargs):
        """`fn` (a step function) with `static_kwargs` bound, compiled per the policy; one object
        per distinct (fn, kwargs), so its graphs are reused (whole-step: by every engine of the process)."""
        key = (fn, tuple(sorted(static_kwargs.items())))
        if key not in self._cache:
            if static_kwargs.get("attention") == "flex":
                check_runs_on(self.device, None if self.mode == "eager" else self.backend, self.mode)
            if self.mode == "eager":
                step = partial(fn, **static_kwargs)
            elif getattr(fn, "own_shapes", False):
                step = self._helper(fn, static_kwargs)
            elif self.mode in ("regional", "regional-dynamic"):
                params = inspect.signature(fn).parameters
                regions = {name: region for name, region in (("run_block", self._run_block), ("run_head", self._run_head))
                           if name in params}
                regions |= {name: self._tail(params[name].default) for name in TAIL_PARAMS if name in params}
                step = partial(fn, **regions, **static_kwargs)
            elif self.mode == "graphs":
                step = self._captured_step(fn, static_kwargs)
            else:
                step = self._whole_step(fn, static_kwargs)
            self._cache[key] = step
        return self._cache[key]

    def _helper(self, fn, static_kwargs: dict):
        """A device-side helper whose shapes are its own, not a step's rows and block-table width (a
        drafter's state laid out per run, respec/drafters/history_ahead.py): compiled once as one
        graph with dynamic shapes, no bounds declared, no CUDA graphs (shared by the process's
        engines)."""
        backend = "inductor" if self.backend == "tensorrt" else self.backend
        key = ("helper", fn, tuple(sorted(static_kwargs.items())), backend)
        return _shared(key, lambda: torch.compile(partial(fn, **static_kwargs), fullgraph=True, dynamic=True,
                                                  backend=backend))

    def _whole_step(self, fn, static_kwargs: dict):
        """The whole step compiled as one graph (shared by the process's engines), called with this
        engine's bounds declared and, under CUDA graphs, its outputs copied out of the graph's memory."""
        trees = self.mode == "whole" and self.device.type == "cuda"
        # captured graphs simulated off CUDA check what a capture fixes (compile/cuda_graphs.py)
        simulated = self.mode == "graphs" and self.device.type != "cuda"
        key = ("whole", fn, tuple(sorted(static_kwargs.items())), self.backend, trees, simulated)
        # (CUDA-graph trees are asked for by mode, which excludes options: a GPU's threshold is 30 anyway)
        options = SAMPLER_OPTIONS if self.backend == "inductor" and not trees else None
        backend = self.backend
        if simulated:
            backend, options = cuda_graphs.noting_reads(backend, options), None
        graph = _shared(key, lambda: torch.compile(partial(fn, **static_kwargs), fullgraph=True, dynamic=False,
                                                   backend=backend, options=options,
                                                   mode="reduce-overhead" if trees else None))
        signature = inspect.signature(fn)
        name = step_name(fn, static_kwargs)

        def step(*args, **kwargs):
            inputs = signature.bind_partial(*args, **kwargs).arguments
            self._count_call(name, inputs)
            _mark_rows_dynamic(inputs.values(), self.max_rows)  # (the pools come as lists, the weights as modules)
            _mark_width_dynamic(inputs["block_tables"], max_width=self.max_width)
            t0 = time.perf_counter() if name not in FIRST_CALL_S else None
            if trees:
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are done with
            out = graph(*args, **kwargs)
            if trees:
                out = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
            if t0 is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                FIRST_CALL_S[name] = round(time.perf_counter() - t0, 2)
            return out
        return step

    def _captured_step(self, fn, static_kwargs: dict):
        """The whole step compiled once (no CUDA-graph trees), captured per input shape and replayed
        (compile/cuda_graphs.py); the compiled function, its declared bounds and the warm-up count
        are only met while a shape is captured."""
        compiled = self._whole_step(fn, static_kwargs)
        name = step_name(fn, static_kwargs)

        def captured(args):
            if self.timing:
                shapes = {i: tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
                self.unwarmed.append(f"{name} {shapes} (not captured before)")
        return cuda_graphs.StepGraphs(compiled, self.device, on_capture=captured)
