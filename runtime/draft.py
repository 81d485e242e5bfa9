"""Loading an artifact's self-draft and checking that it can draft for the main model.

The draft is a complete artifact in a subdirectory (``draft/``) of the main one; the main
manifest's ``draft`` entry names the subdirectory, the skipped units and the sha256 of the
draft's ``manifest.json``, whose own ``files`` hash the draft's model and tokenizer. So loading
checks the chain: the main manifest, the draft manifest's hash, then the draft's files.

``check_pair(main, draft)`` is what speculative decoding needs of any two sessions: both have a
KV cache, the same vocabulary (the logits' last dimension) and, where both artifacts carry a
tokenizer, the same tokenizer file. Each failure is one ``ArtifactError``/``FeedError`` sentence:
no draft entry, a draft path that leaves the artifact, a missing or changed draft manifest, a
draft without a KV cache, another vocabulary, another tokenizer, positional skipping (its
layers' caches differ in length, which rollback does not handle).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from runtime.errors import ArtifactError, FeedError
from runtime.kv import KVLayout
from runtime.manifest import MANIFEST, read_manifest, sha256_file

MAKE_DRAFT = "make one with `carve optimize MODEL -o DIR --passes 'skip_layers:count=N,draft=true' --passes kv_cache`"


def draft_path(path: str | Path) -> Path | None:
    """The draft's directory inside the artifact at ``path`` (verified), or None without one."""
    path = Path(path)
    entry = read_manifest(path).get("draft")
    if not entry:
        return None
    name = PurePosixPath(str(entry.get("path", "")))
    if not name.parts or name.is_absolute() or ".." in name.parts:
        raise ArtifactError(f"{path / MANIFEST} names the draft {str(name)!r}, which is not a folder inside the "
                            "artifact; run `carve optimize` again.")
    where = path / name
    if not (where / MANIFEST).is_file():
        raise ArtifactError(f"{where} has no {MANIFEST}, so the artifact's draft is missing; run `carve optimize` again.")
    if sha256_file(where / MANIFEST) != entry.get("manifest_sha256"):
        raise ArtifactError(f"{where / MANIFEST} does not match the sha256 in {path / MANIFEST} (changed or replaced); "
                            "run `carve optimize` again.")
    return where


def load_draft(path: str | Path, threads: int | None = None) -> Any:
    """The artifact's draft as a session (its files verified like any artifact's), its ONNX Runtime
    threads not spin-waiting: the model runs in between, and spinning threads slow it down."""
    import runtime

    where = draft_path(path)
    if where is None:
        raise ArtifactError(f"{path} has no self-draft for speculative decoding; {MAKE_DRAFT}.")
    return runtime.load(where, threads=threads, spin=False)  # it takes turns with the model


def check_pair(main: Any, draft: Any) -> None:
    """Refuse a draft that cannot propose tokens for ``main`` (see the module docstring)."""
    for role, session in (("model", main), ("draft", draft)):
        try:
            KVLayout.of(session.inputs)
        except FeedError:
            raise FeedError(f"the {role} has no KV cache, which speculative decoding needs for both; "
                            f"{MAKE_DRAFT}.") from None
        if _positional(session):
            raise FeedError(f"the {role} skips layers per position (skip_layers:mode=positional), whose layers hold "
                            "caches of different lengths that a rejected draft cannot roll back; use a static draft.")
    vocab_main, vocab_draft = _vocabulary(main), _vocabulary(draft)
    if vocab_main != vocab_draft:
        raise FeedError(f"the draft's vocabulary ({vocab_draft} tokens) differs from the model's ({vocab_main}); "
                        f"a draft must be made from the same model, {MAKE_DRAFT}.")
    token_main, token_draft = _tokenizer_hash(main), _tokenizer_hash(draft)
    if token_main and token_draft and token_main != token_draft:
        raise FeedError(f"the draft's tokenizer differs from the model's; a draft must be made from the same model, "
                        f"{MAKE_DRAFT}.")


def _vocabulary(session: Any) -> int | str | None:
    shape = session.outputs[0].get("shape") or [None]
    return shape[-1]


def _positional(session: Any) -> bool:
    passes = (getattr(session, "manifest", None) or {}).get("passes", [])
    return any(p.get("name") == "skip_layers" and (p.get("options") or {}).get("mode") == "positional" for p in passes)


def _tokenizer_hash(session: Any) -> str | None:
    manifest = getattr(session, "manifest", None) or {}
    return (manifest.get("files", {}).get("tokenizer.json") or {}).get("sha256")
