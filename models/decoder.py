"""The target model: one decoder for the Qwen2 / Qwen2.5 / Qwen3 / Llama / SmolLM2 family.

Everything the family shares is here: RMSNorm, rotary position embeddings (RoPE, theta from the
config, with Llama 3's frequency scaling where the config asks for it), grouped-query attention
(GQA), a SwiGLU MLP, optional q/k/v bias (Qwen2), optional per-head RMSNorm of q and k before RoPE
(Qwen3) and tied or untied input/output embeddings. Differences from the Hugging Face modules, on
purpose:

* q/k/v are one fused `qkv_proj` and gate/up one fused `gate_up_proj`: one matrix product instead
  of three (two) per layer, which matters when decoding is bound by reading weights. Loading maps
  the Hugging Face names onto the fused tensors (`models/loading.py`).
* The model owns no KV cache. A forward either runs plain causal attention over the tokens it is
  given (training, reference) or reads and writes a paged KV cache whose tensors and block tables
  are passed in as arguments (`respec/paged_attention.py`). That keeps the compiled decode, draft
  and verify steps pure functions of their inputs.
* `forward` returns final hidden states; `logits` applies the output head separately, so callers
  pay the 49k-wide head only on the positions they sample from.

Parallelism (FSDP2) and compilation are applied from outside (`respec/`, `compile/`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from respec.paged_attention import LayerKV, PagedKV, causal_attention, paged_attention, write_kv


@dataclass
class ModelConfig:
    vocab_size: int = 49152  # number of token ids the embedding and the output head cover
    hidden_size: int = 576  # model width d
    intermediate_size: int = 1536  # SwiGLU inner width
    num_layers: int = 30  # decoder blocks
    num_heads: int = 9  # query heads
    num_kv_heads: int = 3  # key/value heads (GQA: each serves num_heads // num_kv_heads queries)
    head_dim: int = 64  # per-head width; usually hidden_size // num_heads
    rope_theta: float = 100000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm
    max_position_embeddings: int = 8192  # longest sequence (prompt + completion) the model takes
    tie_word_embeddings: bool = True  # output head shares the input embedding matrix
    qkv_bias: bool = False  # Qwen2 has a bias on q/k/v; Llama does not
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (head_dim wide) before RoPE
    # Llama 3.x long-context RoPE: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE
    rope_llama3: dict | None = None
    bos_token_id: int | None = None  # from the checkpoint, informational
    eos_token_id: int | list[int] | None = None  # stop token(s) from the checkpoint

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face `config.json` (as a dict) of a Llama- or Qwen2-family model."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"unsupported model_type {model_type!r} (respec runs llama/qwen2/qwen3-family decoders)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", None):
            raise ValueError(f"unsupported RoPE scaling {rope_type!r} (plain RoPE and Llama 3's are implemented)")
        llama3 = None
        if rope_type == "llama3":
            llama3 = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
            llama3["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 configs do not say it: the architecture always has the bias.
            qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            rope_llama3=llama3,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` for this model: Qwen3 if it normalises q/k, Qwen2 if it has
        a q/k/v bias, else Llama."""
        kind = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_llama3:
            rope = {**rope, "rope_type": "llama3", **self.rope_llama3}
        return {
            "architectures": [{"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}[kind] + "ForCausalLM"],
            "model_type": kind,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            **({} if kind == "qwen2" else {"attention_bias": self.qkv_bias, "mlp_bias": False}),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# Exact-name presets. `tiny` is a random Qwen2-style model for tests and one-minute walk-throughs;
# real models are loaded from checkpoints (`models/loading.py`), which carry their own config.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=49152,  # SmolLM2's tokenizer, so tiny runs on real prompts
        hidden_size=64,
        intermediate_size=176,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        qkv_bias=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Random weights at real models' shapes: speed and correctness checks where no checkpoint can
    # be had (a GPU machine without a model hub); SmolLM2's tokenizer, as for tiny.
    "random-smollm2-135m": ModelConfig(bos_token_id=1, eos_token_id=2),
    "random-qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                       num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                                       max_position_embeddings=32768, qkv_bias=True, eos_token_id=2),
    "random-qwen2.5-1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                       num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                                       max_position_embeddings=32768, qkv_bias=True, eos_token_id=2),
    "random-qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                     num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                                     max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=False,
                                     eos_token_id=2),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference implementations do,
        # so bf16 results match them bit for bit where possible.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3's RoPE scaling: rotations whose wavelength is short against the original context
    keep their frequency, long ones are slowed down `factor` times, and the band between the two
    wavelength bounds (original context / low_freq_factor and / high_freq_factor) blends the two
    linearly in original context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    blend = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blend = blend.clamp(0.0, 1.0)  # 1: short wavelengths, kept; 0: long ones, divided by factor
    return blend * inv_freq + (1 - blend) * inv_freq / factor


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_position_embeddings, head_dim), fp32, in the rotate-half layout."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    if cfg.rope_llama3:
        inv_freq = llama3_frequencies(inv_freq, **cfg.rope_llama3)
    t = torch.arange(cfg.max_position_embeddings, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (P, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (P, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, 1, D) already in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int | None = None):
        """`in_features` defaults to the model width (the EAGLE head's layer reads 2x that)."""
        super().__init__()
        self.cfg = cfg
        q_out = cfg.num_heads * cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(in_features or cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.split = (q_out, kv_out, kv_out)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv: LayerKV | None, *, attend=None) -> torch.Tensor:
        """Attention of the tokens x (B, T, in) over the cache `kv` (or causally over themselves when
        it is None). `attend(q, k, v) -> (B, T, H, D)`, given q (B, T, H, D) and these tokens' own k, v
        (B, T, Hkv, D) after RoPE, replaces both: for a caller that decides itself which keys each query
        sees (the EAGLE head's training-time-test unroll, respec/distill.py)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, H, D)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)  # (B, T, Hkv, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attend is not None:
            out = attend(q, k, v)
        elif kv is None:
            out = causal_attention(q, k, v)
        else:
            write_kv(kv, k, v)
            out = paged_attention(q, kv)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv: LayerKV | None, *, attend=None) -> torch.Tensor:
        """`attend`: see `Attention.forward` (a caller that chooses the keys itself)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, attend=attend)
        return x + self.mlp(self.post_attention_layernorm(x))


def call_block(block: Block, x, cos, sin, kv: LayerKV | None) -> torch.Tensor:
    """The plain way to run a block. `compile/` substitutes a compiled version of this function,
    compiled once and reused by every layer (all layers share one graph)."""
    return block(x, cos, sin, kv)


def checkpointed_block(block: Block, x, cos, sin, kv: LayerKV | None) -> torch.Tensor:
    """A block whose activations are not kept for the backward pass but recomputed in it (activation
    checkpointing, `--gradient-checkpointing`): memory per block drops to its input, for one more
    forward of the block. Training only (no KV cache)."""
    return torch.utils.checkpoint.checkpoint(block, x, cos, sin, kv, use_reentrant=False)


class Decoder(nn.Module):
    """A Llama/Qwen2/Qwen3-family causal LM. Build on the meta device and load with `assign=True`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)compute the RoPE tables on `device`: needed after building on the meta device."""
        cos, sin = rope_tables(self.cfg, device=device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        positions: torch.Tensor | None = None,  # (B, T) absolute positions; default 0..T-1
        kv: PagedKV | None = None,  # paged cache to read and write; None = plain causal attention
        *,
        hidden_layers: tuple[int, ...] = (),  # also return the outputs of these blocks (drafter features)
        run_block=None,  # how to call a block: run_block(block, x, cos, sin, layer_kv); default block(...)
    ):
        """Final hidden states (B, T, d), normed; plus the outputs of the `hidden_layers` blocks, in
        that order, if any are requested."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(2)  # (B, T, 1, D)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(2)
        taps = {}
        run_block = run_block or call_block
        for block in self.layers:
            x = run_block(block, x, cos, sin, None if kv is None else kv.layer(block.layer))
            if block.layer in hidden_layers:
                taps[block.layer] = x
        x = self.norm(x)
        return (x, [taps[i] for i in hidden_layers]) if hidden_layers else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head on already-normed hidden states; fp32 logits."""
        return self.lm_head(hidden).float()

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The drafter interface (models/drafter.py): a Decoder drafts over the target's own vocabulary."""
        return self.logits(hidden)

    def num_weight_bytes(self, *, decode: bool = True) -> int:
        """Bytes of weights one decoding step reads (the embedding is a row gather, not a read)."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        if decode and not self.cfg.tie_word_embeddings:
            e = self.embed_tokens.weight
            total -= e.numel() * e.element_size()
        return total
