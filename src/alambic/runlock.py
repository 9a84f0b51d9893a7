"""One command at a time per run folder: an OS lock on `<folder>/alambic.lock`, held while a command writes there.

Two `alambic run` of one folder would share its temporary files, overwrite each other's manifest records and
train past `max_steps`; the second is refused at once instead, naming the process that holds the folder.

Why `fcntl.flock` and not a PID file: the kernel releases the lock when its holder ends, `kill -9` and a crash of
the machine included, so a stale lock never blocks the next run and nothing has to guess whether a PID is still
alive. The PID, host, command and start time written into the file serve only the refusal's message. The file
itself stays (it is never deleted: a process that opened the old file could lock it while another locks a new
one), and `--restart` wipes everything else in the folder.

A launcher (`accelerate launch`, torchrun, DeepSpeed) starts one `alambic run` per rank on one folder: rank 0
holds it for the launch, the other ranks (RANK > 0) take no lock (alambic.pipeline keeps them from writing it).
A second launch's rank 0 is refused, which stops that launch.

Re-entrant within one process: `alambic evaluate` holds the run folder and then runs the stages, which take it
again. Where `fcntl` does not exist (Windows), or the file system refuses locks (some network mounts), folders are
not locked: a warning says so, and the run goes on.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rich.markup import escape

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected from each other there
    fcntl = None

LOCK_FILE = "alambic.lock"
# flock's answers on a file system that does not lock (NFS without a lock manager, some FUSE mounts)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held: dict[Path, int] = {}  # resolved folder -> how many nested holds this process has on it


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder; `holder` is what it wrote in the lock file (pid, host, command,
    started), possibly empty when it had not written it yet."""

    def __init__(self, folder: Path, holder: dict[str, Any]):
        self.folder, self.holder = folder, holder
        pid = holder.get("pid")
        who = f"process {pid}" if pid else "another process"
        elsewhere = bool(holder.get("host")) and holder["host"] != socket.gethostname()
        if elsewhere:
            who += f" on host {holder['host']}"
        details = []
        if holder.get("started"):
            details.append(f"started {holder['started']}")
        if holder.get("command"):
            details.append(f"`{holder['command']}`")
        stop = f" or stop it (`kill {pid}`{' there' if elsewhere else ''})" if pid else ""
        super().__init__(
            f"{folder} is in use by {who}"
            + (f" ({', '.join(details)})" if details else "")
            + f": a run folder takes one command at a time. Wait for it to finish{stop}; its lock "
            f"({folder / LOCK_FILE}) goes with the process, even a killed one, so nothing needs cleaning up"
        )


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
    fd = -1
    if key not in _held and fcntl is not None and _launch_rank() == 0:
        fd = _lock(folder, key)
    _held[key] = _held.get(key, 0) + 1
    try:
        yield folder
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]
        if fd >= 0:
            os.ftruncate(fd, 0)  # released: the next refusal must not name this process
            os.close(fd)  # closing the last descriptor releases the lock


def _launch_rank() -> int:
    """This process's rank in a multi-process launch (the RANK the launchers set), 0 alone."""
    from alambic.distributed import rank  # torch-free, like this module

    return rank()


def _lock(folder: Path, key: Path) -> int:
    """The locked descriptor of `folder`'s lock file, its holder record written; -1 where locks do not work."""
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd) if isinstance(exc, BlockingIOError) else None
        os.close(fd)
        if holder is not None:
            raise RunFolderBusy(folder, holder) from None
        if exc.errno not in _NO_LOCKS:
            raise
        # imported here: the lock itself needs no torch, which alambic.utils imports
        from alambic.utils import console

        console.print(
            f"[yellow]warning:[/] {escape(str(folder))} cannot be locked ({escape(exc.strerror or '')}): "
            "nothing stops another command from writing it at the same time"
        )
        return -1
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_not_held(folder: str | Path) -> None:
    """Refuse at once, before any slow import or check, when another process holds `folder`; creates nothing.

    The command still holds the folder properly afterwards (`hold_folder`): this only saves a refused command the
    seconds it would spend getting there.

    Raises:
        RunFolderBusy: another process holds it.
    """
    path = Path(folder) / LOCK_FILE
    if fcntl is None or _launch_rank() != 0 or Path(folder).resolve() in _held or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # gone or unreadable: hold_folder will say
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderBusy(Path(folder), _holder(fd)) from None
    except OSError:
        pass  # no locks on this file system: hold_folder warns
    finally:
        os.close(fd)  # releases the probe's lock, if it got it


def wipe_held_folder(folder: str | Path) -> None:
    """Remove everything in `folder` but its lock file (`--restart`), which this process must hold.

    The run folders inside it (a sweep's points, a chain's steps) are held while they are removed.

    Raises:
        RunFolderBusy: another process holds one of them; nothing was removed.
    """
    folder = Path(folder)
    if folder.resolve() not in _held:
        raise RuntimeError(f"wipe_held_folder({folder}): hold the folder first (hold_folder)")
    entries = [e for e in folder.iterdir() if e.name != LOCK_FILE]
    inner = [e for e in entries if e.is_dir() and not e.is_symlink() and (e / LOCK_FILE).is_file()]
    with ExitStack() as held:
        for entry in inner:
            held.enter_context(hold_folder(entry))
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
