"""Example inputs for tracing and equality checks: deterministic, valid, any batch and length."""

from __future__ import annotations

import torch


def token_inputs(batch: int, seq: int, vocab_size: int, low: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids in ``[low, vocab_size)`` and an all-ones mask, from a fixed seed."""
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    ids = torch.randint(low, vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def image_inputs(batch: int, size: int, channels: int = 3) -> dict[str, torch.Tensor]:
    """Normalised-image-like pixels (standard normal), from a fixed seed."""
    gen = torch.Generator().manual_seed(batch)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}


def reference_tokens(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Token inputs for the reference text models: byte ids, never special tokens."""
    from models.reference.tokenizer import NUM_SPECIAL, VOCAB_SIZE

    return token_inputs(batch, seq, vocab_size=VOCAB_SIZE, low=NUM_SPECIAL)


def reference_images(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Image inputs for the reference ViT at its default image size (``seq`` is ignored)."""
    from models.reference.vit import ViTConfig

    return image_inputs(batch, ViTConfig().image_size)
