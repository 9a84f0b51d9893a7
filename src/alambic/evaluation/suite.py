"""Everything the evaluate stage measures, for the teacher and every other model, from one set of loaded weights:
quality against the teacher (the held-out split and the extra held-out sets), responses to held-out prompts (chat
data), benchmarks (lm-eval), inference cost, retention and Pareto front.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from transformers import PreTrainedModel

from alambic.config import CostConfig, EvaluationConfig, GenerationEvalConfig
from alambic.evaluation.datasets import HeldOutSet
from alambic.evaluation.pareto import pareto_fronts, retention
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.utils import console


def cost_prompts(dataset, cfg: CostConfig, column: str = "input_ids") -> torch.Tensor:
    """(R, P) prompt ids for the cost runs: the first `cfg.prompt_tokens` tokens of the first held-out
    sequences (`column`: the teacher's own, `teacher_input_ids`, when it has another tokenizer), R =
    cfg.batch_size (repeated when the split has fewer), P shortened to the shortest of them."""
    rows = [list(dataset[i][column]) for i in range(min(len(dataset), cfg.batch_size))]
    if not rows:
        raise ValueError("the held-out split is empty: nothing to prompt the cost runs with")
    length = min(cfg.prompt_tokens, *(len(r) for r in rows))
    ids = torch.tensor([r[:length] for r in rows], dtype=torch.long)
    return ids.repeat(-(-cfg.batch_size // len(rows)), 1)[: cfg.batch_size]


def architecture(model: PreTrainedModel) -> dict[str, Any]:
    """The shape of a model as its config states it (what a user compares between teacher and student)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    return {
        "model_type": getattr(c, "model_type", None),
        "num_layers": getattr(c, "num_hidden_layers", None),
        "hidden_size": getattr(c, "hidden_size", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None),
        "intermediate_size": getattr(c, "intermediate_size", None),
        "vocab_size": getattr(c, "vocab_size", None),
        "tie_word_embeddings": getattr(c, "tie_word_embeddings", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def generation_scores(everyone: dict[str, PreTrainedModel], tokenizer, prompts: list[dict[str, Any]],
                      cfg: GenerationEvalConfig, teacher_tokenizer=None) -> dict[str, dict[str, Any]]:
    """Greedy responses of every model to the held-out prompts, scored against the references and (students,
    baselines) against the teacher's own responses. `teacher_tokenizer`: the teacher's, when it is not
    `tokenizer` (each model answers in its own chat template)."""
    from alambic.decoding import generate_responses
    from alambic.evaluation.generation import generation_metrics

    prompts = prompts[: cfg.max_prompts]
    conversations = [p["messages"] for p in prompts]
    references = [p["reference"] for p in prompts]
    responses = {name: generate_responses(model, teacher_tokenizer if name == "teacher" and teacher_tokenizer
                                          else tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                                          batch_size=cfg.batch_size, description=f"{name}: answering")
                 for name, model in everyone.items()}
    teacher_texts = [r["response"] for r in responses["teacher"]]
    scores = {}
    for name, out in responses.items():
        texts = [r["response"] for r in out]
        scores[name] = {"reference": generation_metrics(texts, references, num_tokens=[r["num_tokens"] for r in out],
                                                        finish_reasons=[r["finish_reason"] for r in out])}
        if name != "teacher":
            scores[name]["teacher"] = generation_metrics(texts, teacher_texts)
        scores[name]["examples"] = [{"prompt": p["messages"][-1]["content"], "reference": p["reference"],
                                     "response": t} for p, t in list(zip(prompts, texts))[:3]]
    return scores


QUALITY_KEPT = ("perplexity", "top1_agreement", "top5_agreement")  # retention per extra set


def held_out_set_scores(teacher: PreTrainedModel, models: dict[str, PreTrainedModel], sets: Sequence[HeldOutSet], *,
                        pad_token_id: int, batch_size: int, teacher_pad_token_id: int | None = None) -> dict[str, Any]:
    """Every model on each extra held-out set, scored as the held-out split is (`evaluate_against_teacher`).

    Returns:
        {set name: {what was read ("source", "documents", "sequences", "overlap", ...), "models": {name: quality
        metrics with intervals}, "retention": {name: {perplexity, top1_agreement, top5_agreement kept}}, "seconds"}}.
    """
    out = {}
    for s in sets:
        start = time.perf_counter()
        scores = evaluate_against_teacher(teacher, models, s.samples, pad_token_id=pad_token_id, batch_size=batch_size,
                                          teacher_pad_token_id=teacher_pad_token_id, description=f"set {s.name!r}")
        kept = {name: {k: r.get(k) for k in QUALITY_KEPT} for name, r in retention(scores).items()}
        out[s.name] = {**s.record, "models": scores, "retention": kept, "seconds": time.perf_counter() - start}
    return out


def evaluate_models(teacher: PreTrainedModel, models: dict[str, PreTrainedModel], data, tokenizer,
                    cfg: EvaluationConfig, *, sources: dict[str, tuple[str, str | None]],
                    teacher_tokenizer=None, extra_sets: Sequence[HeldOutSet] = (),
                    lm_eval_include: Sequence[Path] = ()) -> dict[str, Any]:
    """Score the teacher and `models` on the held-out split; the content of `eval.json`.

    Args:
        data: `PreparedData`: `validation` for quality and cost prompts, `prompts` (chat data) for generation.
        sources: {name: (folder or hub id, gguf file or None)} the weights were loaded from, for size on disk.
        teacher_tokenizer: the teacher's, when the students have another tokenizer (`tokenizer`; `data` made by
            `data.cross`): the teacher reads its own tokens, and nothing is compared token by token.
        extra_sets: the extra held-out sets (`evaluation.datasets`), tokenized like `data.validation`.
        lm_eval_include: folders of lm-eval task YAML for `cfg.lm_eval` (alambic's local tasks).

    Returns:
        {"split", "models": {name: quality metrics + "architecture" + "cost" + "generation"}, "retention",
        "pareto_front", "datasets" (extra sets), "lm_eval" (benchmarks), "timings" (seconds per part)}.
    """
    from alambic.evaluation.cost import disk_size, measure_cost

    everyone = {"teacher": teacher, **models}
    t_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None
    timings, start = {}, time.perf_counter()
    results = evaluate_against_teacher(teacher, models, data.validation, pad_token_id=tokenizer.pad_token_id,
                                       batch_size=cfg.batch_size, teacher_pad_token_id=t_pad)
    timings["held_out"] = time.perf_counter() - start
    datasets = held_out_set_scores(teacher, models, extra_sets, pad_token_id=tokenizer.pad_token_id,
                                   batch_size=cfg.batch_size, teacher_pad_token_id=t_pad)
    if datasets:
        timings["datasets"] = sum(d["seconds"] for d in datasets.values())
    for name, model in everyone.items():
        results[name]["architecture"] = architecture(model)
    prompts = getattr(data, "prompts", None) or []
    if cfg.generation is not None and prompts:
        start = time.perf_counter()
        for name, scores in generation_scores(everyone, tokenizer, prompts, cfg.generation,
                                              teacher_tokenizer).items():
            results[name]["generation"] = scores
        timings["generation"] = time.perf_counter() - start
    benchmarks = None
    if cfg.lm_eval is not None:
        from alambic.evaluation.lm_eval import run_lm_eval

        tokenizers = {name: teacher_tokenizer if name == "teacher" and teacher_tokenizer is not None else tokenizer
                      for name in everyone}
        benchmarks = run_lm_eval(everyone, tokenizers, cfg.lm_eval, include_path=list(lm_eval_include))
        timings["lm_eval"] = benchmarks["seconds"]
    if cfg.cost is not None:
        start = time.perf_counter()
        prompt_ids = cost_prompts(data.validation, cfg.cost)
        t_prompt_ids = cost_prompts(data.validation, cfg.cost, "teacher_input_ids") if t_pad is not None else None
        c = cfg.cost
        description = f"measuring cost ({c.warmup} + {c.repeats} runs of {c.new_tokens} tokens per figure)"
        for name, model in track(everyone.items(), description=description, console=console):
            own = name == "teacher" and t_pad is not None  # the teacher's own tokens of the same texts
            cost = measure_cost(model, t_prompt_ids if own else prompt_ids, new_tokens=c.new_tokens,
                                batch_size=c.batch_size, warmup=c.warmup, repeats=c.repeats,
                                pad_token_id=t_pad if own else tokenizer.pad_token_id)
            path, gguf = sources[name]
            if gguf is not None or Path(path).is_dir():
                cost["disk"] = disk_size(path, gguf)
            results[name]["cost"] = cost
        timings["cost"] = time.perf_counter() - start
    ret = retention(results)
    return {"split": "validation", "models": results, "retention": ret, "pareto_front": pareto_fronts(ret),
            **({"datasets": datasets} if datasets else {}), **({"lm_eval": benchmarks} if benchmarks else {}),
            "timings": timings}
