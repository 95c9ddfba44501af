"""One writer per checkpoint set: a lock file that names the process holding it.

The lock is an OS file lock (``flock``) on ``path``, so the kernel releases it when its holder
ends, even by SIGKILL: the file a dead holder leaves behind is simply taken over. The file's
text (``PID HOST``) is only there to name the holder in the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from common.core.errors import DataError

_HELD: dict[Path, int] = {}  # lock path -> open file descriptor, for this process


def claim(path: str | Path) -> None:
    """Hold the lock ``path`` until :func:`release` or the end of this process.

    Raises DataError naming the holder when another process holds it; a second claim by
    this process is a no-op.
    """
    path = Path(path).absolute()
    if path in _HELD:
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            fix = "train into a writable folder (medgen3d train --out, or ckpt_dir)"
            raise DataError(str(path), f"cannot be created ({e.strerror})", fix) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise DataError(
                str(path),
                f"training process {pid} (host {host}) is writing these checkpoints",
                f"wait for it to end, stop it (kill {pid}), or train into another folder "
                "(medgen3d train --out, or ckpt_dir)",
            ) from None
        except OSError as e:  # e.g. a network file system without locks
            os.close(fd)
            fix = "train into a folder on a local disk (medgen3d train --out, or ckpt_dir)"
            raise DataError(str(path), f"cannot be locked ({e.strerror})", fix) from e
        try:  # the file we locked may have been removed by a holder releasing it meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _HELD[path] = fd


def release(path: str | Path) -> None:
    """Remove the lock ``path`` if this process holds it."""
    path = Path(path).absolute()
    fd = _HELD.pop(path, None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)
