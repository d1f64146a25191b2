"""LoRA on the actor (respec/lora.py): only the adapters train, the rollout copy and the export are
the merged weights, and a resumed LoRA run is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.loading import load_model
from respec.distributed import RolloutCopy
from respec.lora import LoraSettings, apply_lora, scalings

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--model", "tiny", "--task", "toy-letters", "--prompts", "4", "--group", "8", "--max-new-tokens", "8",
       "--temperature", "0.05", "--lr", "1e-2", "--sd", "off", "--eager", "--no-progress", "--warmup-steps", "0",
       "--min-lr-ratio", "1", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
       "--lora-target-modules", "q_proj,v_proj,o_proj", "--lora-target-modules", "gate_proj"]


def test_target_names_map_to_the_fused_layers():
    assert LoraSettings(8, targets=("q_proj", "v_proj")).modules() == ["qkv_proj"]
    assert LoraSettings(8, targets=("up_proj", "o_proj", "k_proj")).modules() == ["qkv_proj", "o_proj", "gate_up_proj"]
    assert LoraSettings(8, targets=("all-linear",)).modules() == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(ValueError, match="--lora-target-modules lm_head: choose from"):
        LoraSettings(8, targets=("lm_head",)).modules()


def test_only_adapters_train_and_the_rollout_copy_is_the_merged_actor():
    actor = load_model("tiny", dtype=torch.float32)
    base = {n: t.clone() for n, t in actor.state_dict().items()}
    apply_lora(actor, LoraSettings(4, alpha=8, dropout=0.0, targets=("all-linear",)))
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    tokens = torch.randint(0, actor.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    copy = RolloutCopy(actor, dtype=torch.float32, sharded=False)
    assert copy.model is not actor  # never shared: the rollout reads merged weights
    # B starts at zero: the adapted model is the base model
    torch.testing.assert_close(copy.model.logits(copy.model(tokens)), actor.logits(actor(tokens)), rtol=0, atol=0)
    # an update: SGD on the adapters only
    actor.logits(actor(tokens)).logsumexp(-1).mean().backward()
    with torch.no_grad():
        for p in actor.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    copy.release()  # (as the trainer does while the actor trains: the merged weights are made again)
    copy.sync()
    with torch.no_grad():
        want = actor.logits(actor(tokens))
        got = copy.model.logits(copy.model(tokens))
    assert not torch.allclose(want, copy_base_logits(base, actor, tokens), atol=1e-4)  # the adapters moved it
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the merge by hand for one layer, against the copy
    layer = "layers.1.mlp.down_proj"
    mod = actor.get_submodule(layer)
    by_hand = base[f"{layer}.weight"] + 2.0 * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
    torch.testing.assert_close(copy.model.get_submodule(layer).weight, by_hand)
    assert scalings(actor)[layer] == 2.0


def copy_base_logits(base, actor, tokens):
    plain = load_model("tiny", dtype=torch.float32)
    plain.load_state_dict(base)
    with torch.no_grad():
        return plain.logits(plain(tokens))


def train(*args):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_lora_run_resumes_exactly_and_exports_the_merged_actor(tmp_path, tokenizer):
    """3 steps straight, against 2 steps then a resume to 3: the same metrics; the exported
    checkpoint loads in transformers and gives the merged actor's logits; the reward rose."""
    from transformers import AutoModelForCausalLM

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*TOY, "--steps", "3", "--out", str(straight))
    train(*TOY, "--steps", "2", "--out", str(resumed))
    train("--resume", str(resumed), "--steps", "3")
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("step", "reward_mean", "loss", "grad_norm", "entropy", "response_len_mean")
    assert [{k: r[k] for k in keys} for r in rows(straight)] == [{k: r[k] for k in keys} for r in rows(resumed)]

    hf = AutoModelForCausalLM.from_pretrained(straight / "hf", dtype=torch.float32).eval()
    ours = load_model(str(straight / "hf"), dtype=torch.float32)
    base = load_model("tiny", dtype=torch.float32)
    tokens = torch.randint(0, base.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours.logits(ours(tokens))
        before = base.logits(base(tokens))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - before).abs().max() > 1e-3  # the adapters were trained and merged into the export
    touched = {n for n, p in ours.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert touched and all(n.split(".")[-2] in ("qkv_proj", "o_proj", "gate_up_proj") for n in touched), touched


def test_lora_two_ranks_equal_one_process(tmp_path):
    """FSDP2 shards the adapters with the frozen base: two ranks take the same steps as one process
    (the merged rollout copy gathered from the shards), also with the KL to a reference model that is
    sharded too."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TOY, "--steps", "2", "--train-dtype", "fp32", "--kl-coef", "0.05"]  # (bf16 gradients differ by rounding)
    train(*args, "--out", str(one))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(ROOT / "train.py"), *args, "--out", str(two)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows(one), rows(two)):
        assert (a["step"], a["reward_mean"], a["response_len_mean"]) == (b["step"], b["reward_mean"], b["response_len_mean"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-9)
    assert rows(one)[-1]["kl"] > 0  # the actor moved away from the reference


def test_train_memory_tool_smoke():
    """`python -m respec.lab.train_memory` on the tiny model: four variants, LoRA trains a small
    fraction of the weights, every figure present."""
    out = subprocess.run([sys.executable, "-m", "respec.lab.train_memory", "--model", "tiny", "--batch", "2",
                          "--prompt-len", "8", "--completion-len", "8", "--reps", "1"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert set(res) == {"full", "full+ckpt", "lora16", "lora16+ckpt"}
    assert res["lora16"]["trained_params"] < 0.05 * res["full"]["trained_params"]
    assert all(r["step_s"] > 0 and r["rss_peak_mb"] >= r["rss_before_mb"] for r in res.values())


LOAD_SHARDED = """
import json, os, sys, torch
from models.loading import load_model
from respec import distributed
from respec.lora import LoraSettings, apply_lora

d = distributed.init()
out = sys.argv[1]
def load():
    open(os.path.join(out, f"loaded-{d.rank}"), "w").close()
    torch.manual_seed(d.rank)  # the adapters' random init differs per rank: rank 0's must win
    return load_model("tiny", dtype=torch.float32).requires_grad_(True)
model = distributed.load_sharded(load, d, param_dtype=torch.float32, shard=True,
                                 prepare=lambda m: apply_lora(m, LoraSettings(4, targets=("all-linear",))))
full = {n: distributed.full_tensor(p.detach()) for n, p in model.named_parameters()}
trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
if d.rank == 0:
    torch.save({"full": full, "trainable": trainable}, os.path.join(out, "rank0.pt"))
distributed.shutdown()
"""


def test_only_the_main_rank_loads_the_whole_model(tmp_path):
    """`distributed.load_sharded` on two ranks: only rank 0 calls the loader; the sharded model
    gathers back to rank 0's weights (the base and the adapters' initial values), and only the
    adapters require gradients."""
    script = tmp_path / "load_sharded.py"
    script.write_text(LOAD_SHARDED)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("loaded-*")) == ["loaded-0"]
    got = torch.load(tmp_path / "rank0.pt")
    torch.manual_seed(0)
    want = load_model("tiny", dtype=torch.float32)
    apply_lora(want, LoraSettings(4, targets=("all-linear",)))
    for name, p in want.named_parameters():
        torch.testing.assert_close(got["full"][name], p.detach(), rtol=0, atol=0)
    assert got["trainable"] and all(".lora_" in n for n in got["trainable"])
