"""carve's compiler: trace or load a model, run passes, lower to a target, write an artifact."""

__version__ = "0.1.0"

from optimizer.api import optimize  # noqa: E402
from optimizer.artifact import Artifact  # noqa: E402
from optimizer.frontend import load, trace  # noqa: E402

__all__ = ["optimize", "trace", "load", "Artifact", "__version__"]
