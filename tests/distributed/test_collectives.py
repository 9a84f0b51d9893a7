"""alambic.distributed in 1 and 2 processes (gloo): meetings, rank 0's jobs, gathers, and a rank that fails or
stops answering."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alambic import distributed

WORKER = Path(__file__).with_name("meetings_worker.py")
SRC = str(Path(__file__).parents[2] / "src")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, n: int, scenario: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(WORKER),
            str(out),
            scenario,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_single_process_is_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.init()
    distributed.barrier("nothing")
    assert distributed.on_main("x", lambda: 41 + 1) == 42
    assert distributed.gather_to_main("a") == ["a"]
    assert distributed.broadcast({"k": 1}) == {"k": 1}
    assert distributed.my_share(3) == range(3)
    with pytest.raises(ValueError, match="boom"):
        distributed.on_main("x", lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_the_rank_is_read_where_each_launcher_puts_it(monkeypatch):
    for name in (*distributed.RANK_VARIABLES, *distributed.WORLD_SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "3")  # mpirun (accelerate's multi-CPU launch)
    monkeypatch.setenv("PMI_SIZE", "4")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (3, 4, False)
    monkeypatch.setenv("RANK", "1")  # torchrun's, first
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.world_size()) == (1, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_are_contiguous_blocks_in_rank_order(monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for n in (0, 1, 5, 17):
        shares = []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            shares.append(distributed.my_share(n))
        assert [i for s in shares for i in s] == list(range(n))  # merged in rank order: the single-process order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("n", [1, 2])
def test_meetings_under_torchrun(tmp_path, n):
    seen = _torchrun(tmp_path, n, "basics")
    for r, mine in enumerate(seen):
        assert (mine["rank"], mine["world"], mine["is_main"]) == (r, n, r == 0)
        assert mine["on_main"] == {"by": 0}  # rank 0's result, on every rank
        assert mine["gather"] == ([{"r": i} for i in range(n)] if r == 0 else None)
        assert mine["broadcast"] == "from rank 0"
    assert [i for mine in seen for i in mine["share5"]] == [0, 1, 2, 3, 4]
    assert [i for mine in seen for i in mine["share1"]] == [0]
    # rank 0's failure: raised as itself on rank 0, with its message on the others
    assert seen[0]["failure"] == {"type": "ValueError", "message": "boom on rank 0"}
    for mine in seen[1:]:
        assert mine["failure"]["type"] == "RankFailure"
        assert mine["failure"]["message"] == "rank 0 failed during a failing job: ValueError: boom on rank 0"


def _launch_by_hand(out: Path, scenario: str, *, agent_store: bool, **env: str) -> list[subprocess.Popen]:
    """Two ranks started as a launcher without torchrun's agent would: the variables only."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", **env}
    if agent_store:  # like torchrun's agent: the store lives outside the ranks (here, in the test)
        common["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), scenario],
            env=_env(**common, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ], port


def _wait_rank1(procs: list[subprocess.Popen], out: Path) -> dict:
    try:
        procs[1].wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert (out / "rank1.json").is_file(), procs[1].stdout.read()[-3000:]
    return json.loads((out / "rank1.json").read_text())


def test_a_frozen_rank_0_stops_the_waiting_rank_after_the_heartbeat_timeout(tmp_path):
    from torch.distributed import TCPStore

    procs, port = None, _free_port()
    store = TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False)  # the agent's
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "ALAMBIC_HEARTBEAT_TIMEOUT": "3",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), "freeze"],
            env=_env(**common, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    seen = _wait_rank1(procs, tmp_path)
    del store
    assert seen["failure"]["type"] == "RankFailure"
    assert seen["failure"]["message"].startswith(
        "rank 0 failed during the frozen job: it stopped answering: no heartbeat for 3 s"
    )
    assert seen["waited"] < 30


def test_rank_0_killed_stops_the_waiting_rank_at_once_where_it_hosts_the_store(tmp_path):
    procs, _ = _launch_by_hand(tmp_path, "die", agent_store=False)
    started = time.monotonic()
    seen = _wait_rank1(procs, tmp_path)
    assert seen["failure"]["type"] == "RankFailure"
    assert "rank 0 failed during the frozen job" in seen["failure"]["message"]
    assert time.monotonic() - started < 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine's default state is distributed")
def test_a_world_of_two_whose_accelerate_state_is_not_distributed_is_refused_by_name(tmp_path):
    seen = _torchrun(tmp_path, 2, "undistributed")
    for r, mine in enumerate(seen):
        assert mine["failure"]["type"] == "DistributedSetupError"
        assert mine["failure"]["message"].startswith(
            f"WORLD_SIZE=2: the launcher started 2 processes, but accelerate's state on rank {r} is not distributed "
            "(distributed_type NO, num_processes 1)"
        )
