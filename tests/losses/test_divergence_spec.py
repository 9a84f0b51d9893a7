"""One value for the divergence (name, temperature, jsd_beta / skew) and one table of names for config and losses."""

import typing

import pytest
import torch

from alambic.config import Divergence, LossConfig
from alambic.divergence import DIVERGENCE_NAMES, DivergenceSpec, resolve_spec
from alambic.losses import DIVERGENCES, distillation_loss, multi_teacher_distillation_loss
from alambic.losses.chunked import OutputHead, chunked_distillation_loss


def test_the_config_lists_the_losses_divergences():
    assert typing.get_args(Divergence) == tuple(DIVERGENCES) == DIVERGENCE_NAMES


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_a_spec_gives_the_same_loss_as_its_parts(name):
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 5, 11, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, 11, (2, 5), generator=g)
    cfg = LossConfig(divergence=name, temperature=2.0, alpha=0.7, jsd_beta=0.3, skew=0.2)
    spec = cfg.divergence_spec
    assert spec == DivergenceSpec(name, 2.0, 0.3, 0.2)
    by_parts = distillation_loss(s, t, labels, divergence=name, temperature=2.0, alpha=0.7, jsd_beta=0.3, skew=0.2)
    for parts in (
        distillation_loss(s, t, labels, divergence=spec, alpha=0.7),
        multi_teacher_distillation_loss(s, [t], labels, divergence=spec, alpha=0.7),
    ):
        torch.testing.assert_close(parts.total, by_parts.total)
    if name != "uld":
        head = OutputHead(weight=torch.eye(11, dtype=torch.float64), bias=None)
        chunked = chunked_distillation_loss(
            s.reshape(10, 11),
            head,
            t.reshape(10, 11),
            head,
            labels.reshape(10),
            divergence=spec,
            alpha=0.7,
            chunk_size=3,
        )
        torch.testing.assert_close(chunked.total, by_parts.total)


def test_a_spec_and_separate_parameters_are_refused():
    with pytest.raises(ValueError, match=r"DivergenceSpec.*\['jsd_beta'\].*put them in the spec"):
        resolve_spec(DivergenceSpec("jsd"), jsd_beta=0.2)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; choose one of: forward_kl"):
        DivergenceSpec("kl").keywords()


def test_a_divergence_reads_only_the_parameters_it_names():
    assert DivergenceSpec("jsd", jsd_beta=0.3).keywords() == {"beta": 0.3}
    assert DivergenceSpec("skew_reverse_kl", skew=0.2).keywords() == {"skew": 0.2}
    assert DivergenceSpec("tvd", jsd_beta=0.3, skew=0.2).keywords() == {}
