"""carve's models: small seeded reference architectures and loaders of real pretrained weights.

``models.registry`` names them (``get``, ``names``); nothing heavy is imported until a model is
built.
"""
