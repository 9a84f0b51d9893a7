"""The whole run: every section together, the steps of a chain, and the checks that span sections."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from alambic.combinations import config_refusals
from alambic.config._base import Task, _Section
from alambic.config.data import DataConfig
from alambic.config.evaluation import EvaluationConfig
from alambic.config.loss import LossConfig
from alambic.config.models import AdditionalTeacherConfig, TeacherConfig
from alambic.config.student import StudentConfig
from alambic.config.training import TrainingConfig


class ChainStep(_Section):
    """One step of a chain (`chain`): an ordinary run whose config is the top-level config with this step's
    overrides applied. Every key of the step besides name, teacher, student and overrides is an override: a
    section as a nested mapping, merged into the top-level one (`loss: {alpha: 0}`), or a dotted key
    (`loss.alpha: 0`)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]+$", description="Step name; its run folder is <output_dir>/<name>-chain/<step name>."
    )
    teacher: Literal["previous"] | dict[str, Any] | None = Field(
        default=None,
        description="'previous': the previous step's final student (its final/ folder) is this step's "
        "teacher, with the top-level teacher's dtype and device (progressive and born-again distillation). A mapping: "
        "overrides of the teacher section. null: the top-level teacher.",
    )
    student: Literal["previous", "first"] | dict[str, Any] | None = Field(
        default=None,
        description="'previous': start from the previous step's final student (fine-tune it, or distil "
        "it further: two-stage). 'first': start from the untrained student of the first step (the top-level "
        "from_teacher applied to the original teacher, or the given student); with teacher: previous this is "
        "born-again "
        "self-distillation. A mapping: overrides of the student section. null: the top-level student, whose "
        "from_teacher prunes this step's teacher.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the top-level config for this step, nested sections or dotted "
        "keys; the keys written at the step's top level are gathered here.",
    )

    # set by the chain itself: where each step runs, and a step holds no chain
    NOT_PER_STEP: ClassVar[tuple[str, ...]] = ("name", "output_dir", "chain")
    # what a `previous` / `first` shorthand leaves to the step: placement, not which weights
    SHORTHAND_KEEPS: ClassVar[tuple[str, ...]] = ("dtype", "device")

    @model_validator(mode="before")
    @classmethod
    def _gather_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("overrides", {}), dict):
            return data  # the field's own error names the wrong type
        own = ("name", "teacher", "student", "overrides")
        extra = {k: v for k, v in data.items() if k not in own}
        if not extra:
            return data
        return {**{k: v for k, v in data.items() if k in own}, "overrides": {**(data.get("overrides") or {}), **extra}}

    @model_validator(mode="after")
    def _overrides_fit(self) -> ChainStep:
        problems = []
        top = sorted({str(k).split(".")[0] for k in self.overrides} & set(self.NOT_PER_STEP))
        if top:
            problems.append(
                f"{top} cannot be set per step: each step runs in <output_dir>/<name>-chain/<step name> "
                "and holds no chain of its own; set name and output_dir at the top level"
            )
        for section, value in (("teacher", self.teacher), ("student", self.student)):
            if not isinstance(value, str):
                continue
            clash = [
                k
                for k in self.overrides
                if k == section or (k.startswith(section + ".") and k.split(".")[1] not in self.SHORTHAND_KEEPS)
            ]
            if clash:
                problems.append(
                    f"{section}: {value} says which weights the step uses, so {clash} cannot be set beside "
                    f"it (only {section}.dtype / {section}.device); write the {section} section out "
                    "instead"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RunConfig(_Section):
    """A whole run: teacher -> student -> data -> distill -> evaluate -> report."""

    name: str = Field(
        default="run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name; the folder is output_dir/name."
    )
    output_dir: Path = Field(default=Path("runs"), description="Parent folder of run folders.")
    task: Task = Field(
        default="causal_lm",
        description="'causal_lm': distil next-token distributions. 'sequence_classification': teacher and student are "
        "classifiers (a backbone gets a classification head), distilled on class logits, scored by accuracy and "
        "macro-F1; needs data.format: classification.",
    )
    teacher: TeacherConfig
    teacher_weight: float = Field(
        default=1.0,
        gt=0,
        description="Weight of `teacher` among several teachers, before normalisation (see "
        "additional_teachers, loss.teachers); ignored with one teacher.",
    )
    additional_teachers: list[AdditionalTeacherConfig] = Field(
        default_factory=list,
        description="More teachers distilled from at once, e.g. a domain expert beside a general instruct teacher: "
        "[{model: ..., weight: 1.0, device: ..., dtype: ...}]. Each must share the teacher's tokenizer; they run one "
        "after another in each training step under inference mode. `teacher` stays the primary: its tokenizer is "
        "the run's, the student is pruned from it, loss.features and evaluation use it. Empty: one teacher.",
    )
    student: StudentConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    chain: list[ChainStep] | None = Field(
        default=None,
        description="Run several steps in order, each an ordinary run of this config with the step's "
        "overrides, in <output_dir>/<name>-chain/<step name>/; a step may learn from the previous step's final student "
        "(teacher: previous) or start from it (student: previous): two-stage, progressive and born-again "
        "distillation. `alambic run` runs every step, then compares them in chain.md / chain.html. null: one run.",
    )

    @field_validator("chain")
    @classmethod
    def _chain_order(cls, v: list[ChainStep] | None) -> list[ChainStep] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty chain runs nothing: give at least one step, or remove `chain`")
        problems = []
        names = [s.name for s in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(
                f"step names {twice} are used twice: each step needs its own name (it names its run folder)"
            )
        first = v[0]
        if first.teacher == "previous" or first.student in ("previous", "first"):
            problems.append(
                f"the first step {first.name!r} has no step before it: teacher: previous and student: "
                "previous / first need one; remove them from the first step"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _on_policy_fits(self) -> RunConfig:
        """loss.on_policy answers chat prompts (the sources it cannot go with: `_task_and_sources_fit`)."""
        if self.loss.on_policy is not None and self.task == "causal_lm" and self.data.format != "chat":
            raise ValueError(
                f"loss.on_policy needs prompts to answer: set data.format: chat (got "
                f"{self.data.format!r}) or remove loss.on_policy"
            )
        return self

    @model_validator(mode="after")
    def _padding_free_fits(self) -> RunConfig:
        """Every setting that needs one row per sequence, which training.packing: padding_free does not give."""
        if self.training.packing != "padding_free":
            return self
        needs_rows = {
            "task sequence_classification (one label per row)": self.task != "causal_lm",
            "loss.features attention / attention_relations (maps over the whole row)": self.loss.features is not None
            and (self.loss.features.attention is not None or self.loss.features.attention_relations is not None),
            "loss.on_policy (each row's prompt)": self.loss.on_policy is not None,
            "data.teacher_cache (rows of the cached sequences)": self.data.teacher_cache is not None,
        }
        refused = [name for name, on in needs_rows.items() if on]
        if refused:
            raise ValueError(
                "training.packing: padding_free lays a batch's sequences in one row, which "
                f"{', '.join(refused)} "
                "cannot use: choose training.packing: group_by_length (padded, of similar lengths) or pad"
            )
        return self

    @model_validator(mode="after")
    def _compile_fits(self) -> RunConfig:
        if not self.training.torch_compile:
            return self
        refused = [
            name
            for name, on in (
                ("task sequence_classification", self.task != "causal_lm"),
                ("loss.features", self.loss.features is not None),
                ("loss.on_policy", self.loss.on_policy is not None),
            )
            if on
        ]
        if refused:
            raise ValueError(
                f"training.torch_compile compiles the language models' decoder layers for the training "
                f"step, which {', '.join(refused)} cannot use yet: remove one of them"
            )
        return self

    @model_validator(mode="after")
    def _task_and_sources_fit(self) -> RunConfig:
        """Every setting that cannot go with the task, and every feature the run's kinds of teacher signal cannot
        serve, in one message: the latter from one table, read off the sources' declared requirements
        (`alambic.combinations`; alpha 0 with the loss's own features: in LossConfig)."""
        problems = []
        if self.task == "causal_lm":
            if self.data.format == "classification":
                problems.append("data.format classification holds labelled examples: set task: sequence_classification")
            if self.teacher.fine_tune is not None:
                problems.append(
                    "teacher.fine_tune trains a classification head: set task: sequence_classification "
                    "or remove teacher.fine_tune"
                )
        else:
            if self.data.format != "classification":
                problems.append(
                    "task sequence_classification needs labelled examples: set data.format: "
                    "classification "
                    f"(got {self.data.format!r}) and data.label_field"
                )
            # (what a classifier's teacher cannot serve: the table, below)
            cut = self.student.from_teacher
            if cut is not None and cut.needs_importance:
                problems.append(
                    "student.from_teacher: importance (layers: importance, width fields, "
                    "target_parameters) "
                    "is measured with the language-model loss, which a classifier lacks; choose layers "
                    "every_other / first_half / last_half or explicit indices"
                )
        problems += config_refusals(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def inputs_hash(self, *paths: str) -> str:
        """Stable hash of the config fields at `paths`, the inputs a stage declares: a section ("teacher"), a
        sub-model or field at any depth ("data.teacher_cache", "loss.temperature") with all it holds, or, with a
        trailing "?", only whether that field is set ("student.from_teacher?"). A field that is None (or not set)
        is left out, so a stage given a new optional input keeps the hash of the runs that do not set it.

        Raises:
            ValueError: a path that names no field of the config (a typo in a stage's declaration).
        """
        dumped = self.model_dump(mode="json")
        payload = {}
        for path in paths:
            value: Any = dumped
            for part in path.removesuffix("?").split("."):
                if value is None:
                    break
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(
                        f"stage input {path!r} names no field of the run config ({part!r} is not "
                        "there): declare an existing field path, such as 'loss.temperature'"
                    )
                value = value[part]
            if value is not None and path.endswith("?"):
                value = True
            if value is not None:
                payload[path] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
