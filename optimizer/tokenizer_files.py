"""The tokenizer files an artifact carries, so the runtime turns text into ids without the source.

A built-in model's tokenizer is saved with ``save_pretrained``; a Hugging Face model directory's
files are copied; an artifact made from another artifact keeps that artifact's. Only the files
the runtime reads are kept (``runtime.text``): ``tokenizer.json`` (the fast tokenizer),
``tokenizer_config.json`` (special tokens, maybe the chat template), ``chat_template.jinja``,
``special_tokens_map.json`` and ``generation_config.json`` (end-of-sequence ids). A source without
a fast tokenizer gives none, and ``carve generate`` then says it needs token ids.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
         "generation_config.json")


def tokenizer_files(source: Any) -> dict[str, bytes]:
    """File name -> contents for the source's tokenizer; empty when it has none."""
    if source.spec is not None and source.spec.tokenizer is not None:
        tok = source.spec.tokenizer()
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            found = _read(Path(tmp))
        home = Path(getattr(tok, "name_or_path", "") or "/nonexistent")  # the checkpoint folder, if any
        if found and (home / "generation_config.json").is_file():
            found["generation_config.json"] = (home / "generation_config.json").read_bytes()
        return found
    if source.info.get("kind") in ("huggingface", "artifact") and source.info.get("path"):
        return _read(Path(source.info["path"]))
    return {}


def _read(folder: Path) -> dict[str, bytes]:
    found = {name: (folder / name).read_bytes() for name in FILES if (folder / name).is_file()}
    return found if "tokenizer.json" in found else {}
