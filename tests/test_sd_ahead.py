"""SD steps run ahead of the host (respec/sd_ahead.py) against the step-by-step loop: the same tokens,
log-probabilities, finish reasons, drafts, statistics and solver observations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.decoder import PRESETS
from models.loading import random_model
from respec.engine import RolloutEngine, SamplingParams
from respec.solver import FixedK
from tests.test_eagle import head_for

# a vocabulary of 16: an untrained head's drafts agree with the target often enough that rows accept
# several drafts in one verify (positions move by more than one), and EOS (token 15) ends rows early
VOCAB, EOS = 16, 15
PROMPTS = [[(3 * i + j) % (VOCAB - 1) for j in range(3 + 2 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def target():
    model = random_model(dataclasses.replace(PRESETS["tiny"], vocab_size=VOCAB, num_layers=2,
                                             max_position_embeddings=512), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # sharper: the head agrees more often
    return model


class Recorded(FixedK):
    """k = 3 at every step, each verify's outcome as the solver is told it."""

    def __init__(self):
        super().__init__(3)
        self.seen = []

    def observe_verified(self, verified, k):
        self.seen.append((k, verified))


def run(target, params, *, run_ahead: int, verify: str, pool_blocks: int | None = None):
    """A rollout of PROMPTS with an untrained EAGLE head; returns (completions, stats, the solver's
    observations (each verify's rows counted, `Verified`), every draft proposed, the runs' planned
    and run steps, the least cap of each step of a run, and how many steps of runs were counted row
    by row (from the step in which a row ended))."""
    import respec.sd_ahead as sd_ahead

    engine = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=head_for(target, VOCAB, seed=1),
                           num_draft_tokens=3, policy=Recorded(), run_ahead=run_ahead, eos_token_ids=[EOS], verify=verify)
    if pool_blocks is not None:  # blocks for fewer rows than run at once
        engine = RolloutEngine(target, kv_cache_bytes=pool_blocks * engine.cache.bytes_per_block, block_size=4,
                               eager=True, drafter=head_for(target, VOCAB, seed=1), num_draft_tokens=3,
                               policy=Recorded(), run_ahead=run_ahead, eos_token_ids=[EOS], verify=verify)
    drafts, draft_ahead = [], engine.drafter.draft_ahead

    def recorded(batch, state):
        out = draft_ahead(batch, state)
        drafts.append(out.tokens[: len(batch.seqs)].tolist())
        return out
    engine.drafter.draft_ahead = recorded
    runs, real, rows_of = [], sd_ahead.sd_run_ahead, sd_ahead._rows_of

    def counted(e, seqs, group, steps, policy, stop=None):
        before, seen = e.stats.sd_ahead_steps, len(policy.seen)
        real(e, seqs, group, steps, policy, stop)
        runs.append((steps, e.stats.sd_ahead_steps - before))
        # each step's least cap (a row near its limit drafted fewer than k)
        capped.extend(min(m for _, m in v.pairs) for _, v in policy.seen[seen:])

    def by_row(group, rows, caps):  # (a step of a run counted row by row: from the step a row ended in)
        runs.append(("by row", len(rows)))
        return rows_of(group, rows, caps)
    capped = []
    sd_ahead.sd_run_ahead, sd_ahead._rows_of = counted, by_row
    try:
        out = engine.generate(PROMPTS, params)
    finally:
        sd_ahead.sd_run_ahead, sd_ahead._rows_of = real, rows_of
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1  # every slot handed back
    return out, engine.stats, engine.policy.seen, drafts, [r for r in runs if r[0] != "by row"], capped, \
        sum(tag == "by row" for tag, _ in runs)


@pytest.mark.parametrize("verify, late, temperatures, pools", [
    ("match", False, (0.0, 1.0), (None, 24)), ("match", True, (1.0,), (None, 24)),
    ("rejection", False, (1.0,), (None,)), ("rejection", True, (1.0,), (None,))])
def test_sd_run_ahead_gives_the_step_by_step_rollout(target, monkeypatch, verify, late, temperatures, pools):
    """SD steps of an EAGLE head run ahead of the host (rows' state on the device, the tokens read once
    a run, the EOS flag read at once or, as on a GPU, a step late with the extra step dropped) give
    what the step-by-step loop gives: tokens, finish reasons, log-probabilities (up to a wider block
    table's rounding), the drafts themselves (under rejection sampling the tokens depend on them),
    the statistics and each verify's outcome as the solver is told it; greedy and sampled (top-p),
    rows ending at EOS inside runs and at their token limits, a row that ignores EOS, and a pool
    small enough that runs shorten and rows are preempted. Power: most SD steps ran ahead, runs
    stopped at an EOS, rows near their token limits drafted fewer than k inside runs, rows accepted
    drafts (positions moved by more than one), and late reads ran a step past the EOS."""
    import respec.run_ahead as ahead

    monkeypatch.setattr(ahead, "READ_LATE", late)
    for temperature in temperatures:
        params = [SamplingParams(max_new_tokens=30 + 9 * i, temperature=temperature, top_p=0.9 if temperature else 1.0,
                                 seed=i, stop_on_eos=i != 0) for i in range(len(PROMPTS))]
        for pool in pools:
            want, want_stats, want_seen, want_drafts, _, _, _ = run(target, params, run_ahead=0, verify=verify,
                                                                    pool_blocks=pool)
            got, stats, seen, drafts, runs, capped, by_row = run(target, params, run_ahead=32, verify=verify,
                                                                 pool_blocks=pool)
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
            assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
            for g, w in zip(got, want):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
                assert g.verified == w.verified
            assert seen == want_seen
            for field in ("sd_steps", "sd_rows", "sd_emitted", "generated_tokens", "sd_accepted_at", "sd_reached_at",
                          "sd_kinds", "batch_sizes", "chosen_k", "preemptions"):
                assert getattr(stats, field) == getattr(want_stats, field), field
            assert want_stats.sd_ahead_steps == 0
            assert stats.sd_ahead_steps > (stats.sd_steps / 2 if pool is None else 0)  # (a small pool: short runs)
            # the drafts, step by step (a late read's step past an EOS drafts for the ended row too)
            assert len(drafts) == len(want_drafts)
            if late and temperature:  # (a small pool's runs of two steps end before a late read matters)
                assert any(len(d) > len(w) for d, w in zip(drafts, want_drafts)) or pool is not None
                same = [(d, w) for d, w in zip(drafts, want_drafts) if len(d) == len(w)]
                assert [d for d, _ in same] == [w for _, w in same] and len(same) > len(drafts) / 2
            else:
                assert drafts == want_drafts
            if pool is not None:
                assert stats.preemptions > 0
            elif not late:  # rows near their limits drafted fewer than k inside runs (to their last token)
                assert capped and min(capped) < 3
            if temperature:
                assert stats.accept_len > 1.3  # rows kept drafts: positions moved by more than one
                assert any(ran < steps for steps, ran in runs)  # a run ended at an EOS
                # a row read as ended a step late: that run's last two steps counted row by row, the
                # steps before on the device
                assert by_row > 0 or not late or pool is not None  # (a small pool: as above)
                assert sum(o.finish_reason == "stop" for o in got) >= 2 and got[0].finish_reason == "length"


@pytest.mark.parametrize("late", [False, True])
def test_a_hybrid_runs_its_heads_steps_ahead_where_history_offers_nothing(target, monkeypatch, late):
    """The EAGLE head and the history drafter side by side with `ahead` on (a GPU's default): a step
    in which history offers no row anything runs ahead with the head drafting every row (its rows
    counted as the head's), a step with an offer is taken step by step with history's drafts for
    those rows; the tokens and log-probabilities are plain decoding's (the match rule), greedy and
    sampled, over two rollouts of the same prompts (the second matching the first's text), the flag
    read at once and a step late. Power: steps ran ahead and steps were held back, history's rows
    were verified and accepted drafts, the head's rows accepted drafts, and every verified row is
    counted under one kind."""
    import respec.run_ahead as ahead
    from respec.drafters.history import HistoryDrafter
    from respec.drafters.hybrid import HybridDrafter
    from respec.drafters.wrap import as_drafter

    monkeypatch.setattr(ahead, "READ_LATE", late)
    prompts = [p for p in PROMPTS for _ in range(2)]  # (each prompt's two rows: siblings' text to match)
    plain = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, eos_token_ids=[EOS])
    for temperature in (0.0, 1.0):
        params = [SamplingParams(max_new_tokens=24 + 4 * i, temperature=temperature, seed=i)
                  for i in range(len(prompts))]
        drafter = HybridDrafter(as_drafter(head_for(target, VOCAB, seed=1)), HistoryDrafter(), min_match=2,
                                ahead=True)
        held, holds_back = [], drafter.holds_back

        def recorded(seqs, caps):
            held.append(holds_back(seqs, caps))
            return held[-1]
        drafter.holds_back = recorded
        engine = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                               num_draft_tokens=3, policy=FixedK(3), eos_token_ids=[EOS], verify="match")
        ran_ahead, kinds, sd_rows = 0, {}, 0
        for _ in range(2):
            want, got = plain.generate(prompts, params), engine.generate(prompts, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
            assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
            for g, w in zip(got, want):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
            st = got.stats
            ran_ahead += st.sd_ahead_steps
            sd_rows += st.sd_rows
            for kind, c in st.sd_kinds.items():
                for field, v in c.items():
                    kinds.setdefault(kind, {}).setdefault(field, 0)
                    kinds[kind][field] += v
        assert ran_ahead > 0 and True in held and False in held
        assert kinds["history"]["rows"] > 0 and kinds["history"]["accepted"] > 0
        assert kinds["model"]["accepted"] > 0
        assert set(kinds) <= {"model", "history", "plain"}  # (a run's rows are the head's)
        assert sum(c["rows"] for c in kinds.values()) == sd_rows


class DeviceHistory:
    """The history drafter matching on the device at every step (`history_ahead`), also step by step:
    a run ahead and the step-by-step loop then propose the same drafts, so the two rollouts compare
    draft for draft; every proposal recorded, each step-by-step step's lengths, and how many
    documents each layout found on the device whole, sending none of their tokens (`anew`: every
    step laid out in a new store, from nothing)."""

    def __new__(cls, steps_lengths: list, drafts: list, reused: list, *, anew: bool):
        from respec.drafters.history import HistoryDrafter

        class Drafter(HistoryDrafter):
            def ahead_state(self, batch):
                state = super().ahead_state(batch)
                reused.append(self.store.kept)
                return state

            def draft(self, batch):
                if anew:  # (laid out from nothing each step: what a run's kept documents must equal)
                    self.store = None
                out = self.draft_ahead(batch, self.ahead_state(batch))
                out.lengths_list = out.lengths[: len(batch.seqs)].tolist()
                steps_lengths.append(out.lengths_list)
                return out

            def draft_ahead(self, batch, state):
                out = super().draft_ahead(batch, state)
                n, caps = len(batch.seqs), (state.left - 1).clamp(0, batch.k)  # (each row's cap: its room)
                drafts.append((out.tokens[:n].tolist(), out.lengths[:n].tolist(), caps[:n].tolist()))
                return out
        return Drafter(ahead=True, min_match=1)


@pytest.mark.parametrize("verify, late", [("match", False), ("match", True), ("rejection", False), ("rejection", True)])
def test_history_runs_ahead_as_its_steps_one_by_one(target, monkeypatch, verify, late):
    """The history drafter's suffix match on the device (respec/drafters/history_ahead.py): SD steps run
    ahead of the host (the rows' text written on the device after each verify) give what the same
    matcher gives step by step: tokens, finish reasons, log-probabilities, the drafts and how many
    each row proposed (rows with no match, or a match near a text's end, propose fewer than their
    cap), the statistics (counted by what rows proposed) and each verify's outcome as the solver is
    told it (counted against the caps); greedy and sampled, over two rollouts of each prompt's two
    rows (siblings' and the earlier rollout's text to match), the flag read at once and a step late.
    Power: a quarter of the SD steps or more ran ahead, rows accepted drafts, and some row proposed
    fewer than its cap."""
    import respec.run_ahead as ahead

    monkeypatch.setattr(ahead, "READ_LATE", late)
    # every token in each prompt before its last: a row always has a match (min_match 1), so no step
    # by itself finds nothing and decodes plainly where a run's step verifies (no drafts: one token)
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(VOCAB, generator=gen).tolist() for _ in range(len(PROMPTS))]
    prompts = [p + p[: 2 + i] for i, p in enumerate(perms) for _ in range(2)]
    for temperature in (0.0, 1.0) if verify == "match" else (1.0,):
        params = [SamplingParams(max_new_tokens=24 + 4 * i, temperature=temperature, seed=i, stop_on_eos=i != 0)
                  for i in range(len(prompts))]
        results = []
        for run_ahead in (0, 32):
            lengths, drafts, reused = [], [], []
            drafter = DeviceHistory(lengths, drafts, reused, anew=not run_ahead)
            engine = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                                   num_draft_tokens=3, policy=Recorded(), run_ahead=run_ahead, eos_token_ids=[EOS],
                                   verify=verify)
            outs = [engine.generate(prompts, params) for _ in range(2)]
            assert engine.blocks.num_free == engine.blocks.num_blocks - 1
            results.append((outs, engine.policy.seen, drafts, lengths))
        (want, want_seen, want_drafts, step_lengths), (got, seen, drafts, _) = results
        assert all(any(ln) for ln in step_lengths)  # (every step-by-step step verified: a run's steps all do)
        ran_ahead = sd_steps = 0
        for g_out, w_out in zip(got, want):
            assert [o.token_ids for o in g_out] == [o.token_ids for o in w_out]
            assert [o.finish_reason for o in g_out] == [o.finish_reason for o in w_out]
            for g, w in zip(g_out, w_out):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
            for field in ("sd_steps", "sd_rows", "sd_emitted", "generated_tokens", "sd_accepted_at", "sd_reached_at",
                          "sd_kinds", "batch_sizes", "chosen_k"):
                assert getattr(g_out.stats, field) == getattr(w_out.stats, field), field
            assert w_out.stats.sd_ahead_steps == 0
            ran_ahead += g_out.stats.sd_ahead_steps
            sd_steps += g_out.stats.sd_steps
        assert seen == want_seen
        assert sum(reused) > 0  # runs found documents on the device whole from the runs before
        print(f"T={temperature}: {ran_ahead} of {sd_steps} SD steps ran ahead")
        assert ran_ahead > sd_steps / 4  # (greedy rows end together: late reads stop runs k + 1 tokens early)
        if late:  # a late read's step past an EOS drafts for the ended row too
            same = [d for d, w in zip(drafts, want_drafts) if len(d[0]) == len(w[0])]
            assert same == [w for d, w in zip(drafts, want_drafts) if len(d[0]) == len(w[0])]
            assert len(same) > len(drafts) / 2
        else:
            assert drafts == want_drafts
        assert any(n < c for _, ln, caps in drafts for n, c in zip(ln, caps))  # rows proposed fewer than their cap
        kinds = sum((o.stats.sd_kinds["history"]["accepted"] for o in want), 0)
        assert kinds > 0


def test_history_on_the_device_leaves_its_host_index_to_be_written_when_read(target):
    """Where the history drafter and its engine run ahead, every SD step matches on the device, the
    steps taken one by one between runs too (respec/drafters/history.py `on_device`): the host index
    only notes the rows' text, its maps never written while they are not read; with the engine
    turned to step by step (`run_ahead` 0) the host proposes again, from maps written then, and a
    saved state carries them. Greedy tokens equal plain decoding's throughout, and rows accept
    drafts both ways. Power: steps were taken one by one beside the runs, and the maps once
    written hold every document."""
    from respec.drafters.history import HistoryDrafter

    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(VOCAB - 1, generator=gen).tolist() for _ in range(3)]
    prompts = [p + p[:4] for p in perms for _ in range(2)]
    # (two rows of each prompt, one token of limit apart: where a run stops at the first one's limit,
    # the second has one token of room, too little to start a run, and steps one by one)
    params = [SamplingParams(max_new_tokens=20 + 3 * (i // 2) + i % 2, temperature=0.0) for i in range(len(prompts))]
    plain = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, eos_token_ids=[EOS])
    want = [o.token_ids for o in plain.generate(prompts, params)]
    drafter = HistoryDrafter(ahead=True, min_match=1)
    engine = RolloutEngine(target, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                           num_draft_tokens=3, policy=FixedK(3), eos_token_ids=[EOS])
    assert drafter.on_device
    by_device = [engine.generate(prompts, params) for _ in range(2)]
    for out in by_device:
        assert [o.token_ids for o in out] == want
    st = by_device[1].stats
    assert st.sd_ahead_steps > 0 and st.sd_steps > st.sd_ahead_steps  # (runs, and steps one by one)
    assert sum(st.sd_accepted_at) > 0
    assert drafter.behind and not any(index.places or index.full for index in drafter.index.values())
    engine.run_ahead = 0  # the host's matching again, on the same documents
    assert not drafter.on_device
    noted = {key: list(index.docs) for key, index in drafter.index.items()}
    by_host = engine.generate(prompts, params)
    assert [o.token_ids for o in by_host] == want and by_host.stats.sd_ahead_steps == 0
    assert sum(by_host.stats.sd_accepted_at) > 0 and not drafter.behind
    for key, docs in noted.items():  # (every noted document indexed whole when the host first proposed)
        index = drafter.index[key]
        assert all(index.indexed[d] == len(index.docs[d]) for d in docs)
    engine.run_ahead = 32
    engine.generate(prompts, params)
    saved = drafter.state_dict()  # (the maps written for it)
    assert not drafter.behind
    loaded = HistoryDrafter(min_match=1)
    loaded.load_state_dict(saved)
    for key, index in drafter.index.items():
        assert loaded.index[key].places == index.places and loaded.index[key].full == index.full
