"""Replay: last epoch's completion as a draft, the seeds that make it pay, the finite training sets
that bring prompts back. SD with a replay (alone or beside a model and history) emits exactly plain
decoding's tokens after a policy change; seeds per prompt are reused, staggered, reseeded and never
shared by two completions of one step; the replay store is bounded and survives a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from models.drafter import truncated_drafter
from respec.drafters.wrap import as_drafter
from respec.drafters.history import HistoryDrafter
from respec.drafters.hybrid import HybridDrafter
from respec.drafters.replay import ReplayDrafter, ReplayStore
from respec.engine import RolloutEngine, SamplingParams
from respec.rollout_seeds import RolloutSeeds, request_seed
from respec.solver import FixedK, long_lengths
from respec.data import DataConfig
from respec.tasks import make_task
from tests.test_eagle import head_for

PROMPTS = [[1, 2, 3, 4, 5], [7] * 12, [9, 8, 7], [40, 41], [5, 5, 6], [100, 200, 300, 400]]


def moved(model, scale: float, seed: int = 0):
    """The model after a small policy update: its output head nudged by noise."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = new.lm_head.weight
        w.add_(torch.randn(w.shape, generator=gen) * scale * w.std())
    return new


def params_for(n: int, length: int) -> list[SamplingParams]:
    """Plain sampling, top-k, top-p and greedy rows side by side."""
    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.8),
             dict(temperature=0.0)]
    return [SamplingParams(max_new_tokens=length, seed=50 + i, stop_on_eos=False, **kinds[i % 4]) for i in range(n)]


def drafter(kind: str, target):
    models = {"layers": lambda: as_drafter(truncated_drafter(target, 1)),
              "eagle": lambda: as_drafter(head_for(target, 300))}
    parts = kind.split("+")
    model = models[parts[0]]() if parts[0] in models else None
    free = [ReplayDrafter() if p == "replay" else HistoryDrafter(min_match=1) for p in parts if p not in models]
    return HybridDrafter(model, *free, min_match=2) if model is not None or len(free) > 1 else free[0]


@pytest.mark.parametrize("kind,together", [("replay", False), ("replay+history", False),
                                           ("eagle+replay+history", False), ("layers+replay", False),
                                           ("replay", True), ("eagle+replay+history", True)])
def test_replay_after_a_policy_change_is_plain_decoding(tiny, kind, together):
    """Last epoch's completions (the old policy's, same seeds for most rows, another seed for some)
    drafted for the moved policy: the tokens and log-probs are the moved policy's plain decoding;
    replay drafts were accepted and rejected; replay rows verified with longer drafts than k, apart
    from the other rows or (`together`) with them riding along undrafted in the same forward."""
    new = moved(tiny, 0.3)
    prompts, params = PROMPTS * 2, params_for(12, 24)
    old = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params)
    replays = [o.token_ids for o in old]
    replays[1], replays[2] = replays[2], replays[1]  # two rows replay another prompt's text: fresh noise
    want = RolloutEngine(new, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params)
    engine = RolloutEngine(new, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter(kind, new),
                           num_draft_tokens=3, replay_k=8, policy=FixedK(3, together=together))
    got = engine.generate(prompts, params, replays=replays)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    replay = engine.stats.sd_kinds["replay"]
    assert 0 < replay["accepted"] < replay["proposed"]  # accepted, and rejected where the policy moved
    assert max(k for k in engine.stats.chosen_k) > 3  # the replay group verified wider than k
    if kind == "replay":  # rows without a replay draft nothing: they rode along only when together
        assert ("plain" in engine.stats.sd_kinds) == together
    if together:
        assert engine.stats.sd_kinds["plain"]["proposed"] == 0 < engine.stats.sd_kinds["plain"]["rows"]
    # what the head's distillation schedule reads (respec/trainer.py): the head's own drafts only
    assert (engine.stats.proposed_by("model") > 0) == kind.startswith(("eagle", "layers"))
    assert sum(len(o.token_ids) for o in got) > 0 and any(g.token_ids != r for g, r in zip(got, replays))


def test_replay_under_preemption(tiny):
    """A cache too small for the batch: rows with replays are preempted and recomputed, and the
    tokens stay plain decoding's."""
    new = moved(tiny, 0.3, seed=1)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i, stop_on_eos=False) for i in range(8)]
    replays = [o.token_ids for o in RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True)
               .generate(prompts, params)]
    want = RolloutEngine(new, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params)
    make = lambda size: RolloutEngine(new, kv_cache_bytes=size, block_size=4, eager=True,  # noqa: E731
                                      drafter=drafter("layers+replay", new), num_draft_tokens=3, replay_k=8)
    small = make(26 * make(64 << 20).cache.bytes_per_block)
    got = small.generate(prompts, params, replays=replays)
    assert small.stats.preemptions > 0 and small.stats.sd_kinds["replay"]["accepted"] > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_unchanged_policy_replays_everything(tiny):
    """The same policy and seeds: every replay draft is accepted, so each row needs about
    length / (replay_k + 1) verifies."""
    params = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=i, stop_on_eos=False) for i in range(4)]
    old = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS[:4], params)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=ReplayDrafter(), num_draft_tokens=3,
                           replay_k=8, policy=FixedK(3))
    got = engine.generate(PROMPTS[:4], params, replays=[o.token_ids for o in old])
    assert [g.token_ids for g in got] == [o.token_ids for o in old]
    replay = engine.stats.sd_kinds["replay"]
    assert replay["accepted"] == replay["proposed"] > 0
    assert engine.stats.proposed_by("model") == 0 < engine.stats.sd_steps  # verified, but nothing from a head
    assert len(engine.stats.chosen_k) <= 6  # 39 tokens after the prefill's, 9 per verify: 5 steps


def test_adaptive_long_width_follows_acceptance():
    from respec.solver import AdaptiveK, CostModel

    costs = CostModel((0.010, 0.001, 0.0001, 0.0, 0.002, 0.0))  # weight-bound: a wide verify costs little
    policy = AdaptiveK(costs, 3, beta=0.95)
    assert policy.choose_long(1, 64, 16) == (16, False)
    # beside plain rows one forward for all costs less than two: the others ride along
    assert policy.choose_long(1, 64, 16, others=3) == (16, True)
    policy.beta = 0.0  # nothing is accepted: no replay verify
    assert policy.choose_long(1, 64, 16) == (0, False) and policy.choose_long(1, 64, 16, others=3) == (0, False)
    assert long_lengths(16) == [0, 2, 4, 8, 16] and long_lengths(5) == [0, 2, 4, 5]
    policy.beta = 0.95  # compute-bound: a wide verify beside many plain rows costs more than it brings
    dense = AdaptiveK(CostModel((0.010, 0.001, 0.004, 0.0, 0.002, 0.0)), 3, beta=0.95)
    assert dense.choose_long(1, 64, 16)[0] > 0 and dense.choose_long(2, 64, 16, others=30) == (0, False)
    # in between: worth a verify of its own, not worth making 8 plain rows 9 tokens wide
    mid = AdaptiveK(CostModel((0.030, 0.001, 0.0005, 0.0, 0.002, 0.0)), 3, beta=0.95)
    L, together = mid.choose_long(2, 64, 16, others=8)
    assert L > 0 and not together
    assert FixedK(3).choose_long(1, 64, 8, others=2) == (8, False)
    assert FixedK(3, together=True).choose_long(1, 64, 8, others=2) == (8, True)
    assert FixedK(3, together=True).choose_long(1, 64, 8) == (8, False) and FixedK(0).choose_long(1, 64, 8) == (0, False)
    policy.beta = 0.5
    policy.observe_long([3, 0], [4, 4])  # 3 of 5 reached drafts accepted
    blended = (AdaptiveK.SCALE_PRIOR * 0.5 + 3) / (AdaptiveK.SCALE_PRIOR + 5)
    assert policy.long_beta() == pytest.approx(blended) and policy.beta == 0.5
    policy.end_rollout()  # the next rollout starts from the blend
    assert policy.beta == pytest.approx(blended) and policy.long_beta() == pytest.approx(blended)


def test_a_replay_verify_is_priced_by_the_rollouts_end():
    """Where no request waits, the rollout lasts as long as its longest rows: a replay verify that
    advances rows the others outlast saves only what those rows add to a step, and is off where the
    step's throughput alone would turn it on; the replay rows' lead over the others buys whole steps.
    With only replay rows left, or requests waiting, the price is the throughput's, as before."""
    from respec.solver import AdaptiveK, CostModel

    costs = CostModel((0.0535, 0.003, 0.002, 8.7e-6, 0.0, 0.0))  # fitted on a 2-core AVX2 CPU, fp32
    policy = AdaptiveK(costs, 3, beta=0.9, margin=0.0)
    assert policy.choose_long(4, 130, 16, others=12)[0] > 0  # requests waiting: its tokens per second win
    assert policy.choose_long(4, 130, 16, others=12, lead=0) == (0, False)  # the others set the end
    assert policy.choose_long(4, 130, 16, others=12, lead=16)[0] > 0  # the replay rows do
    for lead in (8, 16, 100):  # only replay rows: their lead is their rest, every token at the average
        assert policy.choose_long(4, 130, 16, lead=lead) == policy.choose_long(4, 130, 16)
        assert policy.extra_tokens(4, 0, 130, lead)(5.5) == pytest.approx(4 * 5.5)
    worth = [policy.extra_tokens(4, 12, 130, lead)(5.5) for lead in (0, 2, 5, 8)]
    assert worth == sorted(worth) and worth[0] < 4 * 5.5 < worth[-1]
    # the plan: told each row's expected tokens left, the lead is the replay rows' over the others
    room, offers = [60] * 16, [20] * 4 + [0] * 12
    longs = lambda remaining: [g.rows for g in policy.plan(room, offers, 130, max_k=3, max_long=16,
                                                           remaining=remaining) if g.long]
    assert longs(None) == [[0, 1, 2, 3]]
    assert longs([20] * 4 + [40] * 12) == []
    assert longs([20] * 4 + [2] * 12) == [[0, 1, 2, 3]]


def test_a_replay_verifys_saving_is_priced_as_it_was_chosen():
    """What the tally says a replay verify saved (the run's `sd_saved_s`, which the distillation's
    budget earns from) values its extra tokens as `choose_long` does: without a plan, the rows
    alone at the average cost per token (as before); in a step of 16 rows with none waiting, a
    verify of replay rows the others outlast cost time, one of rows that lead saved the most."""
    from respec.solver import AdaptiveK, CostModel

    costs = CostModel((0.0535, 0.003, 0.002, 8.7e-6, 0.0, 0.0))
    policy = AdaptiveK(costs, 3, beta=0.9, margin=0.0)
    policy.context = 130
    assert policy.long_saved_s(4, 24, 9, 4) == pytest.approx(24 / 4 * costs.step_s(4, 0, 130) - costs.verify_s(4, 9, 130))
    room, offers = [60] * 16, [20] * 4 + [0] * 12

    def saved(remaining):
        policy.plan(room, offers, 130, max_k=3, max_long=16, remaining=remaining)
        return policy.long_saved_s(4, 24, 9, 4)

    waiting, behind, ahead = saved(None), saved([20] * 4 + [40] * 12), saved([20] * 4 + [2] * 12)
    assert behind < 0 < waiting < ahead
    # the verify's own outcome goes the same way into the tally
    policy.tally = type(policy.tally)()
    policy.plan(room, offers, 130, max_k=3, max_long=16, remaining=[20] * 4 + [40] * 12)
    policy.observe_long([5] * 4, [8] * 4, forward_rows=4)
    assert policy.tally.saved_s == pytest.approx(behind)


def test_the_forecast_of_the_solvers_plan_does_not_lose_where_verifying_every_replay_does():
    """respec/lab/replay_bench.py's forecast on a compute-bound CPU's costs (random rows: completion
    length, common prefix with the replay, replay length): with all 16 decoding at once, verifying
    every replay row at every step loses to plain decoding; the solver's plan, priced by the
    rollout's end, does not (within 2%), and gives up nothing where one row decodes at a time."""
    import random

    from respec.lab.replay_bench import forecast
    from respec.solver import AdaptiveK, CostModel

    costs = CostModel((0.0535, 0.003, 0.002, 8.7e-6, 0.0, 0.0))  # fitted on a 2-core AVX2 CPU, fp32
    rng = random.Random(0)
    for _ in range(5):
        rows = []
        for _ in range(16):
            n, r = rng.randint(30, 64), rng.randint(30, 64)
            rows.append((n, min(rng.choice([0, 1, 2, 5, 10, 20, 64]), n, r), r))
        for batch in (1, 16):
            plain, every, beta = forecast(rows, batch, costs, 16, 130)
            assert 0.5 < beta < 1
            judged = forecast(rows, batch, costs, 16, 130, policy=AdaptiveK(costs, 1, beta=beta, margin=0.0),
                              max_new_tokens=64)[1]
            if batch == 1:
                assert judged == pytest.approx(every) and every < plain
            else:
                assert every > plain * 1.02 and judged < every and judged < plain * 1.02


def test_the_engine_tells_the_policy_each_rows_tokens_left_once_none_waits(tiny):
    """`remaining` is None while a request waits for a slot; once none does, each row's expected
    tokens left: a replay row's offer, a row past its replay or without one all it may still emit."""
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=i, stop_on_eos=False) for i in range(4)]
    old = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS[:4], params)
    seen = []

    class Recording(FixedK):
        def plan(self, room, offers, context, *, max_k, max_long, remaining=None):
            seen.append((list(room), list(offers or []), remaining))
            return super().plan(room, offers, context, max_k=max_k, max_long=max_long, remaining=remaining)

    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=ReplayDrafter(), num_draft_tokens=3,
                           replay_k=4, policy=Recording(3), max_batch=3)
    changed = list(old[1].token_ids[:16])
    changed[3] = (changed[3] + 1) % 50  # (the row leaves its replay at its fourth token)
    # three decode at once, the fourth waits until the first, replayed whole, is done; then none
    # waits: one row with its whole replay, one that left its replay, one without
    replays = [old[0].token_ids, changed, None, old[3].token_ids]
    got = engine.generate(PROMPTS[:4], params, replays=replays)
    assert [g.token_ids for g in got] == [o.token_ids for o in old]
    waited = [r for _, _, r in seen if r is None]
    told = [(room, offers, r) for room, offers, r in seen if r is not None]
    assert waited and told and seen.index(told[0]) > 0
    for room, offers, remaining in told:
        for o, r, left in zip(offers, room, remaining):
            assert left == (o or r + 1) or (not o and 0 < left <= r)
    # the row that left its replay: what its replay has left, until it runs past it
    assert any(r + 1 != left and not o for room, offers, rem in told for o, r, left in zip(offers, room, rem))


def test_a_replay_verify_counts_by_its_rows():
    """The replay rows' beta moves by the drafts a verify's rows reached, not 5% a verify whatever
    its rows: one verify of 16 replay rows that accept nothing past their first draft takes an
    optimistic prior most of the way down, and the long verify it chose for 4 rows is off at once."""
    from respec.solver import AdaptiveK, CostModel

    costs = CostModel((0.010, 0.001, 0.004, 0.0, 0.002, 0.0))  # compute-bound: a long verify must earn its width
    policy = AdaptiveK(costs, 3, beta=0.9)
    assert policy.choose_long(4, 64, 16)[0] > 0
    policy.observe_long([0] * 16, [16] * 16)  # each reached its first draft (16 in all), none accepted
    assert policy.long_beta() == pytest.approx(0.9 * 32 / 48)
    policy.observe_long([1] * 16, [16] * 16)  # 16 of 32 accepted
    assert policy.long_beta() == pytest.approx((0.9 * 32 + 16) / 80)
    assert policy.choose_long(4, 64, 16)[0] == 0
    frozen = AdaptiveK(costs, 3, beta=0.9, online=False)  # (the same verifies count at the rollout's end only)
    frozen.observe_long([0] * 16, [16] * 16)
    assert frozen.long_beta() == 0.9 and frozen.choose_long(4, 64, 16)[0] > 0


# --- seeds ----------------------------------------------------------------------------------------
def test_per_step_seeds_are_todays():
    seeds = RolloutSeeds("per-step", seed=7, group=2)
    assert seeds.step_seeds(3, [10, 11], [0, 0]) == [request_seed(7, 3, i) for i in range(4)]


def test_per_prompt_seeds_reuse_stagger_and_reseed():
    G = 4
    never = RolloutSeeds("per-prompt", seed=1, group=G)
    assert never.step_seeds(0, [5], [0]) == never.step_seeds(9, [5], [3])  # the same noise every epoch
    assert len(set(never.step_seeds(0, [5], [0]))) == G
    assert never.step_seeds(0, [5], [0]) != never.step_seeds(0, [6], [0])
    every2 = RolloutSeeds("per-prompt", seed=1, group=G, reseed_every=2)
    by_epoch = [every2.step_seeds(0, [5], [e]) for e in range(5)]
    for e in range(4):  # staggered: every epoch half the group is new, half reused
        fresh = sum(a != b for a, b in zip(by_epoch[e], by_epoch[e + 1]))
        assert fresh == G // 2, (e, fresh)
    for g in range(G):  # each sample is new every 2 epochs
        assert by_epoch[0][g] != by_epoch[2][g] and by_epoch[0][g] != by_epoch[4][g]
    # a group without signal gets new noise for its next visit; one with signal keeps its own
    before = never.step_seeds(0, [5, 6], [0, 0])
    never.observe([5, 6], [False, True])
    after = never.step_seeds(4, [5, 6], [1, 1])
    assert all(a != b for a, b in zip(before[:G], after[:G])) and before[G:] == after[G:]
    again = RolloutSeeds("per-prompt", seed=1, group=G)
    again.load_state_dict(never.state_dict())
    assert again.step_seeds(4, [5, 6], [1, 1]) == after


def test_one_step_never_repeats_a_prompt_and_sample_seed():
    """A step straddling an epoch boundary visits a row twice: its two groups get different noise."""
    task = make_task(task="toy-letters", train_size=5, seed=0)
    keys = [p.key for p in task.problems(3, 4)]  # positions 3..6: the end of epoch 0, the start of 1
    seeds = RolloutSeeds("per-prompt", group=4).step_seeds(0, keys, [0, 0, 1, 1])
    assert len(seeds) == len(set(seeds)) == 16
    forced = RolloutSeeds("per-prompt", group=4).step_seeds(0, [2, 2], [0, 1])
    assert len(set(forced)) == 8


# --- finite training sets, the store --------------------------------------------------------------
def test_train_size_visits_a_fixed_set_in_shuffled_epochs():
    task = make_task(task="basic_arithmetic", train_size=6, seed=3)
    epochs = [task.problems(6 * e, 6) for e in range(3)]
    keys = [[p.key for p in ep] for ep in epochs]
    assert all(sorted(k) == list(range(6)) for k in keys) and keys[0] != keys[1]  # each epoch a permutation
    by_key = {p.key: p.question for ep in epochs for p in ep}
    assert all(p.question == by_key[p.key] for ep in epochs for p in ep)  # a key is one problem
    assert [p.key for p in task.problems(13, 2)] == keys[2][1:3]  # the same every time
    endless = make_task(task="basic_arithmetic", seed=3)
    assert endless.size is None and [p.key for p in endless.problems(10, 3)] == [10, 11, 12]
    with pytest.raises(ValueError, match="--train-size"):
        DataConfig(data="rows.jsonl", train_size=4).make_task()


def test_replay_store_is_bounded_and_checkpointed():
    store = ReplayStore(max_tokens=10)
    store.put(1, 0, [1, 2, 3, 4])
    store.put(1, 1, [5, 6, 7])
    store.put(1, 0, [9, 9])  # replaces: 5 tokens held
    assert store.get(1, 0) == [9, 9] and store.tokens == 5 and store.nbytes() == 20
    store.put(2, 0, list(range(7)))  # 12 > 10: the least recently written goes
    assert store.get(1, 1) is None and store.get(2, 0) == list(range(7)) and store.tokens == 9
    again = ReplayStore()
    again.load_state_dict(store.state_dict())
    assert again.items == store.items and again.get(3, 0) is None


def test_held_out_problems_lie_outside_a_fixed_training_set(tokenizer):
    """With --train-size the held-out evaluation draws other problems: none of the training set's,
    and as many distinct ones as asked for (not a fixed set of its own cycled)."""
    from respec import distributed
    from respec.config import TrainConfig
    from respec.trainer import Trainer

    cfg = TrainConfig(model="tiny", task="toy-letters", train_size=6, prompts=2, group=2, sd="off", compile="off",
                      progress=False, eval_every=2, eval_prompts=10)
    trainer = Trainer(cfg, d=distributed.Dist(), run_dir="unused", tokenizer=tokenizer, log=lambda m: None)
    train = {str(p.messages()) for p in trainer.task.problems(0, 6)}
    held = [str(p.messages()) for p in trainer.evaluation.problems]
    assert len(held) == len(set(held)) == 10 and not train & set(held)
    # a missing default head is pretrained on the task's own problems, not the fixed set cycled
    # (the cached head serves every run of these task options)
    pretraining = {str(p.messages()) for p in cfg.pretraining_task().problems(10**6, 64)}
    assert len(pretraining) > 6 and not train >= pretraining
