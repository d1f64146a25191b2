"""An EAGLE-3-style draft head.

The head drafts from the target's own features instead of from tokens alone:
  * the target's hidden states at three layers (low, middle, high: `[2, L//2, L-3]`) are
    concatenated and projected `3d -> d` (`fc`): the *feature* of a position;
  * to propose the token after position j, the head takes the pair (feature of position j-1,
    embedding of token j) (the target's embedding, frozen, not part of the head); both are
    RMS-normed, concatenated (`2d`) and fed to one decoder layer whose residual stream is the
    feature; the layer has its own paged KV cache (same block tables as the target's);
  * a final norm and an output head over a *reduced draft vocabulary* (the most frequent target
    tokens; `d2t` maps draft ids to target ids), so a draft step does not pay the 49k-token head;
  * drafting steps after the first feed the layer's own output back as the feature (EAGLE's
    feature autoregression).

Checkpoints are a directory with `config.json` and `model.safetensors` (`save_eagle`, `load_eagle`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.decoder import MLP, Attention, ModelConfig, RMSNorm, rope_tables
from respec.paged_attention import LayerKV


@dataclass
class EagleConfig:
    target: ModelConfig  # the target's config (the head's layer has the target's widths)
    feature_layers: tuple[int, ...]  # target blocks whose outputs make the feature (low, mid, high)
    draft_vocab_size: int  # size of the reduced output vocabulary

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab_size: int = 8192) -> "EagleConfig":
        L = target.num_layers
        layers = tuple(sorted({min(2, L - 1), L // 2, max(L - 3, 0)}))
        while len(layers) < 3:  # tiny targets: repeat the top layer
            layers = layers + (layers[-1],)
        return cls(target, layers, min(draft_vocab_size, target.vocab_size))

    def to_json(self) -> dict:
        return {"target": dataclasses.asdict(self.target), "feature_layers": list(self.feature_layers),
                "draft_vocab_size": self.draft_vocab_size}

    @classmethod
    def from_json(cls, data: dict) -> "EagleConfig":
        return cls(ModelConfig(**data["target"]), tuple(data["feature_layers"]), data["draft_vocab_size"])


class EagleLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feature_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, in_features=2 * cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, feature, embedding, cos, sin, kv: LayerKV | None, *, attend=None):
        """`attend`: see `Attention.forward` (training-time test chooses the keys itself)."""
        h = torch.cat([self.embed_norm(embedding), self.feature_norm(feature)], dim=-1)  # (B, T, 2d)
        x = feature + self.self_attn(h, cos, sin, kv, attend=attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleHead(nn.Module):
    """See the module docstring. `cfg.target.num_layers` is the *target's*; the head has one layer."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        t = cfg.target
        self.cfg = cfg
        self.n_rep = t.n_rep
        self.fc = nn.Linear(len(cfg.feature_layers) * t.hidden_size, t.hidden_size, bias=False)
        self.layer = EagleLayer(t)
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)  # draft id -> target id
        cos, sin = rope_tables(t)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_buffers(self, device) -> None:
        self.rope_cos, self.rope_sin = rope_tables(self.cfg.target, device=device)

    def project(self, taps: torch.Tensor) -> torch.Tensor:
        """Concatenated target hidden states (..., 3d) -> feature (..., d)."""
        return self.fc(taps)

    def forward(self, feature, tokens, positions, embed: nn.Embedding, kv: LayerKV | None = None):
        """feature (B, T, d), tokens (B, T) -> the layer's output features (B, T, d)."""
        emb = embed(tokens).to(feature.dtype)
        cos = self.rope_cos[positions].to(feature.dtype).unsqueeze(2)
        sin = self.rope_sin[positions].to(feature.dtype).unsqueeze(2)
        return self.layer(feature, emb, cos, sin, kv)

    def draft_logits(self, out_feature: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary, fp32."""
        return self.lm_head(self.norm(out_feature)).float()

    def target_logits(self, out_feature: torch.Tensor) -> torch.Tensor:
        """Logits over the *target* vocabulary: -inf outside the draft vocabulary."""
        small = self.draft_logits(out_feature)
        full = small.new_full((*small.shape[:-1], self.cfg.target.vocab_size), float("-inf"))
        return full.index_copy(-1, self.d2t, small)


def call_head(head: EagleHead, feature, tokens, positions, embed: nn.Embedding, kv: LayerKV | None):
    """The plain way to run the head's layer; `compile/` substitutes a compiled version."""
    return head(feature, tokens, positions, embed, kv)


def cast_head(head: EagleHead, dtype: torch.dtype) -> EagleHead:
    """A frozen copy of `head` in `dtype` (the rollout engine's), rope tables kept in fp32."""
    import copy

    out = copy.deepcopy(head).to(dtype).eval().requires_grad_(False)
    out.init_buffers(head.fc.weight.device)
    return out


def save_eagle(head: EagleHead, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, tmp)
    (out_dir / "config.json.tmp").write_text(json.dumps({"kind": "eagle3", **head.cfg.to_json()}, indent=2))
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json.tmp").replace(out_dir / "config.json")


def load_eagle(path: str | Path, *, dtype=torch.float32, device="cpu") -> EagleHead:
    """An EAGLE head saved by `save_eagle`; ValueError (one line) if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"drafter not found: {path} has no config.json")
    try:
        data = json.loads(config.read_text())
        if data.get("kind") != "eagle3":
            raise ValueError("not an eagle3 drafter")
        cfg = EagleConfig.from_json(data)
        state = load_file(path / "model.safetensors")
    except (KeyError, TypeError, ValueError, SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load drafter {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    with torch.device("meta"):
        head = EagleHead(cfg)
    head.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                          for k, v in state.items()}, assign=True, strict=True)
    head.init_buffers(device)
    return head.eval()


def check_eagle_fits(target, head: EagleHead) -> None:
    t, h = target.cfg, head.cfg.target
    if (t.vocab_size, t.hidden_size, t.num_layers) != (h.vocab_size, h.hidden_size, h.num_layers):
        raise ValueError(f"drafter was trained for a different target (vocab {h.vocab_size}, width {h.hidden_size}, "
                         f"{h.num_layers} layers; this target: vocab {t.vocab_size}, width {t.hidden_size}, "
                         f"{t.num_layers} layers)")
