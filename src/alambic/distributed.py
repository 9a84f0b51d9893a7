"""Several processes, one run: who this process is in a launch, and how ranks meet, wait and agree.

A launcher (`accelerate launch`, `torchrun`, DeepSpeed's, Slurm with the same environment) starts one `alambic`
per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. Every function here also works in a
single process (as an identity or a no-op), so library code calls them unconditionally.

Why ranks wait on the launch's key-value store and not in a collective: a stage that rank 0 runs alone (preparing
the data, pruning the teacher) may take hours, longer than any sensible collective timeout, while a rank that died
must stop the others in seconds, not after that timeout. So every rank keeps a heartbeat in the store (the TCPStore
at MASTER_ADDR:MASTER_PORT: the launcher's agent hosts it under torchrun and accelerate, rank 0 otherwise), and a
waiting rank waits for as long as the ranks it waits for are alive, and no longer than
`ALAMBIC_HEARTBEAT_TIMEOUT` seconds (default 120) after one of them stops beating. The same store carries the first
failure of any rank, so that a waiting rank stops with the failing rank's message rather than a timeout. Once every
rank is there, the data itself goes through torch's own collectives (`gather_object`, `broadcast_object_list`).
"""

from __future__ import annotations

import atexit
import os
import pickle
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

HEARTBEAT_SECONDS = 1.0  # how often each rank marks itself alive
POLL_SECONDS = 0.1  # how often a waiting rank looks at the store at first
LONG_POLL_SECONDS = 1.0  # ... and once it has waited that long: hundreds of ranks waiting hours load it little
STORE_TIMEOUT = timedelta(seconds=60)  # one store operation; a store that long silent is gone
FAILURE_KEY = "failure"


class RankFailure(RuntimeError):
    """Another rank failed (or died) while this one waited for it: `rank` and its message.

    Raised on the ranks that did not fail themselves, so that all of them stop with the failing rank's message.
    `lost`: the rank died or froze (no heartbeat, or the store it hosted is gone), so it cannot say so itself.
    """

    def __init__(self, rank: int, what: str, message: str, *, lost: bool = False):
        self.rank, self.what, self.message, self.lost = rank, what, message, lost
        super().__init__(f"rank {rank} failed during {what}: {message}")


class DistributedSetupError(RuntimeError):
    """The launch cannot run as one distributed job (the replicas would train apart, or cannot meet)."""


# Where the launchers put them: torchrun / accelerate / DeepSpeed (RANK), then MPI's (accelerate's multi-CPU launch
# runs mpirun), in the order accelerate's own PartialState reads them.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return default


def rank() -> int:
    """This process's global rank (RANK, or MPI's), set by the launchers; 0 when not launched."""
    return _env_int(RANK_VARIABLES, 0)


def world_size() -> int:
    """How many processes the launch runs (WORLD_SIZE, or MPI's); 1 when not launched."""
    return max(_env_int(WORLD_SIZE_VARIABLES, 1), 1)


def is_main() -> bool:
    """Global rank 0: the one process that writes the run folder."""
    return rank() == 0


def heartbeat_timeout() -> float:
    """Seconds a rank may go without a heartbeat before the ranks waiting for it give it up for dead."""
    try:
        return float(os.environ.get("ALAMBIC_HEARTBEAT_TIMEOUT") or 120)
    except ValueError:
        return 120.0


def my_share(n: int) -> range:
    """The indices of `n` items this rank handles: contiguous blocks, the first `n % world` ranks one item longer, so
    that concatenating the ranks' results in rank order gives the single-process order."""
    world, r = world_size(), rank()
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


# --- set-up -------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, Any] = {}  # store, heartbeat thread, sequence number of the next meeting


def check_state(distributed_type: object, num_processes: int) -> None:
    """Refuse an accelerator state that is not distributed in a launch of several processes.

    Without it, on a CPU-only machine accelerate reports `DistributedType.NO` under torchrun (design.md, Scale-out
    facts), and each rank would train its own copy of the student, unsynchronised, with no warning.

    Raises:
        DistributedSetupError: the launch has WORLD_SIZE > 1 and the state is not distributed over all of it.
    """
    world = world_size()
    kind = getattr(distributed_type, "value", distributed_type)
    if world > 1 and (str(kind).upper() == "NO" or num_processes != world):
        raise DistributedSetupError(
            f"WORLD_SIZE={world}: the launcher started {world} processes, but accelerate's state on rank {rank()} is "
            f"not distributed (distributed_type {kind}, num_processes {num_processes}): each rank would train its "
            "own copy, unsynchronised. On a CPU-only machine the state must be created with cpu=True (`accelerate "
            "launch --cpu ...`, or `use_cpu: true` in training.trainer_args), which alambic does itself unless "
            "something created accelerate's state first; on GPUs, check that every rank sees a GPU"
        )


def init() -> None:
    """Set up the launch's process group (idempotent; nothing in a single process).

    Through accelerate's `PartialState` (gloo on CPU, nccl on GPU), so that the Trainer and accelerate find it set
    up; then every rank starts its heartbeat in the launch's store.

    Raises:
        DistributedSetupError: world size > 1 and the state is not distributed (`check_state`), or the launcher
            gave no MASTER_ADDR / MASTER_PORT to reach its store.
    """
    if world_size() == 1 or "store" in _state:
        return
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    check_state(state.distributed_type, state.num_processes)
    with _lock:
        if "store" in _state:
            return
        _state["store"] = _connect()
        _state["seq"] = 0
        stop = threading.Event()
        beat = threading.Thread(target=_beat, args=(_connect(), stop), name="alambic-heartbeat", daemon=True)
        beat.start()
        _state["beat"] = beat
        # Stopped and joined before the interpreter ends: a thread left inside a store call while the process
        # tears down aborts it ("terminate called without an active exception"), turning an exit code into 134.
        atexit.register(lambda: (stop.set(), beat.join(timeout=2 * HEARTBEAT_SECONDS)))


def _connect() -> Any:
    """A client of the launch's store, under this launch's own prefix."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size()} but MASTER_ADDR / MASTER_PORT are not set: launch with `torchrun` or "
            "`accelerate launch`, or set them as the launcher's env:// rendezvous expects"
        )
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=STORE_TIMEOUT)
    # torchrun's agent keeps its store across restarts of the workers: a restart must not read the last one's keys
    prefix = f"alambic/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return dist.PrefixStore(prefix, store)


def _beat(store: Any, stop: threading.Event) -> None:
    key = f"beat/{rank()}"
    while not stop.is_set():
        try:
            store.add(key, 1)
        except Exception:  # the store is gone: the launch is ending; the waits say so
            return
        stop.wait(HEARTBEAT_SECONDS)


def _store() -> Any:
    init()
    return _state["store"]


def _next_meeting(what: str) -> str:
    """The store prefix of this rank's next meeting: every rank calls the meetings in the same order."""
    with _lock:
        _state["seq"] += 1
        return f"meet/{_state['seq']}"


# --- failures -----------------------------------------------------------------------------------------------------


def publish_failure(what: str, exc: BaseException) -> None:
    """Tell the other ranks this rank failed during `what` (the first failure of the launch is kept).

    A failure relayed from another rank (`RankFailure`) is not published again. Best effort: a store already gone
    (the launch is ending) is not an error of its own.
    """
    if world_size() == 1 or isinstance(exc, RankFailure) or "store" not in _state:
        return
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        store = _state["store"]
        if store.add("failures", 1) == 1:
            store.set(FAILURE_KEY, pickle.dumps((rank(), what, message[:4000])))
    except Exception:
        pass


def peer_failure(wait: float = 0.0) -> RankFailure | None:
    """Another rank's published failure, waiting up to `wait` seconds for one to appear (a rank that failed in a
    collective's partner publishes just before it exits); None when there is none, or when it is this rank's own."""
    if world_size() == 1 or "store" not in _state:
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            found = _failure(_state["store"])
        except Exception:
            return None
        if found is not None:
            return found if found.rank != rank() else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


def claim_failure_report(exc: BaseException, *, wait: float = 5.0) -> bool:
    """Whether this rank is the one that prints the launch's failure `exc` (exactly one rank does, so that N ranks do
    not print one failure N times): rank 0 when it hears of the failure, else the rank that failed, or, for a rank
    that died or froze (`RankFailure.lost`), the first rank that noticed.

    A rank that failed on its own waits up to `wait` seconds for rank 0 to claim the report (rank 0 learns of it
    at its next meeting); a rank 0 blocked in a collective with the failing rank cannot hear of it before that rank
    exits, so the failing rank then prints it itself (and rank 0, which loses the claim, only says where).
    """
    if world_size() == 1 or "store" not in _state:
        return True
    relayed = isinstance(exc, RankFailure)
    lost = relayed and exc.lost
    try:
        store = _state["store"]
        if relayed and not lost and not is_main():
            return False  # rank 0, or the failing rank, prints it
        if not relayed and not is_main():
            deadline = time.monotonic() + wait
            while store.add("failure/printer", 0) == 0 and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        return store.add("failure/printer", 1) == 1
    except Exception:  # the store is gone (with rank 0, outside torchrun): no one can agree, so say it here
        return not relayed or lost or is_main()


def _failure(store: Any) -> RankFailure | None:
    if not store.check([FAILURE_KEY]):
        return None
    failed_rank, what, message = pickle.loads(store.get(FAILURE_KEY))
    return RankFailure(failed_rank, what, message)


# --- meetings -----------------------------------------------------------------------------------------------------


class _Liveness:
    """When each awaited rank's heartbeat last moved, by this rank's own clock (hosts' clocks may disagree)."""

    def __init__(self, store: Any):
        self.store, self.seen, self.timeout = store, {}, heartbeat_timeout()

    def check(self, ranks: list[int], what: str) -> None:
        now = time.monotonic()
        for r in ranks:
            count = self.store.add(f"beat/{r}", 0)
            last = self.seen.get(r)
            if last is None or last[0] != count:
                self.seen[r] = (count, now)
            elif now - last[1] > self.timeout:
                raise RankFailure(
                    r,
                    what,
                    f"it stopped answering: no heartbeat for {self.timeout:.0f} s while the "
                    "other ranks waited for it (killed, crashed or frozen: its own output says which; "
                    "ALAMBIC_HEARTBEAT_TIMEOUT sets the limit)",
                    lost=True,
                )


def _meet(what: str) -> None:
    """Every rank marks its arrival and waits until all the others have arrived.

    Raises:
        RankFailure: a rank failed meanwhile (its message), or stopped beating.
        DistributedSetupError: the ranks are out of step (another rank arrived at a different meeting).
    """
    store, key = _store(), _next_meeting(what)
    store.set(f"{key}/{rank()}", what)
    awaited = [r for r in range(world_size()) if r != rank()]
    alive = _Liveness(store)
    last_beat_check, started = 0.0, time.monotonic()
    try:
        while awaited:
            failed = _failure(store)
            if failed is not None and failed.rank != rank():
                raise failed
            awaited = [r for r in awaited if not store.check([f"{key}/{r}"])]
            if not awaited:
                break
            if time.monotonic() - last_beat_check >= HEARTBEAT_SECONDS:
                alive.check(awaited, what)
                last_beat_check = time.monotonic()
            waited = time.monotonic() - started
            time.sleep(POLL_SECONDS if waited < LONG_POLL_SECONDS else LONG_POLL_SECONDS)
        for r in range(world_size()):
            theirs = store.get(f"{key}/{r}").decode()
            if theirs != what:
                raise DistributedSetupError(
                    f"ranks out of step: rank {rank()} is at {what!r} while rank {r} is at "
                    f"{theirs!r} (a bug: every rank must meet in the same order)"
                )
    except (RankFailure, DistributedSetupError):
        raise
    except Exception as exc:  # the store itself is gone: rank 0 (its host outside torchrun) or the agent died
        raise RankFailure(
            0,
            what,
            f"the launch's store stopped answering ({type(exc).__name__}: {exc}): rank 0 or the launcher ended",
            lost=True,
        ) from None


def barrier(what: str) -> None:
    """All ranks meet here. A rank waits as long as the others are alive (heartbeats), so a long wait is not a
    failure; a rank that fails or dies meanwhile stops the others with its message, naming `what`."""
    if world_size() > 1:
        _meet(what)


def on_main(what: str, fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` while the others wait; its (picklable) result is returned on every rank.

    Raises:
        RankFailure: on the other ranks, when `fn` failed on rank 0 (with rank 0's message) or rank 0 died.
        Whatever `fn` raises, on rank 0.
    """
    if world_size() == 1:
        return fn()
    result: list[Any] = [None]
    if is_main():
        try:
            result[0] = fn()
        except BaseException as exc:
            publish_failure(what, exc)
            raise
    _meet(what)  # the others wait here, for as long as rank 0 is alive
    import torch.distributed as dist

    dist.broadcast_object_list(result, src=0)
    return result[0]


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (the others' `obj` is ignored)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    _meet("broadcast")
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    _meet("gather")
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out
