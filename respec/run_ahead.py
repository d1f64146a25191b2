"""Plain decoding run ahead of the host: several steps with the rows' state on the device, the
host reading their tokens one step behind.

A decoding step of a small model on a GPU is microseconds of device work. The step-by-step loop
(`RolloutEngine._decode`) builds each step's inputs on the host from the rows' text, runs the step,
then waits for its tokens (`.tolist()`) to record them, check for EOS and build the next inputs:
the host and the device take turns, and the host's turn grows with the rows. Here, while the batch
cannot change, none of that is needed between two steps:

* the rows' state lives on the device: their newest tokens, positions, block tables (slots for
  every step of the run reserved before it starts) and sampling parameters; a step's sampled
  tokens are its next step's input tokens where they are, positions move by one, and the tokens
  and log-probabilities stay on the device until the run ends;
* the only thing the host must learn before it launches the next step is whether some row has
  sampled EOS (the batch would change): one flag per step, copied to a pinned host buffer without
  blocking and read one step later, while the device runs the next step (`Behind`). A row that
  ended is therefore noticed a step late: the run stops there and the row's tokens after its EOS
  are dropped (its extra slot goes with its blocks). On a CPU, where host and device are the same
  cores, the flag is read at once (a step late would be a wasted step);
* the host reads the run's tokens and log-probabilities once, when it ends (the first EOS of each
  row found on the device), and records every row's with list extends, not a Python call per token.

A run lasts at most `max_steps` steps and never past the step at which a row reaches its token or
context limit (known on the host in advance), so the batch changes only at its end: the engine's
loop then releases finished rows, admits waiting ones and asks the policy again. Runs happen only
where the policy plans a plain step for every row (no drafter, or the solver turned SD off: the
large batches, where the host's share is largest). Tokens are the step-by-step loop's: the same
step function, the same inputs, the same counter-based noise (tests/test_engine.py); the block
tables are as wide as the run's last step needs from its first, so attention sums over more
(masked) keys and a log-probability may round apart in its last bits, as a batch bucket's would.
"""

from __future__ import annotations

import time

import torch

from respec.steps import decode_step

# Read the EOS flag one step behind: None on a real GPU only (a CPU step is done when its call
# returns, and a flag read late would cost a wasted step); tests set it to check the late path.
READ_LATE: bool | None = None


class Behind:
    """A small device tensor read by the host one step later, without blocking the device: copied
    into pinned memory behind the step that computed it, with an event that says when it landed.
    On a CPU (and on fake CUDA, which has no events) the value is read when asked."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.pending = None

    def send(self, t: torch.Tensor) -> None:
        """Start the copy of `t` to the host (the step that computes it may still be running)."""
        if self.device.type != "cuda":
            self.pending = (t, None)
            return
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        buf.copy_(t, non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (buf, event)

    def receive(self) -> bool:
        """The value sent last, as a bool (waiting for its copy only if it has not landed yet)."""
        buf, event = self.pending
        if event is not None:
            event.synchronize()
        self.pending = None
        return bool(buf.item())


def steps_ahead(engine, seqs, max_steps: int) -> int:
    """How many plain steps `seqs` may run before the batch can change, at most `max_steps`: up to
    the first row's token or context limit, and as many as the pool has slots for without
    preempting. 0 or 1: run the step-by-step loop (which preempts where it must)."""
    blocks = engine.blocks
    room = min(min(s.params.max_new_tokens - len(s.out), engine.max_len - len(s.tokens)) for s in seqs)
    n = min(max_steps, room)
    while n > 1 and sum(blocks.extra_blocks(s.id, n) for s in seqs) > blocks.num_free:
        n //= 2
    return n


def run_ahead(engine, seqs, steps: int, should_stop=None) -> None:
    """Up to `steps` plain decoding steps of `seqs` (see the module docstring): their tokens recorded,
    their finish reasons set; the run stops early where a row samples EOS or `should_stop()`."""
    t0 = time.perf_counter()
    dev, n = engine.device, len(seqs)
    rows = engine.steps.batch_bucket(n, engine.max_batch)
    pad = [0] * (rows - n)
    for s in seqs:  # slots for every step's input token
        engine.blocks.append(s.id, steps)
    # the rows' state on the device, for the whole run (padding rows: position 0, null blocks)
    tokens = torch.tensor([s.tokens[-1] for s in seqs] + pad, dtype=torch.int64).to(dev, non_blocking=True)
    positions = torch.tensor([len(s.tokens) - 1 for s in seqs] + pad, dtype=torch.int64).to(dev, non_blocking=True)
    tables = engine._tables(seqs, rows)  # (rows, W), wide enough for the last step
    sampling, use_filter = engine._row_params(seqs, rows)
    watching = engine._watching(seqs, rows)
    watch = any(s.params.stop_on_eos for s in seqs) and bool(engine.eos)  # (else no flag to read)
    step = engine.steps.get(decode_step, use_filter=use_filter, hidden_layers=engine.feature_layers,
                            attention=engine.attention)
    flag = Behind(dev)
    late = flag.cuda if READ_LATE is None else READ_LATE
    out_tokens, out_logprobs = [], []  # per step (rows,), stacked when the run ends
    while len(out_tokens) < steps:
        tokens, logprobs, ended, positions, *taps = step(engine.runner, engine.cache.pools, tokens, positions,
                                                         tables, engine.eos_ids, watching, *sampling)
        engine.drafter.on_decode(seqs, taps[0] if taps else None, tokens)
        out_tokens.append(tokens)  # (and the next step's input tokens, where they are)
        out_logprobs.append(logprobs)
        if should_stop is not None and should_stop():
            break
        if watch and late and flag.pending is not None and flag.receive():  # a row ended the step before
            break
        if watch and len(out_tokens) < steps:
            flag.send(ended)
            if not late and flag.receive():
                break
    ran = len(out_tokens)
    _record(engine, seqs, torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1), watch)
    for s in seqs:  # hand back the slots of the steps not run (a finished row frees all of its own)
        if not s.finish_reason and ran < steps:
            engine.blocks.truncate(s.id, steps - ran)
    stats = engine.stats
    stats.decode_s += time.perf_counter() - t0
    stats.decode_steps += ran
    stats.ahead_steps += ran
    stats.batch_sizes += [n] * ran
    stats.chosen_k += [0] * ran


def _record(engine, seqs, out_tokens, out_logprobs, watch: bool) -> None:
    """The run's tokens (rows, steps) into the rows, each row's up to and with its first EOS (one
    host read)."""
    from respec.engine import read_back

    ran = out_tokens.shape[1]
    toks, lps = out_tokens[: len(seqs)], out_logprobs[: len(seqs)]
    if watch:  # each row's first EOS, found on the device
        hit = (toks.unsqueeze(2) == engine.eos_ids).any(2)  # (n, steps)
        toks, lps, stopped, first = read_back(toks, lps, hit.any(1), hit.int().argmax(1))
    else:
        toks, lps = read_back(toks, lps)
        stopped = [False] * len(seqs)
    for s, t, lp, stop, at in zip(seqs, toks, lps, stopped, first if watch else stopped):
        stop = stop and s.params.stop_on_eos
        cut = at + 1 if stop else ran  # up to and with the EOS
        s.extend(t[:cut], lp[:cut])
        engine.stats.generated_tokens += cut
        if stop:
            s.finish_reason = "stop"
        elif len(s.out) >= s.params.max_new_tokens or len(s.tokens) >= engine.max_len:
            s.finish_reason = "length"
