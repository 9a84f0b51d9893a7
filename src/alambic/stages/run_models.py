"""The models one training stage works with, each resolved once: where the student and the teacher load from, their
tokenizers, whether the teacher is a saved classifier, and the models themselves. The stage builds one `RunModels`
and passes it down, instead of each helper asking `load_tokenizer` / `is_classifier` again."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alambic.config import ConfigError, ModelConfig, RunConfig
from alambic.stages.paths import run_labels, student_source, teacher_source

if TYPE_CHECKING:  # torch-free import of this module: the CLI's help must stay fast
    from alambic.teachers.ensemble import WeightedTeacher


@dataclass
class RunModels:
    """A run's models, resolved on first use and kept (`cached_property`): ask for what the stage needs."""

    config: RunConfig
    run_dir: Path

    @cached_property
    def student_source(self) -> ModelConfig:
        """Where the untrained student loads from: the one the student stage built, or the user's own."""
        return student_source(self.config, self.run_dir)

    @cached_property
    def teacher_source(self) -> ModelConfig:
        """Where the teacher loads from: this run's fine-tuned classifier (teacher.fine_tune), or the configured one."""
        return teacher_source(self.config, self.run_dir)

    @cached_property
    def student_tokenizer(self) -> Any:
        from alambic.models import load_tokenizer

        return load_tokenizer(self.student_source)

    @cached_property
    def teacher_tokenizer(self) -> Any:
        from alambic.models import load_tokenizer

        return load_tokenizer(self.config.teacher)

    @cached_property
    def labels(self) -> list[str] | None:
        """Class names in id order for task sequence_classification (data/split.json); None for causal LMs."""
        return run_labels(self.config, self.run_dir)

    @cached_property
    def teacher_is_classifier(self) -> bool:
        """Whether the teacher source is a saved sequence classifier (read from its config once)."""
        from alambic.models import is_classifier

        return is_classifier(self.teacher_source)

    def teacher(self) -> Any:
        """The teacher language model (kept in the process: later stages share it)."""
        from alambic.models import load_model

        return load_model(self.config.teacher, cache=True)

    def classifier_teacher(self) -> Any:
        """The teacher classifier of a classification run; a backbone without teacher.fine_tune is refused (its head
        would be random)."""
        from alambic.models import load_model

        if not self.teacher_is_classifier:
            raise ConfigError(
                f"task sequence_classification: teacher {self.config.teacher.model!r} is not a sequence "
                "classifier, and a fresh head would teach noise; set teacher.fine_tune to train one "
                "first"
            )
        return load_model(self.teacher_source, cache=True, labels=self.labels, classifier=True)

    def student(self) -> Any:
        """The untrained student; a classification run's given backbone gets a fresh head (a pruned one is already a
        classifier)."""
        from alambic.models import load_model

        return load_model(
            self.student_source,
            labels=self.labels,
            tokenizer=self.student_tokenizer if self.labels is not None else None,
        )

    def additional_teachers(self) -> list[WeightedTeacher]:
        """`additional_teachers`, each checked against the teacher's tokenizer (`stages.models`)."""
        from alambic.stages.models import load_additional_teachers

        return load_additional_teachers(self.config, teacher_tokenizer=self.teacher_tokenizer)
