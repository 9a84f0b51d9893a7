"""A whole tiny run evaluated beyond its training split: an extra held-out set and a local lm-eval task, for every
model of the run, into eval.json and the report."""

import json

import pytest

from alambic.config import validate_config
from alambic.pipeline import run_stages
from alambic.stages import STAGES
from helpers import save_tiny_pair, write_text_corpus

MODELS = {"teacher", "student_before", "student_distilled", "student_ce_control"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("beyond")
    dialogue = tmp / "dialogue.jsonl"
    dialogue.write_text(
        "".join(json.dumps({"text": f"Hello {i}, how are you? I am fine, thank you."}) + "\n" for i in range(12))
    )
    corpus = write_text_corpus(tmp / "corpus")
    cfg = validate_config(
        {
            "name": "beyond",
            "output_dir": str(tmp / "runs"),
            "teacher": {"model": str(save_tiny_pair(tmp)), "device": "cpu"},
            "student": {"from_teacher": {"layers": "every_other"}},
            "data": {"source": "files", "paths": [str(corpus)], "max_seq_len": 16, "validation_fraction": 0.2},
            "training": {"max_steps": 2, "save_steps": 10, "logging_steps": 1, "learning_rate": 1e-3, "bf16": False},
            "evaluation": {
                "ce_control": True,
                "batch_size": 4,
                "cost": None,
                "datasets": {
                    "dialogue": {"source": "files", "paths": [str(dialogue)], "max_sequences": 6},
                    # the run's own corpus: its training documents overlap, flagged and scored
                    "news_again": {"source": "files", "paths": [str(corpus)], "overlap": "flag", "max_sequences": 4},
                },
                "lm_eval": {"tasks": ["alambic_bbc_topic"], "limit": 2, "batch_size": 4},
            },
        }
    )
    run_stages(cfg, STAGES)
    return cfg.run_dir


def test_every_model_is_scored_on_the_extra_sets_with_intervals(run):
    sets = json.loads((run / "eval.json").read_text())["datasets"]
    assert set(sets) == {"dialogue", "news_again"}
    for s in sets.values():
        assert set(s["models"]) == MODELS
        for m in s["models"].values():
            assert m["num_tokens"] > 0 and set(m["intervals"]) >= {"perplexity", "top1_agreement", "kl_to_teacher"}
    assert sets["dialogue"]["overlap"]["documents"] == 0 and sets["dialogue"]["sequences"] == 6
    assert sets["news_again"]["overlap"]["action"] == "flag" and sets["news_again"]["overlap"]["documents"] > 0


def test_the_local_task_runs_for_every_model_into_eval_json(run):
    bench = json.loads((run / "eval.json").read_text())["lm_eval"]
    assert set(bench["models"]) == MODELS
    for m in bench["models"].values():
        assert set(m["results"]["alambic_bbc_topic"]) == {"acc", "acc_norm"}
        assert m["results"]["alambic_bbc_topic"]["acc"]["stderr"] is not None
    assert bench["tasks"]["alambic_bbc_topic"]["samples"]["effective"] == 2
    assert bench["local_tasks"]["alambic_bbc_topic"]["from"].startswith("the whole corpus")
    assert (run / "lm_eval_tasks" / "alambic_bbc_topic" / "alambic_bbc_topic.yaml").is_file()
    timings = json.loads((run / "eval.json").read_text())["timings"]
    assert timings["lm_eval"] > 0 and timings["datasets"] > 0


def test_the_report_shows_both(run):
    report = (run / "report.md").read_text()
    assert "### dialogue (files, text:" in report and "### Retention across sets" in report
    assert "held-out split: perplexity kept" in report and "dialogue: perplexity kept" in report
    assert "are also training documents** (same text" in report  # news_again, flagged by name
    assert "(plots/retention_by_set.png)" in report and (run / "plots" / "retention_by_set.png").stat().st_size > 0
    assert "## Benchmarks (lm-evaluation-harness)" in report and "| alambic_bbc_topic | acc |" in report
    assert "examples from" in report and " s in all (" in report
