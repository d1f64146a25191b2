"""Drafters: the cheap models that propose tokens for speculative decoding.

A drafter here is any `Decoder`-shaped causal LM over the target's vocabulary: it is called as
`drafter(input_ids, positions, kv, run_block=...)` over its own paged KV pools (addressed by the
target's block tables) and `drafter.logits(hidden)`. `truncated_drafter` builds the simplest one:
the target's first N blocks with the target's embedding, final norm and output head, sharing
their weights (no copy, and it follows the actor's weight updates for free).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.decoder import Decoder


def truncated_drafter(target: Decoder, num_layers: int) -> Decoder:
    """A drafter made of the target's first `num_layers` blocks, sharing every weight with it."""
    if not 1 <= num_layers <= target.cfg.num_layers:
        raise ValueError(f"a truncated drafter needs 1..{target.cfg.num_layers} layers, got {num_layers}")
    cfg = dataclasses.replace(target.cfg, num_layers=num_layers)
    with torch.device("meta"):
        drafter = Decoder(cfg)
    drafter.embed_tokens = target.embed_tokens
    drafter.layers = nn.ModuleList(target.layers[:num_layers])
    drafter.norm = target.norm
    drafter.lm_head = target.lm_head
    drafter.rope_cos, drafter.rope_sin = target.rope_cos, target.rope_sin
    return drafter.eval()


def check_compatible(target: Decoder, drafter: Decoder) -> None:
    """A drafter must speak the target's vocabulary (same ids, same size)."""
    if drafter.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"drafter vocabulary ({drafter.cfg.vocab_size} tokens) does not match the target's "
                         f"({target.cfg.vocab_size}); a drafter must use the target's tokenizer")
