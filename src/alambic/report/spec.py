"""The report's record of what was run: architectures, loss and training configuration, stages and wall time."""

from __future__ import annotations

from typing import Any

from alambic.report.markdown import human_bytes, model_label, table

ARCH_ROWS = [
    ("model type", "model_type"),
    ("decoder layers", "num_layers"),
    ("hidden size", "hidden_size"),
    ("query heads", "num_attention_heads"),
    ("KV heads", "num_key_value_heads"),
    ("head dim", "head_dim"),
    ("FFN size", "intermediate_size"),
    ("vocabulary", "vocab_size"),
    ("tied embeddings", "tie_word_embeddings"),
    ("dtype", "dtype"),
]


def architecture_section(evaluation: dict[str, Any]) -> list[str]:
    """Teacher and student shapes side by side (one column per distinct architecture), with parameter counts."""
    models = {n: m for n, m in evaluation.get("models", {}).items() if m.get("architecture")}
    if not models:
        return []
    # the students before/after training share one architecture: show each distinct one once
    columns: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        key = repr(sorted(m["architecture"].items())) + str(m["parameters"])
        columns.setdefault(key, {"names": [], "m": m})["names"].append(model_label(name))
    teacher = models.get("teacher")
    headers = ["", *(" / ".join(c["names"]) for c in columns.values())]
    rows = [[title, *(str(c["m"]["architecture"].get(k)) for c in columns.values())] for title, k in ARCH_ROWS]
    rows.append(["parameters", *(f"{c['m']['parameters'] / 1e6:.1f}M" for c in columns.values())])
    rows.append(
        [
            "non-embedding parameters",
            *(f"{c['m'].get('non_embedding_parameters', 0) / 1e6:.1f}M" for c in columns.values()),
        ]
    )
    if teacher:
        rows.append(
            [
                "compression (teacher ÷ model params)",
                *(f"{teacher['parameters'] / c['m']['parameters']:.2f}×" for c in columns.values()),
            ]
        )
    return ["## Architecture", "", table(headers, rows)]


def loss_section(config: dict[str, Any]) -> list[str]:
    loss = config.get("loss", {})
    alpha = float(loss.get("alpha", 0))
    lines = [
        "## Loss",
        "",
        f"total = {alpha:g} · T² · {loss.get('divergence')}(T = {loss.get('temperature')}) "
        f"+ {1 - alpha:.2g} · cross-entropy"
        + (f"; JSD β = {loss.get('jsd_beta')}" if loss.get("divergence") == "jsd" else "")
        + (f"; skew = {loss.get('skew')}" if str(loss.get("divergence", "")).startswith("skew") else ""),
    ]
    features = loss.get("features") or {}
    terms = [
        f"{name} (weight {term.get('weight')}" + (f", {term['kind']}" if term.get("kind") else "") + ")"
        for name, term in features.items()
        if isinstance(term, dict) and term.get("weight")
    ]
    if terms:
        lines.append(f"+ feature terms: {', '.join(terms)}; layer map {features.get('layer_map', 'auto')}")
    extra = config.get("additional_teachers") or []
    if extra:
        weights = [config.get("teacher_weight", 1.0), *(t.get("weight", 1.0) for t in extra)]
        names = [config.get("teacher", {}).get("model"), *(t.get("model") for t in extra)]
        mode = loss.get("teachers", "mixture")
        lines.append(
            f"\nTeachers ({mode}: "
            + ("one divergence against Σ wᵢ Pᵢ" if mode == "mixture" else "Σ wᵢ · divergence against each Pᵢ")
            + ", weights normalised): "
            + ", ".join(f"`{n}` × {w:g}" for n, w in zip(names, weights))
        )
    on_policy = loss.get("on_policy")
    if on_policy:
        temperature = on_policy.get("sampling_temperature")
        sampling = (
            "the models' own sampling settings"
            if temperature is None  # null: resolved at training
            else f"sampling temperature {temperature}"
        )
        lines.append(
            f"\nOn-policy: {on_policy.get('fraction'):.0%} of the steps train on the student's own responses "
            f"(up to {on_policy.get('max_new_tokens')} tokens, {sampling}), scored by the teacher with the "
            "divergence above."
        )
    if config.get("task") != "sequence_classification":  # a classifier's loss is over C class logits: no chunks
        chunk = loss.get("chunk_size")
        chunks = "chunks sized to the vocabulary, 'auto'" if chunk == "auto" else f"chunks of {chunk} tokens"
        lines.append(
            f"\nImplementation: {loss.get('implementation', 'chunked')}"
            + (f" ({chunks})" if loss.get("implementation") == "chunked" else "")
            + (
                f"; teacher from the offline top-k cache (k = {config['data']['teacher_cache'].get('k')})"
                if (config.get("data") or {}).get("teacher_cache")
                else ""
            )
        )
    return lines


def training_section(
    config: dict[str, Any], train: dict[str, Any], control: dict[str, Any], hardware: str | None
) -> list[str]:
    data, training = config.get("data", {}), config.get("training", {})
    batch = training.get("per_device_train_batch_size", 0) * training.get("gradient_accumulation_steps", 1)
    lines = [
        "## Training",
        "",
        f"- data: {data.get('source')} ({data.get('format')}), sequences of {data.get('max_seq_len')} tokens",
        f"- {training.get('max_steps')} steps × {training.get('per_device_train_batch_size')} sequences × "
        f"{training.get('gradient_accumulation_steps')} accumulation (batch {batch}), lr "
        f"{training.get('learning_rate')} ({training.get('lr_scheduler_type')}, warm-up "
        f"{training.get('warmup_ratio')}), weight decay {training.get('weight_decay')}, "
        + _precision(training, train)
        + " training",
    ]
    if train:
        tokens = train.get("tokens_per_step", 0) * train["global_step"]
        lines.append(
            f"- distillation: {train['global_step']} steps, {tokens:,} sequence tokens, in "
            f"{train['train_seconds']:.0f} s on {train['device']} ({train['torch_threads']} threads)"
            + (f", {hardware}" if hardware else "")
        )
    if scale := scale_line((train or {}).get("scale")):
        lines.append(scale)
    on_policy = (train or {}).get("on_policy") or {}
    if on_policy.get("steps"):
        lines.append(
            f"- on-policy: {on_policy['steps']} of the steps ({on_policy.get('share', 0):.0%}) sampled "
            f"{on_policy.get('tokens', 0):,} student tokens in {on_policy.get('seconds', 0):.0f} s of the "
            "training time"
        )
        if on_policy.get("samples"):  # answers that never end teach no ending: the share says how many
            cap = ((config.get("loss") or {}).get("on_policy") or {}).get("max_new_tokens")
            lines.append(
                f"  - {on_policy.get('capped', 0)} of the {on_policy['samples']} responses "
                f"({on_policy.get('capped_share') or 0:.0%}) ran to max_new_tokens"
                + (f" ({cap})" if cap else "")
                + " without ending"
            )
        sampling = on_policy.get("sampling")
        if sampling:
            sources = dict.fromkeys("alambic default" if v == "default" else v for v in sampling["source"].values())
            lines.append(
                f"  - sampled at temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}, top-k "
                f"{sampling['top_k']} (from: {', '.join(sources)})"
            )
    if control:
        lines.append(f"- cross-entropy control: {control['global_step']} steps in {control['train_seconds']:.0f} s")
    return lines


ENGINE_NAMES = {"ddp": "DDP", "fsdp": "FSDP", "fsdp2": "FSDP2", "deepspeed": "DeepSpeed"}
LISTED_RANKS = 8  # beyond this many ranks, one line per rank stops being readable: their range instead


def engine_name(engine: str | None) -> str:
    """The engine as its users name it ('deepspeed-zero3' -> 'DeepSpeed ZeRO-3'); an unknown one as recorded."""
    engine = str(engine)
    if engine.lower().startswith("deepspeed-zero"):
        return f"DeepSpeed ZeRO-{engine[len('deepspeed-zero') :]}"
    return ENGINE_NAMES.get(engine.lower(), engine)


def scale_line(scale: dict[str, Any] | None) -> str | None:
    """How the distillation was scaled out (train_summary.json's `scale`): processes, engine, precision, and the
    peak memory of each rank. None for a train_summary written before it was recorded."""
    if not scale:
        return None
    n = scale.get("world_size", 1)
    engine = scale.get("engine")
    line = (
        f"- scale: {n} process{'es' if n != 1 else ''}"  # one process has no engine to name
        + (f", {engine_name(engine)}" if engine != "single" else "")
        + f", {scale.get('precision')}"
    )
    peaks = scale.get("peak_memory_bytes_per_rank") or []
    if not peaks:
        return line
    kind = f" ({scale['memory_kind']})" if scale.get("memory_kind") else ""
    measured = [p for p in peaks if p is not None]
    if len(peaks) <= LISTED_RANKS or not measured:
        per_rank = ", ".join(f"rank {r} {human_bytes(p)}" for r, p in enumerate(peaks))
    else:  # the heaviest rank is the one that runs out of memory first
        heaviest = max(range(len(peaks)), key=lambda r: -1 if peaks[r] is None else peaks[r])
        per_rank = (
            f"{human_bytes(min(measured))} to {human_bytes(max(measured))} over {len(peaks)} ranks, "
            f"the most on rank {heaviest}"
        )
    return f"{line}; peak memory per rank{kind}: {per_rank}"


def _precision(training: dict[str, Any], train: dict[str, Any] | None) -> str:
    """The precision the distillation ran in (recorded since training.bf16 may be 'auto'), else the configured one."""
    if train and train.get("precision"):
        return train["precision"]
    bf16 = training.get("bf16")
    return "bf16 where native" if bf16 == "auto" else "bf16" if bf16 else "fp16" if training.get("fp16") else "fp32"


def stages_section(manifest: dict[str, Any]) -> list[str]:
    if not manifest:
        return []
    total = sum(e.get("seconds", 0) or 0 for e in manifest.values())
    rows = [
        [name, e.get("status", ""), f"{e.get('seconds', 0):.1f}"] for name, e in manifest.items() if name != "report"
    ]
    return [f"## Stages ({total / 60:.1f} min in all)", "", table(["stage", "status", "seconds"], rows)]
