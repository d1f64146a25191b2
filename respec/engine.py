"""The rollout engine: many requests, one paged KV cache, continuous batching.

`RolloutEngine.generate(requests)` takes prompts (token ids) with their sampling parameters and
returns, per request, the completion's token ids and the log-probability of each token under the
distribution it was sampled from (RL needs these), with the call's statistics. Which sequences run
and the KV slots they hold is the scheduler's (respec/scheduler.py); the engine computes. The loop,
each iteration:

  1. admit waiting sequences while the batch has room and the pool has blocks: one batched,
     right-padded prefill caches their tokens and samples their first new token;
  2. otherwise one decoding step for every running sequence, as the SD policy plans it
     (respec/solver.py `Policy.plan`: groups of rows, each verified in one forward with its draft
     length, 0 = a plain decode step; padded to a batch bucket); before it, every sequence gets
     slots for its newest token and its drafts, and if the pool runs dry the most recently
     admitted sequence is *preempted*: its blocks are freed and it goes back to the front of the
     queue with everything it generated so far, to be recomputed by a later prefill;
  3. sequences that sampled EOS or reached their token limit leave at once and free their blocks.

Without a drafter the engine holds a `NoDrafter` and k = 0: the same calls, nothing drafted. A
rollout whose policy cannot draft at any step (`Policy.speculates`: the solver keeps SD off at every
batch size and context it can reach) runs with a `NoDrafter` too: feeding a drafter that will not
draft (a head's prefill over every prompt, its per-step bookkeeping) costs time and buys nothing.

Where every row decodes plainly (no drafter, or the policy turned SD off), steps run ahead of the
host until the batch can change (respec/run_ahead.py: the rows' state on the device, a flag per step
read a step behind, the tokens read once per run); so do SD steps where every row drafts up to the
same k with a drafter whose state stays on the device (respec/sd_ahead.py: the EAGLE head); otherwise there is one
host sync per step (the sampled tokens come back to decide who finished and what to draft). Sampling
noise is counter-based (`respec/sampling.py`), so a request's tokens depend on its seed and text,
not on batch composition or preemption, as far as the logits do not: in fp32 on a CPU exactly (the
tests; a GPU's matmuls and split reductions are chosen by shape, so there fp32 may round too);
in bf16 a forward of another shape (batch bucket, verify width, recompute) rounds the logits
differently and a near-tie under the noise flips (measured in docs/benchmarks.md:
`python -m respec.lab.flips`).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from compile.cpu_linear import packed_view, packing_available, repack, unpack
from compile.policy import CompiledSteps
from respec.drafters import DraftBatch, Drafter, EngineView, NoDrafter
from respec import flex_paged
from respec.drafters.wrap import as_drafter
from respec.host_copy import to_device
from respec.host_memory import heap_reused
from respec.kv_cache import PagedKVCache
from respec.paged_attention import ATTENTION_KINDS
import respec.run_ahead as ahead
import respec.sd_ahead as sd_ahead
from respec.sampling import RowSampling, SamplingParams, padded_vocab, prepare_sampler
from respec.scheduler import Row, Scheduler
from respec.solver import FixedK, Group, Policy, Verified, acceptance_counts
from respec.speculative import VERIFY_RULES, verify_step
from respec.steps import decode_step, prefill_step, right_padded


class Stopped(Exception):
    """`generate` was asked to stop (`should_stop`) before every sequence finished."""


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens (EOS included when it ended the sequence)
    # log-prob of each under the distribution it was sampled from (temperature, top-k and top-p
    # applied): the target's at its position, whether a plain decoding step or an SD verify emitted
    # it (an accepted draft, a correction or a bonus token alike: exact SD samples each from it)
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length"
    verified: list[bool] = field(default_factory=list)  # per token: emitted by an SD verify (else plain decoding)


class Completions(list):
    """`generate`'s completions, in input order, with the call's statistics (`.stats`)."""

    def __init__(self, completions: list[Completion], stats: "EngineStats"):
        super().__init__(completions)
        self.stats = stats


@dataclass
class Sequence:
    """A request as the engine runs it: its text so far, and what it emitted."""

    id: int
    prompt: list[int]
    params: SamplingParams
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    finish_reason: str | None = None
    replay: list[int] | None = None  # an earlier completion of the same request, for a replay drafter
    # prompt + out, grown in step with `out` (a step reads a row's text without copying it): read only
    tokens: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        self.tokens = self.prompt + self.out

    def append(self, token: int) -> None:
        self.out.append(token)
        self.tokens.append(token)

    def pop(self) -> int:
        self.tokens.pop()
        return self.out.pop()

    def extend(self, tokens: list[int], logprobs: list[float], verified: bool = False) -> None:
        """Several tokens of one row recorded at once (a run of plain steps, a verify's)."""
        self.out += tokens
        self.tokens += tokens
        self.logprobs += logprobs
        self.verified += [verified] * len(tokens)


@dataclass
class EngineStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0  # the time of every decoding step, plain and SD
    decode_steps: int = 0  # plain decoding steps (the SD steps are sd_steps; len(chosen_k) is all of them)
    ahead_steps: int = 0  # of those, steps run ahead of the host (respec/run_ahead.py)
    sd_ahead_steps: int = 0  # of the SD steps, those run ahead of the host (respec/sd_ahead.py)
    drafter_idle: bool = False  # the policy could not draft at any step: the rollout ran without its drafter
    generated_tokens: int = 0
    prefill_tokens: int = 0  # of those, sampled by prefills (one per admitted sequence)
    preemptions: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # active batch at every decode step
    sd_steps: int = 0  # speculative steps (one target verify each)
    sd_rows: int = 0  # sequences summed over speculative steps
    sd_emitted: int = 0  # tokens those rows emitted (accepted drafts + one corrected/bonus token, up to a stop)
    sd_accepted_at: list[int] = field(default_factory=list)  # rows whose draft i was accepted, per i
    sd_reached_at: list[int] = field(default_factory=list)  # rows that proposed a draft i with drafts < i accepted
    chosen_k: list[int] = field(default_factory=list)  # draft length of every decode step (0 = plain)
    # per drafter kind (a hybrid's rows: "model", "history", "replay"): rows verified, drafts they
    # proposed, drafts accepted, tokens emitted
    sd_kinds: dict = field(default_factory=dict)
    # where SD steps' time goes: "draft" (catch-up and drafting), "verify" (the target's forward over
    # k+1 positions and the acceptance test, to the host sync) and "host" (emitting, rollback, commit)
    sd_phase_s: dict = field(default_factory=lambda: {"draft": 0.0, "verify": 0.0, "host": 0.0})

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decoding steps alone (what the step-cost model predicts)."""
        return (self.generated_tokens - self.prefill_tokens) / max(self.decode_s, 1e-9)

    @property
    def accept_len(self) -> float:
        """Mean tokens emitted per row per target verify step (bonus included)."""
        return self.sd_emitted / max(self.sd_rows, 1)

    @property
    def accept_per_pos(self) -> list[float]:
        """Fraction of rows whose i-th draft token was accepted."""
        return [a / max(self.sd_rows, 1) for a in self.sd_accepted_at]

    def count_kinds(self, kinds: list[str], proposed: list[int], accepted: list[int], emitted: list[int]) -> None:
        """One verify's rows by drafter kind (a row that proposed nothing counts as "plain": it rode
        along in the forward): rows, drafts proposed, drafts accepted, tokens emitted. Summed per kind
        first, so a verify of one kind is one update whatever its rows."""
        if len(set(kinds)) == 1 and all(proposed):
            per = {kinds[0]: (len(kinds), sum(proposed), sum(accepted), sum(emitted))}
        else:
            per = {}
            for kind, m, a, e in zip(kinds, proposed, accepted, emitted):
                r0, m0, a0, e0 = per.get(kind if m else "plain", (0, 0, 0, 0))
                per[kind if m else "plain"] = (r0 + 1, m0 + m, a0 + a, e0 + e)
        for kind, (rows, m, a, e) in per.items():
            c = self.sd_kinds.setdefault(kind, {"rows": 0, "proposed": 0, "accepted": 0, "emitted": 0})
            c["rows"] += rows
            c["proposed"] += m
            c["accepted"] += a
            c["emitted"] += e

    def proposed_by(self, kind: str) -> int:
        """Drafts the rows of one drafter kind proposed ("model": the head's)."""
        return self.sd_kinds.get(kind, {}).get("proposed", 0)

    def count_verified(self, kind: str, verified: Verified) -> None:
        """Verified rows of one drafter kind, counted (respec/solver.py `Verified`), each emitting its
        accepted drafts and one token more: into the per-kind and per-position counts, as
        `count_kinds` and `count_acceptance` count them row by row."""
        rows = verified.rows
        plain = verified.by_proposed().get(0, 0)  # (rows that proposed nothing rode along: "plain")
        if rows > plain:
            a = verified.accepted
            drafts = sum(m * c for (_, m), c in verified.pairs.items())
            c = self.sd_kinds.setdefault(kind, {"rows": 0, "proposed": 0, "accepted": 0, "emitted": 0})
            c["rows"] += rows - plain
            c["proposed"] += drafts
            c["accepted"] += a
            c["emitted"] += a + rows - plain
        if plain:
            c = self.sd_kinds.setdefault("plain", {"rows": 0, "proposed": 0, "accepted": 0, "emitted": 0})
            c["rows"] += plain
            c["emitted"] += plain
        self._count_positions(*verified.acceptance())

    def count_acceptance(self, accepted: list[int], proposed: list[int]) -> None:
        """One verify's rows into the per-position counts (respec/solver.py `acceptance_counts`)."""
        self._count_positions(*acceptance_counts(accepted, proposed))

    def _count_positions(self, accepted_at: list[int], reached_at: list[int]) -> None:
        grow = len(reached_at) - len(self.sd_reached_at)
        if grow > 0:
            self.sd_accepted_at += [0] * grow
            self.sd_reached_at += [0] * grow
        for j, (a, r) in enumerate(zip(accepted_at, reached_at)):
            self.sd_accepted_at[j] += a
            self.sd_reached_at[j] += r


def read_back(*tensors: torch.Tensor) -> list[list]:
    """A step's outputs as (nested) lists, read by the host in one copy: on a GPU each read is a
    wait for the device, so the tensors travel as one (`packed_read`); a CPU tensor is read in place."""
    if tensors[0].device.type == "cpu":
        return [t.tolist() for t in tensors]
    return packed_read(*tensors)


def packed_read(*tensors: torch.Tensor) -> list[list]:
    """The tensors (1-d or 2-d) as lists from one float64 copy, ints for integer tensors: float64
    holds token ids, counts and float32 log-probabilities exactly."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, at = [], 0
    for t in tensors:
        values = flat[at: at + t.numel()]
        at += t.numel()
        if not t.is_floating_point():
            values = [int(v) for v in values]
        if t.dim() == 2:
            width = t.shape[1]
            values = [values[i: i + width] for i in range(0, len(values), width)]
        out.append(values)
    return out


class RolloutEngine:
    def __init__(
        self,
        model,
        *,
        kv_cache_bytes: int,  # size of the block pool
        eos_token_ids: list[int] | tuple[int, ...] = (),
        block_size: int = 16,  # token slots per block
        max_batch: int = 64,  # most sequences decoding at once
        max_prefill_tokens: int = 4096,  # padded prompt tokens per prefill batch
        eager: bool = False,  # no torch.compile (debugging; same tokens)
        pack_weights: bool = True,  # oneDNN-packed linears on CPU (compile/cpu_linear.py; not under
        # `compile_mode="graphs"`, whose captured steps read the weights where they were, and a repack makes new ones)
        compile_mode: str | None = None,  # regional / whole (default per device, see compile/policy.py)
        drafter=None,  # speculative decoding: a respec.drafters.Drafter, or a model `as_drafter` wraps in one
        num_draft_tokens: int = 0,  # k (the largest k with a policy), tokens drafted per SD step (>= 1)
        policy: Policy | None = None,  # plans each step (respec/solver.py: FixedK, AdaptiveK); default FixedK(k)
        verify: str = "match",  # how drafts are verified: match (plain decoding's tokens) or rejection (respec/speculative.py)
        replay_k: int = 0,  # most drafts a long deterministic proposal (a replay) may make per verify; 0: k
        run_ahead: int = 32,  # most plain steps run with the host reading their tokens a step behind (respec/run_ahead.py); 0: step by step
        attention: str = "gather",  # the decode and verify steps' paged attention: gather (+ SDPA) or flex (the pool read in place, respec/flex_paged.py; the prefill gathers)
    ):
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model = model
        pack_weights = pack_weights and (eager or compile_mode != "graphs")
        self.runner = packed_view(model) if pack_weights and packing_available(self.device, self.dtype) else model
        self.released = False  # release_weights() dropped the packed weights; sync_weights() makes them again
        cfg = model.cfg
        self.max_len = cfg.max_position_embeddings
        self.drafter: Drafter = NoDrafter() if drafter is None else as_drafter(drafter)
        if drafter is not None and num_draft_tokens < 1:
            raise ValueError(f"speculative decoding needs k >= 1 draft tokens, got {num_draft_tokens}")
        self.k = 0 if isinstance(self.drafter, NoDrafter) else num_draft_tokens  # 0: never speculates
        if verify not in VERIFY_RULES:
            raise ValueError(f"unknown verification rule {verify!r} (choose {', '.join(VERIFY_RULES)})")
        self.verify = verify
        if replay_k < 0:
            raise ValueError(f"replay_k must be >= 0, got {replay_k}")
        self.replay_k = replay_k
        if run_ahead < 0:
            raise ValueError(f"run_ahead must be >= 0, got {run_ahead}")
        self.run_ahead = run_ahead
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {attention!r} (choose {', '.join(ATTENTION_KINDS)})")
        self.attention = attention
        if attention == "flex":
            flex_paged.check_queries(max(self.k, replay_k) + 1)
        self.policy = policy if policy is not None else FixedK(self.k)
        self.drafter.check(model)
        self.cache = PagedKVCache(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  capacity_bytes=kv_cache_bytes, block_size=block_size, dtype=self.dtype,
                                  device=self.device, draft_shape=self.drafter.pool_shape)
        self.blocks = self.cache.blocks
        self.eos = set(int(e) for e in eos_token_ids)
        # the decode step's EOS check (respec/steps.py sample_watch): (1, E), -1 where there is none
        self.eos_ids = torch.tensor([sorted(self.eos) or [-1]], dtype=torch.int64).to(self.device)
        self.max_batch = max_batch
        self.scheduler = Scheduler(self.blocks, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens,
                                   forget=self.drafter.forget)
        # the most blocks one sequence's table can hold: the model's context, or the whole pool
        max_blocks = min(self.blocks.blocks_for(self.max_len), self.blocks.num_blocks - 1)
        self.steps = CompiledSteps(eager=eager, device=self.device, mode=compile_mode, max_batch=max_batch,
                                   max_blocks=max_blocks)
        self.steps.check_index_width(cfg, verify_width=max(self.k, replay_k) + 1, block_size=block_size,
                                     vocab=padded_vocab(cfg.vocab_size), draft_pool_shape=self.drafter.pool_shape)
        prepare_sampler(cfg.vocab_size, self.device)  # the sampler's hash tables, once, outside any graph
        self.steps.static_inputs(self.cache.pools + self.cache.draft_pools)
        self.stats = EngineStats()
        self._sampling = None  # the running rows' sampling tensors (see _row_params)
        self._watch = None  # the running rows' EOS watch (see _watching)
        self.time_phases = False  # see _phase
        # the target's features the drafter reads, returned by prefill, decode and verify steps
        self.feature_layers = self.drafter.feature_layers
        self.drafter.attach(EngineView(target=self.runner, draft_pools=self.cache.draft_pools, steps=self.steps,
                                       tables=self._tables, device=self.device, dtype=self.dtype,
                                       pack_weights=pack_weights, max_len=self.max_len,
                                       runs_ahead=lambda: self.run_ahead > 1))

    def release_weights(self) -> None:
        """Call before the model's weights change (an optimizer step), when nothing will decode until
        `sync_weights`: the packed copies, stale from then on, are dropped (on a CPU, 0.25 GiB of
        SmolLM2-135M in bf16 free while the actor trains; `sync_weights` packs the new weights)."""
        if self.runner is not self.model:
            unpack(self.runner)
            self.released = True

    def sync_weights(self) -> None:
        """Call after the model's weights changed (an optimizer step): refresh packed copies."""
        if self.runner is not self.model:
            repack(self.runner)
            self.released = False
        self.sync_drafter()

    def sync_drafter(self) -> None:
        """Call after the drafter's weights changed in place: refresh its packed copy."""
        self.drafter.sync()

    @torch.no_grad()
    def load_drafter_weights(self, source: torch.nn.Module) -> None:
        """New drafter weights (an online distillation update of its master copy, `source`, or a head
        of the same shape): its parameters and saved buffers (a head's draft vocabulary) copied into
        the drafter the engine runs, in place (in the rollout dtype), its packed copy refreshed."""
        live = self.drafter.module.state_dict()  # (aliases of the live tensors)
        for name, t in source.state_dict().items():
            live[name].copy_(t)
        self.sync_drafter()

    # ------------------------------------------------------------------------------------------
    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (one line) if this request can never be served."""
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context of {self.max_len}")
        longest = min(len(prompt) + params.max_new_tokens + max(self.k, self.replay_k), self.max_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks - 1:
            raise ValueError(
                f"a sequence of {longest} tokens needs {self.blocks.blocks_for(longest)} KV blocks but the cache has "
                f"{self.blocks.num_blocks - 1}: raise the KV cache size"
            )

    def limit_batch(self, n: int) -> None:
        """From now on at most `n` sequences decode at once (the others wait, as past `max_batch`):
        a bench's batch size on one engine. `n` at most the `max_batch` its steps were built for."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch limit must be in [1, {self.max_batch}], got {n}")
        self.scheduler.max_batch = n

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
                 replays: list[list[int] | None] | None = None, policy=None, on_finish=None,
                 should_stop=None) -> Completions:
        """Complete every prompt; results in input order, with this call's statistics (`.stats`,
        also `self.stats` until the next call). `replays`: an earlier completion of each request (or
        None), which a replay drafter proposes from (respec/drafters/replay.py; the tokens do not
        depend on it). `policy`: the SD policy of this call only (e.g. FixedK(0) for an evaluation
        without speculation; default the engine's). `on_finish(n)` (e.g. a tqdm bar's update) is
        told whenever n sequences finish. If `should_stop()` turns true (checked before every step),
        the rollout is abandoned: its blocks are freed and `Stopped` is raised."""
        if self.released:
            raise RuntimeError("the engine's packed weights were released: sync_weights() before generating")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts) or (replays is not None and len(replays) != len(prompts)):
            raise ValueError("one SamplingParams per prompt (or a single one for all), and one replay per prompt")
        seqs = [Sequence(i, list(map(int, p)), sp, replay=None if replays is None else replays[i])
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        for s in seqs:
            self.check_request(s.prompt, s.params)
        self.stats = EngineStats()
        self._sampling = None
        policy = policy if policy is not None else self.policy
        waiting: deque[Sequence] = deque(seqs)
        running: list[Sequence] = []
        # (on a CPU, steps whose logits are larger than glibc keeps in its heap by its own rule reuse
        # them from the heap rather than mapping them anew: respec/host_memory.py)
        heap = heap_reused(self.widest_logits_bytes(len(seqs))) if self.device.type == "cpu" else nullcontext()
        with torch.no_grad(), self._drafter_for(seqs, policy), heap:
            while waiting or running:
                if should_stop is not None and should_stop():
                    for s in running:
                        self.scheduler.release(s)
                    raise Stopped(f"rollout abandoned with {len(running) + len(waiting)} of {len(seqs)} "
                                  "sequences unfinished")
                admitted = self.scheduler.admit(waiting, running)
                if admitted:
                    self._prefill(admitted)
                    running += admitted
                else:
                    self._step(waiting, running, policy, should_stop)
                finished = [s for s in running if s.finish_reason]
                for s in finished:
                    self.scheduler.release(s)
                    running.remove(s)
                if finished and on_finish is not None:
                    on_finish(len(finished))
        return Completions([Completion(s.out, s.logprobs, s.finish_reason, s.verified) for s in seqs], self.stats)

    def widest_logits_bytes(self, n: int) -> int:
        """The fp32 logits of the widest step `n` sequences take in common: their rows (padded to a
        batch bucket) x a k-draft verify (or a plain step) x the vocabulary. (A replay verify's long
        drafts are left out: the solver gives them to a few rows at a few steps, and counting them
        would turn the setting on for every rollout that may replay, however small its steps.)"""
        rows = self.steps.batch_bucket(min(n, self.max_batch), self.max_batch)
        return rows * (self.k + 1) * padded_vocab(self.model.cfg.vocab_size) * 4

    @contextmanager
    def _drafter_for(self, seqs: list[Sequence], policy: Policy):
        """The drafter a rollout of `seqs` feeds: none where `policy` cannot draft at any of its steps
        (asked at its largest batch and longest context, `Policy.speculates`), else the engine's. The
        rows' tokens are the same either way (a step the policy plans plain is plain); the drafter's
        state is too (a drafter keeps nothing of rows it never drafted for)."""
        if not self.k:
            yield
            return
        rows = min(len(seqs), self.scheduler.max_batch)
        context = max(min(len(s.prompt) + s.params.max_new_tokens, self.max_len) for s in seqs)
        long_rows = sum(s.replay is not None for s in seqs) if self.replay_k else 0
        if policy.speculates(rows, context, max_k=self.k, long_rows=long_rows, max_long=self.replay_k):
            yield
            return
        drafter, self.drafter = self.drafter, NoDrafter()
        self.stats.drafter_idle = True
        try:
            yield
        finally:
            self.drafter = drafter

    def _step(self, waiting: deque, running: list[Sequence], policy: Policy, should_stop=None) -> None:
        """One decoding step of every running sequence, as `policy` plans it: groups of rows, each
        verified in one forward with its draft length (0: a plain decode step). Slots for every
        row's drafts are reserved first (which may preempt rows from the back); each group's outcome
        goes back to the policy. Where every row decodes plainly, up to `run_ahead` steps run with
        the host a step behind (respec/run_ahead.py), until the batch can change; so do SD steps
        where every row drafts up to the same k with a drafter that `runs_ahead` (respec/sd_ahead.py)."""
        context = sum(len(s.tokens) for s in running) / len(running)
        offers = self.drafter.long_drafts(running) if self.replay_k else None
        room = self._room(running)
        groups = policy.plan(room, offers, context, max_k=self.k, max_long=self.replay_k,
                             remaining=None if waiting or not offers or not any(offers) else
                             self._remaining(running, offers, room))
        if self.run_ahead > 1 and not any(c for g in groups for c in g.caps):
            steps = ahead.steps_ahead(self, running, min(self.run_ahead, policy.plain_run() or self.run_ahead))
            if steps > 1:
                ahead.run_ahead(self, running, steps, should_stop)
                return
        k = sd_ahead.runs_ahead(self, groups, room, running)
        if k:
            steps = sd_ahead.steps_ahead(self, running, k, min(self.run_ahead, policy.plain_run() or self.run_ahead))
            if steps > 1:
                sd_ahead.sd_run_ahead(self, running, groups[0], steps, policy, should_stop)
                return
        caps = [0] * len(running)
        for g in groups:
            for row, cap in zip(g.rows, g.caps):
                caps[row] = cap
        rows = self.scheduler.reserve(waiting, running, [Row(s, c) for s, c in zip(running, caps)])
        self.stats.preemptions += len(caps) - len(rows)
        for g in groups:
            if (g := g.first(len(rows))) is None:  # (the preempted are the last rows)
                continue
            outcome = self._speculate([running[i] for i in g.rows], g.width, g.caps)
            if outcome is not None:
                policy.observe_group(g, *outcome)

    @staticmethod
    def _remaining(running: list[Sequence], offers: list[int], room: list[int]) -> list[int]:
        """Each row's expected tokens left, for a policy that prices by the rollout's end: a long
        proposal's length (a replay's rest), else what is left of the row's replay, else (no replay,
        or the row ran past it) all the row may still emit."""
        return [o or (len(s.replay) - len(s.out) if s.replay is not None and len(s.replay) > len(s.out) else r + 1)
                for s, o, r in zip(running, offers, room)]

    def _room(self, running: list[Sequence]) -> list[int]:
        """Most drafts each row may propose: up to its context or token limit (a row emits at most
        drafts + 1 tokens). Per row, so one long sequence does not turn SD off for the batch."""
        return [max(0, min(self.max_len - len(s.tokens) - 1, s.params.max_new_tokens - len(s.out) - 1))
                for s in running]

    def time_step(self, seqs: list[Sequence], k: int, *, ahead: bool = False) -> float:
        """Seconds of one decoding step (k = 0) or SD step with up to k drafts per row of `seqs`, new
        sequences (ids no running one has) whose text is cached first by an untimed prefill and
        whose blocks are freed after: what the solver's cost profile times and the warm-up runs to
        compile every shape (respec/profiling.py). The prefill's sample is replaced by the text's own
        next token (nothing of it is cached yet), so that a drafter matching the text proposes; a
        row with a `replay` past the drafter's k verifies that many. With `ahead` (where a rollout's
        plan of these rows would: `sd_ahead.runs_ahead`) two SD steps run ahead of the host instead (respec/sd_ahead.py: what the
        warm-up runs to compile the drafter's own device helpers), told to a throwaway policy. The
        statistics of rollouts are left as they were."""
        stats, self.stats = self.stats, EngineStats()
        self._sampling = None
        try:
            with torch.no_grad():
                newest = [s.pop() for s in seqs]  # the step's input tokens, cached by none
                for s in seqs:
                    self.blocks.allocate(s.id, len(s.tokens))
                self._prefill(seqs)
                for s, token in zip(seqs, newest):
                    s.pop()
                    s.append(token)
                    s.finish_reason = None
                caps = [min(k, room) for room in self._room(seqs)]
                if any(caps):  # (a model drafter's feed of the text: the first SD step's, not every step's)
                    self.drafter.settle(seqs, k)
                group = Group(list(range(len(seqs))), k, caps)
                ahead = ahead and k > 0 and sd_ahead.runs_ahead(self, [group], self._room(seqs), seqs) == k
                for s, cap in zip(seqs, caps):  # slots for the newest token and the drafts (a run reserves its own)
                    if not ahead:
                        self.blocks.append(s.id, cap + 1)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                if ahead:
                    sd_ahead.sd_run_ahead(self, seqs, group, 2, FixedK(k))
                else:
                    self._speculate(seqs, k, caps)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return time.perf_counter() - t0
        finally:
            for s in seqs:
                if s.id in self.blocks.tables:
                    self.scheduler.release(s)
            self.stats = stats

    # ------------------------------------------------------------------------------------------
    def _tables(self, seqs: list[Sequence], rows: int | None = None) -> torch.Tensor:
        """The sequences' block tables, as wide as the longest needs, padded to `rows` rows."""
        return to_device(self.device, self._table_rows(seqs, rows))[0]

    def _table_rows(self, seqs: list[Sequence], rows: int | None = None) -> list[list[int]]:
        """`_tables` as host lists (for `to_device`, with a step's other inputs)."""
        width = self.steps.table_width(max(len(self.blocks.tables[s.id]) for s in seqs))
        return self.cache.block_table_rows([s.id for s in seqs], width, rows)

    def _row_params(self, seqs: list[Sequence], rows: int) -> tuple[RowSampling, bool]:
        """Per-row sampling tensors, padded to `rows` (padding rows: greedy, seed 0), and whether any
        row filters (top-k / top-p / min-p: a static flag of the compiled steps). Built when the
        running rows change, not every step (`_sampling` holds the last, reset by every call)."""
        key = (rows, *(s.id for s in seqs))
        if self._sampling is None or self._sampling[0] != key:
            self._sampling = (key, self._build_row_params(seqs, rows))
        return self._sampling[1]

    def _watching(self, seqs: list[Sequence], rows: int) -> torch.Tensor:
        """(rows,) bool on the device: the rows whose EOS ends them (padding rows: False); built when
        the running rows change."""
        key = (rows, *(s.id for s in seqs))
        if self._watch is None or self._watch[0] != key:
            watch = [s.params.stop_on_eos and bool(self.eos) for s in seqs] + [False] * (rows - len(seqs))
            self._watch = (key, torch.tensor(watch).to(self.device, non_blocking=True))
        return self._watch[1]

    def _build_row_params(self, seqs: list[Sequence], rows: int) -> tuple[RowSampling, bool]:
        pad = rows - len(seqs)
        seeds = torch.tensor([s.params.seed for s in seqs] + [0] * pad, dtype=torch.int64)
        temp = torch.tensor([s.params.temperature for s in seqs] + [0.0] * pad, dtype=torch.float32)
        top_k = torch.tensor([s.params.top_k for s in seqs] + [0] * pad, dtype=torch.int64)
        top_p = torch.tensor([s.params.top_p for s in seqs] + [1.0] * pad, dtype=torch.float32)
        min_p = torch.tensor([s.params.min_p for s in seqs] + [0.0] * pad, dtype=torch.float32)
        use_filter = any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0
                         for s in seqs if s.params.temperature > 0)
        return RowSampling(*(t.to(self.device) for t in (seeds, temp, top_k, top_p, min_p))), use_filter

    def _emit(self, s: Sequence, tok: int, lp: float, verified: bool = False) -> None:
        s.append(tok)
        s.logprobs.append(lp)
        s.verified.append(verified)
        self.stats.generated_tokens += 1
        if s.params.stop_on_eos and tok in self.eos:
            s.finish_reason = "stop"
        elif len(s.out) >= s.params.max_new_tokens or len(s.tokens) >= self.max_len:
            s.finish_reason = "length"

    def _emit_runs(self, seqs: list[Sequence], tokens: list[list[int]], logprobs: list[list[float]],
                   accepted: list[int]) -> list[int]:
        """A verify's tokens for each row: its accepted drafts and the token after them, up to and
        with the first that ends the row (EOS, its token or context limit), recorded at once; returns
        how many each row emitted."""
        eos, max_len, emitted = self.eos, self.max_len, []
        for s, row, lps, n in zip(seqs, tokens, logprobs, accepted):
            p = s.params
            cut = min(n + 1, p.max_new_tokens - len(s.out), max_len - len(s.tokens))
            run = row[:cut]
            stop = p.stop_on_eos and eos and not eos.isdisjoint(run)
            if stop:
                cut = next(j + 1 for j, t in enumerate(run) if t in eos)
                run = run[:cut]
            s.extend(run, lps[:cut], verified=True)
            if stop:
                s.finish_reason = "stop"
            elif len(s.out) >= p.max_new_tokens or len(s.tokens) >= max_len:
                s.finish_reason = "length"
            emitted.append(cut)
        self.stats.generated_tokens += sum(emitted)
        return emitted

    def _record(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        for s, tok, lp in zip(seqs, *read_back(tokens, logprobs)):  # the step's one host read
            self._emit(s, tok, lp)

    def _prefill(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        B = len(seqs)
        tokens, positions, valid = right_padded([(s.tokens, 0) for s in seqs])
        last = torch.tensor([len(s.tokens) - 1 for s in seqs], dtype=torch.int64)
        tables = self._tables(seqs)
        sampling, use_filter = self._row_params(seqs, B)
        step = self.steps.eager_fn(prefill_step, use_filter=use_filter, hidden_layers=self.feature_layers)
        dev = self.device
        tokens, positions, valid = tokens.to(dev), positions.to(dev), valid.to(dev)
        out = step(self.runner, self.cache.pools, tokens, positions, valid, tables, last.to(dev), *sampling)
        first, logprobs, taps = out if self.feature_layers else (*out, None)
        # the drafter sees the same tokens (before the first new one is recorded)
        self.drafter.on_prefill(seqs, tokens, positions, valid, tables, taps, first)
        self._record(seqs, first, logprobs)
        self.stats.prefill_tokens += len(seqs)
        self.stats.prefill_s += time.perf_counter() - t0

    def _decode(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        rows = self.steps.batch_bucket(len(seqs), self.max_batch)
        pad = [0] * (rows - len(seqs))
        tokens, positions, tables = to_device(self.device, [s.out[-1] for s in seqs] + pad,
                                              [len(s.tokens) - 1 for s in seqs] + pad, self._table_rows(seqs, rows))
        sampling, use_filter = self._row_params(seqs, rows)
        step = self.steps.get(decode_step, use_filter=use_filter, hidden_layers=self.feature_layers,
                              attention=self.attention)
        next_tokens, logprobs, _, _, *taps = step(self.runner, self.cache.pools, tokens, positions, tables, self.eos_ids,
                                                  self._watching(seqs, rows), *sampling)
        self.drafter.on_decode(seqs, taps[0] if taps else None, next_tokens)
        self._record(seqs, next_tokens[: len(seqs)], logprobs[: len(seqs)])
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.batch_sizes.append(len(seqs))
        self.stats.chosen_k.append(0)

    def _speculate(self, seqs: list[Sequence], k: int, caps: list[int]) -> tuple[list[int], list[int]] | None:
        """One decoding step of `seqs` with up to `caps[i]` drafts per row: draft, then verify; a plain
        decoding step where no row may draft or the drafter proposed nothing (a model-free drafter
        with no match), its reserved slots handed back. Returns each row's accepted and proposed
        drafts (None: it decoded plainly)."""
        t0 = time.perf_counter()
        proposal = self._draft(seqs, k, caps) if any(caps) else None
        if proposal is None:
            for s, cap in zip(seqs, caps):
                if cap:
                    self.blocks.truncate(s.id, cap)
            self._decode(seqs)
            return None
        return self._verify(*proposal, t0=t0)

    def _draft(self, seqs: list[Sequence], k: int, caps: list[int]) -> tuple | None:
        """The drafter's proposal for this step (catch up -> draft), or None if it has none."""
        t0 = time.perf_counter()
        dev = self.device
        self.drafter.catch_up(seqs, k)
        rows = self.steps.batch_bucket(len(seqs), self.max_batch)
        pad = [0] * (rows - len(seqs))
        sampling, use_filter = self._row_params(seqs, rows)
        tokens, positions, tables, max_drafts, left = to_device(
            dev, [s.tokens[-1] for s in seqs] + pad, [len(s.tokens) - 1 for s in seqs] + pad,
            self._table_rows(seqs, rows), caps + pad, [c + 1 for c in caps] + pad)
        batch = DraftBatch(seqs=seqs, k=k, sampling=sampling, use_filter=use_filter, coupled=self.verify == "match",
                           tokens=tokens, positions=positions, block_tables=tables, max_drafts=max_drafts,
                           max_drafts_list=caps, left=left)
        drafts = self.drafter.draft(batch)
        if drafts.lengths_list is not None and not any(drafts.lengths_list):  # nothing to verify
            return None
        self._phase("draft", t0)
        return batch, drafts, caps

    def _verify(self, batch: DraftBatch, drafts, caps: list[int], *, t0: float) -> tuple[list[int], list[int]]:
        """Verify the drafts in one (k+1)-wide forward -> accept -> roll back -> commit. Returns each
        row's accepted and proposed drafts."""
        t1 = time.perf_counter()
        seqs, k = batch.seqs, batch.k
        verify = self.steps.get(verify_step, use_filter=batch.use_filter, rule=self.verify,
                                late=sd_ahead.reads_late(self.device), hidden_layers=self.feature_layers,
                                attention=self.attention)
        # (with the inputs of a next step run ahead of the host, which a step by itself does not read)
        tokens_d, logprobs_d, n_d, *_, taps = verify(self.runner, self.cache.pools, batch.tokens, drafts.tokens,
                                                     drafts.lengths, drafts.q, drafts.point, batch.positions,
                                                     batch.block_tables, *batch.sampling, batch.left,
                                                     self.eos_ids, self._watching(seqs, len(batch.tokens)))
        tokens, logprobs, n = read_back(tokens_d, logprobs_d, n_d)  # the step's one host read
        lengths = drafts.lengths_list if drafts.lengths_list is not None else caps
        kinds = drafts.kinds or [self.drafter.kind] * len(seqs)
        t2 = self._phase("verify", t1)
        n = n[: len(seqs)]
        emitted = self._emit_runs(seqs, tokens, logprobs, n)
        running = [i for i, s in enumerate(seqs) if not s.finish_reason]
        truncate = self.blocks.truncate
        for i in running:  # roll back the slots of the rejected drafts (the drafter's pools share the tables)
            if caps[i] != n[i]:
                truncate(seqs[i].id, caps[i] - n[i])
        self.stats.sd_emitted += sum(emitted)
        self.stats.count_kinds(kinds, lengths, list(map(min, n, emitted)), emitted)
        self.stats.count_acceptance(n, lengths)
        if len(running) == len(seqs):  # (the usual step: every row goes on, the outputs' first rows)
            self.drafter.commit(seqs, n, tokens_d[: len(seqs)], None if taps is None else taps[: len(seqs)])
        elif running:
            self.drafter.commit([seqs[i] for i in running], [n[i] for i in running], tokens_d[running],
                                None if taps is None else taps[running])
        self._phase("host", t2)
        self.stats.sd_steps += 1
        self.stats.sd_rows += len(seqs)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.batch_sizes.append(len(seqs))
        self.stats.chosen_k.append(k)
        return n, list(lengths)

    def _phase(self, name: str, since: float) -> float:
        """Add the time since `since` to an SD phase; returns now. On a GPU the phases are only
        separated with `time_phases` set (a device sync each, which a rollout should not pay)."""
        if self.time_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stats.sd_phase_s[name] += now - since
        return now
