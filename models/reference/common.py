"""What the reference models share: seeded construction and the attention written out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def seeded_build(seed: int, factory: Callable[[], M]) -> M:
    """Build under a fixed seed without touching the caller's RNG, so the same config gives the
    same weights in every process (traces are cached by model name and version).

    Norm gains and biases are drawn away from 1 and 0 so that a pass that drops or mis-folds a
    norm changes the outputs and is caught by the equality tests.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
                nn.init.uniform_(module.weight, 0.8, 1.2)
                if getattr(module, "bias", None) is not None:
                    nn.init.normal_(module.bias, std=0.05)
    return model.eval()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with masked keys set to the dtype's minimum (not -inf, so a
    fully masked row gives a uniform row rather than NaN). Written out, not fused, so the
    probabilities are a tensor in the traced graph."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads*dim] -> [batch, heads, seq, dim]."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, dim] -> [batch, seq, heads*dim]."""
    batch, heads, seq, dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * dim)
