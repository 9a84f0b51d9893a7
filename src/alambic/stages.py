"""The stages of `alambic run`, in order: data -> teacher -> student -> generate -> select -> cache -> distill ->
control -> evaluate -> report.

Each is a thin function over library code (students, data, training, evaluation, report), so that
Python users can call the same pieces without the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alambic.config import ConfigError, LossConfig, ModelConfig, RunConfig
from alambic.pipeline import Stage, StageContext
from alambic.utils import atomic_write_json, console, resolve_dtype

STUDENT_DIR, DATA_DIR, FINAL_DIR, CONTROL_DIR, CACHE_DIR = "student", "data", "final", "control", "teacher_cache"
GENERATIONS_DIR, SELECTION_DIR = "generations", "selection"  # data.generate / data.select write there
TEACHER_DIR = "teacher"  # teacher.fine_tune: checkpoints, metrics and the fine-tuned classifier (teacher/final)
SPLITS = ("train", "validation")

if TYPE_CHECKING:  # torch-free import of this module: the CLI's help must stay fast
    from alambic.training.teachers import WeightedTeacher


def student_source(config: RunConfig, run_dir: Path) -> ModelConfig:
    """Where the (untrained) student is loaded from: the built one in the run folder, or the user's own."""
    if config.student.from_teacher is not None:
        return ModelConfig(model=str(run_dir / STUDENT_DIR), dtype=config.student.dtype, device=config.teacher.device)
    return ModelConfig(model=config.student.model, gguf_file=config.student.gguf_file, dtype=config.student.dtype,
                       device=config.teacher.device)


def teacher_source(config: RunConfig, run_dir: Path) -> ModelConfig:
    """Where the teacher every stage after 'teacher' uses is loaded from: the fine-tuned classifier of this run
    (teacher.fine_tune), else the configured teacher."""
    if config.teacher.fine_tune is not None:
        return ModelConfig(model=str(run_dir / TEACHER_DIR / FINAL_DIR), dtype=config.teacher.dtype,
                           device=config.teacher.device)
    return config.teacher


def run_labels(config: RunConfig, run_dir: Path) -> list[str] | None:
    """Class names in id order (split.json) for task sequence_classification; None for causal LMs."""
    if config.task != "sequence_classification":
        return None
    return json.loads((run_dir / DATA_DIR / "split.json").read_text())["labels"]


def _classifier_teacher(config: RunConfig, run_dir: Path):
    """The teacher classifier of a classification run; a backbone without teacher.fine_tune is refused (its head
    would be random)."""
    from alambic.models import is_classifier, load_model

    source = teacher_source(config, run_dir)
    if not is_classifier(source):
        raise ConfigError(f"task sequence_classification: teacher {config.teacher.model!r} is not a sequence "
                          "classifier, and a fresh head would teach noise; set teacher.fine_tune to train one first")
    return load_model(source, cache=True, labels=run_labels(config, run_dir))


def fine_tune(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the teacher backbone with a fresh classification head (teacher.fine_tune) into teacher/final."""
    import torch

    from alambic.data import load_prepared
    from alambic.models import forget_loaded, load_model, load_tokenizer
    from alambic.training.classifier import fine_tune_teacher

    cfg = config.teacher.fine_tune
    torch.manual_seed(cfg.seed)  # the fresh head's initialisation
    # Not from the process cache: training changes the weights in place.
    backbone = load_model(config.teacher, labels=run_labels(config, ctx.run_dir))
    out = ctx.run_dir / TEACHER_DIR
    summary = fine_tune_teacher(backbone, load_tokenizer(config.teacher), load_prepared(ctx.run_dir / DATA_DIR), cfg,
                                out, resume=ctx.resume)
    forget_loaded(str(out / FINAL_DIR))  # a teacher loaded earlier in this process from there is outdated
    atomic_write_json(out / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


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
    if config.task == "sequence_classification":  # the classifier (fine-tuned) is what the student is cut from
        teacher, tokenizer = _classifier_teacher(config, ctx.run_dir), load_tokenizer(config.teacher)
    else:
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
    # Importance is measured with the LM loss: a classifier has none (the config allows it only layers by position).
    classifier = config.task == "sequence_classification"
    calibration = None if classifier else calibration_batches(
        data.train, num_sequences=cfg.calibration_sequences, batch_size=config.evaluation.batch_size,
        pad_token_id=tokenizer.pad_token_id)
    # bf16 autocast where the run trains in bf16: 3x faster on CPU with AMX, and on SmolLM2 it ranks the layers
    # exactly as fp32 does (skip-loss increases agree to 3 decimals); statistics still accumulate in fp32.
    device = next(teacher.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=config.training.bf16 and device in ("cpu", "cuda")):
        student, record = build_from_teacher(teacher, cfg, calibration)
    if config.student.dtype != "auto":
        student.to(dtype=resolve_dtype(config.student.dtype))
    record["teacher"] = config.teacher.model
    if cfg.evaluate and not classifier:  # a classifier is scored right after pruning by evaluate's student_before
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


def teacher_id(config: RunConfig) -> str:
    t = config.teacher
    return f"{t.model}@{t.revision}:{t.gguf_file}"


def generate(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The teacher's responses to the training prompts (data.teacher_responses), resumable batch by batch."""
    from alambic.data import load_prepared
    from alambic.data.generate import training_prompts, write_response_set
    from alambic.models import load_model, load_tokenizer

    split = load_prepared(ctx.run_dir / DATA_DIR).split
    prompts = training_prompts(config.data, split)
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    # Finished batches are kept even when this stage's inputs changed: each record carries the teacher and the
    # sampling settings it was made with, and those that no longer match are discarded.
    return write_response_set(teacher, tokenizer, prompts, ctx.run_dir / GENERATIONS_DIR,
                              settings=config.data.teacher_responses, teacher_id=teacher_id(config),
                              max_seq_len=config.data.max_seq_len)


def distill_train_set(config: RunConfig, run_dir: Path, corpus_train, *, selected: bool = True):
    """What distill trains on: the teacher's responses (data.teacher_responses) or the corpus sequences, then,
    with `selected`, the band the select stage kept (data.selection)."""
    train = corpus_train
    if config.data.teacher_responses is not None:
        from alambic.data.generate import load_response_set

        train = load_response_set(run_dir / GENERATIONS_DIR)
    if selected and config.data.selection is not None:
        from alambic.data.select import SELECTION_FILE, apply_selection

        train = apply_selection(train, json.loads((run_dir / SELECTION_DIR / SELECTION_FILE).read_text()))
    return train


def select(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Score the training set by mean teacher token entropy and keep the configured band (data.selection)."""
    from alambic.data import load_prepared
    from alambic.data.select import SELECTION_FILE, select_band, selection_record, sequence_entropies
    from alambic.models import load_model, load_tokenizer

    cfg = config.data.selection
    train = distill_train_set(config, ctx.run_dir, load_prepared(ctx.run_dir / DATA_DIR).train, selected=False)
    teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    scores = sequence_entropies(teacher, train, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
    record = selection_record(scores, select_band(scores, cfg.keep_fraction, cfg.band), cfg)
    atomic_write_json(ctx.run_dir / SELECTION_DIR / SELECTION_FILE, record)
    console.print(f"selection: kept {record['kept']} of {record['total']} training sequences ({cfg.band} teacher "
                  f"entropy, {record['kept_range'][0]:.3f}-{record['kept_range'][1]:.3f} nats; median of all "
                  f"{record['quantiles']['0.5']:.3f})")
    return {k: v for k, v in record.items() if k not in ("scores", "kept_indices", "histogram")}


def load_additional_teachers(config: RunConfig) -> list[WeightedTeacher]:
    """`config.additional_teachers` loaded as `training.teachers.WeightedTeacher`s named 'additional_<i>', each
    checked to share the teacher's tokenizer first (all of them before any model is loaded).

    Raises:
        ConfigError: a teacher whose tokenizer differs from `config.teacher`'s (the message names it).
    """
    from alambic.models import load_model, load_tokenizer
    from alambic.training.teachers import WeightedTeacher

    tokenizer = load_tokenizer(config.teacher)
    for i, cfg in enumerate(config.additional_teachers):
        check_same_tokenizer(tokenizer, load_tokenizer(cfg), config.teacher.model,
                             f"additional_teachers[{i}] ({cfg.model})")
    # Not cached: only distillation uses them, and their memory is freed when it ends.
    return [WeightedTeacher(name=f"additional_{i}", model=load_model(cfg), weight=cfg.weight,
                            follow_student=cfg.device == "auto")
            for i, cfg in enumerate(config.additional_teachers)]


def _train(config: RunConfig, ctx: StageContext, *, loss: LossConfig, out: Path, with_teacher: bool,
           teacher_data: bool = False) -> dict[str, Any]:
    if config.task == "sequence_classification":
        return _train_classifier(config, ctx, loss=loss, out=out, with_teacher=with_teacher)
    from alambic.data import DistillationCollator, load_prepared
    from alambic.models import load_model, load_tokenizer
    from alambic.training.run import train

    kept_layers = None
    if config.student.from_teacher is not None:  # pruned from this teacher: `layer_map: auto` pairs the kept layers
        kept_layers = json.loads((ctx.run_dir / STUDENT_DIR / "student.json").read_text()).get("kept_layers")
    data = load_prepared(ctx.run_dir / DATA_DIR)
    if teacher_data:  # the held-out split stays the real data: only what is trained on changes
        data.train = distill_train_set(config, ctx.run_dir, data.train)
    source = student_source(config, ctx.run_dir)
    student = load_model(source)
    tokenizer = load_tokenizer(source)
    if not with_teacher:  # the CE control trains on the data's answers only
        loss = loss.model_copy(update={"on_policy": None})
    collator = DistillationCollator(pad_token_id=tokenizer.pad_token_id, prompt_lengths=loss.on_policy is not None)
    teacher, additional = None, []
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
        additional = load_additional_teachers(config)
    summary = train(student, tokenizer, data, teacher=teacher, loss=loss, training=config.training,
                    output_dir=out, resume=ctx.resume, collator=collator,
                    cached_teacher=teacher is None and with_teacher, kept_layers=kept_layers,
                    additional_teachers=additional, teacher_weight=config.teacher_weight)
    atomic_write_json(out / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def _train_classifier(config: RunConfig, ctx: StageContext, *, loss: LossConfig, out: Path,
                      with_teacher: bool) -> dict[str, Any]:
    from alambic.data import load_prepared
    from alambic.models import load_model, load_tokenizer
    from alambic.training.classifier import train_classifier

    source = student_source(config, ctx.run_dir)
    # A given student that is a backbone gets a fresh head; the pruned one is already a classifier.
    student = load_model(source, labels=run_labels(config, ctx.run_dir))
    teacher = _classifier_teacher(config, ctx.run_dir) if with_teacher else None
    summary = train_classifier(student, load_tokenizer(source), load_prepared(ctx.run_dir / DATA_DIR),
                               teacher=teacher, loss=loss, training=config.training, output_dir=out,
                               resume=ctx.resume)
    atomic_write_json(out / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def distill(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return _train(config, ctx, loss=config.loss, out=ctx.run_dir, with_teacher=config.loss.alpha > 0,
                  teacher_data=True)


def control(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The same student, data and steps, trained with plain cross-entropy: what distillation must beat."""
    ce = config.loss.model_copy(update={"alpha": 0.0, "features": None})  # plain CE: no teacher, no features
    return _train(config, ctx, loss=ce, out=ctx.run_dir / CONTROL_DIR, with_teacher=False)


def evaluate(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Quality, generation and cost of the teacher, the student before and after distillation, the CE control
    and the configured baselines, all on the held-out split, each model loaded once (eval.json)."""
    from alambic.data import load_prepared
    from alambic.evaluation.suite import evaluate_models
    from alambic.models import is_classifier, load_model, load_tokenizer, resolve_source

    data = load_prepared(ctx.run_dir / DATA_DIR)
    labels = run_labels(config, ctx.run_dir)  # classifiers: every model is loaded with this head
    device = config.evaluation.device or config.teacher.device
    teacher_cfg = teacher_source(config, ctx.run_dir)
    teacher = load_model(teacher_cfg.model_copy(update={"device": device}), cache=True, labels=labels)
    tokenizer = load_tokenizer(config.teacher)
    source = student_source(config, ctx.run_dir).model_copy(update={"device": device})
    folders = {"student_before": None, "student_distilled": ctx.run_dir / FINAL_DIR}
    if config.evaluation.ce_control:
        folders["student_ce_control"] = ctx.run_dir / CONTROL_DIR / FINAL_DIR
    models, sources = {}, {"teacher": resolve_source(teacher_cfg.model, teacher_cfg.gguf_file)}
    for name, folder in folders.items():  # same dtype and device as the untrained student
        cfg = source if folder is None else source.model_copy(update={"model": str(folder), "gguf_file": None})
        models[name], sources[name] = load_model(cfg, labels=labels), resolve_source(cfg.model, cfg.gguf_file)
    for name, cfg in config.evaluation.baselines.items():
        check_same_tokenizer(tokenizer, load_tokenizer(cfg), config.teacher.model, f"baseline {name} ({cfg.model})")
        if labels is not None and not is_classifier(cfg):
            raise ConfigError(f"evaluation.baselines.{name}: {cfg.model!r} is not a sequence classifier; a "
                              "classification run compares classifiers trained on its labels")
        cfg = cfg.model_copy(update={"device": config.evaluation.device or cfg.device})
        models[name], sources[name] = load_model(cfg, labels=labels), resolve_source(cfg.model, cfg.gguf_file)
    sources = {n: (s.path, s.gguf_file) for n, s in sources.items()}
    if labels is not None:
        from alambic.evaluation.classification import evaluate_classifier_models

        results = evaluate_classifier_models(teacher, models, data, config.evaluation, labels=labels, sources=sources)
        keep = ("accuracy", "macro_f1", "teacher_agreement", "kl_to_teacher", "num_examples", "parameters")
    else:
        results = evaluate_models(teacher, models, data, tokenizer, config.evaluation, sources=sources)
        keep = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher", "num_tokens", "parameters")
    atomic_write_json(ctx.run_dir / "eval.json", results)
    return {name: {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep}
            for name, r in results["models"].items()}


def report(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from alambic.report.render import write_report

    path = write_report(ctx.run_dir)
    return {"report": str(path)}


STAGES: list[Stage] = [
    Stage("data", ("teacher", "data"), (DATA_DIR,), prepare_data),
    Stage("teacher", ("teacher",), (f"{TEACHER_DIR}/{FINAL_DIR}/config.json",), fine_tune,
          enabled=lambda c: c.teacher.fine_tune is not None),
    Stage("student", ("teacher", "student"), (f"{STUDENT_DIR}/student.json",), build_student),
    # generate and select read the data, not the student: `after` keeps a new student from redoing them.
    Stage("generate", ("data.teacher_responses",), (f"{GENERATIONS_DIR}/summary.json",), generate,
          enabled=lambda c: c.data.teacher_responses is not None, after=("data",)),
    Stage("select", ("data.selection",), (f"{SELECTION_DIR}/selection.json",), select,
          enabled=lambda c: c.data.selection is not None, after=("data", "generate")),
    Stage("cache", ("loss",), (f"{CACHE_DIR}/train/manifest.json",), build_cache,
          enabled=lambda c: c.data.teacher_cache is not None),
    Stage("distill", ("loss", "training", "teacher_weight", "additional_teachers"),
          (f"{FINAL_DIR}/config.json", "train_summary.json", "metrics.jsonl"), distill),
    Stage("control", ("training",), (f"{CONTROL_DIR}/{FINAL_DIR}/config.json",), control,
          enabled=lambda c: c.evaluation.ce_control, after=("data", "student")),
    Stage("evaluate", ("evaluation",), ("eval.json",), evaluate),
    Stage("report", (), ("report.md", "report.html"), report),
]


def stages_until(name: str) -> list[Stage]:
    names = [s.name for s in STAGES]
    return STAGES[: names.index(name) + 1]
