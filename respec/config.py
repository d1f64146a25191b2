"""A GRPO run's settings: `TrainConfig`, from which train.py's options are generated
(respec/cli.py), and the narrow configs each part reads, derived from it: `kd()` for the
drafter's online distillation (`KDConfig`), `update()` for the policy update (`UpdateConfig`),
`sampling(seed)` and `eval_sampling()` for the rollouts and the evaluation, `lora()` for LoRA.

A leaf of the package as far as it can be: it imports the vocabularies the options choose from,
never the engine, the drafters, the solver or the metrics. The checks that need them (a drafter
spec, a tracker) run where the run is set up (train.py `check_parts`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from compile.policy import COMPILE_MODES
from respec import grpo
from respec.cli import Needs, option
from respec.data import DataConfig
from respec.kd_loss import WEIGHTINGS
from respec.lora import LoraSettings
from respec.paged_attention import ATTENTION_KINDS
from respec.rollout_seeds import SEED_MODES
from respec.sampling import SamplingParams
from respec.speculative import DRAFT_TEMPERATURE, VERIFY_RULES
from respec.tasks import PromptFormat


@dataclass
class KDConfig:
    """The drafter's online distillation (respec/online_learner.py): its own settings, and the
    run's that it must agree with. The defaults here are the options' (`--drafter-*`)."""

    weighting: str = "rkd"  # w(r): kd (uniform) | rkd (reward-weighted) | akd (advantage), respec/kd_loss.py
    lr: float = 1e-3  # AdamW learning rate of the head (constant after the warm-up)
    # drafter optimizer steps of linear LR warm-up: Adam's first steps move every weight by ~lr,
    # which knocked a pretrained head's acceptance down before it (docs/benchmarks.md)
    warmup: int = 10
    batch: int = 8  # sequences per drafter optimizer step, over all ranks
    epochs: int = 1  # passes over the buffer per update
    interval: int = 1  # RL steps between drafter updates (the buffer holds that many steps)
    idle_interval: int = 4  # RL steps between distillations while the rollouts do not speculate (`due`)
    unroll: int = 3  # training-time-test steps = draft positions the estimate covers (the run's k)
    temperature: float = 1.0  # the rollout's sampling temperature (both distributions use it)
    verify: str = "match"  # the engine's verification rule: what the acceptance estimate estimates (kd_loss.py)
    draft_temperature: float = DRAFT_TEMPERATURE  # the head drafts at temperature * this (the estimate's q)
    grad_clip: float = 1.0
    async_update: bool = True  # the update in a background thread, overlapped with the next rollout
    budget: float = 1.0  # distillation time <= this share of the run's + what SD saved (1: no bound), `due`

    def validate(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown KD weighting {self.weighting!r} (choose {', '.join(WEIGHTINGS)})")
        for name, flag in (("batch", "--drafter-batch"), ("epochs", "--drafter-epochs"),
                           ("interval", "--drafter-update-interval"), ("idle_interval", "--drafter-idle-interval"),
                           ("unroll", "--k")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"--drafter-lr must be positive and --drafter-warmup >= 0, got {self.lr}, {self.warmup}")
        if self.draft_temperature <= 0:
            raise ValueError(f"--draft-temperature must be > 0, got {self.draft_temperature}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"--drafter-budget must be in (0, 1], got {self.budget}")


@dataclass
class UpdateConfig:
    """The policy update's settings (respec/update.py `policy_update`), as the options set them."""

    group: int  # G: samples per prompt (a minibatch holds whole groups)
    epochs: int  # passes over each rollout
    minibatches: int  # optimizer steps per pass
    temperature: float  # the rollout's sampling temperature (the training log-probs use the same)
    max_new_tokens: int  # completion length limit (Dr. GRPO's normaliser)
    loss_type: str  # how per-token losses are averaged (respec/grpo.py)
    importance_sampling_level: str  # the ratio per token, or per sequence (GSPO)
    clip_low: float  # ratio clipped below at 1 - this
    clip_high: float  # ratio clipped above at 1 + this
    kl_coef: float  # k3 KL to the reference model
    is_correction: str  # the rollout/training mismatch's correction (respec/grpo.py)
    is_cap: float  # its cap
    mask_truncated_completions: bool  # completions cut at max_new_tokens leave the loss
    gradient_checkpointing: bool | None  # recompute each block's activations in the backward pass (None: on a CPU)
    grad_clip: float  # max global gradient norm


# what makes options inert (respec/cli.py `refuse_inert`)
NEEDS_LORA = Needs("lora_r", lambda r: r > 0, "--lora-r 0 trains the whole actor")
NEEDS_EVAL = Needs(("eval_every", "eval_at_start"), lambda every, at_start: every > 0 or at_start,
                   "there is no held-out evaluation without --eval-every N or --eval-at-start")
NEEDS_TEMPLATE = Needs("raw_prompts", lambda raw: not raw, "--raw-prompts leaves out the chat template")


@dataclass
class TrainConfig(DataConfig):
    """A GRPO run's settings. train.py's options are generated from these fields (respec/cli.py):
    `--max-new-tokens` (also `--max_new_tokens`, and TRL's `--max_completion_length`) for
    `max_new_tokens`, with the help text, choices and default below; a `--config FILE` holds the
    same names. An option that another's value makes inert says so (`needs`): given, it is refused
    (respec/cli.py `refuse_inert`). generate.py declares the options it shares from these fields."""
    # --- prompts ---
    raw_prompts: bool = option(False, "tokenize each prompt as it is: no chat template and no system turn (TRL's way "
                               "with plain-text prompts)", flag="--raw-prompts")
    chat_template_kwargs: dict = option({}, "extra arguments of the chat template as JSON, e.g. "
                                        "'{\"enable_thinking\": false}' for Qwen3", needs=NEEDS_TEMPLATE)
    # --- rewards ---
    rewards: list = option([], "reward function, repeatable: correctness, format, module:function or file.py:function, "
                           "each with an optional :weight", flag="--reward", aliases=("reward_funcs",),
                           shown="correctness + format at --format-weight")
    format_weight: float = option(0.1, "weight of the format reward (a strict 'Answer:' line) in the default rewards",
                                  needs=Needs("rewards", lambda rewards: not rewards, "--reward replaces the default "
                                              "rewards"))
    # --- GRPO ---
    # (The defaults are the README's default run, sized to finish in ~15 min on 2 CPU cores.)
    steps: int = option(20, "RL steps (one rollout and its updates each)", aliases=("max_steps",))
    prompts: int = option(4, "prompts per step over all ranks (P; when not given, 4 rounded up to a multiple of the "
                          "ranks)")
    group: int = option(4, "samples per prompt (G >= 2)", aliases=("num_generations",))
    max_new_tokens: int = option(64, "completion length limit (tokens)", aliases=("max_completion_length",))
    temperature: float = option(1.0, "sampling temperature (train.py: > 0, the rollout's, which the training log-probs "
                                "use too; generate.py: 0 is greedy)")
    top_p: float = option(1.0, "nucleus sampling mass (1: all; train.py's rollout samples from the filtered "
                          "distribution, its training log-probs are the unfiltered ones)")
    top_k: int = option(0, "sample among the k most likely tokens only (0: all)")
    min_p: float = option(0.0, "sample only tokens at least this fraction as likely as the most likely one (0: all)")
    lr: float = option(3e-5, "peak AdamW learning rate", aliases=("learning_rate",))
    warmup_steps: int = option(2, "optimizer steps of linear LR warm-up, then cosine to lr x --min-lr-ratio")
    min_lr_ratio: float = option(0.1, "cosine floor, as a fraction of --lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "max global gradient norm", aliases=("max_grad_norm",))
    clip_low: float = option(0.2, "ratio clipped below at 1 - this", aliases=("epsilon",))
    clip_high: float = option(0.2, "ratio clipped above at 1 + this", aliases=("epsilon_high",))
    kl_coef: float = option(0.0, "k3 KL to the initial model (0: no reference model)", aliases=("beta",))
    scale_adv_by_std: bool = option(True, "advantages centred only, not divided by the group's std (Dr. GRPO)",
                                    flag="--no-std-scaling")
    epochs: int = option(1, "passes over each rollout", aliases=("num_iterations",))
    minibatches: int = option(1, "optimizer steps per pass")
    loss_type: str = option("dapo", "how per-token losses are averaged (TRL's loss_type): dapo (token mean over the "
                            "global batch), grpo (each sequence's token mean, then the mean over sequences), bnpo "
                            "(token mean over each rank's batch), dr_grpo (token sum / (sequences x max tokens))",
                            choices=grpo.LOSS_TYPES)
    importance_sampling_level: str = option("token", "the ratio pi / pi_old per token, or per sequence (GSPO: the "
                                            "geometric mean of its tokens' ratios)", choices=grpo.IS_LEVELS)
    mask_truncated_completions: bool = option(False, "leave completions cut at --max-new-tokens out of the loss "
                                              "(they still count in their group's advantages)",
                                              flag="--mask-truncated-completions")
    # the rollout's own log-probs against the trainer's (respec/mismatch.py measures the gap every step)
    is_correction: str = option("off", "importance-sampling correction of the rollout/training mismatch: off, "
                                "token_truncate, token_mask, sequence_truncate or sequence_mask (weights pi_old / "
                                "pi_rollout, truncated at --is-cap or masked above it)", choices=grpo.IS_CORRECTIONS,
                                aliases=("vllm_importance_sampling_mode",))
    is_cap: float = option(3.0, "cap of --is-correction", aliases=("vllm_importance_sampling_cap",),
                           needs=Needs("is_correction", lambda c: c != "off", "--is-correction off corrects nothing"))
    # padded tokens per forward/backward; 0 = per device (MICRO_TOKENS): on a CPU small length-sorted
    # microbatches keep padding small and ran faster than one of everything (docs/benchmarks.md); a GPU
    # wants large ones to fill its cores
    micro_tokens: int = option(0, "padded tokens per forward/backward (0: 512 on CPU, 8192 on a GPU)")
    # --- speculative decoding ---
    sd: str = option("adaptive", "speculative decoding: off, on (always --k) or adaptive (the solver picks k per "
                     "decoding step)", choices=("off", "on", "adaptive"))
    drafter: str = option("auto+history", "an EAGLE head directory (train.py --stage drafter), auto (the cached "
                          "default head of --task, pretrained once), random (untrained: a cold start), history "
                          "(model-free suffix matches), first:N (the model's first N layers), none (no speculation), "
                          "replay (last epoch's completion of the same prompt and sample: train.py only, it needs "
                          "earlier epochs), or a model spec joined by '+' with replay and/or history, tried per row "
                          "in that order (auto+replay+history; the default: the head, and history where its match "
                          "is long)")
    pretrain_drafter: str = option("auto", "where --drafter asks for the default head (auto) and the cache lacks it: "
                                   "on (pretrain it first), off (start from an untrained head, distilled online) or "
                                   "auto (pretrain it where the cost model and the pretraining's pilot say it can pay "
                                   "back within the run, else start untrained: respec/drafter_choice.py "
                                   "pretraining_payback)",
                                   choices=("auto", "on", "off"))
    k: int = option(3, "largest draft length: tokens drafted per speculative step (--sd adaptive and generate.py "
                    "--sweep try 0 up to it)")
    replay_k: int = option(16, "most drafts a replay (last epoch's completion, --drafter ...+replay) proposes per "
                           "verify; its rows verify apart from the others")
    verify: str = option("match", "how drafts are verified: match (a draft is kept iff it is the token the model itself "
                         "samples there: the output is plain decoding's, whatever the drafter) or rejection "
                         "(speculative sampling: the same distribution, other tokens)", choices=VERIFY_RULES)
    draft_temperature: float = option(DRAFT_TEMPERATURE, "a head drafts from its distribution at the sampling "
                                      "temperature times this (< 1 sharpens it; exact under either --verify rule, only "
                                      "the acceptance moves: python -m respec.lab.draft_temperature)")
    # --- sampling noise across epochs (respec/rollout_seeds.py) ---
    rollout_seeds: str = option("per-step", "sampling seeds: per-step (fresh noise every rollout) or per-prompt (a "
                                "training-set row's sample g reuses its noise in later epochs, so last epoch's "
                                "completion drafts well; a sampling choice with a learning cost)", choices=SEED_MODES)
    reseed_every: int = option(0, "with per-prompt seeds: new noise for each sample every R epochs, staggered by "
                               "sample (0: never; groups without signal are always reseeded)",
                               needs=Needs("rollout_seeds", lambda seeds: seeds == "per-prompt",
                                           "--rollout-seeds per-step draws fresh noise for every rollout"))
    # --- the drafter's online distillation (respec/online_learner.py) ---
    drafter_update: str = option(KDConfig.weighting, "frozen, kd (uniform weights), rkd (reward-weighted) or akd "
                                 "(positive advantages only)", choices=("frozen", *WEIGHTINGS))
    drafter_async: bool = option(KDConfig.async_update, "drafter update in a background thread, overlapped with the "
                                 "next rollout")
    drafter_lr: float = option(KDConfig.lr, "the head's AdamW learning rate (after a linear warm-up)")
    drafter_warmup: int = option(KDConfig.warmup, "drafter optimizer steps of linear LR warm-up (0: none)")
    drafter_batch: int = option(KDConfig.batch, "sequences per drafter optimizer step, over all ranks")
    drafter_epochs: int = option(KDConfig.epochs, "passes over the replay buffer per drafter update")
    drafter_update_interval: int = option(KDConfig.interval, "RL steps between drafter updates (the buffer holds "
                                          "that many steps)")
    drafter_idle_interval: int = option(KDConfig.idle_interval, "RL steps between distillations while the head "
                                        "drafts nothing")
    drafter_budget: float | None = option(None, "the distillation's time (in line or in the background, the next "
                                          "one's included) at most this share of the run's plus the decoding time "
                                          "SD saved so far, in (0, 1] (1: no bound)",
                                          shown="0.02 on a CPU, whose cores it shares with the rollout; 1 on a GPU")
    # --- system ---
    dtype: str = option("auto", "dtype the model decodes in (the rollout's; auto: bf16 where native: CUDA, "
                        "AVX-512-BF16/AMX; else fp32)",
                        choices=("auto", "bf16", "fp32", "fp16"))
    # --- LoRA (respec/lora.py; peft's LoRA layers, TRL's names) ---
    lora_r: int = option(0, "train LoRA adapters of this rank instead of the whole actor (0: the whole actor)")
    lora_alpha: float = option(32.0, "LoRA scale numerator: the update is (alpha / r) B A", needs=NEEDS_LORA)
    lora_dropout: float = option(0.05, "dropout on the LoRA adapters' input, in training", needs=NEEDS_LORA)
    lora_target_modules: list = option(["q_proj", "v_proj"], "layers to adapt, repeatable or comma-separated: "
                                       "q_proj, k_proj, v_proj (respec fuses them: one adapter over the three), "
                                       "o_proj, gate_proj, up_proj (fused too), down_proj, or all-linear",
                                       needs=NEEDS_LORA)
    gradient_checkpointing: bool | None = option(None, "recompute each decoder block's activations in the backward "
                                                 "pass (less memory, ~1/3 more training compute; alone: on, or on|off)",
                                                 flag="--gradient-checkpointing",
                                                 shown="on a CPU (the run's peak memory), off on a GPU")
    train_dtype: str = option("auto", "autocast dtype of the training forward (weights stay fp32; fp16 is refused: "
                              "it would need loss scaling)",
                              choices=("auto", "bf16", "fp32", "fp16"))
    # torch.compile of the rollout engine: auto = on CUDA only. On a few CPU cores a cold compile of
    # the step shapes a rollout meets costs more than the default run's rollouts would save
    # (docs/benchmarks.md); with a warm cache (`--compile on` after one compiled run) decoding is
    # faster than eager.
    compile: str = option("auto", "torch.compile the rollout engine (auto: on CUDA only; a cold CPU compile takes "
                          "minutes)", choices=("auto", "on", "off"))
    compile_mode: str | None = option(None, "how a compiled engine compiles its steps (compile/policy.py): regional, "
                                      "regional-dynamic (one graph for all batch sizes), whole (CUDA-graph trees), graphs "
                                      "(the whole step captured by hand, one CUDA graph per shape, no guards per "
                                      "call), or tensorrt (the whole step by Torch-TensorRT: CUDA, requirements-trt.txt)",
                                      choices=COMPILE_MODES, shown="whole on CUDA, regional on CPU",
                                      needs=Needs("compile", lambda c: c != "off", "--compile off (--eager) compiles "
                                                  "nothing"))
    fsdp: str = option("auto", "shard the actor with FSDP2 (auto: with several ranks; on: also in one torchrun "
                       "process, to exercise the sharded path on one GPU)", choices=("auto", "on"))
    kv_cache_mb: int = option(0, "KV block pool per rank in MiB (0, train.py's default: 1024 on CPU, 40%% of the free "
                              "memory on a GPU)")
    max_batch: int = option(64, "most sequences decoding at once per rank")
    run_ahead: int = option(32, "most decoding steps the engine runs with the host a step behind the device "
                            "(the rows' state on the device, their tokens read when the run ends: "
                            "respec/run_ahead.py, and SD steps with the EAGLE head: respec/sd_ahead.py); "
                            "0: the step-by-step loop (one host read per step)")
    attention: str = option("gather", "how the decode and verify steps read the paged KV cache: gather (each "
                            "row's blocks copied out, then SDPA) or flex (the pool read in place by flex_attention "
                            "with a paged block mask; compiled on CUDA only: respec/flex_paged.py)",
                            choices=ATTENTION_KINDS)
    # --- run ---
    out: str = option("", "new run directory (never overwritten)", aliases=("output_dir",), shown="runs/grpo-<time>")
    seed: int = option(0, "seed of the sampling, the data (a --task's problems, their order) and the initialisation")
    checkpoint_every: int = option(10, "steps between checkpoints (and one at the end)", aliases=("save_steps",))
    keep_checkpoints: int = option(2, "checkpoints kept", aliases=("save_total_limit",))
    export_hf: str | None = option(None, "also write the final actor here (Hugging Face checkpoint)")
    progress: bool = option(True, "no progress bars", flag="--no-progress")
    report_to: list = option(["tensorboard"], "where metrics go besides RUN_DIR/metrics.jsonl, repeatable or "
                             "comma-separated: tensorboard, wandb (offline unless WANDB_MODE=online), trackio (a "
                             "local project), all (those installed) or none")
    log_completions: str = option("all", "completions written to RUN_DIR/completions.jsonl each step: all, none, "
                                  "or the first N")
    # --- held-out evaluation (respec/evaluation.py) ---
    eval_every: int = option(0, "held-out evaluation every N RL steps (0: none), without speculation",
                             aliases=("eval_steps",))
    eval_at_start: bool = option(False, "also evaluate before the first step (step 0)", flag="--eval-at-start")
    eval_prompts: int = option(32, "problems in the held-out evaluation set", needs=NEEDS_EVAL)
    eval_temperature: float = option(0.0, "sampling temperature of the evaluation (0: greedy)", needs=NEEDS_EVAL)
    eval_generations: int = option(1, "completions per held-out problem: pass@1 is their mean, pass@N reported "
                                   "beside it when N > 1 (sampled: needs --eval-temperature > 0)", needs=NEEDS_EVAL)
    eval_max_new_tokens: int = option(0, "completion length limit of the evaluation (0: --max-new-tokens)",
                                      needs=NEEDS_EVAL)
    eval_data: str | None = option(None, "held-out data (as --data)", shown="--task problems from another seed, or "
                                   "the first rows of --data (not held out)", needs=NEEDS_EVAL)

    def lora(self) -> LoraSettings:
        targets = tuple(t.strip() for item in self.lora_target_modules for t in str(item).split(",") if t.strip())
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets)

    def kd(self, device_type: str = "cpu") -> KDConfig | None:
        """The drafter's online distillation on a device of this type (None: `--drafter-update frozen`)."""
        return None if self.drafter_update == "frozen" else self._kd(self.drafter_update, device_type)

    def _kd(self, weighting: str, device_type: str = "cpu") -> KDConfig:
        budget = self.drafter_budget if self.drafter_budget is not None else 1.0 if device_type == "cuda" else 0.02
        return KDConfig(weighting=weighting, lr=self.drafter_lr, warmup=self.drafter_warmup,
                        batch=self.drafter_batch, epochs=self.drafter_epochs, interval=self.drafter_update_interval,
                        idle_interval=self.drafter_idle_interval, unroll=self.k, temperature=self.temperature,
                        verify=self.verify, draft_temperature=self.draft_temperature, async_update=self.drafter_async,
                        budget=budget)

    def update(self) -> UpdateConfig:
        """The policy update's settings."""
        return UpdateConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(UpdateConfig)})

    def sampling(self, seed: int) -> SamplingParams:
        """A rollout's sampling, for the request of sampling seed `seed`."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, seed=seed)

    def eval_sampling(self) -> SamplingParams:
        """The held-out evaluation's sampling (each request's seed set by the evaluation)."""
        return SamplingParams(max_new_tokens=self.eval_max_new_tokens or self.max_new_tokens,
                              temperature=self.eval_temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              seed=self.seed)

    def pretraining_task(self):
        """The problems a missing default head is pretrained on: the task's own, not a fixed
        training set's (the cached head serves every run of these task options, whatever its
        --train-size), with any answers (they are not scored)."""
        return dataclasses.replace(self, train_size=0).make_task(seed=self.seed, numeric_answers=False,
                                                                   answers_required=False)

    def validate(self, world: int) -> None:
        if self.group < 2:
            raise ValueError(f"--group must be >= 2 (GRPO compares samples of one prompt), got {self.group}")
        if self.prompts % world:
            raise ValueError(f"--prompts {self.prompts} is not divisible by the world size {world}")
        if (self.prompts // world) % self.minibatches:
            raise ValueError(f"prompts per rank ({self.prompts // world}) is not divisible by --minibatches "
                             f"{self.minibatches}")
        for f in dataclasses.fields(self):  # the choices the options declare (also for a config built in code)
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        if self.fsdp == "on" and not torch.distributed.is_initialized():
            raise ValueError("--fsdp on needs a process group: start train.py with torchrun")
        self._kd("kd").validate()  # the --drafter-* ranges, checked even when frozen
        if self.reseed_every < 0 or self.replay_k < 0 or self.run_ahead < 0:
            raise ValueError(f"--reseed-every, --replay-k and --run-ahead must be >= 0, got {self.reseed_every}, "
                             f"{self.replay_k}, {self.run_ahead}")
        PromptFormat.make(self.raw_prompts, self.chat_template_kwargs)
        self.lora().check()
        for name in ("steps", "prompts", "epochs", "minibatches", "k", "max_batch", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("micro_tokens", "kv_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: sized for the device), got "
                                 f"{getattr(self, name)}")
        self.sampling(0).validate(flags=True)
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for GRPO sampling, got {self.temperature}")
        if not self.is_cap > 0:
            raise ValueError(f"--is-cap must be positive, got {self.is_cap}")
        if self.lr <= 0 or self.kl_coef < 0 or self.grad_clip <= 0:
            raise ValueError("--lr and --grad-clip must be positive and --kl-coef >= 0")
        if self.eval_prompts <= 0 or self.eval_generations <= 0 or self.eval_max_new_tokens < 0:
            raise ValueError("--eval-prompts and --eval-generations must be positive, --eval-max-new-tokens >= 0")
        if self.eval_temperature < 0:
            raise ValueError(f"--eval-temperature must be >= 0, got {self.eval_temperature}")
        if self.eval_generations > 1 and self.eval_temperature == 0:
            raise ValueError(f"--eval-generations {self.eval_generations} at --eval-temperature 0 would repeat one "
                             "greedy completion: give a temperature")
        if self.train_dtype == "fp16":
            raise ValueError("--train-dtype fp16 would need loss scaling, which respec does not do: use bf16 or fp32")
        if str(self.log_completions).lower() in ("true", "false"):  # TRL's log_completions is a switch
            self.log_completions = "all" if str(self.log_completions).lower() == "true" else "none"
        if self.log_completions not in ("all", "none") and not (self.log_completions.isdigit()
                                                                 and int(self.log_completions) > 0):
            raise ValueError(f"--log-completions must be all, none or a positive number, got {self.log_completions!r}")


def default_prompts(world: int, at_least: int = 4) -> int:
    """Prompts per step when none are given: the smallest multiple of the world size >= `at_least`
    (each rank gets whole prompts, so 4 would not do on 3, 5, 6 or 7 GPUs)."""
    return world * -(-at_least // world)
