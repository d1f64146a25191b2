"""Our decoder against transformers' on the same weights, and checkpoint round trips."""

import pytest
import torch

from models.loading import load_model


@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen3", "llama3"])
def test_tiny_logits_match_transformers(tiny_pair, name):
    ours, hf, _ = tiny_pair[name]
    assert ours.cfg.qkv_bias == (name == "qwen2")
    assert type(hf).__name__ == {"qwen2": "Qwen2", "qwen3": "Qwen3"}.get(name, "Llama") + "ForCausalLM"
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.logits(ours(ids))
        theirs = hf(ids).logits.float()
    diff = (mine - theirs).abs().max().item()
    print(f"tiny {name}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_qk_norm_and_llama3_rope_change_the_logits(tiny_pair):
    """The two features the qwen3 / llama3 pairs check are not no-ops on these weights: without them
    the same weights give other logits (so the matches above have power)."""
    import dataclasses

    from models.decoder import Decoder

    ids = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(0))
    for name, change in (("qwen3", {"qk_norm": False}), ("llama3", {"rope_llama3": None})):
        ours = tiny_pair[name][0]
        plain = Decoder(dataclasses.replace(ours.cfg, **change))
        plain.load_state_dict(ours.state_dict(), strict=False)  # (qwen3: the q/k norms are left out)
        with torch.no_grad():
            diff = (ours.logits(ours(ids)) - plain.logits(plain(ids))).abs().max().item()
        assert diff > 1e-3, (name, diff)  # ten times the matches' tolerance (1e-4)


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        mine = smollm2.logits(smollm2(ids))
        theirs = smollm2_hf(ids).logits.float()
    diff = (mine - theirs).abs().max().item()
    print(f"SmolLM2-135M fp32: max |logit diff| = {diff:.2e} (logits span {theirs.abs().max():.1f})")
    assert diff <= 1e-3
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


def test_checkpoint_round_trip(tiny_pair):
    ours, _, path = tiny_pair["llama"]
    again = load_model(str(path), dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_load_into_bf16_keeps_weights(tiny_pair):
    ours, _, path = tiny_pair["qwen2"]
    again = load_model(str(path), dtype="bf16")
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(again.embed_tokens.weight, ours.embed_tokens.weight.bfloat16())


@pytest.mark.parametrize("preset", ["random-smollm2-135m", "random-qwen2.5-0.5b", "random-qwen2.5-1.5b"])
def test_real_shape_presets_match_transformers(tmp_path, preset):
    """The random-weight presets the GPU check measures have the real models' shapes (cut to two
    layers here) and transformers reads them as the same model."""
    import dataclasses

    from models.decoder import PRESETS
    from models.loading import random_model, save_hf_checkpoint
    from tests.conftest import hf_from_dir

    ours = random_model(dataclasses.replace(PRESETS[preset], num_layers=2), seed=2)
    save_hf_checkpoint(ours, tmp_path / preset)
    hf = hf_from_dir(tmp_path / preset)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.logits(ours(ids)) - hf(ids).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff


def test_model_by_hub_id_from_a_fake_local_cache(tiny_pair, tmp_path, monkeypatch):
    """`--model owner/name` reads the snapshot from the local Hugging Face cache, offline; an id
    that is not there is one clear error."""
    import shutil

    import huggingface_hub.constants as hub

    from models.loading import ModelLoadError

    ours, _, path = tiny_pair["qwen3"]
    repo = tmp_path / "models--acme--tiny-qwen3"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(path, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    again = load_model("acme/tiny-qwen3", dtype=torch.float32)
    assert again.cfg.qk_norm
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with pytest.raises(ModelLoadError, match="no Hugging Face model of that id in the local cache"):
        load_model("acme/not-there")


def test_preset_tokenizer_in_the_repository_equals_the_ggufs(tokenizer, monkeypatch):
    """The random-weight presets' tokenizer travels with the repository (models/tokenizers/smollm2,
    for machines without the GGUF package): the same ids, special tokens and chat template as the
    tokenizer transformers reads from SmolLM2's GGUF."""
    from models.loading import TOKENIZER_ENV, load_tokenizer

    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    ours = load_tokenizer("random-smollm2-135m")
    texts = ["Calculate 5 - 3.", "  Ünïcödé, tabs\tand\nnewlines; 12345 + 678 = ?", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(ours) == len(tokenizer) == 49152
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    chat = [{"role": "user", "content": "What is 7 + 5?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
