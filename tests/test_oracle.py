"""The oracle drafter (respec/drafters/oracle.py): the target's own continuation with each token
kept with probability a. SD with it emits plain decoding's tokens at every a; at a = 1 every draft
is accepted, at a = 0 only chance agreements (1 / V each), and in between the first draft's
acceptance is a within binomial noise (the check with power: a = 0.5 is told from 0.3 and 0.7)."""

from __future__ import annotations

import math

import pytest

from respec.drafters.oracle import OracleDrafter
from respec.engine import RolloutEngine, SamplingParams
from tests.prompts import PROMPTS

NEW = 48


def plain_then_oracle(model, accept: float, k: int = 3):
    params = [SamplingParams(max_new_tokens=NEW, seed=i, temperature=0.9, stop_on_eos=False) for i in range(len(PROMPTS))]
    plain = RolloutEngine(model, kv_cache_bytes=32 << 20, eager=True, max_batch=8).generate(PROMPTS, params)
    truth = [c.token_ids for c in plain]
    engine = RolloutEngine(model, kv_cache_bytes=32 << 20, eager=True, max_batch=8, drafter=OracleDrafter(accept, seed=1),
                           num_draft_tokens=k)
    out = engine.generate(PROMPTS, params, replays=truth)
    return truth, [c.token_ids for c in out], engine.stats


@pytest.mark.parametrize("accept", [0.0, 0.5, 1.0])
def test_sd_with_the_oracle_is_plain_decoding(tiny, accept):
    truth, got, stats = plain_then_oracle(tiny, accept)
    assert got == truth
    oracle = stats.sd_kinds["oracle"]
    if accept == 1.0:  # every draft accepted: k + 1 tokens a verify, but where a row's end cuts it
        assert oracle["accepted"] == oracle["proposed"] > 0
        assert stats.sd_rows <= len(PROMPTS) * math.ceil((NEW - 1) / 4)  # (one token comes from the prefill)
    elif accept == 0.0:  # only chance agreements with a uniform token: expected proposed / V
        chance = oracle["proposed"] / tiny.cfg.vocab_size
        assert oracle["proposed"] > 100 and oracle["accepted"] <= chance + 3 * math.sqrt(chance) + 1


def test_the_first_draft_is_accepted_with_probability_a(tiny):
    _, _, stats = plain_then_oracle(tiny, 0.5, k=1)
    rows, accepted = stats.sd_rows, stats.sd_accepted_at[0]
    sigma = math.sqrt(rows * 0.25)
    assert rows > 150
    assert abs(accepted - 0.5 * rows) < 3.5 * sigma
    for other in (0.3, 0.7):  # power: the same count is far from what another a gives
        assert abs(accepted - other * rows) > 3.5 * math.sqrt(rows * other * (1 - other))


def test_the_oracle_refuses_an_acceptance_outside_0_1():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        OracleDrafter(1.5)


def test_the_oracle_sweep_quick(tmp_path, monkeypatch):
    """`python -m respec.lab.oracle_sweep --quick`: every (batch, a) row has plain, every fixed k and
    the solver, SD's tokens are plain decoding's, and more acceptance gives more tokens per verify."""
    import json

    from respec.lab import oracle_sweep

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "sweep.json"
    assert oracle_sweep.main(["--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["batch"], r["accept"]) for r in rows] == [(1, 0.5), (1, 0.9), (4, 0.5), (4, 0.9)]
    assert all(r["same_tokens"] and set(r["fixed_tok_s"]) == {"0", "1", "3"} and r["solver_k"] for r in rows)
    for low, high in (rows[0:2], rows[2:4]):
        assert high["accept_len"]["3"] > low["accept_len"]["3"] + 0.5  # sum a^i: 1.875 against 3.44 at k = 3
    assert oracle_sweep.main(["--quick", "--json", str(path)]) == 2  # never overwritten


@pytest.mark.parametrize("kind", ["oracle", "replay"])
def test_the_cost_profile_times_a_continuation_drafters_proposals(tiny, kind):
    """The solver's profile (respec/profiling.py) gives a model-free drafter that drafts from the
    request's continuation one, so an SD step it times verifies k drafts (it once timed plain steps:
    no row proposed)."""
    from respec.drafters.replay import ReplayDrafter
    from respec.profiling import synthetic_steps

    drafter = OracleDrafter(0.5) if kind == "oracle" else ReplayDrafter()
    engine = RolloutEngine(tiny, kv_cache_bytes=32 << 20, eager=True, max_batch=4, drafter=drafter, num_draft_tokens=3)
    proposed, draft = [], drafter.draft

    def recording(batch):
        drafts = draft(batch)
        proposed.append(drafts.lengths_list)
        return drafts

    drafter.draft = recording
    synthetic_steps(engine, 2, 3, 32, 1)
    assert proposed == [[3, 3]]

