"""SD steps run ahead of the host: draft -> verify -> the next step's inputs, all on the device, the
host reading the run's tokens once.

A step-by-step SD step (`RolloutEngine._speculate`) reads the verify's tokens back, records each
row's, hands back its rejected slots, updates the statistics and the solver, gives the drafter its
verified pairs, and only then builds the next step's inputs from the rows' text: the host and the
device take turns, and the host's turn grows with the rows (docs/benchmarks.md measures it). Where
the drafter's state between steps can live on the device (`Drafter.runs_ahead`: the EAGLE head, whose
next inputs are the verify's own outputs; a hybrid's head where no proposer offers a row anything at
the run's start, `Drafter.holds_back`; the history drafter on a GPU, whose rows' texts are written
on the device, respec/drafters/history_ahead.py) and the plan is one group of every row with one draft
length k (each row capped by its room), none of that is needed between two steps while the batch cannot change:

* the rows' state lives on the device: each row's newest token (the verify's token after its
  accepted drafts, `tokens[n]`), its position (moved by what the row emitted, n + 1), its room and
  draft cap, the verified pairs (computed inside the verify's compiled step: respec/speculative.py
  `next_inputs`), the drafter's state (`Drafter.advance`, from those pairs), the block tables
  (slots for (k + 1) tokens a step reserved before the run starts: a rejected draft's slot is
  simply written again by the next step, at the same position) and the sampling parameters;
* the only thing the host must learn before the next step is whether some row emitted EOS or came
  near its limit (below): one flag per step, computed by the verify too, read at once on a CPU and
  a step late on a GPU (respec/run_ahead.py `Behind`; the late step's tokens of a row that ended are
  dropped);
* when the run ends the host reads every step's tokens, log-probabilities and accepted counts once,
  the emitted tokens compacted on the device row by row, records them with one list extend a row,
  hands back each row's unused slots, and gives the statistics, the solver (step by step, as the
  step-by-step loop would have) and the drafter (`commit` of the last verify) what the steps did:
  each step's rows counted on the device by (drafts accepted, drafts the row could propose)
  (`Verified`), so that the host's work a step does not grow with the rows (from the step in which
  a row ended, if one did, row by row).

A run starts where every row has at least two tokens of room (its token or context limit), lasts
at most `max_steps` steps and stops where a row reaches its limit: each row drafts up to its room
less one, at most k (the plan's cap, moved on the device as the row emits), so a row with one token
of room drafts nothing and emits its last token in the run, as the step-by-step loop's step would
(a rollout's rows then end in its runs, not in steps taken one by one after them); the run also
stops before a step in which no row could draft (the step-by-step loop's plain step). Where the
flag is read a step late, the run stops where a row's room falls under k + 3 tokens, leaving the
step after the flag the k + 1 it takes and the rows one to draft with (`stops_under`). The draft length is the
plan's at the run's start: the solver sees the run's verifies when it ends (its estimate moves by a
few steps' worth).

Tokens are the step-by-step loop's: the same step functions, the same inputs, the same counter-based
noise (tests/test_sd_ahead.py); the block tables are as wide as the run's last step needs from its
first, so attention sums over more (masked) keys and a log-probability may round apart in its last
bits, as a batch bucket's would.
"""

from __future__ import annotations

import time

import torch

from respec.drafters import DraftBatch
from respec.host_copy import to_device
from respec.run_ahead import Behind
from respec.solver import Verified
from respec.speculative import ENDLESS, slack, verify_step


def runs_ahead(engine, groups, room: list[int], seqs) -> int:
    """The draft length of a plan that may run ahead (one group of every row of `seqs`, k > 0, not a
    long verify, each row capped by k and its `room` of drafts only, a drafter whose state stays on
    the device and that has no proposal now that the run would forgo); 0: it may not."""
    if engine.run_ahead < 2 or not engine.drafter.runs_ahead or len(groups) != 1:
        return 0
    g = groups[0]
    if g.long or not g.width or len(g.rows) != len(room) or any(c != min(g.width, r) for c, r in zip(g.caps, room)):
        return 0
    return 0 if engine.drafter.holds_back(seqs, g.caps) else g.width


def room(engine, s) -> int:
    """Tokens row `s` may still emit (its token and context limits)."""
    return min(s.params.max_new_tokens - len(s.out), engine.max_len - len(s.tokens))


def reads_late(device: torch.device) -> bool:
    """Whether the run's flag is read a step late (a real GPU; tests set `READ_LATE`)."""
    import respec.run_ahead as ahead

    return Behind(device).cuda if ahead.READ_LATE is None else ahead.READ_LATE


def steps_ahead(engine, seqs, k: int, max_steps: int) -> int:
    """How many SD steps of draft length `k` `seqs` may run before the batch can change, at most
    `max_steps`: as many as the pool has slots for without preempting (a row needs k + 1 a step, up to
    its room); none where a row's room is under `slack` (a row could not draft at the first step).
    0 or 1: run the step-by-step loop."""
    blocks, rooms = engine.blocks, [room(engine, s) for s in seqs]
    if min(rooms) < slack(k, reads_late(engine.device)):
        return 0
    n = max_steps
    while n > 1 and sum(blocks.extra_blocks(s.id, min(n * (k + 1), r)) for s, r in zip(seqs, rooms)) > blocks.num_free:
        n //= 2
    return n


def sd_run_ahead(engine, seqs, group, steps: int, policy, should_stop=None) -> None:
    """Up to `steps` SD steps of `seqs` with `group.width` drafts a row (see the module docstring):
    their tokens recorded, finish reasons set, slots handed back, statistics, solver and drafter
    told; the run stops early where a row emits EOS, a row's room falls under `stops_under` (on a
    CPU: a row reached its limit), no row could draft at the next step, or `should_stop()`."""
    t0 = time.perf_counter()
    k, dev, drafter, n = group.width, engine.device, engine.drafter, len(seqs)
    flag = Behind(dev)
    late = reads_late(dev)
    at_once = dev.type == "cpu" and not late
    drafter.catch_up(seqs, k)
    rooms = [room(engine, s) for s in seqs]
    reserved = [min(steps * (k + 1), r) for r in rooms]
    for s, r in zip(seqs, reserved):  # slots for every step's newest token and drafts
        engine.blocks.append(s.id, r)
    rows = engine.steps.batch_bucket(n, engine.max_batch)
    pad = [0] * (rows - n)
    sampling, use_filter = engine._row_params(seqs, rows)
    caps = [min(k, r - 1) for r in rooms]  # the plan's (every room is at least the slack)
    tokens, positions, tables, max_drafts, left = to_device(
        dev, [s.tokens[-1] for s in seqs] + pad, [len(s.tokens) - 1 for s in seqs] + pad,
        engine._table_rows(seqs, rows), caps + pad, rooms + [ENDLESS] * (rows - n))  # (tables as wide as the last step needs)
    batch = DraftBatch(seqs=seqs, k=k, sampling=sampling, use_filter=use_filter, coupled=engine.verify == "match",
                       tokens=tokens, positions=positions, block_tables=tables, max_drafts=max_drafts,
                       max_drafts_list=caps, left=left)
    state = drafter.ahead_state(batch)
    verify = engine.steps.get(verify_step, use_filter=use_filter, rule=engine.verify, late=late,
                              hidden_layers=engine.feature_layers, attention=engine.attention)
    watching = engine._watching(seqs, rows)
    out_tokens, out_logprobs, out_n, out_proposed = [], [], [], []
    capped = True  # every row proposed its cap at every step (a model drafter; history's rows may propose fewer)
    while len(out_tokens) < steps:
        drafts = drafter.draft_ahead(batch, state)
        # the verify, and in the same compiled step each row's next input token, position, room and
        # cap (a row near its limit drafts fewer), the verified pairs and the stop flag
        # (respec/speculative.py `next_inputs`; padding rows: room without end)
        tokens_d, logprobs_d, n_d, batch.tokens, batch.positions, batch.left, batch.max_drafts, ended, *pairs, taps = \
            verify(engine.runner, engine.cache.pools, batch.tokens, drafts.tokens, drafts.lengths, drafts.q,
                   drafts.point, batch.positions, batch.block_tables, *sampling, batch.left, engine.eos_ids, watching)
        out_tokens.append(tokens_d)
        out_logprobs.append(logprobs_d)
        out_n.append(n_d)
        out_proposed.append(drafts.lengths)
        capped = capped and drafts.lengths is batch.max_drafts
        state = drafter.advance(state, tokens_d, *pairs, taps)
        if should_stop is not None and should_stop():
            break
        if at_once:  # (a CPU's step is done when its call returns: its flag read in place)
            if len(out_tokens) < steps and ended.item():
                break
            continue
        if flag.pending is not None and flag.receive():  # the step before ended a row or filled one
            break
        if len(out_tokens) < steps:
            flag.send(ended)
    _record(engine, seqs, group, policy, torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1),
            torch.stack(out_n, 1), None if capped else torch.stack(out_proposed, 1), reserved, rooms, left, taps)
    stats = engine.stats
    stats.decode_s += time.perf_counter() - t0
    stats.sd_ahead_steps += len(out_tokens)


def _record(engine, seqs, group, policy, tokens, logprobs, accepted, proposed, reserved: list[int],
            rooms: list[int], rooms_d, taps) -> None:
    """The run's tokens (rows, ran, k+1), log-probs and accepted counts (rows, ran) into the rows, each
    row's up to and with its first EOS and at most its room (`rooms`, and on the device `rooms_d`);
    one host read: the emitted tokens compacted row by row on the device, and each step's rows
    counted there by (drafts accepted, drafts the row could propose: what the solver counts a
    verify by) and, where a row may propose fewer (`proposed` (rows, ran); None: every row its cap),
    by (drafts accepted, drafts proposed: what the statistics count); then the slots, the
    statistics, the solver and the drafter."""
    from respec.engine import read_back

    n, ran, k1 = len(seqs), tokens.shape[1], tokens.shape[2]
    k = k1 - 1
    acc = accepted[:n]
    kept = (torch.arange(k1, device=tokens.device).view(1, 1, -1) <= acc.unsqueeze(2)).view(n, -1)  # (n, ran*(k+1))
    if tokens.device.type == "cpu":  # the emitted tokens, rows one after another (a mask's size is known at once)
        flat_tokens, flat_logprobs = tokens[:n].reshape(n, -1)[kept], logprobs[:n].reshape(n, -1)[kept]
    else:  # each one's place in the rows' concatenation (the rest to one spare place past it): a scatter
        # of static size, where a boolean mask would make the host wait for its size
        counts, size = kept.sum(1), n * ran * k1
        place = torch.where(kept, (counts.cumsum(0) - counts).view(n, 1) + kept.cumsum(1) - 1, size)
        flat_tokens = tokens.new_zeros(size + 1).scatter_(0, place.view(-1), tokens[:n].reshape(-1))
        flat_logprobs = logprobs.new_zeros(size + 1).scatter_(0, place.view(-1), logprobs[:n].reshape(-1))
    # each step's rows by (accepted, cap): a row's cap at a step is its room less what it emitted in
    # the run's earlier steps, less one, at most k (as the verify moved it on the device)
    emitted = acc + 1
    caps = (rooms_d[:n].view(n, 1) - (emitted.cumsum(1) - emitted) - 1).clamp(0, k)
    by_pair = torch.nn.functional.one_hot(caps * k1 + acc, k1 * k1).sum(0)  # (ran, (k+1)^2)
    if proposed is None:
        flat_tokens, flat_logprobs, acc, by_pair = read_back(flat_tokens, flat_logprobs, acc, by_pair)
        by_proposed, proposed = by_pair, None
    else:
        by_proposed = torch.nn.functional.one_hot(proposed[:n] * k1 + acc, k1 * k1).sum(0)
        flat_tokens, flat_logprobs, acc, by_pair, by_proposed, proposed = read_back(
            flat_tokens, flat_logprobs, acc, by_pair, by_proposed, proposed[:n])
    counts = [sum(a) + len(a) for a in acc]  # (the device's `counts`, from what was read)
    eos, max_len, stats = engine.eos, engine.max_len, engine.stats
    ended = {}  # row -> (the step of its last token, tokens it emitted in that step), where it ended
    at = 0
    for i, (s, c) in enumerate(zip(seqs, counts)):
        run = flat_tokens[at: at + c]
        p = s.params
        # up to and with its first EOS; and never past its limit (the run stops before a row could
        # reach it: a row cut here only where the device's flag was not read, as on fake CUDA)
        stop = p.stop_on_eos and eos and not eos.isdisjoint(run)
        cut = next(t + 1 for t, tok in enumerate(run) if tok in eos) if stop else c
        cut = min(cut, rooms[i])
        s.extend(run[:cut], flat_logprobs[at: at + cut], verified=True)
        if cut < c:
            ended[i] = _step_of(acc[i], cut)
        if stop and run[cut - 1] in eos:
            s.finish_reason = "stop"
        elif len(s.out) >= p.max_new_tokens or len(s.tokens) >= max_len:
            s.finish_reason = "length"
        else:  # the slots of rejected drafts and of steps not run (a finished row frees all of its own)
            engine.blocks.truncate(s.id, reserved[i] - c)
        at += c
    # what each step did, as the step-by-step loop counts it: up to the first step in which a row
    # ended, every row in it, from the device's counts; from there, row by row (rows that ended at
    # an earlier step are gone, as from the step-by-step loop's batch)
    counted = 0 if any(group.offered) else min((step for step, _ in ended.values()), default=ran)
    kind = engine.drafter.ahead_kind
    if counted:
        total = Verified.from_counts([sum(c) for c in zip(*by_proposed[:counted])], k1)
        stats.count_verified(kind, total)
        stats.sd_emitted += total.accepted + total.rows
        stats.generated_tokens += total.accepted + total.rows
        stats.sd_steps += counted
        stats.sd_rows += total.rows
        stats.batch_sizes += [n] * counted
        stats.chosen_k += [k] * counted
        for step in range(counted):
            policy.observe_verified(Verified.from_counts(by_pair[step], k1), k)
    for step in range(counted, ran):
        m = [a[step] for a in acc]
        caps = [max(0, min(k, r - sum(a[:step]) - step - 1)) for r, a in zip(rooms, acc)]
        rows = [i for i in range(n) if i not in ended or ended[i][0] >= step]
        m, caps = [m[i] for i in rows], [caps[i] for i in rows]
        lengths = caps if proposed is None else [proposed[i][step] for i in rows]
        emitted = [ended[i][1] if i in ended and ended[i][0] == step else a + 1 for i, a in zip(rows, m)]
        stats.sd_emitted += sum(emitted)
        stats.generated_tokens += sum(emitted)
        stats.count_kinds([kind] * len(rows), lengths, list(map(min, m, emitted)), emitted)
        stats.count_acceptance(m, lengths)
        stats.sd_steps += 1
        stats.sd_rows += len(rows)
        stats.batch_sizes.append(len(rows))
        stats.chosen_k.append(k)
        policy.observe_group(_rows_of(group, rows, caps), m, lengths)
    engine.drafter.ran_ahead(seqs)
    running = [i for i, s in enumerate(seqs) if not s.finish_reason]
    last = [a[-1] for a in acc]
    if len(running) == n:  # the drafter's pairs of the last verify (its earlier ones are in its state's past)
        engine.drafter.commit(seqs, last, tokens[:n, ran - 1], None if taps is None else taps[:n])
    elif running:
        index = to_device(tokens.device, running)[0]
        engine.drafter.commit([seqs[i] for i in running], [last[i] for i in running],
                              tokens[:, ran - 1].index_select(0, index), None if taps is None else taps.index_select(0, index))


def _step_of(accepted: list[int], cut: int) -> tuple[int, int]:
    """The step in which a row's `cut`-th emitted token was, and how many it emitted in that step."""
    for step, a in enumerate(accepted):
        if cut <= a + 1:
            return step, cut
        cut -= a + 1
    raise AssertionError("a row's EOS past what it emitted")


def _rows_of(group, rows: list[int], caps: list[int]):
    """`group` at a step of the run: only `rows` (those still running), numbered as that step's batch
    (the step-by-step loop's batch there holds only them), with that step's `caps`."""
    from respec.solver import Group

    return Group(list(range(len(rows))), group.width, caps, group.long, [group.offered[i] for i in rows])
