"""The rollout engine: many requests, one paged KV cache, continuous batching.

`RolloutEngine.generate(requests)` takes prompts (token ids) with their sampling parameters and
returns, per request, the completion's token ids and the log-probability of each token under the
distribution it was sampled from (RL needs these). The loop, each iteration:

  1. admit waiting sequences while the batch has room and the pool has blocks: one batched,
     right-padded prefill caches their tokens and samples their first new token;
  2. otherwise run one decode step for every running sequence (padded to a batch bucket);
     before it, every sequence gets a slot for its newest token, and if the pool runs dry the most
     recently admitted sequence is *preempted*: its blocks are freed and it goes back to the front
     of the queue with everything it generated so far, to be recomputed by a later prefill;
  3. sequences that sampled EOS or reached their token limit leave at once and free their blocks.

There is one host sync per step (the sampled tokens come back to decide who finished). Sampling
noise is counter-based (`respec/sampling.py`), so a request's tokens depend on its seed and text,
not on batch composition or preemption.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from compile.cpu_linear import packed_view, packing_available, repack
from compile.policy import CompiledSteps, batch_bucket, buckets_up_to, table_width
from models.drafter import check_compatible
from models.eagle import EagleHead, check_eagle_fits
from respec.kv_cache import PagedKVCache
from respec.paged_attention import PagedKV
from respec.solver import FixedK
from respec.speculative import eagle_speculative_step, speculative_step
from respec.steps import decode_step, prefill_step


class Stopped(Exception):
    """`generate` was asked to stop (`should_stop`) before every sequence finished."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128  # completion length limit (tokens)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = off
    top_k: int = 0  # most likely tokens kept; 0 = off
    seed: int = 0  # fixes the sampling noise of this request
    stop_on_eos: bool = True  # end the completion at an EOS token (which is kept in the output)

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens (EOS included when it ended the sequence)
    logprobs: list[float]  # log-prob of each under the sampling distribution
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    # EAGLE head: the (target feature of position j-1, token j) pairs it has not consumed yet, for
    # j = pending_start.. : features (m, 3d) and tokens (m,); the last pair holds the newest token
    pending: tuple | None = None
    pending_start: int = 0
    # small-model drafter: how many leading tokens its KV cache holds
    drafted: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


@dataclass
class EngineStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0  # of those, sampled by prefills (one per admitted sequence)
    preemptions: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # active batch at every decode step
    sd_steps: int = 0  # speculative steps (one target verify each)
    sd_rows: int = 0  # sequences summed over speculative steps
    sd_emitted: int = 0  # tokens those rows emitted (accepted drafts + one corrected/bonus token each)
    sd_accepted_at: list[int] = field(default_factory=list)  # rows whose draft i was accepted, per i
    chosen_k: list[int] = field(default_factory=list)  # draft length of every decode step (0 = plain)

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


def right_padded(spans: list[tuple[list[int], int]]):
    """Token spans (ids, position of the first) as right-padded (tokens, positions, valid), (B, T)."""
    T = max(len(ids) for ids, _ in spans)
    tokens = torch.zeros(len(spans), T, dtype=torch.int64)
    positions = torch.zeros(len(spans), T, dtype=torch.int64)
    valid = torch.zeros(len(spans), T, dtype=torch.bool)
    for i, (ids, start) in enumerate(spans):
        n = len(ids)
        tokens[i, :n] = torch.tensor(ids)
        positions[i, :n] = torch.arange(start, start + n)
        valid[i, :n] = True
    return tokens, positions, valid


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
        pack_weights: bool = True,  # oneDNN-packed linears on CPU (compile/cpu_linear.py)
        compile_mode: str | None = None,  # regional / whole (default per device, see compile/policy.py)
        drafter=None,  # speculative decoding: an EagleHead, or a Decoder over the target's vocabulary
        num_draft_tokens: int = 0,  # k (the largest k with a policy), tokens drafted per SD step (>= 1)
        policy=None,  # chooses k per step (respec/solver.py: FixedK, AdaptiveK); default FixedK(k)
    ):
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model = model
        self.runner = packed_view(model) if pack_weights and packing_available(self.device, self.dtype) else model
        cfg = model.cfg
        self.max_len = cfg.max_position_embeddings
        self.drafter, self.k = drafter, num_draft_tokens
        self.policy = policy if policy is not None else FixedK(num_draft_tokens)
        draft_shape = None
        self.eagle = isinstance(drafter, EagleHead)
        if drafter is not None:
            if num_draft_tokens < 1:
                raise ValueError(f"speculative decoding needs k >= 1 draft tokens, got {num_draft_tokens}")
            if self.eagle:
                check_eagle_fits(model, drafter)
                draft_shape = (1, cfg.num_kv_heads, cfg.head_dim)
            else:
                check_compatible(model, drafter)
                draft_shape = (drafter.cfg.num_layers, drafter.cfg.num_kv_heads, drafter.cfg.head_dim)
            packed = pack_weights and packing_available(self.device, self.dtype)
            self.draft_runner = packed_view(drafter) if packed else drafter
        self.cache = PagedKVCache(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  capacity_bytes=kv_cache_bytes, block_size=block_size, dtype=self.dtype,
                                  device=self.device, draft_shape=draft_shape)
        self.blocks = self.cache.blocks
        self.eos = set(int(e) for e in eos_token_ids)
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.steps = CompiledSteps(eager=eager, device=self.device, mode=compile_mode)
        self.stats = EngineStats()

    def sync_weights(self) -> None:
        """Call after the model's weights changed (an optimizer step): refresh packed copies."""
        if self.runner is not self.model:
            repack(self.runner)
        self.sync_drafter()

    def sync_drafter(self) -> None:
        """Call after the drafter's weights changed (an online distillation update)."""
        if self.drafter is not None and self.draft_runner is not self.drafter:
            repack(self.draft_runner)

    # ------------------------------------------------------------------------------------------
    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (one line) if this request can never be served."""
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context of {self.max_len}")
        longest = min(len(prompt) + params.max_new_tokens + self.k, self.max_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks - 1:
            raise ValueError(
                f"a sequence of {longest} tokens needs {self.blocks.blocks_for(longest)} KV blocks but the cache has "
                f"{self.blocks.num_blocks - 1}: raise the KV cache size"
            )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
                 on_finish=None, should_stop=None) -> list[Completion]:
        """Complete every prompt; results in input order. `on_finish(n)` (e.g. a tqdm bar's update)
        is told whenever n sequences finish. If `should_stop()` turns true (checked before every
        step), the rollout is abandoned: its blocks are freed and `Stopped` is raised."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        seqs = [_Sequence(i, list(map(int, p)), sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for s in seqs:
            self.check_request(s.prompt, s.params)
        waiting: deque[_Sequence] = deque(seqs)
        running: list[_Sequence] = []
        with torch.no_grad():
            while waiting or running:
                if should_stop is not None and should_stop():
                    for s in running:
                        self.blocks.free(s.id)
                    raise Stopped(f"rollout abandoned with {len(running) + len(waiting)} of {len(seqs)} sequences unfinished")
                admitted = self._admit(waiting, running)
                if admitted:
                    self._prefill(admitted)
                    running += admitted
                else:
                    k = self._choose_k(running)
                    self._reserve_slots(waiting, running, k + 1)
                    if k and running:  # (preemption may have emptied the batch)
                        self._speculate(running, k)
                    elif running:
                        self._decode(running)
                finished = [s for s in running if s.finish_reason]
                for s in finished:
                    self.blocks.free(s.id)
                    running.remove(s)
                if finished and on_finish is not None:
                    on_finish(len(finished))
        return [Completion(s.out, s.logprobs, s.finish_reason) for s in seqs]

    def _choose_k(self, running: list[_Sequence]) -> int:
        """This step's draft length: the policy's choice for the active batch, capped at the
        engine's k and at what still fits every sequence's context."""
        if self.drafter is None:
            return 0
        context = sum(len(s.tokens) for s in running) / len(running)
        k = min(self.policy.choose(len(running), context), self.k)
        room = min(self.max_len - len(s.tokens) for s in running)
        return max(0, min(k, room - 1))

    # ------------------------------------------------------------------------------------------
    def _admit(self, waiting: deque, running: list) -> list[_Sequence]:
        admitted = []
        while waiting and len(running) + len(admitted) < self.max_batch:
            s = waiting[0]
            n = len(s.tokens)
            longest = max([n] + [len(a.tokens) for a in admitted])
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            # Room for the prompt plus its first decoded token, so admission cannot preempt at once.
            if self.blocks.blocks_for(n + 1) > self.blocks.num_free:
                break
            self.blocks.allocate(s.id, n)
            admitted.append(waiting.popleft())
        return admitted

    def _reserve_slots(self, waiting: deque, running: list, n: int) -> None:
        """`n` slots per running sequence (its newest token, plus drafts when speculating),
        preempting from the back if the pool runs dry."""
        while sum(self.blocks.extra_blocks(s.id, n) for s in running) > self.blocks.num_free:
            victim = running.pop()  # the most recently admitted
            self.blocks.free(victim.id)
            victim.pending, victim.drafted = None, 0  # drafter state is rebuilt by the prefill that readmits it
            waiting.appendleft(victim)
            self.stats.preemptions += 1
        for s in running:
            self.blocks.append(s.id, n)

    def _tables(self, seqs: list[_Sequence], rows: int | None = None) -> torch.Tensor:
        """The sequences' block tables, as wide as the longest needs, padded to `rows` rows."""
        width = table_width(max(len(self.blocks.tables[s.id]) for s in seqs))
        return self.cache.block_tables([s.id for s in seqs], width, rows)

    def _row_params(self, seqs: list[_Sequence], rows: int):
        """Per-row sampling tensors, padded to `rows` (padding rows: greedy, seed 0)."""
        pad = rows - len(seqs)
        seeds = torch.tensor([s.params.seed for s in seqs] + [0] * pad, dtype=torch.int64)
        temp = torch.tensor([s.params.temperature for s in seqs] + [0.0] * pad, dtype=torch.float32)
        top_k = torch.tensor([s.params.top_k for s in seqs] + [0] * pad, dtype=torch.int64)
        top_p = torch.tensor([s.params.top_p for s in seqs] + [1.0] * pad, dtype=torch.float32)
        use_filter = any(s.params.top_k > 0 or s.params.top_p < 1 for s in seqs if s.params.temperature > 0)
        return [t.to(self.device) for t in (seeds, temp, top_k, top_p)], use_filter

    def _emit(self, s: _Sequence, tok: int, lp: float) -> None:
        s.out.append(tok)
        s.logprobs.append(lp)
        self.stats.generated_tokens += 1
        if s.params.stop_on_eos and tok in self.eos:
            s.finish_reason = "stop"
        elif len(s.out) >= s.params.max_new_tokens or len(s.tokens) >= self.max_len:
            s.finish_reason = "length"

    def _record(self, seqs: list[_Sequence], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        for s, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):  # the one host sync per step
            self._emit(s, tok, lp)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        t0 = time.perf_counter()
        B = len(seqs)
        tokens, positions, valid = right_padded([(s.tokens, 0) for s in seqs])
        last = torch.tensor([len(s.tokens) - 1 for s in seqs], dtype=torch.int64)
        tables = self._tables(seqs)
        (seeds, temp, top_k, top_p), use_filter = self._row_params(seqs, B)
        taps_of = self.drafter.cfg.feature_layers if self.eagle else ()
        step = self.steps.eager_fn(prefill_step, use_filter=use_filter, hidden_layers=taps_of)
        dev = self.device
        tokens, positions, valid = tokens.to(dev), positions.to(dev), valid.to(dev)
        out = step(self.runner, self.cache.pools, tokens, positions, valid, tables, last.to(dev), seeds, temp, top_k, top_p)
        if self.eagle:
            *out, taps = out
            self._eagle_prefill(seqs, tokens, positions, valid, tables, taps, out[0])
        elif self.drafter is not None:  # the drafter caches the same tokens in its own pools
            self.draft_runner(tokens, positions, PagedKV.build(self.cache.draft_pools, tables, positions,
                                                               self.drafter.cfg.n_rep, valid=valid))
            for s in seqs:
                s.drafted = len(s.tokens)
        self._record(seqs, *out)
        self.stats.prefill_tokens += len(seqs)
        self.stats.prefill_s += time.perf_counter() - t0

    def _eagle_prefill(self, seqs, tokens, positions, valid, tables, taps, first_tokens) -> None:
        """The head consumes the prompt pairs (feature of position j-1, token j), j = 0..L-1 (a zero
        feature before the first token); the pair of the first sampled token waits in `pending`."""
        head = self.draft_runner
        B = tokens.shape[0]
        shifted = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
        kv = PagedKV.build(self.cache.draft_pools, tables, positions, head.n_rep, valid=valid)
        head(head.project(shifted), tokens, positions, self.runner.embed_tokens, kv.layer(0))
        for i, s in enumerate(seqs):
            L = len(s.tokens)
            s.pending, s.pending_start = (taps[i, L - 1: L], first_tokens[i: i + 1]), L

    def _padded_pending(self, s: _Sequence | None, width: int) -> tuple:
        """A sequence's pending pairs as (features, tokens, positions, valid), right-padded to `width`
        (None: a padding row, one zero pair at position 0)."""
        dev = self.device
        if s is None:
            taps = torch.zeros(1, self.drafter.fc.in_features, dtype=self.dtype, device=dev)
            tokens, start = torch.zeros(1, dtype=torch.int64, device=dev), 0
        else:
            (taps, tokens), start = s.pending, s.pending_start
        m = taps.shape[0]
        taps = torch.cat([taps, taps.new_zeros(width - m, taps.shape[-1])])
        tokens = torch.cat([tokens, tokens.new_zeros(width - m)])
        positions = start + torch.arange(width, device=dev)
        return taps, tokens, positions, torch.arange(width, device=dev) < m

    def _catch_up(self, seqs: list[_Sequence], k: int) -> None:
        """Bring the drafter up to date before an SD step of k drafts with what it missed while SD
        was off (plain decode steps): the EAGLE head consumes all but its newest pending pair (which
        the SD step consumes), a small-model drafter caches all but the last two tokens (which the
        SD step feeds). One eager, right-padded forward over the sequences that need it."""
        if self.eagle:
            behind = [s for s in seqs if s.pending[0].shape[0] > k + 1]
            if not behind:
                return
            width = max(s.pending[0].shape[0] for s in behind) - 1
            rows = [self._padded_pending(s, width + 1) for s in behind]
            taps, tokens, positions, valid = (torch.stack(t)[:, :width] for t in zip(*rows))
            valid = valid & (torch.arange(width, device=self.device) < torch.tensor(
                [s.pending[0].shape[0] - 1 for s in behind], device=self.device).view(-1, 1))
            tables = self._tables(behind)
            kv = PagedKV.build(self.cache.draft_pools, tables, positions, self.draft_runner.n_rep, valid=valid)
            self.draft_runner(self.draft_runner.project(taps), tokens, positions, self.runner.embed_tokens, kv.layer(0))
            for s in behind:
                (t, tok), m = s.pending, s.pending[0].shape[0]
                s.pending, s.pending_start = (t[m - 1:], tok[m - 1:]), s.pending_start + m - 1
        elif self.drafter is not None:
            behind = [s for s in seqs if s.drafted < len(s.tokens) - 2]
            if not behind:
                return
            tokens, positions, valid = right_padded([(s.tokens[s.drafted: len(s.tokens) - 2], s.drafted) for s in behind])
            dev = self.device
            tables = self._tables(behind)
            positions, valid = positions.to(dev), valid.to(dev)
            self.draft_runner(tokens.to(dev), positions, PagedKV.build(self.cache.draft_pools, tables, positions,
                                                                       self.drafter.cfg.n_rep, valid=valid))
            for s in behind:
                s.drafted = len(s.tokens) - 2

    def _decode(self, seqs: list[_Sequence]) -> None:
        t0 = time.perf_counter()
        rows = batch_bucket(len(seqs), self.max_batch)
        pad = rows - len(seqs)
        tokens = torch.tensor([s.out[-1] for s in seqs] + [0] * pad, dtype=torch.int64)
        positions = torch.tensor([len(s.tokens) - 1 for s in seqs] + [0] * pad, dtype=torch.int64)
        tables = self._tables(seqs, rows)
        (seeds, temp, top_k, top_p), use_filter = self._row_params(seqs, rows)
        taps_of = self.drafter.cfg.feature_layers if self.eagle else ()
        step = self.steps.get(decode_step, use_filter=use_filter, hidden_layers=taps_of)
        next_tokens, logprobs, *taps = step(self.runner, self.cache.pools, tokens.to(self.device),
                                            positions.to(self.device), tables, seeds, temp, top_k, top_p)
        if self.eagle:  # the head will need (feature of the input token, the token sampled after it)
            for i, s in enumerate(seqs):
                t, tok = s.pending
                s.pending = (torch.cat([t, taps[0][i: i + 1]]), torch.cat([tok, next_tokens[i: i + 1]]))
        self._record(seqs, next_tokens[: len(seqs)], logprobs[: len(seqs)])
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.batch_sizes.append(len(seqs))
        self.stats.chosen_k.append(0)

    def _speculate(self, seqs: list[_Sequence], k: int) -> None:
        t0 = time.perf_counter()
        self._catch_up(seqs, k)
        rows = batch_bucket(len(seqs), self.max_batch)
        pad = [0] * (rows - len(seqs))
        prev = torch.tensor([s.tokens[-2] for s in seqs] + pad, dtype=torch.int64)
        tokens = torch.tensor([s.tokens[-1] for s in seqs] + pad, dtype=torch.int64)
        positions = torch.tensor([len(s.tokens) - 1 for s in seqs] + pad, dtype=torch.int64)
        tables = self._tables(seqs, rows)
        (seeds, temp, top_k, top_p), use_filter = self._row_params(seqs, rows)
        dev = self.device
        if self.eagle:
            step = self.steps.get(eagle_speculative_step, k=k, use_filter=use_filter)
            pend = [self._padded_pending(s, k + 1) for s in seqs] + [self._padded_pending(None, k + 1)] * len(pad)
            pend_taps, pend_tokens, pend_pos, pend_valid = (torch.stack(t) for t in zip(*pend))
            out_tokens_d, out_lp, n_d, taps = step(self.runner, self.draft_runner, self.cache.pools,
                                                   self.cache.draft_pools, pend_taps, pend_tokens, pend_pos,
                                                   pend_valid, positions.to(dev), tables, seeds, temp, top_k, top_p)
        else:
            step = self.steps.get(speculative_step, k=k, use_filter=use_filter)
            out_tokens_d, out_lp, n_d = step(self.runner, self.draft_runner, self.cache.pools, self.cache.draft_pools,
                                             prev.to(dev), tokens.to(dev), positions.to(dev), tables, seeds, temp,
                                             top_k, top_p)
        out_tokens, out_lp, n = out_tokens_d.tolist(), out_lp.tolist(), n_d.tolist()  # the host sync of this step
        if len(self.stats.sd_accepted_at) < k:
            self.stats.sd_accepted_at += [0] * (k - len(self.stats.sd_accepted_at))
        for i, s in enumerate(seqs):
            for tok, lp in zip(out_tokens[i][: n[i] + 1], out_lp[i][: n[i] + 1]):
                self._emit(s, tok, lp)
                if s.finish_reason:
                    break
            else:  # roll back the rejected drafts' slots (target and drafter share the tables)
                self.blocks.truncate(s.id, k - n[i])
                if self.eagle:  # the verified pairs the head has not seen: up to the newest token
                    s.pending = (taps[i, : n[i] + 1], out_tokens_d[i, : n[i] + 1])
                    s.pending_start = len(s.tokens) - 1 - n[i]
                else:
                    s.drafted = len(s.tokens) - 2
            for j in range(n[i]):
                self.stats.sd_accepted_at[j] += 1
        self.stats.sd_steps += 1
        self.stats.sd_rows += len(seqs)
        self.stats.sd_emitted += sum(ni + 1 for ni in n[: len(seqs)])
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.batch_sizes.append(len(seqs))
        self.stats.chosen_k.append(k)
        self.policy.observe(n[: len(seqs)], k)

    # ------------------------------------------------------------------------------------------
    def time_step(self, batch: int, k: int, context: int, *, reps: int = 2) -> float:
        """Seconds of one real decode step (k = 0) or SD step with k drafts (greedy rows), for
        `batch` synthetic sequences with `context` tokens each (the cache's contents do not change
        the time). The first call of a shape warms up (it may compile) and is not timed. Used by
        the cost profile (respec/solver.py); statistics and the policy are left untouched."""
        times = self._synthetic_steps(batch, k, context, reps + 1)
        return sum(times[1:]) / max(reps, 1)

    def _synthetic_steps(self, batch: int, k: int, context: int, calls: int, *, use_filter: bool = False) -> list[float]:
        if k > self.k or (k and self.drafter is None):
            raise ValueError(f"cannot time k={k}: the engine drafts at most {self.k if self.drafter else 0}")
        if self.blocks.blocks_for(context + k + 1) * batch > self.blocks.num_free:
            raise ValueError(f"{batch} sequences of {context} tokens do not fit the KV cache")
        gen = torch.Generator().manual_seed(context)
        params = SamplingParams(max_new_tokens=1 << 30, temperature=1.0 if use_filter else 0.0,
                                top_p=0.9 if use_filter else 1.0, stop_on_eos=False)
        seqs = []
        for i in range(batch):
            ids = torch.randint(self.model.cfg.vocab_size, (context,), generator=gen).tolist()
            s = _Sequence(-1 - i, ids[:-1], params, out=ids[-1:])
            self.blocks.allocate(s.id, context - 1)
            s.drafted = context - 2
            if self.eagle:
                s.pending = (torch.zeros(1, self.drafter.fc.in_features, dtype=self.dtype, device=self.device),
                             torch.tensor(ids[-1:], device=self.device))
                s.pending_start = context - 1
            seqs.append(s)
        stats, policy = self.stats, self.policy
        self.stats, self.policy = EngineStats(), FixedK(k)
        times = []
        try:
            with torch.no_grad():
                for _ in range(calls):
                    for s in seqs:
                        self.blocks.append(s.id, k + 1)
                    t0 = time.perf_counter()
                    self._speculate(seqs, k) if k else self._decode(seqs)
                    times.append(time.perf_counter() - t0)
                    for s in seqs:  # back to the same state
                        self.blocks.truncate(s.id, self.blocks.lengths[s.id] - (context - 1))
                        del s.out[1:], s.logprobs[:]
                        s.finish_reason = None
                        s.drafted = context - 2
                        if self.eagle:
                            s.pending = (s.pending[0][:1], s.pending[1][:1])
                            s.pending_start = context - 1
        finally:
            for s in seqs:
                self.blocks.free(s.id)
            self.stats, self.policy = stats, policy
        return times

    def warmup(self, batch_sizes: list[int] | None = None, *, ks: list[int] | None = None, use_filter: bool = False,
               progress: bool = True) -> float:
        """Compile the steps ahead of time for every batch bucket up to the largest of `batch_sizes`
        (a rollout's batch shrinks through all of them) and every draft length in `ks` (default: 0,
        plus the engine's k with a fixed policy, or 0..k with any other policy); returns seconds."""
        if self.steps.eager:
            return 0.0
        from tqdm import tqdm

        t0 = time.perf_counter()
        largest = max(batch_sizes) if batch_sizes else self.max_batch
        buckets = buckets_up_to(batch_bucket(largest, self.max_batch))
        if ks is None:
            fixed = isinstance(self.policy, FixedK)
            ks = [0] if self.drafter is None else sorted({0, self.policy.k}) if fixed else list(range(self.k + 1))
        context = 4 * self.blocks.block_size
        for b, k in tqdm([(b, k) for b in buckets for k in ks], desc="compiling step shapes", disable=not progress):
            self._synthetic_steps(b, k, context, 1, use_filter=use_filter)
        return time.perf_counter() - t0
