"""A run owns its output folder: an advisory lock on ``OUT/.lock`` for as long as it runs.

Two runs writing into one folder would interleave ``metrics.jsonl``, overwrite each other's prompts
and prune each other's checkpoints. :class:`RunLock` takes an exclusive ``flock`` on ``OUT/.lock``
(rank 0 only under torchrun) and writes who holds it (command, host, pid, start time) into the
file; a second run there fails at once with one line naming the holder. The kernel releases the lock
when the holding process exits, however it exits (``kill -9`` included), so a crashed run never
leaves a stale lock behind: the file stays, the lock does not.

What it guarantees: on one machine, always. Across machines, only where the file system
implements ``flock`` across clients: NFSv4 does (Linux maps ``flock`` onto NFS byte-range locks),
NFSv3 needs its lock daemon, and some network or FUSE file systems (object-store mounts, some
SMB setups) accept the call without telling other clients. Where the file system refuses locks,
the run warns and goes on unlocked.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


class RunLockedError(OSError):
    """Another run holds the output folder (an OSError, like any busy resource)."""


class RunLock:
    """``with RunLock(out, "train"):`` holds ``out`` for the block; a held folder raises RunLockedError."""

    def __init__(self, out: str, command: str):
        self.path = os.path.join(out, LOCK_FILE)
        self.command = command
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"{os.path.dirname(self.path) or '.'} is in use by another run ({holder}); "
                                 "wait for it to finish or choose another --out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("%s: this file system does not support locks (%s); nothing stops another run from "
                        "writing into the same folder", self.path, os.strerror(exc.errno))
        holder = {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a new holder)
            self._fd = None
        return False


@contextlib.contextmanager
def hold_run_folder(out: str, command: str, info, device):
    """Rank 0 holds ``out`` (:class:`RunLock`) for the block; every rank stops if it cannot, so no rank
    waits on one that left. ``info``: the run's ``distributed.Dist``."""
    from . import distributed

    lock, failure = RunLock(out, command), None
    if info.main:
        try:
            lock.__enter__()
        except OSError as exc:
            failure = exc
    if distributed.any_rank(failure is not None, info, device):
        raise failure or RunLockedError(f"{out} is in use by another run (rank 0 could not lock it)")
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return (f"stop-fast {holder['command']}, pid {holder['pid']} on {holder['host']}, started "
                f"{holder['started']}")
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
