"""A word-level BPE tokenizer in Gemma's layout, trained offline on a few texts (toy teachers, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GemmaTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def train_gemma_layout_tokenizer(texts: Iterable[str], vocab_size: int) -> GemmaTokenizerFast:
    r"""
    Byte-fallback BPE trained on `texts`, wrapped as a `GemmaTokenizerFast` (`<bos>` prepended, right padding), so it
    saves and loads like Gemma's tokenizer and drives Sana's prompt encoding unchanged.

    Words are split on `▁` *after* the space normaliser (sentencepiece style), so no merge crosses a word boundary.
    (Splitting on `" "`, which the normaliser has already replaced, lets BPE merge across words: "an emoji of red
    apple" became `an▁emoji▁of▁r | ed▁ | apple`.) transformers re-applies Gemma's pre-tokenizer on reload; without
    cross-word merges that gives the same ids.

    Args:
        texts (`Iterable[str]`): Training texts.
        vocab_size (`int`): Target vocabulary size, special tokens included (the result can be smaller).
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(list(texts), trainer)
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    tokenizer.padding_side = "right"
    return tokenizer
