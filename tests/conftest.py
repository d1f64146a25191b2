"""Shared fixtures: the tiny random model, SmolLM2 in fp32, and Hugging Face twins of both."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compile.policy import use_persistent_cache  # noqa: E402
from models.decoder import PRESETS  # noqa: E402
from models.loading import load_model, load_tokenizer, random_model, resolve_checkpoint, save_hf_checkpoint  # noqa: E402

# Every compile of the suite (transformers' included) in respec's cache, one directory per CPU ISA,
# before anything touches inductor's default /tmp/torchinductor_<user> (see use_persistent_cache).
use_persistent_cache()

# Under pytest-xdist (the README runs the suite as `-n 2`) each worker gets its share of the cores,
# and the train.py and torchrun processes a test starts inherit it: two workers each spinning
# OpenMP threads on every core ran a part of the suite 2.1x slower than one process did, two with
# one thread each 18% faster (2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    THREADS = max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

TINY_LLAMA = dataclasses.replace(PRESETS["tiny"], qkv_bias=False, tie_word_embeddings=False, vocab_size=512,
                                 rope_theta=50000.0)
TINY_QWEN2 = dataclasses.replace(PRESETS["tiny"], vocab_size=512)
TINY_QWEN3 = dataclasses.replace(PRESETS["tiny"], vocab_size=512, qkv_bias=False, qk_norm=True)
# Llama 3.x RoPE scaling with an "original context" of 64 positions, so that the tiny model's eight
# rotation frequencies fall in all three bands (kept, blended, slowed down)
TINY_LLAMA3 = dataclasses.replace(TINY_LLAMA, rope_llama3={"factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64})


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
    """{name: (our model, transformers' model, checkpoint dir)} on the same random weights (the
    norms' too: a swapped q_norm / k_norm must show)."""
    pairs = {}
    for name, cfg in (("qwen2", TINY_QWEN2), ("llama", TINY_LLAMA), ("qwen3", TINY_QWEN3), ("llama3", TINY_LLAMA3)):
        ours = random_model(cfg, seed=1)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        path = tmp_path_factory.mktemp("hf") / name
        save_hf_checkpoint(ours, path)
        pairs[name] = (ours, hf_from_dir(path), path)
    return pairs
