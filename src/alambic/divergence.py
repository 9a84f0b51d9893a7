"""The divergences alambic knows, by name, and the one value that says which divergence a soft loss uses.

Torch-free, so that the config can list the names (`config.Divergence`) without importing the losses. The functions
themselves live in `alambic.losses.divergences` (`DIVERGENCES`, checked there against `PARAMETERS` at import).

Adding a divergence: its per-token function in `losses/divergences.py` and its entry in `DIVERGENCES` there, and
its line in `PARAMETERS` here (the parameters it reads, if any); a divergence a top-k teacher can serve is also named
in `losses/topk.py:TOPK_DIVERGENCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# name -> {keyword of its function: the DivergenceSpec field it takes}; every divergence also takes `temperature`.
PARAMETERS: dict[str, dict[str, str]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": "jsd_beta"},
    "skew_forward_kl": {"skew": "skew"},
    "skew_reverse_kl": {"skew": "skew"},
    "tvd": {},
    "logit_mse": {},
    "uld": {},
}
DIVERGENCE_NAMES: tuple[str, ...] = tuple(PARAMETERS)
# Built from the table: the config's list of names is never written a second time.
DivergenceName = Literal[DIVERGENCE_NAMES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence a soft loss uses, with everything it reads: the temperature T, and `jsd_beta` (jsd only) or
    `skew` (the two skew KLs only); a divergence ignores the parameters it does not name in `PARAMETERS`.

    One value travels from the config (`LossConfig.divergence_spec`) down to the per-token function, instead of four
    arguments through every layer.
    """

    name: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew: float = 0.1

    def check_name(self) -> None:
        """Raises ValueError for a name not in `PARAMETERS` (the message lists the allowed ones)."""
        if self.name not in PARAMETERS:
            raise ValueError(f"unknown divergence {self.name!r}; choose one of: {', '.join(DIVERGENCE_NAMES)}")

    def keywords(self) -> dict[str, float]:
        """The divergence function's own keyword arguments besides the temperature (e.g. {'beta': 0.5} for jsd)."""
        self.check_name()
        return {keyword: getattr(self, field) for keyword, field in PARAMETERS[self.name].items()}

    def at_temperature(self, temperature: float) -> DivergenceSpec:
        """The same divergence at another temperature (the top-k buckets are already tempered: T = 1 there)."""
        return DivergenceSpec(self.name, temperature, self.jsd_beta, self.skew)


def resolve_spec(
    divergence: str | DivergenceSpec,
    temperature: float | None = None,
    jsd_beta: float | None = None,
    skew: float | None = None,
) -> DivergenceSpec:
    """The `DivergenceSpec` of a loss function's arguments: a spec as it is, or a name with its parameters (the
    defaults T = 1, jsd_beta = 0.5, skew = 0.1 where they are None).

    Raises:
        ValueError: a spec and separate parameters at once (which one would hold is not obvious).
    """
    if isinstance(divergence, DivergenceSpec):
        given = {k: v for k, v in dict(temperature=temperature, jsd_beta=jsd_beta, skew=skew).items() if v is not None}
        if given:
            raise ValueError(
                f"divergence is a DivergenceSpec ({divergence}) and {sorted(given)} are given besides it: "
                "put them in the spec"
            )
        return divergence
    base = DivergenceSpec(str(divergence))
    values: dict[str, Any] = dict(temperature=temperature, jsd_beta=jsd_beta, skew=skew)
    return DivergenceSpec(base.name, *(getattr(base, k) if v is None else v for k, v in values.items()))
