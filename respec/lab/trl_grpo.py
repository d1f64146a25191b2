"""TRL's GRPOTrainer on respec's GRPO setting, for a step time side by side (the GPU check's part c).

    python -m respec.lab.trl_grpo --model smollm2-135m --task arithmetic --prompts 1 --group 16 \\
        --max-new-tokens 512 --train-size 4 --task-config '{"min_terms":3,"max_terms":3}' --steps 4 --json trl.json

The same model (respec's, written as a Hugging Face checkpoint), the same prompts (the task's
problems as respec's chat messages, system prompt included), group size, completion length,
temperature, learning rate and KL coefficient as `train.py` with these options, one optimizer step
per batch of `--prompts` x `--group` completions, as respec takes. The reward is the task's score
of the extracted answer (respec adds a format reward; its cost is nothing beside a rollout).
TRL generates with transformers' `generate` (no vLLM here). Reported: each step's wall time (a
callback around the step: generation, scoring and the update), and the reward per step.

trl is not one of respec's requirements: without it this prints one line and exits 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from respec import storage


def main(argv=None) -> int:
    from respec.config import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m respec.lab.trl_grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--task-config", type=json.loads, default={})
    p.add_argument("--prompts", type=int, default=defaults.prompts)
    p.add_argument("--group", type=int, default=defaults.group)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--train-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl_grpo: trl is not installed (pip install trl; it is not one of respec's requirements)",
              file=sys.stderr)
        return 3
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models.loading import load_model, load_tokenizer, save_hf_checkpoint
    from respec.tasks import make_task

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    task = make_task(task=args.task, config=args.task_config, seed=args.seed, train_size=args.train_size)
    problems = task.problems(0, args.train_size or args.prompts * args.steps)
    data = Dataset.from_list([{"prompt": pr.messages(), "index": i} for i, pr in enumerate(problems)])

    def task_score(completions, index, **_):
        return [problems[i].score(c[0]["content"] if isinstance(c, list) else c) for c, i in zip(completions, index)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(args.model)
        model_dir = Path(tmp) / "model"
        save_hf_checkpoint(load_model(args.model, dtype=torch.float32, seed=args.seed), model_dir, tokenizer)
        batch = args.prompts * args.group
        config = GRPOConfig(
            output_dir=str(Path(tmp) / "out"), num_generations=args.group, per_device_train_batch_size=batch,
            generation_batch_size=batch, gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens,
            temperature=defaults.temperature, learning_rate=defaults.lr, beta=defaults.kl_coef, max_steps=args.steps,
            lr_scheduler_type="constant", gradient_checkpointing=False, logging_steps=1, save_strategy="no",
            report_to="none", seed=args.seed, bf16=cuda, use_cpu=not cuda, disable_tqdm=True)
        timer = StepTimes()
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[task_score], args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    rewards = [round(h["reward"], 4) for h in trainer.state.log_history if "reward" in h]
    later = timer.seconds[1:] or timer.seconds
    report = {"trl": trl.__version__, "model": args.model, "device": "cuda" if cuda else "cpu", "steps": len(timer.seconds),
              "step_s": [round(s, 3) for s in timer.seconds], "step_s_mean": round(sum(later) / len(later), 3),
              "reward": rewards, "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(report))
    if args.json is not None:
        storage.write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
