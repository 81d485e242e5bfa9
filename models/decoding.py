"""Greedy decoding over a logits-only forward: the torch reference for generated text."""

from __future__ import annotations

import torch


def greedy(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with a logits-only forward (no KV cache): the reference that generated
    text from an optimized artifact is compared against. Returns prompt + new tokens, [1, n]."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            if eos_token_id is not None and int(next_id[0, 0]) == eos_token_id:
                break
    return ids
