"""The process's host memory: what it holds now, its peak, and handing freed memory back.

On a CPU the run's tensors live in the process's heap. glibc's malloc keeps what a phase frees
(the rollout's temporaries, the update's activations and gradients, a background distillation's
features in its thread's arena) for later allocations instead of returning it to the OS, so the
resident size climbs with every phase that allocates somewhere new, and a peak is the live memory
plus all the freed memory held beside it. `release_free_memory` (glibc's `malloc_trim`) returns
it: the trainer calls it between phases on the CPU (1-33 ms).

Within a rollout the opposite holds: a decoding step frees and allocates the same large blocks
every step (a 64-row verify's logits over a 49,152-token vocabulary: 50 MB). glibc maps a block
that large anew on each allocation and unmaps it when freed, so every step faults its pages in and
zeroes them again. `heap_reused` keeps such blocks in the heap for the length of a rollout (the
engine generates inside it on a CPU); the trainer's trim after the rollout hands them back.

What a trim does not return leaves with its process: after the default head's pretraining in the
same process, 0.55 GiB stayed resident, trimmed, held by no Python object (caches below Python, or
heap pages pinned by a few live allocations; not traced further). `run_apart` runs such a one-off
job in a child process, so that a run starts from what the job wrote to disk."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _glibc(name: str):
    """glibc's function `name`, or None where the C library is another (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
if _MALLOPT is not None:
    _MALLOPT.argtypes, _MALLOPT.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int  # (C ints: < 2 GiB)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# Inside `heap_reused`: every block up to 1 GiB from the heap, and no free below 1 GiB handed back.
REUSE = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 1 << 30}
# After it: the mmap threshold where a busy process's own ends up (by default it rises to the size
# of the largest mapped block freed, up to 32 MiB on a 64-bit machine; setting it ends that rise),
# so that the update's large blocks are mapped as before. The trim threshold stays high: put back
# low, the first free after a rollout would hand the heap's top back at once (measured: 0.24 ms a
# step at 64 rows, the next rollout faulting it all in again), where the caller trims when it means
# to (the trainer, after every rollout and every update: `release_free_memory`).
GLIBC_OWN_MAX = 32 << 20
SETTLED = {M_MMAP_THRESHOLD: GLIBC_OWN_MAX}


@contextlib.contextmanager
def heap_reused(largest: int | None = None):
    """Blocks freed inside are kept in the heap for the next allocation rather than unmapped, and
    large blocks come from the heap rather than from a fresh mapping (glibc's `mallopt`; elsewhere
    nothing changes). What is kept stays resident, after it too, until `release_free_memory`. Only
    where the work inside can make a block larger than glibc's own rule ever keeps (`largest` bytes;
    None: in any case): below that, the process's thresholds are left as they are."""
    global _reusing
    if _MALLOPT is None or _reusing or (largest is not None and largest <= GLIBC_OWN_MAX):
        yield  # (not glibc; inside one already, which puts them back; or nothing that large)
        return
    for param, value in REUSE.items():
        _MALLOPT(param, value)
    _reusing = True
    try:
        yield
    finally:
        _reusing = False
        for param, value in SETTLED.items():
            _MALLOPT(param, value)


_reusing = False


def release_free_memory(full: bool = False) -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc `malloc_trim`, every
    arena); a no-op where the C library has none. The collection is of the young generations only
    unless `full` (a full one walks every object the process holds: ~0.13 s with transformers
    imported, which the trainer calling this twice a step would pay every step)."""
    gc.collect() if full else gc.collect(1)
    if _TRIM is not None:
        _TRIM(0)


def run_apart(fn, /, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh Python process (`python -m respec.host_memory`); its result is
    returned and its exception raised here, and its memory is the OS's again once it returns. `fn`
    and the arguments must pickle (a module-level function, plain data, a tokenizer, a task). The
    child imports only what the job needs (not this process's main script, as multiprocessing's
    spawn would) and inherits the environment and the import path; its output is this process's."""
    with tempfile.TemporaryDirectory(prefix="respec-apart-") as tmp:
        job, out = Path(tmp) / "job.pkl", Path(tmp) / "out.pkl"
        job.write_bytes(pickle.dumps((fn, args, kwargs)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.run([sys.executable, "-m", "respec.host_memory", str(job), str(out)], env=env)
        if not out.is_file():  # killed (out of memory, a signal) before it could say why
            raise RuntimeError(f"{getattr(fn, '__name__', fn)} died in its child process (exit status "
                               f"{proc.returncode})")
        ok, value = pickle.loads(out.read_bytes())
    if ok:
        return value
    raise value


def _child(job: str, out: str) -> None:
    """`run_apart`'s other end: run the pickled job, pickle what it returned or raised."""
    try:
        fn, args, kwargs = pickle.loads(Path(job).read_bytes())
        result = (True, fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - handed back to the parent, which raises it
        e.add_note("(in the child process of respec.host_memory.run_apart:)\n" + traceback.format_exc().rstrip())
        result = (False, e)
    try:
        data = pickle.dumps(result)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its text does
        data = pickle.dumps((False, RuntimeError(traceback.format_exc().rstrip())))
    Path(out).write_bytes(data)


def picklable(obj) -> bool:
    """Whether `obj` can be handed to a child process (`run_apart`): it pickles, and it is not a
    function of this process's main script (pickled by name, which the child cannot look up)."""
    if getattr(obj, "__module__", None) == "__main__":
        return False
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - pickle raises many kinds (PicklingError, AttributeError, TypeError)
        return False
    return True


if __name__ == "__main__":
    _child(*sys.argv[1:])
