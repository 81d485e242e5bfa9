"""carve's exception types.

Every error a user can cause (a bad path, a corrupt file, a wrong feed, a tampered artifact, a
pass that cannot apply) is a ``CarveError`` whose message is one sentence of cause and remedy.
The CLI prints that sentence and exits non-zero; anything else is a bug and keeps its traceback.
They live in the runtime because the runtime is the smallest package and everything imports it.
"""


class CarveError(Exception):
    """Base class: a user-facing error with a one-sentence message."""

    exit_code = 2


class ModelLoadError(CarveError):
    """The model could not be found, read, parsed or traced."""


class PassError(CarveError):
    """A pass was unknown, misconfigured, or could not apply to this model."""


class VerificationError(CarveError):
    """A graph failed the checker or one of carve's invariants after a pass."""


class ArtifactError(CarveError):
    """An artifact directory is missing, incomplete, tampered with, or of another format."""


class FeedError(CarveError):
    """Inputs given to a session do not match the artifact's signature."""
