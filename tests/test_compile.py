"""Compiled steps give the same tokens as eager ones (regional on CPU, and the whole-step policy
used on CUDA), across batch buckets, a growing block table and filtered sampling."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from respec.engine import RolloutEngine, SamplingParams
from tests.prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[1]


def run(model, eager, mode=None, batch=3, **kw):
    engine = RolloutEngine(model, kv_cache_bytes=64 << 20, eager=eager, compile_mode=mode, max_batch=8)
    params = [SamplingParams(max_new_tokens=40, seed=s, stop_on_eos=False, **kw) for s in range(batch)]
    # 30 + 40 tokens cross several 16-token blocks: the dynamic table width must not recompile or diverge.
    return engine.generate(PROMPTS[:batch], params), engine


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, top_k=50)], ids=["greedy", "filtered"])
def test_regional_compile_equals_eager(tiny, kw):
    want, _ = run(tiny, True, **kw)
    got, engine = run(tiny, False, "regional", **kw)
    assert engine.steps.mode == "regional"
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_single_row_decode_compiles_to_gemv_and_equals_eager(tiny):
    """A batch of one: compiled, each linear is a product-and-sum over the weight rows
    (compile/cpu_linear.py `gemv`), not a oneDNN call; the tokens are eager's."""
    want, _ = run(tiny, True, batch=1, temperature=0.0)
    got, _ = run(tiny, False, "regional", batch=1, temperature=0.0)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_path_is_taken_for_one_row_only(dtype):
    from torch._inductor.utils import run_and_get_code

    from compile.cpu_linear import PackedLinear, packing_available

    if not packing_available("cpu", dtype):
        pytest.skip(f"no packed {dtype} linears on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(dtype)
    packed = PackedLinear(linear)
    for rows, gemv in ((1, True), (4, False)):
        x = torch.randn(rows, 1, 64, dtype=dtype)
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(packed, fullgraph=True, dynamic=False), x)
            ref = linear(x)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out, ref, **tol)
        assert ("packed_linear" in " ".join(code)) != gemv


def test_whole_step_compile_equals_eager(tiny):
    want, _ = run(tiny, True, batch=5, temperature=0.7)
    got, engine = run(tiny, False, "whole", batch=5, temperature=0.7)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # what CUDA graphs need (tests/test_cuda.py checks they are used): pools at a static address,
    # block-table widths from a short list
    assert all(getattr(p, "_dynamo_static_input_type", None) for p in engine.cache.pools)
    assert engine.steps.batch_bucket(1, 8) == 2  # no size-1 batch dimension to specialise on
    assert [engine.steps.table_width(n) for n in (1, 4, 5, 9, 16, 17)] == [4, 4, 8, 16, 16, 32]
    _, regional = run(tiny, False, "regional", batch=1)
    assert not any(hasattr(p, "_dynamo_static_input_type") for p in regional.cache.pools)
    assert [regional.steps.table_width(n) for n in (1, 5, 17)] == [4, 5, 17]


def test_the_graphs_that_sample_are_compiled_with_the_sampler_options(tiny, monkeypatch):
    """What the sampler's cold compile rests on (compile/policy.py, `SAMPLER_OPTIONS`): every graph
    that samples (a regional step's tails, a whole step) is compiled with those inductor options;
    the decoder blocks' and the head's graphs with inductor's own. (Recorded, not compiled.)"""
    import compile.policy as policy
    from respec.speculative import verify_step
    from respec.steps import decode_step

    calls = {}
    compile_ = torch.compile

    def recording(fn, **kwargs):
        calls[getattr(fn, "func", fn).__name__] = kwargs.get("options")
        return compile_(fn, **kwargs)

    monkeypatch.setattr(policy, "_SHARED", {})  # (the process's compiled functions made anew)
    monkeypatch.setattr(torch, "compile", recording)
    regional = RolloutEngine(tiny, kv_cache_bytes=16 << 20, eager=False, compile_mode="regional", max_batch=4)
    for fn in (decode_step, verify_step):
        regional.steps.get(fn, use_filter=False)
    assert calls == {"call_block": None, "call_head": None, "sample_watch": policy.SAMPLER_OPTIONS,
                     "verify_tail": policy.SAMPLER_OPTIONS}
    calls.clear()
    whole = RolloutEngine(tiny, kv_cache_bytes=16 << 20, eager=False, compile_mode="whole", max_batch=4)
    whole.steps.get(decode_step, use_filter=False)
    assert calls == {"decode_step": policy.SAMPLER_OPTIONS}
    assert policy.SAMPLER_OPTIONS == {"realize_opcount_threshold": 30}


@pytest.mark.parametrize("mode", ["whole", "regional-dynamic"])
def test_dynamic_batch_compiles_once_for_every_batch_size(tiny, mode):
    """Rows finishing one after another take the batch through buckets 8, 4 and 2: a dynamic batch
    dimension compiles the decode step once for all of them (regional: the block and the sampler)."""
    from torch._dynamo.utils import counters

    params = [SamplingParams(max_new_tokens=8 + 6 * i, seed=i, temperature=0.7, stop_on_eos=False) for i in range(5)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, max_batch=8).generate(PROMPTS, params)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=False, compile_mode=mode, max_batch=8)
    before = counters["stats"]["unique_graphs"]
    got = engine.generate(PROMPTS, params)
    assert sorted(set(engine.stats.batch_sizes)) == [1, 2, 3, 4, 5]
    assert counters["stats"]["unique_graphs"] - before <= (1 if mode == "whole" else 2)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("kind", ["small", "eagle", "history"])
def test_compiled_speculative_step_equals_eager(tiny, kind):
    """Regional compilation of the SD steps (target blocks, the head's layer, the draft sampler and
    the verify tail; point-mass drafts for the history drafter) gives the eager tokens, sampling at T=0.8."""
    from models.drafter import truncated_drafter
    from respec.drafters.history import HistoryDrafter
    from tests.test_eagle import head_for

    def sd(eager, mode=None):
        drafter = {"small": lambda: truncated_drafter(tiny, 1), "eagle": lambda: head_for(tiny, 300),
                   "history": lambda: HistoryDrafter(min_match=1)}[kind]()
        engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=eager, compile_mode=mode, max_batch=8,
                               drafter=drafter, num_draft_tokens=3)
        # the layer drafter's steps are compiled per (rows, tokens) pair (its own two-token first
        # forward besides the target's 1- and 4-token ones), ~10 s each on two cores: two rows, two buckets
        rows = 2 if kind == "small" else 3
        params = [SamplingParams(max_new_tokens=30, seed=s, temperature=0.8, stop_on_eos=False) for s in range(rows)]
        return engine.generate(PROMPTS[:rows], params)

    want = sd(True)
    got = sd(False, "regional")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ISA names of x86 CPUs")
def test_the_inductor_cache_is_one_directory_per_cpu_isa(tmp_path):
    """inductor's graph cache does not key entries by the ISA their C++ kernels were written for
    (an AVX-512 entry read under AVX2 gave wrong tokens here, and aborted a CI run): respec's cache
    keeps one directory per ISA, and a directory the user names is kept as named."""
    def cache_dir_of(**env):
        run_env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        run_env.update(RESPEC_CACHE=str(tmp_path), **env)
        code = ("import os; from compile.policy import use_persistent_cache; use_persistent_cache(); "
                "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
        out = subprocess.run([sys.executable, "-c", code], env=run_env, cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    avx2, default = cache_dir_of(ATEN_CPU_CAPABILITY="avx2"), cache_dir_of(ATEN_CPU_CAPABILITY="default")
    assert avx2 == str(tmp_path / "inductor" / "avx2") and default == str(tmp_path / "inductor" / "default")
    assert cache_dir_of(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")
