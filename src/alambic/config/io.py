"""YAML in, resolved YAML out: read and validate a run config, apply `section.key=value` overrides, save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from alambic.config._base import ConfigError
from alambic.config.run import RunConfig


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against `alambic quickstart --print-config`"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        value = "" if e["type"] in ("missing",) else f" (got {e['input']!r})"
        if len(value) > 120:
            value = value[:117] + "...)"
        lines.append(f"  - {path}: {msg}{value}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one silently, so a
    setting written twice would be half ignored."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name  # the file, for the message
        self.paths: dict[int, str] = {}  # id(mapping node) -> its dotted place in the document, 'loss.'

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                continue  # an unhashable key: the base class names it
            line = key_node.start_mark.line + 1
            if key in seen:
                where = self.paths.get(id(node), "")
                raise ConfigError(
                    f"{self.name}: key '{where}{key}' is given twice, on lines {seen[key]} and {line}: "
                    "YAML would keep only the last; remove one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def index_paths(self, node: yaml.Node | None, prefix: str = "") -> None:
        """Record each mapping's dotted place in the document (`paths`), list items as [i]."""
        if isinstance(node, yaml.MappingNode):
            self.paths[id(node)] = prefix
            for key_node, value_node in node.value:
                self.index_paths(value_node, f"{prefix}{key_node.value}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.index_paths(item, f"{prefix.rstrip('.')}[{i}].")


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`, keys given twice refused.

    Raises:
        ConfigError: not a text file, not valid YAML, or a key given twice in one mapping (naming both lines).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8): give a YAML run config, e.g. "
            "`alambic quickstart --print-config > my.yaml`"
        ) from None
    loader = _UniqueKeyLoader(text, str(path))
    try:
        root = loader.get_single_node()
        if root is None:  # an empty file
            return None
        loader.index_paths(root)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def validate_config(data: dict[str, Any], origin: str = "config") -> RunConfig:
    """Build a RunConfig from a plain dict, raising one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}: expected a mapping of sections (teacher, student, ...), got {type(data).__name__}"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate.

    Relative paths in `data.paths` (and in the `data.paths` a chain step overrides) are resolved against the config
    file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (teacher, student, ...) at the top level, got a "
            f"{type(data).__name__}; see `alambic quickstart --print-config`"
        )
    if isinstance(data, dict) and isinstance(data.get("data"), dict) and data["data"].get("paths"):
        data["data"]["paths"] = [
            str(path.parent / p) if not Path(p).is_absolute() else p for p in data["data"]["paths"]
        ]
    if isinstance(data, dict) and isinstance(data.get("chain"), list):
        for step in data["chain"]:
            _resolve_step_paths(step, path.parent)
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(data, origin=str(path))


def _resolve_step_paths(step: Any, folder: Path) -> None:
    """A chain step's `data.paths` override, nested or dotted, at the step's top level or in its `overrides`, made
    relative to `folder` as the top-level data.paths are."""

    def resolved(paths: Any) -> Any:
        if not isinstance(paths, list):
            return paths  # validation names the wrong type
        return [str(folder / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in paths]

    for holder in (step, step.get("overrides")) if isinstance(step, dict) else ():
        if not isinstance(holder, dict):
            continue
        if isinstance(holder.get("data"), dict) and "paths" in holder["data"]:
            holder["data"]["paths"] = resolved(holder["data"]["paths"])
        if "data.paths" in holder:
            holder["data.paths"] = resolved(holder["data.paths"])


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. loss.temperature=2")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(
            f"--set {item}: the value is not valid YAML ({problem}); quote it, e.g. "
            f"--set '{key}=\"...\"', or close its brackets"
        ) from None


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config, every default spelled out."""
    from alambic.utils import atomic_write_text

    atomic_write_text(path, config.to_yaml())
