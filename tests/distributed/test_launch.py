"""`alambic run` under the launchers (2 CPU processes, gloo): one run folder written by rank 0 alone, the same
files as a single process's run, a failure on any rank stopping both with its message, a killed rank ending the
launch and the same command resuming it. Every launch runs in its own process group, killed whole on timeout."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import save_tiny_pair, write_text_corpus

HERE = Path(__file__).parent
SRC = str(HERE.parents[1] / "src")
FAULTY = str(HERE / "faulty_alambic.py")  # `python -m alambic` with the faults the environment asks for
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_config(tmp_path: Path, **training) -> Path:
    data = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "paths": [str(write_text_corpus(tmp_path / "corpus"))],
            "max_seq_len": 16,
            "validation_fraction": 0.2,
        },
        "loss": {"divergence": "forward_kl", "alpha": 0.8, "temperature": 2.0},
        "training": {
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 2,
            **training,
        },
        "evaluation": {
            "ce_control": False,
            "batch_size": 4,
            "cost": {"prompt_tokens": 8, "new_tokens": 3, "batch_size": 2, "warmup": 0, "repeats": 1},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the launchers set them; a single process must not think itself launched
    return {**env, **extra}


def _start(command: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """The launch's exit code and output; on timeout the whole process group (launcher and ranks) is killed."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (a hang):\n{output[-4000:]}") from None
    return proc.returncode, output


def _run(command: list[str], cwd: Path, timeout: float = 240, **env: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, output = _finish(_start(command, cwd, **env), timeout)
    return code, output, time.monotonic() - started


def _files(run: Path) -> set[str]:
    """The run folder's files, by path; a DDP checkpoint's per-rank RNG states (the Trainer's own, one per rank:
    resuming needs each) read as the single process's one."""
    return {
        re.sub(r"rng_state_\d+\.pth$", "rng_state.pth", str(p.relative_to(run))) for p in run.rglob("*") if p.is_file()
    }


def _two_ranks_trained(run: Path) -> bool:
    """Whether the training ran on two ranks: the Trainer saves each rank's RNG state in a checkpoint."""
    return {p.name for p in (run / "checkpoints").glob("checkpoint-*/rng_state*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _audited(tmp_path: Path) -> dict[str, str]:
    """The environment in which every rank but 0 logs its writes under the run folder (write_audit/)."""
    return {
        "PYTHONPATH": f"{HERE / 'write_audit'}{os.pathsep}{SRC}",
        "WRITE_LOG": str(tmp_path / "writes"),
        "RUN_DIR": str(tmp_path / "runs" / "tiny"),
    }


def _assert_rank_0_alone_wrote(tmp_path: Path) -> None:
    """Rank 1 wrote nothing in the run folder but the Trainer's own per-rank state in a checkpoint (its RNG state:
    each rank resumes from its own), for which it makes the checkpoint's folder (exist_ok)."""
    writes = tmp_path / "writes.1"
    lines = writes.read_text().splitlines() if writes.exists() else []
    own = re.compile(r"(os.mkdir .*/checkpoints/checkpoint-\d+|open .*/checkpoints/checkpoint-\d+/rng_state_1\.pth)$")
    assert not [line for line in lines if not own.match(line)], "rank 1 wrote in the run folder:\n" + "\n".join(lines)


def test_python_m_alambic_is_the_cli(tmp_path):
    code, output, _ = _run([sys.executable, "-m", "alambic", "run", "--help"], tmp_path, timeout=60)
    assert code == 0, output
    assert "--resume" in output


def test_torchrun_two_ranks_write_one_run_folder_like_one_process(tmp_path):
    config = _tiny_config(tmp_path)
    code, single, _ = _run([sys.executable, "-m", "alambic", "run", str(config), "--set", "name=single"], tmp_path)
    assert code == 0, single[-4000:]
    run = tmp_path / "runs" / "tiny"
    (run / "old").mkdir(parents=True)  # --restart: rank 0 empties the folder, the others wait
    code, output, seconds = _run(
        [*TORCHRUN, "-m", "alambic", "run", str(config), "--restart"], tmp_path, **_audited(tmp_path)
    )
    assert code == 0, output[-6000:]
    _assert_rank_0_alone_wrote(tmp_path)
    assert not (run / "old").exists()
    assert _files(run) == _files(tmp_path / "runs" / "single")
    assert set(_manifest(run)) == set(_manifest(tmp_path / "runs" / "single"))
    assert all(entry["status"] == "done" for entry in _manifest(run).values())
    assert (run / "final" / "model.safetensors").is_file() and (run / "report.md").is_file()
    assert _two_ranks_trained(run)
    # one console: rank 0's stage headers and the libraries' progress bars, as many as one process shows
    assert len(re.findall(r"stage \d+/\d+: distill done in", output)) == 1, output[-4000:]
    assert output.count("finished: ") == 1
    assert output.count("Loading weights: 100%") == single.count("Loading weights: 100%") > 0


def test_accelerate_launch_runs_a_config(tmp_path):
    config = _tiny_config(tmp_path)
    # On a machine without GPUs, `--cpu --num_processes 2` starts ONE process (accelerate's simple launcher; its
    # multi-CPU path is mpirun's); `--multi_gpu` is the flag that starts N ranks through torchrun, and alambic sets
    # them up on CPU (gloo) itself.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
    ]
    code, output, _ = _run([*launcher, "-m", "alambic", "run", str(config)], tmp_path, **_audited(tmp_path))
    assert code == 0, output[-6000:]
    _assert_rank_0_alone_wrote(tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert all(entry["status"] == "done" for entry in _manifest(run).values())
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert _two_ranks_trained(run)


@pytest.mark.parametrize(("rank", "stage"), [(1, "distill"), (0, "data")])
def test_a_failure_on_one_rank_stops_both_with_its_message(tmp_path, rank, stage):
    config = _tiny_config(tmp_path)
    code, output, seconds = _run(
        [*TORCHRUN, FAULTY, "run", str(config)],
        tmp_path,
        timeout=120,
        FAIL_RANK=str(rank),
        FAIL_STAGE=stage,
        **_audited(tmp_path),
    )
    assert code != 0
    _assert_rank_0_alone_wrote(tmp_path)
    assert seconds < 90, output[-4000:]
    message = f"injected failure on rank {rank}"
    assert output.count(message) == 1, output[-6000:]  # printed once, not once per rank
    entry = _manifest(tmp_path / "runs" / "tiny")[stage]
    assert entry["status"] in ("failed", "running")  # rank 0 may be stopped by torchrun before it records it
    if entry["status"] == "failed":
        assert message in entry["error"]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process with RANK=`rank` among `launcher`'s descendants."""
    children = [launcher]
    while children:
        pid = children.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and pid != launcher:
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return None


def test_a_rank_killed_mid_training_ends_the_launch_and_the_same_command_resumes(tmp_path):
    config = _tiny_config(tmp_path, max_steps=8, save_steps=2)
    run = tmp_path / "runs" / "tiny"
    command = [*TORCHRUN, FAULTY, "run", str(config)]
    proc = _start(command, tmp_path, STEP_SLEEP="1")
    deadline = time.monotonic() + 200
    while not (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.2)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    code, output = _finish(proc, timeout=120)
    assert code != 0
    assert time.monotonic() - killed < 60, output[-4000:]
    assert _manifest(run)["distill"]["status"] in ("failed", "running")

    code, output, _ = _run(command, tmp_path)
    assert code == 0, output[-6000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["resumed_from"] >= 2
    assert _manifest(run)["distill"]["status"] == "done"
    assert "stage 1/5: data done already" in output


def _by_hand(command: list[str], cwd: Path, **env: str) -> list[subprocess.Popen]:
    """Two ranks started as a launcher without torchrun's agent would (Slurm, a script): the variables only, the
    store hosted by rank 0, and nothing that kills the others when one dies."""
    port = str(_free_port())
    return [
        _start(
            command,
            cwd,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            WORLD_SIZE="2",
            RANK=str(r),
            LOCAL_RANK=str(r),
            **env,
        )
        for r in range(2)
    ]


def _wait_for(path: Path, procs: list[subprocess.Popen], seconds: float = 200) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.2)


def test_without_torchrun_rank_0_killed_while_the_other_waits_stops_it(tmp_path):
    config = _tiny_config(tmp_path)
    procs = _by_hand(
        [sys.executable, FAULTY, "run", str(config)],
        tmp_path,
        SLEEP_STAGE="data",
        STAGE_SLEEP="60",
        SLEEP_MARK=str(tmp_path / "sleeping"),
    )
    _wait_for(tmp_path / "sleeping.0", procs)  # rank 0 prepares the data alone; rank 1 waits for it
    killed = time.monotonic()
    os.kill(procs[0].pid, signal.SIGKILL)
    code, output = _finish(procs[1], timeout=60)
    procs[0].wait()
    assert code != 0
    assert time.monotonic() - killed < 30, output[-4000:]
    assert output.count("rank 0 failed during stage data: the launch's store stopped answering") == 1, output[-4000:]


def test_without_torchrun_rank_1_killed_mid_training_stops_rank_0(tmp_path):
    config = _tiny_config(tmp_path, max_steps=8, save_steps=2)
    run = tmp_path / "runs" / "tiny"
    procs = _by_hand([sys.executable, FAULTY, "run", str(config)], tmp_path, STEP_SLEEP="1")
    _wait_for(run / "checkpoints" / "checkpoint-2" / "trainer_state.json", procs)
    killed = time.monotonic()
    os.kill(procs[1].pid, signal.SIGKILL)
    code, output = _finish(procs[0], timeout=90)
    procs[1].wait()
    assert code != 0
    assert time.monotonic() - killed < 60, output[-4000:]
    assert _manifest(run)["distill"]["status"] == "failed"


@pytest.mark.parametrize("command", ["sweep", "chain"])
def test_a_sweep_or_a_chain_under_a_launcher_is_refused_by_name(tmp_path, command):
    base = {
        "name": "base",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": "x"},
        "student": {"from_teacher": {}},
    }
    if command == "chain":
        base["chain"] = [{"name": "a"}, {"name": "b", "student": "previous"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    args = ["sweep", "c.yaml", "--set", "loss.temperature=1,2"] if command == "sweep" else ["run", "c.yaml"]
    code, output, _ = _run([*TORCHRUN, "-m", "alambic", *args], tmp_path, timeout=120)
    assert code != 0
    assert output.count(f"error: a {command} runs its ") == 1, output[-3000:]  # said once, by rank 0
    assert not (tmp_path / "runs").exists()
