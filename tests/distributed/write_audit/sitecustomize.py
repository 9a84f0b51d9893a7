"""Loaded by every Python process that has this folder on PYTHONPATH (tests/distributed/test_launch.py): with
WRITE_LOG and RUN_DIR set, every rank but 0 records each write it makes under RUN_DIR (files opened for writing,
folders made, files renamed or removed, as Python's audit events report them) as a line in WRITE_LOG.<rank>.

Writes made outside Python's file functions (safetensors, torch.save by path) are not seen; the file lists the test
compares catch those."""

import os
import sys

rank = int(os.environ.get("RANK", "0"))

if os.environ.get("WRITE_LOG") and rank > 0:
    run_dir = os.path.realpath(os.environ["RUN_DIR"])
    log = open(f"{os.environ['WRITE_LOG']}.{rank}", "a")  # noqa: SIM115 (open for the process's life)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & writing)):
                return
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.truncate", "os.link"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(run_dir):
            log.write(f"{event} {os.fsdecode(path)}\n")
            log.flush()

    sys.addaudithook(audit)
