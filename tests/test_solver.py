"""The adaptive-k solver: the throughput formula, the cost fit, online acceptance, and switching SD
on and off mid-rollout (which must not change greedy tokens)."""

import json
import random

import pytest
import torch

from models.drafter import truncated_drafter
from respec.engine import RolloutEngine, SamplingParams
from respec.profiling import StepTimer
from respec.solver import (AdaptiveK, CostModel, FixedK, Policy, conditional_alpha, expected_tokens, fit_costs,
                           grid_key, load_or_profile, machine_key, step_features)

# A memory-bound-then-compute-bound machine in miniature: 10 ms per step, 0.5 ms per token the
# target processes, 1 ms per draft step (coefficients in FEATURES order).
COSTS = CostModel((0.010, 0.0, 0.0005, 0.0, 0.001, 0.0))


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0] * 4, 4) == 5.0


def test_zero_acceptance_turns_sd_off():
    policy = AdaptiveK(COSTS, max_k=6, alpha=[0.0] * 6)
    assert all(policy.choose(b, 100) == 0 for b in (1, 2, 8, 64))


def test_cheap_drafter_and_high_acceptance_turn_sd_on():
    policy = AdaptiveK(COSTS, max_k=6, alpha=[0.9] * 6)
    assert policy.choose(1, 100) > 0


def test_decision_flips_where_the_costs_cross():
    """With alpha = 0.77 and k = 1 the only option besides plain decoding, SD pays while
    1.77 / t_step(B, 1) > 1 / t_step(B, 0), i.e. 1.77 (10 + 0.5 B) > 11 + B (ms): below B = 58.3."""
    policy = AdaptiveK(COSTS, max_k=1, alpha=[0.77])
    gain = lambda b: 1.77 / COSTS.step_s(b, 1, 0) - 1 / COSTS.step_s(b, 0, 0)  # noqa: E731
    crossing = next(b for b in range(1, 1000) if gain(b) <= 0)
    assert crossing == 59
    assert policy.choose(crossing - 1, 0) == 1
    assert policy.choose(crossing, 0) == 0
    assert all(policy.choose(b, 0) == 1 for b in range(1, crossing))
    assert all(policy.choose(b, 0) == 0 for b in range(crossing, 1000))


def test_online_acceptance_moves_toward_observations():
    """Within a rollout the estimate is the start's, weighed as SCALE_PRIOR (32) verified drafts, with
    every draft verified since, per position."""
    policy = AdaptiveK(COSTS, max_k=3, alpha=[0.5, 0.5, 0.5])
    # 4 rows, k = 3: accepted 3, 1, 0, 3 -> position 1: 3 of 4, position 2: 2 of 3, position 3: 2 of 2
    policy.observe([3, 1, 0, 3], 3)
    assert policy.alpha == pytest.approx([(16 + 3) / 36, (16 + 2) / 35, (16 + 2) / 34])
    for _ in range(40):
        policy.observe([0, 0, 0, 0], 3)  # nothing accepted: only position 1 is informed
    assert policy.alpha == pytest.approx([(16 + 3) / (32 + 164), (16 + 2) / 35, (16 + 2) / 34])
    assert policy.choose(1, 100) == 0


def test_the_default_estimate_is_a_guess_the_first_verifies_overrule():
    """Where no estimate is given, the default (0.5) was measured by nothing: it weighs as GUESS_PRIOR
    (4) verified drafts, so a 4-row verify at 0.25 turns SD off at 4 rows after one step (weighed as 32,
    the step it measured left 0.47 and SD on). Once a rollout measured a position, its estimate
    weighs as SCALE_PRIOR; a given estimate does from the start; a resumed solver keeps the weights."""
    costs = CostModel((0.020, 0.001, 0.003, 0.0, 0.001, 0.0))  # SD pays at 4 rows from about 0.45
    guessed, given = AdaptiveK(costs, max_k=3), AdaptiveK(costs, max_k=3, alpha=[0.5] * 3)
    assert guessed.choose(4, 64) == given.choose(4, 64) > 0
    for policy in (guessed, given):
        policy.observe([1, 0, 0, 0], 3)  # position 1: 1 of 4 accepted, position 2: 0 of 1
    assert guessed.alpha[:2] == pytest.approx([(4 * 0.5 + 1) / 8, 2 / 5])
    assert given.alpha[:2] == pytest.approx([(16 + 1) / 36, 16 / 33])
    assert guessed.choose(4, 64) == 0 and given.choose(4, 64) > 0
    for _ in range(3):
        guessed.observe([1, 0, 0, 0], 3)
    guessed.end_rollout()  # position 1 reached 16 times: measured; positions 2 and 3 not
    assert guessed.weight == [AdaptiveK.SCALE_PRIOR, AdaptiveK.GUESS_PRIOR, AdaptiveK.GUESS_PRIOR]
    assert guessed.alpha[0] == pytest.approx(0.5 + 16 / 20 * (0.25 - 0.5))
    resumed = AdaptiveK(costs, max_k=3)
    resumed.load_state_dict(json.loads(json.dumps(guessed.state_dict())))
    assert resumed.weight == guessed.weight and resumed.alpha == guessed.alpha
    assert given.weight == [AdaptiveK.SCALE_PRIOR] * 3


def test_a_verify_counts_by_its_rows():
    """A cold estimate (0.5) where drafts are accepted at 0.15: one verify of 64 rows moves it most of
    the way and turns SD off at 64 rows; as many 1-row verifies as it takes to verify 64 drafts too,
    while one 1-row verify barely moves it (the old per-verify average moved it 5% a verify whatever
    its rows)."""
    costs = CostModel((0.010, 0.0, 0.0001, 0.0, 0.0005, 0.0))  # a weight-read-bound machine: SD pays at 0.5
    accepted = [0] * 54 + [1] * 10  # 10 of 64 first drafts accepted (0.156)
    wide = AdaptiveK(costs, max_k=1, alpha=[0.5])
    assert wide.choose(64, 0) == 1
    wide.observe(accepted, 1)
    assert wide.alpha[0] == pytest.approx((16 + 10) / 96) and wide.choose(64, 0) == 0
    narrow = AdaptiveK(costs, max_k=1, alpha=[0.5])
    narrow.observe(accepted[:1], 1)
    assert narrow.alpha[0] == pytest.approx(16 / 33) and narrow.choose(64, 0) == 1
    for n in accepted[1:]:
        narrow.observe([n], 1)
    assert narrow.alpha == pytest.approx(wide.alpha)


def test_external_estimate_turns_sd_on():
    policy = AdaptiveK(COSTS, max_k=4, alpha=[0.0] * 4)
    assert policy.choose(1, 50) == 0
    policy.set_alpha([0.9, 0.9])  # e.g. 1 - TV(p, q) from the distillation batches
    assert policy.alpha == [0.9] * 4
    assert policy.choose(1, 50) > 0


def test_conditional_alpha():
    assert conditional_alpha([0.8, 0.4, 0.1]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional_alpha([0.5, 0.0, 0.0]) == [0.5, 0.0, 0.0]


def test_fit_recovers_known_costs():
    truth = (0.02, 0.003, 0.0004, 2e-6, 0.0015, 0.0001)
    rng = random.Random(0)
    samples = []
    for b in (1, 4, 16, 64):
        for k in (0, 1, 2, 4):
            for c in (64, 448):
                t = sum(x * f for x, f in zip(truth, step_features(b, k, c)))
                samples.append({"batch": b, "k": k, "context": c, "seconds": t * (1 + 0.01 * rng.uniform(-1, 1))})
    model = fit_costs(samples)
    assert model.rel_error < 0.02
    assert all(c >= 0 for c in model.coef)
    for b, k, c in [(2, 3, 200), (32, 1, 300), (8, 0, 100)]:
        want = sum(x * f for x, f in zip(truth, step_features(b, k, c)))
        assert model.step_s(b, k, c) == pytest.approx(want, rel=0.05)


def test_fit_never_goes_negative():
    # times that fall with batch size cannot be explained by non-negative costs: the fit drops terms
    samples = [{"batch": b, "k": 0, "context": 10, "seconds": 1.0 / b} for b in (1, 2, 4, 8)]
    assert all(c >= 0 for c in fit_costs(samples).coef)


def test_profile_is_cached(tiny, tmp_path):
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True,
                           drafter=truncated_drafter(tiny, 1), num_draft_tokens=2)
    path = tmp_path / "costs.json"
    kw = dict(batch_sizes=(1, 2), ks=(0, 1, 2), contexts=(8, 24), reps=1, progress=False)
    first, cached = load_or_profile(StepTimer(engine), "key-a", path, **kw)
    assert not cached and path.exists()
    data = json.loads(path.read_text())
    assert len(data["samples"]) == 12 and all(s["seconds"] > 0 for s in data["samples"])
    again, cached = load_or_profile(StepTimer(engine), "key-a", path, **kw)
    assert cached and again.coef == first.coef
    _, cached = load_or_profile(StepTimer(engine), "key-b", path, **kw)  # another model/machine: measured anew
    assert not cached
    load_or_profile(StepTimer(engine), "key-a", path, **kw)
    _, cached = load_or_profile(StepTimer(engine), "key-a", path, **{**kw, "batch_sizes": (1, 2, 3)})
    assert not cached  # another grid (another run's batch sizes): measured anew, not extrapolated
    _, cached = load_or_profile(StepTimer(engine), "key-a", path, **{**kw, "batch_sizes": (2, 1), "reps": 2})
    assert not cached  # (the file held the (1, 2, 3) grid's)
    _, cached = load_or_profile(StepTimer(engine), "key-a", path, **{**kw, "batch_sizes": (2, 1), "reps": 2})
    assert cached  # the same grid in any order, however many repetitions measured it
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1  # profiling leaves no blocks behind
    assert engine.stats.decode_steps == 0


def test_noisy_profile_is_measured_again(tmp_path):
    """A profile taken on a busy machine (steps 1-3x slower at random) fits badly; the second
    measurement, with twice the repetitions, is kept."""

    class BusyThenQuiet:
        k, calls, reps = 2, 0, []

        def time_step(self, B, k, c, *, reps):
            self.calls += 1
            self.reps.append(reps)
            t = 0.01 + 0.001 * B * (k + 1) + 0.002 * k
            busy = 1 + 2 * ((self.calls * 7) % 5) / 4  # 1, 1.5, 2, 2.5 or 3, scrambled
            return t * busy if self.calls <= 18 else t

    engine = BusyThenQuiet()
    kw = dict(batch_sizes=(1, 2, 4), ks=(0, 1, 2), contexts=(8, 24), reps=1, progress=False)
    model, cached = load_or_profile(engine, "key", tmp_path / "costs.json", **kw)
    assert not cached and engine.calls == 36 and engine.reps == [1] * 18 + [2] * 18
    assert model.rel_error < 0.01 and model.step_s(4, 2, 8) == pytest.approx(0.01 + 0.012 + 0.004, rel=0.01)


class Flat:
    """An engine whose every step takes 10 ms (profiles without running anything)."""
    k = 1

    def time_step(self, B, k, c, *, reps):
        return 0.01 * (1 + k)


def test_profiles_written_at_once_do_not_collide(tmp_path, monkeypatch):
    """Ranks of one node profile at the same time and cache to the same path: each writes a file
    of its own and renames it into place (a shared temporary name: the second rename finds nothing)."""
    import os

    path, kw = tmp_path / "costs.json", dict(batch_sizes=(1, 2), ks=(0, 1), contexts=(8, 24), reps=1, progress=False)
    replace, nested = os.replace, []

    def replace_after_another_rank(src, dst):
        if not nested:  # another rank profiles and saves between this rank's write and its rename
            nested.append(None)
            nested[0] = load_or_profile(Flat(), "key", path, **kw)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_rank)
    model, cached = load_or_profile(Flat(), "key", path, **kw)
    assert not cached and not nested[0][1]
    assert CostModel.from_json(json.loads(path.read_text())).key == grid_key("key", Flat.k, **kw)
    assert [f.name for f in tmp_path.iterdir()] == ["costs.json"]  # no temporary file left behind


def test_machine_key_tells_devices_and_cpus_apart(monkeypatch):
    cpu = machine_key("cpu")
    assert cpu.startswith("cpu-") and torch.backends.cpu.get_cpu_capability() in cpu
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"  # another CPU, same arch
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert machine_key("cpu") != cpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert machine_key("cuda:0") == "cuda-NVIDIA H100 80GB HBM3"


class Schedule(Policy):
    """A policy that switches SD on and off by step number."""

    def __init__(self, ks):
        self.ks, self.step = ks, 0

    def choose(self, batch, context):
        self.step += 1
        return self.ks[(self.step - 1) % len(self.ks)]

    def plain_run(self):
        return 1  # (a k per step: asked at every step)

    def observe(self, accepted, k, proposed=None):
        pass


@pytest.mark.parametrize("kind", ["eagle", "small"])
def test_switching_sd_on_and_off_keeps_greedy_tokens(tiny, kind):
    from tests.test_eagle import head_for

    prompts = [[(5 * i + j) % 400 + 3 for j in range(4 + 5 * i)] for i in range(5)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params)
    drafter = head_for(tiny, 300) if kind == "eagle" else truncated_drafter(tiny, 1)
    # off for runs of several steps (the drafter falls behind), then on with different k
    schedule = Schedule([0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 2, 3, 0, 1])
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                           num_draft_tokens=3, policy=schedule)
    got = engine.generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert set(engine.stats.chosen_k) >= {0, 1, 2, 3}
    assert len(engine.stats.chosen_k) == len(engine.stats.batch_sizes)
    engine.blocks.check_invariants()


def test_adaptive_policy_in_the_engine_matches_plain_greedy(tiny):
    prompts = [[(3 * i + j) % 400 + 3 for j in range(6 + 2 * i)] for i in range(6)]
    # SD pays below 4 active sequences on this made-up machine: the engine switches as rows finish
    costs = CostModel((0.010, 0.0, 0.004, 0.0, 0.001, 0.0))
    policy = AdaptiveK(costs, max_k=2, alpha=[0.6, 0.6])
    ks = {b: policy.choose(b, 10) for b in range(1, 7)}
    assert ks[1] > 0 and ks[3] > 0 and ks[4] == 0 and ks[6] == 0
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True,
                           drafter=truncated_drafter(tiny, 1), num_draft_tokens=2, policy=policy)
    params_varied = [SamplingParams(max_new_tokens=4 + 4 * i, temperature=0.0) for i in range(6)]
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True).generate(prompts, params_varied)
    got = engine.generate(prompts, params_varied)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    log = list(zip(engine.stats.batch_sizes, engine.stats.chosen_k))
    assert any(k == 0 for _, k in log) and any(k > 0 for _, k in log)
    assert all(k == 0 for b, k in log if b >= 4)


def test_fixed_policy_is_the_default(tiny):
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True,
                           drafter=truncated_drafter(tiny, 1), num_draft_tokens=2)
    assert isinstance(engine.policy, FixedK) and engine.policy.k == 2
    with torch.no_grad():
        assert StepTimer(engine).time_step(2, 2, 16, reps=1) > 0
    with pytest.raises(ValueError, match="at most 2"):
        StepTimer(engine).time_step(2, 3, 16)


def simulated_rollout(policy: AdaptiveK, rates: list[float], verifies: int, rng: random.Random, batch: int = 4):
    """`verifies` SD steps of `batch` rows at k = 3, each draft j accepted with probability rates[j]
    given the ones before it were; returns the rollout's tally."""
    for _ in range(verifies):
        accepted = []
        for _ in range(batch):
            n = 0
            while n < 3 and rng.random() < rates[n]:
                n += 1
            accepted.append(n)
        policy.observe(accepted, 3)
    return policy.end_rollout()


def test_an_optimistic_estimate_is_calibrated_by_what_the_next_rollout_measures():
    """The distillation's estimate says 0.9 per position, the drafts are accepted at 0.5/0.4/0.3:
    the first rollout's prediction is far off (the error the statistic must see), the scale refitted
    from it, and the next rollouts, with the same optimistic estimate set again (a new drafter
    update), are predicted within 0.15 tokens per verify."""
    rng = random.Random(0)
    rates = [0.5, 0.4, 0.3]
    policy = AdaptiveK(COSTS, max_k=3, alpha=[0.9] * 3, online=False)  # (the calibration alone)
    first = simulated_rollout(policy, rates, 100, rng)
    assert (first.predicted - first.emitted) / first.rows > 1.5  # 3.44 expected against 1.68
    errors = []
    for _ in range(3):
        policy.set_alpha([0.9] * 3)  # the same optimistic estimate again
        tally = simulated_rollout(policy, rates, 100, rng)
        errors.append((tally.predicted - tally.emitted) / tally.rows)
    assert all(abs(e) < 0.15 for e in errors), errors
    assert policy.scale == pytest.approx([r / 0.9 for r in rates], abs=0.12)
    assert policy.accept_error < 0.1  # the optimism measured once, halving as calibrated rollouts come in


def test_without_an_external_estimate_the_estimate_itself_follows_the_measured_rates():
    """The history drafter's solver starts from the 0.5 prior: a rollout accepting ~0.95 moves the
    estimate there (at the end of the rollout, without the online blend), and an under-estimate does not widen
    the margin (it costs speculation, never time)."""
    rng = random.Random(2)
    policy = AdaptiveK(COSTS, max_k=3, online=False)
    first = simulated_rollout(policy, [0.95] * 3, 100, rng)
    assert (first.predicted - first.emitted) / first.rows < -1.0 and policy.accept_error == 0.0
    assert all(a > 0.85 for a in policy.alpha), policy.alpha
    simulated_rollout(policy, [0.95] * 3, 100, rng)
    tally = simulated_rollout(policy, [0.95] * 3, 100, rng)
    assert abs(tally.predicted - tally.emitted) / tally.rows < 0.15


def test_sd_needs_a_gain_beyond_the_margin():
    """Where the predicted gain of SD is smaller than the model's error (the cost fit's and the
    acceptance estimate's), the solver decodes plainly; with no margin it would speculate."""
    alpha = [0.45] * 2  # k = 1 at batch 8: 1.45 tokens in 19 ms against 1 in 14 ms, 6.8% more
    bare = AdaptiveK(COSTS, max_k=2, alpha=alpha, margin=0.0)
    gain = max(bare.throughput(8, k, 100) for k in (1, 2)) / bare.throughput(8, 0, 100) - 1
    assert bare.choose(8, 100) > 0 and 0 < gain < 0.2, gain  # a small predicted gain: the case at hand
    careful = AdaptiveK(COSTS, max_k=2, alpha=alpha, margin=gain + 0.01)
    assert careful.choose(8, 100) == 0
    fitted = AdaptiveK(CostModel(COSTS.coef, rel_error=gain + 0.01), max_k=2, alpha=alpha)
    assert fitted.margin == pytest.approx(gain + 0.01) and fitted.choose(8, 100) == 0  # the fit's error by default


def test_the_solver_state_round_trips():
    rng = random.Random(1)
    policy = AdaptiveK(COSTS, max_k=3, alpha=[0.9] * 3)
    simulated_rollout(policy, [0.5, 0.5, 0.5], 50, rng)
    again = AdaptiveK(COSTS, max_k=3, alpha=[0.2] * 3)
    again.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert again.state_dict() == policy.state_dict()
    assert [again.choose(b, 100) for b in (1, 4, 16)] == [policy.choose(b, 100) for b in (1, 4, 16)]


def test_the_time_sd_saved_is_costed_by_the_model():
    """Each verify's tokens at plain decoding's modelled cost per token, minus the verify's: at batch
    4 (k = 3: 10 + 8 + 3 ms against 12 ms plain) drafts accepted at 0.95 save time, drafts never
    accepted cost it, by exactly the model's figures."""
    rng = random.Random(3)
    good = simulated_rollout(AdaptiveK(COSTS, max_k=3), [0.95] * 3, 50, rng)
    bad = simulated_rollout(AdaptiveK(COSTS, max_k=3), [0.0] * 3, 50, rng)
    plain, sd = COSTS.step_s(4, 0, 0), COSTS.step_s(4, 3, 0)
    assert good.saved_s == pytest.approx(good.emitted / 4 * plain - 50 * sd) and good.saved_s > 0
    assert bad.saved_s == pytest.approx(50 * (plain - sd)) and bad.saved_s < 0


def test_whether_a_rollout_can_draft_is_asked_at_its_largest_batch_and_longest_context():
    """`speculates`: any batch size up to the rollout's (SD pays at small batches, where rows have
    finished), any split into replay rows and others, at the longest context, which is enough: under
    the cost model a choice to speculate at some context holds at every longer one (checked over a
    grid, with a context term large enough to flip choices)."""
    costs = CostModel((0.010, 0.002, 0.004, 0.0002, 0.001, 0.0))
    off = AdaptiveK(costs, max_k=2, alpha=[0.0, 0.0])
    assert not off.speculates(16, 200, max_k=2)
    small = AdaptiveK(costs, max_k=2, alpha=[0.6, 0.6])
    assert small.choose(1, 10) > 0 and small.choose(16, 10) == 0
    assert small.speculates(16, 10, max_k=2)  # at 16 rows it would not, once rows finish it does
    assert not FixedK(0).speculates(16, 10, max_k=2) and FixedK(2).speculates(1, 10, max_k=2)
    # a replay's long verify may pay where the model's drafts do not: only when some row has a replay
    off.beta = 0.95
    assert off.choose_long(1, 200, 16)[0] > 0
    assert not off.speculates(4, 200, max_k=2, long_rows=0, max_long=16)
    assert off.speculates(4, 200, max_k=2, long_rows=1, max_long=16)
    assert not FixedK(0).speculates(4, 200, max_k=2, long_rows=1, max_long=16)
    # asking the ends of the replay rows' range is asking every split (random machines, estimates)
    rng = random.Random(3)
    asked = {True: 0, False: 0}
    for _ in range(300):
        machine = CostModel((rng.uniform(0.001, 0.03), rng.uniform(0, 0.005) * rng.randint(0, 1),
                             rng.uniform(1e-5, 2e-3), rng.uniform(0, 2e-5) * rng.randint(0, 1), 0.0, 0.0))
        policy = AdaptiveK(machine, max_k=2, alpha=[0.0, 0.0], beta=rng.uniform(0.0, 0.95), margin=rng.uniform(0, 0.1))
        rows, long_rows, context = rng.randint(1, 12), rng.randint(1, 12), rng.uniform(10, 500)
        every = any(policy.choose_long(m, context, 16, others=n - m, lead=lead)[0]
                    for n in range(1, rows + 1) for m in range(1, min(n, long_rows) + 1)
                    for lead in (None, 0, 1, 4, 16))  # (requests waiting, or none and the replays' lead)
        assert policy.speculates(rows, context, max_k=2, long_rows=long_rows, max_long=16) == every
        asked[every] += 1
    assert min(asked.values()) > 20  # (both answers came up)
    flips = 0
    for alpha in (0.2, 0.35, 0.5, 0.65):
        policy = AdaptiveK(costs, max_k=3, alpha=[alpha] * 3)
        for b in (1, 2, 4, 8, 16, 32):
            chosen = [policy.choose(b, c) > 0 for c in range(0, 4000, 100)]
            assert chosen == sorted(chosen)  # off, then on for good as the context grows
            flips += chosen[0] != chosen[-1]
    assert flips > 0  # (the grid does cross the boundary)


def test_a_rollout_the_policy_cannot_draft_in_runs_without_its_drafter(tiny):
    """Where the policy keeps SD off at every batch size and context the rollout can reach, the
    engine feeds the drafter nothing (no prefill, no per-step hook): the same tokens as plain
    decoding, `drafter_idle` set. Where it may draft (here once the batch is small), it is fed."""
    prompts = [[(3 * i + j) % 400 + 3 for j in range(6 + 2 * i)] for i in range(6)]
    params = [SamplingParams(max_new_tokens=4 + 4 * i, temperature=0.0) for i in range(6)]
    want = [c.token_ids for c in RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4,
                                               eager=True).generate(prompts, params)]
    costs = CostModel((0.010, 0.0, 0.004, 0.0, 0.001, 0.0))
    drafter = truncated_drafter(tiny, 1)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, block_size=4, eager=True, drafter=drafter,
                           num_draft_tokens=2)
    fed = []
    for hook in ("on_prefill", "on_decode", "catch_up"):
        original = getattr(engine.drafter, hook)
        setattr(engine.drafter, hook, lambda *a, _f=original, _h=hook: (fed.append(_h), _f(*a))[1])
    for policy, drafts in ((AdaptiveK(costs, max_k=2, alpha=[0.0, 0.0]), False), (FixedK(0), False),
                           (AdaptiveK(costs, max_k=2, alpha=[0.6, 0.6]), True)):
        fed.clear()
        out = engine.generate(prompts, params, policy=policy)
        assert [c.token_ids for c in out] == want
        assert out.stats.drafter_idle is not drafts
        assert bool(fed) is drafts and (out.stats.sd_steps > 0) is drafts
        if drafts:
            assert {"on_prefill", "on_decode", "catch_up"} <= set(fed)
    engine.blocks.check_invariants()


def test_a_row_that_proposed_less_than_its_cap_counts_its_missing_drafts_as_rejected():
    """A model-free drafter without a match proposes nothing for a row, which is verified as wide as
    the others all the same: the solver counts its missing drafts as rejected (what a verify of that
    width emits per row), and its tally predicts the group's tokens from the caps."""
    from respec.solver import Group

    policy = AdaptiveK(COSTS, max_k=3, alpha=[0.5] * 3, online=False)
    group = Group([0, 1, 2], 3, [3, 3, 2], offered=[False] * 3)
    policy.observe_group(group, [3, 0, 1], [3, 0, 1])  # row 1 matched nothing; row 2 proposed 1 of 2
    assert policy.counts == ([2, 1, 1], [3, 2, 1])  # position 1: rows 0 and 2 of 3; 2: row 0 of 0 and 2; 3: row 0
    assert policy.tally.predicted == pytest.approx(2 * expected_tokens([0.5] * 3, 3) + expected_tokens([0.5] * 3, 2))
    assert policy.tally.emitted == 4 + 1 + 2


def test_a_verify_counted_by_pairs_gives_the_row_by_row_counts():
    """`Verified` (a verify's rows counted by (accepted, proposed), as a run of steps ahead of the host
    counts them on the device) against counting row by row: per-position acceptance (each position
    counted directly), the rows by drafts proposed, the engine's per-kind statistics (rows that
    proposed nothing ride along as "plain") and the solver's estimate after the same verifies."""
    from respec.engine import EngineStats
    from respec.solver import Verified

    rng = random.Random(0)
    rows_stats, pairs_stats = EngineStats(), EngineStats()
    zero_rows = 0
    for _ in range(40):
        n, k = rng.randint(1, 9), 3
        proposed = [rng.choice([0, 1, 2, 3, 3]) for _ in range(n)]
        accepted = [rng.randint(0, m) for m in proposed]
        zero_rows += proposed.count(0)
        # the device's count: rows at proposed * (k + 1) + accepted
        counts = torch.nn.functional.one_hot(torch.tensor(proposed) * (k + 1) + torch.tensor(accepted),
                                             (k + 1) ** 2).sum(0).tolist()
        v = Verified.from_counts(counts, k + 1)
        assert v == Verified.of(accepted, proposed) and v.rows == n and v.accepted == sum(accepted)
        assert v.by_proposed() == {m: proposed.count(m) for m in sorted(set(proposed))}
        assert v.acceptance() == (
            [sum(a > j for a in accepted) for j in range(max(proposed))],
            [sum(m > j and a >= j for a, m in zip(accepted, proposed)) for j in range(max(proposed))])
        emitted = [a + 1 for a in accepted]
        rows_stats.count_kinds(["model"] * n, proposed, accepted, emitted)
        rows_stats.count_acceptance(accepted, proposed)
        pairs_stats.count_verified("model", v)
    assert zero_rows  # (power: rows rode along undrafted)
    assert pairs_stats.sd_kinds == rows_stats.sd_kinds and set(rows_stats.sd_kinds) == {"model", "plain"}
    assert (pairs_stats.sd_accepted_at, pairs_stats.sd_reached_at) == (rows_stats.sd_accepted_at,
                                                                       rows_stats.sd_reached_at)
