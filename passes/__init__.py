"""carve's rewrite passes, one module per family; importing this package registers them all."""

from passes import cleanup  # noqa: F401
from passes import feature_cache  # noqa: F401
from passes import kv_cache  # noqa: F401
from passes import quantize  # noqa: F401
from passes import skip_layers  # noqa: F401
from passes import prune_tokens  # noqa: F401
