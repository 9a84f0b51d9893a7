"""What every config section shares: the error a bad configuration raises, the strict base of every section,
and the literal types several sections name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from alambic.divergence import DivergenceName

# The divergences' own table (alambic.divergence, torch-free) lists the names: never written a second time here.
Divergence = DivergenceName
DType = Literal["float32", "bfloat16", "float16", "auto"]
Task = Literal["causal_lm", "sequence_classification"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem, one per line."""


# A chain step reads a folder an earlier step rewrites in place (its final/): the path alone does not say which
# weights it holds, so the chain runner records their identity here, where the stage hashes see it.
WEIGHTS_ID_HELP = (
    "Identity of the weights in `model` when that folder is rewritten in place, e.g. an earlier chain "
    "step's final/ (set by the chain runner). Part of the stage hashes, so the run is redone when the "
    "folder changes; not used for loading. null: the path identifies the weights."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
