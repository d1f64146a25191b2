"""What stops a training run, and how it stops cleanly.

* Ctrl-C (SIGINT): the first one asks the run to stop (`StopRequest`). A single process abandons
  the rollout in flight at once (nothing has changed since the last completed step); under torchrun
  the ranks agree at the end of the step (an all-reduce of the request), since no rank may leave a
  collective the others are in. Either way the run writes a checkpoint of its last completed step,
  unless it has one, and ends with `RunInterrupted` (exit code 130); `--resume` continues exactly.
  A second Ctrl-C interrupts at once, as Python's default does.
* Non-finite loss or gradients: the optimizer step is skipped and counted (`skipped_updates` in
  the metrics); a step whose every update was skipped is not checkpointed. After `max_bad_steps`
  such steps in a row the run ends with `RunFailed`, the last good checkpoint kept.
* A checkpoint that cannot be written (a full disk): `respec/checkpoint.py` removes its partial
  files and raises `CheckpointError`; the previous checkpoint stays the latest.
* A run that hangs: every checkpoint and every phase after the last step (exports, plots, the
  process group's teardown) says on stderr when it starts and how long it took (`announced`), so
  the last line names the phase a stuck run is in; and train.py dumps every thread's stack on
  SIGUSR1 (faulthandler), which a supervisor sends before it kills a stage.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time


class RunInterrupted(Exception):
    """The run stopped at the user's request; its last completed step is checkpointed."""


class RunFailed(Exception):
    """The run cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


class StopRequest:
    """Turns the first SIGINT into a flag (`requested`); the second raises KeyboardInterrupt.
    A context manager: the previous handler comes back on exit. Outside the main thread (where
    Python cannot install signal handlers) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class BadStepStreak:
    """Counts RL steps in a row whose every optimizer update was skipped for a non-finite loss."""

    def __init__(self, limit: int = 3):
        self.limit, self.count = limit, 0

    def record(self, all_skipped: bool, step: int, last_checkpoint: int | None) -> None:
        self.count = self.count + 1 if all_skipped else 0
        if self.count >= self.limit:
            kept = f"the last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint else "no checkpoint was written"
            raise RunFailed(f"the loss was not finite in {self.count} steps in a row (steps {step - self.count + 1}-{step}): "
                            f"stopped; {kept} (try a lower --lr)")


@contextlib.contextmanager
def announced(tag: str, what: str, log):
    """`[tag] what ...` on `log` as the block starts, `[tag] what ... 1.2 s` as it ends (no second
    line if it raises: the error says the rest). For phases with no progress of their own, where a
    hang would otherwise leave nothing to read; `log` is the main rank's (a no-op elsewhere)."""
    log(f"[{tag}] {what} ...")
    t0 = time.perf_counter()
    yield
    log(f"[{tag}] {what} ... {time.perf_counter() - t0:.1f} s")
