"""Tracing a Hugging Face model directory (config.json + weights) given on the command line.

The class is chosen from the config: ``*ForCausalLM`` architectures give ``logits`` from
``input_ids``/``attention_mask``; vision models (``dinov2``, ``vit``) give ``last_hidden_state``
from ``pixel_values``; everything else is loaded with ``AutoModel`` as a text encoder giving
``last_hidden_state``. Traces are cached by the directory's path and its files' sizes and times.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.cache import cache_dir, cache_key
from optimizer import frontend
from optimizer.progress import Progress
from runtime.errors import ModelLoadError

_VISION = {"dinov2", "vit", "deit", "beit"}


def trace_hf_directory(path: Path, progress: Progress):
    from optimizer.sources import Source, _numpy

    config = _read_config(path)
    family = _family(config)
    folder = cache_dir("traces", f"hf-{cache_key(str(path.resolve()), _fingerprint(path))}")
    module, example, axes, outputs = _prepare(path, config, family, progress)
    from optimizer.trace_cache import load_in_memory, store

    if not (folder / "model.onnx").is_file():
        with progress.step(f"tracing {path.name}"):
            store(frontend.trace(module, example, axes, outputs), folder)
    model = load_in_memory(folder / "model.onnx")
    info = {"kind": "huggingface", "path": str(path.resolve()), "model_type": config.get("model_type")}
    return Source(model, info, family=family, example_feeds=_numpy(example))


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON; check the model directory.") from None


def _family(config: dict) -> str:
    if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        return "decoder"
    return "vit" if config.get("model_type") in _VISION else "encoder"


def _fingerprint(path: Path) -> list:
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())


def _prepare(path: Path, config: dict, family: str, progress: Progress):
    import torch
    import transformers as tf

    with progress.step(f"loading {path.name} with transformers"):
        try:
            cls = tf.AutoModelForCausalLM if family == "decoder" else tf.AutoModel
            model = cls.from_pretrained(str(path), attn_implementation="eager").eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"transformers cannot load {path} ({str(exc).splitlines()[0]}); check the directory holds a complete model.") from exc
    if family == "vit":
        size = int(config.get("image_size", 224))
        example = {"pixel_values": torch.randn(1, 3, size, size)}
        return _wrap(model, "last_hidden_state"), example, {"pixel_values": {0: "batch"}}, ["last_hidden_state"]
    vocab = int(config.get("vocab_size", 100))
    ids = torch.randint(0, min(vocab, 1000), (2, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    axes = {name: {0: "batch", 1: "sequence"} for name in example}
    output = "logits" if family == "decoder" else "last_hidden_state"
    return _wrap(model, output), example, axes, [output]


def _wrap(model, output: str):
    """A module whose forward returns one named output of ``model`` as a plain tensor."""
    import torch

    class OneOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **kwargs):
            extra = {"use_cache": False} if output == "logits" else {}
            return getattr(self.model(**kwargs, **extra), output)

    return OneOutput().eval()
