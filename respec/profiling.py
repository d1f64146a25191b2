"""The engine's steps run on synthetic sequences, outside any rollout: to time them (the solver's
cost profile, respec/solver.py) and to compile them ahead of a run (`warmup`).

A synthetic step is one real decode step (k = 0) or SD step with k drafts of the engine, on `batch`
new sequences of `context` tokens, cached by an untimed prefill first (`RolloutEngine.time_step`).
Their text is random, or, where the drafter has no model of its own (model-free: history, replay,
the lab's oracle), a short period repeated and given as each row's continuation too (its `replay`),
so that it proposes all k tokens (from the text, or from the continuation) as a model drafter
always does; a hybrid's model then drafts every row, as it does in a rollout where nothing repeats.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from compile.policy import buckets_up_to
from respec.engine import RolloutEngine, SamplingParams, Sequence
from respec.solver import FixedK


def synthetic_steps(engine: RolloutEngine, batch: int, k: int, context: int, calls: int, *,
                    use_filter: bool = False, ahead: bool = False) -> list[float]:
    """Seconds of each of `calls` identical steps (greedy rows, or sampled with a top-p filter;
    `ahead`: runs of SD steps ahead of the host, `RolloutEngine.time_step`)."""
    widest = max(engine.k, engine.replay_k) if engine.k else 0
    if k > widest:
        raise ValueError(f"cannot time k={k}: the engine drafts at most {widest}")
    if batch > engine.max_batch:  # (past it, a compiled step's rows leave their declared range)
        raise ValueError(f"cannot time {batch} rows: the engine runs at most {engine.max_batch}")
    if engine.blocks.blocks_for(context + k + 1) * batch > engine.blocks.num_free:
        raise ValueError(f"{batch} sequences of {context} tokens do not fit the KV cache")
    gen = torch.Generator().manual_seed(context)
    params = SamplingParams(max_new_tokens=1 << 30, temperature=1.0 if use_filter else 0.0,
                            top_p=0.9 if use_filter else 1.0, stop_on_eos=False)
    repeat = engine.drafter.module is None  # model-free: the drafter proposes from the text (see above)
    texts = []
    for _ in range(batch):
        n = context + k + 1
        text = torch.randint(engine.model.cfg.vocab_size, (8 if repeat else n,), generator=gen).tolist()
        texts.append((text * (n // len(text) + 1))[:n])
    times = []
    for call in range(calls):
        # a replay that continues the text: past the model's k (a replay group's verify,
        # respec/drafters/replay.py), and for a model-free drafter that drafts from it (replay, oracle)
        seqs = [Sequence(-1 - call * batch - i, text[:context - 1], params, out=[text[context - 1]],
                         replay=text[context - 1: context + k] if k > engine.k or repeat else None)
                for i, text in enumerate(texts)]
        times.append(engine.time_step(seqs, k, ahead=ahead))
    return times


class StepTimer:
    """What the solver's cost profile times (respec/solver.py `profile_costs`): an engine's steps.
    The first `steps.warm_calls` calls of a shape warm it up (they may compile, or record a CUDA
    graph) and are not timed."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.k = engine.k

    def time_step(self, batch: int, k: int, context: int, *, reps: int = 2) -> float:
        """Mean seconds of one step with k drafts (0: a decode step) over `reps` timed calls."""
        warm = self.engine.steps.warm_calls
        times = synthetic_steps(self.engine, batch, k, context, reps + warm)
        return sum(times[warm:]) / max(reps, 1)


def warmup(engine: RolloutEngine, batch_sizes: list[int] | None = None, *, ks: list[int] | None = None,
           use_filter: bool = False, max_context: int | None = None, progress: bool = True) -> float:
    """Compile the engine's steps ahead of time for every batch bucket up to the largest of
    `batch_sizes` (a rollout's batch shrinks through all of them) and every draft length in `ks`
    (default: 0, plus the engine's k with a fixed policy, or 0..k with any other policy); returns
    seconds (0 for an eager engine).

    Where graphs are per shape (whole-step: CUDA graphs) every shape a run will meet is called
    `steps.warm_calls` times: each block-table width up to `max_context` tokens (the longest prompt
    plus its new tokens), so that no graph is recorded inside a timed region."""
    if engine.steps.eager:
        return 0.0
    t0 = time.perf_counter()
    largest = max(batch_sizes) if batch_sizes else engine.max_batch
    buckets = sorted({engine.steps.batch_bucket(b, engine.max_batch) for b in buckets_up_to(largest)})
    shapes = [(b, k, context) for b in buckets for k in warm_ks(engine, ks)
              for context in warm_contexts(engine, k, max_context)]
    for b, k, context in tqdm(shapes, desc="compiling step shapes", disable=not progress):
        synthetic_steps(engine, b, k, context, engine.steps.warm_calls, use_filter=use_filter)
    if engine.drafter.runs_ahead:  # its own device helpers (the history drafter's search), met in runs only
        for b, k in sorted({(b, k) for b, k, _ in shapes if k}):
            synthetic_steps(engine, b, k, warm_contexts(engine, k, None)[0], 1, use_filter=use_filter, ahead=True)
    return time.perf_counter() - t0


def warm_ks(engine: RolloutEngine, ks: list[int] | None = None) -> list[int]:
    """The draft lengths `warmup` compiles: `ks`, or what the engine's policy can choose now (0 and
    its k for a fixed policy, 0..k for any other). A caller that sets the policy after the warm-up
    (the solver needs a warm engine to fit its cost model) passes the ks of the policy to come."""
    if ks is not None:
        return list(ks)
    if not engine.k:
        return [0]
    return sorted({0, engine.policy.k}) if isinstance(engine.policy, FixedK) else list(range(engine.k + 1))


def warm_contexts(engine: RolloutEngine, k: int, max_context: int | None) -> list[int]:
    """Contexts whose SD step with k drafts meets each block-table width up to `max_context` tokens
    (one context where the width is a dynamic dimension of one graph)."""
    bs, steps = engine.blocks.block_size, engine.steps
    if not steps.graph_per_shape or max_context is None:
        return [4 * bs]
    widest = steps.table_width(engine.blocks.blocks_for(min(max_context, engine.max_len) + k + 1))
    widths = sorted({steps.table_width(n) for n in range(1, widest + 1)})
    # a synthetic step's sequences hold context + k tokens once its k + 1 slots are reserved
    return [max(w * bs - k, 2) for w in widths if w * bs - k <= engine.max_len]
