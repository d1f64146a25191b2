"""The EAGLE-style head: exact speculative decoding with it, checkpoints, and its training entry point."""

import dataclasses
import json

import pytest
import torch

import generate
import train
from models.decoder import PRESETS
from models.eagle import EagleConfig, EagleHead, load_eagle, save_eagle
from models.loading import random_model
from respec.drafters.eagle import EagleDrafter
from respec.engine import RolloutEngine, SamplingParams
from respec.paged_attention import PagedKV
from tests.test_speculative import (LENGTH, N_SAMPLES, PROMPT, SHARPEN, SMALL, chi2_quantile_999, chi_square,
                                    exact_sequence_probs, sample_sequences)

PROMPTS = [[1, 2, 3, 4, 5], [7] * 30, [9, 8, 7], [40, 41]]


def head_for(target, draft_vocab, seed=0):
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.for_target(target.cfg, draft_vocab)).eval()
    with torch.no_grad():
        head.d2t.copy_(torch.randperm(target.cfg.vocab_size)[:draft_vocab])
    return head


@pytest.mark.parametrize("k", range(1, 7))
def test_greedy_eagle_sd_equals_plain(tiny, k):
    params = SamplingParams(max_new_tokens=25, temperature=0.0, stop_on_eos=False)
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS, params)
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=head_for(tiny, 3000), num_draft_tokens=k)
    got = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert engine.stats.sd_steps > 0


def test_eagle_sd_sampling_is_lossless():
    """A 3-of-4-token draft vocabulary: the head can never propose one token, and SD must still
    reproduce the target's distribution over whole sequences."""
    target = random_model(SMALL, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(SHARPEN)
    head = head_for(target, 3, seed=1)
    probs = exact_sequence_probs(target, 1.0, 1.0)
    engine = RolloutEngine(target, kv_cache_bytes=256 << 20, block_size=4, max_batch=512, eager=True, drafter=head,
                           num_draft_tokens=2)
    counts = sample_sequences(engine, 1.0, 1.0)
    chi2, dof = chi_square(counts, probs, N_SAMPLES)
    print(f"EAGLE head: chi2 {chi2:.1f} on {dof} dof, accept/pos {engine.stats.accept_per_pos}")
    assert 0.1 < engine.stats.accept_per_pos[0] < 0.95
    assert chi2 < chi2_quantile_999(dof)
    assert LENGTH == 3 and PROMPT


def test_save_load_round_trip(tiny, tmp_path):
    head = head_for(tiny, 500)
    save_eagle(head, tmp_path / "d")
    again = load_eagle(tmp_path / "d")
    for (n1, a), (n2, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_bad_eagle_drafters(tiny, tmp_path, capsys):
    other = random_model(dataclasses.replace(PRESETS["tiny"], hidden_size=32, head_dim=8))
    save_eagle(head_for(other, 100), tmp_path / "other")
    for spec, needle in [(str(tmp_path / "other"), "different target"), (str(tmp_path / "missing"), "not found")]:
        code = generate.main(["--model", "tiny", "--eager", "--drafter", spec])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load drafter"):
        load_eagle(tmp_path / "broken")


def test_train_drafter_stage_end_to_end(tmp_path, capsys):
    out = tmp_path / "drafter"
    code = train.main(["--stage", "drafter", "--model", "tiny", "--out", str(out), "--prompts", "8", "--held-out", "2",
                       "--new-tokens", "12", "--epochs", "1", "--batch", "4", "--draft-vocab", "512", "--no-progress"])
    assert code == 0 and "drafter KD" not in capsys.readouterr().err  # --no-progress: no bar
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["held_out_greedy"]) == {str(k) for k in range(1, 7)}
    assert report["steps"] == 2
    head = load_eagle(out)
    assert head.cfg.draft_vocab_size == 512
    # the drafter directory is usable by generate.py
    assert generate.main(["--model", "tiny", "--eager", "--drafter", str(out), "--k", "3", "--max-new-tokens", "6"]) == 0
    # and never overwritten
    assert train.main(["--stage", "drafter", "--model", "tiny", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_training_time_test_unroll_matches_drafting(tiny):
    """Unroll step s of training computes, at every position, exactly what the s-th draft step
    computes at inference over the paged cache (true-feature keys before the drafting point, the
    head's own keys after it)."""
    from respec.distill import ttt_layer
    from respec.kv_cache import PagedKVCache
    from respec.paged_attention import PagedKV

    head = head_for(tiny, 300)
    T, P = 11, 6
    torch.manual_seed(2)
    features = torch.randn(1, T, tiny.cfg.hidden_size)
    tokens = torch.randint(0, 300, (1, T))
    with torch.no_grad():
        outs = ttt_layer(head, features, tokens, tiny.embed_tokens, 4)
        cfg = tiny.cfg
        cache = PagedKVCache(num_layers=1, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             capacity_bytes=1 << 20, block_size=4, dtype=torch.float32)
        cache.blocks.allocate(0, T)
        tables = cache.block_tables([0], 4)
        pos = torch.arange(P + 1).view(1, -1)
        out = head(features[:, : P + 1], tokens[:, : P + 1], pos, tiny.embed_tokens,
                   PagedKV.build(cache.pools, tables, pos, head.n_rep).layer(0))
        g = out[:, P:]
        torch.testing.assert_close(g, outs[0][:, P:P + 1])
        for s in range(1, 4):
            pos = torch.tensor([[P + s]])
            g = head(g, tokens[:, P + s: P + s + 1], pos, tiny.embed_tokens,
                     PagedKV.build(cache.pools, tables, pos, head.n_rep).layer(0))
            torch.testing.assert_close(g, outs[s][:, P + s: P + s + 1], rtol=1e-4, atol=1e-5)


class _FedAtOnce(EagleDrafter):
    """The reference: the head consumes the prompt's pairs (feature of position j-1, token j; a zero
    feature before the first token) in the prefill, in one forward, `shift` positions late; the
    first sampled token's pair waits."""

    def __init__(self, head, shift=0):
        super().__init__(head)
        self.shift = shift

    def on_prefill(self, seqs, tokens, positions, valid, block_tables, taps, first_tokens) -> None:
        head, B = self.runner, tokens.shape[0]
        shifted = torch.cat([taps.new_zeros(B, 1, taps.shape[-1]), taps[:, :-1]], dim=1)
        positions = positions + self.shift
        kv = PagedKV.build(self.view.draft_pools, block_tables, positions, head.n_rep, valid=valid)
        head(head.project(shifted), tokens, positions, self.view.target.embed_tokens, kv.layer(0))
        last = valid.long().sum(1) - 1
        at = self.log.append(taps[torch.arange(B), last], first_tokens[:B])
        for i, s in enumerate(seqs):
            self.pending[s.id], self.pending_start[s.id] = [(at + i, 1)], len(s.tokens) + self.shift


def _drafts(engine, prompts, params) -> tuple[list, list]:
    """Every draft the engine's drafter proposed, a step at a time, and the completions."""
    out, drafter = [], engine.drafter
    for name in ("draft", "draft_ahead"):
        def record(*args, _f=getattr(drafter, name)):
            d = _f(*args)
            out.append((d.tokens.clone(), d.lengths.clone()))
            return d
        setattr(drafter, name, record)
    got = engine.generate(prompts, params)
    return out, [g.token_ids for g in got]


@pytest.mark.parametrize("run_ahead", [0, 32])
def test_the_heads_prompt_feed_waits_for_its_first_draft(tiny, run_ahead):
    """A row's prompt pairs wait in the head's log until the first step that drafts the row
    (`EagleDrafter.on_prefill`), which consumes them as a feed in the prefill would: the same
    drafts, step for step, as a head fed at once, and the same tokens as plain decoding; power: a
    feed at once two positions late drafts otherwise. The prefill runs no forward of the head."""
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_on_eos=False)
    want = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True).generate(PROMPTS, params)

    def engine(drafter):
        return RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=drafter, num_draft_tokens=3,
                             run_ahead=run_ahead)

    lazy = engine(EagleDrafter(head_for(tiny, 3000)))
    calls, in_prefill = [], []
    lazy.drafter.runner.register_forward_pre_hook(lambda *a: calls.append(1))
    prefill = lazy._prefill
    lazy._prefill = lambda seqs: (n := len(calls), prefill(seqs), in_prefill.append(len(calls) - n))
    got, tokens = _drafts(lazy, PROMPTS, params)
    ref, ref_tokens = _drafts(engine(_FedAtOnce(head_for(tiny, 3000))), PROMPTS, params)
    late, _ = _drafts(engine(_FedAtOnce(head_for(tiny, 3000), shift=2)), PROMPTS, params)
    assert tokens == ref_tokens == [w.token_ids for w in want]
    assert len(got) == len(ref) > 3 and calls and in_prefill == [0]
    for (t, n), (rt, rn) in zip(got, ref):
        assert torch.equal(n, rn) and torch.equal(t, rt)
    assert any(not torch.equal(t, lt) for (t, _), (lt, _) in zip(got, late))


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_timed_sd_step_finds_the_prompt_fed(tiny, hybrid):
    """What the cost profile times (`RolloutEngine.time_step`) is an SD step, not the head's feed of
    the prompt: the drafter consumes the synthetic rows' text untimed (`Drafter.settle`), so the
    timed step finds at most k + 1 pairs pending a row (power: without it, the whole context)."""
    from respec.drafters.history import HistoryDrafter
    from respec.drafters.hybrid import HybridDrafter
    from respec.profiling import synthetic_steps

    head = EagleDrafter(head_for(tiny, 3000))
    drafter = HybridDrafter(head, HistoryDrafter()) if hybrid else head
    engine = RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, drafter=drafter, num_draft_tokens=3)
    found = []
    speculate = engine._speculate
    engine._speculate = lambda seqs, k, caps: (found.append([head._count(head.pending[s.id]) for s in seqs]),
                                               speculate(seqs, k, caps))[1]
    synthetic_steps(engine, 2, 3, 32, 1)
    assert found == [[1, 1]]
    engine.drafter.settle, found[:] = lambda seqs, k: None, []
    synthetic_steps(engine, 2, 3, 32, 1)
    assert found == [[32, 32]]  # (the context's pairs, the newest's included)
