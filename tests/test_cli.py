"""generate.py and the loaders on bad input: one clear line, a non-zero exit, nothing overwritten."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import generate
from models.loading import ModelLoadError, load_model, random_model, save_hf_checkpoint
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    try:
        code = generate.main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(code, err, needle):
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("generate.py: error:") and needle in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-preset"], "unknown model"),
    (["--model", "/no/such/dir"], "not found"),
    (["--model", "/no/such/file.gguf"], "not found"),
    (["--model", "tiny", "--dtype", "fp16", "--device", "cpu"], "fp16 on CPU"),
    (["--model", "tiny", "--max-new-tokens", "0"], "must be positive"),
    (["--model", "tiny", "--bench", "--new-tokens", "-3"], "must be positive"),
    (["--model", "tiny", "--bench", "--batch-sizes", "1,0,8"], "must be positive"),
    (["--model", "tiny", "--kv-cache-gb", "0"], "must be positive"),
    (["--model", "tiny", "--temperature", "-1"], "temperature"),
    (["--model", "tiny", "--task", "no_such_task"], "no_such_task"),
    (["--model", "tiny", "--drafter", "first:9"], "1..4 layers"),
    (["--model", "tiny", "--drafter", "first:1", "--k", "0"], "--k must be >= 1"),
    (["--model", "tiny", "--drafter", "first:1", "--k", "-2"], "--k must be >= 1"),
    (["--model", "tiny", "--drafter", "/no/such/drafter"], "drafter not found"),
    (["--model", "tiny", "--temperature", "1", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--model", "tiny", "--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--model", "tiny", "--temperature", "1", "--top-k", "-1"], "top_k must be >= 0"),
    (["--model", "tiny", "--device", "gpu0"], "is not a device"),
    (["--model", "tiny", "--sweep-reps", "0"], "must be positive"),
    (["--model", "tiny", "--longtail-samples", "-1"], "must be positive"),
    (["--model", "tiny", "--steps-typo", "3"], "unrecognized arguments"),
    (["--model", "tiny", "--bench", "--sweep"], "separate runs"),
    (["--model", "tiny", "--device", "cpu", "--compile-mode", "tensorrt"], "CUDA GPUs only"),
    (["--model", "tiny", "--compile-mode", "fast"], "invalid choice"),
    (["--model", "tiny", "--device", "cpu", "--attention", "flex"], "compiled for CUDA; this run is compiled on cpu"),
    (["--model", "tiny", "--attention", "paged"], "invalid choice"),
])
def test_bad_arguments(capsys, argv, needle):
    one_line_error(*run_main(capsys, *argv), needle)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is there")
def test_cuda_device_without_a_gpu(capsys):
    one_line_error(*run_main(capsys, "--model", "tiny", "--device", "cuda"), "no CUDA GPU is available")


def test_a_model_too_large_for_the_card(capsys, monkeypatch, tmp_path):
    """On a (fake) GPU with 1 MiB free: one line before any weight is read, no report written."""
    from respec.lab.fake_cuda import fake_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = tmp_path / "bench.json"
    with fake_cuda(free_bytes=1 << 20):
        code, err = run_main(capsys, "--model", "tiny", "--device", "cuda", "--bench", "--json", str(report))
    one_line_error(code, err, "GiB free on cuda")
    assert not report.exists()


def test_a_vocabulary_that_cannot_be_indexed_in_32_bits_at_the_batch(capsys, monkeypatch, tmp_path):
    """Qwen2.5's 151,936-token vocabulary, 4,096 rows and a 17-wide verify: logits of 10.6 billion
    elements, which a GPU kernel cannot index in 32 bits; refused in one line, naming a batch that
    fits, before anything compiles (compile/policy.py)."""
    from respec.lab.fake_cuda import fake_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = tmp_path / "bench.json"
    with fake_cuda():
        code, err = run_main(capsys, "--model", "random-qwen2.5-0.5b", "--device", "cuda", "--bench", "--batch-sizes",
                             "4096", "--drafter", "history", "--k", "16", "--kv-cache-gb", "0.01", "--json", str(report))
    one_line_error(code, err, "vocabulary of 152,064")
    assert "2^31 - 1" in err and "a batch of at most 512 rows fits" in err
    assert not report.exists()


def test_prompt_longer_than_context(capsys):
    code, err = run_main(capsys, "--model", "tiny", "--eager", "--prompt", "hello " * 2100)
    one_line_error(code, err, "does not fit the model's context")


def test_corrupt_safetensors(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(random_model(TINY_LLAMA), ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        load_model(str(ckpt))
    one_line_error(*run_main(capsys, "--model", str(ckpt)), "corrupt safetensors")


def test_checkpoint_never_overwritten(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(random_model(TINY_LLAMA), ckpt)
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(ModelLoadError, match="refusing to overwrite"):
        save_hf_checkpoint(random_model(TINY_LLAMA, seed=5), ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before


def test_bench_json_never_overwritten(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    one_line_error(*run_main(capsys, "--model", "tiny", "--bench", "--json", str(out)), "refusing to overwrite")
    assert out.read_text() == "earlier results"


def test_generate_end_to_end_subprocess():
    """The command line as users run it: a tiny model answering a reasoning-gym problem."""
    proc = subprocess.run([sys.executable, "generate.py", "--model", "tiny", "--eager", "--max-new-tokens", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[basic_arithmetic]" in proc.stdout and "5 tokens" in proc.stderr and "reference answer" in proc.stderr


def test_bench_tiny_writes_report(tmp_path):
    out = tmp_path / "bench.json"
    code = generate.main(["--model", "tiny", "--dtype", "fp32", "--eager", "--bench", "--batch-sizes", "1,3", "--new-tokens", "6",
                          "--json", str(out)])
    assert code == 0
    import json

    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["dtype"] == "float32"
    assert [r["batch"] for r in report["results"]] == [1, 3]
    assert report["launch_us_eager"] > 0 and report["launch_us_graph"] is None  # no CUDA graph on a CPU
    # the kernels of a plain step at the first batch, from a profiler trace (eager: every operator)
    assert report["kernels_batch"] == 1 and report["kernels_counted"] == "leaf operators"
    assert report["kernels_per_step"] > 8 * 4 and report["kernels_per_layer"] == round(report["kernels_per_step"] / 4, 1)
    # --eager: transformers' static-cache baseline runs uncompiled too, and it ran
    assert report["hf_static_compiled"] is False and report["hf_static_error"] is None
    for r in report["results"]:
        assert r["respec_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["hf_static_tok_s"] > 0 and r["roofline_ms"] > 0
        # fp32, greedy, the same weights: transformers produces the very same tokens, with either cache
        assert r["same_tokens_as_hf"] == r["same_tokens_as_hf_static"] == f"{r['batch']}/{r['batch']}"
        # a decoding step timed apart from the prefill on every side (timer noise may make transformers' 0)
        assert r["decode_ms_per_step"] == r["step_ms"] > 0 and r["decode_tok_s"] > 0 and r["prefill_ms"] > 0
        assert r["hf_decode_ms_per_step"] >= 0 and r["hf_static_decode_ms_per_step"] >= 0


def test_bench_sd_with_the_solver_choosing(tmp_path, monkeypatch, capsys):
    """`--bench --temperature 1 --drafter history --sd adaptive`: the SD rollout's k chosen per step by
    the solver over the cost model profiled on the SD engine; its tokens are plain decoding's (the
    match rule), and the k it chose per step are in the report; the SD engine was warmed up for every
    k the solver can choose, not only the fixed k it started with (power: warmed by its first policy,
    0 and --k). `--sd` without a drafter or without --bench: one line."""
    import json

    from respec import profiling
    from respec.lab import bench

    warmed = {}  # the draft lengths each engine's warm-up compiles, as `warmup` resolves them

    def recording(engine, batch_sizes, *, ks=None, **kw):
        warmed[engine.drafter.kind if engine.k else "plain"] = profiling.warm_ks(engine, ks)
        return profiling.warmup(engine, batch_sizes, ks=ks, **kw)

    monkeypatch.setattr(bench, "warmup", recording)
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert generate.main(["--model", "tiny", "--dtype", "fp32", "--eager", "--bench", "--temperature", "1",
                          "--drafter", "history", "--k", "2", "--sd", "adaptive", "--past-rollouts", "1",
                          "--batch-sizes", "1,3", "--new-tokens", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sd"] == "adaptive" and report["cost_profile_s"] > 0
    assert list((tmp_path / "cache" / "costs").glob("*.json"))  # the profile, cached for the next run
    for r in report["results"]:
        assert r["sd_same_as_plain"] == f"{r['batch']}/{r['batch']}" and r["sd_tok_s"] > 0
        chosen = {int(k): n for k, n in r["sd_chosen_k"].items()}
        assert set(chosen) <= {0, 1, 2} and sum(chosen.values()) > 0
    assert warmed == {"plain": [0], "history": [0, 1, 2]}
    capsys.readouterr()
    one_line_error(*run_main(capsys, "--model", "tiny", "--bench", "--sd", "adaptive"), "--drafter")
    one_line_error(*run_main(capsys, "--model", "tiny", "--drafter", "history", "--sd", "adaptive"), "--bench")


def test_bench_reps_alternate_from_one_state(tmp_path, monkeypatch):
    """`--bench --reps 3`: each batch's plain and SD rollouts timed three times each, alternated
    (plain, SD, SD, plain, plain, SD), the plain ones on the SD engine with its drafter off, every SD
    rollout from the drafter's state before the first: the same tokens and acceptance each time, and
    the arms' tok/s from their mean times. Power: with the state not restored, the history drafter
    drafts the second rollout from the first's text."""
    import json

    from respec.engine import RolloutEngine
    from respec.lab import bench
    from respec.solver import FixedK

    calls = []
    generate_one = RolloutEngine.generate

    def logged(self, prompts, params, *a, **kw):
        plain = isinstance(kw.get("policy"), FixedK) and kw["policy"].k == 0
        calls.append(f"{'plain' if plain else 'sd'} on {self.drafter.kind}")
        return generate_one(self, prompts, params, *a, **kw)

    monkeypatch.setattr(RolloutEngine, "generate", logged)
    argv = ["--model", "tiny", "--dtype", "fp32", "--eager", "--bench", "--temperature", "1", "--drafter", "history",
            "--k", "3", "--batch-sizes", "2", "--new-tokens", "24", "--run-ahead", "0", "--reps", "3"]
    reports = []
    for name in ("restored", "not restored"):
        if name == "not restored":
            monkeypatch.setattr(bench, "restore", lambda sd_engine, state: None)
        calls.clear()
        out = tmp_path / f"{name}.json"
        assert generate.main(argv + ["--json", str(out)]) == 0
        # the timed rollouts first (alternated); then the kernel count's plain step (the profiler)
        plain, sd = "plain on history", "sd on history"  # (both on the SD engine)
        assert calls[:6] == [plain, sd, sd, plain, plain, sd]
        reports.append(json.loads(out.read_text()))
    report, unrestored = reports
    assert report["reps"] == 3 and report["plain_on"] == "the SD engine, its drafter off"
    (r,), (u,) = report["results"], unrestored["results"]
    assert len(r["respec_s"]) == len(r["sd_s"]) == 3
    tokens = r["tokens_per_row"] * 2
    assert r["respec_tok_s"] == pytest.approx(tokens / (sum(r["respec_s"]) / 3), rel=0.01)
    assert r["sd_tok_s"] == pytest.approx(r["sd_tokens_per_row"] * 2 / (sum(r["sd_s"]) / 3), rel=0.01)
    assert r["sd_same_across_reps"] == r["sd_same_as_plain"] == "2/2"  # (the match rule: plain's tokens)
    assert len(set(r["accept_len_reps"])) == 1
    assert u["accept_len_reps"][0] == r["accept_len_reps"][0] and u["accept_len_reps"][1] > r["accept_len_reps"][0] + 1


def test_bench_records_a_failing_static_baseline(tmp_path, monkeypatch, capsys):
    """Where transformers' static-cache baseline cannot run (here: a cache it does not know), the
    report says why in one line and the bench goes on, the eager baseline beside respec."""
    import json

    from respec.lab import bench

    monkeypatch.setattr(bench, "hf_static_kw", lambda device, compiled: {"cache_implementation": "no-such-cache"})
    out = tmp_path / "bench.json"
    assert generate.main(["--model", "tiny", "--dtype", "fp32", "--eager", "--bench", "--batch-sizes", "1,2",
                          "--new-tokens", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    error = report["hf_static_error"]
    assert error.startswith("batch 1: ") and "\n" not in error and "no-such-cache" in error
    assert all(r["same_tokens_as_hf"] == f"{r['batch']}/{r['batch']}" and "hf_static_tok_s" not in r
               for r in report["results"])
    assert f"failed at {error}" in capsys.readouterr().out


def test_bench_static_baseline_compiled(tmp_path, tiny, tokenizer):
    """The fair baseline as a compiled run meets it: transformers' static cache, `generate` compiling
    the decoding forward (inductor, on this CPU when told to), after two warm-up calls; it gives
    respec's greedy tokens, left padding included, and times a decoding step apart from the prefill."""
    from respec.engine import RolloutEngine, SamplingParams
    from respec.lab.bench import bench_prompts, hf_model_for, hf_static_kw, time_hf

    cpu = torch.device("cpu")
    first, second = bench_prompts(tokenizer, 2, seed=0)
    prompts = [first, second[:-7]]  # rows of different lengths: the shorter one is left-padded
    hf = hf_model_for("tiny", tiny, tokenizer, torch.float32, cpu, tmp_path)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        t = time_hf(hf, tokenizer, prompts, 4, warm_calls=2, warm_tokens=4, **hf_static_kw(cpu, compiled=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not an eager fallback
    engine = RolloutEngine(tiny, kv_cache_bytes=16 << 20, eager=True)
    ours = engine.generate(prompts, [SamplingParams(max_new_tokens=4, temperature=0.0, stop_on_eos=False)] * 2)
    assert t["tokens"] == [o.token_ids for o in ours]
    assert t["decode_ms"] >= 0 and t["prefill_ms"] > 0 and t["warm_s"] > 0


def test_launch_overhead_is_measured():
    from respec.lab.bench import launch_overhead_us

    us = launch_overhead_us(torch.device("cpu"), ops=200, repeats=2)
    assert us["eager"] > 0 and us["graph"] is None


def test_sweep_tiny_writes_report_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep.json"
    args = ["--model", "tiny", "--dtype", "fp32", "--eager", "--sweep", "--drafter", "first:1", "--k", "2",
            "--batch-sizes", "1,2,4", "--new-tokens", "6", "--longtail-samples", "3", "--longtail-group", "2",
            "--longtail-temperature", "0", "--longtail-tokens", "12", "--sweep-reps", "1", "--json", str(out)]
    assert generate.main(args) == 0
    import json

    report = json.loads(out.read_text())
    assert {(g["batch"], g["k"]) for g in report["grid"]} == {(b, k) for b in (1, 2, 4) for k in range(3)}
    assert all(g["measured_tok_s"] > 0 and g["predicted_tok_s"] > 0 for g in report["grid"])
    assert [a["batch"] for a in report["adaptive"]] == [1, 2, 4]
    assert all(0 <= a["k_chosen"] <= 2 for a in report["adaptive"])
    lt = report["longtail"]
    assert lt["adaptive_s"] > 0 and lt["always_sd_s"] > 0 and lt["never_sd_s"] > 0 and lt["tokens"] > 0
    assert lt["same_tokens"]  # greedy: the three policies produce the very same completions
    assert out.with_suffix(".png").stat().st_size > 0
    assert not report["cost_model"]["cached"]
    # a second run reuses the fitted costs, and refuses to overwrite the earlier report
    capsys.readouterr()
    one_line_error(*run_main(capsys, *args), "refusing to overwrite")
    args[-1] = str(tmp_path / "again.json")
    args[args.index("--longtail-temperature") + 1] = "1"  # the GRPO-shaped tail: sampled siblings
    assert generate.main(args) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["cost_model"]["cached"]
    lt = again["longtail"]
    assert lt["temperature"] == 1 and lt["group"] == 2 and lt["samples"] == 3 and lt["same_tokens"] is None
    assert lt["never_sd_tokens"] > 0 and lt["always_sd_tok_s"] > 0 and lt["adaptive_tok_s"] > 0


def test_sweep_needs_a_drafter(capsys):
    one_line_error(*run_main(capsys, "--model", "tiny", "--sweep"), "needs a --drafter")


def test_gpu_check_quick_runs_every_stage(tmp_path, monkeypatch):
    """The prepared GPU check, both parts, on the tiny model and this machine's CPU: every stage runs
    and the folder (empty but existing, as the device tool's $OUT; given relative) holds its summary,
    logs, bench report and GRPO metrics, at most 8 files (on a GPU the same stages run at real
    shapes: `python -m respec.lab.gpu_check --part a|b --out DIR`)."""
    import json

    from respec.lab import gpu_check
    from respec.solver import FEATURES

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESPEC_TOKENIZER", raising=False)  # the tokenizer travels with the repository
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the stages' runs go
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        assert gpu_check.main(["--part", part, "--out", part, "--quick", "--device", "cpu"]) == 0
        summary = json.loads((tmp_path / part / "summary.json").read_text())
        not_ok = {n: s["status"] for n, s in summary["stages"].items() if s["status"] != "ok"}
        assert not_ok == ({"bench smollm2-135m graphs": "skipped: --compile-mode graphs runs compiled on CUDA only",
                           "bench smollm2-135m flex": "skipped: --attention flex runs compiled on CUDA only"}
                          if part == "a" else {})
        names = {p.name for p in (tmp_path / part).iterdir()}
        assert {"check.log", "summary.json", "summary.md"} <= names and len(names) <= 8  # what comes back
        assert all((tmp_path / part / n).stat().st_size < 16 << 20 for n in names)
        assert summary["cudagraph_skips"] == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert list(a["stages"]) == ["smoke", "smoke: eager", "cuda tests", "bench smollm2-135m", "bench smollm2-135m graphs",
                                 "bench smollm2-135m flex", "bench smollm2-135m head"]
    head = a["bench"]["tiny random head"]["rows"]  # SD with the head run ahead of the host and step by step
    assert all(r["sd_same_tokens_as_step_by_step"] == f"{r['batch']}/{r['batch']}" for r in head)
    assert all(0 < r["sd_ahead_steps"] <= r["sd_steps"] for r in head) and "SD steps run ahead" in (tmp_path / "a" / "summary.md").read_text()
    assert a["smoke"]["path"] == "eager" and set(a["smoke"]["replay_ms"]) == {"decode", "verify k=3"}
    assert a["stages"]["bench smollm2-135m"]["path"] == "eager"
    assert a["bench"]["tiny"]["rows"][0]["same_tokens_as_hf"] == "1/1"
    assert all(r["unwarmed_shapes"] == [] for r in a["bench"]["tiny"]["rows"])
    assert a["bench"]["tiny"]["kernels_per_step"] > 0 and "Kernels per plain step" in (tmp_path / "a" / "summary.md").read_text()
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert {r["accept"] for r in b["oracle"]} == {0.5, 0.9} and all(r["same_tokens"] for r in b["oracle"])
    assert [r["step"] for r in b["grpo"]] == [1, 2, 3]  # two steps, then one more after the resume, equal to straight
    assert any(r["sd_fraction"] for r in b["grpo"])  # it speculated
    # a fit came back (its error is a timing on a shared machine: a benchmark's figure, not a test's)
    assert 0 <= b["costs"]["rel_error"] < float("inf") and len(b["costs"]["coef"]) == len(FEATURES)
    assert (tmp_path / "b" / "grpo-metrics.jsonl").is_file()
    assert not list((tmp_path / "tmp").glob("grpo-*"))  # the GRPO runs' folders removed (their checkpoints)
    assert gpu_check.main(["--part", "a", "--out", "a", "--quick", "--device", "cpu"]) == 2  # never overwritten


def test_gpu_check_part_c_quick_runs_both_arms(tmp_path, monkeypatch):
    """Part c on the tiny model and this CPU: GRPO with SD off and with ReSpec (adaptive, a head with
    replay and history) in both settings, the same seed, each run summarised from its metrics and
    the two compared; TRL's arm skipped with a line where trl is not installed."""
    import json

    from respec.lab import gpu_check

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESPEC_TOKENIZER", raising=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the arms' runs go
    assert gpu_check.main(["--part", "c", "--out", str(tmp_path / "c"), "--quick", "--device", "cpu"]) == 0
    assert not list((tmp_path / "tmp").glob("arms-*"))  # each arm's run folder removed (its checkpoints)
    c = json.loads((tmp_path / "c" / "summary.json").read_text())
    for setting in ("long", "default"):
        runs = c["arms"][setting]
        assert [(r["arm"], r["seed"], r["finished"], r["steps"]) for r in runs] == [("sd off", 0, True, 2),
                                                                                  ("respec", 0, True, 2)]
        assert all(r["rollout_tok_s"] > 0 and r["step_s"] > 0 for r in runs)
        assert set(c["stages"][f"grpo {setting}"]["ratios"]["0"]) == {"rollout_tok_s_x", "step_x"}
    try:
        import trl  # noqa: F401
    except ImportError:  # (CI's case: trl is not one of respec's requirements)
        assert c["stages"]["trl grpo"]["status"].startswith("skipped: trl is not installed here")
    else:
        assert c["stages"]["trl grpo"]["status"] == "ok" and c["trl"]["steps"] == 2 and c["trl"]["step_s_mean"] > 0
        assert set(c["trl"]["respec_x_trl"]) == {"sd off", "respec"}
    assert "SD off against ReSpec" in (tmp_path / "c" / "summary.md").read_text()


def test_trls_arm_without_trl_is_one_line(monkeypatch, capsys):
    """respec/lab/trl_grpo.py where trl is not installed (CI's case): one line, exit 3."""
    import sys

    from respec.lab import trl_grpo

    monkeypatch.setitem(sys.modules, "trl", None)  # an import of it raises ImportError
    assert trl_grpo.main(["--model", "tiny", "--steps", "1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trl is not installed" in err[0]


def test_gpu_check_falls_back_to_the_first_path_that_works(tmp_path, monkeypatch):
    """Where the whole-step path fails the smoke stage, the regional one is tried; the later stages
    run on the first that worked (eager if none did), and each says which. The child's result is
    its last JSON line, whatever it printed after it."""
    import json

    from respec.lab import gpu_check

    def check_where(working: set[str]) -> gpu_check.Check:
        out = tmp_path / "-".join(sorted(working) or ["none"])
        out.mkdir()
        check = gpu_check.Check(out, "a", 100, False, "cpu")

        def run(stage, cmd, limit_s):
            mode = cmd[cmd.index("--compile-mode") + 1]
            figures = {"model": "m", "batch": 2, "path": mode, "first_call_s": {}, "replay_ms": {"decode": 1.0}}
            output = f"a line before\n{json.dumps(figures)}\n[W] a warning at exit, on the shared stream\n"
            return subprocess.CompletedProcess(cmd, 0 if mode in working else 1, output, "")
        monkeypatch.setattr(check, "run", run)
        check.smoke("smoke", 60)
        return check

    check = check_where({"whole", "regional-dynamic"})
    assert check.path == "whole" and check.summary["stages"]["smoke"]["status"] == "ok"
    assert check.summary["smoke"]["path"] == "whole"  # the child's result, read past the warning after it
    check = check_where({"regional-dynamic"})
    assert check.path == "regional-dynamic" and check.compile_args() == ["--compile-mode", "regional-dynamic"]
    assert check.summary["stages"]["smoke"]["status"] == "ok on the fallback (regional-dynamic)"
    check = check_where(set())
    assert check.path == "eager" and check.compile_args() == ["--eager"]
    assert check.compile_args(train=True) == ["--compile", "off"]
    assert check.summary["stages"]["smoke"]["status"].startswith("failed")
    assert "| smoke | failed" in gpu_check.render(check.summary)


def test_gpu_check_refuses_in_its_first_seconds(tmp_path, monkeypatch, capsys):
    """Without what it needs (here: the tokenizer) the check says so in one line, writing nothing."""
    from respec.lab import gpu_check

    monkeypatch.setenv("RESPEC_TOKENIZER", str(tmp_path / "nothing"))
    t0 = time.monotonic()
    assert gpu_check.main(["--part", "a", "--out", str(tmp_path / "out"), "--quick", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: no tokenizer at") and "\n" not in err
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 30


def test_gpu_check_cap_kills_the_whole_process_group(tmp_path):
    """A stage past its cap is killed with its children (torchrun's train.py would otherwise keep
    holding GPU memory), and leaves a line saying so."""
    import json

    from respec.lab import gpu_check

    (tmp_path / "out").mkdir()
    check = gpu_check.Check(tmp_path / "out", "a", 100, True, "cpu")
    child = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
              f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    assert check.run("sleepy", [sys.executable, "-c", script], limit_s=3) is None
    status = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]["sleepy"]["status"]
    assert status.startswith("killed by its cap")
    pid = int(child.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()

def test_gpu_check_cap_dumps_the_stacks_of_processes_that_can(tmp_path):
    """Before the kill, a process below the stage that catches SIGUSR1 (train.py, faulthandler) prints
    every thread's stack into the log, even in a session of its own (as torchrun starts its workers);
    its parent, which would die of SIGUSR1, is sent none (it ends by the SIGTERM, as before)."""
    import os
    import signal

    from respec.lab import gpu_check

    (tmp_path / "out").mkdir()
    check = gpu_check.Check(tmp_path / "out", "a", 100, True, "cpu")
    worker = tmp_path / "worker.pid"
    code = ("import faulthandler, os, signal, time; faulthandler.register(signal.SIGUSR1, all_threads=True); "
            f"open({str(worker)!r}, 'w').write(str(os.getpid())); time.sleep(300)")
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True); time.sleep(300)"
    try:
        assert check.run("hung", [sys.executable, "-c", script], limit_s=5) is None
        check.log.flush()
        assert "most recent call first" in (tmp_path / "out" / "check.log").read_text()
    finally:
        if worker.is_file():  # the worker, in a session of its own, outlives the group's SIGTERM
            os.kill(int(worker.read_text()), signal.SIGKILL)


def test_profile_step_parts_add_up(tmp_path):
    """respec/lab/profile_step.py on the tiny model: every shape profiled, the parts sum to the
    step (the rest is what is left over, never negative beyond timer noise), the report written."""
    import json

    from respec.lab import profile_step

    out = tmp_path / "prof.json"
    assert profile_step.main(["--model", "tiny", "--batch-sizes", "1,2", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["step"], r["batch"]) for r in rows] == [("decode", 1), ("verify k=3", 1), ("decode", 2), ("verify k=3", 2)]
    for r in rows:
        parts = r["blocks"] + r["head"] + r["sampling"] + r["rest"]
        assert parts == pytest.approx(r["total"], abs=0.05) and r["rest"] > -0.5 and r["blocks"] > 0
        assert r["blocks: matmul"] + r["blocks: attention"] + r["blocks: other"] == pytest.approx(r["blocks"], abs=0.05)
    assert profile_step.main(["--model", "tiny", "--json", str(out)]) == 2  # never overwritten


def test_host_overhead_parts_are_exclusive_and_add_up(tiny, monkeypatch):
    """`python -m respec.lab.host_overhead --parts`: each wrapped call is timed less the wrapped calls
    inside it (a clock the test moves: an outer call of 5 s around an inner one of 3 s is 2 s and
    3 s); on a rollout (tiny model, eager, an EAGLE head, k = 3) every part of an SD step is there,
    none negative, the parts and the compiled steps add up to no more than the rollouts ("other" is
    what is left, not negative), and the engine module's read-back is its own again afterwards."""
    import respec.engine
    from respec.lab import host_overhead

    now = [0.0]
    monkeypatch.setattr(host_overhead.time, "perf_counter", lambda: now[0])

    class Work:
        def inner(self):
            now[0] += 3.0

        def outer(self):
            now[0] += 1.0
            self.inner()
            now[0] += 1.0
    times, work = host_overhead.ExclusiveTimes(), Work()
    times.wrap(work, "inner", "inner")
    times.wrap(work, "outer", "outer")
    work.outer()
    work.inner()
    assert times.seconds == {"outer": 2.0, "inner": 6.0}
    monkeypatch.undo()

    import respec.sd_ahead

    read_back, run, record = respec.engine.read_back, respec.sd_ahead.sd_run_ahead, respec.sd_ahead._record
    prompts = host_overhead.prompts_for(3, tiny.cfg.vocab_size)
    seen = set()
    for run_ahead in (0, 32):  # SD steps one by one, then run ahead of the host (respec/sd_ahead.py)
        engine = host_overhead.build_engine(tiny, 3, True, eager=True, drafter="eagle", run_ahead=run_ahead)
        parts = host_overhead.host_parts(engine, prompts, 12, runs=1)
        assert (respec.engine.read_back, respec.sd_ahead.sd_run_ahead, respec.sd_ahead._record) == (read_back, run, record)
        assert "compiled steps" not in parts and "prefill" not in parts
        assert all(us >= 0 for us in parts.values()), parts
        assert (parts["record tokens"] > 0 and parts["drafter draft"] > 0) if not run_ahead else \
            parts["SD run ahead: record"] > 0 and parts["drafter advance"] > 0
        seen |= set(parts)
    assert {label for label, _, _ in host_overhead.PARTS} - {"plain steps"} <= seen


def test_replay_bench_and_flips_smoke(tmp_path):
    """respec/lab/replay_bench.py and flips.py on the tiny model: the rollouts with and without
    replay drafts are the same tokens (fp32), the forecast and the fields scripts read are there,
    and an existing --json is never overwritten."""
    import json

    from respec.lab import flips, replay_bench

    out = tmp_path / "replay.json"
    assert replay_bench.main(["--model", "tiny", "--task", "toy-letters", "--train-size", "2", "--group", "2",
                              "--prompts", "2", "--steps-between", "1", "--batch-sizes", "1,2", "--requests", "2",
                              "--max-new-tokens", "12", "--reps", "1", "--dtype", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert [r["max_active"] for r in report["results"]] == [1, 2]  # the batch size is what decoded at once
    for r in report["results"]:
        assert r["same_as_plain"] and r["plain_tok_s"] > 0 and r["sd_tok_s"] > 0 and r["accept_len"] >= 1
        assert r["forecast_decode_speedup"] > 0 and r["forecast_every_step_speedup"] > 0
    assert replay_bench.main(["--model", "tiny", "--json", str(out)]) == 2
    assert replay_bench.main(["--model", "tiny", "--drafter", "history"]) == 2  # no replay: one line

    fl = tmp_path / "flips.json"
    assert flips.main(["--model", "tiny", "--dtype", "fp32", "--train-dtype", "fp32", "--requests", "4", "--batch",
                       "4", "--max-new-tokens", "24", "--json", str(fl)]) == 0
    paths = json.loads(fl.read_text())["paths"]
    assert set(paths) == {"plain, batch 4", "batch 1", "verify 17 wide", "recompute"}
    assert paths["recompute"]["preemptions"] > 0
    compared = [p for name, p in paths.items() if name != "plain, batch 4"]
    assert all(p["tokens_compared"] > 0 and p["logprob_gap_max"] < 1e-4 for p in compared)  # fp32: every path is
    assert all(p["mismatch_logratio_max"] < 1e-4 for p in paths.values())  # plain decoding's and the trainer's


@pytest.mark.parametrize("argv,needle", [(["--taus", "0.5,0"], "--taus must be positive"),
                                         (["--taus", "a"], "comma-separated numbers")])
def test_draft_temperature_bad_input(capsys, argv, needle):
    from respec.lab import draft_temperature

    assert draft_temperature.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
