"""Whole runs on a tiny random teacher: every stage, the manifest, skipping, resuming, every example config."""

import json
from pathlib import Path

import pytest
import yaml

from alambic.config import load_config, validate_config
from alambic.pipeline import run_stages
from alambic.stages import STAGES, stages_until
from helpers import save_tiny_pair, tiny_model, tiny_tokenizer, write_text_corpus

# examples/scale/accelerate/ holds launcher configs, not run configs: tests/test_examples_scale.py reads them
EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples").rglob("*.yaml") if p.parent.name != "accelerate")


def tiny_run_config(tmp_path, **overrides):
    teacher = save_tiny_pair(tmp_path)
    data = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(teacher), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "paths": [str(write_text_corpus(tmp_path / "corpus"))],
            "max_seq_len": 16,
            "validation_fraction": 0.2,
        },
        "loss": {"divergence": "forward_kl", "alpha": 0.8, "temperature": 2.0},
        "training": {"max_steps": 3, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3},
        # cost measured on every run, but as little of it as still exercises each figure
        "evaluation": {
            "ce_control": True,
            "batch_size": 4,
            "cost": {"prompt_tokens": 8, "new_tokens": 3, "batch_size": 2, "warmup": 0, "repeats": 1},
        },
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(data)


def test_a_whole_run_writes_every_artifact_and_reruns_nothing(tmp_path):
    cfg = tiny_run_config(tmp_path)
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    for path in (
        "config.yaml",
        "manifest.json",
        "student/config.json",
        "student/student.json",
        "data/split.json",
        "final/config.json",
        "control/final/config.json",
        "eval.json",
        "report.md",
        "metrics.jsonl",
    ):
        assert (run / path).exists(), path
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    active = [s for s in STAGES if s.enabled(cfg)]
    assert "cache" not in manifest  # no data.teacher_cache: the stage is not part of this run
    assert [manifest[s.name]["status"] for s in active] == ["done"] * len(active)
    assert all(manifest[s.name]["seconds"] >= 0 and manifest[s.name]["inputs_hash"] for s in active)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["loss"]["jsd_beta"] == 0.5  # defaults written out
    evaluation = json.loads((run / "eval.json").read_text())["models"]
    assert set(evaluation) == {"teacher", "student_before", "student_distilled", "student_ce_control"}
    assert evaluation["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert evaluation["student_distilled"]["parameters"] < evaluation["teacher"]["parameters"]
    assert "student distilled" in (run / "report.md").read_text()
    # cost of every model on the weights just scored, and what each keeps of the teacher
    cost = evaluation["student_distilled"]["cost"]
    assert cost["new_tokens"] == 3 and cost["repeats"] == 1 and cost["disk"]["format"] == "safetensors"
    assert cost["peak_memory_bytes"] >= cost["weight_bytes"] > 0
    layers = {name: evaluation[name]["architecture"]["num_layers"] for name in ("teacher", "student_distilled")}
    assert 2 * layers["student_distilled"] == layers["teacher"]
    retained = json.loads((run / "eval.json").read_text())["retention"]["student_distilled"]
    assert retained["size_reduction"] > 1 and retained["speedup"] is not None
    assert "## Cost" in (run / "report.md").read_text()

    stamps = {
        p: p.stat().st_mtime_ns
        for p in (run / "final" / "config.json", run / "eval.json", run / "control" / "final" / "config.json")
    }
    run_stages(cfg, STAGES)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing redone

    # a new loss redoes distillation and what follows, not the data, the student or the CE control
    student_stamp = (run / "student" / "config.json").stat().st_mtime_ns
    run_stages(cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"temperature": 1.0})}), STAGES)
    assert (run / "student" / "config.json").stat().st_mtime_ns == student_stamp
    control = run / "control" / "final" / "config.json"
    assert control.stat().st_mtime_ns == stamps[control]
    assert (run / "final" / "config.json").stat().st_mtime_ns != stamps[run / "final" / "config.json"]
    assert (run / "eval.json").stat().st_mtime_ns != stamps[run / "eval.json"]


def test_a_pruned_student_gets_its_pruning_report(tmp_path):
    """Depth by importance and width at once, on the tiny teacher: pruning.json, the report section, plots."""
    cfg = tiny_run_config(
        tmp_path,
        student={
            "from_teacher": {
                "layers": "importance",
                "num_layers": 3,
                "num_attention_heads": 2,
                "intermediate_size": 48,
                "hidden_size": 24,
                "calibration_sequences": 4,
            }
        },
        evaluation={"ce_control": False},
    )
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    pruning = json.loads((run / "student" / "pruning.json").read_text())
    assert pruning["student_shape"] == {
        "num_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "hidden_size": 24,
        "head_dim": 8,
    }
    assert len(pruning["kept_layers"]) == 3 and pruning["layer_ranking"] == "skip_loss"
    assert len(pruning["importance"]["skip_loss_increase"]) == 4
    assert pruning["importance"]["num_sequences"] == 4
    assert pruning["student_parameters"]["total"] < pruning["teacher_parameters"]["total"]
    assert pruning["after_pruning"]["student_pruned"]["kl_to_teacher"] > 0
    assert pruning["student_disk_bytes"] > 0
    report = (run / "report.md").read_text()
    assert "## Pruning" in report and "right after pruning" in report and "after distillation" in report
    for plot in ("layer_importance.png", "head_importance.png"):
        assert f"plots/{plot}" in report and (run / "plots" / plot).stat().st_size > 1000
    evaluation = json.loads((run / "eval.json").read_text())["models"]
    assert evaluation["student_before"]["kl_to_teacher"] == pytest.approx(
        pruning["after_pruning"]["student_pruned"]["kl_to_teacher"], rel=1e-4
    )


def test_an_interrupted_run_resumes_its_training(tmp_path, monkeypatch):
    cfg = tiny_run_config(tmp_path, training={"max_steps": 4, "save_steps": 2})
    from transformers import TrainerCallback

    import alambic.training.run as run_mod

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("power cut")

    original_train = run_mod.train
    monkeypatch.setattr(run_mod, "train", lambda *a, **k: original_train(*a, callbacks=[Crash()], **k))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(cfg, stages_until("distill"))
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())["stages"]
    assert manifest["distill"]["status"] == "failed" and "power cut" in manifest["distill"]["error"]

    monkeypatch.setattr(run_mod, "train", original_train)
    run_stages(cfg, stages_until("distill"))
    summary = json.loads((cfg.run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["global_step"] == 4


def test_a_run_from_the_offline_teacher_cache(tmp_path):
    cfg = tiny_run_config(
        tmp_path,
        data={"teacher_cache": {"k": 8, "sequences_per_shard": 4}},
        loss={"alpha": 1.0, "temperature": 1.0},
        evaluation={"ce_control": False},
        training={"max_steps": 4, "learning_rate": 3e-3},
    )
    run_stages(cfg, STAGES)
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())["stages"]
    assert manifest["cache"]["status"] == "done"
    cache = json.loads((cfg.run_dir / "teacher_cache" / "train" / "manifest.json").read_text())
    assert cache["k"] == 8 and len(cache["shards"]) > 1
    # (that training from a cache brings a student closer is tested in tests/data/test_cache.py)
    assert json.loads((cfg.run_dir / "train_summary.json").read_text())["global_step"] == 4
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_soft", 0) > 0 for r in logged)
    assert "student_distilled" in json.loads((cfg.run_dir / "eval.json").read_text())["models"]


def test_a_cache_made_for_other_data_is_refused(tmp_path):
    from alambic.data.cache import CacheMismatchError

    cfg = tiny_run_config(
        tmp_path, data={"teacher_cache": {"k": 8}}, loss={"alpha": 1.0}, evaluation={"ce_control": False}
    )
    run_stages(cfg, stages_until("cache"))
    other = cfg.model_copy(
        update={
            "name": "other",
            "data": cfg.data.model_copy(
                update={
                    "max_seq_len": 12,
                    "teacher_cache": cfg.data.teacher_cache.model_copy(
                        update={"folder": cfg.run_dir / "teacher_cache"}
                    ),
                }
            ),
        }
    )
    with pytest.raises(CacheMismatchError, match="dataset"):
        run_stages(other, [s for s in stages_until("distill") if s.name != "cache"])


def test_logit_mse_cannot_use_a_cache(tmp_path):
    from alambic.config import ConfigError

    with pytest.raises(ConfigError, match="logit_mse cannot use it"):
        tiny_run_config(tmp_path, data={"teacher_cache": {}}, loss={"divergence": "logit_mse"})


def _tiny_chain_steps(steps: list[dict]) -> None:
    """Chain steps scaled to the tiny teacher (4 layers, cut to 2 by the base): a step's own data, training and
    evaluation give way to the tiny ones, and a step that prunes further keeps 1 layer."""
    for step in steps:
        overrides = step["overrides"]
        for key in [k for k in overrides if k.split(".")[0] in ("data", "training", "evaluation")]:
            del overrides[key]
        if "student.from_teacher.num_layers" in overrides:
            overrides["student.from_teacher.num_layers"] = 1
        for student in (overrides.get("student"), step.get("student")):
            if isinstance(student, dict) and (student.get("from_teacher") or {}).get("num_layers"):
                student["from_teacher"]["num_layers"] = 1


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_config_runs_on_a_tiny_model(example, tmp_path):
    shipped = load_config(example)  # valid as shipped
    tiny = tiny_run_config(tmp_path)
    data = shipped.model_dump(mode="json")
    data.update(output_dir=str(tmp_path / "runs"), teacher=tiny.teacher.model_dump(mode="json"))
    for i, extra in enumerate(data.get("additional_teachers") or []):  # more teachers: tiny ones, same tokenizer
        folder = tmp_path / f"teacher_{i + 1}"
        tiny_model("llama", seed=10 + i).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        extra.update(model=str(folder), gguf_file=None, device="cpu", dtype="float32")
    data["training"].update(max_steps=2, bf16=False, save_steps=10)
    data["evaluation"].update(
        ce_control=False, cost=tiny.evaluation.cost.model_dump(), generation={"max_new_tokens": 4}
    )
    if data["evaluation"].get("lm_eval"):  # standard tasks need the Hub: the tiny run keeps alambic's local ones
        local = [t for t in data["evaluation"]["lm_eval"]["tasks"] if t.startswith("alambic_")]
        data["evaluation"]["lm_eval"] = {**data["evaluation"]["lm_eval"], "tasks": local, "limit": 2} if local else None
    for extra in (data["evaluation"].get("datasets") or {}).values():  # tiny sets; a chat turn fits in 64 tokens
        extra.update(max_sequences=4, max_seq_len=64)
    pruning = data["student"]["from_teacher"] or {}
    if pruning.get("target_parameters"):  # a budget for the real teacher: scale it to the tiny one
        pruning["target_parameters"] = 30_000
    if pruning.get("num_layers"):
        pruning["num_layers"] = 2
    if shipped.data.format == "chat":
        rows = [
            {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, fine"}]}
        ] * 12
        path = tmp_path / "chat.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        data["data"].update(source="files", paths=[str(path)], max_seq_len=32)
        if data["data"].get("teacher_responses"):  # a random teacher seldom stops: short answers, all kept
            data["data"]["teacher_responses"].update(max_new_tokens=6, filter_degenerate=False)
    elif shipped.task == "sequence_classification":  # labelled rows; a short fine-tune gives the tiny teacher its head
        from helpers import write_labelled_corpus

        data["data"].update(
            source="files", paths=[str(write_labelled_corpus(tmp_path / "labelled.jsonl"))], max_seq_len=32
        )
        if shipped.teacher.fine_tune is not None:
            data["teacher"]["fine_tune"] = {**shipped.teacher.fine_tune.model_dump(), "max_steps": 2, "bf16": False}
    else:
        data["data"] = tiny.data.model_dump(mode="json")
    if data.get("chain"):  # every step on the tiny data, quality only, through the chain runner
        import torch

        from alambic.chain import plan_chain, run_chain

        _tiny_chain_steps(data["chain"])
        data["evaluation"].update(cost=None, generation=None)
        chain = plan_chain(validate_config(data))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # several runs of tiny tensors: more threads only contend (3x slower under load)
        try:
            assert [s["status"] for s in run_chain(chain)["steps"]] == ["done"] * len(chain.steps)
        finally:
            torch.set_num_threads(threads)
        compared = json.loads((chain.folder / "chain_eval.json").read_text())["steps"]
        assert list(compared) == [s.name for s in chain.steps] and all(m["num_tokens"] > 0 for m in compared.values())
        return
    cfg = validate_config(data)
    run_stages(cfg, STAGES)
    evaluation = json.loads((cfg.run_dir / "eval.json").read_text())["models"]
    counted = "num_examples" if shipped.task == "sequence_classification" else "num_tokens"
    assert evaluation["student_distilled"][counted] > 0
    if shipped.data.format == "chat":  # responses to the held-out prompts, against the references and the teacher
        generation = evaluation["student_distilled"]["generation"]
        assert generation["reference"]["num_prompts"] > 0 and 0 <= generation["teacher"]["rouge_l"] <= 1
        assert "## Responses to held-out prompts" in (cfg.run_dir / "report.md").read_text()


def test_a_run_reuses_only_the_identical_prefix_of_a_siblings_stages(tmp_path):
    """A different loss shares the data and the student (hard-linked), not the distillation."""
    import os

    first = tiny_run_config(tmp_path, evaluation={"ce_control": False})
    run_stages(first, stages_until("distill"))
    second = first.model_copy(update={"name": "second", "loss": first.loss.model_copy(update={"temperature": 1.0})})
    stages = run_stages(second, stages_until("distill"), reuse_from=[first.run_dir]).stages
    assert stages["data"]["reused_from"] == stages["student"]["reused_from"] == str(first.run_dir)
    assert (
        stages["student"]["inputs_hash"]
        == json.loads((first.run_dir / "manifest.json").read_text())["stages"]["student"]["inputs_hash"]
    )
    assert "reused_from" not in stages["distill"] and stages["distill"]["status"] == "done"
    weights = Path("student") / "model.safetensors"
    assert os.path.samefile(first.run_dir / weights, second.run_dir / weights)
    assert (second.run_dir / "data" / "split.json").is_file() and (second.run_dir / "final" / "config.json").is_file()
    assert json.loads((second.run_dir / "train_summary.json").read_text())["global_step"] == 3  # trained here


def test_a_reused_stage_run_again_never_writes_into_the_siblings_files(tmp_path):
    """Hard links share one file: a stage that appends in place (a log) must get its own copy first."""
    import os

    from alambic.pipeline import Stage

    def append(cfg, ctx):
        log = ctx.run_dir / "logs" / "log.txt"
        log.parent.mkdir(exist_ok=True)
        with log.open("a") as f:  # in place, as metrics.jsonl or a resumable shard is written
            f.write(f"T={cfg.loss.temperature}\n")
        return {}

    stages = [Stage("log", ("loss",), ("logs/log.txt",), append)]
    first = tiny_run_config(tmp_path)
    run_stages(first, stages)
    second = first.model_copy(update={"name": "second"})
    assert run_stages(second, stages, reuse_from=[first.run_dir]).stages["log"]["reused_from"] == str(first.run_dir)
    assert os.path.samefile(first.run_dir / "logs" / "log.txt", second.run_dir / "logs" / "log.txt")

    changed = second.model_copy(update={"loss": second.loss.model_copy(update={"temperature": 5.0})})
    assert "reused_from" not in run_stages(changed, stages, reuse_from=[first.run_dir]).stages["log"]
    assert (first.run_dir / "logs" / "log.txt").read_text() == "T=2.0\n"
    assert (second.run_dir / "logs" / "log.txt").read_text() == "T=2.0\nT=5.0\n"


def test_evaluate_redoes_only_the_evaluation_and_report_even_of_a_moved_run_folder(tmp_path):
    from typer.testing import CliRunner

    from alambic.cli import app

    cfg = tiny_run_config(tmp_path, evaluation={"ce_control": False})
    run_stages(cfg, STAGES)
    moved = tmp_path / "elsewhere" / "tiny"
    moved.parent.mkdir()
    cfg.run_dir.rename(moved)
    final = (moved / "final" / "config.json").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["evaluate", str(moved), "--set", "evaluation.cost.repeats=2"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((moved / "eval.json").read_text())["models"]
    assert evaluation["teacher"]["cost"]["repeats"] == 2  # the override reached the evaluation
    assert (moved / "final" / "config.json").stat().st_mtime_ns == final  # nothing trained again
    manifest = json.loads((moved / "manifest.json").read_text())["stages"]
    assert manifest["evaluate"]["status"] == manifest["report"]["status"] == "done"
    assert not (tmp_path / "runs" / "tiny").exists()  # evaluated where it is now, not where it was run
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert bad.exit_code == 2 and "not a run folder" in " ".join(bad.output.split())


def test_response_distillation_with_entropy_selection(tmp_path):
    """generate -> select -> distill on the teacher's answers; each later change redoes only what it must."""
    import numpy as np

    from alambic.data import load_prepared
    from alambic.data.generate import read_generations
    from alambic.models import load_tokenizer
    from alambic.stages import distill_train_set
    from helpers import NEWS

    rows = [
        {
            "messages": [
                {"role": "user", "content": NEWS[i % 6][: 20 + i]},
                {"role": "assistant", "content": NEWS[(i + 1) % 6]},
            ]
        }
        for i in range(16)
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_run_config(
        tmp_path,
        loss={"alpha": 0.0},
        evaluation={"ce_control": False, "generation": {"max_new_tokens": 4}},
        data={
            "paths": [str(chat)],
            "format": "chat",
            "max_seq_len": 96,
            "teacher_responses": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 4, "filter_degenerate": False},
            "selection": {"keep_fraction": 0.5, "band": "lowest", "batch_size": 4},
        },
    )
    run_stages(cfg, STAGES)
    run = cfg.run_dir
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert manifest["generate"]["status"] == manifest["select"]["status"] == "done"
    held_out = set(json.loads((run / "data" / "split.json").read_text())["validation_document_ids"])
    records = read_generations(run / "generations" / "generations.jsonl")
    assert len(records) == 13 and not {r["prompt_id"] for r in records} & held_out  # 16 conversations, 3 held out
    generated = json.loads((run / "generations" / "summary.json").read_text())
    selection = json.loads((run / "selection" / "selection.json").read_text())
    assert selection["total"] == generated["training_sequences"]
    assert selection["kept"] == round(0.5 * selection["total"])
    ranked = np.argsort(selection["scores"], kind="stable")[: selection["kept"]]
    assert sorted(ranked.tolist()) == selection["kept_indices"]

    # distill trained on the kept teacher answers, counting the answers' tokens only
    trained = distill_train_set(cfg, run, load_prepared(run / "data").train)
    assert len(trained) == selection["kept"]
    tokenizer = load_tokenizer(cfg.teacher)
    responses = {r["response"] + "<|im_end|>" for r in records}
    for row in trained:
        assert tokenizer.decode([t for t in row["labels"] if t != -100]) in responses
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 3
    report = (run / "report.md").read_text()
    assert "## Training data" in report and "Teacher-entropy selection: kept" in report
    assert (run / "plots" / "selection_entropy.png").stat().st_size > 1000

    def stamps():
        paths = (
            "data/split.json",
            "student/config.json",
            "generations/summary.json",
            "selection/selection.json",
            "final/config.json",
        )
        return {p: (run / p).stat().st_mtime_ns for p in paths}

    before = stamps()
    wider = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"selection": cfg.data.selection.model_copy(update={"keep_fraction": 0.75})}
            )
        }
    )
    run_stages(wider, stages_until("distill"))
    after = stamps()
    assert [p for p in before if before[p] != after[p]] == ["selection/selection.json", "final/config.json"]

    hotter = wider.model_copy(
        update={
            "data": wider.data.model_copy(
                update={"teacher_responses": wider.data.teacher_responses.model_copy(update={"temperature": 2.0})}
            )
        }
    )
    run_stages(hotter, stages_until("distill"))
    again = stamps()
    assert [p for p in after if after[p] != again[p]] == [
        "generations/summary.json",
        "selection/selection.json",
        "final/config.json",
    ]
    summary = json.loads((run / "generations" / "summary.json").read_text())
    assert summary["discarded"] == summary["generated"] == 13  # other settings: all answered anew
