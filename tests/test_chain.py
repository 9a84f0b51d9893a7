"""Chained runs: step configs (overrides, `previous` / `first`, validation up front), the runner (teacher from
the previous step, resume, a redone step 1 redoes step 2) and the chain report, on tiny random models."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alambic.chain import deep_merge, plan_chain, run_chain, step_config
from alambic.config import ConfigError, load_config, validate_config
from alambic.report.chain import chain_rows
from helpers import save_tiny_pair, write_text_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def chain_config(tmp_path, steps, **top):
    """A tiny base config (as tests/test_pipeline.py's) with `chain: steps`; evaluation kept to quality only."""
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        save_tiny_pair(tmp_path)
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_text_corpus(corpus)
    data = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(teacher), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {"source": "files", "paths": [str(corpus)], "max_seq_len": 16, "validation_fraction": 0.2},
        "loss": {"divergence": "forward_kl", "alpha": 1.0},
        "training": {"max_steps": 2, "save_steps": 10, "logging_steps": 1, "learning_rate": 1e-3},
        "evaluation": {"ce_control": False, "batch_size": 4, "cost": None, "generation": None},
        "chain": steps,
        **top,
    }
    return validate_config(data)


# ---------------------------------------------------------------- step configs


def test_overrides_nested_or_dotted_merge_into_the_base():
    assert deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 2}, {"a": {"y": [3]}, "c": 4}) == {
        "a": {"x": 1, "y": [3]},
        "b": 2,
        "c": 4,
    }


def test_steps_apply_their_overrides_and_previous_points_at_folders_that_do_not_exist_yet(tmp_path):
    cfg = chain_config(
        tmp_path,
        [
            {"name": "a"},
            {
                "name": "b",
                "teacher": "previous",
                "student": "first",
                "loss.divergence": "reverse_kl",
                "training": {"max_steps": 5},
            },
            {"name": "c", "student": "previous", "overrides": {"loss": {"alpha": 0.0}}, "teacher.dtype": "bfloat16"},
        ],
    )
    chain = plan_chain(cfg)
    folder = tmp_path / "runs" / "tiny-chain"
    assert chain.folder == folder and not folder.exists()  # nothing written by planning
    a, b, c = (s.config for s in chain.steps)
    assert a.run_dir == folder / "a" and a.teacher.model == str(tmp_path / "teacher") and a.chain is None
    # b: taught by a's final student, starting again from a's untrained (pruned) student: born-again
    assert b.teacher.model == str(folder / "a" / "final") and b.teacher.device == "cpu"
    assert b.student.model == str(folder / "a" / "student") and b.student.from_teacher is None
    assert (b.loss.divergence, b.loss.alpha, b.training.max_steps, b.training.learning_rate) == (
        "reverse_kl",
        1.0,
        5,
        1e-3,
    )  # dotted and nested overrides, the rest from the base
    # c: fine-tunes b's final with plain CE; its teacher is the original one, in another dtype
    assert c.student.model == str(folder / "b" / "final") and c.loss.alpha == 0.0
    assert (c.teacher.model, c.teacher.dtype) == (str(tmp_path / "teacher"), "bfloat16")
    assert chain.steps[1].reads == {"teacher": ("a", "final"), "student": ("a", "student")}
    assert (chain.steps[2].teacher_label, chain.steps[2].student_label) == ("original", "b final")
    unfinished = re.escape(f"{folder / 'a' / 'final'}, which step 'a' has not finished")
    with pytest.raises(FileNotFoundError, match=unfinished):
        step_config(chain, 1)  # `previous` is resolved when the step runs


def test_student_first_of_a_given_student_is_that_student(tmp_path):
    teacher = save_tiny_pair(tmp_path)
    cfg = chain_config(
        tmp_path,
        [{"name": "a"}, {"name": "b", "teacher": "previous", "student": "first"}],
        student={"model": str(teacher)},
    )
    b = plan_chain(cfg).steps[1]
    assert b.config.student.model == str(teacher) and "student" not in b.reads


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"name": "a", "teacher": "previous"}], "the first step 'a' has no step before it"),
        ([{"name": "a"}, {"name": "a"}], "step names ['a'] are used twice"),
        ([{"name": "a"}, {"name": "b", "output_dir": "elsewhere"}], "['output_dir'] cannot be set per step"),
        (
            [{"name": "a"}, {"name": "b", "student": "previous", "student.from_teacher.layers": "first_half"}],
            "so ['student.from_teacher.layers'] cannot be set beside it",
        ),
        ([{"name": "a"}, {"name": "b", "teacher": "earlier"}], "chain.1.teacher"),
        ([], "an empty chain runs nothing"),
    ],
)
def test_malformed_chains_are_refused_when_the_config_loads(tmp_path, steps, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        chain_config(tmp_path, steps)


def test_every_invalid_step_is_named_with_its_field_before_anything_runs(tmp_path):
    cfg = chain_config(
        tmp_path, [{"name": "a", "loss": {"alpah": 1}}, {"name": "b"}, {"name": "c", "loss.temperature": -1}]
    )
    with pytest.raises(ConfigError) as err:
        plan_chain(cfg)
    text = str(err.value)
    assert "chain step 1/3 a" in text and "loss.alpah: unknown key" in text
    assert "chain step 3/3 c" in text and "loss.temperature" in text and "step 2/3" not in text
    assert not (tmp_path / "runs").exists()


def test_relative_data_paths_of_a_step_are_read_from_the_config_files_folder(tmp_path):
    chain_config(tmp_path, [{"name": "a"}])  # writes the tiny teacher and corpus
    write_text_corpus(tmp_path / "task")
    path = tmp_path / "chain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": {"model": str(tmp_path / "teacher")},
                "student": {"from_teacher": {}},
                "data": {"source": "files", "paths": ["corpus"]},
                "chain": [
                    {"name": "a"},
                    {"name": "b", "student": "previous", "data": {"paths": ["task"]}},
                    {"name": "c", "data.paths": ["task"]},
                ],
            }
        )
    )
    steps = plan_chain(load_config(path)).steps
    assert [s.config.data.paths for s in steps] == [[tmp_path / "corpus"], [tmp_path / "task"], [tmp_path / "task"]]


# ---------------------------------------------------------------- the runner


def test_a_chain_runs_resumes_and_redoes_a_step_whose_teacher_changed(tmp_path, monkeypatch):
    import alambic.training.run as run_mod

    taught_by = {}  # step folder -> the teacher's weights its distillation saw
    original_train = run_mod.train

    def spy(student, tokenizer, data, *, teacher, output_dir, **kwargs):
        seen = teacher if teacher is not None else kwargs["source"].models()[0]  # the stage passes its source
        taught_by[output_dir.name] = {k: v.clone() for k, v in seen.state_dict().items()}
        return original_train(student, tokenizer, data, teacher=teacher, output_dir=output_dir, **kwargs)

    monkeypatch.setattr(run_mod, "train", spy)
    steps = [{"name": "a"}, {"name": "b", "teacher": "previous", "student": "first"}]
    chain = plan_chain(chain_config(tmp_path, steps))
    record = run_chain(chain)
    folder = chain.folder
    assert [s["status"] for s in record["steps"]] == ["done", "done"]

    # b learnt from a's final student, not from the original teacher
    final_a = load_file(folder / "a" / "final" / "model.safetensors")
    seen = taught_by["b"]
    assert set(final_a) <= set(seen)
    assert all(torch.equal(seen[k], final_a[k]) for k in final_a)
    b_config = yaml.safe_load((folder / "b" / "config.yaml").read_text())
    assert b_config["teacher"]["model"] == str(folder / "a" / "final") and b_config["teacher"]["weights_id"]
    assert b_config["student"]["model"] == str(folder / "a" / "student")

    # the report: one row per step, each scored against the original teacher on a's held-out split
    rows = chain_rows(folder)
    assert [(r["name"], r["teacher"], r["student"]) for r in rows] == [
        ("a", "original", "pruned from its teacher"),
        ("b", "a final", "a student, untrained"),
    ]
    a, b = rows
    # a's own evaluation measures the same thing (same teacher, same split, same weights)
    assert a["original"]["kl_to_teacher"] == pytest.approx(a["own"]["kl_to_teacher"], rel=1e-4)
    assert b["original"]["kl_to_teacher"] != pytest.approx(b["own"]["kl_to_teacher"], rel=1e-3)  # other teachers
    assert a["original"]["parameters"] == b["original"]["parameters"] > 0
    report = (folder / "chain.md").read_text()
    assert "| a ([md](a/report.md) · [html](a/report.html)) | original | pruned from its teacher |" in report
    assert "KL to original teacher" in report and "Closest to the original teacher" in report
    assert "<table>" in (folder / "chain.html").read_text()

    def stamps():
        return {
            p: (folder / p).stat().st_mtime_ns
            for p in ("a/final/config.json", "b/final/config.json", "b/data/split.json", "chain_eval.json")
        }

    before = stamps()
    taught_by.clear()
    run_chain(plan_chain(chain_config(tmp_path, steps)))  # resume: nothing to do
    assert taught_by == {} and {k: v for k, v in stamps().items() if k != "chain_eval.json"} == {
        k: v for k, v in before.items() if k != "chain_eval.json"
    }
    eval_before = json.loads((folder / "chain_eval.json").read_text())

    # a changes (another learning rate): a is redone, and b with it, although b's own config did not change
    changed = [{"name": "a", "training.learning_rate": 3e-3}, steps[1]]
    run_chain(plan_chain(chain_config(tmp_path, changed)))
    after = stamps()
    assert after["a/final/config.json"] != before["a/final/config.json"]
    assert after["b/final/config.json"] != before["b/final/config.json"]
    assert after["b/data/split.json"] != before["b/data/split.json"]  # b's every stage: its teacher changed
    assert set(taught_by) == {"a", "b"}
    final_a = load_file(folder / "a" / "final" / "model.safetensors")
    assert all(torch.equal(taught_by["b"][k], final_a[k]) for k in final_a)  # the new final, not a cached one
    eval_after = json.loads((folder / "chain_eval.json").read_text())
    assert eval_after["steps"]["a"]["weights_id"] != eval_before["steps"]["a"]["weights_id"]
    assert eval_after["steps"]["a"]["kl_to_teacher"] != eval_before["steps"]["a"]["kl_to_teacher"]


def test_a_failing_step_stops_the_chain_and_is_reported(tmp_path, monkeypatch):
    import alambic.training.run as run_mod

    def crash(*args, output_dir, **kwargs):
        raise RuntimeError(f"power cut in {output_dir.name}")

    monkeypatch.setattr(run_mod, "train", crash)
    chain = plan_chain(chain_config(tmp_path, [{"name": "a"}, {"name": "b", "teacher": "previous"}]))
    with pytest.raises(RuntimeError, match="power cut in a"):
        run_chain(chain)
    record = json.loads((chain.folder / "chain.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["failed", "pending"]
    assert "power cut in a" in record["steps"][0]["error"] and not (chain.folder / "b").exists()
    assert "- a: failed: `RuntimeError: power cut in a`" in (chain.folder / "chain.md").read_text()


# ---------------------------------------------------------------- the command line


def test_alambic_run_runs_a_chain_and_the_stage_commands_refuse_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import alambic.chain as chain_mod
    from alambic.cli import app

    cfg = chain_config(tmp_path, [{"name": "a"}, {"name": "b", "student": "previous", "loss.alpha": 0.0}])
    path = tmp_path / "chain.yaml"
    path.write_text(cfg.to_yaml())
    ran = []
    monkeypatch.setattr(chain_mod, "run_chain", lambda chain, resume: ran.append(chain) or {})
    result = CliRunner().invoke(app, ["run", str(path), "--set", "training.max_steps=7"])
    assert result.exit_code == 0, result.output
    (chain,) = ran
    assert [(s.name, s.config.training.max_steps) for s in chain.steps] == [("a", 7), ("b", 7)]  # --set: every step

    refused = CliRunner().invoke(app, ["distill", str(path)])
    assert refused.exit_code == 2 and "this config is a chain" in " ".join(refused.output.split())
    path.write_text(cfg.to_yaml().replace("alpha: 0.0", "alpha: 2.0"))
    invalid = CliRunner().invoke(app, ["run", str(path)])
    assert invalid.exit_code == 2 and "chain step 2/2 b" in invalid.output and not ran[1:]

    folder = tmp_path / "runs" / "tiny-chain"
    folder.mkdir(parents=True)
    (folder / "chain.json").write_text(json.dumps({"name": "tiny", "steps": []}))
    assert CliRunner().invoke(app, ["report", str(folder)]).exit_code == 0
    assert "# alambic chain: tiny" in (folder / "chain.md").read_text()
