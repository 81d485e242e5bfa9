"""A small Llama-style decoder in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

It is the decoder the passes are developed against: seconds to trace, seeded weights, and the
same module names as Hugging Face's Llama (``layers.0.self_attn.q_proj``, ``layers.0.mlp``,
``norm``, ``embed_tokens``, ``lm_head``) so module scopes in the traced graph mean the same
thing as in a real checkpoint. Attention is written out (matmul, softmax, matmul) rather than
``scaled_dot_product_attention`` so the attention probabilities are a tensor in the graph that
token-pruning and cache passes can find.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.reference.common import attention, merge_heads, seeded_build, split_heads
from models.reference.tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 64
    num_layers: int = 2  # each layer adds ~1 s to a trace on 2 cores
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed from the sequence length, so the sequence axis stays symbolic."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = attention(q, self._repeat_kv(k), self._repeat_kv(v), mask)
        return self.o_proj(merge_heads(out))

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Share each key/value head with its group of query heads (grouped-query attention)."""
        batch, kv_heads, seq, dim = x.shape
        groups = self.num_heads // kv_heads
        return x[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, kv_heads * groups, seq, dim)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """forward(input_ids, attention_mask) -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in SmolLM2

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)[None]
        cos, sin = self.rotary_emb(positions)
        mask = attention_mask_4d(attention_mask, seq)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def attention_mask_4d(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq]: query i may see key j when j <= i and key j is not padding."""
    idx = torch.arange(seq, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def build(cfg: LlamaConfig | None = None) -> TinyLlama:
    cfg = cfg or LlamaConfig()
    return seeded_build(cfg.seed, lambda: TinyLlama(cfg))
