"""generate.py --bench: respec's engine against transformers' `generate` on the same prompts
(greedy past EOS, so both produce the same tokens, or sampled as RL samples), with the model's
read-bandwidth roofline, the cost of a kernel launch, the kernels a step launches (from a profiler
trace) and, with a drafter, speculative decoding beside plain decoding.

Two transformers baselines run on the very weights respec runs:
  * "hf eager": `generate` as most people call it (a dynamic KV cache, no compilation);
  * "hf static": the fast path transformers documents, `cache_implementation="static"`, with which
    `generate` compiles the decoding forward itself (`CompileConfig`: fullgraph, reduce-overhead,
    so CUDA graphs, on CUDA; inductor's default mode on a CPU, which transformers compiles only when
    asked). This is the fair baseline for respec's compiled engine. Under `--eager` it runs with
    the static cache but uncompiled, like for like with respec's eager engine. Where it fails (a
    model or a machine torch.compile cannot handle) the report says why in one line and the bench
    goes on without it.

With a drafter, each batch size's plain and SD rollouts are timed `--reps` times each, alternated
(plain, SD, SD, plain, plain, SD, ...; an even number cancels a steady drift), so that a machine
whose speed drifts during the bench weighs on both arms alike; each SD rollout starts from the
drafter's and the solver's state as the first found it (a history drafter that kept one run's text
would draft the next run from it), and the arms' mean times count. The plain arm runs on the SD
engine with its drafter off (`FixedK(0)`), on the same weights, KV pool and compiled steps (two
engine instances, each with its own, can run a few percent apart on a CPU); a drafter that reads
the target's features (a head) has plain decoding on its own engine, since the SD engine's plain
steps still return them.

Whole `generate` calls include the prefill; a decoding step is timed apart on both sides. respec's
engine times its prefill and its decoding steps itself (EngineStats). transformers' cannot be asked,
so its decoding step is derived from two calls: T(1), a call for one new token (the prefill samples
it; no decoding step runs), and T(N), a call for N; a decoding step is (T(N) - T(1)) / (N - 1).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compile.policy import FIRST_CALL_S
from models.loading import resolve_checkpoint, save_hf_checkpoint
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import StepTimer, warmup
from respec.solver import AdaptiveK, FixedK, cost_key, load_or_profile
from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems


def read_bandwidth_gbs(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Streaming read bandwidth: best of `repeats` sums over a buffer of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def launch_overhead_us(device: torch.device, ops: int = 1000, repeats: int = 5) -> dict[str, float | None]:
    """What one kernel launch costs: `ops` in-place adds on a one-element tensor, synchronised once
    (best of `repeats`), in microseconds per op. "eager": launched one by one from Python, the way
    an uncompiled step launches its kernels; "graph" (CUDA only, else None): the same adds captured
    in one CUDA graph and replayed, the way respec's compiled steps run on a GPU. A small model's
    decoding step is a few hundred such launches: these figures say what launching alone costs it."""
    x = torch.zeros(1, device=device)

    def adds():
        for _ in range(ops):
            x.add_(1)

    def best_us(run) -> float:
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return best / ops * 1e6

    adds()  # the first calls pay for dispatch caches and, on CUDA, the context
    eager = best_us(adds)
    graph = None
    if device.type == "cuda":
        side = torch.cuda.Stream(device)  # capture needs a warmed side stream (torch.cuda.graphs docs)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            adds()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            adds()
        g.replay()
        graph = best_us(g.replay)
    return {"eager": eager, "graph": graph}


def flip_rate(got: list[list[int]], want: list[list[int]]) -> float:
    """Per-token rate at which two decodings that should agree token for token part: rows that part,
    over the tokens compared up to and including each row's first difference (after it, the texts
    differ and nothing more is comparable). In floating point a wider forward can round a logit
    differently and tip a near-tie (respec/speculative.py)."""
    parted, compared = 0, 0
    for a, b in zip(got, want):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if common is None and len(a) == len(b):
            compared += len(a)
        else:
            parted += 1
            compared += (min(len(a), len(b)) if common is None else common) + 1
    return parted / max(compared, 1)


def bench_prompts(tokenizer, n: int, seed: int, task: str = DEFAULT_TASK) -> list[list[int]]:
    """`n` chat prompts of `task`'s problems (different texts and lengths)."""
    return [chat_prompt(tokenizer, p.messages()) for p in make_problems(task, n, seed=seed)]


def hf_model_for(spec: str, model, tokenizer, dtype, device, tmp: Path):
    """transformers' model on the very weights respec runs."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ckpt = resolve_checkpoint(spec)
    if ckpt is None:  # a random preset: write it out as a Hugging Face checkpoint first
        ckpt = tmp / "hf"
        save_hf_checkpoint(model, ckpt, tokenizer)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def hf_generate(hf, tokenizer, prompts: list[list[int]], new_tokens: int,
                **generate_kw) -> tuple[list[list[int]], float]:
    """Greedy `generate` that runs past EOS (exactly `new_tokens` per row); (tokens, seconds)."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(hf.device)
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=tokenizer.pad_token_id, **generate_kw)
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return out[:, batch["input_ids"].shape[1]:].tolist(), elapsed


def hf_static_kw(device: torch.device, compiled: bool) -> dict:
    """`generate` options of the fair baseline: transformers' static KV cache, with which `generate`
    compiles the decoding forward itself (the prefill stays eager). The CompileConfig defaults are
    made for CUDA (reduce-overhead: CUDA graphs); elsewhere transformers compiles only when told to
    (its `_compile_all_devices` flag, "useful for testing") and CUDA graphs have nothing to record.
    `compiled=False` keeps the static cache and turns the compilation off."""
    from transformers import CompileConfig

    if not compiled:
        return {"cache_implementation": "static", "disable_compile": True}
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = device.type != "cuda"
    return {"cache_implementation": "static", "compile_config": config}


def time_hf(hf, tokenizer, prompts: list[list[int]], new_tokens: int, *, warm_calls: int, warm_tokens: int,
            **generate_kw) -> dict:
    """transformers' `generate` timed whole and per decoding step, after `warm_calls` calls of
    `warm_tokens` new tokens (compilation and CUDA graph recording happen there).

    T(N) is a call for all `new_tokens`, T(1) a call for one (prefill only), one timed call each, as
    respec's engine gets one (a best of several on one side only would favour it under noise). A
    decoding step is (T(N) - T(1)) / (N - 1): the calls differ by exactly N - 1 decoding steps.
    Returns the tokens, T(N) in seconds, the decoding step's ms (None when N = 1), T(1) in ms (the
    prefill, with the call's fixed costs) and the warm-up's seconds."""
    t0 = time.perf_counter()
    for _ in range(warm_calls):
        hf_generate(hf, tokenizer, prompts, warm_tokens, **generate_kw)
    warm_s = time.perf_counter() - t0
    tokens, whole_s = hf_generate(hf, tokenizer, prompts, new_tokens, **generate_kw)
    one_s = hf_generate(hf, tokenizer, prompts, 1, **generate_kw)[1]
    step_ms = max(whole_s - one_s, 0.0) / (new_tokens - 1) * 1e3 if new_tokens > 1 else None
    return {"tokens": tokens, "whole_s": whole_s, "decode_ms": step_ms, "prefill_ms": one_s * 1e3, "warm_s": warm_s}


def one_line(e: BaseException) -> str:
    """An exception as one short line (torch.compile's messages run to pages)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:300]


def count_kernels(engine, sd_engine, batch: int, k: int) -> dict:
    """Kernels a plain step (and an SD step with k drafts) launches at `batch` rows, from a profiler
    trace (respec/lab/kernel_count.py); a count that fails is a line in the report, not a crash."""
    from respec.lab.kernel_count import kernels_per_step

    try:
        plain = kernels_per_step(engine, batch)
        out = {"kernels_batch": batch, "kernels_per_step": plain["kernels_per_step"],
               "kernels_per_layer": plain["kernels_per_layer"], "kernels_counted": plain["counted"]}
        if sd_engine is not None:
            out["sd_kernels_per_step"] = kernels_per_step(sd_engine, batch, k=k)["kernels_per_step"]
    except Exception as e:  # noqa: BLE001
        return {"kernels_error": one_line(e)}
    print(f"kernels per plain step at batch {batch}: {out['kernels_per_step']} ({out['kernels_per_layer']} per layer, "
          f"{out['kernels_counted']})" + (f"; per SD step (k = {k}): {out['sd_kernels_per_step']}"
                                          if sd_engine is not None else ""), flush=True)
    return out


def step_by_step(engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple:
    """A rollout with the engine's step-by-step loop (`--run-ahead 0`), kept beside the steps run
    ahead of the host until a GPU run confirms them: (completions, seconds, the timed calls of shapes
    not warmed up)."""
    engine.run_ahead, ahead = 0, engine.run_ahead
    try:
        with engine.steps.timed() as unwarmed:
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            seconds = time.perf_counter() - t0
    finally:
        engine.run_ahead = ahead
    return out, seconds, list(unwarmed)


@dataclass
class Arm:
    """One arm's timed rollouts of a batch: each one's completions and seconds, and the timed step
    calls of shapes not warmed up."""
    outputs: list = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    unwarmed: list = field(default_factory=list)

    @property
    def mean_s(self) -> float:
        return sum(self.seconds) / len(self.seconds)


def sd_state(sd_engine) -> tuple:
    """What an SD rollout starts from and changes: the drafter's carried state (a history drafter's
    earlier rollouts) and the solver's (its acceptance estimate), as copies a later rollout leaves alone."""
    return sd_engine.drafter.state_dict(), copy.deepcopy(sd_engine.policy)


def restore(sd_engine, state: tuple) -> None:
    drafter_state, policy = state
    sd_engine.drafter.load_state_dict(copy.deepcopy(drafter_state))
    sd_engine.policy = copy.deepcopy(policy)


def alternated(engine, sd_engine, prompts: list[list[int]], params: list[SamplingParams], reps: int,
               start: tuple | None = None) -> tuple:
    """`reps` timed rollouts of `prompts` with plain decoding on `engine` (which may be `sd_engine`
    itself: `FixedK(0)` takes its drafter off) and with SD on `sd_engine`, alternated (plain, SD,
    SD, plain, ...; plain alone without `sd_engine`): (the plain arm, the SD arm or None). Every SD
    rollout starts from `start` (`sd_state`, taken before); the state the last one left stays, as
    one rollout's would (the solver's estimate calibrated by it, `end_rollout`, as in a run)."""
    plain, sd = Arm(), (Arm() if sd_engine is not None else None)
    arms = ("plain", "sd") if sd is not None else ("plain",)
    for name in [name for r in range(reps) for name in (arms if r % 2 == 0 else arms[::-1])]:
        if name == "sd":
            restore(sd_engine, start)
        eng, arm, policy = (engine, plain, FixedK(0)) if name == "plain" else (sd_engine, sd, None)
        with eng.steps.timed() as unwarmed:
            t0 = time.perf_counter()
            out = eng.generate(prompts, params, policy=policy)
            arm.seconds.append(time.perf_counter() - t0)
        arm.outputs.append(out)
        arm.unwarmed += unwarmed
        if name == "sd" and isinstance(sd_engine.policy, AdaptiveK):
            sd_engine.policy.end_rollout()
    return plain, sd


def run_bench(args, model, tokenizer, dtype, drafter, eos: list[int], prior: list[float] | None = None) -> dict:
    """respec's engine against transformers' generate (generate.py --bench): tokens/s per batch size,
    the read-bandwidth roofline, tokens that differ, and SD with `drafter` when given: k = --k every
    step (--sd on), or chosen per step by the solver (--sd adaptive: the cost model profiled on the
    SD engine or read from the cache, `prior` the drafter's acceptance estimate if it has one)."""
    device = torch.device(args.device)
    sampled = args.temperature > 0

    def params(b: int, rollout: int = 0) -> list[SamplingParams]:
        """Greedy past EOS (comparable with transformers token for token), or sampled as RL samples:
        each row its own seed (another set per past rollout), stopping at EOS."""
        if not sampled:
            return [SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_on_eos=False)] * b
        return [SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, min_p=args.min_p, seed=args.seed * 1_000_003 + rollout * 10_007 + i) for i in range(b)]

    engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                           compile_mode=args.compile_mode, max_batch=max(args.batch_sizes), eos_token_ids=eos,
                           run_ahead=args.run_ahead, attention=args.attention)
    sd_engine = None
    if drafter is not None:
        sd_engine = RolloutEngine(model, kv_cache_bytes=int(args.kv_cache_gb * 2**30), eager=args.eager,
                                  compile_mode=args.compile_mode, max_batch=max(args.batch_sizes), drafter=drafter,
                                  num_draft_tokens=args.k, verify=args.verify,
                                  eos_token_ids=eos, run_ahead=args.run_ahead, attention=args.attention)
        sd_engine.time_phases = True  # where an SD step's time goes (a device sync per phase on GPUs)
    prompts_for = {b: bench_prompts(tokenizer, b, args.seed, args.task) for b in args.batch_sizes}
    for b, prompts in prompts_for.items():  # all rows must fit the cache at once, or preemption enters the numbers
        need = sum(engine.blocks.blocks_for(len(p) + args.new_tokens + args.k + 1) for p in prompts)
        if need > engine.blocks.num_blocks - 1:
            raise ValueError(f"batch {b} needs {need} KV blocks, the cache has {engine.blocks.num_blocks - 1}: raise --kv-cache-gb")
    # the machine's figures, once the engines took the arguments (bad input refused before anything runs)
    bandwidth = read_bandwidth_gbs(device)
    weight_bytes = model.num_weight_bytes()
    roofline_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    launch = launch_overhead_us(device)
    print(f"model {args.model}  dtype {str(dtype).removeprefix('torch.')}  weights read per step "
          f"{weight_bytes / 1e6:.0f} MB  read bandwidth {bandwidth:.1f} GB/s  roofline {roofline_ms:.1f} ms/step"
          + (f"  sampling T={args.temperature}, stopping at EOS" if sampled else ""), flush=True)
    use_filter = sampled and (args.top_p < 1 or args.top_k > 0 or args.min_p > 0)
    # every shape the timed runs meet: each batch bucket (rows finish at different steps), the draft
    # and verify steps, and (with per-shape CUDA graphs) every block-table width up to the longest row
    longest = max(len(p) for prompts in prompts_for.values() for p in prompts) + args.new_tokens
    compile_s = warmup(engine, args.batch_sizes, use_filter=use_filter, max_context=longest)
    if sd_engine is not None:
        # with the solver choosing (its policy set once the warm engine has fitted the cost model),
        # every k from 0 to --k, not the fixed k the engine starts with
        compile_s += warmup(sd_engine, args.batch_sizes, ks=list(range(args.k + 1)) if args.sd == "adaptive" else None,
                            use_filter=use_filter, max_context=longest)
    profile_s = None
    if sd_engine is not None and args.sd == "adaptive":
        t0 = time.perf_counter()
        mean_prompt = sum(len(p) for prompts in prompts_for.values() for p in prompts) / sum(args.batch_sizes)
        costs, _ = load_or_profile(StepTimer(sd_engine), cost_key(args.model, drafter.describe(), sd_engine),
                                   batch_sizes=args.batch_sizes, ks=sorted({0, 1, args.k}),
                                   contexts=(round(mean_prompt), round(mean_prompt + args.new_tokens)))
        sd_engine.policy = AdaptiveK(costs, args.k, prior)
        profile_s = round(time.perf_counter() - t0, 1)
        print(f"  the solver chooses k: cost model fitted within {costs.rel_error:.1%} ({profile_s} s), "
              f"acceptance estimate {[round(a, 3) for a in sd_engine.policy.alpha]}", flush=True)
    hf = None
    if not sampled:
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_model_for(args.model, model, tokenizer, dtype, device, Path(tmp))
    static_kw = hf_static_kw(device, compiled=not args.eager)
    static_error = None  # why transformers' static-cache baseline could not run, once it could not
    # SD's plain arm: the SD engine itself with its drafter off (the same weights, KV pool and
    # steps), unless its drafter reads the target's features, which its plain steps still return
    plain_engine = sd_engine if sd_engine is not None and not sd_engine.feature_layers else engine
    results = []
    for b in args.batch_sizes:
        prompts = prompts_for[b]
        if sd_engine is not None:
            for r in range(args.past_rollouts):  # earlier rollouts of these prompts (the history drafter keeps them)
                sd_engine.generate(prompts, params(b, rollout=r + 1))
        before_sd = sd_state(sd_engine) if sd_engine is not None else None
        plain, sd = alternated(plain_engine, sd_engine, prompts, params(b), args.reps, before_sd)
        ours, respec_s, unwarmed = plain.outputs[0], plain.mean_s, plain.unwarmed
        plain_tokens = sum(len(o.token_ids) for o in ours)
        step_ms = ours.stats.decode_s / max(len(ours.stats.chosen_k), 1) * 1e3  # per decoding step, plain or SD
        row = {"batch": b, "respec_tok_s": round(plain_tokens / respec_s, 2),
               "tokens_per_row": round(plain_tokens / b, 1), "step_ms": round(step_ms, 2),
               # the engine's own clocks: its decoding steps alone (step_ms by its explicit name), and its prefill
               "decode_ms_per_step": round(step_ms, 2), "decode_tok_s": round(ours.stats.decode_tok_s, 2),
               "prefill_ms": round(ours.stats.prefill_s * 1e3, 2),
               "roofline_ms": round(roofline_ms, 4), "unwarmed_shapes": list(unwarmed),
               "respec_s": [round(t, 3) for t in plain.seconds]}
        same = lambda theirs: f"{sum(o.token_ids == t for o, t in zip(ours, theirs))}/{b}"  # noqa: E731
        if engine.run_ahead:  # the step-by-step loop beside the run ahead (respec/run_ahead.py), until a GPU says
            steps, steps_s, unwarmed = step_by_step(engine, prompts, params(b))
            row["unwarmed_shapes"] += unwarmed
            step_by_step_ms = steps.stats.decode_s / max(len(steps.stats.chosen_k), 1) * 1e3
            row |= {"step_by_step_ms": round(step_by_step_ms, 2),
                    "step_by_step_tok_s": round(sum(len(o.token_ids) for o in steps) / steps_s, 2),
                    "same_tokens_as_step_by_step": same([o.token_ids for o in steps])}
            print(f"  batch {b}: a decoding step {step_ms:.2f} ms run ahead, {step_by_step_ms:.2f} ms step by step "
                  f"(tokens the same: {row['same_tokens_as_step_by_step']})", flush=True)
        ms = lambda x: None if x is None else round(x, 2)  # noqa: E731  (None: no decoding step, N = 1)
        per_s = lambda x: round(b / x * 1e3, 2) if x else None  # noqa: E731  decoding tokens/s from ms per step
        if hf is not None:
            with torch.no_grad():  # eager: one short warm-up call
                t = time_hf(hf, tokenizer, prompts, args.new_tokens, warm_calls=1, warm_tokens=2)
            row |= {"hf_tok_s": round(b * args.new_tokens / t["whole_s"], 2), "same_tokens_as_hf": same(t["tokens"]),
                    "hf_decode_ms_per_step": ms(t["decode_ms"]),
                    "hf_decode_tok_s": per_s(t["decode_ms"]), "hf_prefill_ms": round(t["prefill_ms"], 2)}
        if hf is not None and static_error is None:
            try:  # compiled: two full-length warm-up calls at this batch (compilation, graph recording)
                with torch.no_grad():
                    t = time_hf(hf, tokenizer, prompts, args.new_tokens, warm_calls=2, warm_tokens=args.new_tokens,
                                **static_kw)
            except Exception as e:  # noqa: BLE001  a baseline that cannot run here is a line, not a crash
                static_error = f"batch {b}: {one_line(e)}"
                print(f"  transformers static cache{' + compile' if not args.eager else ''} failed at {static_error}",
                      flush=True)
            else:
                row |= {"hf_static_tok_s": round(b * args.new_tokens / t["whole_s"], 2),
                        "same_tokens_as_hf_static": same(t["tokens"]),
                        "hf_static_decode_ms_per_step": ms(t["decode_ms"]),
                        "hf_static_decode_tok_s": per_s(t["decode_ms"]),
                        "hf_static_prefill_ms": round(t["prefill_ms"], 2), "hf_static_warm_s": round(t["warm_s"], 1)}
        if sd is not None:
            spec, sd_s = sd.outputs[0], sd.mean_s
            row["unwarmed_shapes"] += sd.unwarmed
            st = spec.stats
            sd_tokens = sum(len(x.token_ids) for x in spec)
            # every SD rollout started from the same state: the same tokens, drafts and choices each time
            same_each_time = sum(all(o[i].token_ids == x.token_ids for o in sd.outputs) for i, x in enumerate(spec))
            row |= {"sd_s": [round(t, 3) for t in sd.seconds], "sd_same_across_reps": f"{same_each_time}/{b}",
                    "accept_len_reps": [round(o.stats.accept_len, 3) for o in sd.outputs]}
            if sd_engine.run_ahead and sd_engine.drafter.runs_ahead:  # SD step by step beside its run ahead
                after = sd_state(sd_engine)  # (from the timed rollouts' start; the state after them kept)
                restore(sd_engine, before_sd)
                sd_steps, sd_steps_s, unwarmed = step_by_step(sd_engine, prompts, params(b))  # (respec/sd_ahead.py)
                restore(sd_engine, after)
                row["unwarmed_shapes"] += unwarmed
                row |= {"sd_ahead_steps": st.sd_ahead_steps, "sd_steps": st.sd_steps,
                        "sd_step_by_step_tok_s": round(sum(len(x.token_ids) for x in sd_steps) / sd_steps_s, 2),
                        "sd_same_tokens_as_step_by_step":
                            f"{sum(x.token_ids == y.token_ids for x, y in zip(spec, sd_steps))}/{b}"}
                print(f"  batch {b}: SD {sd_tokens / sd_s:.1f} tok/s run ahead ({st.sd_ahead_steps} of {st.sd_steps} "
                      f"SD steps), {row['sd_step_by_step_tok_s']} step by step (tokens the same: "
                      f"{row['sd_same_tokens_as_step_by_step']})", flush=True)
            # where an SD step's time goes, timed in the steps run one by one (a run ahead of the host
            # has no phases): the step-by-step rollout's where there was one
            phased = sd_steps.stats if "sd_step_by_step_tok_s" in row else st
            per_step = lambda t: round(t / max(phased.sd_steps - phased.sd_ahead_steps, 1) * 1e3, 2)  # noqa: E731
            row |= {"sd_draft_ms": per_step(phased.sd_phase_s["draft"]),
                    "sd_verify_ms": per_step(phased.sd_phase_s["verify"]), "sd_host_ms": per_step(phased.sd_phase_s["host"])}
            row |= {"sd_tok_s": round(sd_tokens / sd_s, 2), "sd_tokens_per_row": round(sd_tokens / b, 1),
                    "sd_chosen_k": {str(k): n for k, n in sorted(Counter(st.chosen_k).items())},
                    "accept_len": round(st.accept_len, 3), "sd_step_fraction": round(st.sd_steps / max(len(st.chosen_k), 1), 3),
                    "accept_per_pos": [round(a, 3) for a in st.accept_per_pos]}
            if not sampled or args.verify == "match":  # SD's tokens should then be plain decoding's
                row["sd_same_as_plain"] = f"{sum(x.token_ids == o.token_ids for x, o in zip(spec, ours))}/{b}"
                row["sd_flips_per_1k_tokens"] = round(1000 * flip_rate([x.token_ids for x in spec],
                                                                       [o.token_ids for o in ours]), 2)
        results.append(row)
        print(f"  batch {b}: done", flush=True)
    # after every timed run: a profiler session (CUPTI on a GPU) must not sit under the timings
    kernels = count_kernels(engine, sd_engine, args.batch_sizes[0], args.k)
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "compile_s": round(compile_s, 1),
              "drafter": args.drafter, "k": args.k if drafter is not None else 0, "temperature": args.temperature,
              "sd": args.sd if drafter is not None else None, "cost_profile_s": profile_s,
              "past_rollouts": args.past_rollouts, "reps": args.reps,
              "plain_on": "the SD engine, its drafter off" if plain_engine is sd_engine else "its own engine",
              "read_bandwidth_gb_s": round(bandwidth, 1),
              "weight_bytes": weight_bytes, "new_tokens": args.new_tokens, "attention": args.attention,
              "launch_us_eager": round(launch["eager"], 3),
              "launch_us_graph": None if launch["graph"] is None else round(launch["graph"], 3),
              "hf_static_compiled": not args.eager, "hf_static_error": static_error,
              # each compiled step's first call in this process: its cold compile (0 graphs when eager)
              "first_call_s": dict(FIRST_CALL_S), **kernels, "results": results}
    print_table(report)
    return report


def print_table(report: dict) -> None:
    sampled = report.get("temperature", 0) > 0
    unwarmed = sum(len(r.get("unwarmed_shapes", [])) for r in report["results"])
    if unwarmed:  # a CUDA graph recorded (or a TensorRT engine built) inside a timed run
        print(f"\nwarning: {unwarmed} timed step call(s) met a shape the warm-up had not called twice: the times "
              f"below include graph recording (see unwarmed_shapes in the JSON)")
    print(f"\n{report['model']} {report['dtype']}, {report['new_tokens']} new tokens"
          + (f" at most, T={report['temperature']}, EOS stops" if sampled else "") + f", compile {report['compile_s']} s")
    if report.get("launch_us_eager") is not None:
        graph = report.get("launch_us_graph")
        print(f"kernel launch {report['launch_us_eager']:.2f} us eager"
              + (f", {graph:.2f} us inside a CUDA graph" if graph is not None else " (no CUDA: no graph figure)"))
    if not sampled:
        compiled = report.get("hf_static_compiled", True)
        static = "hf static: static KV cache, " + ("compiled" if compiled else "eager (--eager)")
        if report.get("hf_static_error"):
            print(f"{static}: failed at {report['hf_static_error']}")
        print(f"\nwhole generate calls, prefill included (hf eager: dynamic cache, uncompiled; {static})")
        head = (f"{'batch':>5} {'respec tok/s':>13} {'hf tok/s':>10} {'speed-up':>9} {'hf static tok/s':>16} "
                f"{'vs static':>10} {'same as hf':>11} {'same as static':>15}")
        print(head)
        print("-" * len(head))
        for r in report["results"]:
            print(f"{r['batch']:>5} {r['respec_tok_s']:>13.1f} {_num(r.get('hf_tok_s'), 10, 1)}"
                  f" {_ratio(r['respec_tok_s'], r.get('hf_tok_s')):>9} {_num(r.get('hf_static_tok_s'), 16, 1)}"
                  f" {_ratio(r['respec_tok_s'], r.get('hf_static_tok_s')):>10} {r.get('same_tokens_as_hf', '-'):>11}"
                  f" {r.get('same_tokens_as_hf_static', '-'):>15}")
    if not sampled and report["new_tokens"] > 1:  # (with one new token no decoding step runs)
        print(f"\ndecoding steps alone, ms per step (respec: the engine's clock; transformers: "
              f"(T({report['new_tokens']}) - T(1)) / {report['new_tokens'] - 1})")
        head = (f"{'batch':>5} {'respec ms':>10} {'hf ms':>8} {'speed-up':>9} {'hf static ms':>13} {'vs static':>10} "
                f"{'decode tok/s':>13} {'roofline ms':>12} {'x roofline':>11}")
        print(head)
        print("-" * len(head))
        for r in report["results"]:
            # a speed-up is the other side's time over respec's
            print(f"{r['batch']:>5} {r['step_ms']:>10.2f} {_num(r.get('hf_decode_ms_per_step'), 8, 2)}"
                  f" {_ratio(r.get('hf_decode_ms_per_step'), r['step_ms']):>9}"
                  f" {_num(r.get('hf_static_decode_ms_per_step'), 13, 2)}"
                  f" {_ratio(r.get('hf_static_decode_ms_per_step'), r['step_ms']):>10}"
                  f" {_num(r.get('decode_tok_s'), 13, 1)} {r['roofline_ms']:>12.2f}"
                  f" {_ratio(r['step_ms'], r['roofline_ms']):>11}")
    sd_rows = [r for r in report["results"] if "sd_tok_s" in r]
    if sd_rows:
        past = f", {report['past_rollouts']} past rollouts of the prompts" if report.get("past_rollouts") else ""
        policy = ", k chosen per step by the solver" if report.get("sd") == "adaptive" else ""
        print(f"\nspeculative decoding, drafter {report['drafter']}, k={report['k']}{policy}{past}")
        print(f"{'batch':>5} {'plain tok/s':>12} {'sd tok/s':>9} {'vs plain':>9} {'accept len':>11} {'SD steps':>9} "
              f"{'tokens/row':>11} {'same as plain':>14} {'plain step ms':>14} {'SD step ms: draft + verify + host':>34}"
              f"  accepted per position")
        for r in sd_rows:
            phases = f"{r['sd_draft_ms']:.1f} + {r['sd_verify_ms']:.1f} + {r['sd_host_ms']:.1f}"
            print(f"{r['batch']:>5} {r['respec_tok_s']:>12.1f} {r['sd_tok_s']:>9.1f} {r['sd_tok_s'] / r['respec_tok_s']:>8.2f}x"
                  f" {r['accept_len']:>11.2f} {r['sd_step_fraction']:>9.0%} {r['sd_tokens_per_row']:>11}"
                  f" {r.get('sd_same_as_plain', '-'):>14} {r['step_ms']:>14.1f} {phases:>34}  {r['accept_per_pos']}")
        if report.get("reps", 1) > 1:
            print(f"each arm's {report['reps']} timed rollouts, alternated (plain, SD, SD, plain, ...), seconds:")
            for r in sd_rows:
                print(f"{r['batch']:>5} plain {' '.join(f'{t:.2f}' for t in r['respec_s'])}   SD "
                      f"{' '.join(f'{t:.2f}' for t in r['sd_s'])}   SD tokens the same each time: "
                      f"{r['sd_same_across_reps']}, accept len {r['accept_len_reps']}")


def _num(x, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"
