"""respec/host_memory.py: a job in a child process (the default head's pretraining), and freed
memory handed back."""

import math
import os
import sys
import types

import pytest

from respec import host_memory


def test_a_job_apart_returns_its_result_and_raises_its_error():
    assert host_memory.run_apart(math.factorial, 5) == 120
    assert host_memory.run_apart(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ValueError, match="invalid literal") as caught:
        host_memory.run_apart(int, "x")
    assert any("child process" in note for note in getattr(caught.value, "__notes__", []))
    with pytest.raises(RuntimeError, match="died in its child process.*status 3"):
        host_memory.run_apart(os._exit, 3)

    def from_the_main_script(msg):  # as train.py's log is when train.py runs
        return msg

    assert host_memory.picklable(math.factorial) and not host_memory.picklable(lambda m: m)
    from_the_main_script.__module__ = "__main__"
    assert not host_memory.picklable(from_the_main_script)
    ghost = types.ModuleType("respec_only_in_the_parent")  # pickled by name, not importable in the child
    ghost.job = from_the_main_script
    from_the_main_script.__module__, from_the_main_script.__qualname__ = ghost.__name__, "job"
    sys.modules[ghost.__name__] = ghost
    try:
        with pytest.raises(ModuleNotFoundError, match="respec_only_in_the_parent") as caught:  # the child's error
            host_memory.run_apart(from_the_main_script, "x")
        assert any("child process" in note for note in getattr(caught.value, "__notes__", []))
    finally:
        del sys.modules[ghost.__name__]


def test_the_default_head_is_pretrained_apart(monkeypatch, tmp_path):
    """A missing default head is pretrained by `run_apart` (the run then starts without the memory
    the pretraining held), with the caller's arguments; a cached one is not pretrained again."""
    from respec import drafter_choice
    from respec.tasks import make_task

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path))
    calls = []

    def apart(fn, *args, **kwargs):
        calls.append((fn, args, kwargs))
        (args[1]).mkdir(parents=True)
        (args[1] / "config.json").write_text("{}")

    monkeypatch.setattr(host_memory, "run_apart", apart)
    task = make_task(task="toy-letters")
    head = drafter_choice.default_head("tiny", "toy-letters", task, "TOKENIZER", max_new_tokens=32, seed=7,
                                       log=lambda m: None)
    (fn, args, kwargs), = calls
    assert fn is drafter_choice.pretrain_default_head and args == ("tiny", head, "TOKENIZER", task)
    assert kwargs["max_new_tokens"] == 32 and kwargs["seed"] == 7 and host_memory.picklable(kwargs["log"])
    drafter_choice.default_head("tiny", "toy-letters", task, "TOKENIZER", max_new_tokens=32, log=lambda m: None)
    assert len(calls) == 1


def test_freed_memory_goes_back_to_the_os():
    """Memory freed in the middle of the heap stays resident until `release_free_memory` hands it
    back (glibc; elsewhere it is a no-op and the check is skipped). Both halves are checked: held
    without the call, returned with it."""
    import gc

    import torch

    if host_memory._TRIM is None:
        pytest.skip("not glibc: no malloc_trim")
    host_memory.release_free_memory(full=True)
    before = host_memory.rss_bytes()
    chunks = [torch.ones(1 << 14) for _ in range(8000)]  # 500 MiB in 64 KiB pieces: heap memory, not mmap's
    pin = torch.ones(1 << 14)  # above them: the heap's top cannot shrink past it
    grown = host_memory.rss_bytes() - before
    del chunks
    gc.collect()
    held = host_memory.rss_bytes() - before
    host_memory.release_free_memory()
    assert grown > 400 << 20 and held > 400 << 20 and host_memory.rss_bytes() - before < 64 << 20
    assert host_memory.peak_rss_bytes() >= before + grown - (16 << 20)  # (two counts of pages)
    del pin


def _kept_after_a_free() -> int:
    """Bytes still resident after a 64 MiB tensor (over any mmap threshold glibc picks by itself) is
    made and freed."""
    import torch

    host_memory.release_free_memory()
    before = host_memory.rss_bytes()
    block = torch.ones(16 << 20)
    del block
    return host_memory.rss_bytes() - before


def _kept_outside_inside_nested_after() -> list[int]:
    kept = [_kept_after_a_free()]
    with host_memory.heap_reused(largest=host_memory.GLIBC_OWN_MAX):  # nothing larger: left alone
        kept.append(_kept_after_a_free())
    with host_memory.heap_reused(largest=64 << 20):
        kept.append(_kept_after_a_free())
        with host_memory.heap_reused():  # nested: the outer one still holds when the inner ends
            pass
        kept.append(_kept_after_a_free())
    kept.append(_kept_after_a_free())
    host_memory.release_free_memory()
    return kept


def test_a_rollout_keeps_its_large_blocks_in_the_heap():
    """Inside `heap_reused` a large freed block stays in the heap for the next allocation; outside
    it, before and after, and inside one told that nothing larger than glibc keeps by itself is
    made, glibc unmaps it on the free (both sides checked). In a fresh process: in this one, a
    block that large may already sit free in the heap from an earlier test."""
    if host_memory._MALLOPT is None:
        pytest.skip("not glibc: no mallopt")
    outside, small, inside, nested, after = host_memory.run_apart(_kept_outside_inside_nested_after)
    assert outside < 8 << 20 and small < 8 << 20 and after < 8 << 20, (outside, small, after)
    assert inside > 56 << 20 and nested > 56 << 20, (inside, nested)


def test_the_engine_generates_in_the_reused_heap_on_a_cpu(tiny, monkeypatch):
    """The engine's rollouts on a CPU run inside `heap_reused`, told the fp32 logits of their widest
    k-draft step: padded rows x (k + 1) x the vocabulary (49,152 here); 64 rows of a 3-draft verify
    (50 MB) make the setting, the others stay under glibc's own threshold."""
    import contextlib

    from respec import engine as engine_module
    from respec.drafters.history import HistoryDrafter

    entered = []

    @contextlib.contextmanager
    def recorded(largest):
        entered.append(largest)
        yield

    monkeypatch.setattr(engine_module, "heap_reused", recorded)
    params = engine_module.SamplingParams(max_new_tokens=4, temperature=0.0)
    plain = engine_module.RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, max_batch=64)
    plain.generate([[3, 4, 5]], params)
    plain.generate([[3, 4, 5]] * 40, params)  # (a batch of 40 steps padded to 64 rows)
    sd = engine_module.RolloutEngine(tiny, kv_cache_bytes=64 << 20, eager=True, max_batch=64,
                                     drafter=HistoryDrafter(), num_draft_tokens=3)
    sd.generate([[3, 4, 5]] * 40, params)
    assert entered == [1 * 49152 * 4, 64 * 49152 * 4, 64 * 4 * 49152 * 4]
    assert entered[-1] > host_memory.GLIBC_OWN_MAX >= entered[1]
