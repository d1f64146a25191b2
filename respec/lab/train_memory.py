"""`python -m respec.lab.train_memory`: peak memory and time of one training step of the actor (the
GRPO update's forward, backward and AdamW step on a fixed batch), full fine-tuning against LoRA,
each with and without activation checkpointing.

Each variant runs in a fresh process (peak memory is per process): the model is loaded, one step
warms up (and allocates the gradients and AdamW's state), then `--reps` steps are timed while a
thread samples the process's resident memory every 2 ms. Reported per variant: the resident memory
before the timed steps (weights, gradients, optimizer state; after handing freed memory back to the OS), its peak during them, the difference
(what the step itself needs on top: activations and temporaries), and seconds per step.

    python -m respec.lab.train_memory --model smollm2-135m --batch 8 --prompt-len 64 --completion-len 192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from respec.host_memory import release_free_memory, rss_bytes

VARIANTS = {"full": [], "full+ckpt": ["--ckpt"], "lora16": ["--lora-r", "16"],
            "lora16+ckpt": ["--lora-r", "16", "--ckpt"]}


def one(args) -> dict:
    """One variant, in this process."""
    import torch

    from models.decoder import checkpointed_block
    from models.loading import load_model, resolve_dtype
    from respec.grpo import token_logprobs
    from respec.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    actor = load_model(args.model, dtype=torch.float32)
    actor.requires_grad_(True)
    if args.lora_r:
        apply_lora(actor, LoraSettings(args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0, targets=("all-linear",)))
    params = [p for p in actor.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    dtype = resolve_dtype(args.train_dtype, "cpu")
    T = args.prompt_len + args.completion_len
    tokens = torch.randint(0, actor.cfg.vocab_size, (args.batch, T), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, args.prompt_len:] = True
    run_block = checkpointed_block if args.ckpt else None

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logp, _ = token_logprobs(actor, tokens, mask, run_block=run_block)
        loss = -(logp.sum() / mask.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated, as in training
        return float(loss)

    step()  # warm-up: gradients and AdamW's state exist from here on
    release_free_memory(full=True)  # before the timed steps: what is live, not what loading left free
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        step()
    seconds = (time.perf_counter() - t0) / args.reps
    done.set()
    watcher.join()
    trained = sum(p.numel() for p in params)
    return {"trained_params": trained, "rss_before_mb": round(before / 2**20), "rss_peak_mb": round(peak[0] / 2**20),
            "step_extra_mb": round((peak[0] - before) / 2**20), "step_s": round(seconds, 2),
            "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch.")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=192)
    p.add_argument("--reps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--train-dtype", default="auto", help="the training forward's autocast dtype (as train.py's)")
    p.add_argument("--lora-r", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one variant here
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    shared = ["--model", args.model, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
              "--completion-len", str(args.completion_len), "--reps", str(args.reps), "--train-dtype", args.train_dtype]
    results = {}
    for name, extra in VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "respec.lab.train_memory", "--one", *shared, *extra],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:12s} {json.dumps(results[name])}", flush=True)
    print(json.dumps({"settings": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
