"""The report's extra held-out sets (a table per set, retention across sets, its plot) and benchmark tables (one per
task group, teacher, students and kept), from a fake run's eval.json."""

import json

from alambic.evaluation.pareto import retention
from alambic.report.datasets import TRAINING_DOMAIN, kept_by_set
from alambic.report.lm_eval import lm_eval_section, task_groups
from alambic.report.render import write_report
from conftest import _model

PPL = {"teacher": 20.0, "student_before": 200.0, "student_distilled": 40.0, "student_ce_control": 50.0}


def _with_beyond(run_dir):
    evaluation = json.loads((run_dir / "eval.json").read_text())
    models = {
        n: _model(
            p,
            0.5 if n != "teacher" else 1.0,
            0.7 if n != "teacher" else 1.0,
            1.5 if n != "teacher" else 0.0,
            81_413_568,
            15,
        )
        for n, p in PPL.items()
    }
    evaluation["datasets"] = {
        "chat": {
            "source": "chatterbot",
            "format": "chat",
            "documents": 500,
            "sequences": 64,
            "sequences_before_cap": 480,
            "max_seq_len": 256,
            "overlap": {"action": "flag", "documents": 2, "ids": ["ai:3", "food:1"]},
            "models": models,
            "retention": {
                n: {k: v for k, v in r.items() if k in ("perplexity", "top1_agreement")}
                for n, r in retention(models).items()
            },
            "seconds": 12.5,
        }
    }

    def acc(value, stderr=0.02):
        return {"acc": {"value": value, "stderr": stderr}, "acc_norm": {"value": value / 2, "stderr": None}}

    scores = {"teacher": 0.6, "student_before": 0.2, "student_distilled": 0.45, "student_ce_control": 0.3}
    evaluation["lm_eval"] = {
        "lm_eval_version": "0.4.13",
        "settings": {"tasks": ["alambic_bbc_topic", "mmlu_tiny"], "num_fewshot": None, "limit": 50, "batch_size": 8},
        "tasks": {
            "alambic_bbc_topic": {"version": 1.0, "num_fewshot": 0, "samples": {"original": 106, "effective": 50}},
            "mmlu_a": {"version": 2.0, "num_fewshot": 0, "samples": {"original": 9, "effective": 9}},
        },
        "groups": {"mmlu_tiny": ["mmlu_a"]},
        "models": {
            n: {
                "seconds": 30.0,
                "results": {
                    "alambic_bbc_topic": acc(s),
                    "mmlu_a": acc(s / 2),
                    "mmlu_tiny": {"acc": {"value": s / 2, "stderr": 0.1}},
                },
            }
            for n, s in scores.items()
        },
        "seconds": 120.0,
        "local_tasks": {
            "alambic_bbc_topic": {
                "source": "bbc_news",
                "from": "the run's held-out split",
                "documents": 106,
                "same_text_as_training": 5,
                "examples": 106,
                "folder": "/x/run/lm_eval_tasks/alambic_bbc_topic",
            }
        },
    }
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    return evaluation


def test_retention_across_sets_starts_with_the_held_out_split(fake_run):
    evaluation = _with_beyond(fake_run())
    kept = kept_by_set(evaluation)
    assert list(kept) == [TRAINING_DOMAIN, "chat"]
    assert kept["chat"]["student_distilled"] == 0.5 and kept["chat"]["teacher"] == 1.0
    assert kept[TRAINING_DOMAIN]["student_distilled"] == evaluation["retention"]["student_distilled"]["perplexity"]


def test_benchmark_tables_follow_lm_eval_groups():
    evaluation = {
        "lm_eval": {
            "groups": {"mmlu_tiny": ["mmlu_a"]},
            "models": {"teacher": {"results": {"mmlu_tiny": {}, "mmlu_a": {}, "alambic_bbc_topic": {}}}},
        }
    }
    assert task_groups(evaluation["lm_eval"]) == {"mmlu_tiny": ["mmlu_tiny", "mmlu_a"], "tasks": ["alambic_bbc_topic"]}


def test_the_report_shows_the_extra_sets_and_the_benchmarks(fake_run):
    run = fake_run()
    evaluation = _with_beyond(run)
    report = write_report(run).read_text()
    section = report[report.index("## Beyond the training data") :]
    assert "### chat (chatterbot, chat: 16320 tokens in 64 sequences of 500 documents)" in section
    assert "| student distilled | 40.00 [38.80, 41.20] | 50.0% [49.0%, 51.0%] |" in section
    assert "**2 of its documents are also training documents** (same text, e.g. ai:3, food:1): flagged" in section
    kept = f"{100 * evaluation['retention']['student_distilled']['perplexity']:.1f}%"
    assert f"| student distilled | {kept} | 50.0% |" in section
    assert (run / "plots" / "retention_by_set.png").stat().st_size > 0
    bench = report[report.index("## Benchmarks (lm-evaluation-harness)") :]
    assert "### mmlu_tiny" in bench and "### tasks" in bench
    # teacher's score, each student's with the share of the teacher's it kept
    assert (
        "| alambic_bbc_topic | acc | 0.600 ± 0.020 | 0.200 ± 0.020 (33.3%) | 0.450 ± 0.020 (75.0%) | "
        "0.300 ± 0.020 (50.0%) |"
    ) in bench
    assert "| alambic_bbc_topic | acc_norm | 0.300 | 0.100 (33.3%) |" in bench
    assert "lm-eval 0.4.13 (alambic_bbc_topic v1.0, mmlu_a v2.0)" in bench and "at most 50 examples" in bench
    assert "Time: 120 s in all (teacher 30 s," in bench
    assert "5 left out for having the text of a training document" in bench
    assert "`lm_eval_tasks/alambic_bbc_topic/`" in bench


def test_no_section_without_the_records(fake_run):
    report = write_report(fake_run()).read_text()
    assert "## Beyond the training data" not in report and "## Benchmarks" not in report
    assert lm_eval_section({}) == []
