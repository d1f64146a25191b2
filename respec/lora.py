"""LoRA on the actor (`--lora-r R`): peft's LoRA layers injected into the decoder's linear layers,
only the adapters trained; what the rollout, the checkpoints' Hugging Face export and the drafter's
teacher read is the merged weight W + (alpha / r) * B @ A.

Target modules take peft's / TRL's names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
`up_proj`, `down_proj`, `all-linear`) as well as respec's. respec's decoder fuses q/k/v into one
`qkv_proj` and gate/up into `gate_up_proj`, so naming any of q/k/v adapts the fused projection with
one adapter of rank r over all three outputs (not three adapters of rank r each), and gate/up
likewise: the same number of adapted weights, a shared low-rank update. The output head is never
adapted (peft's `all-linear` leaves it out too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OURS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "qkv_proj": "qkv_proj",
         "o_proj": "o_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "gate_up_proj": "gate_up_proj",
         "down_proj": "down_proj"}
DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama-family models (TRL passes none)


@dataclass(frozen=True)
class LoraSettings:
    r: int  # rank (0: no LoRA)
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input, in training
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def modules(self) -> list[str]:
        """The decoder's linear layers these targets adapt (respec's names); ValueError for a name
        that is not one."""
        if "all-linear" in self.targets:
            return list(OURS)
        unknown = [t for t in self.targets if t not in NAMES]
        if unknown:
            raise ValueError(f"--lora-target-modules {unknown[0]}: choose from {', '.join(NAMES)} or all-linear")
        return sorted({NAMES[t] for t in self.targets}, key=OURS.index)

    def check(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("--lora-r must be >= 0, --lora-alpha positive and --lora-dropout in [0, 1)")
        self.modules()


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Inject the adapters in place (peft); everything but the adapters is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.modules(), bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def has_lora(model: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """{adapted layer's name: alpha / r} of every LoRA layer of `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling["default"]) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged(state: dict[str, torch.Tensor], scale: dict[str, float]) -> dict[str, torch.Tensor]:
    """A whole state dict of the adapted model under the plain decoder's names, each adapted weight
    merged: `x.base_layer.weight` + scale * `x.lora_B.default.weight` @ `x.lora_A.default.weight`
    (computed in fp32, returned in the base weight's dtype)."""
    out = {}
    for name, t in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." not in name:
            out[name] = t
            continue
        layer, leaf = name.split(".base_layer.")
        if leaf == "weight":
            a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
            t = (t.float() + scale[layer] * (b.float() @ a.float())).to(t.dtype)
        out[f"{layer}.{leaf}"] = t
    return out
