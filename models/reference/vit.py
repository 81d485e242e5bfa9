"""A small ViT in plain torch, laid out like DINOv2 (the vit-s backbone).

A strided conv cuts the image into patches, a learned CLS token is prepended and learned
position embeddings added, then pre-norm blocks (LayerNorm, attention, add; LayerNorm, GELU MLP,
add) and a final LayerNorm. The image size is fixed by the config (position embeddings are not
interpolated), so only the batch axis is dynamic. Module names follow Hugging Face's DINOv2
(``embeddings.patch_embeddings.projection``, ``encoder.layer.0.attention.query``,
``encoder.layer.0.mlp.fc1``, ``layernorm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.reference.common import attention, merge_heads, seeded_build, split_heads


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6
    seed: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden_size) * 0.02)
        self.position_embeddings = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.hidden_size) * 0.02)
        self.patch_embeddings = PatchEmbeddings(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.output = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        return self.output(merge_heads(attention(q, k, v, None)))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.hidden_size * cfg.mlp_ratio, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class TinyViT(nn.Module):
    """forward(pixel_values [batch, 3, H, W]) -> (last_hidden_state, cls_embedding)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.layernorm(self.encoder(self.embeddings(pixel_values)))
        return hidden, hidden[:, 0]


def build(cfg: ViTConfig | None = None) -> TinyViT:
    cfg = cfg or ViTConfig()
    return seeded_build(cfg.seed, lambda: TinyViT(cfg))
