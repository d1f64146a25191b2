"""How often rounding flips a sampled token: the same requests with the same seeds, decoded along
paths that are equal in exact arithmetic.

    python -m respec.lab.flips --requests 32 --json flips.json
    python -m respec.lab.flips --model tiny --requests 4 --max-new-tokens 8     # a smoke run

Under the match rule (respec/speculative.py) SD emits plain decoding's tokens in exact arithmetic;
in bf16 a forward of another shape rounds the logits slightly differently, and where two tokens are
nearly tied under the row's noise the other one wins. From there the row's text differs. Each path
is compared with plain decoding at batch `--batch` (one token wide):

* `batch 1`: every request decoded alone (the batch bucket changes the products' shapes);
* `verify 17 wide`: SD whose drafter replays plain decoding's own completion (`replay_k` 16), so
  every token up to a flip comes from a (replay_k + 1)-wide verify forward;
* `recompute`: a KV pool too small for the batch, so rows are preempted and their text recomputed
  by a prefill forward (many tokens wide) before they decode on.

Per path: rows whose tokens differ, and flips per 1,000 tokens (the first differing token of each
row, over the tokens compared up to it: after a flip a row's text is another text). And the
probabilities themselves (ReSpec's R1, at a fixed policy): the mean and largest |log-prob|
difference to plain decoding on the tokens both emitted (before a row's flip), and each path's
mismatch to the trainer's forward over its own completions (respec/mismatch.py: `mismatch_kl`,
`mismatch_logratio_mean`, ...; the fp32 master weights under the trainer's autocast, `--train-dtype`).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from respec.cli import OneLineParser, positive_int


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(reference: list, other: list) -> dict:
    """Rows that differ, flips per 1,000 tokens compared (up to each row's first difference), and
    the log-prob gap to the reference on the tokens both emitted (before the first difference).
    `reference`, `other`: the engine's Completions of the same requests."""
    flips, tokens, gaps = 0, 0, []
    for a, b in zip(reference, other):
        at = first_difference(a.token_ids, b.token_ids)
        flips += at is not None
        tokens += len(a.token_ids) if at is None else at + 1
        same = len(a.token_ids) if at is None else at
        gaps += [abs(x - y) for x, y in zip(a.logprobs[:same], b.logprobs[:same])]
    return {"rows_differ": flips, "tokens_compared": tokens, "flips_per_1k_tokens": round(1000 * flips / max(tokens, 1), 3),
            "logprob_gap_mean": round(sum(gaps) / max(len(gaps), 1), 6), "logprob_gap_max": round(max(gaps, default=0.0), 6)}


def to_trainer(master, train_dtype, prompts: list[list[int]], completions, temperature: float) -> dict:
    """The mismatch metrics of `completions` against the trainer's forward of the same tokens."""
    from respec import mismatch
    from respec.grpo import token_logprobs
    from respec.update import completion_values, right_pad

    gap = mismatch.MismatchSums()
    autocast = torch.autocast("cpu", dtype=train_dtype, enabled=train_dtype != torch.float32)
    for i in range(0, len(prompts), 8):
        rows, outs = prompts[i:i + 8], completions[i:i + 8]
        plens = [len(p) for p in rows]
        tokens, mask, _ = right_pad([p + c.token_ids for p, c in zip(rows, outs)], plens, "cpu")
        with torch.no_grad(), autocast:
            train, _ = token_logprobs(master, tokens, mask, temperature=temperature)
        gap.add(train, completion_values([c.logprobs for c in outs], plens, mask, torch.float32), mask,
                completion_values([c.verified for c in outs], plens, mask, torch.bool), tokens)
    m = mismatch.metrics(gap.sums, gap.maxima)
    return {k: m[k] for k in ("mismatch_kl", "mismatch_logratio_mean", "mismatch_logratio_max", "mismatch_ratio_out_frac")}



def main(argv=None) -> int:
    p = OneLineParser(prog="python -m respec.lab.flips", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="(default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="(default auto)")
    p.add_argument("--requests", type=positive_int, default=32, help="(default %(default)s)")
    p.add_argument("--batch", type=positive_int, default=16, help="the reference's batch (default %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default %(default)s)")
    p.add_argument("--replay-k", type=positive_int, default=16, help="(default %(default)s)")
    p.add_argument("--train-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="the trainer's autocast, for the mismatch to its forward (default auto)")
    p.add_argument("--json", type=Path, help="write the results here (never overwritten)")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        return p.fail(f"{args.json} exists; refusing to overwrite it")

    from models.loading import load_model, load_tokenizer, resolve_dtype
    from respec.drafters.replay import ReplayDrafter
    from respec.engine import RolloutEngine, SamplingParams
    from respec.solver import FixedK
    from respec.tasks import DEFAULT_TASK, chat_prompt, make_problems

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model = load_model(args.model, dtype=dtype)
    tok = load_tokenizer(args.model)
    problems = make_problems(DEFAULT_TASK if args.model != "tiny" else "toy-letters", args.requests, seed=7)
    prompts = [chat_prompt(tok, pr.messages()) for pr in problems]
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=1000 + i)
              for i in range(args.requests)]
    eos = [tok.eos_token_id]

    def engine(**kw) -> RolloutEngine:
        return RolloutEngine(model, kv_cache_bytes=kw.pop("kv", 512 << 20), eos_token_ids=eos, eager=True, **kw)

    master = load_model(args.model, dtype=torch.float32)  # the trainer's weights
    train_dtype = resolve_dtype(args.train_dtype, torch.device("cpu"))

    def tokens(e, **kw) -> list:
        return e.generate(prompts, params, **kw)

    def path(out: list, reference: list) -> dict:
        return {**compare(reference, out), **to_trainer(master, train_dtype, prompts, out, args.temperature)}

    reference = tokens(engine(max_batch=args.batch))
    rows = {f"plain, batch {args.batch}": to_trainer(master, train_dtype, prompts, reference, args.temperature),
            "batch 1": path(tokens(engine(max_batch=1)), reference)}
    sd = engine(max_batch=args.batch, drafter=ReplayDrafter(), num_draft_tokens=1, replay_k=args.replay_k,
                policy=FixedK(1))
    rows[f"verify {args.replay_k + 1} wide"] = {
        **path(tokens(sd, replays=[c.token_ids for c in reference]), reference),
        "accept_len": round(sd.stats.accept_len, 2)}
    probe = engine(max_batch=args.batch)  # a pool that admits a batch's prompts, not their completions
    blocks = sum(probe.blocks.blocks_for(len(p) + 2) for p in prompts[:args.batch]) + 2
    longest = probe.blocks.blocks_for(max(len(p) for p in prompts) + args.max_new_tokens + 1) + 1
    small = engine(max_batch=args.batch, kv=max(blocks, longest) * probe.cache.bytes_per_block)
    rows["recompute"] = {**path(tokens(small), reference), "preemptions": small.stats.preemptions}
    report = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "temperature": args.temperature,
              "train_dtype": str(train_dtype).removeprefix("torch."), "requests": args.requests,
              "reference_batch": args.batch, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "tokens": sum(len(c.token_ids) for c in reference), "paths": rows}
    print(json.dumps(report, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
