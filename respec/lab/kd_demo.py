"""Reward-weighted KD on a toy batch, to see what w(r) does (respec/kd_loss.py,
respec/online_learner.py): the tiny random model, under a minute on a CPU."""

from __future__ import annotations

import torch

from respec.distill import Sequences, collate, head_loss, target_features
from respec.config import KDConfig
from respec.online_learner import OnlineLearner


def demo(steps: int = 6) -> dict:
    """`python -m respec.lab.kd_demo`: reward-weighted KD on a toy batch (the tiny random model,
    under a minute on a CPU). Eight completions, four of them "rewarded"; an untrained head is
    distilled with uniform and with reward weights, and its KL to the target is then measured on
    the rewarded and the unrewarded completions separately. Returns those KLs per weighting."""
    from models.loading import load_model
    from respec.drafter_training import untrained_head
    from respec.engine import RolloutEngine, SamplingParams
    from respec.kd_loss import sequence_weights

    target = load_model("tiny", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, target.cfg.vocab_size, (10,), generator=g).tolist() for _ in range(8)]
    outs = RolloutEngine(target, kv_cache_bytes=8 << 20, eager=True).generate(
        prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    seqs, plens = [p + o.token_ids for p, o in zip(prompts, outs)], [len(p) for p in prompts]
    rewards = torch.tensor([1.0, 0.0] * 4)  # completions 0, 2, 4, 6 "solved the task"
    kls = {}
    print(f"8 completions of 16 tokens from the tiny model, rewards {rewards.tolist()}")
    for kind in ("kd", "rkd"):
        weights = sequence_weights(kind, rewards)
        head = untrained_head(target, seqs, seed=0, draft_vocab=512)  # the completions' tokens first
        # T = 0.1: the random model's T = 1 distribution is nearly uniform over 49k tokens
        learner = OnlineLearner(head, KDConfig(weighting=kind, lr=3e-3, batch=8, temperature=0.1, async_update=False), k=3)
        print(f"\n{kind} weights w(r) = {[round(w, 2) for w in weights.tolist()]}")
        for step in range(steps):
            learner.submit(target, seqs, plens, weights, step)
            stats = learner.collect().stats
            print(f"  update {step + 1}: weighted KL {stats['kd_loss']:.3f}, estimated alpha_1 {stats['alpha_est'][0]:.3f}")
        for name, idx in (("rewarded", [0, 2, 4, 6]), ("unrewarded", [1, 3, 5, 7])):  # KL per subset, unweighted
            feats = target_features(target, Sequences([seqs[i] for i in idx], [plens[i] for i in idx]),
                                    learner.head.cfg.feature_layers)
            batch = collate(Sequences([seqs[i] for i in idx], [plens[i] for i in idx]), feats, list(range(4)))[:4]
            with torch.no_grad():
                _, per_step = head_loss(learner.head, target, batch, 1, temperature=0.1)
            kls[kind, name] = per_step[0]["kl"]
            print(f"  KL(p || q) on the {name} completions after training: {per_step[0]['kl']:.3f}")
    return kls


if __name__ == "__main__":
    demo()
