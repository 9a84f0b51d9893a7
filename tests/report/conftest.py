"""A fake finished run folder, shaped like `alambic run` writes one (see a real run's eval.json, metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alambic.evaluation.pareto import pareto_fronts, retention

SHAPE = {
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "hidden_size": 32,
    "head_dim": 8,
}


def _model(ppl, agree1, agree5, kl, params, layers, intervals=True):
    m = {
        "perplexity": ppl,
        "cross_entropy": 0.0,
        "top1_agreement": agree1,
        "top5_agreement": agree5,
        "kl_to_teacher": kl,
        "num_tokens": 16320,
        "num_sequences": 64,
        "parameters": params,
        "non_embedding_parameters": params // 2,
        "num_layers": layers,
    }
    if intervals:
        m["intervals"] = {
            "perplexity": [ppl * 0.97, ppl * 1.03],
            "top1_agreement": [agree1 - 0.01, agree1 + 0.01],
            "top5_agreement": [agree5 - 0.01, agree5 + 0.01],
            "kl_to_teacher": [kl * 0.95, kl * 1.05],
        }
    return m


def _metrics(alpha: float, steps: int = 60) -> list[str]:
    """Training log lines every 5 steps (loss parts as the trainer logs them), eval every 20, a final summary."""
    lines = []
    for step in [1, *range(5, steps + 1, 5)]:
        soft, hard = 3.0 / (1 + step / 10), 5.0 / (1 + step / 30)
        record = {
            "step": step,
            "time": 1795443555.0 + step,
            "loss": alpha * soft + (1 - alpha) * hard,
            "grad_norm": 2.0 / (1 + step / 20),
            "learning_rate": 1e-3 * (1 - step / steps),
            "tokens_per_second": 400.0,
            "epoch": step / 1000,
        }
        if alpha > 0:
            record["loss_soft"] = soft
        if alpha < 1:
            record["loss_hard"] = hard
        lines.append(json.dumps(record))
        if step % 20 == 0:
            lines.append(
                json.dumps(
                    {
                        "step": step,
                        "eval_loss": hard * 1.1,
                        "eval_loss_hard": hard * 1.1,
                        "eval_runtime": 3.0,
                        "eval_samples_per_second": 20.0,
                        "epoch": step / 1000,
                    }
                )
            )
    lines.append(json.dumps({"step": steps, "train_runtime": 700.0, "train_loss": 1.2, "total_flos": 4.9e13}))
    return lines


def _timing(median: float) -> dict:
    values = [median * f for f in (0.98, 1.0, 1.0, 1.01, 1.03)]
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median,
        "values": values,
    }


def _cost(params: int, latency: float) -> dict:
    """Shaped like evaluation.cost.measure_cost's record."""
    return {
        "device": "cpu",
        "device_name": "Fake CPU @ 2 GHz",
        "torch_threads": 2,
        "dtype": "float32",
        "parameters": params,
        "prompt_tokens": 128,
        "new_tokens": 64,
        "batch_size": 8,
        "warmup": 1,
        "repeats": 5,
        "prefill_seconds": _timing(latency * 3),
        "latency_per_token_seconds": _timing(latency),
        "tokens_per_second_batch1": _timing(1 / latency),
        "throughput_tokens_per_second": _timing(4 / latency),
        "weight_bytes": params * 4,
        "working_memory_bytes": 50 * 2**20,
        "peak_memory_bytes": params * 4 + 50 * 2**20,
        "memory_method": "peak RSS (clear_refs)",
        "disk": {"bytes": params * 4, "format": "safetensors", "files": 1},
    }


def _generation(rouge: float, vs_teacher: float | None) -> dict:
    def g(value):
        return {
            "rouge_l": value,
            "exact_match": value / 4,
            "intervals": {"rouge_l": [value - 0.05, value + 0.05], "exact_match": [0.0, value / 2]},
            "num_prompts": 32,
            "response_tokens": {"mean": 20.5, "median": 18, "max": 64},
            "truncated_share": 0.125,
        }

    out = {
        "reference": g(rouge),
        "examples": [
            {
                "prompt": "What is AI?",
                "reference": "Artificial intelligence.",
                "response": "AI is artificial intelligence.",
            }
        ],
    }
    if vs_teacher is not None:
        out["teacher"] = g(vs_teacher)
    return out


def make_run(
    run_dir: Path,
    *,
    intervals: bool = True,
    control: bool = True,
    pruning: bool = True,
    cost: bool = True,
    generation: bool = False,
) -> Path:
    """Write the records of a finished run (no models) into `run_dir`; returns it."""
    (run_dir / "student").mkdir(parents=True)
    config = {
        "name": "fake_run",
        "teacher": {"model": "smollm2-135m-instruct"},
        "data": {"source": "bbc_news", "format": "text", "max_seq_len": 256},
        "loss": {"divergence": "forward_kl", "temperature": 1.0, "alpha": 0.5},
        "training": {
            "max_steps": 60,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 0.001,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05,
        },
        "evaluation": {"ce_control": control},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    models = {
        "teacher": _model(36.9, 1.0, 1.0, 0.0, 134_515_008, 30, intervals),
        "student_before": _model(438.05, 0.259, 0.45, 2.709, 81_413_568, 15, intervals),
        "student_distilled": _model(71.11, 0.504, 0.78, 0.974, 81_413_568, 15, intervals),
    }
    if control:
        models["student_ce_control"] = _model(80.5, 0.45, 0.74, 1.2, 81_413_568, 15, intervals)
    if intervals:  # the teacher against itself: point intervals
        models["teacher"]["intervals"].update(
            top1_agreement=[1.0, 1.0], top5_agreement=[1.0, 1.0], kl_to_teacher=[0.0, 0.0]
        )
    evaluation = {"split": "validation", "models": models}
    latencies = {"teacher": 0.020, "student_before": 0.011, "student_distilled": 0.011, "student_ce_control": 0.011}
    for name, m in models.items():
        m["architecture"] = {
            "model_type": "llama",
            "num_layers": m["num_layers"],
            "hidden_size": 576,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "intermediate_size": 1536,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "dtype": "float32",
        }
        if cost:
            m["cost"] = _cost(m["parameters"], latencies[name])
        if generation:
            m["generation"] = _generation({"teacher": 0.4}.get(name, 0.3), None if name == "teacher" else 0.5)
    if cost:  # eval.json from before cost measurement has no retention either
        ret = retention(models)
        evaluation |= {"retention": ret, "pareto_front": pareto_fronts(ret)}
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    summary = {"global_step": 60, "train_seconds": 700.0, "device": "cpu", "torch_threads": 2, "log_history": []}
    (run_dir / "train_summary.json").write_text(json.dumps(summary))
    # a resumed run re-logs the steps after its checkpoint; a killed one leaves half a line
    (run_dir / "metrics.jsonl").write_text("\n".join([*_metrics(0.5), *_metrics(0.5)[-6:]]) + '\n{"step": 6')
    if control:
        (run_dir / "control").mkdir()
        (run_dir / "control" / "train_summary.json").write_text(json.dumps({**summary, "train_seconds": 500.0}))
        (run_dir / "control" / "metrics.jsonl").write_text("\n".join(_metrics(0.0)) + "\n")
    (run_dir / "student" / "student.json").write_text(
        json.dumps(
            {
                "method": "prune",
                "teacher_layers": 4,
                "kept_layers": [0, 3],
                "teacher_shape": SHAPE,
                "student_shape": {**SHAPE, "num_layers": 2},
            }
        )
    )
    if pruning:
        (run_dir / "student" / "pruning.json").write_text(
            json.dumps(
                {
                    "teacher_shape": SHAPE,
                    "student_shape": {**SHAPE, "num_layers": 2},
                    "teacher_parameters": {"total": 40_000, "non_embedding": 30_000},
                    "student_parameters": {"total": 20_000, "non_embedding": 10_000},
                    "teacher_tensor_bytes": 160_000,
                    "student_tensor_bytes": 80_000,
                    "kept_layers": [0, 3],
                    "removed_layers": [1, 2],
                    "layer_ranking": "skip_loss",
                    "plan": {"layers": [0, 3], "heads": None},
                    "importance": {
                        "num_sequences": 4,
                        "num_tokens": 60,
                        "base_loss": 5.0,
                        "block_influence": [0.9, 0.1, 0.2, 0.5],
                        "skip_loss_increase": [3.0, 0.1, 0.2, 1.0],
                        "head_activation": [[1.0, 0.5, 2.0, 0.1]] * 4,
                    },
                }
            )
        )
    stages = {
        name: {"status": "done", "seconds": s}
        for name, s in (("data", 5.2), ("student", 377.1), ("distill", 789.1), ("control", 500.0), ("evaluate", 77.3))
    }
    (run_dir / "manifest.json").write_text(json.dumps({"stages": stages}))
    return run_dir


@pytest.fixture
def fake_run(tmp_path):
    """Call with make_run's options to get a fake run folder under tmp_path."""
    return lambda **options: make_run(tmp_path / "fake_run", **options)
