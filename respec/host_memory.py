"""The process's host memory: what it holds now, its peak, and handing freed memory back.

On a CPU the run's tensors live in the process's heap. glibc's malloc keeps what a phase frees
(the rollout's temporaries, the update's activations and gradients, a background distillation's
features in its thread's arena) for later allocations instead of returning it to the OS, so the
resident size climbs with every phase that allocates somewhere new, and a peak is the live memory
plus all the freed memory held beside it. `release_free_memory` (glibc's `malloc_trim`) returns
it: the trainer calls it between phases on the CPU (1-33 ms).

What a trim does not return leaves with its process: after the default head's pretraining in the
same process, 0.55 GiB stayed resident, trimmed, held by no Python object (caches below Python, or
heap pages pinned by a few live allocations; not traced further). `run_apart` runs such a one-off
job in a child process, so that a run starts from what the job wrote to disk."""

from __future__ import annotations

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


def _libc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


_TRIM = _libc_trim()


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
