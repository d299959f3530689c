"""Output folders that fail safe: checked before any work starts, and owned by one run at a time.

- `check_writable` refuses a folder that is a file, lies under a file or cannot be written,
  with one line naming it and the fix, before data loads or anything compiles (and, unless
  asked to create it, without writing anything).
- `RunLock` holds an exclusive `flock` on `<output_dir>/.lock` for the run's life. The OS
  releases it when the process ends in any way (SIGKILL included), so a stale lock never
  blocks a new run; a second run into the same folder is refused naming the holder's PID.
"""

import errno
import fcntl
import os
import shutil
from pathlib import Path

LOCK_FILE = ".lock"


class OutputDirError(ValueError):
    """An output folder that cannot be used; the message names it and says what to do."""


def check_writable(path: str | Path, flag: str = "--output_dir", create: bool = False) -> Path:
    """Proves `path` usable as an output folder (creating it only if `create`); raises
    OutputDirError naming the problem otherwise."""
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise OutputDirError(f"{flag} {path} {where}: choose a folder")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            existing = path
        if existing == path:
            probe = path / f".write_test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{existing} is not writable")
    except OSError as error:
        raise OutputDirError(
            f"{flag} {path} is not writable ({error.strerror or error}): choose another folder or fix its "
            "permissions"
        ) from None
    return path


def free_space(path: Path) -> str:
    """'12.3 MiB free' on the disk holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"


def is_disk_full(error: BaseException) -> bool:
    """An OSError (or one that orbax wrapped) that says the disk or quota is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class RunLock:
    """An exclusive lock on an output folder while a run writes there (process 0 only)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise OutputDirError(
                f"--output_dir {directory} is in use by another training run (PID {holder}): wait for it to "
                "finish, or choose another --output_dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
