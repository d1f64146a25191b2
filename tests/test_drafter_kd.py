"""The drafter's online distillation: the reward-weighted KD loss by hand, w(r), the 1 - TV acceptance
estimate against the acceptance rule itself, and the online learner on the tiny model (it learns,
swaps its weights into the engine, runs the same in the background, skips all-zero weights)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.eagle import cast_head
from respec.drafter_training import untrained_head
from respec.engine import RolloutEngine, SamplingParams
from respec.kd_loss import accepted_mass, sequence_weights, weighted_kl
from respec.online_learner import KDConfig, OnlineLearner
from respec.speculative import accept_drafts

L = math.log


def kl(p, q):
    return sum(pi * L(pi / qi) for pi, qi in zip(p, q))


def test_weighted_kl_by_hand():
    p = [[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.6, 0.4]]]  # (N=2, T=2, V=2)
    q = [[[0.25, 0.75], [0.5, 0.5]], [[0.5, 0.5], [0.6, 0.4]]]
    logp, logq = torch.tensor(p).log(), torch.tensor(q).log().requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])  # the last position of row 1 is not distilled
    # KL by hand: 0.5 ln 2 + 0.5 ln(2/3); 0.9 ln 1.8 + 0.1 ln 0.2; 0.2 ln 0.4 + 0.8 ln 1.6
    k00 = 0.5 * L(2) + 0.5 * L(2 / 3)
    k01 = 0.9 * L(1.8) + 0.1 * L(0.2)
    k10 = 0.2 * L(0.4) + 0.8 * L(1.6)
    assert k00 == pytest.approx(kl(p[0][0], q[0][0])) and k10 == pytest.approx(kl(p[1][0], q[1][0]))

    loss = weighted_kl(logp, logq, mask, torch.tensor([2.0, 1.0]))
    assert loss.item() == pytest.approx((2 * (k00 + k01) + 1 * k10) / (2 * 2 + 1 * 1), rel=1e-6)

    # A row of weight 0 contributes nothing: not to the value, not to the gradient.
    loss0 = weighted_kl(logp, logq, mask, torch.tensor([1.0, 0.0]))
    assert loss0.item() == pytest.approx((k00 + k01) / 2, rel=1e-6)
    loss0.backward()
    assert logq.grad[1].abs().max().item() == 0.0 and logq.grad[0].abs().max().item() > 0
    other_q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]], [[0.99, 0.01], [0.01, 0.99]]]).log()
    assert weighted_kl(logp, other_q, mask, torch.tensor([1.0, 0.0])).item() == pytest.approx(loss0.item())

    # A part of a batch divided by the whole batch's weighted count: the parts add up to the whole.
    w = torch.tensor([2.0, 1.0])
    parts = sum(weighted_kl(logp[i:i + 1], logq[i:i + 1].detach(), mask[i:i + 1], w[i:i + 1], denom=5.0)
                for i in range(2))
    assert parts.item() == pytest.approx(loss.item(), rel=1e-6)


def test_uniform_weights_are_plain_kd():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, 7, generator=g).log_softmax(-1)
    logq = torch.randn(3, 5, 7, generator=g).log_softmax(-1)
    mask = torch.rand(3, 5, generator=g) > 0.3
    plain = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)[mask].mean()  # token-mean KD
    for c in (1.0, 0.3, 7.0):  # any constant weight
        assert weighted_kl(logp, logq, mask, torch.full((3,), c)).item() == pytest.approx(plain.item(), rel=1e-5)


def test_sequence_weights():
    r = torch.tensor([0.0, 0.0, 1.0, 1.1])
    mean = (1.0 + 1.1) / 4
    std = math.sqrt((1.0 + 1.21) / 4 - mean ** 2)
    w = sequence_weights("rkd", r)
    expected = [min(max(1 + (x - mean) / std, 0.0), 2.0) for x in r.tolist()]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    assert w[3].item() == 2.0  # clipped at w_max
    assert (sequence_weights("rkd", r, mean=0.5, std=0.5) == torch.tensor([0.0, 0.0, 2.0, 2.0])).all()
    assert (sequence_weights("rkd", torch.full((4,), 0.3)) == 1).all()  # all equal: uniform KD
    assert (sequence_weights("kd", r) == 1).all()
    adv = torch.tensor([-1.2, 0.0, 0.5, 1.5])
    assert sequence_weights("akd", r, adv).tolist() == [0.0, 0.0, 0.5, 1.5]
    with pytest.raises(ValueError, match="unknown KD weighting"):
        sequence_weights("nope", r)


def test_accepted_mass_is_the_acceptance_rate_of_speculative_sampling():
    """sum min(p, q) against the rejection rule of respec/speculative.py run on 40,000 drafts."""
    g = torch.Generator().manual_seed(1)
    V, B = 6, 40_000
    for sharp in (0.5, 2.0):
        p = (torch.randn(V, generator=g) * sharp).softmax(-1)
        q = (torch.randn(V, generator=g) * sharp).softmax(-1)
        drafts = torch.multinomial(q, B, replacement=True, generator=g).view(B, 1)
        _, _, n = accept_drafts(p.log().expand(B, 2, V), q.log().expand(B, 1, V), drafts, torch.ones(B, dtype=torch.long), torch.ones(B),
                                torch.arange(B), torch.full((B,), 10))
        measured = n.float().mean().item()
        expected = accepted_mass(p, q).item()
        assert expected == pytest.approx(1 - 0.5 * (p - q).abs().sum().item(), abs=1e-6)  # = 1 - TV
        assert abs(measured - expected) < 4 * math.sqrt(expected * (1 - expected) / B), (measured, expected)


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollouts(tiny):
    """Eight greedy tiny-model completions of random prompts: (sequences, prompt lengths)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, tiny.cfg.vocab_size, (int(n),), generator=g).tolist() for n in (9, 12, 7, 15, 10, 8, 11, 13)]
    engine = RolloutEngine(tiny, kv_cache_bytes=8 << 20, eager=True)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop_on_eos=False))
    return [p + o.token_ids for p, o in zip(prompts, outs)], [len(p) for p in prompts]


def make_learner(tiny, seqs, **kw):
    head = untrained_head(tiny, seqs, seed=0, draft_vocab=512)  # the rollouts' tokens first
    engine = RolloutEngine(tiny, kv_cache_bytes=8 << 20, eager=True, drafter=cast_head(head, torch.float32),
                           num_draft_tokens=3)
    # T = 0.1: the random tiny model's full distribution is nearly uniform over 49k tokens (no drafter
    # could be accepted), its sharpened one is not
    budgeted = kw.pop("budgeted", False)
    cfg = KDConfig(**{"weighting": "rkd", "lr": 3e-3, "batch": 4, "temperature": 0.1, "async_update": False, **kw})
    return OnlineLearner(head, cfg, k=3, budgeted=budgeted), engine


def collect(learner, engine):
    """What the trainer does between rollouts: the learner's finished update into the engine's head;
    its figures (None: nothing finished)."""
    update = learner.collect()
    if update is None:
        return None
    if update.head is not None:
        engine.load_drafter_weights(update.head)
    return update.stats


def test_learner_learns_and_swaps_between_rollouts(tiny, rollouts):
    seqs, plens = rollouts
    learner, engine = make_learner(tiny, seqs)
    before = engine.drafter.module.fc.weight.clone()
    weights = torch.ones(len(seqs))
    history = []
    for step in range(6):
        learner.submit(tiny, seqs, plens, weights, step)
        history.append(collect(learner, engine))
        # the engine drafts with exactly the learner's weights after every collect
        for (name, live), (_, master) in zip(engine.drafter.module.named_parameters(), learner.head.named_parameters()):
            assert torch.equal(live, master.to(live.dtype)), name
    assert not torch.equal(before, engine.drafter.module.fc.weight)
    assert history[-1]["kd_loss"] < 0.7 * history[0]["kd_loss"], [h["kd_loss"] for h in history]
    assert history[-1]["alpha_est"][0] > history[0]["alpha_est"][0] + 0.05, [h["alpha_est"] for h in history]
    assert all(0.0 <= a <= 1.0 for h in history for a in h["alpha_est"]) and len(history[0]["alpha_est"]) == 3
    assert [h["kd_updates"] for h in history] == list(range(1, 7))
    assert collect(learner, engine) is None  # nothing new since

    # The trained head drafts losslessly: greedy SD gives exactly plain greedy tokens.
    prompts = [s[:n] for s, n in zip(seqs, plens)]
    sd = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop_on_eos=False))
    assert [s[n:] for s, n in zip(seqs, plens)] == [o.token_ids for o in sd]
    assert engine.stats.sd_steps > 0


def test_learner_forward_runs_in_the_rollout_dtype_and_keeps_an_fp32_master(tiny, rollouts):
    """With a bf16 rollout copy (`--dtype auto` where bf16 is native) the head's forward runs under
    bf16 autocast: the master weights and their AdamW state stay fp32, and the head still learns."""
    seqs, plens = rollouts
    teacher = copy.deepcopy(tiny).to(torch.bfloat16)
    learner, engine = make_learner(teacher, seqs)
    seen = []
    handle = learner.head.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    history = [learner.submit(teacher, seqs, plens, torch.ones(len(seqs)), s) or collect(learner, engine)
               for s in range(6)]
    handle.remove()
    assert set(seen) == {torch.bfloat16}, seen
    assert all(p.dtype == torch.float32 for p in learner.head.parameters())
    assert all(v.dtype == torch.float32 for st in learner.opt.state.values() for v in st.values() if v.dim() > 0)
    assert history[-1]["kd_loss"] < 0.7 * history[0]["kd_loss"], [h["kd_loss"] for h in history]

def test_background_update_equals_synchronous_and_waits_for_the_swap(tiny, rollouts):
    seqs, plens = rollouts
    weights = sequence_weights("rkd", torch.tensor([0.0, 1.0, 0.0, 1.1, 0.1, 1.0, 0.0, 0.0]))
    sync, sync_engine = make_learner(tiny, seqs)
    background, engine = make_learner(tiny, seqs, async_update=True)
    for step in range(3):
        sync.submit(tiny, seqs, plens, weights, step)
        a = collect(sync, sync_engine)
        live = engine.drafter.module.fc.weight.clone()
        background.submit(tiny, seqs, plens, weights, step)
        # the engine's head does not change until collect(): a rollout now would use the old weights
        background._thread.join()
        assert torch.equal(engine.drafter.module.fc.weight, live)
        b = collect(background, engine)
        assert b["alpha_est"] == pytest.approx(a["alpha_est"], abs=1e-4)
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-4)
    for (name, x), (_, y) in zip(sync.head.named_parameters(), background.head.named_parameters()):
        assert torch.allclose(x, y, atol=1e-5), name


def test_all_zero_weights_leave_the_head_unchanged(tiny, rollouts):
    seqs, plens = rollouts
    learner, engine = make_learner(tiny, seqs, weighting="akd")
    before = {k: v.clone() for k, v in learner.head.state_dict().items()}
    learner.submit(tiny, seqs, plens, torch.zeros(len(seqs)), 0)
    stats = collect(learner, engine)
    assert stats["kd_opt_steps"] == 0 and stats["kd_updates"] == 1
    assert all(torch.equal(before[k], v) for k, v in learner.head.state_dict().items())
    assert len(stats["alpha_est"]) == 3  # the estimate is still measured


def test_update_interval_buffers_steps(tiny, rollouts):
    seqs, plens = rollouts
    learner, engine = make_learner(tiny, seqs, interval=2)
    learner.submit(tiny, seqs, plens, torch.ones(len(seqs)), 0)
    first = collect(learner, engine)
    assert "kd_updates" not in first and len(learner.buffer) == len(seqs)  # teacher signal kept, no update
    learner.submit(tiny, seqs, plens, torch.ones(len(seqs)), 1)
    second = collect(learner, engine)
    assert second["kd_updates"] == 1 and second["kd_opt_steps"] == 2 * len(seqs) // 4 and learner.buffer == []


def test_distillation_schedule(tiny, rollouts):
    """Every step after a rollout in which the head drafted; every `idle_interval` steps while it did not."""
    seqs, _ = rollouts
    learner, _ = make_learner(tiny, seqs, idle_interval=3)
    due = []
    for step, drafted in enumerate([False, False, False, False, True, True, False, False, False, False]):
        due.append(learner.due(step, drafted))
        if due[-1]:
            learner.last_submit = step  # what submit records
    assert due == [True, False, False, True, True, True, False, False, True, False]
    assert learner.state_dict()["last_submit"] == 8  # a resume keeps the schedule


# ----------------------------------------------------------------------------------------------
def test_unroll_mask_by_hand():
    """Step 0 is causal; at step 2 the query at position j sees true-feature keys up to j - 2, the
    step-1 key at j - 1 and its own step-2 key at j."""
    from respec.distill import unroll_mask

    assert torch.equal(unroll_mask(3, 0), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    got = unroll_mask(4, 2).int().tolist()  # (4, 3 * 4): [K_0 | K_1 | K_2]
    assert got == [[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                   [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
                   [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
                   [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]


def test_head_loss_tv_term_is_one_minus_acceptance(tiny, rollouts):
    """The rejection rule's acceptance estimate of step 0 against sum_x min(p, q) computed from the target's and the
    head's full-vocabulary distributions directly, and the TV term of the loss by hand: the loss
    with tv_weight c is the KL loss plus c * sum_s decay^s * (1 - mean acceptance of step s)."""
    from respec.distill import Sequences, collate, head_loss, target_features

    seqs, plens = rollouts
    head = untrained_head(tiny, seqs, seed=0, draft_vocab=512)
    T_sample = 0.1
    feats = target_features(tiny, Sequences(seqs, plens), head.cfg.feature_layers, temperature=T_sample)
    tokens, taps, final, mask, lse = collate(Sequences(seqs, plens), feats, list(range(4)))
    with torch.no_grad():
        kl_only, steps = head_loss(head, tiny, (tokens, taps, final, mask), 2, temperature=T_sample, lse=lse,
                                   decay=0.5, verify="rejection")
        with_tv, _ = head_loss(head, tiny, (tokens, taps, final, mask), 2, temperature=T_sample, lse=lse,
                               decay=0.5, tv_weight=3.0, verify="rejection")
        # reference for step 0: a plain causal head forward, both distributions over all 49k tokens
        feature = head.project(torch.cat([taps.new_zeros(4, 1, taps.shape[-1]), taps[:, :-1]], dim=1))
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = head(feature, tokens, pos, tiny.embed_tokens)
        p = (tiny.logits(final) / T_sample).softmax(-1)[mask]  # (R, V)
        q = (head.target_logits(out) / T_sample).softmax(-1)[mask]
        _, sharp = head_loss(head, tiny, (tokens, taps, final, mask), 1, temperature=T_sample, lse=lse,
                             verify="rejection", draft_temperature=0.5)  # the q a head drafting at T / 2 draws from
        q_sharp = (head.target_logits(out) / (T_sample * 0.5)).softmax(-1)[mask]
    want = torch.minimum(p, q).sum(-1)  # (R,)
    assert steps[0]["count"] == int(mask.sum())
    assert steps[0]["accepted"] == pytest.approx(want.sum().item(), rel=1e-4)
    assert sharp[0]["accepted"] == pytest.approx(torch.minimum(p, q_sharp).sum().item(), rel=1e-4)
    assert abs(sharp[0]["accepted"] - steps[0]["accepted"]) > 1e-3 * steps[0]["count"]
    assert 0.0 < want.mean().item() < 1.0
    tv = [1 - st["accepted"] / st["count"] for st in steps]
    assert with_tv.item() == pytest.approx(kl_only.item() + 3.0 * (tv[0] + 0.5 * tv[1]), rel=1e-5)
    with pytest.raises(ValueError, match="needs the target's log-partition"):
        head_loss(head, tiny, (tokens, taps, final, mask), 1, tv_weight=1.0)


def test_untrained_head_lives_on_the_targets_device(tiny, rollouts):
    """`--drafter random` hands its head to the engine and the learner: it must sit where the
    target does (a target on the meta device stands in for a GPU here)."""
    seqs, _ = rollouts
    cpu = untrained_head(tiny, seqs, seed=0, draft_vocab=512)
    meta = untrained_head(copy.deepcopy(tiny).to("meta"), seqs, seed=0, draft_vocab=512)
    assert {p.device.type for p in meta.parameters()} | {b.device.type for b in meta.buffers()} == {"meta"}
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in cpu.named_parameters()]


def test_teacher_features_with_each_prompt_once_equal_whole_sequence_forwards(tiny):
    """A GRPO group's samples share their prompt's forward (`target_features`): the same features,
    final states and log-partitions as a forward of each whole sequence, for prompts of different
    lengths in one chunk (padding masked) and completions of every length (one empty)."""
    from respec.distill import Sequences, target_features

    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(5, tiny.cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    seqs, plens = [], []
    for prompt in (rand(9), rand(14), rand(6)):
        for n in (0, 3, 11, 7):
            seqs.append(prompt + rand(n))
            plens.append(len(prompt))
    layers = (0, 2, 3)
    shared = target_features(tiny, Sequences(seqs, plens), layers, batch=8, temperature=0.7)
    for s, p, got in zip(seqs, plens, shared):
        (want,) = target_features(tiny, Sequences([s], [p]), layers, temperature=0.7)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_coupled_agreement_is_the_match_rules_acceptance():
    """`coupled_agreement` (one draw per row with the engine's two-level sampler) against the exact
    agreement of two-level Gumbel coupling, over a vocabulary of 3 blocks where 4 of the target's
    likely tokens lie outside the head's vocabulary: blocks agree with probability
    1 / sum_c max(P_c/P_b, Q_c/Q_b), then tokens within the block with sum_i 1 / sum_j max(p_j/p_i,
    q_j/q_i) over the block's conditionals. 1 - TV (the rejection rule's acceptance) is larger."""
    from respec.kd_loss import coupled_agreement
    from respec.sampling import BLOCK

    g = torch.Generator().manual_seed(3)
    V, N = 3 * BLOCK, 40_000
    likely = torch.tensor([3, 9, 40, 200, 260, 300, 301, 520, 600, 700])  # spread over the 3 blocks
    logits = torch.full((V,), -12.0)
    logits[likely] = torch.randn(len(likely), generator=g) * 1.5
    p = logits.softmax(-1)
    outside = likely[[1, 4, 7, 8]]  # never proposed by the head
    q_logits = logits + torch.randn(V, generator=g)
    q_logits[outside] = float("-inf")
    q = q_logits.softmax(-1)

    def coupling(a, b):  # sum_i 1 / sum_j max(a_j/a_i, b_j/b_i) over i with b_i > 0
        return sum(1 / torch.maximum(a / a[i], b / b[i]).sum() for i in range(len(a)) if b[i] > 0).item()

    P, Q = p.view(3, BLOCK).sum(-1), q.view(3, BLOCK).sum(-1)
    exact = sum((1 / torch.maximum(P / P[c], Q / Q[c]).sum()).item()
                * coupling(p.view(3, BLOCK)[c] / P[c], q.view(3, BLOCK)[c] / Q[c]) for c in range(3))
    seeds, pos = torch.arange(N) * 7919, torch.randint(0, 4096, (N,), generator=g)
    got = coupled_agreement(p.log().expand(N, V), q.log().expand(N, V), seeds, pos).mean().item()
    se = 4 * math.sqrt(exact * (1 - exact) / N)
    assert abs(got - exact) < se, (got, exact)
    assert accepted_mass(p, q).item() > exact + se  # the rejection estimate would overstate the match rule


def test_kd_demo_reward_weights_fit_the_rewarded_completions_better():
    """`python -m respec.lab.kd_demo`: with w(r) the rewarded completions are the ones distilled, so
    the head ends closer to the target on them than on the others; with uniform weights the gap
    is much smaller (the statistic can tell the two weightings apart)."""
    from respec.lab.kd_demo import demo

    kl = demo(steps=6)
    reward_gap = kl["rkd", "unrewarded"] - kl["rkd", "rewarded"]
    uniform_gap = abs(kl["kd", "unrewarded"] - kl["kd", "rewarded"])
    assert reward_gap > 0
    assert reward_gap > 2 * uniform_gap


def test_the_distillation_keeps_within_its_share_of_the_run(tiny, rollouts):
    """`budget`: after the first distillation (always, for a head without an estimate of its own), one
    is due only while the distillation's seconds so far plus the next one's (expected: what the last
    took) are at most that share of the run's steps' plus the decoding time SD saved so far (net of
    what it cost; a net loss does not shrink the share); with no bound (1), whenever the schedule says."""
    seqs, plens = rollouts
    learner, _ = make_learner(tiny, seqs, budget=0.1, idle_interval=1)
    assert learner.due(0, drafted=False)  # the first: nothing spent yet
    learner.submit(tiny, seqs, plens, torch.ones(len(seqs)), 0)
    learner.collect()
    spent = learner.spent_s
    assert spent > 0 and learner.last_s == spent
    learner.account(10 * spent)  # allowance: 1 x spent, the next would make 2
    assert not learner.due(1, drafted=True)
    learner.account(11 * spent)  # 2.1 x spent
    assert learner.due(2, drafted=True)
    learner.spent_s += spent  # as if it ran: 3 x spent with the next, SD must save the difference
    learner.account(0.0, saved_s=0.5 * spent)
    assert not learner.due(3, drafted=True)
    learner.account(0.0, saved_s=-0.5 * spent)  # what SD costs is not earned back
    assert not learner.due(3, drafted=True)
    learner.account(0.0, saved_s=1.5 * spent)  # saved 1.5 x spent in all: 3 spent <= 0.1 x 21 + 1.5
    assert learner.due(3, drafted=True)
    unbounded, _ = make_learner(tiny, seqs, budget=1.0, idle_interval=1)
    unbounded.last_submit, unbounded.spent_s, unbounded.run_s = 0, 100.0, 1.0
    assert unbounded.due(1, drafted=True)
    state = learner.state_dict()
    # a resume keeps its account
    assert (state["spent_s"], state["run_s"], state["saved_s"]) == pytest.approx((2 * spent, 21 * spent, 1.5 * spent))


def test_a_head_with_an_estimate_waits_for_its_budget(tiny, rollouts):
    """A head that comes with an acceptance estimate (an exported head's report) is first distilled
    only once the budget covers the distillation's expected time: before the first, the last step's
    actor update (unknown before any step: not due), then what the last one took. Unbounded (1), or
    a head without an estimate: at once, as before."""
    seqs, plens = rollouts
    learner, _ = make_learner(tiny, seqs, budget=0.1, idle_interval=1, budgeted=True)
    assert not learner.due(0, drafted=True)  # nothing known of the cost yet
    learner.account(10.0, update_s=2.0)  # allowance 1 s, a distillation expected to take 2
    assert not learner.due(1, drafted=True)
    learner.account(9.0, update_s=2.0)  # allowance 1.9 s
    assert not learner.due(2, drafted=True)
    learner.account(1.0, update_s=2.0)  # allowance 2.0 s: it fits
    assert learner.due(3, drafted=True)
    learner.submit(tiny, seqs, plens, torch.ones(len(seqs)), 3)
    learner.collect()
    took = learner.last_s
    assert took == learner.spent_s > 0
    learner.spent_s += 2.0  # the allowance (2 s) spent: the next one must be earned back by SD
    learner.account(0.0, update_s=1e9)  # from now on the last one's time is the expectation, not the update's
    assert not learner.due(4, drafted=True)
    learner.account(0.0, saved_s=3 * took, update_s=1e9)  # spent 2 + took, expected took, allowance 2 + 3 took
    assert learner.due(4, drafted=True)
    state = learner.state_dict()
    assert (state["last_s"], state["update_s"]) == (took, 1e9)
    for kw in ({"budget": 0.1}, {"budget": 1.0, "budgeted": True}):
        assert make_learner(tiny, seqs, idle_interval=1, **kw)[0].due(0, drafted=False)
