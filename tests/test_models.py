"""alambic.models: aliases whose package assembles the .gguf file (Gemma 3 270M ships it in four chunk packages)."""

from __future__ import annotations

import sys

import pytest

from alambic import models
from alambic.models import Alias, ModelLoadError, ModelSource, resolve_source


def _package(tmp_path, monkeypatch, body: str) -> str:
    name = f"fake_gguf_{abs(hash(str(tmp_path)))}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _alias(package: str) -> Alias:
    return Alias(
        package=package,
        pip_name="fake-gguf",
        gguf_file="fake.gguf",
        description="a test alias",
        install="pip install fake-gguf gguf",
        extra="fake",
        assembled=True,
    )


def test_an_assembled_alias_resolves_to_the_file_its_package_writes_once(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "fake.gguf"
    package = _package(
        tmp_path,
        monkeypatch,
        f"""
from pathlib import Path
CALLS = []
def assemble():
    CALLS.append(1)
    path = Path({str(target)!r})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(8))
    return path
""",
    )
    monkeypatch.setitem(models.ALIASES, "fake", _alias(package))
    monkeypatch.setattr(models, "_ASSEMBLED", {})
    assert resolve_source("fake") == ModelSource(str(target.parent), "fake.gguf")
    assert resolve_source("fake") == ModelSource(str(target.parent), "fake.gguf")
    assert sys.modules[package].CALLS == [1]  # the sha256 of 253 MB is checked once per process


def test_an_alias_that_cannot_assemble_says_what_to_reinstall(tmp_path, monkeypatch):
    package = _package(tmp_path, monkeypatch, "def assemble():\n    raise ValueError('sha256 did not match')\n")
    monkeypatch.setitem(models.ALIASES, "fake", _alias(package))
    monkeypatch.setattr(models, "_ASSEMBLED", {})
    with pytest.raises(
        ModelLoadError,
        match=r"fake-gguf could not assemble fake.gguf: sha256 did not match.*"
        r"pip install fake-gguf gguf",
    ):
        resolve_source("fake")


def test_a_missing_alias_package_names_its_install_command_and_extra(monkeypatch):
    monkeypatch.setitem(models.ALIASES, "fake", _alias("no_such_package_for_alambic"))
    with pytest.raises(ModelLoadError, match=r"`pip install fake-gguf gguf` \(or `pip install 'alambic\[fake\]'`\)"):
        resolve_source("fake")


def test_the_gemma3_alias_is_declared_with_its_extra():
    alias = models.ALIASES["gemma3-270m"]
    assert alias.assembled and alias.extra == "gemma3" and alias.gguf_file == "gemma-3-270m-q4_k_m.gguf"
