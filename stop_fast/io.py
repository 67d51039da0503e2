"""Writing files: the one atomic writer of the package, and byte-stable safetensors.

Every file stop_fast writes is either the old one or the new one.

``atomic_path(path)`` yields a temporary name in the same folder to write to; on success the file is
flushed to disk (fsync), renamed over ``path`` and the folder fsynced, on error it is removed. Files
are created like ``open()`` creates them (mode 0666 minus the umask), never 0600 as
``tempfile.mkstemp`` would. A temporary name carries the host and process that writes it
(``.NAME.HOST.PID.TOKEN.tmp.SUFFIX``): each new write removes the temporaries in its folder that a
process of this host left when it was killed mid-write (a process that still runs keeps its own), so
a killed save costs no disk for longer than the next save. The suffix stays last, so writers that
pick a format by the file name (``torch.save``, matplotlib) see the real one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, Union

PathLike = Union[str, os.PathLike]

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` atomically."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    remove_stale_temporaries(folder)
    tmp = folder / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    # O_EXCL: never follow or reuse someone else's file; 0o666 lets the umask decide, as open() does.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield str(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: PathLike, payload: Any) -> None:
    """``payload`` as indented JSON with sorted keys (equal contents, equal bytes), atomically."""
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def safetensors_bytes(tensors: Dict[str, Any], metadata: Dict[str, str]) -> bytes:
    """``safetensors.torch.save(tensors, metadata)`` with the metadata in sorted key order, so that
    equal contents give equal bytes: safetensors serialises its metadata from a hash map, whose
    order changes from call to call. The header keeps its length (the same keys and values,
    reordered), so every tensor offset stays valid."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # cannot happen for safetensors' own compact JSON; never write a broken file
        raise RuntimeError("safetensors_bytes: the reordered header does not fit the original's length")
    return data[:8] + text.ljust(length, b" ") + data[8 + length :]


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporaries in ``folder`` whose writer (a process of this host) no longer runs."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TEMPORARY.match(entry.name)
            if match and match["host"] == _HOST and not _process_alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists (another user's), or cannot tell: leave its file alone
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
