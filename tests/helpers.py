"""One place that builds the tiny random models and the tiny tokenizer every unit test uses."""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Markets rallied as the central bank held interest rates steady.",
    "The team won the cup final after extra time and penalties.",
    "A new phone was released with a faster chip and a larger screen.",
    "Parliament debated the budget late into the night.",
    "Hello, how are you? I am fine, thank you. What is your name?",
] * 20

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@cache
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab <= 512) with a ChatML chat template, like SmolLM2's."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def bos_tokenizer(*, template_renders_bos: bool = False) -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` that starts every encoded text with BOS (<|endoftext|>), as Gemma's, Llama 3's and Mistral's
    do. `template_renders_bos`: its chat template writes the BOS itself, as Gemma's does."""
    from tokenizers import Tokenizer, processors

    inner = Tokenizer.from_str(_tiny_tokenizer_json(320))
    bos = inner.token_to_id("<|endoftext|>")
    inner.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    tok.chat_template = ("{{ bos_token }}" if template_renders_bos else "") + CHATML_TEMPLATE
    return tok


ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@cache
def _other_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        unk_token="<unk>",
        initial_alphabet=["\n"],
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<pad>"],
    )
    tok.train_from_iterator([*_CORPUS, *NEWS], trainer=trainer)
    return tok.to_str()


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer unlike `tiny_tokenizer` in every way a second teacher's can be: SentencePiece-style unigram
    (Metaspace, as Llama 2's), other ids, another chat template (Zephyr's) and end-of-turn token (</s>)."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_other_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.chat_template = ZEPHYR_TEMPLATE
    return tok


TINY_ARCHS = ("llama", "qwen2", "mistral")


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 64,
    tie: bool = True,
    **extra,
):
    """`extra`: further config fields of the family (head_dim, ...)."""
    return AutoConfig.for_model(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A randomly initialised causal LM of a real architecture, small enough to run in milliseconds."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs), attn_implementation="eager")
    return model.eval()


def save_tiny_pair(tmp_path, arch: str = "llama", teacher_layers: int = 4):
    """Save a tiny teacher and its tokenizer to tmp_path/teacher; return the folder."""
    folder = tmp_path / "teacher"
    tiny_model(arch, num_layers=teacher_layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


NEWS = [
    "Markets rallied on Monday as the central bank held interest rates steady for a third month.",
    "The team won the cup final after extra time, with a late goal from the young striker.",
    "A new phone was released with a faster chip, a larger screen and a better camera.",
    "Parliament debated the budget late into the night before a narrow vote.",
    "The film festival opened with a drama about a family of fishermen.",
    "Oil prices fell sharply after producers agreed to raise output next year.",
]


def write_text_corpus(folder, n_docs: int = 24):
    """A folder of small .txt documents for `data.source: files`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(NEWS[(i + j) % len(NEWS)] for j in range(3)))
    return folder


def tiny_prepared(tmp_path, *, max_seq_len: int = 16, chat: bool = False):
    """PreparedData over a tiny corpus, tokenized with `tiny_tokenizer()`."""
    import json

    from alambic.config import DataConfig
    from alambic.data import prepare_datasets

    if chat:
        path = tmp_path / "chat.jsonl"
        rows = [{"prompt": NEWS[i % 6][:30], "response": NEWS[(i + 1) % 6]} for i in range(16)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        cfg = DataConfig(
            source="files", format="chat", paths=[path], max_seq_len=max_seq_len * 3, validation_fraction=0.25
        )
    else:
        cfg = DataConfig(
            source="files",
            paths=[write_text_corpus(tmp_path / "corpus")],
            max_seq_len=max_seq_len,
            validation_fraction=0.2,
        )
    return prepare_datasets(cfg, tiny_tokenizer())


TOPICS = {"business": NEWS[0], "sport": NEWS[1], "tech": NEWS[2]}  # a tiny labelled corpus: one phrase per class


def write_labelled_corpus(path, n_docs: int = 30):
    """A jsonl file of {"text", "label"} rows for `data.format: classification`, classes in turn."""
    import json

    names = list(TOPICS)
    rows = [{"text": f"{TOPICS[names[i % 3]]} Story {i}.", "label": names[i % 3]} for i in range(n_docs)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_classifier(arch: str = "llama", num_labels: int = 3, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A randomly initialised sequence classifier of a real architecture (pad id 3, the tiny tokenizer's <pad>)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(arch, **kwargs)
    config.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return model.eval()


# -- the loss tests' tolerances and inputs (one set of each, like Liger's assert_verbose_allclose) -----------------

# How close an implementation must come to its reference, per dtype of what is compared. float64: the same
# computation up to rounding (sums in another order, fused steps). float32: the same. bfloat16 and float16: a result
# computed in float32 and rounded back to the low precision once (a gradient; about one unit in the last place).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},
}
F64 = TOLERANCES[torch.float64]


def assert_verbose_close(
    got: torch.Tensor, want: torch.Tensor, *, what: str = "", dtype: torch.dtype | None = None, **tolerance: float
) -> None:
    """`torch.testing.assert_close` at the tolerances of `dtype` (default: `got`'s, or pass rtol/atol), whose message
    also names the worst elements: their index, both values and the difference."""
    tol = tolerance or TOLERANCES[dtype or got.dtype]
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    excess = (diff - tol["atol"] - tol["rtol"] * want.abs()).flatten()
    worst = (
        [
            (idx, got.flatten()[idx].item(), want.flatten()[idx].item())
            for idx in excess.topk(min(3, excess.numel())).indices.tolist()
            if excess[idx] > 0
        ]
        if excess.numel()
        else []
    )
    detail = "; ".join(f"at flat index {i}: {g:.6g} vs {w:.6g} (diff {abs(g - w):.3g})" for i, g, w in worst)
    torch.testing.assert_close(
        got, want, **tol, msg=lambda m: f"{what}: {m}\nworst: {detail}" if what else f"{m}\nworst: {detail}"
    )


def random_logits(
    shape,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    count: int = 1,
    scale: float = 3.0,
    dtype: torch.dtype = torch.float64,
    grad: bool = False,
) -> list[torch.Tensor]:
    """`count` random logit tensors (normal, times `scale`), drawn one after another in float64 from `generator` (or
    one seeded with `seed`), then cast to `dtype`: the same values in every dtype for one seed."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    drawn = [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(count)]
    return [t.requires_grad_(grad) for t in drawn]


class CrashAt(TrainerCallback):
    """Raises `error` (an interruption by default) when training reaches `step`: a crash between checkpoints."""

    def __init__(self, step: int, error: BaseException | type[BaseException] = KeyboardInterrupt):
        self.step, self.error = step, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error
