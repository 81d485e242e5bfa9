"""Reference architectures in plain torch: small, seeded, HF-like module names, for tests.

``llama`` (decoder), ``bert`` (sentence encoder), ``vit`` (image encoder); each has a frozen
config dataclass and ``build(cfg=None)``.
"""
