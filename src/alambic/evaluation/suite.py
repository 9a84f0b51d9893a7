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

from alambic import distributed
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


def answers(
    model: PreTrainedModel,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    description: str,
    across_ranks: bool = False,
) -> list[dict[str, Any]]:
    """Greedy `generate_responses` to `conversations`, in their order.

    `across_ranks`: under a launcher, every rank calls it and decodes its share of the batches one process would
    decode (the same prompts together, so the same responses), and every rank returns all of them.
    """
    from alambic.decoding import encode_prompts, generate_responses

    def decode(rows: list[int], show_progress: bool) -> list[dict[str, Any]]:
        return generate_responses(
            model,
            tokenizer,
            [conversations[i] for i in rows],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            description=description,
            show_progress=show_progress,
        )

    if not across_ranks:
        return decode(list(range(len(conversations))), True)
    # generate_responses decodes longest first (a stable sort) in batches of batch_size: a block of whole batches of
    # that order, re-sorted there, stays in the same order and so gives the same batches.
    lengths = [len(ids) for ids in encode_prompts(tokenizer, conversations)]
    order = sorted(range(len(conversations)), key=lambda i: -lengths[i])
    batches = distributed.my_share(-(-len(order) // batch_size))
    rows = order[batches.start * batch_size : batches.stop * batch_size]
    gathered = distributed.gather_to_main(list(zip(rows, decode(rows, distributed.is_main()))))

    def in_order() -> list[dict[str, Any]]:
        found = dict(pair for share in gathered for pair in share)
        return [found[i] for i in range(len(conversations))]

    return distributed.on_main(f"{description}: every rank's responses", in_order)


def generation_scores(
    everyone: dict[str, PreTrainedModel],
    tokenizer,
    prompts: list[dict[str, Any]],
    cfg: GenerationEvalConfig,
    teacher_tokenizer=None,
    *,
    across_ranks: bool = False,
) -> dict[str, dict[str, Any]]:
    """Greedy responses of every model to the held-out prompts, scored against the references and (students,
    baselines) against the teacher's own responses. `teacher_tokenizer`: the teacher's, when it is not
    `tokenizer` (each model answers in its own chat template). `across_ranks`: the ranks share the decoding
    (`answers`), every rank returns the scores."""
    from alambic.evaluation.generation import generation_metrics

    prompts = prompts[: cfg.max_prompts]
    conversations = [p["messages"] for p in prompts]
    references = [p["reference"] for p in prompts]
    responses = {
        name: answers(
            model,
            teacher_tokenizer if name == "teacher" and teacher_tokenizer else tokenizer,
            conversations,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            description=f"{name}: answering",
            across_ranks=across_ranks,
        )
        for name, model in everyone.items()
    }
    teacher_texts = [r["response"] for r in responses["teacher"]]
    scores = {}
    for name, out in responses.items():
        texts = [r["response"] for r in out]
        scores[name] = {
            "reference": generation_metrics(
                texts,
                references,
                num_tokens=[r["num_tokens"] for r in out],
                finish_reasons=[r["finish_reason"] for r in out],
            )
        }
        if name != "teacher":
            scores[name]["teacher"] = generation_metrics(texts, teacher_texts)
        scores[name]["examples"] = [
            {"prompt": p["messages"][-1]["content"], "reference": p["reference"], "response": t}
            for p, t in list(zip(prompts, texts))[:3]
        ]
    return scores


QUALITY_KEPT = ("perplexity", "top1_agreement", "top5_agreement")  # retention per extra set


def held_out_set_scores(
    teacher: PreTrainedModel,
    models: dict[str, PreTrainedModel],
    sets: Sequence[HeldOutSet],
    *,
    pad_token_id: int,
    batch_size: int,
    teacher_pad_token_id: int | None = None,
    across_ranks: bool = False,
) -> dict[str, Any]:
    """Every model on each extra held-out set, scored as the held-out split is (`evaluate_against_teacher`, shared
    by the ranks with `across_ranks`).

    Returns:
        {set name: {what was read ("source", "documents", "sequences", "overlap", ...), "models": {name: quality
        metrics with intervals}, "retention": {name: {perplexity, top1_agreement, top5_agreement kept}}, "seconds"}}.
    """
    out = {}
    for s in sets:
        start = time.perf_counter()
        scores = evaluate_against_teacher(
            teacher,
            models,
            s.samples,
            pad_token_id=pad_token_id,
            batch_size=batch_size,
            teacher_pad_token_id=teacher_pad_token_id,
            description=f"set {s.name!r}",
            across_ranks=across_ranks,
        )
        kept = {name: {k: r.get(k) for k in QUALITY_KEPT} for name, r in retention(scores).items()}
        out[s.name] = {**s.record, "models": scores, "retention": kept, "seconds": time.perf_counter() - start}
    return out


def evaluate_models(
    teacher: PreTrainedModel,
    models: dict[str, PreTrainedModel],
    data,
    tokenizer,
    cfg: EvaluationConfig,
    *,
    sources: dict[str, tuple[str, str | None]],
    teacher_tokenizer=None,
    extra_sets: Sequence[HeldOutSet] = (),
    lm_eval_include: Sequence[Path] = (),
) -> dict[str, Any]:
    """Score the teacher and `models` on the held-out split; the content of `eval.json`.

    Under a launcher every rank calls it (each with its own copy of the models): the ranks share what splits over
    sequences or prompts (quality on the held-out split and the extra sets: per-sequence sums put together on rank 0,
    then one bootstrap over all of them; the generation prompts), so the figures and intervals are those of one
    process; rank 0 alone runs what does not split (the cost runs, which must have the device to themselves, and
    lm-eval) while the others wait. Every rank returns the same results.

    Args:
        data: `PreparedData`: `validation` for quality and cost prompts, `prompts` (chat data) for generation.
        sources: {name: (folder or hub id, gguf file or None)} the weights were loaded from, for size on disk.
        teacher_tokenizer: the teacher's, when the students have another tokenizer (`tokenizer`; `data` made by
            `data.cross`): the teacher reads its own tokens, and nothing is compared token by token.
        extra_sets: the extra held-out sets (`evaluation.datasets`), tokenized like `data.validation`.
        lm_eval_include: folders of lm-eval task YAML for `cfg.lm_eval` (alambic's local tasks).

    Returns:
        {"split", "models": {name: quality metrics + "architecture" + "cost" + "generation"}, "retention",
        "pareto_front", "datasets" (extra sets), "lm_eval" (benchmarks), "timings" (seconds per part, rank 0's)}.
    """
    everyone = {"teacher": teacher, **models}
    t_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None
    timings, start = {}, time.perf_counter()
    results = evaluate_against_teacher(
        teacher,
        models,
        data.validation,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
        teacher_pad_token_id=t_pad,
        across_ranks=True,
    )
    timings["held_out"] = time.perf_counter() - start
    datasets = held_out_set_scores(
        teacher,
        models,
        extra_sets,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=cfg.batch_size,
        teacher_pad_token_id=t_pad,
        across_ranks=True,
    )
    if datasets:
        timings["datasets"] = sum(d["seconds"] for d in datasets.values())
    for name, model in everyone.items():
        results[name]["architecture"] = architecture(model)
    prompts = getattr(data, "prompts", None) or []
    if cfg.generation is not None and prompts:
        start = time.perf_counter()
        for name, scores in generation_scores(
            everyone, tokenizer, prompts, cfg.generation, teacher_tokenizer, across_ranks=True
        ).items():
            results[name]["generation"] = scores
        timings["generation"] = time.perf_counter() - start
    benchmarks = None
    if cfg.lm_eval is not None:
        from alambic.evaluation.lm_eval import run_lm_eval

        tokenizers = {
            name: teacher_tokenizer if name == "teacher" and teacher_tokenizer is not None else tokenizer
            for name in everyone
        }
        benchmarks = distributed.on_main(
            "lm-eval benchmarks",
            lambda: run_lm_eval(everyone, tokenizers, cfg.lm_eval, include_path=list(lm_eval_include)),
        )
        timings["lm_eval"] = benchmarks["seconds"]
    if cfg.cost is not None:
        start = time.perf_counter()
        # Timings of one process with the device to itself: rank 0 measures, the others wait (idle) meanwhile.
        for name, cost in distributed.on_main(
            "cost measurements",
            lambda: cost_figures(everyone, data.validation, cfg.cost, sources, tokenizer.pad_token_id, t_pad),
        ).items():
            results[name]["cost"] = cost
        timings["cost"] = time.perf_counter() - start
    ret = retention(results)
    return {
        "split": "validation",
        "models": results,
        "retention": ret,
        "pareto_front": pareto_fronts(ret),
        **({"datasets": datasets} if datasets else {}),
        **({"lm_eval": benchmarks} if benchmarks else {}),
        "timings": timings,
    }


def cost_figures(
    everyone: dict[str, PreTrainedModel],
    validation,
    cfg: CostConfig,
    sources: dict[str, tuple[str, str | None]],
    pad_token_id: int,
    teacher_pad_token_id: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{name: `measure_cost` figures, with "disk" when the weights are a folder or a GGUF file}, prompted with the
    held-out split's first tokens (the teacher with its own, `teacher_input_ids`, when `teacher_pad_token_id` says
    it has its own tokenizer)."""
    from alambic.evaluation.cost import disk_size, measure_cost

    prompt_ids = cost_prompts(validation, cfg)
    own_ids = cost_prompts(validation, cfg, "teacher_input_ids") if teacher_pad_token_id is not None else None
    description = f"measuring cost ({cfg.warmup} + {cfg.repeats} runs of {cfg.new_tokens} tokens per figure)"
    figures = {}
    for name, model in track(everyone.items(), description=description, console=console):
        own = name == "teacher" and own_ids is not None  # the teacher's own tokens of the same texts
        cost = measure_cost(
            model,
            own_ids if own else prompt_ids,
            new_tokens=cfg.new_tokens,
            batch_size=cfg.batch_size,
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            pad_token_id=teacher_pad_token_id if own else pad_token_id,
        )
        path, gguf = sources[name]
        if gguf is not None or Path(path).is_dir():
            cost["disk"] = disk_size(path, gguf)
        figures[name] = cost
    return figures
