"""Sampling without host syncs: temperature / top-k / top-p per row, the exponential trick, and
counter-based noise.

The exponential trick: if E_v ~ Exp(1) independently, then argmax_v p_v / E_v is a sample from p
(it is the Gumbel-max trick written with exponentials). It needs no cumulative sum and no
`multinomial`, so a whole batch samples in a few fused elementwise kernels inside the compiled
step, with no `.item()` and no data-dependent control flow.

The noise is *counter-based*: the uniform for (row seed, token position, vocabulary id, stream) is
a hash of those integers, computed in the graph. So a request's tokens depend only on its seed and
its own text, not on which other requests share its batch, on the batch bucket, or on whether it
was preempted and recomputed. Speculative decoding draws its extra randomness (the draft's samples,
the acceptance test, the residual resample) from other streams of the same hash.

The draw has two levels, so that a row hashes a few hundred counters, not the whole vocabulary:
the vocabulary is cut into blocks of `BLOCK` consecutive ids; the trick first picks a block b with
probability P(b) = sum of p over it (its scores log P(b) + Gumbel, one uniform per block, from the
stream's block half), then a token within b with probability p_v / P(b) (one uniform per token of
that block). P(b) * p_v / P(b) = p_v: exact. A 49k vocabulary then costs 192 + 256 hashes per row
instead of 49,152 (eager on 2 CPU cores: 272 rows, a 17-wide verify of 16 rows, 900 -> ~30 ms).
Two distributions drawn with the same counters share both levels' noise, which is what couples a
drafter to the target (respec/speculative.py); a vocabulary of at most BLOCK ids is one block, the
plain exponential trick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """What one request samples with (the engine's; train.py's and generate.py's options build it)."""

    max_new_tokens: int = 128  # completion length limit (tokens)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = off
    top_k: int = 0  # most likely tokens kept; 0 = off
    min_p: float = 0.0  # tokens kept if at least min_p x the most likely one's probability; 0 = off
    seed: int = 0  # fixes the sampling noise of this request
    stop_on_eos: bool = True  # end the completion at an EOS token (which is kept in the output)

    def validate(self, *, flags: bool = False) -> None:
        """Raise ValueError (one line) for a value out of its range, each check in this one place;
        `flags`: name the fields as a script's options (`--top-p`), not as fields (`top_p`)."""
        name = (lambda field: "--" + field.replace("_", "-")) if flags else (lambda field: field)  # noqa: E731
        if self.max_new_tokens <= 0:
            raise ValueError(f"{name('max_new_tokens')} must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"{name('temperature')} must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"{name('top_k')} must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"{name('min_p')} must be in [0, 1) (0: off), got {self.min_p}")


class RowSampling(NamedTuple):
    """Each row's sampling parameters as (rows,) tensors on the device, in the order every step
    function takes them (`*sampling`); padding rows are greedy with seed 0."""

    seeds: torch.Tensor  # int64: fixes the row's noise (with the position, see above)
    temperature: torch.Tensor  # fp32, 0 = greedy
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # fp32, 1 = off
    min_p: torch.Tensor  # fp32, 0 = off

# Streams: independent noise for each use at the same (seed, position).
STREAM_SAMPLE = 0  # the target's own sample (plain decoding, bonus and residual tokens)
STREAM_DRAFT = 1  # the drafter's proposals
STREAM_ACCEPT = 2  # the acceptance test of speculative sampling
BLOCK_STREAMS = 16  # stream s draws its block-level uniforms from stream s + BLOCK_STREAMS
BLOCK = 256  # vocabulary ids per block of the two-level draw


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, without overflowing int64.

    Two ways to the same values: eager on CPU one uint32 product, which wraps mod 2^32 by
    definition (3 ops where the split below takes 8: a third of an eager sampling step's time went to
    them); compiled, and on other devices, the product split into 16-bit halves, which inductor
    vectorises (its uint32 product does not) and every backend supports."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return (x.to(torch.uint32) * c).to(torch.int64)
    lo, hi = x & 0xFFFF, x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), good enough that adjacent counters give
    independent-looking outputs. Input and output in [0, 2^32) as int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# _mix32(v) for every vocabulary id v: the half of the per-token hash that does not depend on the
# row, computed once per (vocabulary size, device) outside the compiled steps (`vocab_hashes`).
_VOCAB_HASHES: dict[str, torch.Tensor] = {}


def vocab_hashes(vocab: int, device: torch.device | str) -> torch.Tensor:
    """_mix32(v) for v in 0..vocab-1, (vocab,) int64, memoised (call it once eagerly, e.g. when an
    engine is built, so that compiled steps read the table instead of hashing the vocabulary).

    Not only a saving at run time: written inline, the vocabulary hash feeds the row hash, and
    inductor inlines pointwise chains into their consumers, so each of the row hash's 5 levels
    doubles the copies of the vocabulary hash it generates code for (measured: ~30 s of a 35-s cold
    compile of the sampler on a 2-core CPU). The values are the same either way."""
    key = f"{vocab}@{torch.device(device)}"
    table = _VOCAB_HASHES.get(key)
    if table is None:
        table = _mix32(torch.arange(vocab, device=device, dtype=torch.int64))
        if not torch.compiler.is_compiling():
            _VOCAB_HASHES[key] = table
    return table


def padded_vocab(vocab: int) -> int:
    """The vocabulary as the sampler lays it out: padded to whole blocks of BLOCK ids."""
    return -(-vocab // BLOCK) * BLOCK


def prepare_sampler(vocab: int, device: torch.device | str) -> None:
    """The hash tables `sample` reads for a `vocab`-sized vocabulary (its tokens, padded to whole
    blocks, and its blocks), made once eagerly: a compiled step then reads them (one made while
    compiling would be made again at every call, and a memo entry appearing later recompiles)."""
    blocks = -(-vocab // BLOCK)
    vocab_hashes(blocks * BLOCK, device)
    vocab_hashes(blocks, device)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int, stream: int,
                  ids: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms in (0, 1), shape (*seed.shape, vocab), from counters (seed, position, stream, v).

    seed, position: int64 tensors of the same shape (one value per row). With `ids` (N,) or
    (*seed.shape, N), the uniforms of those ids of a `vocab`-sized vocabulary only, shape
    (*seed.shape, N): the tokens of one block of the two-level draw."""
    row = _mix32((_mix32((seed & _M32) ^ (stream * 0x9E3779B9 & _M32)) + position) & _M32)  # (...,)
    table = vocab_hashes(vocab, seed.device)
    if ids is not None:
        table = table[ids]
    h = _mix32((row.unsqueeze(-1) ^ table) & _M32)  # (..., V or N)
    return unit_interval(h)


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2^32)) -> float32 uniforms strictly inside (0, 1).

    Only the top 23 bits are kept: (m + 0.5) / 2^23 with m < 2^23 has at most 24 significant bits,
    so it is exact in float32 and lies in [2^-24, 1 - 2^-24]. Mapping all 32 bits, (h + 0.5) / 2^32,
    rounds to exactly 1.0 in float32 for the top 128 values of h; -log(1) = 0 then turns the
    exponential trick's score into +inf (or NaN on a masked token, which argmax picks), about once
    per 680 rows at a 49k vocabulary."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p remove; per row. logits (B, V) fp32 already
    divided by the temperature; top_k (B,) int64 (0 = off); top_p (B,) fp32 (1 = off); min_p (B,)
    fp32 (0 = off).

    Same order and meaning as Hugging Face's warpers: top-k first, then the smallest set of the
    remaining tokens whose renormalised mass reaches top_p, then the tokens whose probability is at
    least min_p times the most likely one's (the most likely token always stays)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(-1)  # (B, 1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly more likely tokens
    # top_p = 1 keeps everything: in float32 the running sum reaches 1 before the last few thousand
    # tokens of a 49k vocabulary, and `mass_before < 1` would drop them from an unfiltered row
    nucleus = (mass_before < top_p.unsqueeze(-1)) | (top_p >= 1).unsqueeze(-1)
    keep_sorted = nucleus & (rank < k)
    if min_p is not None:  # p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p) (min_p = 0: all)
        keep_sorted &= sorted_logits >= sorted_logits[:, :1] + torch.log(min_p).unsqueeze(-1)
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, *, use_filter: bool, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities (B, V) of the distribution each row samples from.

    Rows with temperature 0 (greedy) get the model's own log-softmax: their sample is the argmax,
    and the log-prob reported for it is the model's (the point mass would always say 0)."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)  # (B, 1)
    scaled = logits.float() / t
    if use_filter:
        filtered = filter_logits(scaled, top_k, top_p, min_p)
        scaled = torch.where(greedy.unsqueeze(-1), scaled, filtered)
    return scaled.log_softmax(dim=-1)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """-log(-log u): p / E with E = -log(u) ~ Exp(1), in log space, is logp + gumbel(u)."""
    return -torch.log(-torch.log(u))


def sample(logprobs: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
           stream: int = STREAM_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from `logprobs` (B, V) by the two-level exponential trick (module
    docstring); argmax where temperature is 0. Returns (tokens (B,) int64, their log-probs (B,) fp32).
    `logprobs` need not be normalised (a residual distribution): only their differences matter."""
    B, V = logprobs.shape
    blocks = -(-V // BLOCK)
    extra = blocks * BLOCK - V
    padded = (F.pad(logprobs, (0, extra), value=float("-inf")) if extra else logprobs).view(B, blocks, BLOCK)
    mass = padded.logsumexp(dim=-1)  # (B, blocks) log P(block), -inf where nothing can be drawn
    block = (mass + gumbel(uniform_noise(seed, position, blocks, stream + BLOCK_STREAMS))).argmax(dim=-1)  # (B,)
    within = padded.gather(1, block.view(B, 1, 1).expand(B, 1, BLOCK)).squeeze(1)  # (B, BLOCK)
    ids = block.unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=logprobs.device)  # (B, BLOCK) their token ids
    u = uniform_noise(seed, position, blocks * BLOCK, stream, ids=ids)  # (B, BLOCK) those tokens' uniforms
    drawn = block * BLOCK + (within + gumbel(u)).argmax(dim=-1)
    tokens = torch.where(temperature <= 0, logprobs.argmax(dim=-1), drawn)  # (B,)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
