"""The run configuration: one pydantic model per stage, YAML in, resolved YAML out.

Every field carries its description once; the CLI's `--print-config` and the resolved `config.yaml` of a
run reuse it. Loading collects every problem (unknown keys, wrong types, impossible values, missing
files) and raises one `ConfigError` that names each field path, the value seen and what is allowed.

One module per part of the run, each importing only the sections it nests:

    _base        ConfigError, the strict `_Section` base, shared literal types (Divergence, DType, Task)
    models       ModelConfig, TeacherConfig (+ FineTuneConfig), AdditionalTeacherConfig
    student      StudentConfig, FromTeacherConfig (pruning)
    data         DataConfig, TeacherCacheConfig, TeacherResponsesConfig, SelectionConfig
    loss         LossConfig, FeatureLossConfig (and its three terms), OnPolicyConfig
    training     TrainingConfig
    evaluation   EvaluationConfig, CostConfig, GenerationEvalConfig, HeldOutSetConfig, LmEvalConfig
    run          RunConfig (every section, and the checks that span sections), ChainStep
    io           validate_config, load_config, apply_override, save_config

Import from `alambic.config`; the modules are its layout, not its interface.
"""

from __future__ import annotations

from alambic.config._base import WEIGHTS_ID_HELP, ConfigError, Divergence, DType, Task
from alambic.config.data import DataConfig, SelectionConfig, TeacherCacheConfig, TeacherResponsesConfig
from alambic.config.evaluation import CostConfig, EvaluationConfig, GenerationEvalConfig, HeldOutSetConfig, LmEvalConfig
from alambic.config.io import apply_override, load_config, save_config, validate_config
from alambic.config.loss import (
    AttentionMapLossConfig,
    AttentionRelationLossConfig,
    FeatureLossConfig,
    HiddenStateLossConfig,
    LossConfig,
    OnPolicyConfig,
)
from alambic.config.models import AdditionalTeacherConfig, FineTuneConfig, ModelConfig, TeacherConfig
from alambic.config.run import ChainStep, RunConfig
from alambic.config.student import FromTeacherConfig, StudentConfig
from alambic.config.training import TrainingConfig

__all__ = [
    "WEIGHTS_ID_HELP",
    "AdditionalTeacherConfig",
    "AttentionMapLossConfig",
    "AttentionRelationLossConfig",
    "ChainStep",
    "ConfigError",
    "CostConfig",
    "DType",
    "DataConfig",
    "Divergence",
    "EvaluationConfig",
    "FeatureLossConfig",
    "FineTuneConfig",
    "FromTeacherConfig",
    "GenerationEvalConfig",
    "HeldOutSetConfig",
    "HiddenStateLossConfig",
    "LmEvalConfig",
    "LossConfig",
    "ModelConfig",
    "OnPolicyConfig",
    "RunConfig",
    "SelectionConfig",
    "StudentConfig",
    "Task",
    "TeacherCacheConfig",
    "TeacherConfig",
    "TeacherResponsesConfig",
    "TrainingConfig",
    "apply_override",
    "load_config",
    "save_config",
    "validate_config",
]
