"""What keeps a user's data safe whatever the command line says.

* `check_output(out, inputs, what)`: an output folder is never one of the inputs, inside one,
  nor around one, so no step overwrites the originals or reads its own output back next run.
* `folder_lock(folder, what)`: one run writes a folder at a time. The lock is an flock on
  `<folder>/.usfmae.lock`: the kernel drops it when the process dies, so a run killed with
  kill -9 never leaves a stale lock behind, and the next run just resumes (forked workers drop
  their inherited copies in `end_with_parent`, so they cannot keep it alive).
  With shared=True (the shards of one step, `usfmae finetune --shard I/N`) several runs hold it at
  once, and a run that wants it alone still stops.
* `claim(lock_file, what, wait)`: one process does one unit of work (a fine-tuning run) at a time,
  whoever else shares the folder: the shards of a grid claim each run before training it.
* `end_with_parent()`: called in every worker process, so that workers die with the run that
  started them instead of computing for nobody after a kill -9.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from . import UsfmaeError

LOCK_NAME = ".usfmae.lock"


# ============================================================================ outputs vs inputs
def _real(path) -> Path:
    return Path(path).expanduser().resolve()


def check_output(out, inputs, what: str = "output folder") -> None:
    """Refuse an output path that is an input, lies inside one, or holds one.

    out: the folder (or file) a step writes; inputs: the folders or files it reads (None skipped).
    Symbolic links are resolved first, so a link cannot hide the overlap."""
    o = _real(out)
    for inp in inputs:
        if inp is None:
            continue
        i = _real(inp)
        if o == i:
            how = "is the same as"
        elif o.is_relative_to(i):
            how = "lies inside"
        elif i.is_relative_to(o):
            how = "holds"
        else:
            continue
        raise UsfmaeError(f"{what} {out} {how} the input {inp}: writing there would overwrite or mix with "
                          f"the input (and a later run would read its own output back); choose an {what} "
                          f"outside {inp}")


# ============================================================================ one run per folder
def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def folder_lock(folder, what: str, shared: bool = False):
    """Hold `<folder>/.usfmae.lock` for the duration; a second run into the same folder stops
    (after GRACE_S seconds, the time a killed run's workers take to go) with a message naming the
    run that holds it. `what` says who holds it (e.g. "usfmae clean"). Re-entrant within one
    process (a notebook kernel may call a step twice). shared=True: runs that all ask for it shared
    (a grid's shards) hold it together; one that asks alone waits for none of them and stops."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / LOCK_NAME
    key = str(lock_file.resolve())
    if key in _held:  # this process holds it already
        yield lock_file
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | (os.O_APPEND if shared else 0), 0o644)
    try:
        _take(fd, folder, lock_file, shared)
        if not shared:  # shared holders append a line each; the last one out does not clean up (harmless)
            os.ftruncate(fd, 0)
        os.write(fd, f"{what}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        _held[key] = fd
        try:
            yield lock_file
        finally:
            _held.pop(key, None)
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


_held: dict[str, int] = {}  # lock file -> descriptor, of the locks this process holds
GRACE_S = 5.0  # a run killed a moment ago may still have workers exiting, each holding the lock


def _take(fd: int, folder: Path, lock_file: Path, shared: bool = False) -> None:
    import fcntl

    deadline = time.monotonic() + GRACE_S
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UsfmaeError(f"{folder} is being written by another run ({_holder(lock_file)}); wait for it "
                                  f"to finish, or choose another output folder") from None
            time.sleep(0.1)


@contextlib.contextmanager
def claim(lock_file, what: str, wait: bool = True):
    """Hold an exclusive flock on `lock_file` for the duration and yield True; wait=False yields False
    at once when another process holds it (the caller does something else first). The kernel drops
    the lock when its holder dies, so a killed process never leaves a claim behind. On a shared
    filesystem (a cluster's), flock must reach every machine: true of NFSv4 and of Lustre mounted
    with `flock`, not of Lustre's `localflock`."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{what}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield True
    finally:
        os.close(fd)


# ============================================================================ workers
def end_with_parent() -> None:
    """Make this worker process exit when the process that started it dies, and drop the copies of
    its parent's folder locks that a forked worker inherits.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG). Elsewhere,
    and as a second guard, a daemon thread checks every half second that the parent is alive.
    The parent is the process multiprocessing says started this one, not the current getppid(): a
    spawned worker still importing when its parent was killed has been re-parented already, and
    would otherwise watch its new parent (init) forever."""
    import multiprocessing

    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
    # A forked worker shares its parent's lock descriptors: closing its copies (never unlocking)
    # lets the lock go as soon as the parent dies, not when the last worker has exited.
    for fd in list(_held.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()
