"""The student section (stage 'student'): bring your own model, or prune one from the teacher."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from alambic.config._base import WEIGHTS_ID_HELP, DType, _Section


class FromTeacherConfig(_Section):
    """Derive the student from the teacher by structured pruning: depth (which decoder layers), width
    (attention heads, FFN neurons, hidden channels), or a parameter budget met by a search over shapes.

    Left empty, it keeps every other layer (DistilBERT). Units are chosen by importance measured on
    `calibration_sequences` training sequences; the student folder gets `pruning.json` with the scores.
    """

    layers: Literal["every_other", "first_half", "last_half", "importance"] | list[int] | None = Field(
        default=None,
        description="'every_other' keeps layers 0, 2, 4, ... (DistilBERT); 'first_half'/'last_half'; explicit "
        "teacher layer indices, e.g. [0, 3, 7, 11]; or 'importance': the `num_layers` most important layers "
        "(see layer_importance). Default: every_other when no width field or budget is set, else all layers.",
    )
    num_layers: int | None = Field(default=None, gt=0, description="Layers to keep with layers: importance.")
    layer_importance: Literal["skip_loss", "block_influence"] = Field(
        default="skip_loss",
        description="Layer ranking: 'skip_loss' = calibration loss increase when the layer is skipped; "
        "'block_influence' = 1 - cos(layer input, layer output) (ShortGPT).",
    )
    num_attention_heads: int | None = Field(default=None, gt=0, description="Query heads per layer to keep.")
    num_key_value_heads: int | None = Field(default=None, gt=0, description="KV heads (GQA groups) to keep.")
    intermediate_size: int | None = Field(default=None, gt=0, description="FFN neurons per layer to keep.")
    hidden_size: int | None = Field(default=None, gt=0, description="Hidden (embedding) channels to keep.")
    head_importance: Literal["activation", "gradient"] = Field(
        default="activation",
        description="Head ranking: 'activation' = norm of each head's output (Minitron); 'gradient' = |dL/dmask| "
        "of a per-head mask (Michel et al. 2019). FFN neurons and channels are ranked by activation.",
    )
    gqa: Literal["per_group", "groups"] = Field(
        default="per_group",
        description="Under grouped-query attention: 'per_group' keeps the same number of query heads in each kept "
        "KV group; 'groups' removes whole KV groups with all their query heads.",
    )
    target_parameters: float | None = Field(
        default=None,
        gt=0,
        description="Parameter budget (e.g. 70e6) met by a search over shapes; exclusive with "
        "num_layers and the width fields.",
    )
    target_axis: Literal["depth", "width"] = Field(
        default="depth",
        description="What the budget search shrinks: 'depth' (layers, by importance) or 'width' "
        "(heads, FFN and hidden together, all layers kept).",
    )
    calibration_sequences: int = Field(default=32, gt=0, description="Training sequences used to measure importance.")
    evaluate: bool = Field(
        default=True,
        description="Measure perplexity and KL to the teacher on the held-out split right after "
        "pruning (recorded in pruning.json). `alambic run` measures the same as `student_before` in its evaluate "
        "stage, and the report falls back to it: false saves that time in full runs.",
    )

    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "hidden_size",
    )

    @field_validator("layers")
    @classmethod
    def _indices_valid(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list keeps no layer; give at least one teacher layer index")
            if any(i < 0 for i in v):
                raise ValueError(f"layer indices must be >= 0, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"layer indices must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> FromTeacherConfig:
        width = [f for f in self.WIDTH_FIELDS if getattr(self, f) is not None]
        if self.target_parameters is not None:
            if width or self.num_layers is not None:
                given = width + ["num_layers"] * (self.num_layers is not None)
                raise ValueError(f"target_parameters chooses the shape itself: remove {given}")
            if self.layers not in (None, "importance"):
                raise ValueError(
                    "with target_parameters the layers are chosen by importance: remove `layers` "
                    f"(got {self.layers!r}) or set it to 'importance'"
                )
        elif self.layers == "importance" and self.num_layers is None:
            raise ValueError("layers: importance needs num_layers (how many to keep), or a target_parameters budget")
        elif self.num_layers is not None and self.layers != "importance":
            raise ValueError(
                f"num_layers is used with layers: importance (got layers {self.layers!r}); "
                "set layers: importance or remove num_layers"
            )
        return self

    @property
    def prunes_width(self) -> bool:
        return any(getattr(self, f) is not None for f in self.WIDTH_FIELDS) or (
            self.target_parameters is not None and self.target_axis == "width"
        )

    @property
    def needs_importance(self) -> bool:
        return self.prunes_width or self.layers == "importance" or self.target_parameters is not None

    def resolved_layers(self) -> Literal["every_other", "first_half", "last_half", "importance", "all"] | list[int]:
        """What `layers` means once defaults apply: 'all' when only the width is pruned."""
        if self.target_parameters is not None:
            return "importance" if self.target_axis == "depth" else "all"
        if self.layers is None:
            return "all" if self.prunes_width else "every_other"
        return self.layers


class StudentConfig(_Section):
    """The student: bring your own (`model`) or build it from the teacher (`from_teacher`)."""

    model: str | None = Field(default=None, description="Same forms as teacher.model; exclusive with from_teacher.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model`.")
    from_teacher: FromTeacherConfig | None = Field(default=None, description="Build the student from the teacher.")
    dtype: DType = Field(default="float32", description="Student weights dtype (master weights for training).")
    weights_id: str | None = Field(default=None, description=WEIGHTS_ID_HELP)

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("set exactly one of student.model (your own student) or student.from_teacher")
        return self
