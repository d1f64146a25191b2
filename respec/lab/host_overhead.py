"""The engine's host work per decoding step, and how often a step makes the host wait for the device.

    python -m respec.lab.host_overhead --json host.json
    python -m respec.lab.host_overhead --rows 1,4 --tokens 16 --runs 1   # quick

On a GPU a decode step of a small model is microseconds of device work; whatever the engine does
on the host between two steps (planning, reserving slots, building the step's inputs, reading its
tokens back, recording them) either overlaps that work or adds to every step. This measures it
where no GPU is needed, with the tiny model on the CPU:

* `plain_us` / `sd_us`: per decoding step of a rollout of R rows (`--rows`, default 1, 16, 64;
  `--tokens` new tokens each, greedy, no EOS stop), the engine's wall time outside the step
  functions it runs: the rollout's wall time, less its prefills, less the time spent inside every
  function `engine.steps` hands out (the compiled decode and verify steps, the drafter's), over the
  rollout's decoding steps (`plain_step_us` / `sd_step_us`: the same with the step functions'
  time left in, the whole decoding step as the rollout ran it). Plain rollouts decode without a
  drafter; SD rollouts run the history drafter with k = 3 on prompts that repeat, so most steps
  draft and verify, its match on the device (the steps between runs too) and its steps run ahead
  of the host as on a GPU (respec/drafters/history_ahead.py, respec/sd_ahead.py; the match is one of
  the step functions, device work), unless `--run-ahead 0` (the host's index, step by step;
  `--drafter eagle`: an untrained EAGLE head, k = 3, every step drafting: its steps run ahead
  too, unless `--run-ahead 0`; `--drafter hybrid`:
  the two side by side as a training run drafts, the head's steps run ahead where history offers
  no row anything, as on a GPU). The figure is the
  median of `--runs` rollouts, after every shape is compiled (`respec.profiling.warmup`) and one
  untimed rollout; `sd_ahead_share`, the share of the SD steps that ran ahead of the host.
* `syncs_per_step`: the host reads of device tensors per decoding step, counted on fake CUDA
  (respec/lab/fake_cuda.py) over the same rollouts at two lengths, so that the prefill's reads
  cancel: the larger of plain and SD; `blocking_syncs_per_step`, those the host waits for (a
  device-to-host copy of what the step just computed; the others are non-blocking copies into
  pinned memory read a step later, respec/run_ahead.py); `plain_uploads_per_step` /
  `sd_uploads_per_step`, the host-to-device copies per step (a step's inputs go in one,
  respec/host_copy.py; a run of steps ahead of the host uploads once per run: plain steps, and SD
  steps with the head, respec/sd_ahead.py).

* `--parts`: where an SD rollout's host time goes, per decoding step: each part of the engine and
  its drafter (`PARTS`: the plan, slot reservation, the draft's inputs, the drafter's catch-up,
  draft and commit, the verify's read-back and rollback, recording the tokens, ...) timed by a
  wrapper, exclusive of the parts and compiled steps it calls, over `--runs` more rollouts (after
  the timed ones, so the wrappers cost them nothing); "other" is what no part holds (the loop, the
  wrappers' own microsecond a call).

Prints a table; `--json F` writes {"results": [{"rows", "plain_us", "sd_us", "syncs_per_step",
"blocking_syncs_per_step", ..., "parts": {part: us} with --parts}]}. The rows stop at EOS (a token
no prompt holds), as a rollout's do.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from respec.cli import OneLineParser, non_negative_int, positive_int, positive_int_list

K = 3  # drafts per SD step
PERIODS = (4, 5, 6, 7)  # the prompts' repeating periods (the history drafter matches them)
EOS = 2  # the rows stop at EOS (checked every step, as in a rollout); no prompt holds it


def prompts_for(rows: int, vocab: int, length: int = 40) -> list[list[int]]:
    """`rows` prompts, each a short random period repeated: text the history drafter can continue."""
    gen = torch.Generator().manual_seed(rows)
    out = []
    for i in range(rows):
        period = torch.randint(3, vocab, (PERIODS[i % len(PERIODS)],), generator=gen).tolist()
        out.append((period * (length // len(period) + 1))[:length])
    return out


DRAFTERS = ("history", "eagle", "hybrid")


def make_drafter(kind: str, model):
    """The SD rollouts' drafter: the history drafter (k = 3 on prompts that repeat: most steps
    draft), or an untrained EAGLE head over a 3,000-token draft vocabulary (its drafts are rarely
    accepted, but every step drafts and verifies: what is measured is the host's part), or the two
    side by side as a training run drafts (`hybrid`: history's rows where its match is long, the
    head's elsewhere), the head's steps run ahead where history offers nothing, as on a GPU."""
    if kind == "history":  # (matched on the device and run ahead, as on a GPU; step by step with --run-ahead 0)
        from respec.drafters.history import HistoryDrafter

        return HistoryDrafter(min_match=1, ahead=True)
    if kind == "hybrid":
        from respec.drafters.history import HistoryDrafter
        from respec.drafters.hybrid import HybridDrafter
        from respec.drafters.wrap import as_drafter

        return HybridDrafter(as_drafter(make_drafter("eagle", model)), HistoryDrafter(), ahead=True)
    from models.eagle import EagleConfig, EagleHead

    gen = torch.Generator().manual_seed(0)
    head = EagleHead(EagleConfig.for_target(model.cfg, 3000)).to(next(model.parameters()).dtype).eval()
    with torch.no_grad():
        head.d2t.copy_(torch.randperm(model.cfg.vocab_size, generator=gen)[:3000])
    return head.to(next(model.parameters()).device)


def build_engine(model, rows: int, sd: bool, *, eager: bool, run_ahead: int = 32, drafter: str = "history"):
    from respec.engine import RolloutEngine

    return RolloutEngine(model, kv_cache_bytes=64 << 20, max_batch=max(rows, 1), eager=eager, eos_token_ids=[EOS],
                         drafter=make_drafter(drafter, model) if sd else None, num_draft_tokens=K if sd else 0,
                         run_ahead=run_ahead)


class InsideSteps:
    """Seconds spent inside the decoding steps an engine's `steps.get` hands out (its compiled decode
    and verify steps, a model drafter's; the prefill runs `steps.eager_fn`, counted in `prefill_s`)."""

    def __init__(self, engine):
        self.seconds = 0.0
        self.engine, self.factory = engine, engine.steps.get
        engine.steps.get = self._timing(engine.steps.get)

    def remove(self) -> None:
        self.engine.steps.get = self.factory

    def _timing(self, factory):
        def make(*args, **kwargs):
            fn = factory(*args, **kwargs)

            def timed(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t0
            return timed
        return make


def rollout(engine, prompts: list[list[int]], tokens: int):
    from respec.engine import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return engine.generate(prompts, params)


def host_us(model, rows: int, sd: bool, tokens: int, runs: int, run_ahead: int, drafter: str = "history",
            parts: bool = False) -> dict:
    """Median host microseconds per decoding step of `runs` rollouts (after a compiling one); with
    `parts`, then each part's (`host_parts`) over as many more."""
    from respec.profiling import warmup

    engine = build_engine(model, rows, sd, eager=False, run_ahead=run_ahead, drafter=drafter)
    prompts = prompts_for(rows, model.cfg.vocab_size)
    # every batch bucket a shrinking batch meets, plain and with k drafts; then a rollout untimed
    warmup(engine, [rows], ks=[0, K] if sd else [0], progress=False)
    rollout(engine, prompts, tokens)
    inside = InsideSteps(engine)
    per_step, whole_step, sd_share, ahead_share = [], [], [], []
    for _ in range(runs):
        inside.seconds = 0.0
        t0 = time.perf_counter()
        out = rollout(engine, prompts, tokens)
        wall = time.perf_counter() - t0
        s = out.stats
        steps = s.decode_steps + s.sd_steps
        per_step.append((wall - s.prefill_s - inside.seconds) / steps * 1e6)
        whole_step.append((wall - s.prefill_s) / steps * 1e6)
        sd_share.append(s.sd_steps / steps)
        ahead_share.append(s.sd_ahead_steps / max(s.sd_steps, 1))
    out = {"us": statistics.median(per_step), "step_us": statistics.median(whole_step),
           "sd_share": statistics.median(sd_share), "ahead_share": statistics.median(ahead_share)}
    inside.remove()
    if parts:
        out["parts"] = host_parts(engine, prompts, tokens, runs)
    return out


# (label, where, attribute): the engine's and its drafter's parts of a decoding step, for `--parts`
PARTS = (("step loop", "engine", "_step"), ("plan", "policy", "plan"), ("reserve slots", "scheduler", "reserve"),
         ("draft inputs", "engine", "_draft"), ("drafter catch-up", "drafter", "catch_up"),
         ("drafter draft", "drafter", "draft"), ("read back", "engine module", "read_back"),
         ("verify: roll back, count", "engine", "_verify"),
         ("record tokens", "engine", "_emit_runs"), ("drafter commit", "drafter", "commit"),
         ("observe", "policy", "observe_group"), ("plain steps", "engine", "_decode"),
         ("release", "scheduler", "release"),
         # SD steps run ahead of the host (respec/sd_ahead.py): the run's loop, the drafter's device
         # state, and the run's end (one read, the rows' tokens, the counts told step by step)
         ("SD run ahead: loop", "sd_ahead module", "sd_run_ahead"), ("drafter layout", "drafter", "ahead_state"),
         ("drafter draft ahead", "drafter", "draft_ahead"), ("drafter advance", "drafter", "advance"),
         ("SD run ahead: record", "sd_ahead module", "_record"))


class ExclusiveTimes:
    """Seconds inside wrapped callables, each less the wrapped calls it makes (a stack of open
    calls): the parts of a step add up to no more than the step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.open: list[float] = []  # per open call, the seconds of the wrapped calls inside it

    def wrap(self, obj, attr: str, label: str) -> None:
        setattr(obj, attr, self.timed(getattr(obj, attr), label))

    def timed(self, fn, label: str):
        """`fn`, its calls timed under `label`."""
        def timed(*a, **kw):
            self.open.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent = time.perf_counter() - t0
                inner = self.open.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + spent - inner
                if self.open:
                    self.open[-1] += spent
        return timed

    def wrap_steps(self, engine) -> None:
        """Every function `engine.steps.get` hands out from now (the step functions `sd_us` leaves
        out), as "compiled steps"; each wrapped once (a step asks for its functions every time)."""
        factory, wrapped = engine.steps.get, {}

        def make(*args, **kwargs):
            fn = factory(*args, **kwargs)
            if id(fn) not in wrapped:
                wrapped[id(fn)] = (fn, self.timed(fn, "compiled steps"))  # (fn kept: its id stays its own)
            return wrapped[id(fn)][1]
        engine.steps.get = make


def host_parts(engine, prompts: list[list[int]], tokens: int, runs: int) -> dict:
    """Microseconds per decoding step of each of `PARTS` (and "other") over `runs` rollouts of an
    engine already warm; the engine's parts stay wrapped (the modules' functions only until this
    returns)."""
    import respec.engine
    import respec.sd_ahead

    times = ExclusiveTimes()
    where = {"engine": engine, "engine module": respec.engine, "policy": engine.policy, "scheduler": engine.scheduler,
             "drafter": engine.drafter, "sd_ahead module": respec.sd_ahead}
    modules = [(where[obj], attr, getattr(where[obj], attr)) for _, obj, attr in PARTS if obj.endswith("module")]
    for label, obj, attr in PARTS:
        if hasattr(where[obj], attr):
            times.wrap(where[obj], attr, label)
    times.wrap(engine, "_prefill", "prefill")
    times.wrap_steps(engine)
    steps, wall = 0, 0.0
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            out = rollout(engine, prompts, tokens)
            wall += time.perf_counter() - t0
            steps += out.stats.decode_steps + out.stats.sd_steps
    finally:
        for module, attr, fn in modules:
            setattr(module, attr, fn)
    host = {label: s for label, s in times.seconds.items() if label not in ("prefill", "compiled steps")}
    inside = sum(times.seconds.get(label, 0.0) for label in ("prefill", "compiled steps"))
    host["other"] = wall - inside - sum(host.values())
    return {label: round(s / steps * 1e6, 1) for label, s in host.items()}


def syncs_per_step(rows: int, sd: bool, short: int = 8, long: int = 40, run_ahead: int = 32,
                   drafter: str = "history") -> dict:
    """Host reads of device tensors per decoding step, on fake CUDA (the tiny model, eager): all of
    them ("syncs") and those the host waits for ("blocking"; the others are non-blocking copies into
    host buffers, read a step later: respec/run_ahead.py); and the host-to-device copies ("uploads")."""
    from models.loading import load_model
    from respec.lab.fake_cuda import fake_cuda

    reads = {}
    with fake_cuda() as counts:
        model = load_model("tiny", device="cuda", dtype=torch.bfloat16)
        for tokens in (short, long):
            engine = build_engine(model, rows, sd, eager=True, run_ahead=run_ahead, drafter=drafter)
            before = counts.host_reads, counts.async_reads, counts.uploads
            out = rollout(engine, prompts_for(rows, model.cfg.vocab_size), tokens)
            reads[tokens] = (counts.host_reads - before[0], counts.async_reads - before[1],
                             out.stats.decode_steps + out.stats.sd_steps, counts.uploads - before[2])
    steps = reads[long][2] - reads[short][2]
    blocking = (reads[long][0] - reads[short][0]) / steps
    return {"syncs": blocking + (reads[long][1] - reads[short][1]) / steps, "blocking": blocking,
            "uploads": (reads[long][3] - reads[short][3]) / steps}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=positive_int_list, default=[1, 16, 64], help="rows decoding at once")
    ap.add_argument("--tokens", type=positive_int, default=48, help="new tokens per row")
    ap.add_argument("--runs", type=positive_int, default=3, help="timed rollouts per figure (median)")
    ap.add_argument("--run-ahead", type=non_negative_int, default=32,
                    help="the engine's --run-ahead (0: every step one by one, the loop before respec/run_ahead.py "
                         "and respec/sd_ahead.py)")
    ap.add_argument("--drafter", choices=DRAFTERS, default="history",
                    help="the SD rollouts' drafter (eagle: an untrained head, for the host's part of its steps; "
                         "hybrid: the head and history side by side, the head's steps run ahead)")
    ap.add_argument("--parts", action="store_true",
                    help="also where an SD step's host time goes, part by part (more rollouts, wrapped)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.json is not None and args.json.exists():
        ap.error(f"{args.json} exists: name a new file")

    from compile.policy import use_persistent_cache

    use_persistent_cache()
    from models.loading import load_model

    torch.manual_seed(0)
    model = load_model("tiny", dtype=torch.float32)
    results = []
    print(f"{'rows':>5} {'plain us/step':>14} {'sd us/step':>11} {'sd steps':>9} {'run ahead':>9} "
          f"{'syncs/step: plain':>18} {'(blocking)':>10} {'SD':>6} {'uploads/step: plain':>20} {'SD':>6}"
          f" {'whole step us: plain':>21} {'SD':>7}")
    for rows in args.rows:
        plain, sd = (host_us(model, rows, s, args.tokens, args.runs, args.run_ahead, args.drafter, parts=s and args.parts)
                     for s in (False, True))
        plain_syncs, sd_syncs = (syncs_per_step(rows, s, run_ahead=args.run_ahead, drafter=args.drafter)
                                 for s in (False, True))
        r = {"rows": rows, "plain_us": round(plain["us"], 1), "sd_us": round(sd["us"], 1),
             "plain_step_us": round(plain["step_us"], 1), "sd_step_us": round(sd["step_us"], 1),
             "syncs_per_step": round(max(plain_syncs["syncs"], sd_syncs["syncs"]), 3),
             "blocking_syncs_per_step": round(max(plain_syncs["blocking"], sd_syncs["blocking"]), 3),
             "plain_syncs_per_step": round(plain_syncs["syncs"], 3),
             "plain_blocking_per_step": round(plain_syncs["blocking"], 3),
             "sd_syncs_per_step": round(sd_syncs["syncs"], 3), "sd_step_share": round(sd["sd_share"], 3),
             "sd_ahead_share": round(sd["ahead_share"], 3),
             "plain_uploads_per_step": round(plain_syncs["uploads"], 3),
             "sd_uploads_per_step": round(sd_syncs["uploads"], 3)}
        if args.parts:
            r["parts"] = sd["parts"]
        results.append(r)
        print(f"{rows:>5} {r['plain_us']:>14.1f} {r['sd_us']:>11.1f} {r['sd_step_share']:>9.0%} "
              f"{r['sd_ahead_share']:>9.0%} "
              f"{r['plain_syncs_per_step']:>18.2f} {r['plain_blocking_per_step']:>10.2f} {r['sd_syncs_per_step']:>6.2f}"
              f" {r['plain_uploads_per_step']:>20.2f} {r['sd_uploads_per_step']:>6.2f}"
              f" {r['plain_step_us']:>21.1f} {r['sd_step_us']:>7.1f}")
    if args.parts:
        print(f"\nan SD rollout's host us per decoding step, by part ({args.drafter} drafter):")
        labels = sorted({p for r in results for p in r["parts"]}, key=lambda p: -results[-1]["parts"].get(p, 0.0))
        print(f"{'part':>38} " + " ".join(f"{r['rows']:>7} rows" for r in results))
        for label in labels:
            print(f"{label:>38} " + " ".join(f"{r['parts'].get(label, 0.0):>12.1f}" for r in results))
    if args.json is not None:
        report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "tokens": args.tokens, "runs": args.runs, "k": K, "run_ahead": args.run_ahead, "model": "tiny",
                  "drafter": args.drafter,
                  "dtype": "fp32",
                  "results": results}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
