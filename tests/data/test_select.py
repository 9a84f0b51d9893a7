"""alambic.data.select: teacher entropy against a plain float64 reference, the kept band, the record, the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alambic.config import ConfigError, SelectionConfig, validate_config
from alambic.data.select import (
    apply_selection,
    select_band,
    selection_record,
    sequence_entropies,
    token_entropy,
)
from alambic.report.selection import plot_entropy_histogram
from helpers import tiny_model, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The slow twin: float64, the textbook formula."""
    p = torch.softmax(logits.double(), dim=-1)
    return -(p * torch.log(p)).sum(-1)


def test_token_entropy_matches_the_formula_and_its_limits():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 97) * 3
    torch.testing.assert_close(token_entropy(logits).double(), _reference_entropy(logits), rtol=1e-5, atol=1e-5)
    assert token_entropy(torch.zeros(1, 320)).item() == pytest.approx(math.log(320), rel=1e-6)  # uniform: log V
    peaked = torch.full((1, 50), -1e4)
    peaked[0, 3] = 0
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])  # a masked-out id: no nan
    assert token_entropy(masked).item() == pytest.approx(math.log(2), rel=1e-6)
    assert token_entropy(torch.zeros(2, 8, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_sequence_scores_equal_a_plain_reference(tmp_path, chat):
    """Batched, padded, chunked scoring = one sequence at a time through the whole model, float64."""
    data = tiny_prepared(tmp_path, chat=chat)
    model = tiny_model()
    scores = sequence_entropies(model, data.train, pad_token_id=3, batch_size=3, chunk_size=5)
    assert scores.shape == (len(data.train),)
    expected = []
    with torch.no_grad():
        for row in data.train:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            counted = labels[1:] != -100  # position t predicts token t + 1
            logits = model(input_ids=ids).logits[0, :-1][counted]
            expected.append(_reference_entropy(logits).mean().item())
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.std() > 0


SCORES = np.array([0.9, 0.1, 0.3, 0.8, 0.2, 0.7, 0.3, 0.5])
# ascending, ties by index: 1 (0.1), 4 (0.2), 2 (0.3), 6 (0.3), 7 (0.5), 5 (0.7), 3 (0.8), 0 (0.9)


@pytest.mark.parametrize(
    "band, kept",
    [
        ("highest", [0, 3, 5]),  # 0.9, 0.8, 0.7: k = round(0.375 * 8) = 3
        ("lowest", [1, 2, 4]),  # 0.1, 0.2 and the first of the tied 0.3
        ("middle", [2, 6, 7]),  # ranks 2, 3, 4: start (8 - 3) // 2 = 2
    ],
)
def test_the_chosen_band_is_kept(band, kept):
    assert select_band(SCORES, 0.375, band).tolist() == kept
    assert select_band(SCORES, 1.0, band).tolist() == list(range(8))
    assert select_band(SCORES, 0.01, band).size == 1  # at least one


def test_select_band_refuses_impossible_requests():
    with pytest.raises(ValueError, match="keep_fraction = 0"):
        select_band(np.ones(3), 0, "highest")
    with pytest.raises(ValueError, match="band = 'top'"):
        select_band(np.ones(3), 0.5, "top")
    with pytest.raises(ValueError, match="no sequence"):
        select_band(np.zeros(0), 0.5, "lowest")


def test_the_record_describes_the_distribution_and_the_cut(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, 1.0, size=200)
    cfg = SelectionConfig(keep_fraction=0.25, band="highest", bins=10)
    kept = select_band(scores, cfg.keep_fraction, cfg.band)
    record = selection_record(scores, kept, cfg)
    assert record["total"] == 200 and record["kept"] == 50 == len(record["kept_indices"])
    assert record["threshold"] == pytest.approx(np.sort(scores)[-50])
    assert all(scores[i] >= record["threshold"] for i in record["kept_indices"])
    assert sum(scores >= record["threshold"]) == 50
    assert sum(record["histogram"]["counts"]) == 200 and sum(record["histogram"]["kept_counts"]) == 50
    assert len(record["histogram"]["edges"]) == 11
    assert record["quantiles"]["0.5"] == pytest.approx(np.median(scores))
    assert record["mean_kept"] > record["mean"]
    middle = selection_record(scores, select_band(scores, 0.5, "middle"), cfg.model_copy(update={"band": "middle"}))
    low, high = middle["threshold"]
    assert np.quantile(scores, 0.2) < low < np.median(scores) < high < np.quantile(scores, 0.8)

    class Rows(list):
        def select(self, indices):
            return [self[i] for i in indices]

    assert apply_selection(Rows(range(200)), record) == record["kept_indices"]
    with pytest.raises(ValueError, match="made over 200 training sequences, this set has 199"):
        apply_selection(Rows(range(199)), record)

    path = plot_entropy_histogram(record, tmp_path / "plots" / "entropy.png")
    assert path is not None and path.stat().st_size > 1000


@pytest.mark.parametrize(
    "selection, field",
    [
        ({"keep_fraction": 0}, "data.selection.keep_fraction"),
        ({"keep_fraction": 1.5}, "data.selection.keep_fraction"),
        ({"band": "top"}, "data.selection.band"),
    ],
)
def test_bad_selection_settings_are_refused_naming_the_field(selection, field):
    with pytest.raises(ConfigError, match=field):
        validate_config({"teacher": {"model": "x"}, "student": {"model": "y"}, "data": {"selection": selection}})
