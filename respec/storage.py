"""How respec writes files: a failed write is one line naming the path and the free space, and a
write a crash interrupts leaves nothing that a later run trips over.

* `writing(path)`: a block that writes `path`; an `OSError` from it (a full disk, a read-only or lost
  mount, no permission) becomes a `WriteError` whose message names the path, the cause and the free
  space of its filesystem. A full disk does not always say so: `torch.save` ends with `RuntimeError:
  [enforce fail at inline_container.cc] unexpected pos ...` and DCP wraps a writer's error in a
  `CheckpointException` (a `BaseException`); those count as a failed write when the filesystem has
  (next to) no space left, and pass through unchanged otherwise (a bug is not a disk problem).
* `append_lines(path, lines)`: JSON-lines logs (metrics, completions) grow by whole lines or not at
  all: a failed append is cut back to the file's old length, so what was logged stays readable.
* `staging(final)`: a temporary sibling of `final` to write into before renaming it into place, held
  under an advisory lock (`flock`) for as long as its writer lives. The lock dies with the process,
  so a later `staging` of the same `final` removes the siblings of killed writers (a pretraining cut
  short, a conversion killed) and never a live writer's (two runs filling one cache at once).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
FULL_BELOW = 1 << 20  # bytes free under which a write's odd failure is taken for a full disk
STALE_AFTER_S = 5.0  # a sibling younger than this may be a writer between mkdtemp and its lock


class WriteError(OSError):
    """A file could not be written; the message (one line) names it and its filesystem's free space,
    `cause` says why and where (e.g. `No space left on device; 0 B free on its filesystem`)."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause or message


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds `path` (its nearest existing parent), or None."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def causes(e: BaseException):
    """`e`, what it was raised from, and the exceptions a DCP `CheckpointException` carries per rank."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__]
        for failure in (getattr(x, "failures", None) or {}).values():  # {rank: exception or (exception, trace)}
            stack.append(failure[0] if isinstance(failure, tuple) else failure)


def write_failure(path: Path, e: BaseException) -> WriteError | None:
    """The `WriteError` of an exception raised while writing `path`, or None where it is no failed write."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    free = free_bytes(path)
    chain = list(causes(e))
    errors = [x for x in chain if isinstance(x, OSError)]
    said = any(os.strerror(errno.ENOSPC) in str(x) for x in chain)  # (safetensors' error only says it in words)
    if any(x.errno in NO_SPACE for x in errors) or said or (free is not None and free < FULL_BELOW):
        cause = os.strerror(errno.ENOSPC)
    elif errors:
        cause = errors[0].strerror or (str(errors[0]).splitlines() or [type(errors[0]).__name__])[0]
    else:
        return None
    room = f"{human(free)} free on its filesystem" if free is not None else "its filesystem cannot be read"
    return WriteError(f"cannot write {path} ({cause}; {room})", f"{cause}; {room}")


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write of `path` inside the block into a one-line `WriteError`."""
    try:
        yield
    except BaseException as e:
        failure = write_failure(Path(path), e)
        if failure is None or failure is e:
            raise
        raise failure from e


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines (each without its newline) or none: a failed write is cut back."""
    path = Path(path)
    with writing(path), open(path, "a") as f:
        start = f.tell()
        try:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(start)  # (frees what the partial write took)
            raise


def write_text(path: Path, text: str) -> None:
    """A whole file, written aside and renamed into place: a reader sees the old or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _locked(fd: int) -> bool:
    """Is the directory or file open as `fd` locked by a live writer (try to take the lock)?"""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def remove_stale(final: Path) -> list[Path]:
    """Remove the staging siblings of `final` whose writers are gone; returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for sibling in final.parent.glob(final.name + ".tmp*"):
        try:
            if time.time() - sibling.stat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(sibling, os.O_RDONLY)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            if _locked(fd):
                continue
        finally:
            os.close(fd)
        _remove(sibling)
        removed.append(sibling)
    return removed


@contextlib.contextmanager
def staging(final: Path, *, directory: bool = True):
    """A new directory (or empty file) `<final>.tmpXXXXXXXX` next to `final`, locked while this
    process writes it; yields its path. The caller renames it into place; what is left is removed
    on exit. Stale siblings of killed writers are removed first; a failed write is a `WriteError`."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
            fd = os.open(tmp, os.O_RDONLY)
        else:
            fd, name = tempfile.mkstemp(prefix=final.name + ".tmp", dir=final.parent)
            tmp = Path(name)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with writing(final):
            yield tmp
    finally:
        _remove(tmp)  # (gone already where it was renamed into place)
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
