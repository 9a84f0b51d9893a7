"""One rank of tests/distributed/test_collectives.py: runs a scenario of alambic.distributed's meetings and writes
what this rank saw to <out>/rank<R>.json. Started by torchrun, or by the test itself with the launchers' variables."""

import json
import os
import signal
import sys
import time
from pathlib import Path

from alambic import distributed

out, scenario = Path(sys.argv[1]), sys.argv[2]
seen: dict = {"rank": distributed.rank(), "world": distributed.world_size(), "is_main": distributed.is_main()}


def record() -> None:
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(seen))


if scenario == "undistributed":  # something made accelerate's state first, without cpu=True, on a CPU machine
    from accelerate import PartialState

    PartialState()
    try:
        distributed.init()
    except Exception as exc:
        seen["failure"] = {"type": type(exc).__name__, "message": str(exc)}
    record()
    sys.exit(0)
distributed.init()
distributed.barrier("the start")  # every rank connected before one of them dies
if scenario == "basics":
    # rank 0 alone, slower than the others: they wait, then all have its result
    seen["on_main"] = distributed.on_main("a slow job", lambda: (time.sleep(2), {"by": distributed.rank()})[1])
    seen["gather"] = distributed.gather_to_main({"r": distributed.rank()})
    seen["broadcast"] = distributed.broadcast(f"from rank {distributed.rank()}")
    seen["share5"] = list(distributed.my_share(5))
    seen["share1"] = list(distributed.my_share(1))
    try:
        distributed.on_main("a failing job", lambda: (_ for _ in ()).throw(ValueError("boom on rank 0")))
    except Exception as exc:
        seen["failure"] = {"type": type(exc).__name__, "message": str(exc)}
elif scenario in ("freeze", "die"):

    def job():
        if scenario == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: its heartbeat stops
        time.sleep(2)  # the others are waiting by now
        os._exit(3)

    started = time.monotonic()
    try:
        distributed.on_main("the frozen job", job)
    except Exception as exc:
        seen["failure"] = {"type": type(exc).__name__, "message": str(exc)}
    seen["waited"] = time.monotonic() - started
record()
