"""Shared fixtures: the tiny random model, SmolLM2 in fp32, and Hugging Face twins of both."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.decoder import PRESETS  # noqa: E402
from models.loading import load_model, load_tokenizer, random_model, resolve_checkpoint, save_hf_checkpoint  # noqa: E402

TINY_LLAMA = dataclasses.replace(PRESETS["tiny"], qkv_bias=False, tie_word_embeddings=False, vocab_size=512,
                                 rope_theta=50000.0)
TINY_QWEN2 = dataclasses.replace(PRESETS["tiny"], vocab_size=512)


def hf_from_dir(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny", dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf():
    return hf_from_dir(resolve_checkpoint("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """{name: (our model, transformers' model)} on the same random weights."""
    pairs = {}
    for name, cfg in (("qwen2", TINY_QWEN2), ("llama", TINY_LLAMA)):
        ours = random_model(cfg, seed=1)
        path = tmp_path_factory.mktemp("hf") / name
        save_hf_checkpoint(ours, path)
        pairs[name] = (ours, hf_from_dir(path), path)
    return pairs
