"""One command at a time per run folder: an OS lock on `<folder>/alambic.lock`, held while a command writes there.

Two `alambic run` of one folder would share its temporary files, overwrite each other's manifest records and
train past `max_steps`; the second is refused at once instead, naming the process that holds the folder.

Why `fcntl.flock` and not a PID file: the kernel releases the lock when its holder ends, `kill -9` and a crash of
the machine included, so a stale lock never blocks the next run and nothing has to guess whether a PID is still
alive. The PID, host, command and start time written into the file serve only the refusal's message. The file
itself stays (it is never deleted: a process that opened the old file could lock it while another locks a new
one), and `--restart` wipes everything else in the folder.

Re-entrant within one process: `alambic evaluate` holds the run folder and then runs the stages, which take it
again. Where `fcntl` does not exist (Windows) folders are not locked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected from each other there
    fcntl = None

LOCK_FILE = "alambic.lock"

_held: dict[Path, int] = {}  # resolved folder -> how many nested holds this process has on it


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder; `holder` is what it wrote in the lock file (pid, host, command,
    started), possibly empty when it had not written it yet."""

    def __init__(self, folder: Path, holder: dict[str, Any]):
        self.folder, self.holder = folder, holder
        pid = holder.get("pid")
        who = f"process {pid}" if pid else "another process"
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on host {holder['host']}"
        details = []
        if holder.get("started"):
            details.append(f"started {holder['started']}")
        if holder.get("command"):
            details.append(f"`{holder['command']}`")
        stop = f" or stop it (`kill {pid}`)" if pid else ""
        super().__init__(
            f"{folder} is in use by {who}" + (f" ({', '.join(details)})" if details else "")
            + f": a run folder takes one command at a time. Wait for it to finish{stop}; its lock "
            f"({folder / LOCK_FILE}) goes with the process, even a killed one, so nothing needs cleaning up")


def _holder(fd: int) -> dict[str, Any]:
    # The holder writes its record right after locking: an empty read is that moment, so look once more.
    for _ in range(5):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        if raw:
            try:
                found = json.loads(raw)
                return found if isinstance(found, dict) else {}
            except ValueError:
                pass  # half written: read again
        time.sleep(0.02)
    return {}


@contextmanager
def hold_folder(folder: str | Path) -> Iterator[Path]:
    """Hold `folder` (created if missing) for the duration of the block.

    Raises:
        RunFolderBusy: another process holds it; nothing in the folder was touched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held or fcntl is None:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield folder
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(folder, _holder(fd)) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[key] = 1
        try:
            yield folder
        finally:
            del _held[key]
            os.ftruncate(fd, 0)  # released: the next refusal must not name this process
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def wipe_held_folder(folder: str | Path) -> None:
    """Remove everything in `folder` but its lock file (`--restart`), which this process must hold."""
    folder = Path(folder)
    if folder.resolve() not in _held:
        raise RuntimeError(f"wipe_held_folder({folder}): hold the folder first (hold_folder)")
    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
