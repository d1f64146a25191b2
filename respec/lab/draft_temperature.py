"""The head's draft temperature under the match rule: how often the head, drafting with the target's
own noise, proposes the target's own sample, for its distribution sharpened or flattened.

    python -m respec.lab.draft_temperature [--taus 0.5,0.7,0.85,1,1.2] [--prompts 32] [--draws 8]

Under the match rule (respec/speculative.py) any draft distribution is exact: the row emits plain
decoding's tokens whatever the head proposes. So q may be the head's distribution at another
temperature tau, logits / tau, if that makes its coupled draw agree with the target's more often.
The head is distilled with KL(p || q), which spreads q over p's support; a sharper q could agree
more. Measured on the default head (the cached one for the task and length, pretrained if missing)
at the first draft position of rollouts the target samples at T = 1 on held-out prompts: the
coupled agreement (`kd_loss.coupled_agreement`, the engine's own two-level sampler, `--draws` noise
draws per position, fp32) and, for reference, 1 - TV(p, q_tau) (what rejection sampling would
accept); then in the engine as a rollout meets it (bf16, k = 3, the match rule, to each
completion's EOS): tokens per verify and the share of rows accepting each draft position.
Nothing is timed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from respec.cli import OneLineParser, positive_int


def measure(taus: list[float], prompts: int, draws: int, new_tokens: int, seed: int = 0) -> list[dict]:
    from models.loading import load_model, load_tokenizer
    from respec.config import TrainConfig
    from respec.distill import collate, target_features, ttt_layer
    from respec.drafter_choice import default_head
    from respec.drafter_training import sample_rollouts
    from respec.engine import RolloutEngine
    from respec.kd_loss import accepted_mass, coupled_agreement
    from models.eagle import cast_head, load_eagle
    from respec.drafters.eagle import EagleDrafter
    from respec.engine import SamplingParams
    from respec.tasks import chat_prompt

    cfg = TrainConfig()
    tok = load_tokenizer(cfg.model)
    task = cfg.make_task(seed=seed)
    target = load_model(cfg.model, dtype="fp32", device="cpu").requires_grad_(False)  # fp32: no rounding in q or p
    head_dir = default_head(cfg.model, cfg.task, task, tok, task_config=cfg.task_config,
                            max_new_tokens=cfg.max_new_tokens, seed=seed, temperature=1.0)
    head = load_eagle(head_dir, dtype=torch.float32)
    problems = task.problems(2 * 10**6, prompts)  # far from pretraining's and any run's problems
    ids = [chat_prompt(tok, p.messages()) for p in problems]
    engine = RolloutEngine(target, kv_cache_bytes=1 << 30, max_batch=64, eos_token_ids=[tok.eos_token_id], eager=True)
    seqs = sample_rollouts(engine, ids, new_tokens, 1.0, seed + 7)
    feats = target_features(target, seqs, head.cfg.feature_layers, temperature=1.0)
    tokens, taps, final, mask, _ = collate(seqs, feats, list(range(len(seqs.tokens))))
    with torch.no_grad():
        shifted = torch.cat([taps.new_zeros(taps.shape[0], 1, taps.shape[-1]), taps[:, :-1]], dim=1)
        out = next(iter(ttt_layer(head, head.project(shifted), tokens, target.embed_tokens, 1)))
        logits = head.draft_logits(out[mask])  # (R, N) the first draft's logits at every distilled position
        logp = (final[mask] @ target.lm_head.weight.T).log_softmax(-1)  # (R, V) at T = 1
        rows = logp.shape[0]
        positions = torch.arange(rows, dtype=torch.int64)
        results = []
        for tau in taus:
            q_small = (logits / tau).log_softmax(-1)
            logq = torch.full_like(logp, float("-inf")).index_copy(-1, head.d2t, q_small)
            agree = torch.stack([coupled_agreement(logp, logq, torch.full((rows,), 1000 * d + seed), positions)
                                 for d in range(draws)]).mean().item()
            one_minus_tv = accepted_mass(logp.exp(), logq.exp()).mean().item()
            results.append({"tau": tau, "coupled_agreement": round(agree, 4), "one_minus_tv": round(one_minus_tv, 4),
                            "positions": rows})
    rollout = load_model(cfg.model, dtype="auto", device="cpu").requires_grad_(False)
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed + 11 + i) for i in range(len(ids))]
    for r in results:
        sd = RolloutEngine(rollout, kv_cache_bytes=1 << 30, max_batch=64, eos_token_ids=[tok.eos_token_id], eager=True,
                           drafter=EagleDrafter(cast_head(head, rollout.embed_tokens.weight.dtype), r["tau"]),
                           num_draft_tokens=3)
        sd.generate(ids, params)
        r["engine_accept_len"] = round(sd.stats.accept_len, 3)
        r["engine_accept_per_pos"] = [round(a, 3) for a in sd.stats.accept_per_pos]
    return results


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m respec.lab.draft_temperature", description=__doc__.split("\n\n")[0])
    p.add_argument("--taus", default="0.5,0.7,0.85,1,1.2", help="draft temperatures (default %(default)s)")
    p.add_argument("--prompts", type=positive_int, default=32, help="held-out prompts (default %(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="rollout length (default %(default)s)")
    p.add_argument("--draws", type=positive_int, default=8, help="noise draws per position (default %(default)s)")
    p.add_argument("--json", type=Path, help="write the results here (never overwritten)")
    args = p.parse_args(argv)
    try:
        taus = [float(t) for t in args.taus.split(",") if t.strip()]
    except ValueError:
        return p.fail(f"--taus must be comma-separated numbers, got {args.taus!r}")
    if not taus or min(taus) <= 0:
        return p.fail(f"--taus must be positive, got {args.taus!r}")
    if args.json is not None and args.json.exists():
        return p.fail(f"{args.json} exists; refusing to overwrite it")
    results = measure(taus, args.prompts, args.draws, args.new_tokens)
    print("| draft temperature | coupled agreement, first draft (fp32) | 1 - TV | positions | engine: tokens per verify "
          "(k = 3, bf16) | engine: accepted at positions 1, 2, 3 |")
    print("|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['tau']:g} | {r['coupled_agreement']:.3f} | {r['one_minus_tv']:.3f} | {r['positions']} | "
              f"{r['engine_accept_len']:.3f} | {', '.join(f'{a:.3f}' for a in r['engine_accept_per_pos'])} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
