"""The CUDA path: the key checks of the CPU suite again on a GPU (skipped without one).

Random weights throughout (a GPU machine may have no model hub and no GGUF package), SmolLM2's
tokenizer where one is needed (it travels with the repository, models/tokenizers/smollm2).
`python -m respec.lab.gpu_check --part a` runs this file first (the trainer's tests are its part b's
GRPO stage); on a CPU-only machine every test here is skipped, and tests/test_cuda_path.py checks
the same path on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tests.prompts import PROMPTS, REPEATING

CUDA = torch.device("cuda")


def on_cuda(model):
    return copy.deepcopy(model).to(CUDA)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_logits_match_transformers(tiny_pair, name):
    ours, hf, _ = tiny_pair[name]
    ours, hf = on_cuda(ours), on_cuda(hf)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        diff = (ours.logits(ours(ids)) - hf(ids).logits.float()).abs().max().item()
    assert diff <= 1e-3, diff


def test_greedy_batch_matches_transformers_generate(tiny_pair):
    """Prompts of different lengths in one batch; transformers runs each alone (no padding)."""
    from respec.engine import RolloutEngine, SamplingParams

    ours, hf, _ = tiny_pair["llama"]
    ours, hf = on_cuda(ours), on_cuda(hf)
    eos = ours.cfg.eos_token_id
    engine = RolloutEngine(ours, kv_cache_bytes=64 << 20, eager=True, eos_token_ids=[eos])
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0.0))
    for p, o in zip(PROMPTS, out):
        with torch.no_grad():  # stops at EOS (kept in the output) like the engine
            ref = hf.generate(torch.tensor([p], device=CUDA), max_new_tokens=24, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0, len(p):].tolist()
        assert o.token_ids == ref


def cudagraph_trees_recorded() -> int:
    """Graphs CUDA-graph trees recorded on this device so far (0 if none)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())


def test_cuda_graphs_are_used_and_equal_eager(tiny):
    """The whole-step policy (CUDA graphs) gives the eager tokens, across batch buckets and a
    growing block table, and records graphs without skipping any."""
    from torch._dynamo.utils import counters

    from respec.engine import RolloutEngine, SamplingParams

    model = on_cuda(tiny)
    params = [SamplingParams(max_new_tokens=40, seed=s, temperature=0.7, stop_on_eos=False) for s in range(5)]

    def run(eager):
        engine = RolloutEngine(model, kv_cache_bytes=64 << 20, eager=eager, max_batch=8)
        return engine.generate(PROMPTS, params), engine

    want, _ = run(True)
    skips = counters["inductor"]["cudagraph_skips"]
    got, engine = run(False)
    assert engine.steps.mode == "whole"
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"
    assert cudagraph_trees_recorded() > 0


def test_a_timed_region_lists_the_cuda_graphs_recorded_in_it(tiny):
    """Every CUDA-graph recording inside `steps.timed()` is listed (what fails a benchmark): a cold
    engine's timed rollout records; after `warmup` of its shapes a second engine records none."""
    from compile.policy import cuda_graph_recordings
    from respec.engine import RolloutEngine, SamplingParams
    from respec.profiling import warmup

    model = on_cuda(tiny)
    params = [SamplingParams(max_new_tokens=20, seed=s, temperature=0.7, stop_on_eos=False) for s in range(3)]
    cold = RolloutEngine(model, kv_cache_bytes=64 << 20, max_batch=4)
    before = cuda_graph_recordings(CUDA)
    with cold.steps.timed() as unwarmed:
        cold.generate(PROMPTS[:3], params)
    assert cuda_graph_recordings(CUDA) > before
    assert any("CUDA graph(s) recorded" in u for u in unwarmed)
    warm = RolloutEngine(model, kv_cache_bytes=64 << 20, max_batch=4)
    warmup(warm, [3], max_context=max(map(len, PROMPTS[:3])) + 20, progress=False)
    with warm.steps.timed() as unwarmed:
        warm.generate(PROMPTS[:3], params)
    assert unwarmed == []


@pytest.mark.parametrize("kind", ["eagle", "history"])
def test_compiled_speculative_decoding_equals_eager(tiny, kind):
    """SD under CUDA graphs: the drafter's kept features survive the next replay (they are copied
    out of the graph's memory), so the tokens equal the eager engine's. The history drafter runs
    greedy on repeating prompts, where it proposes (so the compiled point-mass verify is checked)."""
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine, SamplingParams
    from tests.test_eagle import head_for

    model = on_cuda(tiny)
    prompts = PROMPTS[:3] if kind == "eagle" else REPEATING
    params = [SamplingParams(max_new_tokens=30, seed=s, temperature=0.8 if kind == "eagle" else 0.0,
                             stop_on_eos=False) for s in range(3)]

    def sd(eager):
        drafter = head_for(model, 300).to(CUDA) if kind == "eagle" else HistoryDrafter(min_match=1)
        engine = RolloutEngine(model, kv_cache_bytes=64 << 20, eager=eager, max_batch=8, drafter=drafter,
                               num_draft_tokens=3)
        return [c.token_ids for c in engine.generate(prompts, params)], engine.stats.sd_steps

    (got, sd_steps), (want, _) = sd(False), sd(True)
    assert sd_steps > 0, "the drafter proposed nothing: the compiled verify was not checked"
    assert got == want


def test_flex_attention_under_cuda_graphs_equals_the_gather_path(tiny):
    """--attention flex (respec/flex_paged.py) compiled for CUDA with CUDA graphs: the decode step and
    the k = 3 verify (history drafter, greedy on repeating prompts) give the gather path's tokens,
    recorded without a skip."""
    from torch._dynamo.utils import counters

    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine, SamplingParams

    model = on_cuda(tiny)
    params = [SamplingParams(max_new_tokens=30, seed=s, temperature=0.0, stop_on_eos=False) for s in range(3)]

    def run(attention):
        engine = RolloutEngine(model, kv_cache_bytes=64 << 20, max_batch=8, drafter=HistoryDrafter(min_match=1),
                               num_draft_tokens=3, attention=attention)
        return [c.token_ids for c in engine.generate(REPEATING, params)], engine

    want, _ = run("gather")
    skips = counters["inductor"]["cudagraph_skips"]
    got, engine = run("flex")
    assert engine.steps.mode == "whole" and engine.stats.sd_steps > 0 and engine.stats.decode_steps > 0
    assert got == want
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"


@pytest.mark.parametrize("kind", ["plain", "history"])
def test_steps_captured_by_hand_equal_eager(tiny, kind):
    """`--compile-mode graphs` (compile/cuda_graphs.py): plain decoding (run ahead of the host) and a
    k = 3 verify captured as CUDA graphs by hand give the eager tokens across batch buckets and
    table widths; a second rollout replays only (nothing captured, nothing compiled)."""
    from compile import cuda_graphs
    from compile.policy import compiled_graphs
    from respec.drafters.history import HistoryDrafter
    from respec.engine import RolloutEngine, SamplingParams

    model = on_cuda(tiny)
    prompts = REPEATING if kind == "history" else PROMPTS[:3]
    params = [SamplingParams(max_new_tokens=20 + 10 * s, seed=s, temperature=0.0 if kind == "history" else 0.8,
                             stop_on_eos=False) for s in range(3)]

    def engine(eager):
        drafter = HistoryDrafter(min_match=1) if kind == "history" else None
        return RolloutEngine(model, kv_cache_bytes=64 << 20, max_batch=8, eager=eager, drafter=drafter,
                             num_draft_tokens=3 if drafter else 0, compile_mode=None if eager else "graphs")

    want = [c.token_ids for c in engine(True).generate(prompts, params)]
    captured = engine(False)
    assert [c.token_ids for c in captured.generate(prompts, params)] == want
    assert (captured.stats.sd_steps > 0) == (kind == "history")
    before, graphs = cuda_graphs.captures(), compiled_graphs()
    assert [c.token_ids for c in captured.generate(prompts, params)] == want
    assert (cuda_graphs.captures(), compiled_graphs()) == (before, graphs)


def filtered_sampling_case(rows: int, device: torch.device) -> tuple:
    """A sampler's inputs at SmolLM2's vocabulary: peaked random logits, and rows that filter by
    top-k, top-p and min-p alone and together, a greedy row and an unfiltered one among them."""
    g = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, 49152, device=device, generator=g) * 4
    cycle = lambda values: torch.tensor([values[i % len(values)] for i in range(rows)], device=device)  # noqa: E731
    temperature = cycle([0.0, 0.7, 1.0, 0.7, 1.0])
    top_k = cycle([0, 50, 0, 0, 20, 0, 0])
    top_p = cycle([1.0, 1.0, 0.9, 0.5, 0.8, 1.0])
    min_p = cycle([0.0, 0.0, 0.0, 0.05, 0.0, 0.02, 0.0])
    seed = torch.arange(rows, device=device) + 1000
    position = torch.full((rows,), 7, device=device)
    return logits, temperature, top_k, top_p, min_p, seed, position


def filtered_sampling_step(logits, temperature, top_k, top_p, min_p, seed, position):
    from respec.sampling import sample, sampling_logprobs

    logprobs = sampling_logprobs(logits, temperature, top_k, top_p, use_filter=True, min_p=min_p)
    return (logprobs, *sample(logprobs, temperature, seed, position))


def assert_same_sampling(got: tuple, want: tuple) -> None:
    (logprobs, tokens, token_logprobs), (want_logprobs, want_tokens, want_token_logprobs) = got, want
    kept = want_logprobs.isfinite()
    assert torch.equal(logprobs.isfinite(), kept), "the filters kept different tokens"
    assert kept.sum(-1).min() >= 1 and (~kept).any()  # (every row samples; some tokens were filtered out)
    torch.testing.assert_close(logprobs[kept], want_logprobs[kept], rtol=0, atol=1e-4)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(token_logprobs, want_token_logprobs, rtol=0, atol=1e-4)


def test_filtered_sampling_compiled_equals_eager():
    """top-k, top-p and min-p compiled for CUDA with the sampler's options, as the decode and verify
    steps compile them: at a 49,152-token vocabulary and fewer rows than twice the GPU's SMs the
    filter's cumsum becomes a Triton scan split across thread blocks, a kernel no CPU graph has
    (inductor's C++ backend has no scan) and no other test here compiles (the engines here sample
    unfiltered; the lossless test runs eager). 32 rows, greedy, unfiltered and filtered ones mixed:
    the eager filter's kept tokens, log-probabilities and samples."""
    from compile.policy import SAMPLER_OPTIONS

    case = filtered_sampling_case(32, CUDA)
    compiled = torch.compile(filtered_sampling_step, options=SAMPLER_OPTIONS, fullgraph=True)
    assert_same_sampling(compiled(*case), filtered_sampling_step(*case))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sd_sampling_is_lossless(temperature, top_p):
    """The chi-square test of tests/test_speculative.py with the engine on the GPU."""
    from models.loading import random_model
    from respec.engine import RolloutEngine
    from tests.test_speculative import (N_SAMPLES, SHARPEN, SMALL, chi2_quantile_999, chi_square,
                                        exact_sequence_probs, sample_sequences)

    target = random_model(SMALL, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(SHARPEN)
    drafter = random_model(dataclasses.replace(SMALL, num_layers=1), seed=4)
    probs = exact_sequence_probs(target, temperature, top_p)  # on the CPU: the model's own distribution
    engine = RolloutEngine(target.to(CUDA), kv_cache_bytes=256 << 20, block_size=4, max_batch=512, eager=True,
                           drafter=drafter.to(CUDA), num_draft_tokens=2)
    counts = sample_sequences(engine, temperature, top_p)
    assert 0.2 < engine.stats.accept_per_pos[0] < 0.95
    chi2, dof = chi_square(counts, probs, N_SAMPLES)
    assert chi2 < chi2_quantile_999(dof), (chi2, dof)


# ----------------------------------------------------------------------------------------------
TOY = ["--model", "tiny", "--task", "toy-letters", "--prompts", "4", "--group", "8", "--max-new-tokens", "8",
       "--temperature", "0.05", "--lr", "1e-3", "--sd", "off", "--no-progress", "--warmup-steps", "0",
       "--min-lr-ratio", "1"]
# sampled tokens must match exactly; losses within float tolerance (GPU reductions need not be
# bit-reproducible between two processes)
SAME_TOKENS = ["step", "reward_mean", "accuracy", "response_len_mean", "trained_tokens"]
CLOSE = ["loss", "entropy", "grad_norm"]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in SAME_TOKENS} == {k: rb[k] for k in SAME_TOKENS}
        for k in CLOSE:
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-5), (k, ra[k], rb[k])


def test_trainer_resume_on_cuda(tmp_path):
    from respec import checkpoint
    from tests.test_trainer import metrics, train

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(*TOY, "--steps", "4", "--checkpoint-every", "2", "--out", str(straight))
    train(*TOY, "--steps", "2", "--checkpoint-every", "2", "--out", str(split))
    assert checkpoint.latest_checkpoint(split).name == "step_000002"
    train("--resume", str(split), "--steps", "4", "--no-progress")
    assert_same_run(metrics(split), metrics(straight))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_equal_one_process_on_cuda(tmp_path):
    from tests.test_trainer import metrics, one_and_two_ranks

    one, two = one_and_two_ranks(tmp_path, [*TOY, "--steps", "3"])
    assert_same_run(metrics(one), metrics(two))


def test_launch_overhead_inside_a_graph():
    """The bench's launch microbenchmark: eager launches and the same adds replayed in one CUDA graph."""
    from respec.lab.bench import launch_overhead_us

    us = launch_overhead_us(CUDA, ops=200, repeats=2)
    assert us["eager"] > 0 and us["graph"] > 0
