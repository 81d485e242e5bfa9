"""Text in and out of an artifact: its tokenizer, chat template and end-of-sequence tokens.

``carve optimize`` stores the source's tokenizer files beside the model
(``optimizer.tokenizer_files``); this module reads them with the ``tokenizers`` library (no
transformers, no torch). The chat template, when the model has one, is rendered with jinja2 the
way Hugging Face's ``apply_chat_template`` does (``messages``, ``add_generation_prompt``, the
special tokens). Stop tokens are the generation config's ``eos_token_id`` and the tokenizer's
end-of-sequence token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError


class Text:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ArtifactError(f"{folder} holds no tokenizer (tokenizer.json), so it cannot take text; give token ids "
                                "instead, or optimize a model that has a fast tokenizer.")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ArtifactError("text generation needs the tokenizers package; `pip install tokenizers`.") from exc
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.config = _json(folder / "tokenizer_config.json")
        self.template = self.config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            self.template = (folder / "chat_template.jinja").read_text()
        self.generation = _json(folder / "generation_config.json")

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, prompt: str, system: str | None = None) -> list[int]:
        """The prompt as a user message in the chat template, ready for the assistant's reply."""
        if not self.template:
            raise ArtifactError("this model has no chat template; drop --chat to use the prompt as plain text.")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ArtifactError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                     **{k: _token(v) for k, v in self.config.items() if k.endswith("_token")})
        return self.encode(text, special=False)

    def stop_tokens(self) -> list[int]:
        ids = self.generation.get("eos_token_id")
        stops = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        eos = _token(self.config.get("eos_token"))
        if eos and self.tokenizer.token_to_id(eos) is not None:
            stops.add(self.tokenizer.token_to_id(eos))
        return sorted(stops)

    def pad_token(self) -> int:
        for key in ("pad_token", "eos_token"):
            token = _token(self.config.get(key))
            if token and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        return 0


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value
