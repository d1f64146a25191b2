"""The sampler at the real vocabulary size: uniforms strictly inside (0, 1), and masked tokens
never sampled. The 4- and 6-token vocabularies of the distribution tests cannot see either."""

from __future__ import annotations

import torch

from respec.sampling import STREAM_SAMPLE, sample, sampling_logprobs, uniform_noise, unit_interval

V = 49152  # SmolLM2's vocabulary


def test_unit_interval_never_reaches_0_or_1():
    h = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 129, 2**32 - 128, 2**32 - 1], dtype=torch.int64)
    u = unit_interval(h)
    assert u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(torch.log(-torch.log(u))).all()


def test_counter_where_32_bit_mapping_gave_exactly_one():
    """Seed 72 at position 600 hashes vocabulary id 42688 into the top 128 values of 2^32, which the
    old 32-bit mapping rounded to u = 1.0 (found by search). Token 42688 is masked by top-k = 1
    here; with u = 1.0 its score was -inf + inf = NaN, and argmax picked it."""
    seed, pos, hot = torch.tensor([72]), torch.tensor([600]), 42688
    u = uniform_noise(seed, pos, V, STREAM_SAMPLE)
    assert u[0, hot] < 1
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    logits[0, hot] = logits.min() - 5  # an unlikely token, far from the argmax
    one = torch.ones(1)
    for top_k, use_filter in ((1, True), (0, False)):
        lp = sampling_logprobs(logits, one, torch.tensor([top_k]), one, use_filter=use_filter)
        tok, logp = sample(lp, one, seed, pos)
        assert int(tok) != hot and torch.isfinite(logp).all()
        if top_k == 1:
            assert int(tok) == int(logits.argmax())


def test_top_k_rows_at_the_real_vocabulary_size():
    """Many seeds and positions: top-k = 1 rows at temperature 1 equal greedy, and top-k = 50 rows
    only ever sample one of their 50 most likely tokens."""
    n = 384
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, V, generator=gen) * 3
    seeds, pos = torch.arange(n) * 7919, torch.randint(0, 4096, (n,), generator=gen)
    one = torch.ones(n)
    for top_k in (1, 50):
        lp = sampling_logprobs(logits, one, torch.full((n,), top_k), one, use_filter=True)
        tok, logp = sample(lp, one, seeds, pos)
        top = logits.topk(top_k, dim=-1).indices
        assert (top == tok.view(-1, 1)).any(-1).all()
        assert torch.isfinite(logp).all()


def test_vocabulary_hash_table_gives_the_same_noise():
    """`vocab_hashes` only moves the per-vocabulary half of the hash out of the compiled steps: the
    noise is the same with the table, computed inline, eager and compiled."""
    import respec.sampling as sampling
    from compile.policy import SAMPLER_OPTIONS

    seed, pos = torch.tensor([3, 72]), torch.tensor([5, 600])
    sampling._VOCAB_HASHES.clear()
    # (compiled as the engine compiles the graphs that sample)
    inline_compiled = torch.compile(uniform_noise, fullgraph=True, dynamic=False, options=SAMPLER_OPTIONS)(
        seed, pos, V, STREAM_SAMPLE)
    assert not sampling._VOCAB_HASHES  # a table is never stored from inside a compiled graph
    eager = uniform_noise(seed, pos, V, STREAM_SAMPLE)
    assert sampling._VOCAB_HASHES  # ... but from eager code
    torch._dynamo.reset()
    table_compiled = torch.compile(uniform_noise, fullgraph=True, dynamic=False, options=SAMPLER_OPTIONS)(
        seed, pos, V, STREAM_SAMPLE)
    assert torch.equal(inline_compiled, eager) and torch.equal(table_compiled, eager)
    assert torch.equal(sampling.vocab_hashes(V, "cpu"), sampling._mix32(torch.arange(V)))


def test_both_32_bit_products_agree():
    """`_mul32`'s eager uint32 product and its compiled 16-bit split give the same hashes (the
    noise, hence every sampled token, must not depend on whether a step was compiled)."""
    import respec.sampling as sampling

    x = torch.randint(0, 2**32, (4, 4099), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x[0, :3] = torch.tensor([0, 2**32 - 1, 2**31])
    eager = sampling._mix32(x)
    compiled = torch.compile(sampling._mix32, fullgraph=True, dynamic=False)(x)
    reference = x.clone()  # the hash in Python integers
    for i, v in enumerate(x.flatten().tolist()[:64]):
        v ^= v >> 16
        v = (v * 0x7FEB352D) % 2**32
        v ^= v >> 15
        v = (v * 0x846CA68B) % 2**32
        v ^= v >> 16
        reference.view(-1)[i] = v
    assert torch.equal(eager, compiled)
    assert eager.flatten()[:64].tolist() == reference.flatten()[:64].tolist()


def test_two_level_draw_is_exact_across_blocks():
    """A vocabulary of 3 blocks and a ragged fourth (padded): the two-level draw's token frequencies
    over 60,000 counters follow p (chi-square; the tail pooled into one cell), and moving 2% of the
    mass from one likely token to another is detected (the test has power)."""
    from respec.sampling import BLOCK
    from tests.test_speculative import chi2_quantile_999, chi_square

    g = torch.Generator().manual_seed(5)
    V, N = 3 * BLOCK + 100, 60_000
    likely = torch.tensor([0, 7, 255, 256, 300, 511, 512, 700, 767, 768, 800, 867])  # every block, both edges
    logits = torch.full((V,), -8.0)
    logits[likely] = torch.randn(len(likely), generator=g)
    p = logits.softmax(-1)
    one = torch.ones(N)
    tokens, logp = sample(p.log().expand(N, V), one, torch.arange(N) * 104729, torch.randint(0, 4096, (N,), generator=g))
    assert torch.allclose(logp, p.log()[tokens])

    def cells(probs):
        out = {int(t): probs[t].item() for t in likely}
        out["tail"] = 1 - sum(out.values())
        return out

    named = set(likely.tolist())
    counts: dict = {}
    for t in tokens.tolist():
        key = t if t in named else "tail"
        counts[key] = counts.get(key, 0) + 1
    chi2, dof = chi_square(counts, cells(p), N)
    assert chi2 < chi2_quantile_999(dof), chi2
    biased = p.clone()
    biased[likely[0]] += 0.02
    biased[likely[3]] -= 0.02
    assert chi_square(counts, cells(biased), N)[0] > chi2_quantile_999(dof)
