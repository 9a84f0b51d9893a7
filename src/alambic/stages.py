"""The stages of `alambic run`, in order: data -> student -> cache -> distill -> control -> evaluate -> report.

Each is a thin function over library code (students, data, training, evaluation, report), so that
Python users can call the same pieces without the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alambic.config import ConfigError, LossConfig, ModelConfig, RunConfig
from alambic.pipeline import Stage, StageContext
from alambic.utils import atomic_write_json, console, resolve_dtype

STUDENT_DIR, DATA_DIR, FINAL_DIR, CONTROL_DIR, CACHE_DIR = "student", "data", "final", "control", "teacher_cache"
SPLITS = ("train", "validation")


def student_source(config: RunConfig, run_dir: Path) -> ModelConfig:
    """Where the (untrained) student is loaded from: the built one in the run folder, or the user's own."""
    if config.student.from_teacher is not None:
        return ModelConfig(model=str(run_dir / STUDENT_DIR), dtype=config.student.dtype, device=config.teacher.device)
    return ModelConfig(model=config.student.model, gguf_file=config.student.gguf_file, dtype=config.student.dtype,
                       device=config.teacher.device)


def build_student(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The student: the user's own (checked against the teacher's tokenizer), or pruned from the teacher."""
    from alambic.models import load_model, load_tokenizer
    from alambic.students.prune import save_student

    if config.student.from_teacher is None:
        tok_t, tok_s = load_tokenizer(config.teacher), load_tokenizer(student_source(config, ctx.run_dir))
        check_same_tokenizer(tok_t, tok_s, config.teacher.model, f"student {config.student.model}")
        record = {"method": "given", "source": config.student.model}
        atomic_write_json(ctx.run_dir / STUDENT_DIR / "student.json", record)
        return record
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    student, record = prune_student(config, ctx, teacher, tokenizer)
    folder = ctx.run_dir / STUDENT_DIR
    summary = {k: v for k, v in record.items() if k not in ("importance", "plan", "after_pruning")}
    save_student(student, tokenizer, folder, summary)  # student.json: how it was made, in brief
    record["student_disk_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    atomic_write_json(folder / "pruning.json", record)  # the whole pruning report
    s, t = record["student_parameters"]["total"], record["teacher_parameters"]["total"]
    console.print(f"student: {record['student_shape']} from {record['teacher_shape']}, {s / 1e6:.1f}M of "
                  f"{t / 1e6:.1f}M parameters ({folder / 'pruning.json'})")
    return summary


def prune_student(config: RunConfig, ctx: StageContext, teacher, tokenizer) -> tuple[Any, dict[str, Any]]:
    """Measure importance on training sequences, cut the student, and score it on held-out data right away."""
    import torch

    from alambic.data import load_prepared
    from alambic.evaluation.quality import evaluate_against_teacher
    from alambic.students.build import build_from_teacher
    from alambic.students.importance import calibration_batches

    cfg = config.student.from_teacher
    data = load_prepared(ctx.run_dir / DATA_DIR)
    calibration = calibration_batches(data.train, num_sequences=cfg.calibration_sequences,
                                      batch_size=config.evaluation.batch_size, pad_token_id=tokenizer.pad_token_id)
    # bf16 autocast where the run trains in bf16: 3x faster on CPU with AMX, and on SmolLM2 it ranks the layers
    # exactly as fp32 does (skip-loss increases agree to 3 decimals); statistics still accumulate in fp32.
    device = next(teacher.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=config.training.bf16 and device in ("cpu", "cuda")):
        student, record = build_from_teacher(teacher, cfg, calibration)
    if config.student.dtype != "auto":
        student.to(dtype=resolve_dtype(config.student.dtype))
    record["teacher"] = config.teacher.model
    if cfg.evaluate:
        scores = evaluate_against_teacher(teacher, {"student_pruned": student}, data.validation,
                                          pad_token_id=tokenizer.pad_token_id, batch_size=config.evaluation.batch_size)
        record["after_pruning"] = {name: {k: scores[name][k] for k in ("perplexity", "top1_agreement", "kl_to_teacher",
                                                                     "num_tokens")} for name in scores}
    return student, record


def check_same_tokenizer(teacher_tok, other_tok, teacher_name: str, other_name: str) -> None:
    """Logit losses and agreement metrics need one vocabulary: refuse two tokenizers that disagree on shared ids."""
    tv, sv = teacher_tok.get_vocab(), other_tok.get_vocab()
    disagree = [tok for tok, i in sv.items() if tv.get(tok, i) != i]
    if disagree or abs(len(tv) - len(sv)) > 0 and not (set(sv) <= set(tv) or set(tv) <= set(sv)):
        raise ConfigError(
            f"teacher {teacher_name!r} and {other_name!r} have different tokenizers "
            f"({len(tv)} vs {len(sv)} tokens, {len(disagree)} shared tokens with different ids, e.g. "
            f"{disagree[:3]}): logits can only be compared over one vocabulary. Use a model with the teacher's "
            "tokenizer."
        )


def prepare_data(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from alambic.data import prepare_datasets, save_prepared
    from alambic.models import load_tokenizer

    tokenizer = load_tokenizer(config.teacher)
    prepared = prepare_datasets(config.data, tokenizer)
    save_prepared(prepared, ctx.run_dir / DATA_DIR)
    console.print(f"data: {len(prepared.train)} training sequences, {len(prepared.validation)} held-out sequences "
                  f"({len(prepared.split['validation_document_ids'])} held-out documents)")
    return {k: v for k, v in prepared.split.items() if not isinstance(v, list)}


def cache_folder(config: RunConfig, run_dir: Path) -> Path:
    return Path(config.data.teacher_cache.folder) if config.data.teacher_cache.folder else run_dir / CACHE_DIR


def _cache_fingerprint(config: RunConfig, tokenizer, dataset) -> dict[str, Any]:
    from alambic.data.cache import cache_fingerprint

    t = config.teacher
    return cache_fingerprint(tokenizer, dataset, k=config.data.teacher_cache.k, temperature=config.loss.temperature,
                             teacher_id=f"{t.model}@{t.revision}:{t.gguf_file}")


def build_cache(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Run the teacher once over both splits and keep its top-k log-probs per counted token."""
    from alambic.data import load_prepared
    from alambic.data.cache import write_teacher_cache
    from alambic.models import load_model, load_tokenizer

    c = config.data.teacher_cache
    data = load_prepared(ctx.run_dir / DATA_DIR)
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    student_vocab = load_model(student_source(config, ctx.run_dir)).get_output_embeddings().weight.shape[0]
    vocab = min(student_vocab, teacher.get_output_embeddings().weight.shape[0])
    summary = {}
    for split in SPLITS:
        dataset = getattr(data, split)
        manifest = write_teacher_cache(
            teacher, dataset, cache_folder(config, ctx.run_dir) / split, k=c.k, temperature=config.loss.temperature,
            dtype=c.dtype, batch_size=c.batch_size, sequences_per_shard=c.sequences_per_shard,
            fingerprint=_cache_fingerprint(config, tokenizer, dataset), vocab_size=vocab,
            pad_token_id=tokenizer.pad_token_id,
        )
        summary[split] = {k: manifest[k] for k in ("totals", "quality", "bytes_per_token") if k in manifest}
    return summary


def _train(config: RunConfig, ctx: StageContext, *, loss: LossConfig, out: Path, with_teacher: bool) -> dict[str, Any]:
    from alambic.data import DistillationCollator, load_prepared
    from alambic.models import load_model, load_tokenizer
    from alambic.training.run import train

    kept_layers = None
    if config.student.from_teacher is not None:  # pruned from this teacher: `layer_map: auto` pairs the kept layers
        kept_layers = json.loads((ctx.run_dir / STUDENT_DIR / "student.json").read_text()).get("kept_layers")
    data = load_prepared(ctx.run_dir / DATA_DIR)
    source = student_source(config, ctx.run_dir)
    student = load_model(source)
    tokenizer = load_tokenizer(source)
    collator = DistillationCollator(pad_token_id=tokenizer.pad_token_id)
    teacher = None
    if with_teacher and config.data.teacher_cache is not None:
        from alambic.data.cache import CachedTeacherCollator, CachedTeacherDataset, TeacherCache

        teacher_tok = load_tokenizer(config.teacher)
        for split in SPLITS:
            cache = TeacherCache(cache_folder(config, ctx.run_dir) / split)
            cache.check_compatible(_cache_fingerprint(config, teacher_tok, getattr(data, split)))
            setattr(data, split, CachedTeacherDataset(getattr(data, split), cache))
        collator = CachedTeacherCollator(pad_token_id=tokenizer.pad_token_id)
    elif with_teacher:
        teacher = load_model(config.teacher, cache=True)
    summary = train(student, tokenizer, data, teacher=teacher, loss=loss, training=config.training,
                    output_dir=out, resume=ctx.resume, collator=collator,
                    cached_teacher=teacher is None and with_teacher, kept_layers=kept_layers)
    atomic_write_json(out / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def distill(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return _train(config, ctx, loss=config.loss, out=ctx.run_dir, with_teacher=config.loss.alpha > 0)


def control(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The same student, data and steps, trained with plain cross-entropy: what distillation must beat."""
    ce = config.loss.model_copy(update={"alpha": 0.0, "features": None})  # plain CE: no teacher, no features
    return _train(config, ctx, loss=ce, out=ctx.run_dir / CONTROL_DIR, with_teacher=False)


def evaluate(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Quality, generation and cost of the teacher, the student before and after distillation, the CE control
    and the configured baselines, all on the held-out split, each model loaded once (eval.json)."""
    from alambic.data import load_prepared
    from alambic.evaluation.suite import evaluate_models
    from alambic.models import load_model, load_tokenizer, resolve_source

    data = load_prepared(ctx.run_dir / DATA_DIR)
    device = config.evaluation.device or config.teacher.device
    teacher = load_model(config.teacher.model_copy(update={"device": device}), cache=True)
    tokenizer = load_tokenizer(config.teacher)
    source = student_source(config, ctx.run_dir).model_copy(update={"device": device})
    folders = {"student_before": None, "student_distilled": ctx.run_dir / FINAL_DIR}
    if config.evaluation.ce_control:
        folders["student_ce_control"] = ctx.run_dir / CONTROL_DIR / FINAL_DIR
    models, sources = {}, {"teacher": resolve_source(config.teacher.model, config.teacher.gguf_file)}
    for name, folder in folders.items():  # same dtype and device as the untrained student
        cfg = source if folder is None else source.model_copy(update={"model": str(folder), "gguf_file": None})
        models[name], sources[name] = load_model(cfg), resolve_source(cfg.model, cfg.gguf_file)
    for name, cfg in config.evaluation.baselines.items():
        check_same_tokenizer(tokenizer, load_tokenizer(cfg), config.teacher.model, f"baseline {name} ({cfg.model})")
        cfg = cfg.model_copy(update={"device": config.evaluation.device or cfg.device})
        models[name], sources[name] = load_model(cfg), resolve_source(cfg.model, cfg.gguf_file)
    results = evaluate_models(teacher, models, data, tokenizer, config.evaluation,
                              sources={n: (s.path, s.gguf_file) for n, s in sources.items()})
    atomic_write_json(ctx.run_dir / "eval.json", results)
    keep = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher", "num_tokens", "parameters")
    return {name: {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep}
            for name, r in results["models"].items()}


def report(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from alambic.report.render import write_report

    path = write_report(ctx.run_dir)
    return {"report": str(path)}


STAGES: list[Stage] = [
    Stage("data", ("teacher", "data"), (DATA_DIR,), prepare_data),
    Stage("student", ("teacher", "student"), (f"{STUDENT_DIR}/student.json",), build_student),
    Stage("cache", ("loss",), (f"{CACHE_DIR}/train/manifest.json",), build_cache,
          enabled=lambda c: c.data.teacher_cache is not None),
    Stage("distill", ("loss", "training"), (f"{FINAL_DIR}/config.json", "train_summary.json", "metrics.jsonl"),
          distill),
    Stage("control", ("training",), (f"{CONTROL_DIR}/{FINAL_DIR}/config.json",), control,
          enabled=lambda c: c.evaluation.ce_control, after=("data", "student")),
    Stage("evaluate", ("evaluation",), ("eval.json",), evaluate),
    Stage("report", (), ("report.md", "report.html"), report),
]


def stages_until(name: str) -> list[Stage]:
    names = [s.name for s in STAGES]
    return STAGES[: names.index(name) + 1]
