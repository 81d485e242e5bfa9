"""A byte-level tokenizer for the reference text models, built in memory.

The reference models have random weights, so any tokenizer that maps text to valid ids will do;
a byte-level one needs no vocabulary file and no download, round-trips every string, and keeps
the embedding table tiny (a few special tokens + 256 bytes). It is a real Hugging Face fast
tokenizer, so code written against ``tokenizer(...)``, ``decode`` and ``apply_chat_template``
works on the reference models the same way as on the real ones.
"""

from __future__ import annotations

from typing import Any

# Ids 0..len(specials)-1 are special tokens; byte b has id NUM_SPECIAL + b.
NUM_SPECIAL = 8
VOCAB_SIZE = NUM_SPECIAL + 256

LLAMA_SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
BERT_SPECIALS = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}

_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def byte_tokenizer(style: str) -> Any:
    """A ``PreTrainedTokenizerFast`` over bytes; ``style`` is "llama" (BOS prefix) or "bert" (CLS ... SEP)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = LLAMA_SPECIALS if style == "llama" else BERT_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials.values())}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_of)
    vocab.update({ch: NUM_SPECIAL + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(processors, specials, vocab)
    extra = {"chat_template": _CHAT_TEMPLATE} if style == "llama" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=4096,
        **{f"{k}_token": v for k, v in specials.items() if k != "cls" or style == "bert"}, **extra,
    )


def _post_processor(processors: Any, specials: dict[str, str], vocab: dict[str, int]) -> Any:
    if "bos" in specials:
        bos = specials["bos"]
        return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    cls, sep = specials["cls"], specials["sep"]
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )


def _byte_of(ch: str) -> int:
    """GPT-2's byte-to-unicode table, inverted: which byte a ByteLevel alphabet character stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    shifted = [b for b in range(256) if b not in printable]
    return shifted[code - 256]
