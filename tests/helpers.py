"""One place that builds the tiny random models and the tiny tokenizer every unit test uses."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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


@lru_cache(maxsize=None)
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


TINY_ARCHS = ("llama", "qwen2", "mistral")


def tiny_config(arch: str = "llama", *, vocab_size: int = 320, hidden_size: int = 32, num_layers: int = 4,
                heads: int = 4, kv_heads: int = 2, intermediate_size: int = 64, tie: bool = True):
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
