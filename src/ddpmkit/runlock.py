"""A per-run lock file so that two `ddpm train` processes never write the same run.

The lock is an advisory `flock` on WORKDIR/models/RUN/.lock: the kernel releases it when the
holder exits for any reason (even SIGKILL), so a crashed run never leaves a stale lock.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DdpmError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are not protected there
    fcntl = None


class RunLock:
    """Context manager holding an exclusive lock on a run folder."""

    def __init__(self, run_dir: str | Path, run_name: str):
        self.path = Path(run_dir) / ".lock"
        self.run_name = run_name
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        if fcntl is None:
            return self
        # Folders this lock creates are removed again if the run writes nothing (e.g. bad data).
        try:  # exists() raises, not returns False, for a name too long for the file system
            self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DdpmError(f"cannot create the run lock {self.path}: {os.strerror(exc.errno)}; "
                            "choose a writable --workdir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DdpmError(f"run '{self.run_name}' is being trained by another process (pid {holder}, lock "
                            f"{self.path}); wait for it to finish or use another --run-name") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise DdpmError(f"cannot write the run lock {self.path}: {os.strerror(exc.errno)}") from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is None:
            return False
        if self._created and [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
            self.path.unlink()  # still holding the lock: nobody else can be using this file
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:
                    break
        os.close(self.fd)  # closing releases the flock
        self.fd = None
        return False
